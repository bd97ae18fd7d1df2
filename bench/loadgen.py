"""Simulated proxies speaking real ADS over gRPC, the way Envoy does, in worker processes.

Each proxy opens one StreamAggregatedResources stream with a node (id, locality, metadata
listener_port), asks for CDS by wildcard, ACKs it, asks for EDS by the name of every cluster it
received, and ACKs every response by echoing its version_info and nonce with its subscribed
names (as Envoy does: an EDS ACK carries the whole subscription). It subscribes to nothing
else: the benchmarks measure the CDS/EDS path. With `protocol="delta"` it opens a
DeltaAggregatedResources stream instead: CDS by wildcard, EDS subscribed and unsubscribed
name by name as clusters come and go, every response ACKed by its nonce.

P worker processes (spawned, so none shares the coordinator's or the server's GIL) each run
one asyncio loop holding N/P proxies, one gRPC channel (one TCP connection) per 50 streams.
Each proxy notes time.monotonic() just before it writes an ACK; CLOCK_MONOTONIC is one
clock for every process on Linux, so the coordinator compares those times with its own.

The hot path never parses a response with protobuf: it walks the wire format for the four
fields it needs (version_info, type_url, nonce, and the name that is field 1 of each
resource) and writes requests assembled from cached bytes. A proxy's own cost per response
is then a few microseconds plus gRPC's, so the generator can keep thousands of streams
busy on one core.

The coordinator drives workers over a Pipe: connect (returns when every proxy holds a
full, ACKed config), mark (start recording ACKs), collect (each proxy's first ACK of a type
after a time, optionally of a named resource), stop.

    .venv/bin/python -m bench.loadgen --target 127.0.0.1:18000 --proxies 1000 --localities 8
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import multiprocessing
import multiprocessing.connection
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

ADS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
DELTA_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
PROTOCOLS = ("sotw", "delta")
CDS = b"type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = b"type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
KINDS = {"cds": CDS, "eds": EDS}
CACHE_MIN_RESOURCES, CACHE_ENTRIES = 16, 64
RETRY_INITIAL, RETRY_MAX = 0.5, 30.0  # Envoy's xDS stream back-off (GrpcStream), seconds
CHANNEL_OPTIONS = [
    # Channels with equal arguments share one subchannel (one TCP connection) in gRPC core:
    # a local pool per channel makes each channel its own connection, like separate proxies.
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_receive_message_length", -1),  # 10,000 clusters in one CDS response exceed the 4 MB default
    ("grpc.max_send_message_length", -1),
]
Locality = tuple[str, str, str]


# --------------------------------------------------------------------------- wire format


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _skip(buf: bytes, pos: int, wire_type: int) -> int:
    if wire_type == 0:
        return _varint(buf, pos)[1]
    if wire_type == 2:
        length, pos = _varint(buf, pos)
        return pos + length
    if wire_type == 1:
        return pos + 8
    if wire_type == 5:
        return pos + 4
    raise ValueError(f"unsupported wire type {wire_type}")


def _resource_name(buf: bytes, pos: int, end: int) -> bytes:
    """Field 1 of the message inside a google.protobuf.Any: Cluster.name, ClusterLoadAssignment.cluster_name."""
    while pos < end:
        key, pos = _varint(buf, pos)
        if key == 0x12:  # Any.value
            length, pos = _varint(buf, pos)
            inner_end = pos + length
            while pos < inner_end:
                key, pos = _varint(buf, pos)
                if key == 0x0A:
                    length, pos = _varint(buf, pos)
                    return buf[pos:pos + length]
                pos = _skip(buf, pos, key & 7)
            return b""
        pos = _skip(buf, pos, key & 7)
    return b""


def decode_response(buf: bytes, cache: dict[bytes, list[bytes]] | None = None) -> tuple[bytes, bytes, bytes,
                                                                                       list[bytes]]:
    """(version_info, type_url, nonce, resource names) of a serialised DiscoveryResponse.

    With a cache, the names of a run of many resources are looked up by the run's bytes: a
    server sends the same resources to every proxy of a view, and hashing them is several times
    cheaper than walking each one for its name.
    """
    version = type_url = nonce = b""
    spans = []
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        if key & 7 != 2:
            pos = _skip(buf, pos, key & 7)
            continue
        length, pos = _varint(buf, pos)
        number = key >> 3
        if number == 2:
            spans.append((pos, pos + length))
        elif number == 1:
            version = buf[pos:pos + length]
        elif number == 4:
            type_url = buf[pos:pos + length]
        elif number == 5:
            nonce = buf[pos:pos + length]
        pos += length
    if cache is None or len(spans) < CACHE_MIN_RESOURCES:
        return version, type_url, nonce, [_resource_name(buf, s, e) for s, e in spans]
    run = buf[spans[0][0]:spans[-1][1]]  # resources are consecutive fields
    names = cache.get(run)
    if names is None:
        if len(cache) >= CACHE_ENTRIES:
            cache.clear()
        names = cache[run] = [_resource_name(buf, s, e) for s, e in spans]
    return version, type_url, nonce, names


def decode_delta_response(buf: bytes) -> tuple[bytes, bytes, list[bytes], list[bytes]]:
    """(type_url, nonce, names of the resources sent, names removed) of a serialised DeltaDiscoveryResponse."""
    type_url = nonce = b""
    names: list[bytes] = []
    removed: list[bytes] = []
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        if key & 7 != 2:
            pos = _skip(buf, pos, key & 7)
            continue
        length, pos = _varint(buf, pos)
        number = key >> 3
        if number == 2:  # a Resource: its name is field 3, beside (not inside) the Any
            inner, inner_end = pos, pos + length
            while inner < inner_end:
                ikey, inner = _varint(buf, inner)
                if ikey == 0x1A:
                    n, inner = _varint(buf, inner)
                    names.append(buf[inner:inner + n])
                    break
                inner = _skip(buf, inner, ikey & 7)
        elif number == 4:
            type_url = buf[pos:pos + length]
        elif number == 5:
            nonce = buf[pos:pos + length]
        elif number == 6:
            removed.append(buf[pos:pos + length])
        pos += length
    return type_url, nonce, names, removed


def delta_request(type_url: bytes, *, subscribe: bytes = b"", unsubscribe: bytes = b"", nonce: bytes = b"",
                  node: bytes = b"") -> bytes:
    """A serialised DeltaDiscoveryRequest; `subscribe` / `unsubscribe` are already encoded name fields."""
    return b"".join((node, _ld(2, type_url), subscribe, unsubscribe, _ld(6, nonce) if nonce else b""))


def _ld(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return _encode_varint(number << 3 | 2) + _encode_varint(len(payload)) + payload


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if not value:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def request(type_url: bytes, *, version: bytes = b"", nonce: bytes = b"", names: bytes = b"",
            node: bytes = b"") -> bytes:
    """A serialised DiscoveryRequest; `names` is the already encoded resource_names fields."""
    return b"".join((_ld(1, version) if version else b"", node, names, _ld(4, type_url),
                     _ld(5, nonce) if nonce else b""))


def node_field(node_id: str, locality: Locality, listener_port: int, *, number: int = 2) -> bytes:
    """DiscoveryRequest.node (field 2; DeltaDiscoveryRequest's is field 1), serialised once per proxy."""
    from envoy.config.core.v3 import base_pb2
    from google.protobuf import struct_pb2

    meta = struct_pb2.Struct()
    meta.update({"listener_port": listener_port})
    region, zone, sub_zone = locality
    msg = base_pb2.Node(id=node_id, cluster="bench", metadata=meta,
                        locality=base_pb2.Locality(region=region, zone=zone, sub_zone=sub_zone))
    return _ld(number, msg.SerializeToString())


# --------------------------------------------------------------------------- one worker process


@dataclass(slots=True)
class Waiter:
    kind: str
    since: float
    name: bytes | None
    remaining: set[int]
    times: dict[int, float]
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def offer(self, index: int, kind: str, t: float, names: Any) -> None:
        if kind != self.kind or t < self.since or index not in self.remaining:
            return
        if self.name is not None and self.name not in names:
            return
        self.remaining.discard(index)
        self.times[index] = t
        if not self.remaining:
            self.done.set()


class Proxy:
    __slots__ = ("cds_names", "eds_nonce", "eds_version", "error", "events", "failures", "full_at", "index",
                 "missing", "node", "started", "worker")

    def __init__(self, worker: Worker, index: int, node: bytes) -> None:
        self.worker = worker
        self.index = index
        self.node = node
        self.started: float | None = None
        self.full_at: float | None = None
        self.cds_names: frozenset[bytes] | None = None
        self.missing: set[bytes] = set()
        self.eds_version = self.eds_nonce = b""
        self.events: list[tuple[str, float, bytes, Any]] = []
        self.error = ""  # the last stream failure
        self.failures = 0

    async def run(self, channel: grpc.aio.Channel) -> None:
        """Hold a stream open; when it fails, open another after Envoy's jittered exponential back-off."""
        self.started = time.monotonic()
        backoff = RETRY_INITIAL
        while True:
            try:
                await self._stream(channel)
            except grpc.aio.AioRpcError as exc:
                self.error = f"{exc.code().name}: {exc.details()}"
            self.failures += 1
            self.worker.failures += 1
            # Envoy's GrpcStream: a random delay below 0.5 s, doubling up to 30 s, until a stream works.
            await asyncio.sleep(random.uniform(0, backoff))
            backoff = min(backoff * 2, RETRY_MAX)

    async def _stream_delta(self, channel: grpc.aio.Channel) -> None:
        worker = self.worker
        call = channel.stream_stream(DELTA_METHOD)()
        self.cds_names = None
        self.missing = set()
        try:
            await call.write(delta_request(CDS, node=self.node))  # a first request naming nothing: wildcard
            while True:
                message = await call.read()
                if message is grpc.aio.EOF:
                    self.error = "stream closed by the server"
                    return
                type_url, nonce, names, removed = decode_delta_response(message)
                t = time.monotonic()
                await call.write(delta_request(type_url, nonce=nonce))  # the ACK
                if type_url == CDS:
                    before = self.cds_names or frozenset()
                    now = worker.intern([*(before - set(removed)), *names])
                    worker.acked(self, "cds", t, nonce, names)
                    added, gone = now - before, before - now
                    self.cds_names = now
                    self.missing = (self.missing | added) - gone
                    if added or gone:
                        await call.write(delta_request(
                            EDS, subscribe=worker.names_block(frozenset(added)),
                            unsubscribe=b"".join(_ld(4, n) for n in sorted(gone))))
                elif type_url == EDS:
                    worker.acked(self, "eds", t, nonce, names)
                    if self.missing:
                        self.missing.difference_update(names)
                    if self.full_at is None and not self.missing and self.cds_names is not None:
                        self.full_at = t
                        worker.offer(self.index, "full", t, ())
        finally:
            call.cancel()

    async def _stream(self, channel: grpc.aio.Channel) -> None:
        worker = self.worker
        if worker.protocol == "delta":
            return await self._stream_delta(channel)
        call = channel.stream_stream(ADS_METHOD)()  # no (de)serialisers: bytes in, bytes out
        # A new stream starts from nothing, as a restarted proxy does.
        self.cds_names = None
        self.missing = set()
        self.eds_version = self.eds_nonce = b""
        try:
            await call.write(request(CDS, node=self.node))
            while True:
                message = await call.read()
                if message is grpc.aio.EOF:
                    self.error = "stream closed by the server"
                    return
                version, type_url, nonce, names = decode_response(message, worker.decoded)
                if type_url == CDS:
                    received = worker.intern(names)
                    t = time.monotonic()
                    await call.write(request(CDS, version=version, nonce=nonce))  # wildcard: no names
                    worker.acked(self, "cds", t, version, received)
                    if received != self.cds_names:
                        self.missing |= received - (self.cds_names or frozenset())
                        self.cds_names = received
                        await call.write(request(EDS, version=self.eds_version, nonce=self.eds_nonce,
                                                 names=worker.names_block(received)))
                elif type_url == EDS:
                    t = time.monotonic()
                    await call.write(request(EDS, version=version, nonce=nonce,
                                             names=worker.names_block(self.cds_names or frozenset())))
                    self.eds_version, self.eds_nonce = version, nonce
                    worker.acked(self, "eds", t, version, names)
                    if self.missing:
                        self.missing.difference_update(names)
                    if self.full_at is None and not self.missing:
                        self.full_at = t
                        worker.offer(self.index, "full", t, ())
        finally:
            call.cancel()


class Worker:
    """Holds this process's proxies; answers the coordinator's commands."""

    def __init__(self, target: str, nodes: Sequence[bytes], per_channel: int, protocol: str = "sotw",
                 credentials: Credentials | None = None) -> None:
        self.target = target
        self.protocol = protocol
        self.credentials = credentials
        self.proxies = [Proxy(self, i, node) for i, node in enumerate(nodes)]
        self.per_channel = per_channel
        self.channels: list[grpc.aio.Channel] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.recording = False
        self.failures = 0
        self.waiter: Waiter | None = None
        self._names: dict[frozenset[bytes], frozenset[bytes]] = {}
        self.decoded: dict[bytes, list[bytes]] = {}
        self._blocks: dict[frozenset[bytes], bytes] = {}

    # called by proxies

    def intern(self, names: list[bytes]) -> frozenset[bytes]:
        """One shared set per distinct CDS content: 1,000 proxies x 10,000 names would not fit otherwise."""
        key = frozenset(names)
        return self._names.setdefault(key, key)

    def names_block(self, names: frozenset[bytes]) -> bytes:
        block = self._blocks.get(names)
        if block is None:
            block = self._blocks[names] = b"".join(_ld(3, n) for n in sorted(names))
        return block

    def acked(self, proxy: Proxy, kind: str, t: float, version: bytes, names: Any) -> None:
        if self.recording:
            proxy.events.append((kind, t, version, names))
        self.offer(proxy.index, kind, t, names)

    def offer(self, index: int, kind: str, t: float, names: Any) -> None:
        if self.waiter is not None:
            self.waiter.offer(index, kind, t, names)

    # commands

    async def connect(self, timeout: float) -> dict[str, Any]:
        for start in range(0, len(self.proxies), self.per_channel):
            channel = (grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS) if self.credentials is None
                       else grpc.aio.secure_channel(self.target, grpc.ssl_channel_credentials(*self.credentials),
                                                    options=CHANNEL_OPTIONS))
            self.channels.append(channel)
            for proxy in self.proxies[start:start + self.per_channel]:
                self.tasks.append(asyncio.create_task(proxy.run(channel)))
        await self._wait("full", 0.0, None, timeout)
        return {"started": [p.started for p in self.proxies], "full": [p.full_at for p in self.proxies],
                "errors": [p.error for p in self.proxies if p.error], "failures": self.failures}

    def mark(self) -> float:
        for p in self.proxies:
            p.events.clear()
        self.recording = True
        return time.monotonic()

    async def collect(self, kind: str, since: float, name: bytes | None, timeout: float) -> list[float | None]:
        times: dict[int, float] = {}
        for p in self.proxies:
            for event_kind, t, _version, names in p.events:
                if event_kind == kind and t >= since and (name is None or name in names):
                    times[p.index] = t
                    break
        missing = {p.index for p in self.proxies} - times.keys()
        if missing:
            times.update(await self._wait(kind, since, name, timeout, missing))
        return [times.get(p.index) for p in self.proxies]

    async def _wait(self, kind: str, since: float, name: bytes | None, timeout: float,
                    remaining: set[int] | None = None) -> dict[int, float]:
        if remaining is None:
            remaining = {p.index for p in self.proxies if (p.full_at if kind == "full" else None) is None}
        waiter = Waiter(kind, since, name, remaining, {})
        if remaining:
            self.waiter = waiter
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter.done.wait(), timeout)
            self.waiter = None
        return waiter.times

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for channel in self.channels:
            await channel.close()

    async def serve(self, conn: multiprocessing.connection.Connection) -> None:
        loop = asyncio.get_running_loop()
        conn.send(("ready", None))
        while True:
            command, args = await loop.run_in_executor(None, conn.recv)
            if command == "connect":
                conn.send(("ok", await self.connect(**args)))
            elif command == "mark":
                conn.send(("ok", self.mark()))
            elif command == "collect":
                conn.send(("ok", await self.collect(**args)))
            elif command == "stop":
                await self.stop()
                conn.send(("ok", None))
                return
            else:
                conn.send(("error", f"unknown command {command!r}"))


