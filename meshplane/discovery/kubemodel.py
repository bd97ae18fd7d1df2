"""Kubernetes objects -> compact records -> catalog values, as pure functions.

Objects come in as the API server's JSON (dicts), never as the client's model
classes: building model objects costs more than the rest of a sync together,
and we keep only a few fields of each. A record is the part of an object the
catalog needs, frozen and comparable, so a MODIFIED event that touches nothing
we use (a pod's status, a node's heartbeat) compares equal and goes no further.

Bad data is handled the way the Kubernetes API documents it and reported to a
`Problems` sink, which logs each (problem, object) once however many events
repeat it.

Protocol of a service port (what Envoy should speak to it), as Istio reads it:
  1. `appProtocol`, when set, decides (`model.app_protocol`): http, kubernetes.io/ws -> HTTP;
     http2, kubernetes.io/h2c -> HTTP2; grpc -> GRPC; anything else (tcp, tls, https,
     kubernetes.io/wss, a name of our own) -> TCP.
  2. else the port name's prefix, Istio's convention `<protocol>[-<suffix>]`, read the same
     way: http, http2, grpc; anything else (tcp-, mysql, dns-tcp, metrics, no name) -> TCP.
  3. TCP is not served (no cluster, no route): a port is served only when something says it
     speaks HTTP. Istio would sniff the rest; a control plane cannot, and serving DNS or a
     database as HTTP breaks it.
UDP and SCTP ports are left out: Envoy's clusters here carry TCP.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from meshplane.discovery import model

log = structlog.get_logger(__name__)

Obj = Mapping[str, Any]
_T = TypeVar("_T", bound=tuple[Any, ...])

REGION_LABEL = "topology.kubernetes.io/region"
ZONE_LABEL = "topology.kubernetes.io/zone"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"


class Problems:
    """Logs each (problem, object) once, however many events repeat it. Thread-safe.

    `forget(obj)` when the object is deleted, so a recreated object that is still
    broken is reported again, and the memory of problems does not grow forever.
    """

    def __init__(self, *, cluster: str = "") -> None:
        self.cluster = cluster
        self._seen: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def report(self, problem: str, obj: str, **fields: object) -> None:
        with self._lock:
            seen = self._seen.setdefault(obj, set())
            if problem in seen:
                return
            seen.add(problem)
        log.warning(problem, object=obj, cluster=self.cluster, **fields)

    def forget(self, obj: str, problem: str | None = None) -> None:
        """Forget every problem of `obj`, or only `problem`: the next report of it is logged again."""
        with self._lock:
            if problem is None:
                self._seen.pop(obj, None)
            elif (seen := self._seen.get(obj)) is not None:
                seen.discard(problem)
                if not seen:
                    del self._seen[obj]

    def __contains__(self, item: tuple[str, str]) -> bool:
        problem, obj = item
        with self._lock:
            return problem in self._seen.get(obj, ())


@dataclass(frozen=True, slots=True)
class ServiceRecord:
    namespace: str
    name: str
    ports: tuple[model.ServicePort, ...]

    @property
    def key(self) -> model.ServiceKey:
        return model.service_key(self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class SliceEndpoint:
    """One endpoint of a slice: its first address (the API says the others are fungible)."""

    address: str
    health: model.Health
    node: str  # "" when the slice does not say
    zone: str
    pod: str  # "namespace/name" of the targetRef Pod, "" when it is not a pod


@dataclass(frozen=True, slots=True)
class SliceRecord:
    namespace: str
    name: str
    service: str
    ports: tuple[tuple[str, int], ...]  # (slice port name, port); "" for an unnamed port
    endpoints: tuple[SliceEndpoint, ...]

    @property
    def service_key(self) -> model.ServiceKey:
        return model.service_key(self.namespace, self.service)


@dataclass(frozen=True, slots=True)
class NodeRecord:
    name: str
    region: str
    zone: str


@dataclass(frozen=True, slots=True)
class PodRecord:
    """All we keep of a pod (its key says which): labels, sorted, shared with its ReplicaSet's pods."""

    labels: tuple[tuple[str, str], ...]


def object_key(obj: Obj) -> str:
    """`namespace/name`, or `name` for a cluster-scoped object: the key of every store."""
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    # interned: a pod's key is also in every slice endpoint that points at it
    return sys.intern(f"{ns}/{meta.get('name', '')}" if ns else str(meta.get("name", "")))


