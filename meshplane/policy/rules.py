"""The resolved policy: what the translator reads, once parsing and validation are done.

These are plain frozen values (no YAML, no pydantic) so that the locality
algorithm and the translator can be tested with tables of literals.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from meshplane.discovery import model
from meshplane.policy import routing

# failoverPriority labels that name the locality rather than a pod label.
REGION_LABEL = "topology.kubernetes.io/region"
ZONE_LABEL = "topology.kubernetes.io/zone"
SUBZONE_LABEL = "topology.istio.io/subzone"
CLUSTER_LABEL = "topology.istio.io/cluster"
TOPOLOGY_LABELS = frozenset({REGION_LABEL, ZONE_LABEL, SUBZONE_LABEL, CLUSTER_LABEL})


@dataclass(frozen=True, slots=True)
class FailoverRule:
    """Traffic from clients in `from_region` fails over to `to_region` before any other."""

    from_region: str
    to_region: str


@dataclass(frozen=True, slots=True)
class DistributeRule:
    """Clients matching `from_locality` send `to` percentages (summing to 100).

    Locality patterns are `region/zone/cluster` with an optional trailing `*`.
    `to` keeps the operator's order: the first pattern matching a locality wins.
    """

    from_locality: str
    to: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class LocalitySettings:
    enabled: bool = True
    failover: tuple[FailoverRule, ...] = ()
    failover_priority: tuple[str, ...] = ()
    distribute: tuple[DistributeRule, ...] = ()


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    """Istio DestinationRule outlier detection semantics; None leaves Envoy's default."""

    consecutive_5xx_errors: int | None = None
    consecutive_gateway_errors: int | None = None
    consecutive_local_origin_failures: int | None = None
    split_external_local_origin_errors: bool = False
    interval_ms: int | None = None
    base_ejection_time_ms: int | None = None
    max_ejection_percent: int | None = None
    min_health_percent: int = 0


@dataclass(frozen=True, slots=True)
class ServicePolicy:
    outlier_detection: OutlierDetection | None = None
    locality: LocalitySettings = field(default_factory=LocalitySettings)
    connect_timeout_ms: int = 1000


@dataclass(frozen=True, slots=True)
class Policy:
    """Mesh-wide defaults plus per-service overrides (a section set on a service replaces the default's),
    and layer-7 routing: gateways, routes and the default retry policy of every route."""

    defaults: ServicePolicy = field(default_factory=ServicePolicy)
    services: Mapping[model.ServiceKey, ServicePolicy] = field(default_factory=dict)
    retries: routing.Retries = field(default_factory=routing.Retries)
    gateways: tuple[routing.Gateway, ...] = ()
    routes: tuple[routing.Route, ...] = ()
    # Indexes of the routes, derived in __post_init__ (generators look them up per service).
    _by_gateway: Mapping[str, tuple[routing.Route, ...]] = field(
        default_factory=dict, init=False, compare=False, repr=False)
    _by_service: Mapping[model.ServiceKey, tuple[routing.Route, ...]] = field(
        default_factory=dict, init=False, compare=False, repr=False)
    _backends: Mapping[tuple[str, model.ServiceKey], frozenset[routing.Backend]] = field(
        default_factory=dict, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        by_gateway: dict[str, list[routing.Route]] = {}
        by_service: dict[model.ServiceKey, list[routing.Route]] = {}
        backends: dict[tuple[str, model.ServiceKey], set[routing.Backend]] = {}
        for route in self.routes:
            owners = []
            for parent in route.parents:
                if parent.kind == "Service":
                    service = model.service_key(parent.namespace, parent.name)
                    if route not in by_service.setdefault(service, []):
                        by_service[service].append(route)
                    owners.append(routing.MESH)
                else:
                    if route not in by_gateway.setdefault(parent.name, []):
                        by_gateway[parent.name].append(route)
                    owners.append(parent.name)
            for rule in route.rules:
                for backend in (*rule.backends, *(m.backend for m in rule.mirrors)):
                    for owner in owners:
                        backends.setdefault((owner, backend.service), set()).add(backend.selects())
        object.__setattr__(self, "_by_gateway", {k: tuple(v) for k, v in by_gateway.items()})
        object.__setattr__(self, "_by_service", {k: tuple(v) for k, v in by_service.items()})
        object.__setattr__(self, "_backends", {k: frozenset(v) for k, v in backends.items()})

    def for_service(self, key: model.ServiceKey) -> ServicePolicy:
        return self.services.get(key, self.defaults)

    def gateway(self, name: str) -> routing.Gateway | None:
        return next((g for g in self.gateways if g.name == name), None)

    def gateway_routes(self, gateway: str) -> tuple[routing.Route, ...]:
        """The routes attached to a gateway, in the policy's order."""
        return self._by_gateway.get(gateway, ())

    def mesh_routes(self, service: model.ServiceKey) -> tuple[routing.Route, ...]:
        """The routes that sidecars apply to traffic for `service`."""
        return self._by_service.get(service, ())

    def backends(self, owner: str, service: model.ServiceKey) -> frozenset[routing.Backend]:
        """The backends of `service` that the routes of a gateway (or of the mesh: routing.MESH) send to,
        without their weights."""
        return self._backends.get((owner, service), frozenset())

    def client_label_keys(self) -> frozenset[str]:
        """Pod labels of the *client* that some failoverPriority reads (part of a proxy's view key)."""
        keys: set[str] = set()
        for sp in (self.defaults, *self.services.values()):
            for entry in sp.locality.failover_priority:
                name = entry.split("=", 1)[0]
                if name not in TOPOLOGY_LABELS and "=" not in entry:
                    keys.add(name)
        return frozenset(keys)
