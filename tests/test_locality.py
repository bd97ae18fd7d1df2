"""Table tests for locality placement: Istio priorities, failover, failoverPriority, distribute."""

from __future__ import annotations

import random

import pytest

from meshplane.discovery import model
from meshplane.policy import placement, rules

REGION = rules.REGION_LABEL
ZONE = rules.ZONE_LABEL
CLUSTER = rules.CLUSTER_LABEL
SUBZONE = rules.SUBZONE_LABEL


def ep(
    address: str,
    where: str,
    *,
    port: int = 8000,
    labels: dict[str, str] | None = None,
    weight: int = 1,
    health: model.Health = model.Health.HEALTHY,
) -> model.Endpoint:
    """An endpoint at `where` = "region/zone/cluster"."""
    region, zone, cluster = where.split("/")
    return model.Endpoint(
        address=address,
        ports=(("http", port),),
        locality=model.Locality(region, zone, cluster),
        labels=tuple(sorted((labels or {}).items())),
        health=health,
        weight=weight,
    )


def loc(where: str) -> model.Locality:
    region, zone, cluster = where.split("/")
    return model.Locality(region, zone, cluster)


Row = tuple[str, int, int, tuple[str, ...]]


def summary(placements: tuple[placement.Placement, ...]) -> list[Row]:
    """(locality, priority, weight, endpoints as address:port), in output order."""
    return [
        (
            str(p.locality),
            p.priority,
            p.weight,
            tuple(f"{e.address}:{e.ports[0][1]}" for e in p.endpoints),
        )
        for p in placements
    ]


# S1: cluster-1 in cn-hangzhou (zones h, k), cluster-2 in ap-northeast-1 (zones 1a, 1b).
S1 = (
    ep("10.1.0.1", "cn-hangzhou/cn-hangzhou-h/cluster-1"),
    ep("10.1.0.2", "cn-hangzhou/cn-hangzhou-k/cluster-1"),
    ep("10.2.0.1", "ap-northeast-1/ap-northeast-1a/cluster-2"),
    ep("10.2.0.2", "ap-northeast-1/ap-northeast-1b/cluster-2"),
)

# Three regions, for failover rules naming one of two remote regions.
THREE_REGIONS = (
    ep("10.0.0.1", "us-east/a/c1"),
    ep("10.0.0.2", "us-east/b/c1"),
    ep("10.0.1.1", "us-west/a/c2"),
    ep("10.0.2.1", "eu-west/a/c3"),
)

ON = rules.LocalitySettings()


def failover(*pairs: tuple[str, str]) -> rules.LocalitySettings:
    return rules.LocalitySettings(failover=tuple(rules.FailoverRule(f, t) for f, t in pairs))


