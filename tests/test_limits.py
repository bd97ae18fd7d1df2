"""Limits on clients (docs/security.md): each refusal has its status, a message naming the limit and its
flag, and a count in meshplane_xds_refused_streams_total; a client under the limits is not affected."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from bench import common, refusals
from meshplane import app
from meshplane.xds import adsbase, streams, typeurls
from meshplane.xds import client as ads_client
from tests.conftest import cluster_doc, wait_for, write_yaml

MOCKB = "outbound|8000||mockb.default.svc.cluster.local"


async def _plane(start_plane: Any, tmp_path: Path, **limits: int) -> app.ControlPlane:
    endpoints = write_yaml(tmp_path / "c1.yaml", cluster_doc("c1", "r1", {"mockb": [{"zone": "z1", "port": 9}]}))
    plane: app.ControlPlane = await start_plane(endpoint_files=(endpoints,), limits=adsbase.Limits(**limits))
    return plane


def _client(plane: app.ControlPlane, node_id: str = "sidecar-1", *, delta: bool = False,
            **metadata: Any) -> ads_client.AdsClient:
    node = ads_client.node(node_id, region="r1", zone="z1", cluster="c1", metadata=metadata or None)
    kind = ads_client.DeltaClient if delta else ads_client.AdsClient
    return kind(f"127.0.0.1:{plane.ads_port}", node)


def _refusals(plane: app.ControlPlane, code: str, reason: str) -> float:
    return plane.metrics.registry.get_sample_value("meshplane_xds_refused_streams_total",
                                                   {"code": code, "reason": reason}) or 0.0


async def _served(client: ads_client.AdsClient) -> None:
    await client.request(typeurls.CLUSTER)
    assert MOCKB in ads_client.resource_names(await client.recv())


async def _refusal(client: ads_client.AdsClient, send: Any = None) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await (send(client) if send is not None else client.request(typeurls.CLUSTER))
        await client.recv()
    return error.value


@pytest.mark.parametrize(("limit", "flag", "reason"), [
    ({"streams_per_peer": 2}, "--max-streams-per-peer", "streams_per_peer"),
    ({"streams": 2}, "--max-streams", "streams"),
])
async def test_streams_beyond_the_limit_are_refused_and_the_open_ones_kept(
    start_plane: Any, tmp_path: Path, limit: dict[str, int], flag: str, reason: str
) -> None:
    plane = await _plane(start_plane, tmp_path, **limit)
    async with _client(plane, "a") as a, _client(plane, "b") as b:
        await _served(a)
        await _served(b)
        async with _client(plane, "c") as c:
            error = await _refusal(c)
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "at most 2" in (error.details() or "") and flag in (error.details() or "")
        assert _refusals(plane, "RESOURCE_EXHAUSTED", reason) == 1
        # The open streams are still served: a new service reaches both.
        write_yaml(tmp_path / "c1.yaml", cluster_doc("c1", "r1", {"mockb": [{"zone": "z1", "port": 9}],
                                                                  "mockc": [{"zone": "z1", "port": 10}]}))
        for client in (a, b):
            assert len(ads_client.resource_names(await client.recv())) == 2
    await wait_for(lambda: len(plane.streams) == 0, what="a and b closed")
    async with _client(plane, "d") as d:  # room again
        await _served(d)


async def test_a_node_too_large_is_refused_before_it_is_kept(start_plane: Any, tmp_path: Path) -> None:
    plane = await _plane(start_plane, tmp_path, node_bytes=1024)
    async with _client(plane, labels={"k": "v" * 2000}) as big:
        error = await _refusal(big)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() is not None and error.details().endswith("bytes; at most 1024 (--max-node-bytes)")
    assert error.details().startswith("node is ")
    assert _refusals(plane, "INVALID_ARGUMENT", "node_size") == 1
    assert len(plane.streams) == 0
    async with _client(plane) as small:
        await _served(small)


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_too_many_names_in_one_request(start_plane: Any, tmp_path: Path, delta: bool) -> None:
    plane = await _plane(start_plane, tmp_path, names=5)
    names = [f"outbound|8000||s{i}.default.svc.cluster.local" for i in range(6)]
    async with _client(plane, delta=delta) as c:
        if delta:
            error = await _refusal(c, lambda c: c.delta(typeurls.ENDPOINT, names))  # type: ignore[attr-defined]
        else:
            error = await _refusal(c, lambda c: c.request(typeurls.ENDPOINT, names))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details() == "6 resource names in one request; at most 5 (--max-names)"
    assert _refusals(plane, "RESOURCE_EXHAUSTED", "names") == 1


async def test_a_request_too_large_is_refused(start_plane: Any, tmp_path: Path) -> None:
    plane = await _plane(start_plane, tmp_path, request_bytes=10_000)
    names = [f"outbound|8000||service-{i}.default.svc.cluster.local" for i in range(400)]  # ~20 KB
    async with _client(plane) as c:
        error = await _refusal(c, lambda c: c.request(typeurls.ENDPOINT, names))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details() is not None and error.details().startswith("request of ")
    assert error.details().endswith("bytes; at most 10000 (--max-request-bytes)")
    assert _refusals(plane, "RESOURCE_EXHAUSTED", "request_size") == 1


async def test_default_limits_refuse_three_megabytes_of_metadata(start_plane: Any, tmp_path: Path) -> None:
    plane = await _plane(start_plane, tmp_path)
    for i in range(3):
        async with _client(plane, f"fat-{i}", labels={"k": "v" * 3_000_000}) as fat:
            error = await _refusal(fat)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "--max-node-bytes" in (error.details() or "")
    assert len(plane.streams) == 0


@pytest.fixture
def no_collector() -> Iterator[None]:
    """No cyclic garbage collection during the test: what `serve` is like once cli.tune_gc has frozen the
    heap and raised the thresholds (a quiet server may go hours without a collection). Whatever a stream
    leaves in a reference cycle stays; only what reference counting frees is freed."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
