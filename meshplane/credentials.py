"""The ADS port's server credentials, following the certificate, key and client CA files (a Kubernetes
secret rotated in place) without dropping a stream: gRPC's (`--client-cert required`, or no client
CA), asked for at each new handshake, or Python ssl's for meshplane's own TLS (`optional`,
meshplane/tlsfront.py). Connections already open keep the ones they were made with (docs/security.md).

The files are looked at as the policy is, when meshplane/watch.py says a write to them is complete,
never at a handshake: each is read whole (`watch.read`; one that changed while being read, or a write
begun since the wake-up, waits for the next), checked (meshplane/tls.py) and taken from those bytes.
Files that cannot be used are reported once they have kept that content for `hold.HOLD_S` (a
certificate written before its key is a mismatched pair for a moment; `hold.Hold`): a warning, a count
(`meshplane_tls_reloads_total{result="rejected"}`) and an entry in `/ready`'s body, and the previous
files stay served. At start the same: files being written are waited for, and files that cannot be
used stop start-up once they have kept that content as long.
"""

from __future__ import annotations

import os
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import structlog

from meshplane import aio, hold, tls, watch

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Rejected:
    """Files that changed into something that cannot be used: why, and when it was found."""

    error: str
    at: float


@dataclass(frozen=True, slots=True)
class _Taken:
    """Files checked and ready to serve: their bytes, and (with optional client certificates) Python's context."""

    loaded: tls.Loaded
    context: ssl.SSLContext | None


class ServerTls:
    """Server credentials that follow the files: gRPC's (`credentials`), or with optional client
    certificates Python's (`context()`). Made by `open`.

    `on_reload(result)` is told of each change of the files: "applied" or "rejected". gRPC takes a
    new configuration from its own threads (at each handshake): that hand-over is behind a lock."""

    def __init__(self, files: tls.TlsFiles, *, on_reload: Callable[[str], None], interval: float,
                 inotify: bool) -> None:
        self.files = files
        self._on_reload = on_reload
        self._watch = watch.Watch(self._paths(), interval=interval, inotify=inotify)
        self._follower = aio.Follower(self._watch.events())
        self._seen: tuple[watch.Seen, ...] | None = None  # the files as last taken or reported
        self._hold = hold.Hold()
        self._lock = threading.Lock()
        self._pending: grpc.ServerCertificateConfiguration | None = None  # checked, not yet handed to gRPC
        self._context: ssl.SSLContext | None = None
        self.credentials: grpc.ServerCredentials | None = None
        self.rejected: Rejected | None = None
        self.serving: tls.Certificate

    @classmethod
    async def open(cls, files: tls.TlsFiles, *, on_reload: Callable[[str], None] = lambda result: None,
                   interval: float = 1.0, inotify: bool = True) -> ServerTls:
        """The files once settled and checked, followed from then on; TlsError naming the files if they
        cannot be used (once they have kept that content `hold.HOLD_S`)."""
        self = cls(files, on_reload=on_reload, interval=interval, inotify=inotify)
        taken: list[_Taken] = []

        def look(quiet: bool) -> bool:
            outcome = self._look(quiet=quiet)
            if isinstance(outcome, tls.TlsError):
                raise outcome
            if outcome is not None:
                taken.append(outcome)
            return outcome is not None

        await self._follower.first(look)
        (outcome,) = taken
        self.serving, self._context = outcome.loaded.certificate, outcome.context
        if outcome.context is None:
            self.credentials = grpc.dynamic_ssl_server_credentials(
                _configuration(outcome.loaded), self._fetch,
                require_client_authentication=files.client_ca is not None)
        self._follower.follow(lambda quiet: self._refresh(quiet=quiet), name="tls-files",
                              event="checking the TLS files failed; trying again at the next change")
        return self

    async def stop(self) -> None:
        await self._follower.stop()

    def _paths(self) -> list[Path]:
        return [p for p in (self.files.cert, self.files.key, self.files.client_ca) if p is not None]

    def _look(self, *, quiet: bool) -> _Taken | tls.TlsError | None:
        """The files if they changed and can be used; why not, if they cannot and have kept that content
        long enough to say so; None if they did not change, are being written, or are held."""
        paths = self._paths()
        if self._seen is not None and not any(seen.changed(p, quiet=quiet) for p, seen in zip(paths, self._seen,
                                                                                           strict=True)):
            return None
        reads = [watch.read(path) for path in paths]
        if any(r.torn for r in reads) or self._watch.disturbed():
            return None  # being written: the watch wakes again once the write is complete
        seen = tuple(watch.Seen.of(r.stat, _bytes(r.data)) for r in reads)
        held = self._hold.saw(watch.digest_of(b"".join(s.digest or b"-" for s in seen)))
        try:
            data = [_data(r.data, path, what) for r, path, what in zip(
                reads, paths, ("certificate", "private key", "client CA"), strict=False)]
            loaded = tls.checked(self.files, cert=data[0], key=data[1], client_ca=data[2] if len(data) > 2 else None)
            context = _ssl_context(self.files, loaded) if self.files.optional_client_cert else None
        except tls.TlsError as exc:
            if held > 0:  # perhaps half of a rotation (a certificate written before its key): look again
                self._watch.look_again(held)
                return None
            self._seen = seen
            return exc
        self._seen = seen
        return _Taken(loaded, context)

    def _refresh(self, *, quiet: bool) -> None:
        """Take the files if they changed and can be used, or say once why not."""
        outcome = self._look(quiet=quiet)
        if outcome is None:
            return
        if isinstance(outcome, tls.TlsError):
            self.rejected = Rejected(str(outcome), time.time())
            log.warning("TLS files changed but cannot be used; the previous ones stay", error=str(outcome),
                        serving_serial=f"{self.serving.serial:x}", serving_until=tls.iso(self.serving.not_after))
            self._on_reload("rejected")
            return
        if outcome.context is not None:
            self._context = outcome.context
        else:
            with self._lock:
                self._pending = _configuration(outcome.loaded)
        certificate = outcome.loaded.certificate
        self.rejected, self.serving = None, certificate
        log.info("TLS certificate reloaded; new connections get it", cert=str(self.files.cert),
                 serial=f"{certificate.serial:x}", until=tls.iso(certificate.not_after))
        self._on_reload("applied")

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC at each handshake, from its threads: a new configuration once, else None."""
        with self._lock:
            pending, self._pending = self._pending, None
        return pending

    def context(self) -> ssl.SSLContext:
        """For a new handshake (with optional client certificates): the files' as last taken."""
        assert self._context is not None, "only with optional client certificates"
        return self._context

    def status(self) -> dict[str, Any]:
        """For /ready: the certificate served, and a rotation that could not be taken."""
        serving, rejected = self.serving, self.rejected
        return {
            "certificate": str(self.files.cert), "subject": serving.subject, "serial": f"{serving.serial:x}",
            "not_after": tls.iso(serving.not_after), "loaded_at": tls.iso(serving.loaded_at),
            "rejected": None if rejected is None else {"error": rejected.error, "at": tls.iso(rejected.at)},
        }


