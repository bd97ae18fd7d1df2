"""mTLS and identity on the ADS port (docs/security.md): a real Envoy over mTLS with its certificates
through file-based SDS; clients without a certificate, with one of another CA, or claiming another
namespace or gateway are refused with the status docs/security.md gives; the server certificate
rotates under live streams without dropping one."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog
from cryptography import x509

from meshplane import app, tls
from meshplane.demo import backend, envoy
from meshplane.demo.ports import free_port
from meshplane.xds import client as ads_client
from meshplane.xds import typeurls
from tests import pki
from tests.conftest import cluster_doc, wait_for, write_yaml

pytestmark = pytest.mark.envoy

SIDECAR_ID = "spiffe://cluster.local/ns/default/sa/mocka"
CLIENT_CERT = pytest.mark.parametrize("client_cert", ["required", "optional"])
"""What holds whether gRPC does the TLS (required) or meshplane does (optional: meshplane/tlsfront.py)."""


@pytest.fixture
def ca() -> pki.CA:
    return pki.CA()


async def plane_with_tls(start_plane: Any, tmp_path: Path, ca: pki.CA, client_cert: str = "required",
                         **kwargs: Any) -> app.ControlPlane:
    """A control plane with mTLS from `ca` (`client_cert`: required or optional), serving mockb."""
    cert, key, _ = ca.write_server(tmp_path / "server")
    endpoints = write_yaml(tmp_path / "c1.yaml", cluster_doc("c1", "r1", {"mockb": [{"zone": "z1", "port": 9}]}))
    files = tls.TlsFiles(cert=cert, key=key, client_ca=ca.write_ca(tmp_path / "server" / "ca.pem"),
                         require_client_cert=client_cert == "required")
    plane: app.ControlPlane = await start_plane(endpoint_files=(endpoints,), tls=files, **kwargs)
    return plane


def grpc_client(plane: app.ControlPlane, ca: pki.CA, client: tuple[bytes, bytes] | None, node_id: str = "sidecar-1",
                 **metadata: Any) -> ads_client.AdsClient:
    c = ads_client.AdsClient(f"localhost:{plane.ads_port}", ads_client.node(
        node_id, region="r1", zone="z1", cluster="c1", metadata=metadata or None))
    key, cert = client if client is not None else (None, None)
    c.credentials = grpc.ssl_channel_credentials(ca.pem, key, cert)
    return c


def issue(ca: pki.CA, spiffe_id: str) -> tuple[bytes, bytes]:
    cert, key, _ = ca.issue("client", uris=(spiffe_id,))
    return key, cert


async def refused_with(client: ads_client.AdsClient) -> grpc.aio.AioRpcError:
    async with client:
        with pytest.raises(grpc.aio.AioRpcError) as error:  # the write fails already when the handshake did
            await client.request(typeurls.CLUSTER)
            await client.recv()
    return error.value


async def claims_refused(plane: app.ControlPlane, ca: pki.CA) -> None:
    """A sidecar's certificate claiming another namespace than its own, or the gateway edge: PERMISSION_DENIED
    naming both sides."""
    error = await refused_with(grpc_client(plane, ca, issue(ca, SIDECAR_ID), namespace="payments"))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == (f"{SIDECAR_ID} claimed node 'sidecar-1' in namespace 'payments': a proxy may only "
                               "claim its own namespace ('default')")
    error = await refused_with(grpc_client(plane, ca, issue(ca, SIDECAR_ID), role="gateway", gateway="edge"))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == (f"{SIDECAR_ID} claimed to be the gateway 'edge': only the service account 'edge' "
                               "of namespace 'default' may")


@pytest.mark.any_protocol  # grpc clients only
async def test_who_may_connect(start_plane: Any, tmp_path: Path, ca: pki.CA) -> None:
    plaintext = free_port()
    plane = await plane_with_tls(start_plane, tmp_path, ca, ads_plaintext=f"127.0.0.1:{plaintext}")
    # With its own certificate and namespace: served.
    async with grpc_client(plane, ca, issue(ca, SIDECAR_ID)) as ok:
        await ok.request(typeurls.CLUSTER)
        assert ads_client.resource_names(await ok.recv())
    # No certificate, or one from another CA: the TLS handshake fails.
    for client in (None, issue(pki.CA("another-ca"), SIDECAR_ID)):
        error = await refused_with(grpc_client(plane, ca, client))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
    await claims_refused(plane, ca)
    # The gateway's own identity may; another trust domain may not.
    async with grpc_client(plane, ca, issue(ca, "spiffe://cluster.local/ns/default/sa/edge"),
                            role="gateway", gateway="edge") as gw:
        await gw.request(typeurls.LISTENER)
        await gw.request(typeurls.CLUSTER)
        await gw.recv()
    error = await refused_with(grpc_client(plane, ca, issue(ca, "spiffe://elsewhere.org/ns/default/sa/mocka")))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "trust domain cluster.local" in (error.details() or "")
    assert plane.metrics.registry.get_sample_value("meshplane_xds_refused_streams_total",
                                                   {"code": "PERMISSION_DENIED", "reason": "identity"}) == 3
    # Plaintext on the TLS port fails; the plaintext listener asked for serves (no identity to check).
    async with ads_client.AdsClient(f"127.0.0.1:{plane.ads_port}", ads_client.node("p", region="r1")) as plain:
        with pytest.raises(grpc.aio.AioRpcError):
            await plain.request(typeurls.CLUSTER)
            await plain.recv(timeout=3)
    async with ads_client.AdsClient(f"127.0.0.1:{plaintext}", ads_client.node("p", region="r1")) as plain:
        await plain.request(typeurls.CLUSTER)
        assert ads_client.resource_names(await plain.recv())


def envoy_with_certificate(plane: app.ControlPlane, ca: pki.CA, tmp_path: Path, *, spiffe_id: str = SIDECAR_ID,
           listener: int = 0, **metadata: Any) -> envoy.EnvoyProcess:
    """A real Envoy (not started) for mTLS to the plane, its certificate for `spiffe_id` through file-based SDS."""
    certs = tmp_path / "envoy-certs"
    cert, key = ca.write_client(certs, spiffe_id)
    cert_sds, ca_sds = pki.envoy_sds(tmp_path, cert=cert, key=key, ca=ca.write_ca(certs / "ca.pem"))
    return envoy.EnvoyProcess(
        node=envoy.EnvoyNode(id="sidecar-1", cluster="t", region="r1", zone="z1", sub_zone="c1",
                             metadata={"listener_port": listener or free_port(), "listener_address": "127.0.0.1",
                                       **metadata}),
        ads_port=plane.ads_port, ads_host="127.0.0.1", workdir=tmp_path,
        tls=envoy.XdsTls(cert_sds=cert_sds, ca_sds=ca_sds, server_name="localhost"))


@contextlib.asynccontextmanager
async def mtls_envoy(plane: app.ControlPlane, ca: pki.CA, tmp_path: Path, spiffe_id: str = SIDECAR_ID
                      ) -> AsyncIterator[tuple[envoy.EnvoyProcess, backend.ReplicaServer]]:
    """A real Envoy connected over mTLS (its certificate through file-based SDS) with traffic through it to
    mockb@z1; its (process, mockb's replica)."""
    listener = free_port()
    server = backend.ReplicaServer(backend.Replica("mockb", "z1", "r1", "c1", free_port(), None, None))
    write_yaml(tmp_path / "c1.yaml", cluster_doc("c1", "r1", {"mockb": [{"zone": "z1", "port": server.replica.port}]}))
    await server.start()
    proxy = envoy_with_certificate(plane, ca, tmp_path, spiffe_id=spiffe_id, listener=listener)
    try:
        await proxy.start()

        async def served() -> bool:
            try:
                status, body = await backend.http_get(listener, "mockb")
            except OSError:
                return False
            return status == 200 and body.strip() == "mockb@z1"

        await wait_for(served, timeout=15, what="traffic through the Envoy configured over mTLS")
        yield proxy, server
    finally:
        await proxy.stop()
        await server.stop()


async def pushed_over(plane: app.ControlPlane, proxy: envoy.EnvoyProcess, server: backend.ReplicaServer,
                       tmp_path: Path, stream_id: int) -> None:
    """A change made now reaches the Envoy over the stream it has had all along."""
    moved = {"mockb": [{"zone": "z2", "port": server.replica.port}]}
    write_yaml(tmp_path / "c1.yaml", cluster_doc("c1", "r1", moved))

    async def pushed() -> bool:
        return "z2" in str(await proxy.config_dump())

    await wait_for(pushed, what="a change pushed over the same stream")
    assert [s.id for s in plane.streams] == [stream_id]
    stats = await proxy.stats(filter="control_plane")
    assert stats["control_plane.connected_state"] == 1


@CLIENT_CERT
async def test_envoy_over_mtls_and_a_rotated_server_certificate_drops_no_stream(
    start_plane: Any, tmp_path: Path, ca: pki.CA, client_cert: str
) -> None:
    plane = await plane_with_tls(start_plane, tmp_path, ca, client_cert)
    async with mtls_envoy(plane, ca, tmp_path) as (proxy, server):
        (stream,) = list(plane.streams)
        assert stream.identity == SIDECAR_ID

        # Rotate the server certificate (same CA): new handshakes get the new one, the open stream stays.
        before = await served_serial(plane.ads_port, ca, tmp_path)
        _, _, serial = ca.write_server(tmp_path / "server")
        await wait_for(lambda: serves(plane.ads_port, ca, tmp_path, serial),
                       what="the new certificate served")
        assert before != serial
        assert [s.id for s in plane.streams] == [stream.id]  # the Envoy's stream was not dropped
        await pushed_over(plane, proxy, server, tmp_path, stream.id)


@CLIENT_CERT
async def test_a_rotation_to_files_that_cannot_be_used_is_reported_and_the_old_certificate_stays(
    start_plane: Any, tmp_path: Path, ca: pki.CA, client_cert: str
) -> None:
    plane = await plane_with_tls(start_plane, tmp_path, ca, client_cert)
    cert_path, key_path = tmp_path / "server" / "server.pem", tmp_path / "server" / "server.key"

    def count(result: str) -> float | None:
        return plane.metrics.registry.get_sample_value("meshplane_tls_reloads_total", {"result": result})

    async def ready_tls() -> dict[str, Any]:
        status, body = await backend.http_get(plane.http_port, "localhost", "/ready")
        assert status == 200  # the previous certificate is served: still ready
        return dict(json.loads(body)["tls"])

    with structlog.testing.capture_logs() as logs:
        async with mtls_envoy(plane, ca, tmp_path) as (proxy, server):
            (stream,) = list(plane.streams)
            before = await served_serial(plane.ads_port, ca, tmp_path)
            assert (await ready_tls())["serial"] == f"{before:x}"
            assert (await ready_tls())["rejected"] is None
            # A certificate whose key is not the key file's (a new certificate, the old key kept).
            other, _, other_serial = ca.issue("meshplane", dns=("localhost",), ips=("127.0.0.1",))
            pki.write(cert_path, other)
            await wait_for(lambda: count("rejected") == 1, what="the mismatched pair counted as rejected")
            rejected = (await ready_tls())["rejected"]
            assert rejected["error"] == (
                f"{key_path} is not the private key of the certificate in {cert_path} (CN=meshplane, serial "
                f"{other_serial:x}): a certificate and its own key go together")
            warnings = [e for e in logs if e["event"] == "TLS files changed but cannot be used; the previous ones stay"]
            assert [(e["log_level"], e["error"]) for e in warnings] == [("warning", rejected["error"])]
            assert await served_serial(plane.ads_port, ca, tmp_path) == before  # new handshakes: the old one
            # A PEM-wrapped file that is not a certificate.
            pki.write(cert_path, b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")
            await wait_for(lambda: count("rejected") == 2, what="the non-certificate counted as rejected")
            assert (await ready_tls())["rejected"]["error"] == (  # in our words, not cryptography's
                f"{cert_path}: the certificate is not a PEM certificate (its CERTIFICATE block does not decode as a "
                "certificate)")
            assert await served_serial(plane.ads_port, ca, tmp_path) == before
            assert not [e for e in logs if e["event"].startswith("TLS certificate reloaded")]
            assert count("applied") == 0

            # A good rotation then works, and clears the report.
            _, _, serial = ca.write_server(tmp_path / "server")
            await wait_for(lambda: count("applied") == 1, what="the good rotation applied")
            await wait_for(lambda: serves(plane.ads_port, ca, tmp_path, serial),
                           what="the new certificate served")
            tls_now = await ready_tls()
            assert tls_now["rejected"] is None and tls_now["serial"] == f"{serial:x}"
            assert [s.id for s in plane.streams] == [stream.id]
            await pushed_over(plane, proxy, server, tmp_path, stream.id)


@pytest.mark.any_protocol
def test_a_key_that_is_not_the_certificates_stops_serve_naming_both(tmp_path: Path, ca: pki.CA) -> None:
    cert, key, _ = ca.write_server(tmp_path)
    _, other_key, _ = ca.issue("meshplane", dns=("localhost",))
    pki.write(key, other_key)
    serial = x509.load_pem_x509_certificate(cert.read_bytes()).serial_number
    result = subprocess.run(
        [sys.executable, "-m", "meshplane", "serve", "--ads", f"127.0.0.1:{free_port()}",
         "--http", f"127.0.0.1:{free_port()}", "--tls-cert", str(cert), "--tls-key", str(key)],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"meshplane: {key} is not the private key of the certificate in {cert} (CN=meshplane, serial {serial:x}): "
        "a certificate and its own key go together"]


@pytest.mark.any_protocol
@pytest.mark.parametrize(("cert_is", "key_is", "says"), [
    ("key", "key", "{key}: the certificate is not a PEM certificate (its PEM block is PRIVATE KEY, not CERTIFICATE)"),
    ("cert", "cert", "{cert}: not a private key meshplane can read (its PEM block is CERTIFICATE, not PRIVATE KEY)"),
    ("cut", "key", "{cut}: the certificate is not a PEM certificate (a BEGIN line without its END line: cut short, "
                   "or not PEM)"),
])
def test_a_file_that_is_not_what_its_flag_wants_stops_serve_in_our_words(
    tmp_path: Path, ca: pki.CA, cert_is: str, key_is: str, says: str
) -> None:
    """No library text (cryptography's FAQ link, `MalformedFraming`): what the file holds instead."""
    cert, key, _ = ca.write_server(tmp_path)
    files = {"cert": cert, "key": key, "cut": pki.write(tmp_path / "cut.pem", cert.read_bytes()[:300])}
    result = subprocess.run(
        [sys.executable, "-m", "meshplane", "serve", "--ads", f"127.0.0.1:{free_port()}",
         "--http", f"127.0.0.1:{free_port()}", "--tls-cert", str(files[cert_is]), "--tls-key", str(files[key_is])],
        capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stderr) == (1, "meshplane: " + says.format(**files) + "\n")


async def served_serial(port: int, ca: pki.CA, tmp_path: Path) -> int:
    """The serial of the certificate the ADS port presents now, from a TLS handshake of our own (in a
    thread: with optional client certificates the server's handshake is done on this event loop)."""
    cert, key = ca.write_client(tmp_path / "probe", SIDECAR_ID)
    context = ssl.create_default_context(cadata=ca.pem.decode())
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2"])

    def handshake() -> bytes | None:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname="localhost") as conn:
            return conn.getpeercert(binary_form=True)

    der = await asyncio.to_thread(handshake)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def serves(port: int, ca: pki.CA, tmp_path: Path, serial: int) -> bool:
    return await served_serial(port, ca, tmp_path) == serial


@pytest.mark.any_protocol
async def test_a_broken_certificate_at_start_stops_serve_naming_the_file(
    start_plane: Any, tmp_path: Path, ca: pki.CA
) -> None:
    cert, key, _ = ca.write_server(tmp_path)
    cert.write_text("not a certificate\n")
    with pytest.raises(tls.TlsError, match=f"{cert}: the certificate is not PEM"):
        await start_plane(tls=tls.TlsFiles(cert=cert, key=key))



@pytest.mark.any_protocol  # the shipped bootstrap says DELTA_GRPC
async def test_the_shipped_bootstrap_connects_over_mtls(start_plane: Any, tmp_path: Path, ca: pki.CA) -> None:
    from tests.test_bootstraps import materialize

    cert, key, _ = ca.write_server(tmp_path / "server", dns=("meshplane.meshplane-system.svc",))
    endpoints = write_yaml(tmp_path / "c1.yaml", cluster_doc("c1", "r1", {"mockb": [{"zone": "z1", "port": 9}]}))
    plane = await start_plane(endpoint_files=(endpoints,), tls=tls.TlsFiles(
        cert=cert, key=key, client_ca=ca.write_ca(tmp_path / "server" / "ca.pem")))
    path = materialize("sidecar.yaml", tmp_path / "envoy", ca, SIDECAR_ID)
    text = path.read_text().replace("address: meshplane.meshplane-system.svc, port_value: 18000",
                                    f"address: 127.0.0.1, port_value: {plane.ads_port}")
    text = text.replace("port_value: 15000", "port_value: 0").replace("listener_port: 15001",
                                                                       f"listener_port: {free_port()}")
    path.write_text(text)
    proc = await asyncio.create_subprocess_exec(
        str(envoy.envoy_binary()), "-c", str(path), "--disable-hot-restart", "--log-level", "warning",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        def connected() -> list[str | None]:
            return [s.identity for s in plane.streams if s.proxy is not None and s.worst().value == "SYNCED"]

        assert await wait_for(connected, timeout=15, what="the shipped sidecar bootstrap synced over mTLS") == \
            [SIDECAR_ID]
        (stream,) = list(plane.streams)
        assert stream.protocol == "delta"
    finally:
        proc.terminate()
        await proc.wait()


@CLIENT_CERT
async def test_a_proxy_refused_for_its_identity_is_logged_once_counted_and_listed_by_status(
    start_plane: Any, tmp_path: Path, ca: pki.CA, client_cert: str
) -> None:
    """It retries about every second for as long as it runs; one warning says so, not one per retry."""
    plane = await plane_with_tls(start_plane, tmp_path, ca, client_cert)
    proxy = envoy_with_certificate(plane, ca, tmp_path, namespace="payments")  # a certificate of namespace default

    def refused() -> float:
        return plane.metrics.registry.get_sample_value(
            "meshplane_xds_refused_streams_total", {"code": "PERMISSION_DENIED", "reason": "identity"}) or 0

    with structlog.testing.capture_logs() as logs:
        await proxy.start()
        try:
            await wait_for(lambda: refused() >= 3, timeout=20, what="the Envoy refused three times")
            status = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "meshplane", "status", "--server",
                                 f"http://127.0.0.1:{plane.http_port}"], capture_output=True, text=True, timeout=30)
        finally:
            await proxy.stop()
    message = (f"{SIDECAR_ID} claimed node 'sidecar-1' in namespace 'payments': a proxy may only claim its own "
               "namespace ('default')")
    lines = [e for e in logs if e["event"] == "xDS client refused"]
    assert [(e["log_level"], e["node"], e["status"], e["error"]) for e in lines] == [
        ("warning", "sidecar-1", "PERMISSION_DENIED", message)]
    assert status.returncode == 0, status.stderr
    assert "no clients connected" in status.stdout
    (line,) = [x for x in status.stdout.splitlines() if "PERMISSION_DENIED" in x]
    count = int(line.split(" x", 1)[1].split(",", 1)[0])
    assert count >= 3
    assert line.startswith(f"  127.0.0.1 sidecar-1 {SIDECAR_ID}: PERMISSION_DENIED (identity) x{count}, last ")
    assert line.endswith(f": {message}")


