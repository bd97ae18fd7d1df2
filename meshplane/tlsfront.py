"""`--client-cert optional`: the ADS port's TLS is done by meshplane, because grpcio cannot ask for a
client certificate without requiring one (decision 0020).

gRPC's core can (`GRPC_SSL_REQUEST_CLIENT_CERTIFICATE_AND_VERIFY`), but grpcio's server credentials
offer two of its modes: require and verify, or never ask (`require_client_auth=False`). A client never
asked sends no certificate: one of another CA, or one claiming another namespace or the gateway `edge`,
was served as a client without one, and `/debug/syncz` said `identity: null`.

So with `optional`, `TlsFront` listens on the ADS address and does TLS with Python's ssl and
`CERT_OPTIONAL`: a certificate is asked for, a client may send none, and one that is sent must chain
to the client CA or the handshake fails (logged, counted, listed as refused). Each connection's bytes,
decrypted, are relayed to the gRPC server on a private abstract Unix socket, from a socket bound to a
random name of its own, which gRPC reports as the stream's peer: `peer()` maps it back to the
client's address and certificate, for the identity check and the limits per address. A connection to
the private socket that is not one of ours maps to nothing, and is refused.

Each connection is two asyncio protocols and no task: TLS is an `ssl.SSLObject` over memory BIOs
(asyncio's own TLS transport keeps a 256 KiB buffer per connection: 250 MB more for 1,000 proxies).
Each side writes what the other reads and stops reading while the other's write buffer is full, so a
client that does not read holds up gRPC's writes to it (and gives its push slot back) as without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import ssl
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import structlog

from meshplane import credentials, listen
from meshplane.xds import identity

log = structlog.get_logger(__name__)

HANDSHAKE_TIMEOUT = 10.0
READ_CHUNK = 64 * 1024
EARLY_BYTES = 256 * 1024  # read from a client before its relay to gRPC is up; then it waits


Refused = Callable[[str, str], None]
"""(gRPC-style peer, why): a client whose certificate was not accepted."""


class TlsFront:
    """The ADS port's TLS listener; gRPC serves `grpc_address`, where only this relays to."""

    def __init__(self, server_tls: credentials.ServerTls, *, on_refused: Refused) -> None:
        self.tls = server_tls
        self.on_refused = on_refused
        self.name = f"meshplane-ads-{os.getpid()}-{secrets.token_hex(8)}"
        self.grpc_address = f"unix-abstract:{self.name}"
        self.peers: dict[str, identity.Peer] = {}  # gRPC's peer string of a relayed connection -> its client
        self.clients: set[_Client] = set()
        self.connecting: set[asyncio.Task[Any]] = set()
        self._servers: list[asyncio.Server] = []

    async def start(self, host: str, port: int) -> int:
        """Listen where gRPC would (listen.bind: every address of `host`, on one port, `[::]` dual stack,
        no SO_REUSEPORT); the port (useful when `port` is 0). ListenError naming `--ads` if it cannot."""
        loop = asyncio.get_running_loop()
        sockets = listen.bind("--ads", host, port)
        try:
            for sock in sockets:
                self._servers.append(await loop.create_server(lambda: _Client(self), sock=sock))
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        return int(sockets[0].getsockname()[1])

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self.connecting):
            task.cancel()
        await asyncio.gather(*self.connecting, return_exceptions=True)
        for client in list(self.clients):
            client.close(abort=True)
        for server in self._servers:
            await server.wait_closed()
        self._servers = []

    def peer(self, grpc_peer: str, auth: Mapping[str, Sequence[bytes]]) -> identity.Peer | None:
        """Who a stream's client is: through the relay, its own address and certificate; on another
        port of the server (`--ads-plaintext`), as gRPC says; None: a connection to the relay's socket
        that the relay did not make."""
        if grpc_peer.startswith("unix"):
            return self.peers.get(grpc_peer)
        return identity.from_grpc(grpc_peer, auth)


