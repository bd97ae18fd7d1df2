"""Failover that loses no request, through real Envoys at 20 requests a second: a replica, a whole
zone, a whole region breaking at once (connections refused), for sidecars and for a gateway.

The request that finds a broken replica is retried on another host, in another priority (the
routes' default retry policy); outlier detection ejects the replica at once (no merge window), so
later requests go straight to the next locality."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from meshplane.demo import mesh as mesh_mod
from meshplane.demo import topology
from meshplane.demo.ports import free_port
from tests.conftest import wait_for
from tests.edge import Edge, Place

pytestmark = [pytest.mark.envoy, pytest.mark.slow]

RATE = 20  # requests a second
HZ, AP = ("cn-hangzhou-h", "cn-hangzhou-k"), ("ap-northeast-1a", "ap-northeast-1b")


async def under_load(send: Callable[[], Awaitable[bool]], breaks: Callable[[], Awaitable[None]], *,
                     before: float = 1.0, after: float = 3.0) -> tuple[int, int]:
    """Send at RATE for `before` seconds, run `breaks`, go on for `after` seconds: (failed, sent)."""
    results: list[asyncio.Task[bool]] = []
    loop = asyncio.get_running_loop()
    start = loop.time()
    broke = False
    i = 0
    while True:
        due = start + i / RATE
        now = loop.time()
        if now - start >= before + after:
            break
        if not broke and now - start >= before:
            broke = True
            await breaks()
        await asyncio.sleep(max(0.0, due - loop.time()))
        results.append(asyncio.create_task(send()))
        i += 1
    ok = await asyncio.gather(*results)
    return sum(not r for r in ok), len(ok)


async def _stop(mesh: mesh_mod.Mesh, replicas: list[tuple[str, str]]) -> None:
    await asyncio.gather(*(mesh.servers[r].stop() for r in replicas))


async def _via_sidecar_ok(mesh: mesh_mod.Mesh, zone: str) -> bool:
    return (await mesh.request(zone, via_sidecar=True)).ok


@pytest.mark.parametrize(("caller", "broken"), [
    pytest.param("ap-northeast-1a", [("mockb", "ap-northeast-1a")], id="one-replica"),
    pytest.param("ap-northeast-1b", [(s, "ap-northeast-1b") for s in topology.CHAIN], id="its-zone"),
    pytest.param("cn-hangzhou-h", [(s, z) for s in topology.CHAIN for z in HZ], id="its-region-at-once"),
])
async def test_sidecars_lose_no_request_when_replicas_break(
    tmp_path: Path, caller: str, broken: list[tuple[str, str]]
) -> None:
    """Callers in `caller` send through their sidecar; the `broken` replicas refuse connections from
    one moment to the next (a zone: every service there; a region: both its zones at once)."""
    async with mesh_mod.Mesh(tmp_path) as mesh:
        failed, sent = await under_load(lambda: _via_sidecar_ok(mesh, caller), lambda: _stop(mesh, broken))
        assert sent >= 3.5 * RATE
        assert failed == 0, f"{failed} of {sent} requests failed"
        # And they went where failover sends them: no longer to what broke.
        trace = await mesh.request(caller, via_sidecar=True)
        assert trace.ok and not set(trace.hops) & set(broken), trace


R1Z1, R1Z2 = Place("cluster-1", "r1", "r1-z1"), Place("cluster-1", "r1", "r1-z2")
R2Z1 = Place("cluster-2", "r2", "r2-z1")
PORT = free_port()
GATEWAY_POLICY = f"""\
apiVersion: meshplane.io/v2
defaults:
  outlierDetection:
    consecutive5xxErrors: 1
    consecutiveLocalOriginFailures: 1
    splitExternalLocalOriginErrors: true
    interval: 30s
    baseEjectionTime: 5m
    maxEjectionPercent: 100
gateways:
  - name: edge
    listeners: [{{name: http, port: {PORT}}}]
routes:
  - name: app
    parentRefs: [{{name: edge}}]
    rules:
      - matches: [{{path: {{value: /near}}}}]
        backendRefs: [{{name: near, port: 8000, spread: nearest}}]
      - matches: [{{path: {{value: /spread}}}}]
        backendRefs: [{{name: spread, port: 8000}}]
"""


@pytest.fixture
async def edge(tmp_path: Path) -> AsyncIterator[Edge]:
    world = Edge(tmp_path, {"near": [R1Z1, R1Z1, R1Z2, R2Z1], "spread": [R1Z1, R1Z2, R2Z1]}, gateway_at=R1Z1)
    try:
        await world.start(GATEWAY_POLICY)
        await wait_for(lambda: _gateway_ok(world, "/near"), what="the gateway serving")
        yield world
    finally:
        await world.stop()


async def _gateway_ok(world: Edge, path: str) -> bool:
    return (await world.request(PORT, "example.com", path))[0] == 200


async def _stop_at(world: Edge, service: str, places: list[Place], count: int | None = None) -> None:
    chosen = [r for r in world.replicas if r.service == service and r.place in places][:count]
    await asyncio.gather(*(r.server.stop() for r in chosen))


async def test_a_gateway_loses_no_request_when_a_replica_then_a_zone_then_a_region_breaks(edge: Edge) -> None:
    figures = {
        "spread, one replica": await under_load(lambda: _gateway_ok(edge, "/spread"),
                                                lambda: _stop_at(edge, "spread", [R1Z1])),
        "nearest, one replica": await under_load(lambda: _gateway_ok(edge, "/near"),
                                                 lambda: _stop_at(edge, "near", [R1Z1], count=1)),
        "nearest, its zone": await under_load(lambda: _gateway_ok(edge, "/near"),
                                              lambda: _stop_at(edge, "near", [R1Z1])),
        "nearest, its region": await under_load(lambda: _gateway_ok(edge, "/near"),
                                                lambda: _stop_at(edge, "near", [R1Z2])),
    }
    assert {k: failed for k, (failed, _) in figures.items()} == dict.fromkeys(figures, 0), figures
    assert edge.nacks() == 0


