"""The demo replicas: real HTTP/1.1 servers on loopback that chain through a sidecar."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from meshplane.demo.backend import Replica, ReplicaServer, http_get, http_request
from meshplane.demo.ports import free_port


class FakeSidecar:
    """A TCP proxy standing in for the zone's Envoy: forwards every connection to `target`
    and keeps the bytes it saw, so a test can check what the replica sent."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.seen = bytearray()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()  # what the replica sees: the sidecar hung up without answering
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, tap: bool) -> None:
            try:
                while data := await src.read(65536):
                    if tap:
                        self.seen += data
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        tasks = [asyncio.create_task(pipe(reader, up_writer, True)),
                 asyncio.create_task(pipe(up_reader, writer, False))]
        self._tasks.update(tasks)
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.difference_update(tasks)


def replica(service: str, *, next_service: str | None = None,
            sidecar_port: int | None = None) -> Replica:
    return Replica(service=service, zone="z1", region="r1", cluster="c1", port=free_port(),
                   next_service=next_service, sidecar_port=sidecar_port)


@pytest.fixture
async def chain() -> AsyncIterator[tuple[ReplicaServer, ReplicaServer, FakeSidecar]]:
    """a -> (fake sidecar) -> b."""
    b = ReplicaServer(replica("b"))
    sidecar = FakeSidecar(b.replica.port)
    await sidecar.start()
    a = ReplicaServer(replica("a", next_service="b", sidecar_port=sidecar.port))
    await b.start()
    await a.start()
    yield a, b, sidecar
    await a.stop()
    await b.stop()
    await sidecar.stop()


@pytest.fixture
async def loop_errors() -> list[dict[str, object]]:
    """What the event loop reports as unhandled (e.g. a handler task dying badly)."""
    errors: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    return errors


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """A raw response reader independent of the code under test."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip()
               for k, _, v in (line.partition(":") for line in head[1:] if line)}
    body = await reader.readexactly(int(headers["content-length"]))
    return int(head[0].split()[1]), headers, body


async def test_chain_answers_with_every_hop(
    chain: tuple[ReplicaServer, ReplicaServer, FakeSidecar],
) -> None:
    a, _, sidecar = chain
    status, headers, body = await http_request(a.replica.port, "a")
    assert (status, body) == (200, "a@z1 -> b@z1")
    assert headers["x-served-by"] == "a@z1"
    # a called b through the sidecar, naming the service in the Host header.
    assert b"Host: b\r\n" in bytes(sidecar.seen)


async def test_leaf_answers_with_its_zone() -> None:
    async with ReplicaServer(replica("c")) as c:
        assert await http_get(c.replica.port, "c", "/any/path?x=1") == (200, "c@z1")


async def test_stopped_replica_refuses_connections_and_restarts(
    chain: tuple[ReplicaServer, ReplicaServer, FakeSidecar],
) -> None:
    a, b, _ = chain
    await b.stop()
    assert not b.running
    with pytest.raises(ConnectionRefusedError):
        await http_get(b.replica.port, "b")
    # The caller reports which hop failed and answers 502, as the S1 trace expects.
    status, body = await http_get(a.replica.port, "a")
    assert status == 502
    assert body.startswith("a@z1 -> !b ")

    await b.start()
    assert b.running
    assert await http_get(a.replica.port, "a") == (200, "a@z1 -> b@z1")


async def test_stop_cuts_open_keepalive_connections(
    loop_errors: list[dict[str, object]],
) -> None:
    """Envoy pools upstream connections: a broken replica must not keep serving on them."""
    server = ReplicaServer(replica("c"))
    await server.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.replica.port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: c\r\n\r\n")
        status, headers, _ = await read_response(reader)
        assert status == 200
        assert headers["connection"] == "keep-alive"
        await server.stop()
        # Closed from the server side: EOF (or a reset), within the timeout.
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), timeout=3) == b""
    finally:
        writer.close()
        await server.stop()
    assert loop_errors == []


async def test_keepalive_serves_several_requests_on_one_connection() -> None:
    async with ReplicaServer(replica("c")) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.replica.port)
        try:
            # A Content-Length body must be consumed, or the next request would be garbled.
            writer.write(b"POST /x HTTP/1.1\r\nHost: c\r\nContent-Length: 5\r\n\r\nhello")
            assert (await read_response(reader))[::2] == (200, b"c@z1")
            writer.write(b"GET /y HTTP/1.1\r\nHost: c\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
            assert (await read_response(reader))[::2] == (200, b"c@z1")
            writer.write(b"GET /z HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n")
            status, headers, _ = await read_response(reader)
            assert (status, headers["connection"]) == (200, "close")
            assert await asyncio.wait_for(reader.read(), timeout=3) == b""
        finally:
            writer.close()


async def test_http10_closes_and_garbage_gets_400() -> None:
    async with ReplicaServer(replica("c")) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.replica.port)
        writer.write(b"GET / HTTP/1.0\r\n\r\n")
        assert (await read_response(reader))[0] == 200
        assert await asyncio.wait_for(reader.read(), timeout=3) == b""
        writer.close()

        reader, writer = await asyncio.open_connection("127.0.0.1", server.replica.port)
        writer.write(b"NONSENSE\r\n\r\n")
        assert (await read_response(reader))[0] == 400
        writer.close()


async def test_replica_without_sidecar_reports_it() -> None:
    async with ReplicaServer(replica("a", next_service="b")) as a:
        assert await http_get(a.replica.port, "a") == (502, "a@z1 -> !b no sidecar")


async def test_http_get_raises_os_errors_on_garbled_response() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"not http at all\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    try:
        with pytest.raises(ConnectionError):
            await http_get(server.sockets[0].getsockname()[1], "x")
    finally:
        server.close()
        await server.wait_closed()


async def test_stop_during_a_slow_call_is_prompt_and_quiet(
    loop_errors: list[dict[str, object]],
) -> None:
    """Breaking a replica while it waits on its next hop must not wait for that call."""
    called = asyncio.Event()

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        called.set()
        await reader.read()  # never answers; returns when the caller hangs up
        writer.close()

    stuck = await asyncio.start_server(hang, "127.0.0.1", 0)
    a = ReplicaServer(replica("a", next_service="b",
                              sidecar_port=stuck.sockets[0].getsockname()[1]))
    await a.start()
    try:
        request = asyncio.create_task(http_get(a.replica.port, "a", timeout=10))
        await asyncio.wait_for(called.wait(), timeout=3)
        await asyncio.wait_for(a.stop(), timeout=1)
        with pytest.raises(ConnectionError):
            await request
    finally:
        await a.stop()
        stuck.close()
        await stuck.wait_closed()
    assert loop_errors == []