FAILOVER_ORDER = [
    pytest.param(
        S1, "cn-hangzhou/cn-hangzhou-h/cluster-1", ON,
        [
            ("cn-hangzhou/cn-hangzhou-h/cluster-1", 0, 1, ("10.1.0.1:8000",)),
            ("cn-hangzhou/cn-hangzhou-k/cluster-1", 1, 1, ("10.1.0.2:8000",)),
            ("ap-northeast-1/ap-northeast-1a/cluster-2", 2, 1, ("10.2.0.1:8000",)),
            ("ap-northeast-1/ap-northeast-1b/cluster-2", 2, 1, ("10.2.0.2:8000",)),
        ],
        id="s1-client-hangzhou-h",
    ),
    pytest.param(
        S1, "cn-hangzhou/cn-hangzhou-k/cluster-1", ON,
        [
            ("cn-hangzhou/cn-hangzhou-k/cluster-1", 0, 1, ("10.1.0.2:8000",)),
            ("cn-hangzhou/cn-hangzhou-h/cluster-1", 1, 1, ("10.1.0.1:8000",)),
            ("ap-northeast-1/ap-northeast-1a/cluster-2", 2, 1, ("10.2.0.1:8000",)),
            ("ap-northeast-1/ap-northeast-1b/cluster-2", 2, 1, ("10.2.0.2:8000",)),
        ],
        id="s1-client-hangzhou-k",
    ),
    pytest.param(
        S1, "ap-northeast-1/ap-northeast-1a/cluster-2", ON,
        [
            ("ap-northeast-1/ap-northeast-1a/cluster-2", 0, 1, ("10.2.0.1:8000",)),
            ("ap-northeast-1/ap-northeast-1b/cluster-2", 1, 1, ("10.2.0.2:8000",)),
            ("cn-hangzhou/cn-hangzhou-h/cluster-1", 2, 1, ("10.1.0.1:8000",)),
            ("cn-hangzhou/cn-hangzhou-k/cluster-1", 2, 1, ("10.1.0.2:8000",)),
        ],
        id="s1-client-tokyo-1a",
    ),
    pytest.param(
        S1, "ap-northeast-1/ap-northeast-1b/cluster-2", ON,
        [
            ("ap-northeast-1/ap-northeast-1b/cluster-2", 0, 1, ("10.2.0.2:8000",)),
            ("ap-northeast-1/ap-northeast-1a/cluster-2", 1, 1, ("10.2.0.1:8000",)),
            ("cn-hangzhou/cn-hangzhou-h/cluster-1", 2, 1, ("10.1.0.1:8000",)),
            ("cn-hangzhou/cn-hangzhou-k/cluster-1", 2, 1, ("10.1.0.2:8000",)),
        ],
        id="s1-client-tokyo-1b",
    ),
    pytest.param(
        (
            ep("10.1.0.1", "cn-hangzhou/cn-hangzhou-h/cluster-1"),
            ep("10.3.0.1", "cn-hangzhou/cn-hangzhou-h/cluster-3"),
            ep("10.1.0.2", "cn-hangzhou/cn-hangzhou-k/cluster-1"),
            ep("10.2.0.1", "ap-northeast-1/ap-northeast-1a/cluster-2"),
        ),
        "cn-hangzhou/cn-hangzhou-h/cluster-1", ON,
        [
            ("cn-hangzhou/cn-hangzhou-h/cluster-1", 0, 1, ("10.1.0.1:8000",)),
            ("cn-hangzhou/cn-hangzhou-h/cluster-3", 1, 1, ("10.3.0.1:8000",)),
            ("cn-hangzhou/cn-hangzhou-k/cluster-1", 2, 1, ("10.1.0.2:8000",)),
            ("ap-northeast-1/ap-northeast-1a/cluster-2", 3, 1, ("10.2.0.1:8000",)),
        ],
        id="same-zone-other-cluster-is-priority-1",
    ),
    pytest.param(
        THREE_REGIONS, "us-east/a/c1", ON,
        [
            ("us-east/a/c1", 0, 1, ("10.0.0.1:8000",)),
            ("us-east/b/c1", 1, 1, ("10.0.0.2:8000",)),
            ("eu-west/a/c3", 2, 1, ("10.0.2.1:8000",)),
            ("us-west/a/c2", 2, 1, ("10.0.1.1:8000",)),
        ],
        id="three-regions-no-rule-remote-regions-equal",
    ),
    pytest.param(
        THREE_REGIONS, "us-east/a/c1", failover(("us-east", "eu-west")),
        [
            ("us-east/a/c1", 0, 1, ("10.0.0.1:8000",)),
            ("us-east/b/c1", 1, 1, ("10.0.0.2:8000",)),
            ("eu-west/a/c3", 2, 1, ("10.0.2.1:8000",)),
            ("us-west/a/c2", 3, 1, ("10.0.1.1:8000",)),
        ],
        id="failover-rule-named-region-before-the-rest",
    ),
    pytest.param(
        THREE_REGIONS, "us-east/a/c1", failover(("us-west", "eu-west")),
        [
            ("us-east/a/c1", 0, 1, ("10.0.0.1:8000",)),
            ("us-east/b/c1", 1, 1, ("10.0.0.2:8000",)),
            ("eu-west/a/c3", 2, 1, ("10.0.2.1:8000",)),
            ("us-west/a/c2", 2, 1, ("10.0.1.1:8000",)),
        ],
        id="failover-rule-of-other-from-region-ignored",
    ),
    pytest.param(
        THREE_REGIONS, "us-east/a/c1", failover(("us-east", "us-west"), ("us-east", "eu-west")),
        [
            ("us-east/a/c1", 0, 1, ("10.0.0.1:8000",)),
            ("us-east/b/c1", 1, 1, ("10.0.0.2:8000",)),
            ("us-west/a/c2", 2, 1, ("10.0.1.1:8000",)),
            ("eu-west/a/c3", 3, 1, ("10.0.2.1:8000",)),
        ],
        id="failover-first-rule-for-region-wins",
    ),
    pytest.param(
        (
            ep("10.0.0.1", "us-east/a/c1"),
            ep("10.0.0.2", "us-east/a/c2"),
            ep("10.0.0.3", "us-east/b/c1"),
            ep("10.0.0.4", "us-east/b/c2"),
            ep("10.0.1.1", "us-west/a/c3"),
            ep("10.0.2.1", "eu-west/a/c4"),
            ep("10.0.3.1", "ap-south/a/c5"),
        ),
        "us-east/a/c1", failover(("us-east", "eu-west")),
        # Every level at once: same region/zone/cluster, same zone other cluster, same region
        # (any cluster), the failover rule's region, then every other region together.
        [
            ("us-east/a/c1", 0, 1, ("10.0.0.1:8000",)),
            ("us-east/a/c2", 1, 1, ("10.0.0.2:8000",)),
            ("us-east/b/c1", 2, 1, ("10.0.0.3:8000",)),
            ("us-east/b/c2", 2, 1, ("10.0.0.4:8000",)),
            ("eu-west/a/c4", 3, 1, ("10.0.2.1:8000",)),
            ("ap-south/a/c5", 4, 1, ("10.0.3.1:8000",)),
            ("us-west/a/c3", 4, 1, ("10.0.1.1:8000",)),
        ],
        id="all-five-levels-cluster-zone-region-failover-rest",
    ),
    pytest.param(
        (ep("10.1.0.1", "cn-hangzhou/h/c1"), ep("10.2.0.1", "cn-shanghai/a/c2")),
        "cn-hangzhou/h/c1",
        failover(("cn-hangzhou", "cn-shanghai"), ("cn-shanghai", "cn-hangzhou")),
        [
            ("cn-hangzhou/h/c1", 0, 1, ("10.1.0.1:8000",)),
            ("cn-shanghai/a/c2", 1, 1, ("10.2.0.1:8000",)),
        ],
        id="s2-two-region-failover",
    ),
    pytest.param(
        (ep("10.1.0.1", "cn-hangzhou/h/c1"), ep("10.2.0.1", "ap-northeast-1/1a/c2")),
        "cn-hangzhou/h/c1", ON,
        [
            ("cn-hangzhou/h/c1", 0, 1, ("10.1.0.1:8000",)),
            ("ap-northeast-1/1a/c2", 1, 1, ("10.2.0.1:8000",)),
        ],
        id="compaction-0-and-3-become-0-and-1",
    ),
    pytest.param(
        (ep("10.1.0.2", "cn-hangzhou/k/c1"), ep("10.2.0.1", "ap-northeast-1/1a/c2")),
        "cn-hangzhou/h/c1", ON,
        [
            ("cn-hangzhou/k/c1", 0, 1, ("10.1.0.2:8000",)),
            ("ap-northeast-1/1a/c2", 1, 1, ("10.2.0.1:8000",)),
        ],
        id="compaction-no-local-endpoints-2-and-3-become-0-and-1",
    ),
    pytest.param(
        (
            ep("10.1.0.3", "cn-hangzhou/h/c1", weight=3),
            ep("10.1.0.1", "cn-hangzhou/h/c1", port=9001, health=model.Health.UNHEALTHY),
            ep("10.1.0.1", "cn-hangzhou/h/c1", port=9000, weight=2),
            ep("10.1.0.2", "cn-hangzhou/k/c1", weight=0),
        ),
        "cn-hangzhou/h/c1", ON,
        [
            ("cn-hangzhou/h/c1", 0, 6, ("10.1.0.1:9000", "10.1.0.1:9001", "10.1.0.3:8000")),
            ("cn-hangzhou/k/c1", 1, 1, ("10.1.0.2:8000",)),
        ],
        id="weights-summed-min-1-unhealthy-kept-endpoints-sorted",
    ),
]