def handshake(port: int, root: pki.CA) -> int | str:
    """One TLS handshake with the ADS port, verifying it against `root` alone (so the port must send its
    intermediate): the serial of the certificate served, or why the handshake failed."""
    context = ssl.create_default_context(cadata=root.pem.decode())
    context.set_alpn_protocols(["h2"])
    client = root.issue("probe", uris=(SIDECAR_ID,))
    context.load_cert_chain(*_client_files(client))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname="localhost") as conn:
            der = conn.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as exc:
        return str(exc)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


_CLIENT_FILES: dict[bytes, tuple[str, str]] = {}


def _client_files(client: tuple[bytes, bytes, int]) -> tuple[str, str]:
    """ssl reads a client certificate only from files: written once per certificate."""
    cert, key, _ = client
    if cert not in _CLIENT_FILES:
        directory = Path(tempfile.mkdtemp(prefix="meshplane-probe-"))
        _CLIENT_FILES[cert] = (str(pki.write(directory / "c.pem", cert)), str(pki.write(directory / "c.key", key)))
    return _CLIENT_FILES[cert]


def write_slowly(path: Path, first: bytes, rest: bytes, *, pause: float) -> None:
    """As `cp` of a large file, or a tool streaming its output: in place, in two writes `pause` apart."""
    with path.open("wb") as out:
        out.write(first)
        out.flush()
        time.sleep(pause)
        out.write(rest)


