"""Proxyless gRPC clients (grpcio's own xDS client, in their own processes) against meshplane and real
gRPC backends that answer with their zone: S1's failover, routes, and every response ACKed.

gRPC speaks state of the world only: these run once, not per protocol. The numbers each failover
step prints (failed calls, time to move) are the ones docs/grpc.md records; run with `-s` to see them.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from meshplane import app, tls
from meshplane.demo import grpcmesh, topology
from meshplane.demo.grpcmesh import Mesh, XdsClient
from tests import pki
from tests.conftest import binomial_bounds, wait_for

pytestmark = pytest.mark.slow

DEPLOY = Path(__file__).parent.parent / "deploy" / "grpc"
PORT = grpcmesh.PORT
TARGET = f"xds:///echo:{PORT}"
HZ = ("cn-hangzhou-h", "cn-hangzhou-k")
AP = ("ap-northeast-1a", "ap-northeast-1b")

# S1's outlier detection, with a 1 s interval (S1's is 30 s: for gRPC clients that is how long a
# failing endpoint may keep its calls, see docs/grpc.md).
POLICY = topology.S1_POLICY.format(base_ejection="5m").replace("interval: 30s", "interval: 1s")


def client(plane: app.ControlPlane, zone: str, **kwargs: Any) -> XdsClient:
    return XdsClient(grpcmesh.s1_bootstrap(plane.ads_port, zone), kwargs.pop("target", TARGET), **kwargs)


async def _serving(policy: str, tmp: Path, mesh: Mesh,
                   start_plane: Callable[..., Awaitable[app.ControlPlane]]) -> app.ControlPlane:
    path = tmp / "policy.yaml"
    path.write_text(policy)
    return await start_plane(endpoint_files=tuple(mesh.files), policy_file=path)


@pytest.fixture
async def s1(tmp_path: Path) -> AsyncIterator[Mesh]:
    async with Mesh(tmp_path, {"echo": HZ + AP}) as mesh:
        yield mesh


def _no_nacks(plane: app.ControlPlane, *clients: XdsClient) -> None:
    for c in clients:
        assert not c.nacks(), c.nacks()
        assert c.acks() >= 4, f"{c.zone}: {c.acks()} ACKs: {c.received()}"  # LDS, RDS, CDS, EDS at least
    registry = plane.metrics.registry
    nacked = {t: registry.get_sample_value("meshplane_xds_nacks_total", {"type": t})
              for t in ("lds", "rds", "cds", "eds")}
    assert not any(nacked.values()), nacked


async def test_grpc_s1_nearest_first_then_same_region_then_other_region(
        s1: Mesh, start_plane: Callable[..., Awaitable[app.ControlPlane]], tmp_path: Path) -> None:
    plane = await _serving(POLICY, tmp_path, s1, start_plane)
    clients = [client(plane, zone) for zone in HZ + AP]
    for c in clients:
        await c.__aenter__()
    try:
        start = time.monotonic()
        # Healthy: each client's calls land in its own zone, from its first call on.
        for c in clients:
            await wait_for(lambda c=c: c.ok_in({c.zone}, start, 10), timeout=20, what=f"{c.zone}'s calls")
            assert all(x.ok and x.zone == c.zone for x in c.calls), c.calls

        # echo in ap-northeast-1a refuses connections: its client moves to 1b, not to the other region.
        one_a, one_b = clients[2], clients[3]
        t0 = time.monotonic()
        await s1.replicas["echo", AP[0]].stop()
        failed, took = await grpcmesh.moved(one_a, t0, {AP[1]})
        print(f"\nzone down (connection refused): {failed} failed calls, moved in {took * 1000:.0f} ms")
        assert failed <= 2
        assert all(x.ok and x.zone == AP[1] for x in one_b.since(t0)), one_b.since(t0)
        for c in clients[:2]:
            assert all(x.ok and x.zone == c.zone for x in c.since(t0)), c.since(t0)

        # All of ap-northeast-1 down: both its clients move to cn-hangzhou.
        t1 = time.monotonic()
        await s1.replicas["echo", AP[1]].stop()
        for c in (one_a, one_b):
            failed, took = await grpcmesh.moved(c, t1, set(HZ))
            print(f"region down, client in {c.zone}: {failed} failed calls, moved in {took * 1000:.0f} ms")
            assert failed <= 2
        _no_nacks(plane, *clients)
    finally:
        for c in clients:
            await c.__aexit__(None, None, None)


async def test_grpc_failure_percentage_ejection_moves_clients_off_an_erroring_endpoint(
        s1: Mesh, start_plane: Callable[..., Awaitable[app.ControlPlane]], tmp_path: Path) -> None:
    """S1's outlier detection (consecutive errors), which gRPC ignores, arrives as failure-percentage
    ejection: an endpoint that answers every call with an error is ejected at the next interval."""
    plane = await _serving(POLICY, tmp_path, s1, start_plane)
    async with client(plane, HZ[0]) as c, client(plane, HZ[1]) as other:
        start = time.monotonic()
        await wait_for(lambda: c.ok_in({HZ[0]}, start, 10), timeout=20, what="the client's calls in its zone")
        await wait_for(lambda: other.ok_in({HZ[1]}, start, 5), timeout=20, what="the other client's calls")
        t0 = time.monotonic()
        s1.replicas["echo", HZ[0]].failing = True
        failed, took = await grpcmesh.moved(c, t0, {HZ[1]})
        print(f"\nendpoint answering errors (interval 1s): {failed} failed calls, moved in {took * 1000:.0f} ms")
        assert failed >= 1, "the failing endpoint was never called"
        assert took < 1 + 1 + 0.5, "ejected later than the interval after next"
        assert all(x.ok and x.zone == HZ[1] for x in other.since(t0)), other.since(t0)
        _no_nacks(plane, c, other)


ROUTES = """\
apiVersion: meshplane.io/v2
routes:
  - name: echo
    parentRefs: [{kind: Service, name: echo, port: 50051}]
    rules:
      - matches: [{path: {value: /echo.Echo}, headers: [{name: canary, value: "true"}]}]
        backendRefs: [{name: echo-canary, port: 50051}]
      - backendRefs:
          - {name: echo, port: 50051, weight: 90}
          - {name: echo-canary, port: 50051, weight: 10}
