"""What a proxyless gRPC client receives (docs/grpc.md): its own xDS client dials `xds:///NAME:PORT`
and asks for an API listener of exactly that name, then its route configuration, clusters and
endpoint assignments, each checked more strictly than Envoy does (gRFC A27, A28, A50).

- Listeners: per gRPC-protocol service port, one API listener per name a
  client may dial it by: `NAME.NAMESPACE:PORT`, `NAME.NAMESPACE.svc:PORT`,
  `NAME.NAMESPACE.svc.cluster.local:PORT`, and `NAME:PORT` for the services
  of the client's own namespace. Each holds an HttpConnectionManager that
  takes its route configuration over ADS and ends in the router filter.
- Route configurations: one per service port (routeconfig.grpc_route_config):
  the mesh routes attached to it, translated to what gRPC supports.
- Clusters: EDS over ADS, round robin, as sidecars get them, but outlier
  detection as failure-percentage ejection: gRPC ignores the consecutive-error
  detectors the policy speaks of (`grpc_outlier_detection`).
- Endpoint assignments: ranked nearest first as a sidecar's are, made into
  what gRPC accepts (`grpc_assignment`).

Sharing: clusters are the same for every gRPC client; assignments differ by
the client's locality and labels; listeners by namespace; route
configurations not at all.
"""

from __future__ import annotations

from collections.abc import Mapping

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_pb2

from meshplane.discovery import model
from meshplane.policy import rules
from meshplane.xds import listeners, proxy, routeconfig, translate, typeurls
from meshplane.xds.generators import base, sidecar

FAILURE_PERCENTAGE_THRESHOLD = 50
"""An endpoint is ejected when more than this percentage of its calls in an interval failed."""


def _grpc_ports(service: model.Service) -> list[model.ServicePort]:
    return [p for p in service.ports if p.protocol == model.Protocol.GRPC]


def listener_names(service: model.Service, port: model.ServicePort, namespace: str) -> list[str]:
    """The names a client of `namespace` may dial the port by (its short name only in its own namespace)."""
    short, *qualified = routeconfig.grpc_dial_names(service)
    names = [short, *qualified] if service.namespace == namespace else qualified
    return [f"{n}:{port.port}" for n in names]


def grpc_outlier_detection(cluster: cluster_pb2.Cluster, od: rules.OutlierDetection | None) -> None:
    """The policy's outlier detection, as gRPC applies it (gRFC A50): failure-percentage ejection.

    gRPC ignores the consecutive-5xx, gateway and local-origin detectors, and has no split of
    errors by origin: a call fails when it ends with any status but OK. So a policy that ejects
    after N consecutive errors ejects, for gRPC, an endpoint that served at least N calls in an
    interval of which more than FAILURE_PERCENTAGE_THRESHOLD % failed, at the end of that interval,
    however few endpoints the priority has. The interval, ejection time and maximum ejection
    percentage are the policy's, as for Envoy.
    """
    if od is None:
        return
    counts = [n for n in (od.consecutive_5xx_errors, od.consecutive_gateway_errors,
                          od.consecutive_local_origin_failures) if n]
    out = cluster.outlier_detection
    for name in ("consecutive_5xx", "enforcing_consecutive_5xx", "consecutive_gateway_failure",
                 "enforcing_consecutive_gateway_failure", "consecutive_local_origin_failure",
                 "enforcing_consecutive_local_origin_failure", "enforcing_local_origin_success_rate",
                 "split_external_local_origin_errors"):
        out.ClearField(name)  # ignored by gRPC: left out so that what it is sent is what it does
    if not counts:
        out.enforcing_failure_percentage.value = 0
        return
    out.enforcing_failure_percentage.value = 100
    out.failure_percentage_threshold.value = FAILURE_PERCENTAGE_THRESHOLD
    out.failure_percentage_minimum_hosts.value = 1  # gRPC's default 5 would never eject in a zone of fewer
    out.failure_percentage_request_volume.value = min(counts)


def _grpc_cluster(cluster: cluster_pb2.Cluster, settings: rules.ServicePolicy) -> cluster_pb2.Cluster:
    cluster.ClearField("typed_extension_protocol_options")  # gRPC speaks HTTP/2 to every backend anyway
    grpc_outlier_detection(cluster, settings.outlier_detection)
    return cluster


