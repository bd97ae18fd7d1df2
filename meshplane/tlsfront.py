"""`--client-cert optional`: the ADS port's TLS is done by meshplane, because grpcio cannot ask for a
client certificate without requiring one (decision 0020).

gRPC's core can (`GRPC_SSL_REQUEST_CLIENT_CERTIFICATE_AND_VERIFY`), but grpcio's server credentials
offer two of its modes: require and verify, or never ask (`require_client_auth=False`). A client never
asked sends no certificate: one of another CA, or one claiming another namespace or the gateway `edge`,
was served as a client without one, and `/debug/syncz` said `identity: null`.

So with `optional`, `TlsFront` listens on the ADS address and does TLS with Python's ssl and
`CERT_OPTIONAL`: a certificate is asked for, a client may send none, and one that is sent must chain
to the client CA or the handshake fails (logged, counted, listed as refused; so is a handshake that
fails otherwise, such as a plaintext client's). Each connection's bytes, decrypted, are relayed to the
gRPC server on a private abstract Unix socket, from a socket bound to a random name of its own, which
gRPC reports as the stream's peer: `peer()` maps it back to the client's address and certificate, for
the identity check and the limits per address. A connection to the private socket that is not one of
ours maps to nothing, and is refused.

Connections are capped as streams are, before their handshake (each holds a file descriptor, three once
relayed, and gRPC's stream limits see none that has no stream): `--max-streams-per-peer` per client
address, and `--max-streams` in all, at most what the open-file limit leaves room for (`caps`). One over
is closed at once, refused and counted like a stream: file descriptors that run out stall every accept
and fail the Kubernetes watches and file reads too.

Each connection is two asyncio protocols and no task: TLS is an `ssl.SSLObject` over memory BIOs
(asyncio's own TLS transport keeps a 256 KiB buffer per connection: 250 MB more for 1,000 proxies).
Each side writes what the other reads and stops reading while the other's write buffer is full, so a
client that does not read holds up gRPC's writes to it (and gives its push slot back) as without it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import resource
import secrets
import select
import socket
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from meshplane import credentials, listen
from meshplane.xds import adsbase, identity, limits, streams

log = structlog.get_logger(__name__)

HANDSHAKE_TIMEOUT = 10.0
READ_CHUNK = 64 * 1024
EARLY_BYTES = 256 * 1024  # read from a client before its relay to gRPC is up; then it waits
CLOSE_GRACE = 2.0
"""A side closed with bytes still to write to a peer that does not read them is aborted this long after."""
FDS_PER_CONNECTION = 3  # the client's socket, the relay's, and gRPC's end of it
GONE_S = 60.0
"""How long a relayed connection's name is remembered once it closed: a stream of it that gRPC begins
only then is let go quietly, not refused as a stranger's."""


class Refused(Protocol):
    def __call__(self, event: str, *, peer: str, code: str, reason: str, message: str) -> None:
        """A client refused by the relay: its TLS handshake failed, or a connection limit was reached."""


@dataclass(frozen=True, slots=True)
class Caps:
    """How many connections the relay holds: in all, and from one address (0: no limit); and why the total."""

    total: int
    per_peer: int
    total_by: str


