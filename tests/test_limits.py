"""Limits on clients (docs/security.md): each refusal has its status, a message naming the limit and its
flag, and a count in meshplane_xds_refused_streams_total; a client under the limits is not affected."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

from meshplane import app
from meshplane.xds import adsbase, typeurls
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
