"""Latest wins: a proxy that reads slowly gets the newest state, not a backlog (in-memory streams)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from meshplane.discovery import catalog as catalog_mod
from meshplane.discovery import model
from meshplane.policy import rules
from meshplane.xds import client as ads_client
from meshplane.xds import generators, metrics, push, slots, sotw, streams, typeurls, views
from tests.conftest import cluster_doc, wait_for, write_yaml

MOCKB = "outbound|8000||mockb.default.svc.cluster.local"


class SlowProxy:
    """A fake ServicerContext whose writes wait until the test lets them through."""

    active = 0  # writes under way, over every proxy
    most_active = 0

    def __init__(self) -> None:
        self.written: list[discovery_pb2.DiscoveryResponse] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.requests: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue()

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}  # plaintext: no certificate

    def peer(self) -> str:
        return "in-memory"

    async def write(self, message: bytes) -> None:
        SlowProxy.active += 1
        SlowProxy.most_active = max(SlowProxy.most_active, SlowProxy.active)
        try:
            await self.gate.wait()
        finally:
            SlowProxy.active -= 1
        self.written.append(discovery_pb2.DiscoveryResponse.FromString(message))

    def set_code(self, code: Any) -> None:
        raise AssertionError(f"stream ended with {code}")

    def set_details(self, details: str) -> None:
        raise AssertionError(f"stream ended: {details}")

    def done(self) -> bool:
        return False

    async def read(self) -> Any:
        """The next request, encoded (the server decodes requests itself); EOF once the test puts None."""
        req = await self.requests.get()
        return grpc.aio.EOF if req is None else req.SerializeToString()


def _cluster(weight: int) -> dict[model.ServiceKey, model.ServiceInCluster]:
    endpoint = model.Endpoint(
        address="10.0.0.1", ports=(("http", 8080),), locality=model.Locality("r1", "z1", "c1"), weight=weight
    )
    svc = model.ServiceInCluster(
        name="mockb", namespace="default", ports=(model.ServicePort("http", 8000),), endpoints=(endpoint,)
    )
    return {svc.key: svc}


def _plane(
    *, max_concurrent_pushes: int = 100, stall_after: float = 0.1
) -> tuple[catalog_mod.Catalog, sotw.SotwServer, push.PushLoop, slots.PushSlots]:
    catalog = catalog_mod.Catalog()
    catalog.apply(model.ClusterId("c1"), _cluster(1), seen_at=0.0)
    cache = views.ViewCache(services=catalog.services, policy=rules.Policy(), generators=generators.by_kind())
    m = metrics.Metrics()
    push_slots = slots.PushSlots(max_concurrent_pushes, stall_after=stall_after)
    ads = sotw.SotwServer(cache, registry=streams.Registry(), callbacks=m, push_slots=push_slots)
    loop = push.PushLoop(cache=cache, services=lambda: catalog.services, metrics=m)
    catalog.subscribe(loop.on_catalog_change)
    return catalog, ads, loop, push_slots


async def _connect(ads: sotw.SotwServer, proxy: SlowProxy, name: str) -> asyncio.Task[None]:
    serving = asyncio.create_task(ads._serve(None, proxy))  # type: ignore[arg-type]
    req = discovery_pb2.DiscoveryRequest(type_url=typeurls.ENDPOINT, resource_names=[MOCKB])
    req.node.CopyFrom(ads_client.node(name, region="r1", zone="z1", cluster="c1"))
    await proxy.requests.put(req)
    return serving


async def test_slow_stream_gets_latest_state_merged() -> None:
    catalog, ads, loop, _ = _plane()
    proxy = SlowProxy()
    serving = await _connect(ads, proxy, "slow")
    await wait_for(lambda: len(proxy.written) == 1, what="the first response")

    proxy.gate.clear()  # the proxy stops reading
    for weight in range(2, 32):  # thirty changes, each built and pushed
        catalog.apply(model.ClusterId("c1"), _cluster(weight), seen_at=0.0)
        loop.flush()
        await asyncio.sleep(0)  # let the stream's writer run between changes
    proxy.gate.set()
    await wait_for(lambda: _weight(proxy.written[-1]) == 31, what="the newest state delivered")
    # At most: the response blocked when the proxy stopped reading, plus the newest one.
    assert len(proxy.written) <= 3, [_weight(r) for r in proxy.written]

    await proxy.requests.put(None)
    await serving


async def test_a_storm_is_written_a_few_streams_at_a_time() -> None:
    """After a restart every proxy wants its whole configuration at once; only
    `max_concurrent_pushes` streams compose and write at a time, the rest queue."""
    _, ads, _, _ = _plane(max_concurrent_pushes=2, stall_after=60.0)
    SlowProxy.active = SlowProxy.most_active = 0
    proxies = [SlowProxy() for _ in range(5)]
    for proxy in proxies:
        proxy.gate.clear()
    servings = [await _connect(ads, proxy, f"storm-{i}") for i, proxy in enumerate(proxies)]
    await wait_for(lambda: SlowProxy.active == 2, what="two writes under way")
    for proxy in proxies:  # the proxies read, one after another
        proxy.gate.set()
        await wait_for(lambda p=proxy: len(p.written) == 1, what="a stored-up response delivered")  # type: ignore[misc]
    assert SlowProxy.most_active == 2
    for proxy, serving in zip(proxies, servings, strict=True):
        await proxy.requests.put(None)
        await serving


async def test_a_proxy_that_does_not_read_gives_its_push_slot_back() -> None:
    _, ads, _, _ = _plane(max_concurrent_pushes=1, stall_after=0.1)
    stuck, fine = SlowProxy(), SlowProxy()
    stuck.gate.clear()
    serving_stuck = await _connect(ads, stuck, "stuck")
    await wait_for(lambda: SlowProxy.active >= 1, what="the stuck proxy's write under way")
    serving_fine = await _connect(ads, fine, "fine")
    await wait_for(lambda: len(fine.written) == 1, timeout=5, what="the reading proxy served despite the stuck one")
    assert not stuck.written
    stuck.gate.set()
    for proxy, serving in ((stuck, serving_stuck), (fine, serving_fine)):
        await proxy.requests.put(None)
        await serving


def test_a_write_stalls_when_it_takes_far_longer_than_writes_to_others_take_now() -> None:
    """On a calm plane 100 ms; in a storm, where every client reads slowly, the stall time grows with
    the writes that complete (so slow readers keep their slots and the storm stays bounded), up to 5 s."""
    push_slots = slots.PushSlots(1, stall_after=0.1)
    assert push_slots.stall_time() == 0.1
    for _ in range(10):
        push_slots.completed(0.002)
    assert push_slots.stall_time() == 0.1
    for _ in range(60):
        push_slots.completed(0.5)
    assert 1.9 < push_slots.stall_time() <= 2.0
    for _ in range(100):
        push_slots.completed(30.0)
    assert push_slots.stall_time() == slots.MAX_STALL


async def test_a_one_endpoint_push_does_not_wait_for_a_push_slot() -> None:
    """Every slot is held by a proxy that does not read; a small EDS change still reaches the others."""
    catalog, ads, loop, push_slots = _plane(max_concurrent_pushes=1, stall_after=60.0)
    fine, stuck = SlowProxy(), SlowProxy()
    serving_fine = await _connect(ads, fine, "fine")
    await wait_for(lambda: len(fine.written) == 1, what="the first response")
    stuck.gate.clear()
    serving_stuck = await _connect(ads, stuck, "stuck")
    await wait_for(lambda: push_slots.locked(), what="the stuck proxy holding the only slot")
    catalog.apply(model.ClusterId("c1"), _cluster(7), seen_at=0.0)
    loop.flush()
    await wait_for(lambda: len(fine.written) == 2, timeout=5, what="the endpoint change delivered")
    assert _weight(fine.written[-1]) == 7
    stuck.gate.set()
    for proxy, serving in ((stuck, serving_stuck), (fine, serving_fine)):
        await proxy.requests.put(None)
        await serving


def _weight(response: discovery_pb2.DiscoveryResponse) -> int:
    cla = endpoint_pb2.ClusterLoadAssignment()
    response.resources[0].Unpack(cla)
    return int(cla.endpoints[0].lb_endpoints[0].load_balancing_weight.value)


async def _never_reads(target: str, name: str, names: list[str]) -> tuple[grpc.aio.Channel, Any]:
    """A real gRPC ADS stream that asks for everything and never reads a response. Its HTTP/2 window
    is 1 KiB, so the server's writes to it block at once, as they do for any proxy once it has
    stopped reading and its window (and the kernel's buffers) are full."""
    channel = grpc.aio.insecure_channel(target, options=[("grpc.http2.lookahead_bytes", 1024),
                                                         ("grpc.http2.bdp_probe", 0)])
    call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
    first = discovery_pb2.DiscoveryRequest(type_url=typeurls.CLUSTER)
    first.node.CopyFrom(ads_client.node(name, region="r1", zone="z1", cluster="c1"))
    await call.write(first)
    await call.write(discovery_pb2.DiscoveryRequest(type_url=typeurls.ENDPOINT, resource_names=names))
    await call.write(discovery_pb2.DiscoveryRequest(type_url=typeurls.LISTENER))
    return channel, call


async def test_streams_that_never_read_do_not_delay_a_new_proxys_first_configuration(
    start_plane: Any, tmp_path: Path
) -> None:
    """Six streams that never read, two push slots: the newcomer is served at once, not after the
    non-readers have each held a slot (5 s each, before the fix: 15 s)."""
    services = {f"svc{i}": [{"zone": "z1", "port": 9000 + i}] for i in range(20)}
    plane = await start_plane(endpoint_files=(write_yaml(tmp_path / "c1.yaml", cluster_doc("c1", "r1", services)),),
                              max_concurrent_pushes=2)
    target = f"127.0.0.1:{plane.ads_port}"
    names = [f"outbound|8000||svc{i}.default.svc.cluster.local" for i in range(20)]
    stuck = [await _never_reads(target, f"stuck-{i}", names) for i in range(6)]
    try:
        await wait_for(lambda: plane.metrics.registry.get_sample_value("meshplane_xds_connected_proxies") == 6,
                       what="the non-reading streams connected")
        node = ads_client.node("newcomer", region="r1", zone="z1", cluster="c1")
        async with ads_client.AdsClient(target, node) as c:
            await c.request(typeurls.CLUSTER)
            cds = await c.recv(timeout=3)
            assert sorted(ads_client.resource_names(cds)) == sorted(names)
            await c.ack(cds)
            await c.request(typeurls.ENDPOINT, names)
            eds = await c.recv(timeout=3)
            assert sorted(ads_client.resource_names(eds)) == sorted(names)
    finally:
        for channel, call in stuck:
            call.cancel()
            await channel.close()