@pytest.mark.parametrize(("endpoints", "client", "settings", "expected"), FAILOVER_ORDER)
def test_failover_order(
    endpoints: tuple[model.Endpoint, ...],
    client: str,
    settings: rules.LocalitySettings,
    expected: list[Row],
) -> None:
    placed = placement.place(endpoints, client=loc(client), client_labels={}, settings=settings)
    assert summary(placed) == expected


SPLIT = (
    ep("10.1.0.1", "us-east/a/c1", labels={"version": "v1"}, weight=2),
    ep("10.1.0.2", "us-east/a/c1", labels={"version": "v2"}),
    ep("10.1.0.3", "us-east/a/c1"),
    ep("10.2.0.1", "us-west/a/c2", labels={"version": "v1"}),
    ep("10.2.0.2", "us-west/a/c2", labels={"version": "v2"}),
)


def prio(*labels: str, failover_rules: tuple[tuple[str, str], ...] = ()) -> rules.LocalitySettings:
    return rules.LocalitySettings(
        failover_priority=labels, failover=tuple(rules.FailoverRule(f, t) for f, t in failover_rules)
    )


FAILOVER_PRIORITY = [
    pytest.param(
        (
            ep("10.1.0.1", "cn-hangzhou/h/cluster-1"),
            ep("10.3.0.1", "cn-hangzhou/h/cluster-3"),
            ep("10.1.0.2", "cn-hangzhou/k/cluster-1"),
            ep("10.2.0.1", "ap-northeast-1/1a/cluster-2"),
        ),
        "cn-hangzhou/h/cluster-1", {}, prio(REGION, ZONE),
        [
            ("cn-hangzhou/h/cluster-1", 0, 1, ("10.1.0.1:8000",)),
            ("cn-hangzhou/h/cluster-3", 0, 1, ("10.3.0.1:8000",)),
            ("cn-hangzhou/k/cluster-1", 1, 1, ("10.1.0.2:8000",)),
            ("ap-northeast-1/1a/cluster-2", 2, 1, ("10.2.0.1:8000",)),
        ],
        id="topology-region-zone-ignores-cluster",
    ),
    pytest.param(
        (
            ep("10.1.0.1", "cn-hangzhou/h/cluster-1"),
            ep("10.3.0.1", "cn-hangzhou/h/cluster-3"),
            ep("10.4.0.1", "ap-northeast-1/1a/cluster-1"),
        ),
        "cn-hangzhou/h/cluster-1", {}, prio(CLUSTER),
        [
            ("ap-northeast-1/1a/cluster-1", 0, 1, ("10.4.0.1:8000",)),
            ("cn-hangzhou/h/cluster-1", 0, 1, ("10.1.0.1:8000",)),
            ("cn-hangzhou/h/cluster-3", 1, 1, ("10.3.0.1:8000",)),
        ],
        id="topology-cluster-label-reads-locality-cluster",
    ),
    pytest.param(
        (
            ep("10.1.0.1", "cn-hangzhou/h/cluster-1"),
            ep("10.3.0.1", "cn-hangzhou/h/cluster-3"),
        ),
        "cn-hangzhou/h/cluster-3", {}, prio(SUBZONE),
        [
            ("cn-hangzhou/h/cluster-3", 0, 1, ("10.3.0.1:8000",)),
            ("cn-hangzhou/h/cluster-1", 1, 1, ("10.1.0.1:8000",)),
        ],
        id="topology-subzone-label-reads-locality-cluster",
    ),
    pytest.param(
        SPLIT, "us-east/a/c1", {"version": "v1"}, prio("version"),
        [
            ("us-east/a/c1", 0, 2, ("10.1.0.1:8000",)),
            ("us-west/a/c2", 0, 1, ("10.2.0.1:8000",)),
            ("us-east/a/c1", 1, 2, ("10.1.0.2:8000", "10.1.0.3:8000")),
            ("us-west/a/c2", 1, 1, ("10.2.0.2:8000",)),
        ],
        id="pod-label-splits-a-locality-missing-label-does-not-match",
    ),
    pytest.param(
        SPLIT, "us-east/a/c1", {}, prio("version"),
        [
            ("us-east/a/c1", 0, 4, ("10.1.0.1:8000", "10.1.0.2:8000", "10.1.0.3:8000")),
            ("us-west/a/c2", 0, 2, ("10.2.0.1:8000", "10.2.0.2:8000")),
        ],
        id="label-missing-on-client-matches-nothing",
    ),
    pytest.param(
        SPLIT, "us-east/a/c1", {"version": "v1"}, prio("version", REGION),
        [
            ("us-east/a/c1", 0, 2, ("10.1.0.1:8000",)),
            ("us-west/a/c2", 1, 1, ("10.2.0.1:8000",)),
            ("us-east/a/c1", 2, 2, ("10.1.0.2:8000", "10.1.0.3:8000")),
            ("us-west/a/c2", 2, 1, ("10.2.0.2:8000",)),
        ],
        id="prefix-match-version-then-region",
    ),
    pytest.param(
        SPLIT, "us-east/a/c1", {"version": "v1"}, prio("version=v2"),
        [
            ("us-east/a/c1", 0, 1, ("10.1.0.2:8000",)),
            ("us-west/a/c2", 0, 1, ("10.2.0.2:8000",)),
            ("us-east/a/c1", 1, 3, ("10.1.0.1:8000", "10.1.0.3:8000")),
            ("us-west/a/c2", 1, 1, ("10.2.0.1:8000",)),
        ],
        id="key-equals-value-overrides-client-value",
    ),
    pytest.param(
        S1, "cn-hangzhou/cn-hangzhou-h/cluster-1", {}, prio(f"{REGION}=ap-northeast-1", ZONE),
        # ap-northeast-1 matches the named region (raw 1), cn-hangzhou does not (raw 2).
        [
            ("ap-northeast-1/ap-northeast-1a/cluster-2", 0, 1, ("10.2.0.1:8000",)),
            ("ap-northeast-1/ap-northeast-1b/cluster-2", 0, 1, ("10.2.0.2:8000",)),
            ("cn-hangzhou/cn-hangzhou-h/cluster-1", 1, 1, ("10.1.0.1:8000",)),
            ("cn-hangzhou/cn-hangzhou-k/cluster-1", 1, 1, ("10.1.0.2:8000",)),
        ],
        id="topology-key-equals-value",
    ),
    pytest.param(
        (
            ep("10.0.0.1", "us-east/a/c1", labels={"version": "v1"}),
            ep("10.0.0.2", "us-east/a/c1", labels={"version": "v2"}),
            ep("10.0.0.3", "us-east/b/c1", labels={"version": "v1"}),
            ep("10.0.1.1", "us-west/a/c2", labels={"version": "v1"}),
            ep("10.0.2.1", "eu-west/a/c3", labels={"version": "v1"}),
            ep("10.0.2.2", "eu-west/a/c3", labels={"version": "v2"}),
        ),
        "us-east/a/c1", {"version": "v1"}, prio("version", failover_rules=(("us-east", "eu-west"),)),
        # raw = version level * 5 + locality priority: 0, 2, 3, 4, 5, 8 -> compacted 0..5
        [
            ("us-east/a/c1", 0, 1, ("10.0.0.1:8000",)),
            ("us-east/b/c1", 1, 1, ("10.0.0.3:8000",)),
            ("eu-west/a/c3", 2, 1, ("10.0.2.1:8000",)),
            ("us-west/a/c2", 3, 1, ("10.0.1.1:8000",)),
            ("us-east/a/c1", 4, 1, ("10.0.0.2:8000",)),
            ("eu-west/a/c3", 5, 1, ("10.0.2.2:8000",)),
        ],
        id="failover-priority-combined-with-failover-rules",
    ),
]