def _bytes(data: bytes | OSError) -> bytes:
    """What a file's content is compared by: its bytes, or its error (an unreadable file is reported once)."""
    return data if isinstance(data, bytes) else f"unreadable: {data}".encode()


def _data(data: bytes | OSError, path: Path, what: str) -> bytes:
    if isinstance(data, OSError):
        raise tls.TlsError(f"{path}: cannot read the {what}: {data.strerror or data}")
    return data


def _ssl_context(files: tls.TlsFiles, loaded: tls.Loaded) -> ssl.SSLContext:
    """Python's ssl, for `--client-cert optional`: a client certificate asked for, checked if given; from
    the bytes checked, not the files again (they may have changed since)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # OpenSSL reads a certificate chain only from a file: one in memory, gone when closed.
    fd = os.memfd_create("meshplane-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, loaded.cert + b"\n" + loaded.key)
        context.load_cert_chain(f"/proc/self/fd/{fd}")
        if loaded.client_ca is not None:
            context.load_verify_locations(cadata=loaded.client_ca.decode("ascii", errors="replace"))
    except (ssl.SSLError, OSError) as exc:
        raise tls.TlsError(f"{files.cert}, {files.key}, {files.client_ca}: OpenSSL cannot use them: {exc}") from None
    finally:
        os.close(fd)
    context.verify_mode = ssl.CERT_OPTIONAL
    context.set_alpn_protocols(["h2"])  # gRPC clients insist on it
    return context


def _configuration(loaded: tls.Loaded) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([(loaded.key, loaded.cert)], root_certificates=loaded.client_ca)
