"""Table tests for the Cluster the translator builds: outlier detection with Istio's semantics, panic
threshold, locality-weighted LB. Expected values are written as Envoy's config_dump shows them."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import json_format

from meshplane.discovery import model
from meshplane.policy import rules
from meshplane.xds import translate

SERVICE = model.Service(name="mockb", namespace="default", ports=(model.ServicePort("http", 8000),))
OD = rules.OutlierDetection


def cluster_for(policy: rules.ServicePolicy) -> Any:
    return translate.build_cluster(SERVICE, SERVICE.ports[0], policy)


def as_dump(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


# Istio's pilot applyOutlierDetection (pilot/pkg/networking/core/cluster_traffic_policy.go), row by row.
OUTLIER_DETECTION = [
    pytest.param(
        OD(), {"enforcing_success_rate": 0},
        id="present-but-empty-turns-success-rate-off-and-nothing-else",
    ),
    pytest.param(
        OD(consecutive_5xx_errors=3), {"consecutive_5xx": 3, "enforcing_consecutive_5xx": 100,
                                       "enforcing_success_rate": 0},
        id="5xx-count-enforced-100",
    ),
    pytest.param(
        OD(consecutive_5xx_errors=0), {"consecutive_5xx": 0, "enforcing_consecutive_5xx": 0,
                                       "enforcing_success_rate": 0},
        id="5xx-count-0-disables-5xx-enforcement",
    ),
    pytest.param(
        OD(consecutive_gateway_errors=2),
        {"consecutive_gateway_failure": 2, "enforcing_consecutive_gateway_failure": 100,
         "enforcing_success_rate": 0},
        id="gateway-errors-enforced-100",  # Envoy's own default for this detector is 0 (off)
    ),
    pytest.param(
        OD(consecutive_gateway_errors=0),
        {"consecutive_gateway_failure": 0, "enforcing_consecutive_gateway_failure": 0,
         "enforcing_success_rate": 0},
        id="gateway-errors-0-disables-gateway-enforcement",
    ),
    pytest.param(
        OD(consecutive_5xx_errors=0, consecutive_gateway_errors=4),
        {"consecutive_5xx": 0, "enforcing_consecutive_5xx": 0, "consecutive_gateway_failure": 4,
         "enforcing_consecutive_gateway_failure": 100, "enforcing_success_rate": 0},
        id="each-detector-enforced-on-its-own-count",
    ),
    pytest.param(
        OD(consecutive_local_origin_failures=1, split_external_local_origin_errors=True),
        {"split_external_local_origin_errors": True, "consecutive_local_origin_failure": 1,
         "enforcing_consecutive_local_origin_failure": 100, "enforcing_local_origin_success_rate": 0,
         "enforcing_success_rate": 0},
        id="split-with-local-origin-count",
    ),
    pytest.param(
        OD(consecutive_local_origin_failures=1),
        {"enforcing_success_rate": 0},
        id="local-origin-count-without-split-not-sent",  # Envoy would ignore it; Istio drops it too
    ),
    pytest.param(
        OD(split_external_local_origin_errors=True),
        {"split_external_local_origin_errors": True, "enforcing_local_origin_success_rate": 0,
         "enforcing_success_rate": 0},
        id="split-without-count-leaves-envoy-default",
    ),
    pytest.param(
        # Istio sends nothing for a 0 here, which leaves Envoy's default (5, enforced): a 0 that
        # ejects after 5 failures. meshplane keeps its rule that a 0 count disables the detector.
        OD(consecutive_local_origin_failures=0, split_external_local_origin_errors=True),
        {"split_external_local_origin_errors": True, "consecutive_local_origin_failure": 0,
         "enforcing_consecutive_local_origin_failure": 0, "enforcing_local_origin_success_rate": 0,
         "enforcing_success_rate": 0},
        id="split-with-local-origin-0-disables-local-origin-enforcement",
    ),
    pytest.param(
        OD(interval_ms=1500, base_ejection_time_ms=300_000, max_ejection_percent=100),
        {"interval": "1.500s", "base_ejection_time": "300s", "max_ejection_percent": 100,
         "enforcing_success_rate": 0},
        id="durations-and-max-ejection",
    ),
    pytest.param(
        # Istio cannot tell 0 from unset and leaves Envoy's 10%; meshplane sends what was written
        # (and its validator warns that such a policy ejects nothing).
        OD(max_ejection_percent=0), {"max_ejection_percent": 0, "enforcing_success_rate": 0},
        id="max-ejection-0-sent-as-written",
    ),
    pytest.param(
        OD(consecutive_5xx_errors=1, consecutive_local_origin_failures=1, split_external_local_origin_errors=True,
           interval_ms=30_000, base_ejection_time_ms=300_000, max_ejection_percent=100),
        {"consecutive_5xx": 1, "enforcing_consecutive_5xx": 100, "split_external_local_origin_errors": True,
         "consecutive_local_origin_failure": 1, "enforcing_consecutive_local_origin_failure": 100,
         "enforcing_local_origin_success_rate": 0, "enforcing_success_rate": 0, "interval": "30s",
         "base_ejection_time": "300s", "max_ejection_percent": 100},
        id="s1-policy",
    ),
]


@pytest.mark.parametrize(("od", "expected"), OUTLIER_DETECTION)
def test_outlier_detection(od: rules.OutlierDetection, expected: dict[str, Any]) -> None:
    cluster = cluster_for(rules.ServicePolicy(outlier_detection=od))
    assert cluster.HasField("outlier_detection")
    assert as_dump(cluster.outlier_detection) == expected


@pytest.mark.parametrize(
    ("od", "threshold"),
    [
        pytest.param(OD(), 0.0, id="default-0-fail-over-never-panic"),
        pytest.param(OD(consecutive_5xx_errors=1, min_health_percent=0), 0.0, id="explicit-0"),
        pytest.param(OD(min_health_percent=30), 30.0, id="min-health-percent-30"),
        pytest.param(OD(min_health_percent=100), 100.0, id="min-health-percent-100"),
    ],
)
def test_min_health_percent_is_the_healthy_panic_threshold(od: rules.OutlierDetection, threshold: float) -> None:
    cluster = cluster_for(rules.ServicePolicy(outlier_detection=od))
    # Present even at 0: an absent threshold is Envoy's 50%, which spreads traffic back onto
    # ejected hosts instead of failing over.
    assert cluster.common_lb_config.HasField("healthy_panic_threshold")
    assert cluster.common_lb_config.healthy_panic_threshold.value == threshold


def test_no_outlier_detection_leaves_envoy_defaults() -> None:
    cluster = cluster_for(rules.ServicePolicy())
    assert not cluster.HasField("outlier_detection")
    assert not cluster.common_lb_config.HasField("healthy_panic_threshold")


DISTRIBUTE = rules.LocalitySettings(
    distribute=(rules.DistributeRule("cn-hangzhou/*", (("cn-hangzhou/*", 90), ("cn-shanghai/*", 10))),)
)


@pytest.mark.parametrize(
    ("locality", "weighted"),
    [
        pytest.param(DISTRIBUTE, True, id="distribute"),
        pytest.param(rules.LocalitySettings(), False, id="nearest-first"),
        pytest.param(rules.LocalitySettings(failover=(rules.FailoverRule("a", "b"),)), False, id="failover"),
    ],
)
def test_locality_weighted_lb_only_with_distribute(locality: rules.LocalitySettings, weighted: bool) -> None:
    # Envoy ignores LocalityLbEndpoints.load_balancing_weight unless the cluster turns this on.
    cluster = cluster_for(rules.ServicePolicy(locality=locality))
    assert cluster.common_lb_config.HasField("locality_weighted_lb_config") is weighted
