"""Two Kubernetes clusters (wire-protocol fakes) feeding meshplane, a real Envoy routing by their localities."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshplane import app
from meshplane.demo import backend, envoy
from meshplane.demo.ports import free_port
from meshplane.discovery import kubesource
from tests.conftest import wait_for
from tests.fakekube import FakeKubeAPI, endpoint, endpoint_slice, node, service

pytestmark = pytest.mark.envoy

FAST = kubesource.KubeOptions(watch_timeout=5.0, backoff_initial=0.05, backoff_max=0.2, request_timeout=2.0)
# cluster -> region, zones
TOPOLOGY = {"c1": ("r1", ("r1-a", "r1-b")), "c2": ("r2", ("r2-a",))}


@dataclass
class World:
    fakes: dict[str, FakeKubeAPI]
    ports: dict[str, int]  # zone -> port of its mockb replica

    def address(self, zone: str) -> str:
        """A loopback address per zone: each replica looks like a pod with its own IP."""
        return f"127.0.0.{2 + list(self.ports).index(zone)}"


@pytest.fixture
def world() -> Iterator[World]:
    fakes, ports = {}, {}
    for cluster, (region, zones) in TOPOLOGY.items():
        fake = FakeKubeAPI(cluster)
        fake.start()
        fake.put("services", service("mockb", "default", [{"name": "http", "port": 8000}]))
        for zone in zones:
            ports[zone] = free_port()
            fake.put("nodes", node(f"node-{zone}", region, zone))
        fakes[cluster] = fake
    world = World(fakes, ports)
    for zone in ports:
        set_ready(world, zone, True)
    yield world
    for fake in fakes.values():
        fake.stop()


def set_ready(world: World, zone: str, ready: bool) -> None:
    """One EndpointSlice per zone, as the EndpointSlice controller would keep it."""
    cluster = next(c for c, (_, zones) in TOPOLOGY.items() if zone in zones)
    world.fakes[cluster].put("endpointslices", endpoint_slice(
        f"mockb-{zone}", "default", "mockb",
        [endpoint(world.address(zone), ready=ready, node_name=f"node-{zone}")],
        [{"name": "http", "port": world.ports[zone]}],
    ))


@pytest.fixture
async def replicas(world: World) -> AsyncIterator[None]:
    servers = [backend.ReplicaServer(backend.Replica(service="mockb", zone=zone, region="", cluster="", port=port,
                                                     next_service=None, sidecar_port=None, host=world.address(zone)))
               for zone, port in world.ports.items()]
    for server in servers:
        await server.start()
    yield
    for server in servers:
        await server.stop()


async def test_endpoints_from_two_clusters_fail_over_in_envoy(
    world: World, replicas: None, start_plane: object, tmp_path: Path
) -> None:
    kubeconfigs = tuple(f"{c}={f.write_kubeconfig(tmp_path / f'{c}.yaml', cluster=c)}" for c, f in world.fakes.items())
    plane: app.ControlPlane = await start_plane(kubeconfigs=kubeconfigs, kube=FAST)  # type: ignore[operator]
    await wait_for(plane.ready, what="both clusters synced")

    listener = free_port()
    node = envoy.EnvoyNode(id="sidecar~r1-a", cluster="test", region="r1", zone="r1-a", sub_zone="c1",
                           metadata={"listener_port": listener, "listener_address": "127.0.0.1"})
    async with envoy.EnvoyProcess(node=node, ads_port=plane.ads_port, workdir=tmp_path) as proxy:

        async def lands_in() -> str:
            try:
                status, body = await backend.http_get(listener, "mockb")
            except OSError:
                return ""
            return body.strip().split("@")[-1] if status == 200 else ""

        await wait_for(lambda: _is(lands_in(), "r1-a"), timeout=15, what="traffic in the local zone")
        dump = await proxy.config_dump()
        eds = [e["endpoint_config"] for s in dump["configs"] if s["@type"].endswith("EndpointsConfigDump")
               for e in s.get("dynamic_endpoint_configs", [])]
        [mockb] = [e for e in eds if "mockb" in e["cluster_name"]]
        assert {(g["locality"]["zone"], g["locality"]["sub_zone"], g.get("priority", 0)) for g in mockb["endpoints"]} \
            == {("r1-a", "c1", 0), ("r1-b", "c1", 1), ("r2-a", "c2", 2)}

        set_ready(world, "r1-a", False)  # the zone's pod goes unready in cluster c1
        await wait_for(lambda: _is(lands_in(), "r1-b"), what="traffic to the same region's other zone")
        set_ready(world, "r1-b", False)  # all of c1 unready: the other cluster, other region
        await wait_for(lambda: _is(lands_in(), "r2-a"), what="traffic to cluster c2")
        for _ in range(5):
            assert await lands_in() == "r2-a"


async def _is(landed: object, zone: str) -> bool:
    return await landed == zone  # type: ignore[misc]


async def test_an_api_server_lost_under_traffic_removes_nothing_and_recovers_without_a_gap(
    world: World, replicas: None, start_plane: object, tmp_path: Path
) -> None:
    """c1's API server goes away while requests flow: its endpoints stay served (stale, not removed),
    no request fails; when it is back, a change made there arrives, and still none failed."""
    import asyncio

    kubeconfigs = tuple(f"{c}={f.write_kubeconfig(tmp_path / f'{c}.yaml', cluster=c)}" for c, f in world.fakes.items())
    plane: app.ControlPlane = await start_plane(kubeconfigs=kubeconfigs, kube=FAST)  # type: ignore[operator]
    await wait_for(plane.ready, what="both clusters synced")
    listener = free_port()
    node_ = envoy.EnvoyNode(id="sidecar~r1-a", cluster="test", region="r1", zone="r1-a", sub_zone="c1",
                            metadata={"listener_port": listener, "listener_address": "127.0.0.1"})
    async with envoy.EnvoyProcess(node=node_, ads_port=plane.ads_port, workdir=tmp_path) as proxy:
        landed: list[str] = []

        async def send() -> None:
            while True:
                try:
                    status, body = await backend.http_get(listener, "mockb")
                    landed.append(body.strip().split("@")[-1] if status == 200 else f"HTTP {status}")
                except OSError as exc:
                    landed.append(f"!{exc.__class__.__name__}")
                await asyncio.sleep(0.02)

        await wait_for(lambda: _is(_zone(listener), "r1-a"), timeout=15, what="traffic in the local zone")
        traffic = asyncio.create_task(send())
        try:
            world.fakes["c1"].set_unreachable(True)
            await wait_for(lambda: plane.catalog.status()["c1"].stale, timeout=10, what="c1 marked stale")
            mark = len(landed)
            await wait_for(lambda: len(landed) >= mark + 25, what="requests while c1's API server is away")
            dump = str(await proxy.config_dump())
            assert world.address("r1-a") in dump and world.address("r1-b") in dump  # nothing of c1 removed

            world.fakes["c1"].set_unreachable(False)
            await wait_for(lambda: not plane.catalog.status()["c1"].stale, timeout=10, what="c1 back")
            set_ready(world, "r1-a", False)  # a change made in c1 after it came back arrives
            await wait_for(lambda: landed and landed[-1] == "r1-b", timeout=10, what="the change from c1 applied")
        finally:
            traffic.cancel()
        assert all(z in ("r1-a", "r1-b") for z in landed), [z for z in landed if z not in ("r1-a", "r1-b")]
        assert len(landed) > 30


async def _zone(listener: int) -> str:
    try:
        status, body = await backend.http_get(listener, "mockb")
    except OSError:
        return ""
    return body.strip().split("@")[-1] if status == 200 else ""