def resource_version(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


def version_at_least(version: str, other: str) -> bool | None:
    """Whether resourceVersion `version` is at or past `other`; None if either is not one that compares.

    As client-go's CompareResourceVersion (KEP-5504): a positive decimal integer without leading zeros.
    """
    if not (_comparable(version) and _comparable(other)):
        return None
    return int(version) >= int(other)


def _comparable(version: str) -> bool:
    return version.isdecimal() and version.isascii() and not version.startswith("0")


def protocol(port: Obj) -> model.Protocol:
    """A ServicePort's protocol: its appProtocol, else its name's prefix (module docstring)."""
    app = port.get("appProtocol")
    if app:
        return model.app_protocol(str(app))
    # A port name is a DNS label (no "/"), so only the un-prefixed values can match. `grpc-web` is the
    # one protocol with a dash in it, so it is looked for first, as Istio does.
    name = str(port.get("name") or "").lower()
    if name == "grpc-web" or name.startswith("grpc-web-"):
        return model.Protocol.HTTP
    return model.app_protocol(name.split("-", 1)[0])


def service_record(obj: Obj, problems: Problems | None = None) -> ServiceRecord | None:
    """None for what has no endpoints of its own to route to (ExternalName services)."""
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    if spec.get("type") == "ExternalName":
        return None
    ports = []
    for p in spec.get("ports") or ():
        if str(p.get("protocol") or "TCP") != "TCP":
            continue
        if not isinstance(p.get("port"), int):
            if problems is not None:
                problems.report("service port without a number skipped", f"Service {object_key(obj)}",
                                port=p.get("name") or "")
            continue
        ports.append(model.ServicePort(name=str(p.get("name") or ""), port=p["port"], protocol=protocol(p)))
    return ServiceRecord(namespace=_intern(meta.get("namespace")), name=_str(meta.get("name")), ports=tuple(ports))


def slice_record(obj: Obj, problems: Problems | None = None, *, pods: bool = True) -> SliceRecord | None:
    """None for slices we cannot use: no service label, FQDN or unknown address types.

    `pods` False: pods are not watched, so their keys are not kept either.
    """
    meta = obj.get("metadata") or {}
    where = f"EndpointSlice {object_key(obj)}"
    service = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
    if not service:
        return None  # a slice not managed for a Service (e.g. a mirror of something else)
    address_type = obj.get("addressType")
    if address_type not in ("IPv4", "IPv6"):
        if problems is not None:
            problem = "FQDN endpoint slice skipped" if address_type == "FQDN" else "unknown address type, slice skipped"
            problems.report(problem, where, address_type=address_type)
        return None
    namespace = _intern(meta.get("namespace"))
    ports = []
    for p in obj.get("ports") or ():
        if not isinstance(p.get("port"), int):
            if problems is not None:
                problems.report("slice port without a number skipped", where, port=p.get("name") or "")
            continue
        ports.append((str(p.get("name") or ""), int(p["port"])))
    endpoints = []
    for i, ep in enumerate(obj.get("endpoints") or ()):
        addresses = ep.get("addresses") or ()
        if not addresses:
            if problems is not None:
                problems.report("slice endpoint without addresses skipped", where, endpoint=i)
            continue
        ref = ep.get("targetRef") or {}
        is_pod = pods and ref.get("kind") == "Pod" and ref.get("name")
        pod = sys.intern(f"{ref.get('namespace') or namespace}/{ref['name']}") if is_pod else ""
        endpoints.append(
            SliceEndpoint(
                address=str(addresses[0]),
                health=health(ep.get("conditions") or {}),
                node=_intern(ep.get("nodeName")),
                zone=_intern(ep.get("zone")),
                pod=pod,
            )
        )
    return SliceRecord(
        namespace=namespace,
        name=_str(meta.get("name")),
        service=str(service),
        ports=tuple(sorted(ports)),
        endpoints=tuple(endpoints),
    )


def health(conditions: Obj) -> model.Health:
    """ready unset means ready (API docs); serving-but-terminating is draining; the rest unhealthy."""
    ready = conditions.get("ready")
    if ready is None or ready is True:
        return model.Health.HEALTHY
    if conditions.get("serving") is True and conditions.get("terminating") is True:
        return model.Health.DRAINING
    return model.Health.UNHEALTHY


def node_record(obj: Obj, problems: Problems | None = None) -> NodeRecord:
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    record = NodeRecord(
        name=_intern(meta.get("name")), region=_intern(labels.get(REGION_LABEL)), zone=_intern(labels.get(ZONE_LABEL))
    )
    if problems is not None and not (record.region and record.zone):
        problems.report("node without topology labels", f"Node {record.name}",
                        region=record.region, zone=record.zone)
    return record


def pod_record(obj: Obj, problems: Problems | None = None) -> PodRecord:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return PodRecord(labels=_shared(tuple(sorted((_intern(k), _intern(v)) for k, v in labels.items()))))


def service_in_cluster(
    service: ServiceRecord,
    slices: Iterable[SliceRecord],
    *,
    cluster: model.ClusterId,
    default_region: str = "",
    nodes: Callable[[str], NodeRecord | None],
    pods: Callable[[str], PodRecord | None] | None = None,
    problems: Problems | None = None,
) -> model.ServiceInCluster:
    """A service's ports and its endpoints merged over all its slices, sorted by address.

    An address in two slices (the controller moving it) counts once, with its best health.
    `pods` None: pods are not watched, endpoints carry no labels.
    """
    port_names = {p.name for p in service.ports}
    single = service.ports[0].name if len(service.ports) == 1 else None
    by_address: dict[str, model.Endpoint] = {}
    for sl in slices:
        ports = _endpoint_ports(sl, port_names, single, problems)
        for ep in sl.endpoints:
            node = nodes(ep.node) if ep.node else None
            locality = _locality(
                region=(node.region if node else "") or default_region,
                zone=(node.zone if node else "") or ep.zone,
                cluster=cluster,
            )
            pod = pods(ep.pod) if pods is not None and ep.pod else None
            endpoint = model.Endpoint(
                address=ep.address,
                ports=ports,
                locality=locality,
                labels=pod.labels if pod is not None else (),
                health=ep.health,
            )
            seen = by_address.get(ep.address)
            if seen is None or _HEALTH_RANK[endpoint.health] < _HEALTH_RANK[seen.health]:
                by_address[ep.address] = endpoint
    return model.ServiceInCluster(
        name=service.name,
        namespace=service.namespace,
        ports=service.ports,
        endpoints=tuple(by_address[a] for a in sorted(by_address)),
    )


_HEALTH_RANK = {model.Health.HEALTHY: 0, model.Health.DRAINING: 1, model.Health.UNHEALTHY: 2}


def _endpoint_ports(
    sl: SliceRecord, port_names: set[str], single: str | None, problems: Problems | None
) -> tuple[tuple[str, int], ...]:
    """Slice ports -> (service port name, port). Names match; an unnamed one needs an unnamed or single port."""
    out = []
    for name, number in sl.ports:
        if name in port_names:
            out.append((name, number))
        elif not name and single is not None:
            out.append((single, number))
        elif not name and problems is not None:
            problems.report("slice port without a name on a multi-port service skipped",
                            f"EndpointSlice {sl.namespace}/{sl.name}", port=number)
    return _shared(tuple(sorted(out)))


# Endpoints of one cluster share a handful of localities, port maps and label sets: keep one copy of each.
_LOCALITIES: dict[tuple[str, str, str], model.Locality] = {}
_TUPLES: dict[tuple[Any, ...], tuple[Any, ...]] = {}


_SHARED_MAX = 100_000  # a bound, not a working limit: sharing is an optimisation, forgetting is safe


def _locality(*, region: str, zone: str, cluster: str) -> model.Locality:
    key = (region, zone, cluster)
    found = _LOCALITIES.get(key)
    if found is None:
        if len(_LOCALITIES) >= _SHARED_MAX:
            _LOCALITIES.clear()
        found = _LOCALITIES.setdefault(key, model.Locality(region=region, zone=zone, cluster=cluster))
    return found


def _shared(value: _T) -> _T:
    if len(_TUPLES) >= _SHARED_MAX:
        _TUPLES.clear()
    return _TUPLES.setdefault(value, value)  # type: ignore[return-value]


def _str(value: object) -> str:
    return "" if value is None else str(value)


def _intern(value: object) -> str:
    return sys.intern(str(value)) if value else ""
