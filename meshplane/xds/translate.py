"""Catalog + policy -> Envoy protos. Pure functions: data in, protos out.

Names follow Istio's so that operators' habits (and Envoy stats they know)
carry over: clusters are `outbound|PORT||HOST`, the sidecar's outbound
route config is `outbound|http|NAMESPACE`.
"""

from __future__ import annotations

from collections.abc import Sequence

from envoy.config.cluster.v3 import cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2

from meshplane.discovery import model
from meshplane.policy import placement, routing, rules

_HEALTH = {
    model.Health.HEALTHY: health_check_pb2.HEALTHY,
    model.Health.DRAINING: health_check_pb2.DRAINING,
    model.Health.UNHEALTHY: health_check_pb2.UNHEALTHY,
}
_HTTP2 = frozenset({model.Protocol.HTTP2, model.Protocol.GRPC})


def cluster_name(service: model.Service, port: model.ServicePort, subset: str = "") -> str:
    return f"outbound|{port.port}|{subset}|{service.hostname}"


def hostname(key: model.ServiceKey) -> str:
    namespace, _, name = key.partition("/")
    return f"{name}.{namespace}.svc.cluster.local"


def backend_cluster_name(backend: routing.Backend) -> str:
    """The Envoy cluster of a route backend: Istio's `outbound|PORT|SUBSET|HOST`."""
    return f"outbound|{backend.port}|{backend.subset}|{hostname(backend.service)}"


STANDBY_OVERPROVISIONING = 1_000_000
"""An active-standby assignment's overprovisioning factor (percent): a priority with one healthy
endpoint of up to 10,000 takes all the traffic, so the standby stays idle until none is left."""


def _ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )


def _duration(ms: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def build_cluster(
    service: model.Service, port: model.ServicePort, policy: rules.ServicePolicy, *,
    name: str | None = None, standby: bool = False,
) -> cluster_pb2.Cluster:
    """`standby`: an active-standby backend, whose first cluster must be able to empty completely
    (every endpoint ejectable, no panic) before the next one takes traffic."""
    cluster = cluster_pb2.Cluster(
        name=name or cluster_name(service, port),
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
    if standby:
        if cluster.HasField("outlier_detection"):
            cluster.outlier_detection.max_ejection_percent.value = 100
        cluster.common_lb_config.healthy_panic_threshold.CopyFrom(percent_pb2.Percent(value=0.0))
    # An ejection applies at once: Envoy's default 1 s merge window held back a second ejection
    # within the same second (two replicas of a region failing together cost ~20 failed requests).
    cluster.common_lb_config.update_merge_window.CopyFrom(duration_pb2.Duration(seconds=0))
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


def build_backend_cluster(
    service: model.Service, port: model.ServicePort, policy: rules.ServicePolicy, backend: routing.Backend
) -> cluster_pb2.Cluster:
    """The cluster of a route backend (part of a service, or all of it)."""
    return build_cluster(service, port, policy, name=backend_cluster_name(backend), standby=backend.standby)


def build_load_assignment(
    name: str, port_name: str, placements: Sequence[placement.Placement], *, standby: bool = False
) -> endpoint_pb2.ClusterLoadAssignment:
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    if standby:
        cla.policy.overprovisioning_factor.value = STANDBY_OVERPROVISIONING
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
