"""TLS for the ADS port: the server's certificate and key, and the CA client certificates are checked
against, re-read when their files change (a Kubernetes secret rotated in place) without dropping a
stream: gRPC asks for the configuration at each new handshake, and connections already open keep
the one they were made with (docs/security.md).

Files are checked before they are taken, at start and at each rotation: each must hold what it is
for, and the key must be the certificate's. gRPC, handed a key that is not its certificate's, logs
`Invalid private key` and goes on serving the old pair, while meshplane would have said it
reloaded; at start it failed with `Failed to bind`. A rotation is looked for when the files change
(watched as the policy is) and at each handshake; one that cannot be used is a warning, a count
(`meshplane_tls_reloads_total{result="rejected"}`) and an entry in `/ready`'s body, and the previous
files stay served.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import re
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import structlog
from cryptography import exceptions, x509
from cryptography.hazmat.primitives import serialization

from meshplane import aio, watch

log = structlog.get_logger(__name__)

SETTLE_NS = 1_000_000_000
"""Files that cannot be used but were written within this long may still be being written (`cp`
truncates, then writes): they are looked at again before being reported."""


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
class Rejected:
    """Files that changed into something that cannot be used: why, and when it was found."""

    error: str
    at: float


@dataclass(frozen=True, slots=True)
class Loaded:
    """The files' bytes, checked."""

    cert: bytes
    key: bytes
    client_ca: bytes | None
    certificate: Certificate


def load(files: TlsFiles) -> Loaded:
    """Read and check the files: TlsError naming the file and what is wrong with it."""
    def read(path: Path, what: str) -> bytes:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise TlsError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
        if b"-----BEGIN " not in data:
            raise TlsError(f"{path}: the {what} is not PEM")
        return data

    cert, key = read(files.cert, "certificate"), read(files.key, "private key")
    ca = read(files.client_ca, "client CA") if files.client_ca is not None else None
    chain = _certificates(cert, files.cert, "certificate")
    if ca is not None and files.client_ca is not None:
        _certificates(ca, files.client_ca, "client CA")
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except TypeError:  # cryptography's word for a key that needs a password
        raise TlsError(f"{files.key}: the private key is encrypted; meshplane needs it unencrypted") from None
    except (ValueError, exceptions.UnsupportedAlgorithm) as exc:
        raise TlsError(f"{files.key}: not a private key meshplane can read ({_why(exc, key, 'PRIVATE KEY')})") from None
    served = chain[0]
    if _spki(private.public_key()) != _spki(served.public_key()):
        raise TlsError(f"{files.key} is not the private key of the certificate in {files.cert} "
                       f"({served.subject.rfc4514_string()}, serial {served.serial_number:x}): "
                       "a certificate and its own key go together")
    return Loaded(cert, key, ca, Certificate(
        subject=served.subject.rfc4514_string(), serial=served.serial_number,
        not_after=served.not_valid_after_utc.timestamp(), loaded_at=time.time()))


def _certificates(data: bytes, path: Path, what: str) -> list[x509.Certificate]:
    try:
        found = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise TlsError(f"{path}: the {what} is not a PEM certificate ({_why(exc, data, 'CERTIFICATE')})") from None
    if not found:
        raise TlsError(f"{path}: the {what} holds no certificate")
    return found


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


def _iso(wall: float) -> str:
    return datetime.datetime.fromtimestamp(wall, datetime.UTC).isoformat(timespec="seconds")


