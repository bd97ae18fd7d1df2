"""HTTPS at a real Envoy gateway: the certificate of the hostname a client names (SNI), read from the
files the policy names, and rotated in place when the files change (the listener stays, requests on
it go on being served)."""

from __future__ import annotations

import asyncio
import datetime
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshplane.demo.ports import free_port
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


def write_certificate(directory: Path, host: str, *, serial: int) -> None:
    """A self-signed certificate for `host` (its serial number tells two of them apart), written atomically."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(serial).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .sign(key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    for suffix, data in ((".key", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption())),
                         (".crt", cert.public_bytes(serialization.Encoding.PEM))):
        tmp = directory / f"{host}{suffix}.tmp"
        tmp.write_bytes(data)
        tmp.replace(directory / f"{host}{suffix}")


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
        write_certificate(tmp_path / "certs", host, serial=1)
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
        write_certificate(edge.workdir / "certs", "example.com", serial=2)
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
