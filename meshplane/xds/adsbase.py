"""What the two ADS protocol servers share (docs/architecture.md, layer 4): a stream's life (a reader
task applying requests, a writer composing from the current view when woken), the first request's
node, push slots for heavy pushes, and the rules both follow for what a stream holds.

`sotw.SotwServer` (`StreamAggregatedResources`) and `delta.DeltaServer`
(`DeltaAggregatedResources`) each say only how a request is applied and
how a push is composed. Both serve the same views, from the same encoded
resources and content versions, on the same gRPC port.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc
import structlog

from meshplane.xds import cache, identity, proxy, refusals, resources, slots, streams, typeurls, wire
from meshplane.xds.limits import Limits as Limits  # re-exported: it lives where the command line reads it without gRPC

log = structlog.get_logger(__name__)

SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"

LIGHT_NAMES = 64
"""A push naming at most this many endpoint assignments (or routes) is light: it skips the
push slots. One changed endpoint's push to a thousand proxies is a thousand small writes,
which go out as fast as the floor's; waiting in line for slots would double its time."""


DEFAULTS = Limits()


class Gone:
    """A connection of ours that closed before gRPC began its stream: nobody to serve, nothing to refuse."""


GONE = Gone()

Peers = Callable[[str, Mapping[str, Sequence[bytes]]], identity.Peer | Gone | None]
"""gRPC's peer string and auth context -> who the client is (None: no client of ours; refused)."""


