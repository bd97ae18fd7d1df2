"""What a gateway receives: a listener per port of its gateway in the policy (HTTP, or HTTPS
terminating TLS per hostname), a route configuration per port with a virtual host per hostname
and the routes attached to the gateway, and a cluster and an assignment per backend of those routes.

A gateway balances a backend over every healthy endpoint in every cluster
alike, so by endpoint count (every locality at one priority), unless the
backend asks for `spread: nearest` (nearest first from the gateway's own
locality, as sidecars do) or names an active-standby order of clusters.
A proxy that names a gateway the policy does not have gets nothing (it is
served as soon as the policy has it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from meshplane.discovery import model
from meshplane.policy import placement, routing, rules
from meshplane.xds import listeners, proxy, routeconfig, translate, typeurls
from meshplane.xds.generators import base


@dataclass(frozen=True, slots=True)
class Place:
    """A gateway and where it runs, as endpoint ranking reads them."""

    gateway: str
    locality: model.Locality


def _gateway(key: proxy.ViewKey) -> str:
    return key.gateway


def _backends(policy: rules.Policy, service: model.Service, gateway: str) -> list[
        tuple[routing.Backend, model.ServicePort]]:
    ports = {p.port: p for p in service.ports if p.protocol != model.Protocol.TCP}
    return [(b, ports[b.port]) for b in sorted(policy.backends(gateway, service.key), key=lambda b: (b.port, b.subset))
            if b.port in ports]


def _service_reads(policy: rules.Policy, key: model.ServiceKey, gateway: str) -> object:
    return policy.for_service(key), policy.backends(gateway, key)


def _clusters(service: model.Service, policy: rules.Policy, gateway: str) -> base.Built:
    settings = policy.for_service(service.key)
    out = {}
    for backend, port in _backends(policy, service, gateway):
        cluster = translate.build_backend_cluster(service, port, settings, backend)
        out[cluster.name] = cluster
    return out


def _place(key: proxy.ViewKey) -> Place:
    return Place(key.gateway, key.locality)


def _placement_reads(policy: rules.Policy, key: model.ServiceKey, where: Place) -> object:
    return policy.for_service(key).locality, policy.backends(where.gateway, key)


def ranked(service: model.Service, policy: rules.Policy, where: Place,
           backend: routing.Backend) -> tuple[placement.Placement, ...]:
    """The priority table of a route backend for the gateway at `where`; `meshplane explain` reads
    it here too."""
    return placement.place_backend(
        service.endpoints, backend, client=where.locality, client_labels={},
        settings=policy.for_service(service.key).locality, spread=routing.Spread.EVERYWHERE,
    )


def _assignments(service: model.Service, policy: rules.Policy, where: Place) -> base.Built:
    out = {}
    for backend, port in _backends(policy, service, where.gateway):
        name = translate.backend_cluster_name(backend)
        out[name] = translate.build_load_assignment(name, port.name, ranked(service, policy, where, backend),
                                                    standby=backend.standby)
    return out


def _listener_scope(key: proxy.ViewKey) -> tuple[str, str]:
    return key.gateway, key.listener.address


def _no_service(service: model.Service | None) -> None:
    return None


def _gateway_reads(policy: rules.Policy, scope: tuple[str, str]) -> object:
    return policy.gateway(scope[0])


def _listeners(
    services: Mapping[model.ServiceKey, model.Service], policy: rules.Policy, scope: tuple[str, str]
) -> base.Built:
    name, address = scope
    gateway = policy.gateway(name)
    if gateway is None:
        return {}
    out = {}
    for port in sorted({ln.port for ln in gateway.listeners}):
        listener = listeners.build_gateway_listener(
            gateway, port, [ln for ln in gateway.listeners if ln.port == port], address=address)
        out[listener.name] = listener
    return out


def _route_reads(policy: rules.Policy, gateway: str) -> object:
    return policy.gateway(gateway), policy.gateway_routes(gateway), policy.retries


def _routes(services: Mapping[model.ServiceKey, model.Service], policy: rules.Policy, name: str) -> base.Built:
    gateway = policy.gateway(name)
    if gateway is None:
        return {}
    out = {}
    for port in sorted({ln.port for ln in gateway.listeners}):
        config = routeconfig.gateway_route_config(gateway, port, policy)
        out[config.name] = config
    return out


CLUSTERS = base.PerService(scope=_gateway, reads_policy=_service_reads, build=_clusters)
ASSIGNMENTS = base.PerService(scope=_place, reads_policy=_placement_reads, build=_assignments)
LISTENERS = base.PerView(scope=_listener_scope, reads_service=_no_service, reads_policy=_gateway_reads,
                         build=_listeners)
ROUTES = base.PerView(scope=_gateway, reads_service=_no_service, reads_policy=_route_reads, build=_routes)

GENERATOR = base.Generator(
    kind=proxy.Kind.GATEWAY,
    types={typeurls.CLUSTER: CLUSTERS, typeurls.ENDPOINT: ASSIGNMENTS,
           typeurls.LISTENER: LISTENERS, typeurls.ROUTE: ROUTES},
)
