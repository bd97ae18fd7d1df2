"""TLS for the ADS port: the server's certificate and key, and the CA client certificates are checked
against, re-read when their files change (a Kubernetes secret rotated in place) without dropping a
stream: gRPC asks for the configuration at each new handshake, and connections already open keep
the one they were made with (docs/security.md)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog

from meshplane import watch

log = structlog.get_logger(__name__)


class TlsError(ValueError):
    """A certificate, key or CA file that cannot be used; the message names it."""


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None
    require_client_cert: bool = True  # with client_ca: a client without a certificate is refused


class ServerTls:
    """gRPC server credentials that follow the files."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._seen = self._stat()
        self.loads = 0  # configurations loaded: 1 at start, +1 per rotation taken
        self._failing: str | None = None
        initial = self._configuration()  # at start a broken file is an error, not a warning
        self.credentials = grpc.dynamic_ssl_server_credentials(
            initial, self._fetch,
            require_client_authentication=files.client_ca is not None and files.require_client_cert,
        )

    def _paths(self) -> list[Path]:
        return [p for p in (self.files.cert, self.files.key, self.files.client_ca) if p is not None]

    def _stat(self) -> tuple[watch.Stat | None, ...]:
        return tuple(watch.stat_of(path) for path in self._paths())  # follows symlinks: a secret's ..data swap

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        def read(path: Path, what: str) -> bytes:
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise TlsError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
            if b"-----BEGIN " not in data:
                raise TlsError(f"{path}: the {what} is not PEM")
            return data

        cert, key = read(self.files.cert, "certificate"), read(self.files.key, "private key")
        ca = read(self.files.client_ca, "client CA") if self.files.client_ca is not None else None
        self.loads += 1
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC at each handshake: a new configuration when the files changed, else None."""
        seen = self._stat()
        if seen == self._seen:
            return None
        try:
            configuration = self._configuration()
        except TlsError as exc:
            if str(exc) != self._failing:  # once per problem, not once per handshake
                self._failing = str(exc)
                log.error("TLS files changed but cannot be used; the previous ones stay", error=str(exc))
            return None
        self._seen, self._failing = seen, None
        log.info("TLS certificate reloaded", cert=str(self.files.cert))
        return configuration