class Refusal(Exception):
    """Ends a stream with a status other than INVALID_ARGUMENT (a bad request is a plain message)."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str, *, node: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.node = node  # the node id the request claimed, when the refusal is of its first request


class StreamServer:
    """One ADS method: a stream per client, read by one task and written by another."""

    METHOD = ""
    PROTOCOL = ""
    CONTROL_PLANE_FIELD = resources.CONTROL_PLANE  # where a response names the control plane

    def __init__(
        self,
        views: cache.Views,
        *,
        registry: streams.Registry,
        callbacks: streams.Callbacks,
        push_slots: slots.PushSlots,
        identifier: str = "meshplane",
        trust_domain: str = "cluster.local",
        limits: Limits = DEFAULTS,
        refused: refusals.Refusals | None = None,
        peers: Peers = identity.from_grpc,
    ) -> None:
        self._peers = peers
        self._trust_domain = trust_domain
        self.refused = refused if refused is not None else refusals.Refusals()
        self.limits = limits
        self._views = views
        self._registry = registry
        self._callbacks = callbacks
        self._slots = push_slots
        self._control_plane = resources.control_plane_field(identifier, field_number=self.CONTROL_PLANE_FIELD)

    def rpc_handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                self.METHOD: grpc.stream_stream_rpc_method_handler(
                    self._serve, request_deserializer=_identity, response_serializer=_identity,
                )
            },
        )

    # to be said by each protocol

    def _on_raw(self, stream: streams.Stream, raw: bytes) -> str | None:
        """Apply one request (still encoded) to the stream's state; an error message if the stream must end."""
        raise NotImplementedError

    def _compose(self, stream: streams.Stream) -> list[bytes]:
        """Responses that bring the stream up to its view now."""
        raise NotImplementedError

    # shared

    def _take_dirty(self, stream: streams.Stream) -> dict[str, streams.Dirty]:
        """What changed since the stream's last push, taken (the stream is clean again); the push's
        queueing time is counted from the oldest of it."""
        dirty, stream.dirty = stream.dirty, {}
        if stream.dirty_since is not None:
            self._callbacks.push_started(stream, time.monotonic() - stream.dirty_since)
            stream.dirty_since = None
        return dirty

    async def _serve(self, requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """One stream, from its first request to its status. `requests` is left alone (see _read)."""
        client = self._peers(context.peer(), context.auth_context())
        if isinstance(client, Gone):  # the relay's client left as its stream began (meshplane/tlsfront.py)
            return
        refusal = self._too_many(client.address) if client is not None else Refusal(
            grpc.StatusCode.PERMISSION_DENIED, "not a connection of the ADS port's TLS listener", "identity")
        if refusal is not None:
            self.refused.refuse("xDS client refused", callbacks=self._callbacks,
                                peer=client.address if client else context.peer(), code=refusal.code.name,
                                reason=refusal.reason, message=str(refusal))
            _end(context, refusal.code, str(refusal))
            return
        assert client is not None  # a connection that is no client of ours was refused above
        stream = self._registry.open_stream(client.address, protocol=self.PROTOCOL,
                                            on_stall=self._callbacks.write_stalled)
        stream.identity, stream.certificate_asked = client.spiffe_id, client.certificate_asked
        reader = asyncio.create_task(self._read(stream, context), name=f"ads-read-{stream.id}")
        reader.add_done_callback(lambda _: stream.wake.set())  # the writer wakes to end, too
        ending: tuple[grpc.StatusCode, str] | None = None
        try:
            while True:
                await stream.wake.wait()
                if reader.done():
                    break
                stream.wake.clear()
                if self._registry.serving:  # else held: open() wakes it, the dirty types kept
                    await self._push(stream, context)
            ending = reader.result()  # a refusal, or a protocol error from the reader
        except Exception:
            if not context.done():
                raise
            # The client went away while we were writing to it: nothing to report.
        finally:
            reader.cancel()
            self._registry.close_stream(stream)
            # Let go of the watch: it calls back into the stream (stream.mark), a cycle that would keep the
            # stream, its view and what it held (a node of 60 KB, say) until a full collection.
            watch, stream.watch = stream.watch, None
            if watch is not None:
                watch.close()
                self._callbacks.stream_closed(stream)
        if ending is not None:
            # Here, not in the reader: only this task sends on the stream. A status sent by the reader
            # while a write was in flight was lost (found by tests/test_fuzz.py), the client left hanging.
            _end(context, *ending)

    async def _push(self, stream: streams.Stream, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """Compose and write; a heavy push under a push slot (composing inside it bounds the bytes alive at once)."""
        if not heavy(stream.dirty):
            for message in self._compose(stream):
                await context.write(message)
            return
        async with self._slots.slot(stream.stalled) as slot:
            for message in self._compose(stream):
                await slot.write(context.write(message))

    async def _read(self, stream: streams.Stream,
                    context: grpc.aio.ServicerContext[Any, Any]) -> tuple[grpc.StatusCode, str] | None:
        """Apply requests until the client half-closes (None), or one must end the stream (its status).

        Read with `context.read()`, not by iterating gRPC's request iterator: that is an async generator
        holding the last message it yielded, in a reference cycle with gRPC's receiver, so only the cyclic
        collector frees it (in two passes: an unfinished async generator is first closed on the loop), and
        after gc_tuning.tune_gc a quiet server may not collect for hours. Each stream refused for its request
        kept that request's bytes (docs/benchmarks.md, "Refused streams and memory").
        """
        limit = self.limits.request_bytes
        while (raw := await context.read()) is not grpc.aio.EOF:
            code, reason, node = grpc.StatusCode.INVALID_ARGUMENT, "bad_request", ""
            try:
                if limit and len(raw) > limit:
                    raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  f"request of {len(raw)} bytes; at most {limit} (--max-request-bytes)", "request_size")
                error = self._on_raw(stream, raw)
            except wire.BadRequest as exc:
                error = str(exc)
            except Refusal as exc:
                error, code, reason, node = str(exc), exc.code, exc.reason, exc.node
            del raw  # not held while waiting for the next: an EDS request of 1,000 names is ~100 KB
            if error is not None:
                event = "bad xDS request" if code == grpc.StatusCode.INVALID_ARGUMENT else "xDS client refused"
                self.refused.refuse(event, callbacks=self._callbacks, stream=stream, peer=stream.peer, code=code.name,
                                    reason=reason, message=error, node=stream.node_id or node,
                                    identity=stream.identity)
                return code, error
        return None

    def _too_many(self, peer: str) -> Refusal | None:
        """A refusal when the server, or this peer address, has all the streams it may."""
        limits = self.limits
        if limits.streams and len(self._registry) >= limits.streams:
            return Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"{len(self._registry)} streams open; at most {limits.streams} (--max-streams)", "streams")
        address = streams.peer_address(peer)
        if limits.streams_per_peer and (open_ := self._registry.from_address(address)) >= limits.streams_per_peer:
            return Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"{open_} streams open from {address}; at most "
                           f"{limits.streams_per_peer} per address (--max-streams-per-peer)", "streams_per_peer")
        return None

    def _check_names(self, count: int) -> None:
        if self.limits.names and count > self.limits.names:
            raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{count} resource names in one request; at most {self.limits.names} (--max-names)", "names")

    def _identify(self, stream: streams.Stream, node: Any, has_node: bool) -> str | None:
        """Classify the client from its first request's node and attach it to its view."""
        if stream.proxy is not None:
            return None
        if not has_node or not node.id:
            return f"the first {self._request_name()} on a stream must carry node (with an id)"
        size = node.ByteSize()
        if self.limits.node_bytes and size > self.limits.node_bytes:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                          f"node is {size} bytes; at most {self.limits.node_bytes} (--max-node-bytes)", "node_size",
                          node=node.id)
        try:
            claimed = proxy.classify(node)
        except proxy.InvalidNode as exc:
            return str(exc)
        try:
            identity.check(claimed, stream.identity, trust_domain=self._trust_domain,
                           certificate_asked=stream.certificate_asked)
        except identity.Denied as exc:
            raise Refusal(grpc.StatusCode.PERMISSION_DENIED, str(exc), "identity", node=claimed.id) from None
        stream.proxy = claimed
        stream.watch = self._views.watch(stream.proxy, stream.mark)
        self._callbacks.stream_opened(stream)
        return None

    def _request_name(self) -> str:
        return "DeltaDiscoveryRequest" if self.METHOD.startswith("Delta") else "DiscoveryRequest"

    def _served_type(self, stream: streams.Stream, type_url: str) -> tuple[bool, str | None]:
        """Whether `type_url` is one meshplane serves (else the request is ignored, or an error)."""
        if type_url in typeurls.PUSH_ORDER:
            self._callbacks.request_received(stream, type_url)
            return True, None
        if not type_url:
            return False, f"{self._request_name()} without type_url (ADS needs it)"
        log.info("unsupported type requested, ignoring", type_url=type_url, node=stream.node_id)
        return False, None


