"""The S1 demo services as real HTTP/1.1 servers on loopback.

Each replica answers with `service@zone`; a replica with a next service calls it
through the Envoy sidecar of its own zone and prepends itself, so a response
body is the trace of where every hop landed:
`mocka@cn-hangzhou-h -> mockb@cn-hangzhou-h -> mockc@cn-hangzhou-h`.

Stopping a replica closes its listening socket and every open connection, so
what its callers' Envoy sees is exactly a broken pod: connection refused for
new connections, resets on pooled ones (both local-origin failures to outlier
detection).

Written on asyncio streams so the demo needs no HTTP dependency. Only what
the demo and Envoy use is implemented: keep-alive, Content-Length and chunked
bodies, any method and path.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass

_MAX_BODY = 1 << 20  # the demo's bodies are a few bytes; refuse anything absurd
_REASONS = {200: "OK", 400: "Bad Request", 502: "Bad Gateway"}


@dataclass(frozen=True)
class Replica:
    service: str
    zone: str
    region: str
    cluster: str
    port: int
    next_service: str | None
    # The outbound listener of the Envoy sidecar in this replica's zone, through which it
    # calls next_service (with Host: next_service).
    sidecar_port: int | None
    host: str = "127.0.0.1"  # any loopback address: distinct "pod IPs" on one machine

    @property
    def name(self) -> str:
        return f"{self.service}@{self.zone}"


class _Malformed(Exception):
    """The peer sent something that is not HTTP/1.x as we speak it."""


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, dict[str, str]] | None:
    """Start line and headers (names lowercased); None on a clean EOF before any byte."""
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise _Malformed("connection closed inside the header block") from exc
    except asyncio.LimitOverrunError as exc:
        raise _Malformed("header block too large") from exc
    lines = raw.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise _Malformed(f"bad header line {line!r}")
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers


async def _read_body(
    reader: asyncio.StreamReader, headers: Mapping[str, str], *, until_eof: bool
) -> bytes:
    """The message body framed by chunked encoding, Content-Length, or (responses only) EOF."""
    try:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = bytearray()
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    # Trailers (if any) end with an empty line.
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":
                        pass
                    return bytes(body)
                if len(body) + size > _MAX_BODY:
                    raise _Malformed("body too large")
                body += await reader.readexactly(size)
                await reader.readexactly(2)  # CRLF after each chunk
        if "content-length" in headers:
            length = int(headers["content-length"])
            if not 0 <= length <= _MAX_BODY:
                raise _Malformed(f"bad content-length {length}")
            return await reader.readexactly(length)
        return await reader.read(_MAX_BODY) if until_eof else b""
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
        raise _Malformed(f"bad body: {exc}") from exc


async def http_request(
    port: int,
    host: str,
    path: str = "/",
    *,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
    timeout: float = 3,
) -> tuple[int, dict[str, str], str]:
    """One HTTP/1.1 request to 127.0.0.1:port on a new connection: (status, headers, body).

    Raises OSError (ConnectionRefusedError, ConnectionError for garbled or cut responses)
    or TimeoutError."""

    async def go() -> tuple[int, dict[str, str], str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close",
                     f"Content-Length: {len(body)}"]
            lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
            await writer.drain()
            head = await _read_head(reader)
            if head is None:
                raise _Malformed("connection closed before a response")
            status_line, resp_headers = head
            parts = status_line.split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
                raise _Malformed(f"bad status line {status_line!r}")
            resp_body = await _read_body(reader, resp_headers, until_eof=True)
            return int(parts[1]), resp_headers, resp_body.decode("utf-8", errors="replace")
        except _Malformed as exc:
            raise ConnectionError(f"bad HTTP response from 127.0.0.1:{port}: {exc}") from exc
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    return await asyncio.wait_for(go(), timeout)


async def http_get(port: int, host: str, path: str = "/", timeout: float = 3) -> tuple[int, str]:
    """GET http://127.0.0.1:{port}{path} with Host: {host}; (status, body). Used to send
    requests into an Envoy listener and by replicas to call the next service."""
    status, _, body = await http_request(port, host, path, timeout=timeout)
    return status, body


class ReplicaServer:
    """One replica: an HTTP server on 127.0.0.1:replica.port that can be broken and fixed."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self._server: asyncio.Server | None = None
        # Open connections, so stop() can cut them: a stopped replica must not keep serving
        # on connections Envoy pooled before the break.
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._cut: set[asyncio.Task[None]] = set()

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        if self._server is not None:
            return
        # reuse_address: restarting right after stop() must not fail on TIME_WAIT sockets.
        self._server = await asyncio.start_server(
            self._serve_connection, self.replica.host, self.replica.port, reuse_address=True)

    async def stop(self) -> None:
        """Close the listening socket and every open connection. Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        connections = list(self._connections.items())
        for task, writer in connections:
            writer.transport.abort()  # drop now: no graceful drain for a broken replica
            # Cancel too: a handler may be waiting (up to 3 s) on its call to the next hop.
            self._cut.add(task)
            task.cancel()
        await asyncio.gather(*(task for task, _ in connections), return_exceptions=True)
        self._cut.difference_update(task for task, _ in connections)
        await server.wait_closed()

    async def __aenter__(self) -> ReplicaServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        try:
            while await self._serve_one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the peer went away; nothing to answer
        except asyncio.CancelledError:
            # Cut by stop(): end normally, because Python 3.11's start_server callback calls
            # task.exception() on a cancelled handler and logs the CancelledError as an error.
            if task not in self._cut:
                raise
        finally:
            self._connections.pop(task, None)
            writer.close()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; return whether the connection stays open for another."""
        try:
            head = await _read_head(reader)
            if head is None:
                return False
            request_line, headers = head
            version = request_line.rsplit(" ", 1)[-1]
            if len(request_line.split(" ")) != 3 or not version.startswith("HTTP/1."):
                raise _Malformed(f"bad request line {request_line!r}")
            await _read_body(reader, headers, until_eof=False)
        except _Malformed as exc:
            await self._respond(writer, 400, f"{self.replica.name} bad request: {exc}",
                                keep_alive=False)
            return False
        connection = headers.get("connection", "").lower()
        # HTTP/1.1 is persistent unless told otherwise; HTTP/1.0 only when asked.
        keep_alive = "close" not in connection if version == "HTTP/1.1" \
            else "keep-alive" in connection
        status, body = await self._answer()
        await self._respond(writer, status, body, keep_alive=keep_alive)
        return keep_alive

    async def _answer(self) -> tuple[int, str]:
        r = self.replica
        if r.next_service is None:
            return 200, r.name
        if r.sidecar_port is None:
            return 502, f"{r.name} -> !{r.next_service} no sidecar"
        try:
            status, body = await http_get(r.sidecar_port, r.next_service)
        except (OSError, TimeoutError) as exc:
            return 502, f"{r.name} -> !{r.next_service} {type(exc).__name__}"
        if status != 200:
            return 502, f"{r.name} -> !{r.next_service} {status}"
        return 200, f"{r.name} -> {body.strip()}"

    async def _respond(
        self, writer: asyncio.StreamWriter, status: int, body: str, *, keep_alive: bool
    ) -> None:
        data = body.encode()
        head = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}",
            "Content-Type: text/plain; charset=utf-8",
            f"Content-Length: {len(data)}",
            f"x-served-by: {self.replica.name}",
            f"Connection: {'keep-alive' if keep_alive else 'close'}",
        ]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + data)
        await writer.drain()