Credentials = tuple[bytes, bytes, bytes]
"""TLS to the server: (the CA that signed its certificate, the client's key, the client's certificate), PEM."""


def _worker_main(conn: multiprocessing.connection.Connection, target: str, nodes: list[bytes],
                 per_channel: int, protocol: str, credentials: Credentials | None) -> None:
    asyncio.run(Worker(target, nodes, per_channel, protocol, credentials).serve(conn))


# --------------------------------------------------------------------------- the coordinator's side


class LoadGen:
    """N simulated proxies over P worker processes; proxy i is in locality i % L and on worker i % P."""

    def __init__(self, target: str, proxies: int, localities: Sequence[Locality], *, processes: int = 2,
                 per_channel: int = 50, listener_port: int = 15001, name: str = "bench",
                 protocol: str = "sotw", credentials: Credentials | None = None) -> None:
        self.target = target
        self.protocol = protocol
        self.credentials = credentials
        self.count = proxies
        self.processes = max(1, min(processes, proxies))
        self._slices = [list(range(w, proxies, self.processes)) for w in range(self.processes)]
        self._nodes = [
            [node_field(f"{name}-{i}", localities[i % len(localities)], listener_port,
                        number=1 if protocol == "delta" else 2) for i in indices]
            for indices in self._slices
        ]
        self.per_channel = per_channel
        self._conns: list[multiprocessing.connection.Connection] = []
        self._procs: list[multiprocessing.process.BaseProcess] = []

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None]

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        for nodes in self._nodes:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, daemon=True,
                               args=(child, self.target, nodes, self.per_channel, self.protocol, self.credentials))
            proc.start()
            child.close()  # so that a worker that dies is an EOFError here, not a hang
            self._conns.append(parent)
            self._procs.append(proc)
        for conn in self._conns:
            conn.recv()  # "ready": imports done, before any clock starts

    def _all(self, command: str, **args: Any) -> list[Any]:
        for conn in self._conns:  # send to all first: the workers then run in parallel
            conn.send((command, args))
        out = []
        for conn in self._conns:
            status, value = conn.recv()
            if status != "ok":
                raise RuntimeError(value)
            out.append(value)
        return out

    def _merge(self, per_worker: list[list[Any]]) -> list[Any]:
        merged: list[Any] = [None] * self.count
        for indices, values in zip(self._slices, per_worker, strict=True):
            for i, v in zip(indices, values, strict=True):
                merged[i] = v
        return merged

    def connect(self, timeout: float = 120.0) -> dict[str, Any]:
        """Open every stream at once; return when all hold a full ACKed config (or at timeout)."""
        replies = self._all("connect", timeout=timeout)
        return {
            "started": self._merge([r["started"] for r in replies]),
            "full": self._merge([r["full"] for r in replies]),
            "errors": [e for r in replies for e in r["errors"]],
            "failures": sum(r["failures"] for r in replies),
        }

    def mark(self) -> None:
        """Start recording ACKs (and forget earlier ones)."""
        self._all("mark")

    def collect(self, kind: str, since: float, *, name: str | None = None,
                timeout: float = 30.0) -> list[float | None]:
        """Per proxy, the time of its first `kind` ACK at or after `since` (of a response naming `name`)."""
        replies = self._all("collect", kind=kind, since=since, name=name.encode() if name else None,
                            timeout=timeout)
        return self._merge(replies)

    def stop(self) -> None:
        with contextlib.suppress(OSError, EOFError, RuntimeError):
            self._all("stop")
        for proc in self._procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join()
        self._conns.clear()
        self._procs.clear()

    def __enter__(self) -> LoadGen:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def connect_summary(result: dict[str, Any]) -> dict[str, Any]:
    """Time from the first stream opened to each proxy holding a full, ACKed config."""
    from bench import common

    started = [t for t in result["started"] if t is not None]
    origin = min(started) if started else 0.0
    full = [None if t is None else t - origin for t in result["full"]]
    done = [t for t in full if t is not None]
    return {"all_ms": round(max(done) * 1000, 1) if len(done) == len(full) and done else None,
            **common.latency_summary(full), "stream_failures": result["failures"],
            "proxies_with_failures": len(result["errors"]),
            "first_error": result["errors"][0] if result["errors"] else None}