def _clusters(service: model.Service, policy: rules.Policy, scope: None) -> base.Built:
    settings = policy.for_service(service.key)
    out = {translate.cluster_name(service, port): _grpc_cluster(translate.build_cluster(service, port, settings),
                                                                settings)
           for port in _grpc_ports(service)}
    for backend, port in sidecar.mesh_subsets(policy, service, _grpc_ports(service)):
        cluster = _grpc_cluster(translate.build_backend_cluster(service, port, settings, backend), settings)
        out[cluster.name] = cluster
    return out


def grpc_assignment(cla: endpoint_pb2.ClusterLoadAssignment) -> endpoint_pb2.ClusterLoadAssignment:
    """An assignment as gRPC accepts it (it NACKs the others): priorities numbered without gaps, a
    locality once per priority, an address once per cluster (its first, nearest place kept), every
    locality weighted, and no locality left without an endpoint."""
    out = endpoint_pb2.ClusterLoadAssignment(cluster_name=cla.cluster_name)
    seen: set[tuple[str, int]] = set()
    groups: dict[tuple[int, str, str, str], endpoint_components_pb2.LocalityLbEndpoints] = {}
    for group in sorted(cla.endpoints, key=lambda g: g.priority):
        where = (group.priority, group.locality.region, group.locality.zone, group.locality.sub_zone)
        merged = groups.get(where)
        if merged is None:
            merged = groups[where] = endpoint_components_pb2.LocalityLbEndpoints(locality=group.locality,
                                                                      priority=group.priority)
            merged.load_balancing_weight.value = max(1, group.load_balancing_weight.value)
        for lb in group.lb_endpoints:
            socket = lb.endpoint.address.socket_address
            address = (socket.address, socket.port_value)
            if address not in seen:
                seen.add(address)
                merged.lb_endpoints.append(lb)
    kept = [g for g in groups.values() if g.lb_endpoints]
    renumbered = {p: i for i, p in enumerate(sorted({g.priority for g in kept}))}
    for group in kept:
        group.priority = renumbered[group.priority]
        out.endpoints.append(group)
    return out


def _assignments(service: model.Service, policy: rules.Policy, origin: sidecar.Origin) -> base.Built:
    placements = sidecar.ranked(service, policy, origin)
    out = {}
    for port in _grpc_ports(service):
        name = translate.cluster_name(service, port)
        out[name] = grpc_assignment(translate.build_load_assignment(name, port.name, placements))
    for backend, port in sidecar.mesh_subsets(policy, service, _grpc_ports(service)):
        name = translate.backend_cluster_name(backend)
        out[name] = grpc_assignment(translate.build_load_assignment(
            name, port.name, sidecar.ranked(service, policy, origin, backend)))
    return out


def _shape(service: model.Service | None) -> object:
    """What listeners and route configurations read of a service: its identity and gRPC ports."""
    return None if service is None else (service.name, service.namespace, tuple(_grpc_ports(service)))


def _listeners(services: Mapping[model.ServiceKey, model.Service], policy: rules.Policy,
               namespace: str) -> base.Built:
    out: dict[str, listener_pb2.Listener] = {}
    for service in services.values():
        for port in _grpc_ports(service):
            route = routeconfig.grpc_route_config_name(service, port)
            for name in listener_names(service, port, namespace):
                out[name] = listeners.build_api_listener(name=name, route_name=route)
    return out


def _routes(services: Mapping[model.ServiceKey, model.Service], policy: rules.Policy, scope: None) -> base.Built:
    out = {}
    for service in services.values():
        for port in _grpc_ports(service):
            config = routeconfig.grpc_route_config(service, port, policy)
            out[config.name] = config
    return out


CLUSTERS = base.PerService(scope=sidecar.everyone, reads_policy=sidecar.mesh_service_reads, build=_clusters)
ASSIGNMENTS = base.PerService(scope=sidecar.origin, reads_policy=sidecar.mesh_placement_reads, build=_assignments)
LISTENERS = base.PerView(scope=sidecar.namespace_of, reads_service=_shape, reads_policy=sidecar.no_policy,
                         build=_listeners)
ROUTES = base.PerView(scope=sidecar.everyone, reads_service=_shape, reads_policy=sidecar.mesh_route_reads,
                      build=_routes)

GENERATOR = base.Generator(
    kind=proxy.Kind.GRPC,
    types={typeurls.CLUSTER: CLUSTERS, typeurls.ENDPOINT: ASSIGNMENTS,
           typeurls.LISTENER: LISTENERS, typeurls.ROUTE: ROUTES},
)