@pytest.mark.any_protocol  # TLS handshakes, no proxy
@CLIENT_CERT
async def test_a_chain_rewritten_in_place_is_never_served_half_written(
    start_plane: Any, tmp_path: Path, client_cert: str
) -> None:
    """Handshakes all through a `cp fullchain.pem` that pauses half way: each gets a whole chain, the old one
    until the write is complete, then the new one (a handshake read the file itself, and served a leaf
    without its intermediate)."""
    root = pki.CA("root")
    middle = pki.CA("intermediate", parent=root)
    leaf, key, old_serial = middle.issue("meshplane", dns=("localhost",), ips=("127.0.0.1",))
    directory = tmp_path / "server"
    directory.mkdir()
    cert_path, key_path = pki.write(directory / "fullchain.pem", leaf + middle.pem), pki.write(directory / "key", key)
    endpoints = write_yaml(tmp_path / "c1.yaml", cluster_doc("c1", "r1", {"mockb": [{"zone": "z1", "port": 9}]}))
    plane = await start_plane(endpoint_files=(endpoints,), tls=tls.TlsFiles(
        cert=cert_path, key=key_path, client_ca=root.write_ca(directory / "ca.pem"),
        require_client_cert=client_cert == "required"))
    assert await asyncio.to_thread(handshake, plane.ads_port, root) == old_serial
    new_leaf, _, new_serial = middle.issue("meshplane", dns=("localhost",), ips=("127.0.0.1",), key_pem=key)
    seen: list[int | str] = []
    writing = asyncio.create_task(asyncio.to_thread(write_slowly, cert_path, new_leaf, middle.pem, pause=0.6))
    while not writing.done() or new_serial not in seen[-1:]:
        seen.append(await asyncio.to_thread(handshake, plane.ads_port, root))
        assert len(seen) < 500, seen[-3:]
    await writing
    assert set(seen) <= {old_serial, new_serial}, [s for s in seen if s not in (old_serial, new_serial)][:3]
    assert seen.index(new_serial) > 3  # handshakes were made while the file was half written


