"""HTTPS at a real Envoy gateway: the certificate of the hostname a client names (SNI), read from the
files the policy names, and rotated in place when the files change (the listener stays, requests on
it go on being served)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import structlog
from cryptography import x509
from cryptography.x509.oid import NameOID

from meshplane.demo.ports import free_port
from tests import pki
from tests.conftest import wait_for
from tests.edge import Edge, Place

pytestmark = pytest.mark.envoy

HERE = Place("cluster-1", "r1", "z1")
PORT = free_port()
POLICY = f"""\
apiVersion: meshplane.io/v2
gateways:
  - name: edge
    listeners:
      - name: com
        port: {PORT}
        protocol: HTTPS
        hostname: example.com
        tls: {{certificateFile: certs/example.com.crt, keyFile: certs/example.com.key}}
      - name: org
        port: {PORT}
        protocol: HTTPS
        hostname: example.org
        tls: {{certificateFile: certs/example.org.crt, keyFile: certs/example.org.key}}
routes:
  - name: web
    parentRefs: [{{name: edge}}]
    rules:
      - backendRefs: [{{name: web, port: 8000}}]
"""


async def served_certificate(host: str) -> tuple[str, int, int]:
    """Connect with SNI `host`, send a request for it: (certificate common name, serial, HTTP status)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # self-signed: we read what was served instead
    reader, writer = await asyncio.open_connection("127.0.0.1", PORT, ssl=context, server_hostname=host)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        status = int((await reader.readline()).split()[1])
    finally:
        writer.close()
    cert = x509.load_der_x509_certificate(der)
    common_name = str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
    return common_name, cert.serial_number, status


@pytest.fixture
async def edge(tmp_path: Path) -> AsyncIterator[Edge]:
    for host in ("example.com", "example.org"):
        pki.write_self_signed(tmp_path / "certs", host, serial=1)
    world = Edge(tmp_path, {"web": [HERE]}, gateway_at=HERE)
    try:
        await world.start(POLICY)
        await wait_for(lambda: _serves(world, "example.com", 1), what="HTTPS served")
        yield world
    finally:
        await world.stop()


async def _serves(world: Edge, host: str, serial: int) -> bool:
    try:
        return await served_certificate(host) == (host, serial, 200)
    except (OSError, ssl.SSLError):
        return False


async def test_each_hostname_gets_its_certificate_by_sni(edge: Edge) -> None:
    assert await served_certificate("example.com") == ("example.com", 1, 200)
    assert await served_certificate("example.org") == ("example.org", 1, 200)
    assert edge.nacks() == 0


async def test_replacing_the_files_rotates_the_certificate_without_dropping_the_listener(edge: Edge) -> None:
    assert edge.gateway is not None
    before = await edge.gateway.stats(filter="listener_manager")
    failures = 0

    async def keep_asking() -> None:  # requests all through the rotation
        nonlocal failures
        while True:
            if not await _serves_any(edge):
                failures += 1
            await asyncio.sleep(0.02)

    asking = asyncio.create_task(keep_asking())
    try:
        pki.write_self_signed(edge.workdir / "certs", "example.com", serial=2)
        await wait_for(lambda: _serves(edge, "example.com", 2), what="the new certificate served")
    finally:
        asking.cancel()
    assert await served_certificate("example.org") == ("example.org", 1, 200)  # the other one is untouched
    after = await edge.gateway.stats(filter="listener_manager")
    assert after["listener_manager.listener_removed"] == before["listener_manager.listener_removed"]
    assert after["listener_manager.listener_in_place_updated"] > before["listener_manager.listener_in_place_updated"]
    assert failures == 0
    assert edge.nacks() == 0


async def _serves_any(world: Edge) -> bool:
    try:
        return (await served_certificate("example.com"))[2] == 200
    except (OSError, ssl.SSLError):
        return False


def _reloads(world: Edge, result: str) -> float:
    return world.plane.metrics.registry.get_sample_value("meshplane_policy_reloads_total", {"result": result}) or 0.0


async def test_a_certificate_without_its_key_is_refused_until_the_key_comes(edge: Edge) -> None:
    """`cp new.crt example.com.crt; cp new.key example.com.key`: after the first copy the files are a
    certificate and a key that is not its own. That is a policy error naming both files (never pushed
    for Envoy to NACK); the old pair stays served until the key arrives."""
    certs = edge.workdir / "certs"
    cert, key = pki.self_signed("example.com", serial=2)
    with structlog.testing.capture_logs() as logs:
        (certs / "example.com.crt").write_bytes(cert)  # in place, as cp does
        await wait_for(lambda: _reloads(edge, "rejected") == 1, what="the mismatched pair rejected")
        assert await served_certificate("example.com") == ("example.com", 1, 200)
        (certs / "example.com.key").write_bytes(key)
        await wait_for(lambda: _serves(edge, "example.com", 2), what="the new pair served once the key came")
    (error,) = [e["problem"] for e in logs if e["event"] == "policy rejected"]
    assert error == (f"{edge.policy_path}:9: gateways[0].listeners[0].tls: {certs}/example.com.key is not the "
                     f"private key of the certificate in {certs}/example.com.crt (CN=example.com, serial 2): "
                     "a certificate and its own key go together")
    assert edge.nacks() == 0


async def test_a_chain_cut_short_is_refused_not_served_as_its_leaf(edge: Edge) -> None:
    """A chain file cut in its intermediate (a copy that died, a full disk) would parse as the leaf alone."""
    root = pki.CA("root")
    middle = pki.CA("intermediate", parent=root)
    certs = edge.workdir / "certs"
    leaf, key, serial = middle.issue("example.com", dns=("example.com",))
    pki.write(certs / "example.com.key", key)
    pki.write(certs / "example.com.crt", leaf + middle.pem)
    await wait_for(lambda: _serves(edge, "example.com", serial), what="the chain served")
    rejected = _reloads(edge, "rejected")  # the moment the key was new and the certificate not yet
    new_leaf, _, new_serial = middle.issue("example.com", dns=("example.com",), key_pem=key)
    pki.write(certs / "example.com.crt", new_leaf + middle.pem[:len(middle.pem) // 2])
    await wait_for(lambda: _reloads(edge, "rejected") == rejected + 1, what="the chain cut short rejected")
    assert edge.plane.policy_watcher.last_errors[0].reason == (
        f"{certs}/example.com.crt: the certificate begins 2 certificates but only 1 end: the file is cut short "
        "(still being written?)")
    assert await served_certificate("example.com") == ("example.com", serial, 200)
    assert new_serial != serial and edge.nacks() == 0
