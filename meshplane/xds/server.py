"""The state-of-the-world ADS server (Envoy's xds_protocol), on grpcio's asyncio API.

Each stream has two halves. The reader applies requests to the stream's
subscriptions (ACK, NACK, stale nonce, subscribe, unsubscribe) and marks
types dirty. The writer wakes on "dirty", composes responses from the
*current* view and writes them. Because the writer always composes from
the current state, any number of changes that arrive while a slow proxy is
still reading merge into one push of the newest state (latest wins), and
no queue grows. A slow proxy blocks only its own writer.

What was sent is remembered per resource, so a change is pushed only to
streams subscribed to it, a NACKed version is never re-sent (the proxy
keeps its last good config until the content changes), and a proxy that
reconnects reporting the version it already has gets no re-push.

Until the control plane is ready (every cluster listed once, or the sync
timeout), streams are held: their requests are read and recorded, nothing
is sent. Answering then would send the proxy the empty or partial views of
a control plane still syncing, and Envoy would drop the clusters it holds
(Istio refuses the stream with UNAVAILABLE instead; holding delivers the
moment the control plane is ready). The versions a reconnecting proxy
reports are compared at its first push, against the synced views.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import structlog
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory

from meshplane.discovery import model
from meshplane.xds import resources, types, views

log = structlog.get_logger(__name__)

SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"


def _names_only_class() -> Any:
    """A message with DiscoveryRequest's field 3 (resource_names) alone, built at run time."""
    proto = descriptor_pb2.FileDescriptorProto(
        name="meshplane/internal/names.proto", package="meshplane.internal", syntax="proto3"
    )
    message = proto.message_type.add(name="ResourceNames")
    message.field.add(
        name="resource_names", number=discovery_pb2.DiscoveryRequest.RESOURCE_NAMES_FIELD_NUMBER,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED,
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("meshplane.internal.ResourceNames"))


_ResourceNames = _names_only_class()


@dataclass(frozen=True, slots=True)
class Request:
    """A DiscoveryRequest and its resource_names alone, serialised.

    Every ACK repeats the names the proxy subscribes to (a thousand, for a proxy of a
    thousand services). Equal keys mean equal names, which a bytes comparison tells in
    about a microsecond; a set of the names takes some 70 us per ACK to build and compare.
    """

    message: discovery_pb2.DiscoveryRequest
    names_key: bytes


def parse_request(raw: bytes) -> Request:
    names = _ResourceNames.FromString(raw)
    names.DiscardUnknownFields()
    return Request(discovery_pb2.DiscoveryRequest.FromString(raw), names.SerializeToString())


class Callbacks(Protocol):
    """Observability hooks: metrics and logs hang off these, not off the protocol code."""

    def stream_opened(self, stream: Stream) -> None: ...
    def stream_closed(self, stream: Stream) -> None: ...
    def response_sent(self, stream: Stream, type_url: str, *, resources: int, size: int) -> None: ...
    def acked(self, stream: Stream, type_url: str, *, latency: float | None) -> None: ...
    def nacked(self, stream: Stream, type_url: str, *, version: str, detail: str) -> None: ...
    def stale_nonce(self, stream: Stream, type_url: str) -> None: ...