@pytest.mark.parametrize("ending", ["served", "node_size", "names", "bad_node"])
async def test_a_closed_stream_is_freed_without_the_collector(
    start_plane: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_collector: None, delta: bool, ending: str
) -> None:
    """A stream is freed as it closes, served or refused: before, the watch (served) and gRPC's AbortError
    (refused) each held the stream in a cycle, with its view and node, until a full collection."""
    plane = await _plane(start_plane, tmp_path, names=5)
    opened: list[weakref.ref[streams.Stream]] = []
    open_stream = plane.streams.open_stream

    def recorded(*args: Any, **kwargs: Any) -> streams.Stream:
        stream = open_stream(*args, **kwargs)
        opened.append(weakref.ref(stream))
        return stream

    monkeypatch.setattr(plane.streams, "open_stream", recorded)
    metadata: dict[str, Any] = {"labels": {"pad": "x" * 60_000}}  # a node of 60 KB, as in the issue
    if ending == "node_size":
        metadata = {"labels": {"pad": "x" * 70_000}}
    elif ending == "bad_node":
        metadata["listener_port"] = 70000
    names = [f"outbound|8000||s{i}.default.svc.cluster.local" for i in range(6)] if ending == "names" else []
    type_url = typeurls.ENDPOINT if names else typeurls.CLUSTER
    async with _client(plane, delta=delta, **metadata) as client:
        try:
            if isinstance(client, ads_client.DeltaClient):
                await client.delta(type_url, names)
                received = [r.name for r in (await client.recv_delta()).resources]
            else:
                await client.request(type_url, names)
                received = ads_client.resource_names(await client.recv())
        except grpc.aio.AioRpcError as error:
            assert ending != "served", error
            assert error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), error
        else:
            assert ending == "served" and received == [MOCKB], received
    await wait_for(lambda: len(plane.streams) == 0, what="the stream closed")
    assert len(opened) == 1
    await wait_for(lambda: opened[0]() is None, what="the closed stream freed without a collection")


REFUSED_ROUNDS = 4
"""Rounds of bench.refusals.refused_streams(): ~144 MB of refused requests each, 577 MB in all."""

WORKING_SET_MIB = 128
"""What the server may keep over idle after any number of refusals: the allocator keeps, for reuse, about
the peak that the requests in flight needed (5 at once here, each of up to 5 MiB, and its decoding).
Measured: 28-71 MiB. Before the fix RSS grew by the bytes refused: 270, 411, 568, 706 MiB after the
four rounds, from 86 MiB idle."""


@pytest.mark.slow
async def test_rss_levels_off_near_idle_under_rounds_of_refused_streams(tmp_path: Path) -> None:
    """Streams refused for every limit (node too large, bad node data, too many names, request too large),
    round after round against `meshplane serve` with the shipped limits: the server's RSS levels off near
    idle (docs/security.md)."""
    mesh = common.Mesh(services=10, endpoints=2)
    files = mesh.write(tmp_path)
    policy = common.write_policy(tmp_path / "policy.yaml")
    refused = refusals.refused_streams()
    assert {s.reason for s in refused} == {"node_size", "bad_request", "names", "request_size"}
    with common.Meshplane(tmp_path, files, policy) as server:
        await asyncio.to_thread(server.wait_ready, 60)
        idle = common.memory_mib(server.pid)["rss_mib"]
        after = []
        for _ in range(REFUSED_ROUNDS):
            codes = await refusals.send(server.target, refused, concurrency=5)
            assert codes == [s.code for s in refused]  # each refused with its limit's status
            after.append(common.memory_mib(server.pid)["rss_mib"])
        counted = {dict(labels)["reason"]: value for (name, labels), value in server.metrics().items()
                   if name == "meshplane_xds_refused_streams_total" and value}
    per_round = sum(len(s.raw) for s in refused) / 2**20
    assert counted == {reason: REFUSED_ROUNDS * sum(1 for s in refused if s.reason == reason)
                       for reason in ("node_size", "bad_request", "names", "request_size")}
    rounds = ", ".join(f"{rss:.0f}" for rss in after)
    # Levels off: the three rounds after the first (~410 MiB refused) add less than half of one round.
    assert max(after[1:]) - after[0] < per_round / 2, f"RSS idle {idle:.0f} MiB, after each round {rounds} MiB"
    assert max(after) - idle < WORKING_SET_MIB, f"RSS idle {idle:.0f} MiB, after each round {rounds} MiB"