@pytest.mark.parametrize(
    ("endpoints", "client", "client_labels", "settings", "expected"), FAILOVER_PRIORITY
)
def test_failover_priority(
    endpoints: tuple[model.Endpoint, ...],
    client: str,
    client_labels: dict[str, str],
    settings: rules.LocalitySettings,
    expected: list[Row],
) -> None:
    placed = placement.place(
        endpoints, client=loc(client), client_labels=client_labels, settings=settings
    )
    assert summary(placed) == expected


def distribute(*pairs: tuple[str, tuple[tuple[str, int], ...]]) -> rules.LocalitySettings:
    return rules.LocalitySettings(distribute=tuple(rules.DistributeRule(f, to) for f, to in pairs))


WEIGHTED = (
    ep("10.0.0.1", "us-east/a/c1"),
    ep("10.0.0.2", "us-east/a/c1"),
    ep("10.0.0.3", "us-east/b/c1"),
    ep("10.0.1.1", "us-west/a/c2"),
    ep("10.0.1.2", "us-west/b/c2", weight=2),
    ep("10.0.2.1", "eu-west/a/c3"),
)

DISTRIBUTE = [
    pytest.param(
        (
            ep("10.1.0.1", "cn-hangzhou/h/ack-hangzhou"),
            ep("10.2.0.1", "cn-shanghai/a/ack-shanghai"),
        ),
        "cn-hangzhou/h/ack-hangzhou",
        distribute(("cn-hangzhou/*", (("cn-hangzhou/*", 90), ("cn-shanghai/*", 10)))),
        [
            ("cn-hangzhou/h/ack-hangzhou", 0, 90, ("10.1.0.1:8000",)),
            ("cn-shanghai/a/ack-shanghai", 0, 10, ("10.2.0.1:8000",)),
        ],
        id="s2-90-10",
    ),
    pytest.param(
        WEIGHTED, "us-east/a/c1",
        distribute(("us-east", (("us-east/*", 80), ("us-west/*", 20)))),
        # us-east: a weighs 2, b 1 -> ceil(160/3)=54, ceil(80/3)=27; us-west: a 1, b 2 -> 7, 14.
        [
            ("us-east/a/c1", 0, 54, ("10.0.0.1:8000", "10.0.0.2:8000")),
            ("us-east/b/c1", 0, 27, ("10.0.0.3:8000",)),
            ("us-west/a/c2", 0, 7, ("10.0.1.1:8000",)),
            ("us-west/b/c2", 0, 14, ("10.0.1.2:8000",)),
        ],
        id="wildcard-dest-split-by-weight-ceil-unmatched-dropped",
    ),
    pytest.param(
        WEIGHTED, "us-east/a/c1",
        distribute(("*", (("us-east/a", 100),))),
        [("us-east/a/c1", 0, 100, ("10.0.0.1:8000", "10.0.0.2:8000"))],
        id="only-matched-group-kept",
    ),
    pytest.param(
        WEIGHTED, "us-east/a/c1",
        distribute(("us-east/a/c1", (("us-east/a/*", 70), ("us-east/*", 30)))),
        [
            ("us-east/a/c1", 0, 70, ("10.0.0.1:8000", "10.0.0.2:8000")),
            ("us-east/b/c1", 0, 30, ("10.0.0.3:8000",)),
        ],
        id="first-to-pattern-claims-a-group",
    ),
    pytest.param(
        WEIGHTED, "us-east/a/c1",
        distribute(
            ("us-east/a/*", (("us-east/*", 100),)),
            ("us-east/*", (("us-west/*", 100),)),
        ),
        [
            ("us-east/a/c1", 0, 67, ("10.0.0.1:8000", "10.0.0.2:8000")),
            ("us-east/b/c1", 0, 34, ("10.0.0.3:8000",)),
        ],
        id="first-matching-from-rule-only",
    ),
    pytest.param(
        WEIGHTED, "us-east/a/c1",
        distribute(("eu-west/*", (("eu-west/*", 100),))),
        # Istio returns after the distribute branch: no locality order, default weights.
        [
            ("eu-west/a/c3", 0, 1, ("10.0.2.1:8000",)),
            ("us-east/a/c1", 0, 2, ("10.0.0.1:8000", "10.0.0.2:8000")),
            ("us-east/b/c1", 0, 1, ("10.0.0.3:8000",)),
            ("us-west/a/c2", 0, 1, ("10.0.1.1:8000",)),
            ("us-west/b/c2", 0, 2, ("10.0.1.2:8000",)),
        ],
        id="no-matching-from-rule-all-priority-0-default-weights",
    ),
    pytest.param(
        WEIGHTED, "us-west/b/c2",
        distribute(("*", (("*", 100),))),
        # total weight 7: ceil(100/7) = 15 for weight 1, ceil(200/7) = 29 for weight 2.
        [
            ("eu-west/a/c3", 0, 15, ("10.0.2.1:8000",)),
            ("us-east/a/c1", 0, 29, ("10.0.0.1:8000", "10.0.0.2:8000")),
            ("us-east/b/c1", 0, 15, ("10.0.0.3:8000",)),
            ("us-west/a/c2", 0, 15, ("10.0.1.1:8000",)),
            ("us-west/b/c2", 0, 29, ("10.0.1.2:8000",)),
        ],
        id="star-matches-every-client-and-group",
    ),
]