@dataclass(slots=True)
class Subscription:
    """One type on one stream: what the proxy asked for and what it was sent."""

    wildcard: bool = False
    names: frozenset[str] = frozenset()  # shared by the streams that ask for the same names
    # May be the view's own map, shared by every wildcard stream of the view (which keeps
    # 2,000 proxies' CDS bookkeeping at one copy): changed only through the methods below,
    # which copy a shared map before the first change.
    sent: Mapping[str, resources.Resource] = field(default_factory=dict)
    owned: bool = True
    names_key: bytes | None = None  # Request.names_key of the last request applied
    nonce: str = ""
    answered: bool = False
    # nonce -> earliest change time carried (None: nothing new to time)
    inflight: dict[str, float | None] = field(default_factory=dict)
    acked_version: str = ""
    reported: str = ""  # the version the proxy said it holds when it (re)connected: checked at the first push

    def share(self, sent: Mapping[str, resources.Resource]) -> None:
        self.sent, self.owned = sent, False

    def record(self, payload: Mapping[str, resources.Resource]) -> None:
        self._own().update(payload)

    def forget(self, names: set[str]) -> None:
        if not names.isdisjoint(self.sent):
            own = self._own()
            for name in names:
                own.pop(name, None)

    def _own(self) -> dict[str, resources.Resource]:
        if not self.owned or not isinstance(self.sent, dict):
            self.sent, self.owned = dict(self.sent), True
        assert isinstance(self.sent, dict)
        return self.sent

    def wants(self, name: str) -> bool:
        return self.wildcard or name in self.names

    def wanted(self, available: Mapping[str, resources.Resource]) -> Mapping[str, resources.Resource]:
        """What of `available` this subscription covers; for a wildcard, the view's own (never mutated) map."""
        if self.wildcard:
            return available
        return {n: available[n] for n in self.names if n in available}


class Stream:
    """One ADS stream from one proxy."""

    def __init__(self, stream_id: int, peer: str) -> None:
        self.id = stream_id
        self.peer = peer
        self.node: base_pb2.Node | None = None
        self.view: views.View | None = None
        self.subs: dict[str, Subscription] = {}
        self.dirty: dict[str, set[str] | None] = {}  # type -> names to look at (None: all)
        self.wake = asyncio.Event()
        self._nonces = itertools.count(1)

    @property
    def node_id(self) -> str:
        return self.node.id if self.node is not None else ""

    def mark(self, changes: Mapping[str, set[str] | None]) -> None:
        for type_url, names in changes.items():
            _merge_dirty(self.dirty, type_url, names)
        self.wake.set()

    def next_nonce(self) -> str:
        return str(next(self._nonces))