def _ssl_context(files: TlsFiles, loaded: Loaded) -> ssl.SSLContext:
    """Python's ssl, for `--client-cert optional`: a client certificate asked for, checked if given."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(files.cert, files.key)  # the files again: one changed since is seen as a change
        if loaded.client_ca is not None:
            context.load_verify_locations(cadata=loaded.client_ca.decode("ascii", errors="replace"))
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"{files.cert}, {files.key}, {files.client_ca}: OpenSSL cannot use them: {exc}") from None
    context.verify_mode = ssl.CERT_OPTIONAL
    context.set_alpn_protocols(["h2"])  # gRPC clients insist on it
    return context


class ServerTls:
    """Server credentials that follow the files: gRPC's (`credentials`), or with optional client
    certificates Python's (`context()`, meshplane/tlsfront.py).

    `on_reload(result)` is told of each change of the files: "applied" or "rejected". gRPC calls in
    from its own threads (at each handshake): the state is behind a lock."""

    def __init__(self, files: TlsFiles, *, on_reload: Callable[[str], None] = lambda result: None,
                 interval: float = 1.0, inotify: bool = True) -> None:
        self.files = files
        self._on_reload = on_reload
        self._interval, self._inotify = interval, inotify
        self._lock = threading.Lock()
        self._seen = self._stat()
        loaded = load(files)  # at start a broken file is an error, not a warning
        self.serving = loaded.certificate
        self.rejected: Rejected | None = None
        self._pending: grpc.ServerCertificateConfiguration | None = None  # checked, not yet handed to gRPC
        self._task: asyncio.Task[None] | None = None
        self._context = _ssl_context(files, loaded) if files.optional_client_cert else None
        self.credentials = None if files.optional_client_cert else grpc.dynamic_ssl_server_credentials(
            _configuration(loaded), self._fetch, require_client_authentication=files.client_ca is not None)

    async def start(self) -> None:
        """Look at the files whenever they change, not only when a client connects: a rotation that
        cannot be used is reported when it happens."""
        self._task = asyncio.create_task(self._follow(), name="tls-files")

    async def stop(self) -> None:
        await aio.cancel(self._task)
        self._task = None

    async def _follow(self) -> None:
        files = watch.Watch(self._paths(), interval=self._interval, inotify=self._inotify)
        async with contextlib.aclosing(files.events()) as events:  # its inotify descriptor closed with the task
            async for _ in events:
                try:
                    self.refresh()
                except Exception:  # a bug here must not end the watching (nor leave rotations unreported)
                    log.exception("checking the TLS files failed; trying again at the next change")

    def _paths(self) -> list[Path]:
        return [p for p in (self.files.cert, self.files.key, self.files.client_ca) if p is not None]

    def _stat(self) -> tuple[watch.Stat | None, ...]:
        return tuple(watch.stat_of(path) for path in self._paths())  # follows symlinks: a secret's ..data swap

    def refresh(self) -> None:
        """If the files changed: check them, and take them (for the next handshake) or say why not, once."""
        with self._lock:
            seen = self._stat()
            if seen == self._seen:
                return
            try:
                loaded = load(self.files)
                context = _ssl_context(self.files, loaded) if self._context is not None else None
            except TlsError as exc:
                written = max((s[0] for s in seen if s is not None), default=0)
                if time.time_ns() - written < SETTLE_NS:
                    return  # perhaps still being written: looked at again at the next wake-up or handshake
                self._seen, self.rejected = seen, Rejected(str(exc), time.time())
                log.warning("TLS files changed but cannot be used; the previous ones stay", error=str(exc),
                            serving_serial=f"{self.serving.serial:x}", serving_until=_iso(self.serving.not_after))
                self._on_reload("rejected")
                return
            self._seen, self.rejected, self.serving = seen, None, loaded.certificate
            if context is not None:
                self._context = context
            else:
                self._pending = _configuration(loaded)
        log.info("TLS certificate reloaded; new connections get it", cert=str(self.files.cert),
                 serial=f"{loaded.certificate.serial:x}", until=_iso(loaded.certificate.not_after))
        self._on_reload("applied")

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC at each handshake: a new configuration when the files changed, else None."""
        self.refresh()
        with self._lock:
            pending, self._pending = self._pending, None
        return pending

    def context(self) -> ssl.SSLContext:
        """For a new handshake (with optional client certificates): the files' as they are now."""
        self.refresh()
        assert self._context is not None, "only with optional client certificates"
        return self._context

    def status(self) -> dict[str, Any]:
        """For /ready: the certificate served, and a rotation that could not be taken."""
        serving, rejected = self.serving, self.rejected
        return {
            "certificate": str(self.files.cert), "subject": serving.subject, "serial": f"{serving.serial:x}",
            "not_after": _iso(serving.not_after), "loaded_at": _iso(serving.loaded_at),
            "rejected": None if rejected is None else {"error": rejected.error, "at": _iso(rejected.at)},
        }


def _configuration(loaded: Loaded) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([(loaded.key, loaded.cert)], root_certificates=loaded.client_ca)