@pytest.mark.parametrize(("endpoints", "client", "settings", "expected"), DISTRIBUTE)
def test_distribute(
    endpoints: tuple[model.Endpoint, ...],
    client: str,
    settings: rules.LocalitySettings,
    expected: list[Row],
) -> None:
    placed = placement.place(endpoints, client=loc(client), client_labels={}, settings=settings)
    assert summary(placed) == expected


FLAT_S1 = [
    ("ap-northeast-1/ap-northeast-1a/cluster-2", 0, 1, ("10.2.0.1:8000",)),
    ("ap-northeast-1/ap-northeast-1b/cluster-2", 0, 1, ("10.2.0.2:8000",)),
    ("cn-hangzhou/cn-hangzhou-h/cluster-1", 0, 1, ("10.1.0.1:8000",)),
    ("cn-hangzhou/cn-hangzhou-k/cluster-1", 0, 1, ("10.1.0.2:8000",)),
]

NO_ORDERING = [
    pytest.param(
        model.Locality("cn-hangzhou", "cn-hangzhou-h", "cluster-1"),
        rules.LocalitySettings(enabled=False, failover=(rules.FailoverRule("cn-hangzhou", "x"),)),
        FLAT_S1,
        id="disabled",
    ),
    pytest.param(model.Locality(), ON, FLAT_S1, id="unknown-client-locality"),
    pytest.param(
        model.Locality("", "cn-hangzhou-h", "cluster-1"), ON, FLAT_S1, id="client-without-region"
    ),
    pytest.param(
        model.Locality(), prio(REGION, "version"), FLAT_S1, id="unknown-client-failover-priority"
    ),
    pytest.param(
        model.Locality(),
        distribute(("*", (("cn-hangzhou/*", 100),))),
        FLAT_S1,
        id="unknown-client-distribute",
    ),
]


