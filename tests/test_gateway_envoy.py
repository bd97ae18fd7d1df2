"""Scenario S3 through a real Envoy gateway: one gateway in front of two clusters of one city.
Active-active by endpoint count, active-standby between clusters, header canaries."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from meshplane.demo.ports import free_port
from tests.conftest import binomial_bounds, wait_for
from tests.edge import Edge, Place

pytestmark = pytest.mark.envoy

C1 = Place("cluster-1", "cn-beijing", "cn-beijing-a")
C2 = Place("cluster-2", "cn-beijing", "cn-beijing-b")
IN_C1, IN_C2 = "service1@cn-beijing-a", "service1@cn-beijing-b"
CANARY = "service1-canary-1@cn-beijing-a"
PORT = free_port()

POLICY = f"""\
apiVersion: meshplane.io/v2
defaults:
  outlierDetection:
    consecutive5xxErrors: 1
    consecutiveLocalOriginFailures: 1
    splitExternalLocalOriginErrors: true
    interval: 1s
    baseEjectionTime: 30s
    maxEjectionPercent: 100
gateways:
  - name: edge
    listeners:
      - name: http
        port: {PORT}
        hostname: example.com
routes:
  - name: service1
    parentRefs: [{{name: edge}}]
    hostnames: [example.com]
    rules:
      - matches: [{{path: {{type: PathPrefix, value: /svc1}}}}]
        backendRefs: [{{name: service1, port: 8000}}]
      - matches: [{{path: {{type: PathPrefix, value: /service1}}}}]
        backendRefs: [{{name: service1, port: 8000, clusters: [cluster-1, cluster-2]}}]
  - name: canary
    parentRefs: [{{name: edge}}]
    hostnames: [example.com]
    rules:
      # Gateway API precedence: with the same path prefix, the match with more headers wins.
      - matches: [{{path: {{value: /svc1}}, headers: [{{name: canary-dest, value: cluster1}}]}}]
        backendRefs: [{{name: service1-canary-1, port: 8000}}]
      - matches: [{{path: {{value: /svc1}}, headers: [{{name: app-web-demo-version, value: gray}}]}}]
        backendRefs: [{{name: service1, port: 8000, clusters: [cluster-2]}}]
