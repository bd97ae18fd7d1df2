"""Certificates for tests, made with `cryptography`: a CA, server certificates with DNS and IP names,
client certificates with a SPIFFE id; and the file-based SDS documents Envoy reads them through."""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write(path: Path, data: bytes) -> Path:
    """Atomically, as a rotated secret appears."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


class CA:
    def __init__(self, name: str = "meshplane-test-ca", *, parent: CA | None = None) -> None:
        """A root CA, or (`parent`) an intermediate CA signed by `parent`."""
        now = datetime.datetime.now(datetime.UTC)
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            x509.CertificateBuilder().subject_name(subject)
            .issuer_name(parent.cert.subject if parent else subject).public_key(self.key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(parent.key if parent else self.key, hashes.SHA256())
        )

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, common_name: str, *, dns: tuple[str, ...] = (), ips: tuple[str, ...] = (),
              uris: tuple[str, ...] = (), key_pem: bytes | None = None) -> tuple[bytes, bytes, int]:
        """(certificate PEM, key PEM, serial number); for the key `key_pem` if given, else a new one."""
        now = datetime.datetime.now(datetime.UTC)
        loaded = serialization.load_pem_private_key(key_pem, None) if key_pem else None
        key = loaded if isinstance(loaded, ec.EllipticCurvePrivateKey) else ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        sans += [x509.UniformResourceIdentifier(u) for u in uris]
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject).public_key(key.public_key()).serial_number(serial)
            .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key), serial

    def write_server(self, directory: Path, *, dns: tuple[str, ...] = ("localhost",)) -> tuple[Path, Path, int]:
        """server.pem and server.key in `directory` (names localhost and 127.0.0.1); the serial."""
        cert, key, serial = self.issue("meshplane", dns=dns, ips=("127.0.0.1",))
        directory.mkdir(parents=True, exist_ok=True)
        return write(directory / "server.pem", cert), write(directory / "server.key", key), serial

    def write_client(self, directory: Path, spiffe_id: str) -> tuple[Path, Path]:
        cert, key, _ = self.issue("client", uris=(spiffe_id,))
        directory.mkdir(parents=True, exist_ok=True)
        return write(directory / "client.pem", cert), write(directory / "client.key", key)

    def write_ca(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        return write(path, self.pem)


def envoy_sds(directory: Path, *, cert: Path, key: Path, ca: Path) -> tuple[Path, Path]:
    """Envoy's file-based SDS documents for its client certificate and the CA it trusts."""
    secret = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
    cert_doc = {"resources": [{"@type": secret, "name": "xds_client_cert", "tls_certificate": {
        "certificate_chain": {"filename": str(cert)}, "private_key": {"filename": str(key)},
        "watched_directory": {"path": str(cert.parent)}}}]}
    ca_doc = {"resources": [{"@type": secret, "name": "xds_ca", "validation_context": {
        "trusted_ca": {"filename": str(ca)}, "watched_directory": {"path": str(ca.parent)}}}]}
    cert_sds, ca_sds = directory / "xds-cert-sds.yaml", directory / "xds-ca-sds.yaml"
    cert_sds.write_text(yaml.safe_dump(cert_doc))
    ca_sds.write_text(yaml.safe_dump(ca_doc))
    return cert_sds, ca_sds


def self_signed(host: str, *, serial: int | None = None) -> tuple[bytes, bytes]:
    """A self-signed certificate for `host` (its serial number tells two of them apart) and its key (PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(serial or x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def write_self_signed(directory: Path, host: str, *, serial: int | None = None) -> None:
    """`host.crt` and `host.key` in `directory`, from `self_signed`, each written atomically, key first."""
    cert, key = self_signed(host, serial=serial)
    directory.mkdir(parents=True, exist_ok=True)
    write(directory / f"{host}.key", key)
    write(directory / f"{host}.crt", cert)
