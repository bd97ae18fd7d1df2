"""Latest wins: a proxy that reads slowly gets the newest state, not a backlog (in-memory streams)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2

from meshplane.discovery import catalog as catalog_mod
from meshplane.discovery import model
from meshplane.policy import types as policy_types
from meshplane.xds import client as ads_client
from meshplane.xds import metrics, push, server, types, views
from tests.conftest import wait_for

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

    async def abort(self, code: Any, details: str) -> None:
        raise AssertionError(f"aborted: {details}")

    async def request_stream(self) -> AsyncIterator[server.Request]:
        while (req := await self.requests.get()) is not None:
            yield server.parse_request(req.SerializeToString())  # as gRPC's deserializer does


def _cluster(weight: int) -> dict[model.ServiceKey, model.ServiceInCluster]:
    endpoint = model.Endpoint(
        address="10.0.0.1", ports=(("http", 8080),), locality=model.Locality("r1", "z1", "c1"), weight=weight
    )
    svc = model.ServiceInCluster(
        name="mockb", namespace="default", ports=(model.ServicePort("http", 8000),), endpoints=(endpoint,)
    )
    return {svc.key: svc}


def _plane(**server_options: Any) -> tuple[catalog_mod.Catalog, server.AdsServer, push.PushLoop]:
    catalog = catalog_mod.Catalog()
    catalog.apply(model.ClusterId("c1"), _cluster(1), seen_at=0.0)
    cache = views.ViewCache(services=catalog.services, policy=policy_types.Policy())
    m = metrics.Metrics()
    ads = server.AdsServer(cache, callbacks=m, **server_options)
    loop = push.PushLoop(cache=cache, server=ads, services=lambda: catalog.services, metrics=m)
    catalog.subscribe(loop.on_catalog_change)
    return catalog, ads, loop


async def _connect(ads: server.AdsServer, proxy: SlowProxy, name: str) -> asyncio.Task[None]:
    serving = asyncio.create_task(ads._serve(proxy.request_stream(), proxy))  # type: ignore[arg-type]
    req = discovery_pb2.DiscoveryRequest(type_url=types.ENDPOINT, resource_names=[MOCKB])
    req.node.CopyFrom(ads_client.node(name, region="r1", zone="z1", cluster="c1"))
    await proxy.requests.put(req)
    return serving


async def test_slow_stream_gets_latest_state_merged() -> None:
    catalog, ads, loop = _plane()
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
    _, ads, _ = _plane(max_concurrent_pushes=2, push_slot_hold=60.0)
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
    _, ads, _ = _plane(max_concurrent_pushes=1, push_slot_hold=0.1)
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


async def test_a_one_endpoint_push_does_not_wait_for_a_push_slot() -> None:
    """Every slot is held by a proxy that does not read; a small EDS change still reaches the others."""
    catalog, ads, loop = _plane(max_concurrent_pushes=1, push_slot_hold=60.0)
    fine, stuck = SlowProxy(), SlowProxy()
    serving_fine = await _connect(ads, fine, "fine")
    await wait_for(lambda: len(fine.written) == 1, what="the first response")
    stuck.gate.clear()
    serving_stuck = await _connect(ads, stuck, "stuck")
    await wait_for(lambda: ads._push_slots.locked(), what="the stuck proxy holding the only slot")
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