@pytest.mark.any_protocol
@CLIENT_CERT
async def test_files_that_cannot_be_used_are_reported_whatever_their_mtime(
    start_plane: Any, tmp_path: Path, ca: pki.CA, client_cert: str
) -> None:
    """A clock that differs between the writer and meshplane (a network filesystem, a secret synced from
    elsewhere) may give a file an mtime in the future: its rejection is reported all the same."""
    plane = await plane_with_tls(start_plane, tmp_path, ca, client_cert)
    cert_path = tmp_path / "server" / "server.pem"
    pki.write(cert_path, b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")
    future = time.time() + 3600
    os.utime(cert_path, (future, future))
    await wait_for(lambda: plane.metrics.registry.get_sample_value(
        "meshplane_tls_reloads_total", {"result": "rejected"}) == 1, what="the rejection reported")
    assert plane.tls is not None and plane.tls.rejected is not None
    assert plane.tls.rejected.error.startswith(f"{cert_path}: the certificate is not a PEM certificate (")


@pytest.mark.any_protocol
@CLIENT_CERT
async def test_a_chain_being_written_at_start_is_waited_for(
    start_plane: Any, tmp_path: Path, client_cert: str
) -> None:
    """meshplane started while its certificate is still being written (a secret synced as the pod starts):
    it starts once the file is whole, and serves the whole chain (it failed, or served the leaf alone)."""
    root = pki.CA("root")
    middle = pki.CA("intermediate", parent=root)
    leaf, key, serial = middle.issue("meshplane", dns=("localhost",), ips=("127.0.0.1",))
    directory = tmp_path / "server"
    directory.mkdir()
    cert_path, key_path = directory / "fullchain.pem", pki.write(directory / "key", key)
    endpoints = write_yaml(tmp_path / "c1.yaml", cluster_doc("c1", "r1", {"mockb": [{"zone": "z1", "port": 9}]}))
    whole = leaf + middle.pem
    writing = asyncio.create_task(asyncio.to_thread(
        write_slowly, cert_path, whole[:len(leaf) + 100], whole[len(leaf) + 100:], pause=0.6))
    await wait_for(lambda: cert_path.exists() and cert_path.stat().st_size > 0, what="the write begun")
    plane = await start_plane(endpoint_files=(endpoints,), tls=tls.TlsFiles(
        cert=cert_path, key=key_path, client_ca=root.write_ca(directory / "ca.pem"),
        require_client_cert=client_cert == "required"))
    assert await asyncio.to_thread(handshake, plane.ads_port, root) == serial  # the first handshake: whole
    await writing