class _Client(asyncio.Protocol):
    """One client's TCP connection: its TLS, then its bytes relayed to gRPC and back."""

    def __init__(self, front: TlsFront) -> None:
        self._front = front
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = front.tls.context().wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._transport: asyncio.Transport | None = None
        self._inner: asyncio.Transport | None = None
        self._peer = ""
        self._name = ""  # the relay socket's, once the handshake is done
        self._handshaken = False
        self._closed = False
        self._early: list[bytes] = []
        self._early_bytes = 0
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._peer = _grpc_peer(transport.get_extra_info("peername"))
        self._front.clients.add(self)
        self._timer = asyncio.get_running_loop().call_later(HANDSHAKE_TIMEOUT, self._too_slow)

    def data_received(self, data: bytes) -> None:
        self._incoming.write(data)
        if not self._handshaken and not self._handshake():
            return
        while not self._closed:
            try:
                plain = self._tls.read(READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLError as exc:  # a close_notify (SSLZeroReturnError), or a broken record
                log.debug("ADS TLS connection ended", peer=self._peer, error=str(exc))
                self.close()
                return
            if not plain:
                self.close()
                return
            self._to_grpc(plain)
        self._flush()

    def _handshake(self) -> bool:
        """Go on with the handshake; True once it is done (and the relay to gRPC is being set up)."""
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return False
        except ssl.SSLCertVerificationError as exc:
            self._flush()  # the alert, so the client knows why
            self.close()
            self._front.on_refused(self._peer, f"client certificate not accepted: {exc.verify_message}")
            return False
        except (ssl.SSLError, OSError) as exc:  # not TLS, or TLS gone wrong: nothing of ours to report
            log.debug("ADS TLS handshake failed", peer=self._peer, error=str(exc))
            self.close(abort=True)
            return False
        self._handshaken = True
        if self._timer is not None:
            self._timer.cancel()
        self._name = f"c-{secrets.token_hex(8)}"
        self._front.peers[f"unix-abstract:{self._name}"] = identity.Peer(
            self._peer, identity.peer(_auth(self._tls)), certificate_asked=True)
        task = asyncio.get_running_loop().create_task(self._connect(), name="ads-tls-relay")
        self._front.connecting.add(task)
        task.add_done_callback(self._front.connecting.discard)
        return True

    async def _connect(self) -> None:
        inner = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            inner.bind(f"\0{self._name}")
            inner.setblocking(False)
            await asyncio.get_running_loop().sock_connect(inner, f"\0{self._front.name}")
            await asyncio.get_running_loop().create_unix_connection(lambda: _Grpc(self), sock=inner)
        except asyncio.CancelledError:  # stopping
            inner.close()
            self.close(abort=True)
            raise
        except OSError as exc:
            inner.close()
            self.close(abort=True)
            log.error("cannot relay an ADS connection to gRPC", peer=self._peer, error=str(exc))

    def attach(self, inner: asyncio.Transport) -> None:
        """The relay to gRPC is up: what the client sent meanwhile goes first."""
        if self._closed:
            inner.close()
            return
        self._inner = inner
        for data in self._early:
            inner.write(data)
        if self._early_bytes >= EARLY_BYTES and self._transport is not None:
            self._transport.resume_reading()
        self._early.clear()

    def _to_grpc(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.write(data)
            return
        self._early.append(data)
        self._early_bytes += len(data)
        if self._early_bytes >= EARLY_BYTES and self._transport is not None:
            self._transport.pause_reading()

    def from_grpc(self, data: bytes) -> None:
        if self._closed:
            return
        try:
            self._tls.write(data)
        except ssl.SSLError as exc:
            log.debug("ADS TLS write failed", peer=self._peer, error=str(exc))
            self.close(abort=True)
            return
        self._flush()

    def _flush(self) -> None:
        out = self._outgoing.read()
        if out and self._transport is not None and not self._transport.is_closing():
            self._transport.write(out)

    def _too_slow(self) -> None:
        log.debug("ADS TLS handshake timed out", peer=self._peer, after_s=HANDSHAKE_TIMEOUT)
        self.close(abort=True)

    def eof_received(self) -> bool:
        self.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()
        self._front.clients.discard(self)

    def pause_writing(self) -> None:  # the client does not take what gRPC writes: gRPC's writes wait
        if self._inner is not None:
            self._inner.pause_reading()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_reading()

    def pause_grpc_reading(self) -> None:  # gRPC does not take what the client sends
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_grpc_reading(self) -> None:
        if self._transport is not None:
            self._transport.resume_reading()

    def close(self, *, abort: bool = False) -> None:
        """End both sides; what each sent last still reaches the other, unless `abort`."""
        if self._timer is not None:
            self._timer.cancel()
        if not self._closed:
            self._closed = True
            self._front.peers.pop(f"unix-abstract:{self._name}", None)  # before its name can be bound again
            if self._handshaken and not abort:
                with contextlib.suppress(ssl.SSLError):
                    self._tls.unwrap()  # our close_notify; the client's is not waited for
                self._flush()
        for transport in (self._inner, self._transport):
            if transport is not None:
                transport.abort() if abort else transport.close()


class _Grpc(asyncio.Protocol):
    """gRPC's side of a relayed connection."""

    def __init__(self, client: _Client) -> None:
        self._client = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._client.attach(transport)

    def data_received(self, data: bytes) -> None:
        self._client.from_grpc(data)

    def eof_received(self) -> bool:
        self._client.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._client.close()

    def pause_writing(self) -> None:
        self._client.pause_grpc_reading()

    def resume_writing(self) -> None:
        self._client.resume_grpc_reading()


def _grpc_peer(address: Any) -> str:
    """A socket's peer address as gRPC writes it (`ipv4:10.0.0.1:5000`, `ipv6:[::1]:5000`)."""
    if not isinstance(address, tuple) or len(address) < 2:
        return f"unknown:{address}"
    host, port = address[0], address[1]
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


def _auth(tls_object: ssl.SSLObject) -> dict[str, list[bytes]]:
    """The TLS peer's properties in gRPC's words (what `identity.peer` reads): its certificate, if it
    gave one (then verified against the client CA), and the URIs among its names."""
    auth = {"transport_security_type": [b"ssl"]}
    der = tls_object.getpeercert(binary_form=True)
    if der:
        names: Any = (tls_object.getpeercert() or {}).get("subjectAltName", ())  # (("URI", "spiffe://..."), ...)
        auth["x509_pem_cert"] = [ssl.DER_cert_to_PEM_cert(der).encode()]
        auth["x509_subject_alternative_name"] = [str(value).encode() for kind, value in names if kind == "URI"]
    return auth
