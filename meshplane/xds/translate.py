"""Catalog + policy -> Envoy protos. Pure functions: data in, protos out.

Names follow Istio's so that operators' habits (and Envoy stats they know)
carry over: clusters are `outbound|PORT||HOST`, the sidecar's outbound
route config is `outbound|http|NAMESPACE`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from envoy.config.cluster.v3 import cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2

from meshplane.discovery import model
from meshplane.policy import placement, rules

_HEALTH = {
    model.Health.HEALTHY: health_check_pb2.HEALTHY,
    model.Health.DRAINING: health_check_pb2.DRAINING,
    model.Health.UNHEALTHY: health_check_pb2.UNHEALTHY,
}
_HTTP2 = frozenset({model.Protocol.HTTP2, model.Protocol.GRPC})


def cluster_name(service: model.Service, port: model.ServicePort) -> str:
    return f"outbound|{port.port}||{service.hostname}"


def route_config_name(namespace: str) -> str:
    return f"outbound|http|{namespace}"


def _ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )


def _duration(ms: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def build_cluster(
    service: model.Service, port: model.ServicePort, policy: rules.ServicePolicy
) -> cluster_pb2.Cluster:
    cluster = cluster_pb2.Cluster(
        name=cluster_name(service, port),
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads()),
        connect_timeout=_duration(policy.connect_timeout_ms),
        lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
    )
    if port.protocol in _HTTP2:
        options = http_protocol_options_pb2.HttpProtocolOptions(
            explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
                http2_protocol_options={}
            )
        )
        packed = any_pb2.Any()
        packed.Pack(options)
        cluster.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].CopyFrom(
            packed
        )
    if policy.locality.distribute:
        # Locality weights are only honoured with locality-weighted LB on.
        cluster.common_lb_config.locality_weighted_lb_config.SetInParent()
    if policy.outlier_detection is not None:
        _apply_outlier_detection(cluster, policy.outlier_detection)
    return cluster


def _apply_outlier_detection(cluster: cluster_pb2.Cluster, od: rules.OutlierDetection) -> None:
    """Istio's mapping (pilot applyOutlierDetection): a 0 count disables that detector."""
    out = outlier_detection_pb2.OutlierDetection(
        enforcing_success_rate=wrappers_pb2.UInt32Value(value=0),
    )
    if od.consecutive_5xx_errors is not None:
        out.consecutive_5xx.value = od.consecutive_5xx_errors
        out.enforcing_consecutive_5xx.value = 100 if od.consecutive_5xx_errors > 0 else 0
    if od.consecutive_gateway_errors is not None:
        out.consecutive_gateway_failure.value = od.consecutive_gateway_errors
        out.enforcing_consecutive_gateway_failure.value = 100 if od.consecutive_gateway_errors > 0 else 0
    if od.interval_ms is not None:
        out.interval.CopyFrom(_duration(od.interval_ms))
    if od.base_ejection_time_ms is not None:
        out.base_ejection_time.CopyFrom(_duration(od.base_ejection_time_ms))
    if od.max_ejection_percent is not None:
        out.max_ejection_percent.value = od.max_ejection_percent
    if od.split_external_local_origin_errors:
        out.split_external_local_origin_errors = True
        if od.consecutive_local_origin_failures is not None:
            n = od.consecutive_local_origin_failures
            out.consecutive_local_origin_failure.value = n
            out.enforcing_consecutive_local_origin_failure.value = 100 if n > 0 else 0
        out.enforcing_local_origin_success_rate.value = 0
    cluster.outlier_detection.CopyFrom(out)
    # Set even when 0: Envoy's default of 50% would spread traffic back onto
    # ejected hosts instead of failing over to the next priority.
    cluster.common_lb_config.healthy_panic_threshold.CopyFrom(
        percent_pb2.Percent(value=float(od.min_health_percent))
    )


def build_load_assignment(
    name: str, port_name: str, placements: Sequence[placement.Placement]
) -> endpoint_pb2.ClusterLoadAssignment:
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    for placed in placements:
        group = cla.endpoints.add(
            locality=base_pb2.Locality(
                region=placed.locality.region,
                zone=placed.locality.zone,
                sub_zone=placed.locality.cluster,
            ),
            priority=placed.priority,
        )
        group.load_balancing_weight.value = placed.weight
        for ep in placed.endpoints:
            target = ep.port_for(port_name)
            if target is None:
                continue
            group.lb_endpoints.append(
                endpoint_components_pb2.LbEndpoint(
                    endpoint=endpoint_components_pb2.Endpoint(
                        address=address_pb2.Address(
                            socket_address=address_pb2.SocketAddress(address=ep.address, port_value=target)
                        )
                    ),
                    health_status=_HEALTH[ep.health],
                    load_balancing_weight=wrappers_pb2.UInt32Value(value=ep.weight),
                )
            )
    return cla


def build_route_config(
    namespace: str, services: Iterable[model.Service]
) -> route_pb2.RouteConfiguration:
    """One virtual host per HTTP service port, reachable by the names Kubernetes DNS resolves."""
    config = route_pb2.RouteConfiguration(
        name=route_config_name(namespace), validate_clusters=wrappers_pb2.BoolValue(value=False)
    )
    for service in sorted(services, key=lambda s: (s.namespace, s.name)):
        http_ports = [p for p in sorted(service.ports, key=lambda p: p.port) if p.protocol != model.Protocol.TCP]
        for index, port in enumerate(http_ports):
            names = [f"{service.name}.{service.namespace}", f"{service.name}.{service.namespace}.svc", service.hostname]
            if service.namespace == namespace:
                names.insert(0, service.name)
            domains = [f"{n}:{port.port}" for n in names]
            if index == 0:  # a name without a port means the service's first port
                domains = names + domains
            config.virtual_hosts.append(
                route_components_pb2.VirtualHost(
                    name=f"{service.hostname}:{port.port}",
                    domains=domains,
                    routes=[
                        route_components_pb2.Route(
                            match=route_components_pb2.RouteMatch(prefix="/"),
                            route=route_components_pb2.RouteAction(cluster=cluster_name(service, port)),
                        )
                    ],
                )
            )
    return config


def build_listener(*, name: str, address: str, port: int, route_name: str) -> listener_pb2.Listener:
    """The sidecar's outbound HTTP listener: applications call services by name through it."""
    router = any_pb2.Any()
    router.Pack(router_pb2.Router())
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=name,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(config_source=_ads(), route_config_name=route_name),
        http_filters=[hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=router)],
    )
    packed = any_pb2.Any()
    packed.Pack(manager)
    return listener_pb2.Listener(
        name=name,
        address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address=address, port_value=port)),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager", typed_config=packed
                    )
                ]
            )
        ],
    )
