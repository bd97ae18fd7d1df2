"""Scenario S1 with real traffic through real Envoy sidecars: nearest first, then same region, then away."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from meshplane.demo import mesh as mesh_mod
from meshplane.demo import topology
from tests.conftest import wait_for

pytestmark = pytest.mark.envoy

ZONES_HZ = ["cn-hangzhou-h", "cn-hangzhou-k"]
ZONES_AP = ["ap-northeast-1a", "ap-northeast-1b"]


@pytest.fixture
async def s1(tmp_path: Path) -> AsyncIterator[mesh_mod.Mesh]:
    async with mesh_mod.Mesh(tmp_path) as mesh:
        yield mesh


async def _traces(mesh: mesh_mod.Mesh, zone: str, n: int) -> list[mesh_mod.Trace]:
    return [await mesh.request(zone) for _ in range(n)]


async def _settle(mesh: mesh_mod.Mesh, zone: str, n: int = 12) -> tuple[int, list[mesh_mod.Trace]]:
    """Send n requests; return how many failed before the first success, and the rest."""
    traces = await _traces(mesh, zone, n)
    failures = next((i for i, t in enumerate(traces) if t.ok), n)
    assert failures <= 1, traces
    return failures, traces[failures:]


async def test_s1_nearest_first_then_same_region_then_other_region(s1: mesh_mod.Mesh) -> None:
    # Healthy: every hop stays in the caller's zone.
    for zone in ZONES_HZ + ZONES_AP:
        for trace in await _traces(s1, zone, 4):
            assert trace.ok, trace
            assert trace.hops == [("mocka", zone), ("mockb", zone), ("mockc", zone)], trace

    # mockb in ap-northeast-1a refuses connections: after at most one failed request,
    # callers in 1a reach mockb in 1b (same region), never the other region.
    await s1.break_replica("mockb", "ap-northeast-1a")
    failures, rest = await _settle(s1, "ap-northeast-1a")
    assert failures <= 1, rest
    assert rest, "no request succeeded"
    for trace in rest:
        assert trace.ok, trace
        assert trace.hops == [
            ("mocka", "ap-northeast-1a"), ("mockb", "ap-northeast-1b"), ("mockc", "ap-northeast-1b")
        ], trace
    # Other zones are untouched.
    for trace in await _traces(s1, "ap-northeast-1b", 3):
        assert trace.zone_of("mockb") == "ap-northeast-1b", trace

    # All of mockb in ap-northeast-1 down: traffic from 1a crosses to cn-hangzhou. (Envoy takes
    # about a second to move from an all-ejected priority 1 to priority 2: envoyproxy/envoy#28304.)
    await s1.break_replica("mockb", "ap-northeast-1b")
    await wait_for(lambda: _mockb_in(s1, "ap-northeast-1a", ZONES_HZ), timeout=10,
                   what="traffic from ap-northeast-1a reaching mockb in cn-hangzhou")
    for trace in await _traces(s1, "ap-northeast-1a", 6):
        assert trace.ok, trace
        assert trace.zone_of("mocka") == "ap-northeast-1a", trace
        assert trace.zone_of("mockb") in ZONES_HZ, trace


async def _mockb_in(mesh: mesh_mod.Mesh, zone: str, zones: list[str]) -> bool:
    trace = await mesh.request(zone)
    return trace.ok and trace.zone_of("mockb") in zones


async def test_s1_entering_through_the_sidecar_stays_in_zone(s1: mesh_mod.Mesh) -> None:
    for zone in ZONES_HZ + ZONES_AP:
        trace = await s1.request(zone, via_sidecar=True)
        assert trace.hops == [("mocka", zone), ("mockb", zone), ("mockc", zone)], trace


async def test_s1_endpoint_reported_unhealthy_fails_over_without_a_failed_request(s1: mesh_mod.Mesh) -> None:
    # A readiness change arrives through discovery (the endpoint file), not through errors.
    s1.set_health("mockb", "cn-hangzhou-h", "unhealthy")
    await wait_for(
        lambda: _zone_of_mockb(s1, "cn-hangzhou-h"), what="traffic from cn-hangzhou-h leaving its zone"
    )
    for trace in await _traces(s1, "cn-hangzhou-h", 6):
        assert trace.ok, trace
        assert trace.zone_of("mockb") == "cn-hangzhou-k", trace


async def _zone_of_mockb(mesh: mesh_mod.Mesh, zone: str) -> bool:
    trace = await mesh.request(zone)
    return trace.ok and trace.zone_of("mockb") != zone


async def test_config_dump_holds_what_we_sent_and_nothing_was_rejected(s1: mesh_mod.Mesh) -> None:
    sidecar = s1.envoys["ap-northeast-1a"]
    dump = await sidecar.config_dump()
    clusters = {
        c["cluster"]["name"]: c["cluster"]
        for section in dump["configs"] if section["@type"].endswith("ClustersConfigDump")
        for c in section.get("dynamic_active_clusters", [])
    }
    mockb = clusters["outbound|8000||mockb.default.svc.cluster.local"]
    od = mockb["outlier_detection"]
    assert od["consecutive_5xx"] == 1
    assert od["enforcing_consecutive_5xx"] == 100
    assert od["consecutive_local_origin_failure"] == 1
    assert od["split_external_local_origin_errors"] is True
    assert od["interval"] == "30s"
    assert od["base_ejection_time"] == "300s"
    assert od["max_ejection_percent"] == 100
    assert od["enforcing_success_rate"] == 0
    assert mockb["common_lb_config"]["healthy_panic_threshold"] == {}  # 0%: fail over, never panic

    eds = next(
        e["endpoint_config"]
        for section in dump["configs"] if section["@type"].endswith("EndpointsConfigDump")
        for e in section.get("dynamic_endpoint_configs", [])
        if e["endpoint_config"]["cluster_name"] == "outbound|8000||mockb.default.svc.cluster.local"
    )
    by_zone = {g["locality"]["zone"]: g.get("priority", 0) for g in eds["endpoints"]}
    assert by_zone == {"ap-northeast-1a": 0, "ap-northeast-1b": 1, "cn-hangzhou-h": 2, "cn-hangzhou-k": 2}
    assert all(g["load_balancing_weight"] >= 1 for g in eds["endpoints"])

    stats = await sidecar.stats()
    assert stats["cluster_manager.cds.update_rejected"] == 0
    assert stats["listener_manager.lds.update_rejected"] == 0
    assert stats["control_plane.connected_state"] == 1
    assert s1.plane is not None
    for t in ("cds", "eds", "lds", "rds"):
        assert s1.plane.metrics.registry.get_sample_value("meshplane_xds_nacks_total", {"type": t}) in (None, 0.0)


async def test_three_regions_failover_rule_picks_the_named_region(tmp_path: Path) -> None:
    clusters = (
        topology.ClusterSpec("cluster-1", "cn-hangzhou", ("cn-hangzhou-h",)),
        topology.ClusterSpec("cluster-2", "ap-northeast-1", ("ap-northeast-1a",)),
        topology.ClusterSpec("cluster-3", "eu-central-1", ("eu-central-1a",)),
    )
    policy = topology.s1_policy(extra=(
        "  locality:\n"
        "    failover:\n"
        "      - from: ap-northeast-1\n"
        "        to: eu-central-1\n"
    ))
    async with mesh_mod.Mesh(tmp_path, clusters=clusters, policy=policy) as mesh:
        await mesh.break_replica("mockb", "ap-northeast-1a")
        failures, rest = await _settle(mesh, "ap-northeast-1a", n=14)
        assert failures <= 1, rest
        assert len(rest) >= 12
        for trace in rest:
            assert trace.ok, trace
            assert trace.zone_of("mockb") == "eu-central-1a", trace  # never cn-hangzhou