class AdsServer:
    """Serves views from the cache to ADS streams; told by the push loop what changed."""

    def __init__(
        self,
        cache: views.ViewCache,
        *,
        callbacks: Callbacks,
        identifier: str = "meshplane",
        max_concurrent_pushes: int = 100,
        push_slot_hold: float = 5.0,
        held: bool = False,
    ) -> None:
        self._cache = cache
        self._callbacks = callbacks
        self._control_plane = resources.control_plane_field(identifier)
        self._ids = itertools.count(1)
        self.streams: dict[int, Stream] = {}
        # At most this many streams compose and write at once (Istio's PILOT_PUSH_THROTTLE is
        # 100 too): after a restart, a storm's full configurations exist a batch at a time
        # instead of all at once. A proxy that does not read gives its slot back after
        # `push_slot_hold` seconds, so it cannot hold up the others.
        # names key -> (that key, the names): streams asking for the same names share one key
        # and one set (a thousand names cost some 80 KB; two thousand proxies need one copy).
        self._name_sets: dict[bytes, tuple[bytes, frozenset[str], bool]] = {}
        self._push_slots = asyncio.Semaphore(max_concurrent_pushes)
        self._push_slot_hold = push_slot_hold
        self.serving = not held  # held: streams are answered only after open()

    def rpc_handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                    self._serve,
                    request_deserializer=parse_request,
                    response_serializer=_identity,
                )
            },
        )

    def open(self) -> None:
        """Start answering the streams held so far (the control plane is ready)."""
        if self.serving:
            return
        self.serving = True
        for stream in self.streams.values():
            stream.wake.set()

    def notify(self, changed: Mapping[views.ViewKey, views.Changes]) -> None:
        """Wake the streams whose view changed."""
        if not changed:
            return
        for stream in self.streams.values():
            if stream.view is not None and stream.view.key in changed:
                stream.mark(changed[stream.view.key])

    def rekey(self) -> None:
        """After a policy change, move streams whose view key changed (e.g. new label keys)."""
        for stream in self.streams.values():
            if stream.node is None or stream.view is None:
                continue
            key = self._view_key(stream.node)
            if key != stream.view.key:
                self._cache.release(stream.view.key)
                stream.view = self._cache.acquire(key)
                stream.mark(dict.fromkeys(types.PUSH_ORDER))

    async def _serve(self, requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        stream = Stream(next(self._ids), context.peer())
        self.streams[stream.id] = stream
        reader = asyncio.create_task(self._read(stream, requests, context), name=f"ads-read-{stream.id}")
        reader.add_done_callback(lambda _: stream.wake.set())  # the writer wakes to end, too
        try:
            while True:
                await stream.wake.wait()
                if reader.done():
                    break
                stream.wake.clear()
                if self.serving:  # else held: open() wakes it, the dirty types kept
                    await self._push(stream, context)
            reader.result()  # surface a protocol error from the reader
        finally:
            reader.cancel()
            self.streams.pop(stream.id, None)
            if stream.view is not None:
                self._cache.release(stream.view.key)
                self._callbacks.stream_closed(stream)

    async def _push(self, stream: Stream, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """Compose and write; a heavy push under a push slot (composing inside it bounds the bytes alive at once)."""
        async with self._push_slot() if _heavy(stream.dirty) else contextlib.nullcontext():
            for message in self._compose(stream):
                await context.write(message)

    @contextlib.asynccontextmanager
    async def _push_slot(self) -> AsyncIterator[None]:
        """Hold a push slot until the block ends, or `push_slot_hold` seconds, whichever comes first."""
        await self._push_slots.acquire()
        held = True

        def give_back() -> None:
            nonlocal held
            if held:
                held = False
                self._push_slots.release()

        timer = asyncio.get_running_loop().call_later(self._push_slot_hold, give_back)
        try:
            yield
        finally:
            timer.cancel()
            give_back()

    async def _read(self, stream: Stream, requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        async for request in requests:
            error = self._on_request(stream, request)
            del request  # not held while waiting for the next: an EDS request of 1,000 names is ~100 KB
            if error is not None:
                log.warning("bad xDS request", stream=stream.id, peer=stream.peer, error=error)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error)

    def _on_request(self, stream: Stream, request: Request) -> str | None:
        req = request.message
        if stream.node is None:
            if not req.HasField("node") or not req.node.id:
                return "the first DiscoveryRequest on a stream must carry node (with an id)"
            stream.node = req.node
            stream.view = self._cache.acquire(self._view_key(req.node))
            self._callbacks.stream_opened(stream)
        type_url = req.type_url
        if type_url not in types.PUSH_ORDER:
            if not type_url:
                return "DiscoveryRequest without type_url (ADS needs it)"
            log.info("unsupported type requested, ignoring", type_url=type_url, node=stream.node_id)
            return None
        sub = stream.subs.get(type_url)
        if req.response_nonce:
            if sub is None or req.response_nonce != sub.nonce:
                self._callbacks.stale_nonce(stream, type_url)
                return None  # xds_protocol: ignore requests with a stale nonce
            self._on_reply(stream, sub, req)
        first = sub is None
        if sub is None:
            sub = stream.subs[type_url] = Subscription()
        if sub.names_key == request.names_key:
            return None  # the same names as before (an ACK or NACK): nothing new to look at
        sub.names_key, requested, explicit_wildcard = self._shared_names(request)
        look_at = _resubscribe(sub, requested, explicit_wildcard, first=first)
        if first:
            sub.reported = req.version_info
        if look_at is None or look_at:
            stream.mark({type_url: look_at})
        return None

    def _shared_names(self, request: Request) -> tuple[bytes, frozenset[str], bool]:
        entry = self._name_sets.get(request.names_key)
        if entry is None:
            names = {sys.intern(n) for n in request.message.resource_names}
            explicit_wildcard = types.WILDCARD in names
            names.discard(types.WILDCARD)
            entry = (request.names_key, frozenset(names), explicit_wildcard)
            if len(self._name_sets) > 2 * len(self.streams) + 64:
                self._name_sets = {  # keep the sets still in use
                    sub.names_key: self._name_sets[sub.names_key]
                    for stream in self.streams.values() for sub in stream.subs.values()
                    if sub.names_key is not None and sub.names_key in self._name_sets
                }
            self._name_sets[request.names_key] = entry
        return entry

    def _on_reply(self, stream: Stream, sub: Subscription, req: discovery_pb2.DiscoveryRequest) -> None:
        if req.HasField("error_detail"):
            sub.inflight.clear()
            self._callbacks.nacked(
                stream, req.type_url, version=req.version_info, detail=req.error_detail.message
            )
            return
        sub.acked_version = req.version_info
        earliest: float | None = None
        for nonce in list(sub.inflight):
            seen = sub.inflight.pop(nonce)
            if seen is not None and (earliest is None or seen < earliest):
                earliest = seen
            if nonce == req.response_nonce:
                break
        latency = None if earliest is None else time.monotonic() - earliest
        self._callbacks.acked(stream, req.type_url, latency=latency)

    def _view_key(self, node: base_pb2.Node) -> views.ViewKey:
        meta = json_format.MessageToDict(node.metadata) if node.HasField("metadata") else {}
        labels = meta.get("labels") or {}
        return self._cache.view_key(
            role=str(meta.get("role", "sidecar")),
            locality=model.Locality(
                region=node.locality.region, zone=node.locality.zone, cluster=node.locality.sub_zone
            ),
            namespace=str(meta.get("namespace", "default")),
            listener_address=str(meta.get("listener_address", "0.0.0.0")),
            listener_port=int(meta.get("listener_port", 15001)),
            labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
        )

    # composing responses

    def _compose(self, stream: Stream) -> list[bytes]:
        """Responses that bring the stream up to its view now; only dirty names are looked at."""
        view = stream.view
        if view is None:
            return []
        dirty, stream.dirty = stream.dirty, {}
        out: list[bytes] = []
        available = view.resources
        cds = stream.subs.get(types.CLUSTER)
        removed: dict[str, resources.Resource] = {}
        changed_clusters: set[str] = set()
        if cds is not None and types.CLUSTER in dirty:
            wanted = cds.wanted(available.get(types.CLUSTER, {}))
            removed = {n: r for n, r in cds.sent.items() if n not in wanted}
            changed_clusters = {n for n, r in wanted.items() if n in cds.sent and cds.sent[n].version != r.version}
            # Make before break: keep removed clusters until routes stop naming them.
            union = {**wanted, **removed} if removed else wanted
            self._respond(stream, view, types.CLUSTER, cds, union, out, whole=not removed)
        eds = stream.subs.get(types.ENDPOINT)
        if eds is not None and changed_clusters:
            # An updated cluster warms again and waits for its endpoints.
            eds.forget(changed_clusters)
            _merge_dirty(dirty, types.ENDPOINT, changed_clusters)
        for type_url in (types.ENDPOINT, types.LISTENER, types.ROUTE):
            sub = stream.subs.get(type_url)
            if sub is None or type_url not in dirty:
                continue
            have = available.get(type_url, {})
            names = dirty[type_url]
            if names is None or type_url in types.FULL_STATE:
                candidates = sub.wanted(have)
                current = len(candidates) == len(have)
            else:  # only what changed (or was re-subscribed) can need sending: O(changes), not O(subscribed)
                candidates = {n: have[n] for n in names if n in have and sub.wants(n)}
                # Current with the view's previous build, and every name that changed since is wanted.
                current = sub.sent is view.previous.get(type_url) and all(n in candidates for n in names if n in have)
            # After this push such a stream holds exactly the view's map: it shares it instead of a copy.
            self._respond(stream, view, type_url, sub, candidates, out, whole=True, now=have if current else None)
        if removed and cds is not None:
            wanted = cds.wanted(available.get(types.CLUSTER, {}))
            self._respond(stream, view, types.CLUSTER, cds, wanted, out, whole=True)
        return out

    def _respond(
        self,
        stream: Stream,
        view: views.View,
        type_url: str,
        sub: Subscription,
        candidates: Mapping[str, resources.Resource],
        out: list[bytes],
        *,
        whole: bool,
        now: Mapping[str, resources.Resource] | None = None,
    ) -> None:
        """Send what of `candidates` the stream lacks (all of it for CDS/LDS, if anything differs).

        `whole`: the candidates are the view's current state (not a transitional set), so the
        view's cached version_info applies.
        """
        updates = {n: r for n, r in candidates.items() if (s := sub.sent.get(n)) is None or s.version != r.version}
        if type_url in types.FULL_STATE:
            if not updates and candidates.keys() == sub.sent.keys() and sub.answered:
                return
            payload = candidates
        else:
            if not updates:
                return
            payload = updates
        full_view = whole and (type_url not in types.FULL_STATE or sub.wildcard
                               or len(candidates) == len(view.resources.get(type_url, {})))
        version_info = view.version(type_url) if full_view else resources.type_version(candidates.values())
        if sub.reported and not sub.answered:
            # Reconnect: if what the proxy says it holds is what we would send, it has it all already.
            reported, sub.reported = sub.reported, ""
            if reported in (version_info, resources.type_version(candidates.values())):
                sub.share(now if now is not None else candidates)
                sub.answered = True
                sub.acked_version = reported
                return
        seen = [r.seen_at for n, r in updates.items() if r.seen_at is not None and n in sub.sent]
        nonce = stream.next_nonce()
        message = resources.response(
            version_info=version_info,
            resources=payload.values(),
            type_url=type_url,
            nonce=nonce,
            control_plane=self._control_plane,
        )
        sub.nonce = nonce
        sub.answered = True
        sub.inflight[nonce] = min(seen) if seen else None
        if type_url in types.FULL_STATE:
            sub.share(candidates)
        elif now is not None:
            sub.share(now)
        else:
            sub.record(payload)
        out.append(message)
        self._callbacks.response_sent(stream, type_url, resources=len(payload), size=len(message))


LIGHT_NAMES = 64
"""A push naming at most this many endpoint assignments (or routes) is light: it skips the
push slots. One changed endpoint's push to a thousand proxies is a thousand small writes,
which go out as fast as the floor's; waiting in line for slots would double its time."""


def _heavy(dirty: Mapping[str, set[str] | None]) -> bool:
    """Whether a push may be large: everything of a type, any full-state type (CDS and LDS
    responses carry every resource), or many names."""
    names = 0
    for type_url, changed in dirty.items():
        if changed is None or type_url in types.FULL_STATE:
            return True
        names += len(changed)
    return names > LIGHT_NAMES


def _merge_dirty(dirty: dict[str, set[str] | None], type_url: str, names: set[str] | None) -> None:
    """Record names to look at; None means "look at everything of this type"."""
    if type_url in dirty and dirty[type_url] is None:
        return
    if names is None:
        dirty[type_url] = None
    else:
        current = dirty.get(type_url)
        dirty[type_url] = names if current is None else current | names


def _resubscribe(
    sub: Subscription, requested: frozenset[str], explicit_wildcard: bool, *, first: bool
) -> set[str] | None:
    """Apply a request's resource_names (xds_protocol wildcard rules) to a subscription.

    Returns the names to look at again: None for all of them (the first request, or a switch
    into or out of wildcard), else the names newly subscribed or dropped.
    """
    wildcard = sub.wildcard
    if explicit_wildcard:
        wildcard = True
    elif requested:
        wildcard = False
    elif first:
        wildcard = True  # legacy wildcard: a first request naming nothing
    changed = set(requested ^ sub.names)
    sub.forget(changed)  # (re)subscribed resources are sent even if unchanged
    whole = first or wildcard != sub.wildcard
    sub.wildcard = wildcard
    sub.names = requested
    return None if whole else changed


def _identity(message: bytes) -> bytes:
    return message
