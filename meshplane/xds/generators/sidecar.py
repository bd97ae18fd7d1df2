"""What an Envoy sidecar receives (docs/xds.md): per HTTP-family service port a cluster and its
endpoint assignment, ranked for the sidecar's locality; an outbound HTTP listener; and a route
configuration that routes every DNS name of a service to it, by the mesh routes attached to the
service (policy routes with a Service parent), else all of it to the service's cluster.

Sharing, from what each builder reads: clusters are the same for every
sidecar; assignments differ by the client's locality and labels; route
configurations by namespace (short names resolve in it); listeners by the
listener's address, port and namespace. Mesh routes that send to part of
a service (a label subset, a cluster, an active-standby order) add a
cluster and an assignment for that part, ranked nearest first like the rest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from meshplane.discovery import model
from meshplane.policy import placement, routing, rules
from meshplane.xds import listeners, proxy, routeconfig, translate, typeurls
from meshplane.xds.generators import base

LISTENER_NAME = "outbound_http"


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a client calls from, as endpoint ranking reads it."""

    locality: model.Locality
    labels: tuple[tuple[str, str], ...]


def http_ports(service: model.Service) -> list[model.ServicePort]:
    """The ports a sidecar serves: every HTTP-family one (TCP ports are not served)."""
    return [p for p in service.ports if p.protocol != model.Protocol.TCP]


def everyone(key: proxy.ViewKey) -> None:
    return None


def mesh_subsets(policy: rules.Policy, service: model.Service,
                 served: Sequence[model.ServicePort]) -> list[tuple[routing.Backend, model.ServicePort]]:
    """The parts of `service` the mesh routes send to (not the whole service) on the ports `served`."""
    ports = {p.port: p for p in served}
    return [(b, ports[b.port]) for b in sorted(policy.backends(routing.MESH, service.key), key=lambda b: b.subset)
            if b.subset and b.port in ports]


def mesh_service_reads(policy: rules.Policy, key: model.ServiceKey, scope: object) -> object:
    return policy.for_service(key), policy.backends(routing.MESH, key)


def _clusters(service: model.Service, policy: rules.Policy, scope: None) -> base.Built:
    settings = policy.for_service(service.key)
    out = {
        translate.cluster_name(service, port): translate.build_cluster(service, port, settings)
        for port in http_ports(service)
    }
    for backend, port in mesh_subsets(policy, service, http_ports(service)):
        cluster = translate.build_backend_cluster(service, port, settings, backend)
        out[cluster.name] = cluster
    return out


def origin(key: proxy.ViewKey) -> Origin:
    return Origin(key.locality, key.labels)


def mesh_placement_reads(policy: rules.Policy, key: model.ServiceKey, scope: object) -> object:
    return policy.for_service(key).locality, policy.backends(routing.MESH, key)


def ranked(service: model.Service, policy: rules.Policy, origin: Origin,
           backend: routing.Backend | None = None) -> tuple[placement.Placement, ...]:
    """The priority table of the service (or of a mesh route's part of it) for a sidecar at `origin`;
    `meshplane explain` reads it here too."""
    settings = policy.for_service(service.key).locality
    if backend is None:
        return placement.place(service.endpoints, client=origin.locality, client_labels=dict(origin.labels),
                               settings=settings)
    return placement.place_backend(service.endpoints, backend, client=origin.locality,
                                   client_labels=dict(origin.labels), settings=settings, spread=routing.Spread.NEAREST)


def _assignments(service: model.Service, policy: rules.Policy, where: Origin) -> base.Built:
    placements = ranked(service, policy, where)
    out = {}
    for port in http_ports(service):
        name = translate.cluster_name(service, port)
        out[name] = translate.build_load_assignment(name, port.name, placements)
    for backend, port in mesh_subsets(policy, service, http_ports(service)):
        name = translate.backend_cluster_name(backend)
        out[name] = translate.build_load_assignment(name, port.name, ranked(service, policy, where, backend),
                                                    standby=backend.standby)
    return out


def _listener_scope(key: proxy.ViewKey) -> tuple[proxy.Listener, str]:
    return key.listener, key.namespace


def _no_service(service: model.Service | None) -> None:
    return None


def no_policy(policy: rules.Policy, scope: object) -> None:
    return None


def _listener(
    services: Mapping[model.ServiceKey, model.Service], policy: rules.Policy, scope: tuple[proxy.Listener, str]
) -> base.Built:
    listener, namespace = scope
    return {LISTENER_NAME: listeners.build_listener(
        name=LISTENER_NAME, address=listener.address, port=listener.port,
        route_name=routeconfig.route_config_name(namespace),
    )}


def namespace_of(key: proxy.ViewKey) -> str:
    return key.namespace


def _shape(service: model.Service | None) -> object:
    """What route configurations read of a service: its identity and ports, not its endpoints."""
    return None if service is None else (service.name, service.namespace, service.ports)


def mesh_route_reads(policy: rules.Policy, scope: object) -> object:
    return policy.retries, tuple(r for r in policy.routes if any(p.kind == "Service" for p in r.parents))


def _routes(services: Mapping[model.ServiceKey, model.Service], policy: rules.Policy, namespace: str) -> base.Built:
    return {routeconfig.route_config_name(namespace):
            routeconfig.sidecar_route_config(namespace, services.values(), policy)}


CLUSTERS = base.PerService(scope=everyone, reads_policy=mesh_service_reads, build=_clusters)
ASSIGNMENTS = base.PerService(scope=origin, reads_policy=mesh_placement_reads, build=_assignments)
LISTENERS = base.PerView(scope=_listener_scope, reads_service=_no_service, reads_policy=no_policy, build=_listener)
ROUTES = base.PerView(scope=namespace_of, reads_service=_shape, reads_policy=mesh_route_reads, build=_routes)

GENERATOR = base.Generator(
    kind=proxy.Kind.SIDECAR,
    types={typeurls.CLUSTER: CLUSTERS, typeurls.ENDPOINT: ASSIGNMENTS,
           typeurls.LISTENER: LISTENERS, typeurls.ROUTE: ROUTES},
)