@pytest.mark.parametrize(("client", "settings", "expected"), NO_ORDERING)
def test_no_ordering(
    client: model.Locality,
    settings: rules.LocalitySettings,
    expected: list[Row],
) -> None:
    placed = placement.place(S1, client=client, client_labels={"version": "v1"}, settings=settings)
    assert summary(placed) == expected


def test_no_endpoints() -> None:
    assert placement.place((), client=loc("a/b/c"), client_labels={}, settings=ON) == ()


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param(ON, id="default"),
        pytest.param(failover(("us-east", "eu-west")), id="failover"),
        pytest.param(prio("version", REGION), id="failover-priority"),
        pytest.param(distribute(("*", (("us-east/*", 70), ("*", 30)))), id="distribute"),
    ],
)
def test_shuffled_input_gives_identical_output(settings: rules.LocalitySettings) -> None:
    endpoints = [*WEIGHTED, *SPLIT, ep("10.0.0.1", "us-east/a/c1", port=9000)]
    client, labels = loc("us-east/a/c1"), {"version": "v1"}
    expected = placement.place(endpoints, client=client, client_labels=labels, settings=settings)
    rng = random.Random(7)
    for _ in range(20):
        rng.shuffle(endpoints)
        again = placement.place(endpoints, client=client, client_labels=labels, settings=settings)
        assert again == expected
        assert hash(again) == hash(expected)