"""


@pytest.fixture
async def edge(tmp_path: Path) -> AsyncIterator[Edge]:
    world = Edge(tmp_path, {"service1": [C1] * 9 + [C2], "service1-canary-1": [C1]}, gateway_at=C1)
    try:
        await world.start(POLICY)
        await wait_for(lambda: _ok(world, "/svc1"), what="the gateway serving example.com/svc1")
        yield world
    finally:
        await world.stop()


async def _ok(world: Edge, path: str, headers: dict[str, str] | None = None) -> bool:
    return (await world.request(PORT, "example.com", path, headers))[0] == 200


async def test_active_active_splits_by_endpoint_count_and_survives_a_cluster_scaled_to_zero(edge: Edge) -> None:
    n = 300
    got = await edge.tally(n, PORT, "example.com", "/svc1/anything")
    assert set(got) <= {(200, IN_C1), (200, IN_C2)}, got
    lo, hi = binomial_bounds(n, 0.9, 1e-6)  # 9 replicas of 10 in cluster 1
    assert lo <= got[(200, IN_C1)] <= hi, got
    # Cluster 1 scaled to 0 (its endpoints leave its source): everything to cluster 2, no policy change.
    edge.set("service1", "cluster-1", listed=False)
    await wait_for(lambda: _all(edge, "/svc1", IN_C2), what="every request in cluster 2")
    assert await edge.tally(40, PORT, "example.com", "/svc1") == {(200, IN_C2): 40}
    assert edge.nacks() == 0


async def _all(edge: Edge, path: str, body: str, headers: dict[str, str] | None = None) -> bool:
    return await edge.tally(10, PORT, "example.com", path, headers) == {(200, body): 10}


async def test_active_standby_stays_on_cluster_1_while_any_endpoint_is_healthy(edge: Edge) -> None:
    assert await edge.tally(40, PORT, "example.com", "/service1") == {(200, IN_C1): 40}
    edge.set("service1", "cluster-1", health="unhealthy", count=8)  # one of nine left
    await wait_for(lambda: edge.plane is not None and _eds_unhealthy(edge) == 8, what="8 endpoints reported down")
    assert await edge.tally(40, PORT, "example.com", "/service1") == {(200, IN_C1): 40}
    edge.set("service1", "cluster-1", health="unhealthy")  # none left: the standby takes over
    await wait_for(lambda: _all(edge, "/service1", IN_C2), what="the standby cluster serving")
    assert await edge.tally(40, PORT, "example.com", "/service1") == {(200, IN_C2): 40}
    edge.set("service1", "cluster-1", health="healthy", count=1)  # one is back: traffic returns
    await wait_for(lambda: _all(edge, "/service1", IN_C1), what="back on cluster 1")


def _eds_unhealthy(edge: Edge) -> int:
    return sum(r.health == "unhealthy" for r in edge.replicas if r.place.cluster == "cluster-1")


async def test_active_standby_fails_over_when_cluster_1_breaks_and_loses_no_request(edge: Edge) -> None:
    """No endpoint reported unhealthy: every replica of cluster 1 stops; outlier detection ejects them
    all (max ejection 100 %, no panic), retries carry the requests that meet them to cluster 2."""
    assert await edge.tally(20, PORT, "example.com", "/service1") == {(200, IN_C1): 20}
    for replica in edge.replicas:
        if replica.service == "service1" and replica.place.cluster == "cluster-1":
            await replica.server.stop()
    got = await edge.tally(60, PORT, "example.com", "/service1", batch=1)
    assert got == {(200, IN_C2): 60}, got


async def test_header_canaries_reach_their_backends_and_others_take_the_default(edge: Edge) -> None:
    assert await edge.tally(20, PORT, "example.com", "/svc1", {"canary-dest": "cluster1"}) == {(200, CANARY): 20}
    assert await edge.tally(20, PORT, "example.com", "/svc1", {"app-web-demo-version": "gray"}) == {(200, IN_C2): 20}
    default = await edge.tally(40, PORT, "example.com", "/svc1", {"canary-dest": "cluster2"})
    assert set(default) == {(200, IN_C1), (200, IN_C2)} and default[(200, IN_C1)] > default[(200, IN_C2)], default
    assert edge.nacks() == 0


async def test_the_gateway_holds_what_meshplane_sent(edge: Edge) -> None:
    assert edge.gateway is not None
    dump = await edge.gateway.config_dump()

    def section(kind: str) -> dict[str, object]:
        return next(s for s in dump["configs"] if s["@type"].endswith("." + kind))

    listeners = [ln["active_state"]["listener"] for ln in section("ListenersConfigDump")["dynamic_listeners"]]
    assert [ln["name"] for ln in listeners] == [f"gateway|edge|{PORT}"]
    [routes] = [r["route_config"] for r in section("RoutesConfigDump")["dynamic_route_configs"]]
    assert routes["name"] == f"gateway|edge|{PORT}"
    assert [vh["domains"] for vh in routes["virtual_hosts"]] == [["example.com"]]
    clusters = {c["cluster"]["name"]: c["cluster"] for c in section("ClustersConfigDump")["dynamic_active_clusters"]}
    host = "service1.default.svc.cluster.local"
    assert set(clusters) == {f"outbound|8000||{host}", f"outbound|8000|cluster=cluster-1>cluster-2|{host}",
                             f"outbound|8000|cluster=cluster-2|{host}",
                             "outbound|8000||service1-canary-1.default.svc.cluster.local"}
    standby = {e["endpoint_config"]["cluster_name"]: e["endpoint_config"]
               for e in section("EndpointsConfigDump")["dynamic_endpoint_configs"]}[
        f"outbound|8000|cluster=cluster-1>cluster-2|{host}"]
    assert [(g["locality"]["sub_zone"], g.get("priority", 0), len(g["lb_endpoints"])) for g in standby["endpoints"]] \
        == [("cluster-1", 0, 9), ("cluster-2", 1, 1)]
    assert standby["policy"]["overprovisioning_factor"] == 1_000_000
    assert edge.nacks() == 0


# --- the standby only when the first cluster has nothing left, also for retries (issue 18, item 13) ---

STANDBY_PORT = free_port()
IN_A, IN_B = "standby@cn-beijing-a", "standby@cn-beijing-b"
STANDBY_POLICY = f"""\
apiVersion: meshplane.io/v2
defaults:
  outlierDetection:
    # Three refused connections before an ejection: several requests meet the dead endpoint first.
    consecutive5xxErrors: 3
    consecutiveLocalOriginFailures: 3
    splitExternalLocalOriginErrors: true
    interval: 30s
    baseEjectionTime: 5m
gateways:
  - name: edge
    listeners: [{{name: http, port: {STANDBY_PORT}}}]
routes:
  - name: standby
    parentRefs: [{{PARENT}}]
    rules:
      - backendRefs: [{{name: standby, port: 8000, clusters: [cluster-1, cluster-2]}}]
"""
GATEWAY_PARENT, SIDECAR_PARENT = "{name: edge}", "{kind: Service, name: standby, port: 8000}"


@pytest.mark.parametrize("sidecar", [False, True], ids=["gateway", "sidecar"])
async def test_a_retry_stays_in_the_first_cluster_while_it_has_a_healthy_endpoint(
        tmp_path: Path, sidecar: bool) -> None:
    """Cluster-1 has a dead endpoint (listed, refusing connections) and a healthy one, cluster-2 one.
    A request that meets the dead one is retried on cluster-1's healthy one, not in cluster-2: no
    request reaches cluster-2, none fails. (Before: each retry left the priority it failed in.)"""
    world = Edge(tmp_path, {"standby": [C1, C1, C2]}, gateway_at=C1, sidecar=sidecar)
    port, host = (world.port, "standby") if sidecar else (STANDBY_PORT, "example.com")
    try:
        await world.start(STANDBY_POLICY.replace("{PARENT}", SIDECAR_PARENT if sidecar else GATEWAY_PARENT))
        await wait_for(lambda: _tally_is(world, port, host, {(200, IN_A): 10}), what="cluster-1 serving")
        dead = next(r for r in world.replicas if r.place == C1)
        await dead.server.stop()
        got = await world.tally(60, port, host, "/", batch=1)
        assert got == {(200, IN_A): 60}, got
        assert world.gateway is not None
        stats = await world.gateway.stats(filter=r"cluster=cluster-1>cluster-2.*\.upstream_rq_retry$")
        assert sum(stats.values()) >= 1, stats  # the dead endpoint was met, and the request retried
        assert world.nacks() == 0
    finally:
        await world.stop()


async def _tally_is(world: Edge, port: int, host: str, expected: dict[tuple[int, str], int]) -> bool:
    return await world.tally(sum(expected.values()), port, host, "/") == expected