def default_processes() -> int:
    """One worker per core: the server under test takes the rest of the machine when it needs it."""
    import os

    return max(1, min(4, math.ceil(len(os.sched_getaffinity(0)) / 2)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, help="HOST:PORT of an ADS server")
    parser.add_argument("--proxies", type=int, default=100)
    parser.add_argument("--localities", type=int, default=8, help="distinct proxy localities (views)")
    parser.add_argument("--processes", type=int, default=default_processes(), help="worker processes")
    parser.add_argument("--per-channel", type=int, default=50, help="streams per gRPC channel (TCP connection)")
    parser.add_argument("--hold", type=float, default=0.0, help="seconds to stay connected, counting EDS ACKs")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--protocol", choices=PROTOCOLS, default="sotw")
    args = parser.parse_args(argv)
    from bench import common

    common.stop_on_sigterm()
    localities = common.Mesh().localities(args.localities)
    with LoadGen(args.target, args.proxies, localities, processes=args.processes,
                 per_channel=args.per_channel, protocol=args.protocol) as gen:
        summary = connect_summary(gen.connect(args.timeout))
        print(f"{args.proxies} proxies: full config in {summary['all_ms']} ms (p50 {summary['p50']} ms, "
              f"p99 {summary['p99']} ms, missing {summary['missing']}, failed streams {summary['stream_failures']}: "
              f"{summary['first_error']})")
        if args.hold > 0:
            since = time.monotonic()
            gen.mark()
            time.sleep(args.hold)
            acked = gen.collect("eds", since, timeout=0)
            print(f"within {args.hold}s: {sum(t is not None for t in acked)} proxies ACKed a new EDS version")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