"""


async def test_grpc_routes_header_canary_and_90_10(
        tmp_path: Path, start_plane: Callable[..., Awaitable[app.ControlPlane]]) -> None:
    async with Mesh(tmp_path, {"echo": (HZ[0],), "echo-canary": (HZ[0],)}) as mesh:
        plane = await _serving(ROUTES, tmp_path, mesh, start_plane)
        async with client(plane, HZ[0], headers=("canary=true",), rate=50) as canary, \
                client(plane, HZ[0], rate=100) as split:
            start = time.monotonic()
            await wait_for(lambda: len([x for x in canary.since(start) if x.ok]) >= 40, timeout=20,
                           what="the canary client's calls")
            assert {x.service for x in canary.calls} == {"echo-canary"}, canary.calls
            n = 1000
            await wait_for(lambda: len(split.calls) >= n, timeout=30, what=f"{n} calls of the split client")
            calls = split.calls[:n]
            assert all(x.ok for x in calls), [x for x in calls if not x.ok]
            to_canary = sum(1 for x in calls if x.service == "echo-canary")
            lo, hi = binomial_bounds(n, 0.10, 1e-6)
            print(f"\n90/10: {to_canary} of {n} to the canary (bounds {lo}-{hi})")
            assert lo <= to_canary <= hi, (to_canary, lo, hi)
            _no_nacks(plane, canary, split)


async def test_a_name_meshplane_does_not_serve_fails_at_once_with_the_reason(
        s1: Mesh, start_plane: Callable[..., Awaitable[app.ControlPlane]], tmp_path: Path) -> None:
    plane = await _serving(POLICY, tmp_path, s1, start_plane)
    # The short name of a service of another namespace is not the client's to dial: no such listener.
    async with client(plane, HZ[0], target="xds:///nope:50051") as c, \
            client(plane, HZ[0], target=f"xds:///echo.default.svc.cluster.local:{PORT}") as full:
        await wait_for(lambda: c.calls, timeout=10, what="the first call's result")
        first = c.calls[0]
        assert not first.ok and first.code == "UNAVAILABLE", first
        assert "meshplane serves no Listener 'nope:50051'" in first.body, first
        # gRPC's own does-not-exist timer is 15 s: it failed long before (the process takes ~1 s to start).
        assert first.at - c.started < 5, first.at - c.started
        start = time.monotonic()
        await wait_for(lambda: full.ok_in({HZ[0]}, start - 30, 5), timeout=20, what="calls by the full name")


async def test_the_shipped_bootstrap_connects_over_mtls(
        s1: Mesh, start_plane: Callable[..., Awaitable[app.ControlPlane]], tmp_path: Path) -> None:
    """deploy/grpc/bootstrap.json, its certificate files made real and its address this test's server."""
    ca = pki.CA()
    cert, key, _ = ca.write_server(tmp_path / "server", dns=("meshplane.meshplane-system.svc",))
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    plane = await start_plane(endpoint_files=tuple(s1.files), policy_file=path, tls=tls.TlsFiles(
        cert=cert, key=key, client_ca=ca.write_ca(tmp_path / "server" / "ca.pem")))
    certs = tmp_path / "certs"
    certs.mkdir()
    client_cert, client_key, _ = ca.issue("echo-client", uris=("spiffe://cluster.local/ns/default/sa/echo-client",))
    (certs / "tls.crt").write_bytes(client_cert)
    (certs / "tls.key").write_bytes(client_key)
    (certs / "ca.crt").write_bytes(ca.pem)
    text = (DEPLOY / "bootstrap.json").read_text().replace("/etc/meshplane/certs", str(certs))
    boot = json.loads(text.replace("meshplane.meshplane-system.svc:18000", f"127.0.0.1:{plane.ads_port}"))
    async with XdsClient(boot, TARGET) as c:
        start = time.monotonic()
        await wait_for(lambda: c.ok_in({AP[0]}, start, 5), timeout=20, what="calls through the shipped bootstrap")
        (stream,) = list(plane.streams)
        assert stream.identity == "spiffe://cluster.local/ns/default/sa/echo-client"
        assert stream.proxy is not None and stream.proxy.kind.value == "grpc"
        _no_nacks(plane, c)