def heavy(dirty: Mapping[str, streams.Dirty]) -> bool:
    """Whether a push may be large: everything of a type, any full-state type (CDS and LDS
    responses carry every resource), or many names."""
    names = 0
    for type_url, changed in dirty.items():
        if changed is cache.EVERY or type_url in typeurls.FULL_STATE:
            return True
        names += len(changed)
    return names > LIGHT_NAMES


def adopt(held: cache.Held, have: cache.ResourceMap) -> bool:
    """If `held` now holds exactly the view's resources, share the view's map instead (one copy for all)."""
    mine = held.current
    if len(mine) != len(have) or any(have.get(n) is not r for n, r in mine.items()):
        return False
    held.hold(have)
    return True


def _end(context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, details: str) -> None:
    """Have the stream end with `code` and `details` when its handler returns.

    Not `context.abort()`: gRPC keeps the AbortError it raises (its RPC state's abort_exception), and the
    error's traceback holds the handler's frame, which holds the RPC state again: a reference cycle that
    keeps the stream, its reader task and gRPC's per-call objects until the collector next runs, which
    after gc_tuning.tune_gc can be thousands of streams later. Returning normally leaves no cycle.
    """
    context.set_code(code)
    context.set_details(details)


def _identity(message: bytes) -> bytes:
    return message