def caps(client_limits: limits.Limits, open_files: int) -> Caps:
    """The relay's connection caps from the stream limits, and from `open_files` (RLIMIT_NOFILE): a quarter
    of the descriptors stays for everything else (watches, files, the HTTP and plaintext ports)."""
    by_files = (open_files - open_files // 4) // FDS_PER_CONNECTION if open_files > 0 else 0
    if by_files and (not client_limits.streams or by_files < client_limits.streams):
        return Caps(by_files, client_limits.streams_per_peer,
                    f"{FDS_PER_CONNECTION} file descriptors each, within the open-file limit of {open_files} "
                    "(ulimit -n)")
    return Caps(client_limits.streams, client_limits.streams_per_peer, "--max-streams")


class TlsFront:
    """The ADS port's TLS listener; gRPC serves `grpc_address`, where only this relays to."""

    def __init__(self, server_tls: credentials.ServerTls, *, client_limits: limits.Limits,
                 on_refused: Refused) -> None:
        self.tls = server_tls
        self.on_refused = on_refused
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.caps = caps(client_limits, 0 if soft == resource.RLIM_INFINITY else soft)
        self.name = f"meshplane-ads-{os.getpid()}-{secrets.token_hex(8)}"
        self.grpc_address = f"unix-abstract:{self.name}"
        self.peers: dict[str, identity.Peer] = {}  # gRPC's peer string of a relayed connection -> its client
        self.gone: collections.OrderedDict[str, float] = collections.OrderedDict()  # closed lately -> when
        self.clients: set[_Client] = set()
        self.by_address: dict[str, int] = {}
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

    def close(self) -> None:
        """Take no new connection (the ones relayed go on until `stop`): first, when the server stops."""
        for server in self._servers:
            server.close()

    async def stop(self) -> None:
        self.close()
        for task in list(self.connecting):
            task.cancel()
        await asyncio.gather(*self.connecting, return_exceptions=True)
        for client in list(self.clients):
            client.close(abort=True)
        for server in self._servers:
            await server.wait_closed()
        self._servers = []

    def peer(self, grpc_peer: str, auth: Mapping[str, Sequence[bytes]]) -> identity.Peer | adsbase.Gone | None:
        """Who a stream's client is: through the relay, its own address and certificate; on another
        port of the server (`--ads-plaintext`), as gRPC says; GONE: a relayed connection that closed
        before its stream began; None: a connection to the relay's socket that the relay did not make."""
        if grpc_peer.startswith("unix"):
            found = self.peers.get(grpc_peer)
            return adsbase.GONE if found is None and grpc_peer in self.gone else found
        return identity.from_grpc(grpc_peer, auth)

    def admit(self, client: _Client, address: str) -> tuple[str, str] | None:
        """Count a new connection in, or why not (reason, message) when a cap is reached."""
        total, per_peer = len(self.clients), self.by_address.get(address, 0)
        if self.caps.total and total >= self.caps.total:
            return "connections", f"{total} TLS connections open; at most {self.caps.total} ({self.caps.total_by})"
        if self.caps.per_peer and per_peer >= self.caps.per_peer:
            return "connections_per_peer", (f"{per_peer} TLS connections open from {address}; at most "
                                            f"{self.caps.per_peer} per address (--max-streams-per-peer)")
        self.clients.add(client)
        self.by_address[address] = per_peer + 1
        return None

    def left(self, client: _Client, address: str) -> None:
        if client in self.clients:
            self.clients.discard(client)
            left = self.by_address.pop(address, 1) - 1
            if left > 0:
                self.by_address[address] = left

    def closed(self, name: str) -> None:
        """A relayed connection's name, let go: its stream, if gRPC begins it now, is not a stranger's."""
        grpc_peer = f"unix-abstract:{name}"
        if self.peers.pop(grpc_peer, None) is None:
            return
        now = time.monotonic()
        self.gone[grpc_peer] = now
        while self.gone and (len(self.gone) > max(self.caps.total, 1000)
                             or next(iter(self.gone.values())) < now - GONE_S):
            self.gone.popitem(last=False)


class _Client(asyncio.Protocol):
    """One client's TCP connection: its TLS, then its bytes relayed to gRPC and back."""

    def __init__(self, front: TlsFront) -> None:
        self._front = front
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = front.tls.context().wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._transport: asyncio.Transport | None = None
        self._inner: asyncio.Transport | None = None
        self._peer = ""
        self._address = ""
        self._name = ""  # the relay socket's, once the handshake is done
        self._handshaken = False
        self._closed = False
        self._first = b""  # the connection's first bytes: what a failed handshake was sent
        self._early: list[bytes] = []
        self._early_bytes = 0
        self._paused: set[str] = set()  # why the client's reading is paused: "early", "grpc"
        self._timer: asyncio.TimerHandle | None = None
        self._hangup: asyncio.TimerHandle | None = None  # looks for gRPC's end while its side is not read

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._peer = _grpc_peer(transport.get_extra_info("peername"))
        self._address = streams.peer_address(self._peer)
        over = self._front.admit(self, self._address)
        if over is not None:
            self._closed = True
            transport.abort()
            reason, message = over
            self._front.on_refused("TLS connection refused", peer=self._peer, code="RESOURCE_EXHAUSTED",
                                   reason=reason, message=message)
            return
        self._timer = asyncio.get_running_loop().call_later(HANDSHAKE_TIMEOUT, self._too_slow)

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        if not self._handshaken and len(self._first) < 16:
            self._first += data[:16 - len(self._first)]
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
            self._refused("certificate", f"client certificate not accepted: {exc.verify_message}")
            return False
        except (ssl.SSLError, OSError) as exc:  # not TLS, or TLS gone wrong
            self._flush()
            self.close(abort=True)
            self._refused("handshake", _why(exc, self._first))
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

    def _refused(self, reason: str, message: str) -> None:
        self._front.on_refused("TLS handshake refused", peer=self._peer, code="UNAVAILABLE", reason=reason,
                               message=message)

    async def _connect(self) -> None:
        inner: socket.socket | None = None
        try:
            inner = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # EMFILE, when descriptors run out
            inner.bind(f"\0{self._name}")
            inner.setblocking(False)
            await asyncio.get_running_loop().sock_connect(inner, f"\0{self._front.name}")
            await asyncio.get_running_loop().create_unix_connection(lambda: _Grpc(self), sock=inner)
        except asyncio.CancelledError:  # stopping
            if inner is not None:
                inner.close()
            self.close(abort=True)
            raise
        except Exception as exc:  # whatever it is, the client must not be left open with no relay and no timer
            if inner is not None:
                inner.close()
            self.close(abort=True)
            log.error("cannot relay an ADS connection to gRPC; closed it", peer=self._peer,
                      error=str(exc) or type(exc).__name__)

    def attach(self, inner: asyncio.Transport) -> None:
        """The relay to gRPC is up: what the client sent meanwhile goes first."""
        if self._closed:
            inner.close()
            return
        self._inner = inner
        early, self._early = self._early, []
        for data in early:
            inner.write(data)  # may pause the client's reading for gRPC ("grpc"): that pause stays
        self._resume("early")

    def _to_grpc(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.write(data)
            return
        self._early.append(data)
        self._early_bytes += len(data)
        if self._early_bytes >= EARLY_BYTES:
            self._pause("early")

    def _pause(self, why: str) -> None:
        if not self._paused and self._transport is not None:
            self._transport.pause_reading()
        self._paused.add(why)

    def _resume(self, why: str) -> None:
        """Read the client again once nothing holds it: asyncio says pause_writing once, so a pause undone
        for another reason would be lost for good."""
        if why in self._paused:
            self._paused.discard(why)
            if not self._paused and self._transport is not None:
                self._transport.resume_reading()

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
        self.close(abort=True)
        self._refused("handshake", f"no TLS handshake within {HANDSHAKE_TIMEOUT:g} s")

    def eof_received(self) -> bool:
        self.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()
        self._front.left(self, self._address)

    def pause_writing(self) -> None:  # the client does not take what gRPC writes: gRPC's writes wait
        if self._inner is not None:
            self._inner.pause_reading()
            self._look_for_grpc_gone()

    def resume_writing(self) -> None:
        if self._hangup is not None:
            self._hangup.cancel()
            self._hangup = None
        if self._inner is not None:
            self._inner.resume_reading()

    def _look_for_grpc_gone(self) -> None:
        """While gRPC's side is not read, its end is not seen either (a connection gRPC ended for its age, or
        for keepalives its client never answered): looked for every CLOSE_GRACE, without reading."""
        self._hangup = asyncio.get_running_loop().call_later(CLOSE_GRACE, self._grpc_gone)

    def _grpc_gone(self) -> None:
        self._hangup = None
        sock = self._inner.get_extra_info("socket") if self._inner is not None else None
        if self._closed or sock is None:
            return
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLRDHUP | select.POLLHUP)
        if poller.poll(0):
            self.close()  # what the client has not read yet gets CLOSE_GRACE more
        else:
            self._look_for_grpc_gone()

    def pause_grpc_reading(self) -> None:  # gRPC does not take what the client sends
        self._pause("grpc")

    def resume_grpc_reading(self) -> None:
        self._resume("grpc")

    def close(self, *, abort: bool = False) -> None:
        """End both sides; what each sent last still reaches the other, unless `abort`, within CLOSE_GRACE."""
        for timer in (self._timer, self._hangup):
            if timer is not None:
                timer.cancel()
        if not self._closed:
            self._closed = True
            self._front.closed(self._name)  # before its name can be bound again
            if self._handshaken and not abort:
                with contextlib.suppress(ssl.SSLError):
                    self._tls.unwrap()  # our close_notify; the client's is not waited for
                self._flush()
        for transport in (self._inner, self._transport):
            if transport is None:
                continue
            if abort:
                transport.abort()
            elif not transport.is_closing():
                transport.close()  # waits for its write buffer to drain: a peer that does not read would hold it
                if transport.get_write_buffer_size():
                    asyncio.get_running_loop().call_later(CLOSE_GRACE, transport.abort)


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


def _why(exc: Exception, first: bytes) -> str:
    """A failed handshake as an operator reads it: a plaintext gRPC client said as such."""
    if first.startswith(b"PRI * HTTP/2"):
        return ("not TLS: the client speaks plaintext HTTP/2 (gRPC without TLS: give it TLS for this port, "
                "or have it use --ads-plaintext)")
    if first[:4] in (b"GET ", b"POST", b"HEAD", b"PUT "):
        return "not TLS: the client speaks plaintext HTTP/1"
    reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
    return f"TLS handshake failed: {reason}"


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
