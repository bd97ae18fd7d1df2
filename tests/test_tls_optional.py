"""`--client-cert optional` (docs/security.md, decision 0020): a certificate is not required, but one
that is given is checked as with `required`, by real gRPC clients presenting certificates over TLS.
A client without one is served as an unauthenticated sidecar and never as a gateway (whose listeners
carry private keys). Real Envoys under `optional` are in tests/test_tls_envoy.py (CLIENT_CERT)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from meshplane import app, credentials, tls, tlsfront
from meshplane.demo import backend
from meshplane.demo.ports import free_port
from meshplane.xds import adsbase, typeurls
from meshplane.xds import client as ads_client
from tests import pki
from tests.conftest import wait_for
from tests.test_tls_envoy import SIDECAR_ID, claims_refused, grpc_client, issue, plane_with_tls, refused_with

EDGE_ID = "spiffe://cluster.local/ns/default/sa/edge"


@pytest.fixture
def ca() -> pki.CA:
    return pki.CA()


async def _syncz(plane: app.ControlPlane) -> dict[str, Any]:
    status, body = await backend.http_get(plane.http_port, "localhost", "/debug/syncz")
    assert status == 200
    return dict(json.loads(body))


def _refusals(plane: app.ControlPlane, code: str, reason: str) -> float | None:
    return plane.metrics.registry.get_sample_value("meshplane_xds_refused_streams_total",
                                                   {"code": code, "reason": reason})


async def test_a_certificate_given_is_checked_as_with_required(start_plane: Any, tmp_path: Path, ca: pki.CA) -> None:
    plane = await plane_with_tls(start_plane, tmp_path, ca, "optional")
    # Its own certificate: served, and known by it.
    async with grpc_client(plane, ca, issue(ca, SIDECAR_ID)) as ok:
        await ok.request(typeurls.CLUSTER)
        assert ads_client.resource_names(await ok.recv())
        (client,) = (await _syncz(plane))["clients"]
        assert client["identity"] == SIDECAR_ID
        assert client["peer"].startswith("ipv4:127.0.0.1:")  # the client's own address, not the relay's

    # A certificate of another CA: the handshake fails, as with required; said and counted.
    error = await refused_with(grpc_client(plane, ca, issue(pki.CA("another-ca"), SIDECAR_ID)))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert _refusals(plane, "UNAVAILABLE", "certificate") == 1
    (entry,) = (await _syncz(plane))["refused"]
    assert (entry["peer"], entry["code"], entry["reason"], entry["message"]) == (
        "127.0.0.1", "UNAVAILABLE", "certificate",
        "client certificate not accepted: unable to get local issuer certificate")

    # Claiming another namespace, or the gateway edge, with a sidecar's certificate.
    await claims_refused(plane, ca)
    assert _refusals(plane, "PERMISSION_DENIED", "identity") == 2

    # The gateway's own certificate: served as the gateway.
    async with grpc_client(plane, ca, issue(ca, EDGE_ID), node_id="gateway-edge", role="gateway", gateway="edge") as gw:
        await gw.request(typeurls.LISTENER)
        await gw.recv()
        (client,) = (await _syncz(plane))["clients"]
        assert (client["kind"], client["gateway"], client["identity"]) == ("gateway", "edge", EDGE_ID)


async def test_a_client_without_a_certificate_is_a_sidecar_never_a_gateway(
    start_plane: Any, tmp_path: Path, ca: pki.CA
) -> None:
    plaintext = free_port()
    plane = await plane_with_tls(start_plane, tmp_path, ca, "optional", ads_plaintext=f"127.0.0.1:{plaintext}")
    async with grpc_client(plane, ca, None, namespace="payments") as anonymous:
        await anonymous.request(typeurls.CLUSTER)
        assert ads_client.resource_names(await anonymous.recv())
        (client,) = (await _syncz(plane))["clients"]
        assert (client["kind"], client["identity"]) == ("sidecar", None)

    error = await refused_with(grpc_client(plane, ca, None, node_id="gateway-edge", role="gateway", gateway="edge"))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == (
        "node 'gateway-edge' claimed to be the gateway 'edge' without a client certificate: a gateway is sent its "
        "listeners' private keys, so it must present one (spiffe://cluster.local/ns/default/sa/edge)")
    assert _refusals(plane, "PERMISSION_DENIED", "identity") == 1
    # The plaintext listener, asked for, is unauthenticated for every kind (docs/security.md).
    node = ads_client.node("gateway-edge", region="r1", metadata={"role": "gateway", "gateway": "edge"})
    async with ads_client.AdsClient(f"127.0.0.1:{plaintext}", node) as plain:
        await plain.request(typeurls.LISTENER)
        await plain.recv()


async def test_limits_per_address_count_the_clients_address(start_plane: Any, tmp_path: Path, ca: pki.CA) -> None:
    """Streams and connections from one address, counted by the client's address, not the relay's."""
    plane = await plane_with_tls(start_plane, tmp_path, ca, "optional", limits=adsbase.Limits(streams_per_peer=1))
    cert, key, _ = ca.issue("client", uris=(SIDECAR_ID,))
    channel = grpc.aio.secure_channel(f"localhost:{plane.ads_port}", grpc.ssl_channel_credentials(ca.pem, key, cert))
    try:  # two streams on one connection: the second is over the streams of 127.0.0.1
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        calls = []
        for n in range(2):
            calls.append(call := stub.StreamAggregatedResources())
            await call.write(discovery_pb2.DiscoveryRequest(
                node=ads_client.node(f"sidecar-{n}", region="r1"), type_url=typeurls.CLUSTER))
            if n == 0:
                assert (await call.read()).resources
        with pytest.raises(grpc.aio.AioRpcError) as over:
            await calls[1].read()
        assert over.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert over.value.details() == "1 streams open from 127.0.0.1; at most 1 per address (--max-streams-per-peer)"
        # A second connection from 127.0.0.1 is over its connections: closed before its handshake.
        error = await refused_with(grpc_client(plane, ca, None, node_id="sidecar-2"))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await channel.close()
    entries = {e["reason"]: e for e in (await _syncz(plane))["refused"]}
    assert (entries["connections_per_peer"]["peer"], entries["connections_per_peer"]["message"]) == (
        "127.0.0.1", "1 TLS connections open from 127.0.0.1; at most 1 per address (--max-streams-per-peer)")
    assert _refusals(plane, "RESOURCE_EXHAUSTED", "connections_per_peer") == 1


async def test_the_relays_own_socket_serves_no_one_else(start_plane: Any, tmp_path: Path, ca: pki.CA) -> None:
    """gRPC listens for the relay on a private socket; a connection the relay did not make is refused."""
    plane = await plane_with_tls(start_plane, tmp_path, ca, "optional")
    front = plane._front
    assert front is not None
    intruder = ads_client.AdsClient(front.grpc_address, ads_client.node("gateway-edge", region="r1", metadata={
        "role": "gateway", "gateway": "edge"}))
    error = await refused_with(intruder)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == "not a connection of the ADS port's TLS listener"


async def test_the_ipv6_wildcard_takes_ipv4_clients_too(start_plane: Any, tmp_path: Path, ca: pki.CA) -> None:
    """`--ads [::]:P` listens on both families, as gRPC does under `required`."""
    plane = await plane_with_tls(start_plane, tmp_path, ca, "optional", ads_host="::")
    for target in (f"127.0.0.1:{plane.ads_port}", f"[::1]:{plane.ads_port}"):
        client = grpc_client(plane, ca, issue(ca, SIDECAR_ID))
        client.target = target
        client.options = [("grpc.ssl_target_name_override", "localhost")]
        async with client:
            await client.request(typeurls.CLUSTER)
            assert ads_client.resource_names(await client.recv(timeout=10)), target


async def test_connections_are_capped_per_address_before_their_handshake(
    start_plane: Any, tmp_path: Path, ca: pki.CA
) -> None:
    """Connections that never handshake (or hold TLS without a stream) held a file descriptor each, with no
    limit: one address could take them all. Over `--max-streams-per-peer` they are closed at once."""
    plane = await plane_with_tls(start_plane, tmp_path, ca, "optional", limits=adsbase.Limits(streams_per_peer=3))
    idle = [socket.create_connection(("127.0.0.1", plane.ads_port)) for _ in range(3)]
    try:  # accepted in the order they came: the idle ones first
        flood = [socket.create_connection(("127.0.0.1", plane.ads_port)) for _ in range(20)]
        await wait_for(lambda: _refusals(plane, "RESOURCE_EXHAUSTED", "connections_per_peer") == 20,
                       what="every connection over the cap refused")
        for sock in flood:
            sock.settimeout(5)
            assert sock.recv(1) == b""  # closed by the server, not held
            sock.close()
        error = await refused_with(grpc_client(plane, ca, issue(ca, SIDECAR_ID)))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        for sock in idle:
            sock.close()
    async with grpc_client(plane, ca, issue(ca, SIDECAR_ID)) as ok:  # the address's connections are its own again
        await ok.request(typeurls.CLUSTER)
        assert ads_client.resource_names(await ok.recv(timeout=10))
    (entry,) = [e for e in (await _syncz(plane))["refused"] if e["reason"] == "connections_per_peer"]
    assert entry["message"] == "3 TLS connections open from 127.0.0.1; at most 3 per address (--max-streams-per-peer)"


async def test_connections_are_capped_in_all(start_plane: Any, tmp_path: Path, ca: pki.CA) -> None:
    plane = await plane_with_tls(start_plane, tmp_path, ca, "optional",
                                 limits=adsbase.Limits(streams=2, streams_per_peer=0))
    idle = [socket.create_connection(("127.0.0.1", plane.ads_port)) for _ in range(2)]
    try:
        error = await refused_with(grpc_client(plane, ca, issue(ca, SIDECAR_ID)))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        for sock in idle:
            sock.close()
    (entry,) = [e for e in (await _syncz(plane))["refused"] if e["reason"] == "connections"]
    assert (entry["code"], entry["message"]) == ("RESOURCE_EXHAUSTED",
                                                 "2 TLS connections open; at most 2 (--max-streams)")


def test_the_cap_in_all_leaves_a_quarter_of_the_open_files() -> None:
    assert tlsfront.caps(adsbase.Limits(), 1_048_576) == tlsfront.Caps(20_000, 1_000, "--max-streams")
    assert tlsfront.caps(adsbase.Limits(), 20_000) == tlsfront.Caps(
        5_000, 1_000, "3 file descriptors each, within the open-file limit of 20000 (ulimit -n)")
    assert tlsfront.caps(adsbase.Limits(streams=0, streams_per_peer=0), 0) == tlsfront.Caps(0, 0, "--max-streams")


async def test_a_plaintext_client_on_the_tls_port_is_counted_and_logged_once(
    start_plane: Any, tmp_path: Path, ca: pki.CA
) -> None:
    """A proxy configured without TLS dials the TLS port: said once a minute, counted, listed."""
    plane = await plane_with_tls(start_plane, tmp_path, ca, "optional")
    with structlog.testing.capture_logs() as logs:
        for attempt in range(2):
            plain = ads_client.AdsClient(f"127.0.0.1:{plane.ads_port}", ads_client.node("p", region="r1"))
            plain.options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own, not one in backoff
            async with plain:
                with pytest.raises(grpc.aio.AioRpcError):
                    await plain.request(typeurls.CLUSTER)
                    await plain.recv(timeout=5)
            await wait_for(lambda n=attempt: (_refusals(plane, "UNAVAILABLE", "handshake") or 0) > n,
                           what="the failed handshake counted")
    message = ("not TLS: the client speaks plaintext HTTP/2 (gRPC without TLS: give it TLS for this port, or have "
               "it use --ads-plaintext)")
    assert [(e["log_level"], e["status"], e["error"]) for e in logs if e["event"] == "TLS handshake refused"] == [
        ("warning", "UNAVAILABLE", message)]
    answer = await _syncz(plane)
    (entry,) = answer["refused"]
    assert (entry["peer"], entry["reason"], entry["message"]) == ("127.0.0.1", "handshake", message)
    assert answer["refused_window_s"] == 600  # how long one is listed: `meshplane status` says it from this


@contextlib.asynccontextmanager
async def relay_without_grpc(tmp_path: Path, ca: pki.CA) -> AsyncIterator[tuple[tlsfront.TlsFront, int, socket.socket]]:
    """The relay alone, with a socket in gRPC's place that the test drives (one that does not read, or
    writes and closes): its (front, TLS port, gRPC's listening socket)."""
    cert, key, _ = ca.write_server(tmp_path / "server")
    files = tls.TlsFiles(cert=cert, key=key, client_ca=ca.write_ca(tmp_path / "server" / "ca.pem"),
                         require_client_cert=False)
    server_tls = await credentials.ServerTls.open(files, interval=0.05)
    front = tlsfront.TlsFront(server_tls, client_limits=adsbase.Limits(),
                              on_refused=lambda event, **refusal: None)
    grpc_side = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    grpc_side.bind(f"\0{front.name}")
    grpc_side.listen(16)
    try:
        yield front, await front.start("127.0.0.1", 0), grpc_side
    finally:
        await front.stop()
        await server_tls.stop()
        grpc_side.close()


def tls_client(port: int, ca: pki.CA) -> ssl.SSLSocket:
    """A TLS client without a certificate (allowed under optional), its handshake done."""
    context = ssl.create_default_context(cadata=ca.pem.decode())
    context.set_alpn_protocols(["h2"])
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return context.wrap_socket(raw, server_hostname="localhost")


async def test_grpc_back_pressure_holds_when_the_relay_is_made(tmp_path: Path, ca: pki.CA) -> None:
    """A client that sent much before its relay to gRPC was up (its reading paused for that) has it written to
    gRPC when the relay is made; if gRPC does not take it all, asyncio says so once (pause_writing), within
    that write. The relay then resumed the client for the first reason and lost the second: it read the
    client on without bound while gRPC read nothing. The interleaving is forced here (a loaded loop makes it,
    a test cannot time it): the early bytes handed in, then the relay made over a socket nobody reads."""
    async with relay_without_grpc(tmp_path, ca) as (front, _, _grpc_side):
        loop = asyncio.get_running_loop()
        client_end, peer_end = socket.socketpair()
        grpc_end, unread = socket.socketpair()
        try:
            client = tlsfront._Client(front)
            transport, _ = await loop.create_connection(lambda: client, sock=client_end)
            client._to_grpc(b"x" * (4 * tlsfront.EARLY_BYTES))  # what the client sent while the relay was made
            assert not transport.is_reading()
            inner, _ = await loop.create_connection(lambda: tlsfront._Grpc(client), sock=grpc_end)
            assert inner.get_write_buffer_size() > 64 * 1024  # gRPC's side is full: asyncio paused the relay's writes
            assert not transport.is_reading()  # so the client waits
            client.close(abort=True)
        finally:
            for sock in (peer_end, unread):
                sock.close()


async def test_a_client_that_does_not_read_is_let_go_when_grpc_ends_its_connection(tmp_path: Path, ca: pki.CA) -> None:
    """gRPC ends a connection (max connection age, stopping) whose client reads nothing: the client's socket,
    its write buffer full, waited for ever to drain; it is aborted after a grace."""
    async with relay_without_grpc(tmp_path, ca) as (front, port, grpc_side):
        conn = await asyncio.to_thread(tls_client, port, ca)
        try:
            conn.sendall(b"hello")  # the relay to gRPC is made once the client speaks
            inner, _ = await asyncio.to_thread(grpc_side.accept)

            def write_until_held() -> None:
                inner.settimeout(1.0)
                with contextlib.suppress(TimeoutError):
                    while True:
                        inner.sendall(b"y" * 65536)  # a push the client never reads

            await asyncio.to_thread(write_until_held)
            inner.close()  # gRPC ends the connection
            await wait_for(lambda: not front.clients, timeout=2 * tlsfront.CLOSE_GRACE + 3,
                           what="the client's connection closed")
        finally:
            conn.close()


async def test_a_relay_that_cannot_be_made_closes_the_client(tmp_path: Path, ca: pki.CA) -> None:
    """Out of file descriptors when the relay to gRPC is made: the client's connection was left open, with
    no relay and no timer, for ever; it is closed (and said)."""
    async with relay_without_grpc(tmp_path, ca) as (front, port, _):
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        await wait_for(lambda: front.clients, what="the connection accepted")
        context = ssl.create_default_context(cadata=ca.pem.decode())
        context.set_alpn_protocols(["h2"])
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        await asyncio.to_thread(int)  # the executor's thread and module, had while descriptors can be
        lowest_free = os.dup(0)  # a new descriptor takes the lowest number free: none may be had below the limit
        os.close(lowest_free)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
        try:
            def handshake_then_read() -> bytes | str:
                with context.wrap_socket(raw, server_hostname="localhost") as conn:
                    conn.settimeout(5)
                    try:
                        return conn.recv(1)
                    except (ConnectionError, ssl.SSLError) as exc:
                        return type(exc).__name__
                    except TimeoutError:
                        return "left open"

            with structlog.testing.capture_logs() as logs:
                outcome = await asyncio.to_thread(handshake_then_read)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            raw.close()
    assert outcome != "left open"
    (error,) = [e for e in logs if e["event"] == "cannot relay an ADS connection to gRPC; closed it"]
    assert "Too many open files" in error["error"]


async def test_a_client_that_leaves_as_its_stream_begins_is_not_refused(
    start_plane: Any, tmp_path: Path, ca: pki.CA
) -> None:
    """A proxy restarting (or a client that gives up) closes its connection right after sending its first
    request: gRPC may begin the stream after the relay has let the connection's name go. That stream is
    nobody's to serve; it was counted and listed as a stranger on the relay's socket (PERMISSION_DENIED)."""
    plane = await plane_with_tls(start_plane, tmp_path, ca, "optional")
    cert, key, _ = ca.issue("client", uris=(SIDECAR_ID,))
    credentials_ = grpc.ssl_channel_credentials(ca.pem, key, cert)
    request = discovery_pb2.DiscoveryRequest(node=ads_client.node("sidecar-1", region="r1"), type_url=typeurls.CLUSTER)

    async def leave_at_once() -> None:
        async with grpc.aio.secure_channel(f"localhost:{plane.ads_port}", credentials_) as channel:
            call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
            await call.write(request)
        # the channel closes here, the request perhaps not yet begun as a stream

    for _ in range(10):
        await asyncio.gather(*(leave_at_once() for _ in range(20)))
    front = plane._front
    assert front is not None
    await wait_for(lambda: not front.clients, what="every connection gone")
    assert _refusals(plane, "PERMISSION_DENIED", "identity") == 0
    assert (await _syncz(plane))["refused"] == []


async def test_a_stopping_server_takes_no_new_tls_connection(start_plane: Any, tmp_path: Path, ca: pki.CA) -> None:
    """The relay stops listening before gRPC stops: a connection made during gRPC's grace found no gRPC to
    relay to (an error logged for each), where it should find the port closed and go to another replica."""
    plane = await plane_with_tls(start_plane, tmp_path, ca, "optional")
    port = plane.ads_port

    def connect() -> str:
        try:
            with tls_client(port, ca) as conn:
                conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                conn.settimeout(2)
                return "served" if conn.recv(1) else "closed"
        except (OSError, ssl.SSLError) as exc:
            return type(exc).__name__

    with structlog.testing.capture_logs() as logs:
        stopping = asyncio.create_task(plane.stop())
        outcomes = []
        while not stopping.done():  # proxies reconnecting all through the stop
            outcomes += await asyncio.gather(*(asyncio.to_thread(connect) for _ in range(8)))
        await stopping
    assert outcomes and "ConnectionRefusedError" in outcomes, outcomes
    assert not [e for e in logs if e["log_level"] == "error"], [e for e in logs if e["log_level"] == "error"]
