"""Certificate and key files, checked: what the ADS port's TLS (meshplane/credentials.py) and the
gateways' HTTPS listeners (meshplane/policy/routecheck.py) take only once they hold what they are for.

A certificate file must hold whole PEM certificates (`x509.load_pem_x509_certificates` drops one cut
short: a chain read while `cp` writes it would pass as its leaf alone), a key file a private key that is
not encrypted, and the key must be the first certificate's own. gRPC, handed a key that is not its
certificate's, logs `Invalid private key` and goes on serving the old pair; Envoy NACKs the listener.
Each error names the file, or both files of a pair. No gRPC here: the policy worker process imports this.
"""

from __future__ import annotations

import datetime
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import exceptions, x509
from cryptography.hazmat.primitives import serialization


class TlsError(ValueError):
    """A certificate, key or CA file that cannot be used; the message names it."""


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None
    require_client_cert: bool = True  # with client_ca: a client without a certificate is refused

    @property
    def optional_client_cert(self) -> bool:
        """A client certificate is asked for, and one given is checked, but a client may give none: meshplane,
        not gRPC, does the handshake (meshplane/tlsfront.py)."""
        return self.client_ca is not None and not self.require_client_cert


@dataclass(frozen=True, slots=True)
class Certificate:
    """The server certificate served (its first, for a chain)."""

    subject: str
    serial: int
    not_after: float  # wall clock
    loaded_at: float


@dataclass(frozen=True, slots=True)
class Loaded:
    """The files' bytes, checked."""

    cert: bytes
    key: bytes
    client_ca: bytes | None
    certificate: Certificate


def checked(files: TlsFiles, *, cert: bytes, key: bytes, client_ca: bytes | None) -> Loaded:
    """The ADS port's files as read (each whole, once): TlsError naming the file and what is wrong with it."""
    served = pair(cert, key, cert_path=files.cert, key_path=files.key)
    if client_ca is not None and files.client_ca is not None:
        chain(client_ca, files.client_ca, "client CA")
    return Loaded(cert, key, client_ca, Certificate(
        subject=served.subject.rfc4514_string(), serial=served.serial_number,
        not_after=served.not_valid_after_utc.timestamp(), loaded_at=time.time()))


def pair(cert: bytes, key: bytes, *, cert_path: Path, key_path: Path) -> x509.Certificate:
    """A certificate (chain) and its key: the certificate served, or TlsError naming the file at fault,
    or both files when the key is not the certificate's."""
    served = chain(cert, cert_path, "certificate")[0]
    own_key(served, private_key(key, key_path), cert_path=cert_path, key_path=key_path)
    return served


def own_key(served: x509.Certificate, private: Any, *, cert_path: Path, key_path: Path) -> None:
    """TlsError naming both files unless `private` is the key of `served`."""
    if _spki(private.public_key()) != _spki(served.public_key()):
        raise TlsError(f"{key_path} is not the private key of the certificate in {cert_path} "
                       f"({served.subject.rfc4514_string()}, serial {served.serial_number:x}): "
                       "a certificate and its own key go together")


def chain(data: bytes, path: Path, what: str) -> list[x509.Certificate]:
    """Every certificate of a PEM file, each whole; TlsError naming the file otherwise."""
    if b"-----BEGIN " not in data:
        raise TlsError(f"{path}: the {what} is not PEM")
    try:
        found = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise TlsError(f"{path}: the {what} is not a PEM certificate ({_why(exc, data, 'CERTIFICATE')})") from None
    if not found:
        raise TlsError(f"{path}: the {what} holds no certificate")
    begun = data.count(b"-----BEGIN CERTIFICATE-----")
    if begun != len(found):  # cryptography leaves out a block cut short (no END line) without a word
        raise TlsError(f"{path}: the {what} begins {begun} certificates but only {len(found)} end: "
                       "the file is cut short (still being written?)")
    return found


def private_key(data: bytes, path: Path) -> Any:
    """The private key of a PEM file that is not encrypted; TlsError naming the file otherwise."""
    if b"-----BEGIN " not in data:
        raise TlsError(f"{path}: the private key is not PEM")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:  # cryptography's word for a key that needs a password
        raise TlsError(f"{path}: the private key is encrypted; meshplane needs it unencrypted") from None
    except (ValueError, exceptions.UnsupportedAlgorithm) as exc:
        raise TlsError(f"{path}: not a private key meshplane can read ({_why(exc, data, 'PRIVATE KEY')})") from None


def _spki(public_key: Any) -> bytes:
    return bytes(public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


def _why(exc: Exception, data: bytes, want: str) -> str:
    """Why cryptography could not load a PEM file, in our words: its own carry a FAQ link and its
    parser's names (`MalformedFraming`, `ParseError { kind: ShortData ... }`)."""
    blocks = list(dict.fromkeys(label.decode() for label in re.findall(rb"-----BEGIN ([A-Z0-9 ]+)-----", data)))
    if blocks and not any(want in block for block in blocks):
        return f"its PEM {'block is' if len(blocks) == 1 else 'blocks are'} {', '.join(blocks)}, not {want}"
    text = str(exc)
    if "MalformedFraming" in text:
        return "a BEGIN line without its END line: cut short, or not PEM"
    if "InvalidData" in text:
        return "what is between its BEGIN and END lines is not base64"
    if isinstance(exc, exceptions.UnsupportedAlgorithm):
        return "a kind of key cryptography cannot load"
    return f"its {want} block does not decode as a {want.lower()}"


def iso(wall: float) -> str:
    """A wall-clock time as the log and /ready write it."""
    return datetime.datetime.fromtimestamp(wall, datetime.UTC).isoformat(timespec="seconds")
