"""The state-of-the-world ADS server (Envoy's xds_protocol), on grpcio's asyncio API
(docs/architecture.md, layer 4). It knows the protocol and nothing of the mesh: views come
through `cache.Views`, per-stream state is `streams.Stream`.

Each stream has two halves. The reader applies requests to the stream's
subscriptions (ACK, NACK, stale nonce, subscribe, unsubscribe) and marks
types dirty; so does the view's change signal. The writer wakes on "dirty",
composes responses from the *current* view and writes them. Because the
writer always composes from the current state, any number of changes that
arrive while a slow client is still reading merge into one push of the
newest state (latest wins), and no queue grows. A slow client blocks only
its own writer, and gives back its push slot (meshplane/xds/slots.py).

A listener or cluster response also says which of the names the stream asked
for the view does not have (`resource_errors`, NOT_FOUND; xRFC TP3), at once
and whenever that set changes: gRPC's xDS client then fails fast instead of
waiting for its does-not-exist timer.

What a stream holds is remembered per resource, so a change is pushed only
to streams subscribed to it, a NACKed version is never re-sent (the client
keeps its last good config until the content changes), and a client that
reconnects reporting the version it holds gets no re-push. A response's
version_info is a hash of the names and versions the stream holds of that
type once it has the response: so a version vouches for exactly those
names, and a client that reconnects asking for more gets the rest.

Until the control plane is ready, streams are held (`streams.Registry`):
their requests are read and recorded, nothing is sent (decision 0005).
The versions a reconnecting client reports are compared at its first push,
against the synced views.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from meshplane.xds import adsbase, cache, order, resources, streams, typeurls, wire


class SotwServer(adsbase.StreamServer):
    """Serves views to state-of-the-world ADS streams (`StreamAggregatedResources`)."""

    METHOD = "StreamAggregatedResources"
    PROTOCOL = "sotw"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # names key -> (that key, the names, explicit wildcard): streams asking for the same names
        # share one key and one set (a thousand names cost some 80 KB; two thousand proxies need one copy).
        self._name_sets: dict[bytes, tuple[bytes, frozenset[str], bool]] = {}
        self._order = order.Order()

    def _on_raw(self, stream: streams.Stream, raw: bytes) -> str | None:
        return self._on_request(stream, wire.decode(raw))

    def _on_request(self, stream: streams.Stream, request: wire.Request) -> str | None:
        """Apply one request to the stream's state; an error message if the stream must end."""
        req = request.message
        error = self._identify(stream, req.node, req.HasField("node"))
        if error is not None:
            return error
        type_url = req.type_url
        served, error = self._served_type(stream, type_url)
        if not served:
            return error
        sub = stream.types.get(type_url)
        if req.response_nonce:
            if sub is None or req.response_nonce != sub.nonce:
                self._callbacks.stale_nonce(stream, type_url)
                return None  # xds_protocol: ignore requests with a stale nonce
            self._on_reply(stream, sub, req)
        first = sub is None
        if sub is None:
            sub = stream.types[type_url] = streams.TypeState()
        if sub.names_key == request.names_key:
            return None  # the same names as before (an ACK or NACK): nothing new to look at, or to check
        key, requested, explicit_wildcard = self._shared_names(request)
        sub.names_key = key
        look_at = _resubscribe(sub, requested, explicit_wildcard, first=first,
                               legacy_wildcard=type_url in typeurls.FULL_STATE)
        if first:
            sub.reported = req.version_info
        if look_at is cache.EVERY or look_at:
            stream.mark({type_url: look_at})
        return None

    def _shared_names(self, request: wire.Request) -> tuple[bytes, frozenset[str], bool]:
        entry = self._name_sets.get(request.names_key)
        if entry is None:
            decoded = request.names()
            self._check_names(len(decoded))
            names = {sys.intern(n) for n in decoded}
            explicit_wildcard = typeurls.WILDCARD in names
            names.discard(typeurls.WILDCARD)
            entry = (request.names_key, frozenset(names), explicit_wildcard)
            if len(self._name_sets) > 2 * len(self._registry) + 64:
                in_use = {sub.names_key for stream in self._registry for sub in stream.types.values()}
                self._name_sets = {k: v for k, v in self._name_sets.items() if k in in_use}
            self._name_sets[request.names_key] = entry
        return entry

    def _on_reply(self, stream: streams.Stream, sub: streams.TypeState, req: Any) -> None:
        sub.settle()  # a reply is always to the latest response (older nonces are stale, ignored)
        stream.replied()
        if req.HasField("error_detail"):
            sub.inflight.clear()
            sub.last_nack = streams.Nack(sub.sent_version, req.version_info, req.error_detail.message.strip(),
                                         time.time())
            self._callbacks.nacked(stream, req.type_url, version=req.version_info, detail=req.error_detail.message)
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

    # composing responses

    def _compose(self, stream: streams.Stream) -> list[bytes]:
        """Responses that bring the stream up to its view now; only dirty names are looked at."""
        watch = stream.watch
        if watch is None:
            return []
        dirty = self._take_dirty(stream)
        out: list[bytes] = []
        cds = stream.types.get(typeurls.CLUSTER)
        removed: dict[str, resources.Resource] = {}
        if cds is not None and typeurls.CLUSTER in dirty:
            wanted = cds.wanted(watch.resources(typeurls.CLUSTER))
            held = cds.held.current
            removed = {n: r for n, r in held.items() if n not in wanted}
            # Which clusters the client held at another version; on a reconnect, what it holds is known
            # only as a whole: if that is not what we have, any of them may have changed.
            reconnect = bool(cds.reported) and not cds.answered
            changed = wanted.keys() if reconnect else {
                n for n, r in wanted.items() if (was := held.get(n)) is not None and was.version != r.version}
            # Make before break: keep removed clusters until routes stop naming them.
            union = {**wanted, **removed} if removed else wanted
            if self._respond(stream, watch, typeurls.CLUSTER, cds, union, out, final=not removed):
                order.rewarm(stream, changed)
        eds = stream.types.get(typeurls.ENDPOINT)
        again = order.rewarm_now(stream, eds, watch.resources(typeurls.ENDPOINT))
        if again and eds is not None:
            # An updated cluster warms again and waits for its endpoints: sent even if unchanged, and even if
            # a reconnecting client reports the version it holds.
            if not eds.answered:
                eds.reported = ""
            streams.mark_dirty(dirty, typeurls.ENDPOINT, again)
        for type_url in (typeurls.ENDPOINT, typeurls.LISTENER, typeurls.ROUTE):
            sub = stream.types.get(type_url)
            if sub is None or type_url not in dirty:
                continue
            have = watch.resources(type_url)
            names = dirty[type_url]
            full_state = type_url in typeurls.FULL_STATE
            if names is cache.EVERY or full_state:
                candidates = sub.wanted(have)
                current = len(candidates) == len(have)
            else:  # only what changed (or was re-subscribed) can need sending: O(changes), not O(subscribed)
                candidates = {n: have[n] for n in names if n in have and sub.wants(n)}
                # Held the view's previous build, and every name that changed since is wanted.
                current = watch.caught_up(type_url, sub.held) and all(n in candidates for n in names if n in have)
            sendable = self._order.sendable(stream, watch, type_url, candidates, full_state=full_state)
            self._respond(stream, watch, type_url, sub, sendable, out, final=True,
                          now=have if current and sendable is candidates else None)
        if removed and cds is not None:
            wanted = cds.wanted(watch.resources(typeurls.CLUSTER))
            _, keep = self._order.removable(stream, watch, typeurls.CLUSTER, removed)
            final = {**wanted, **{n: removed[n] for n in keep}} if keep else wanted
            self._respond(stream, watch, typeurls.CLUSTER, cds, final, out, final=not keep)
        return out

    def _respond(
        self,
        stream: streams.Stream,
        watch: cache.ViewWatch,
        type_url: str,
        sub: streams.TypeState,
        candidates: cache.ResourceMap,
        out: list[bytes],
        *,
        final: bool,
        now: cache.ResourceMap | None = None,
    ) -> bool:
        """Send what of `candidates` the stream lacks (all of it for CDS and LDS, if anything differs);
        whether a response went out.

        `final`: the candidates are what the stream is to hold of the view (not the transitional
        union of make before break). `now`: the view's map, when after this response the stream
        holds exactly that.
        """
        full_state = type_url in typeurls.FULL_STATE
        updates = cache.updates(candidates, sub.held)
        not_found = sub.not_found
        if full_state:
            # Names asked for that the view lacks are said to be absent, once per change of that set.
            not_found = frozenset() if sub.wildcard else sub.names - candidates.keys()
            if (not updates and candidates.keys() == sub.held.current.keys() and sub.answered
                    and not_found == sub.not_found):
                return False
            payload = candidates
        elif not updates:
            return False
        else:
            payload = updates
        view_size = len(watch.resources(type_url))
        if sub.reported and not sub.answered:
            # Reconnect: if what the client says it holds is what we would send, it has it all already.
            reported, sub.reported = sub.reported, ""
            whole = now is not None or (final and full_state and len(candidates) == view_size)
            if reported == (watch.version(type_url) if whole else resources.type_version(candidates.values())):
                sub.held.hold(now if now is not None else candidates)
                sub.answered = True
                sub.acked_version = sub.sent_version = reported
                sub.sent_at = time.time()
                return False
        held = sub.held.current
        seen = [r.seen_at for n, r in updates.items() if r.seen_at is not None and n in held]
        # What the stream holds once it has this response, and the version that names it.
        if full_state:
            sub.held.hold(candidates)
            whole = final and len(candidates) == view_size
        elif now is not None:
            sub.held.hold(now)
            whole = True
        else:
            sub.held.add(payload)
            whole = adsbase.adopt(sub.held, watch.resources(type_url))
        version_info = watch.version(type_url) if whole else resources.type_version(sub.held.current.values())
        nonce = stream.next_nonce()
        message = resources.response(
            version_info=version_info,
            resources=payload.values(),
            type_url=type_url,
            nonce=nonce,
            control_plane=self._control_plane,
            not_found=sorted(not_found),
        )
        sub.not_found = not_found
        sub.sent_version = version_info
        sub.sent(nonce, seen=min(seen) if seen else None, names=updates.keys())
        out.append(message)
        self._callbacks.response_sent(stream, type_url, resources=len(payload), size=len(message))
        return True


def _resubscribe(
    sub: streams.TypeState, requested: frozenset[str], explicit_wildcard: bool, *, first: bool,
    legacy_wildcard: bool,
) -> streams.Dirty:
    """Apply a request's resource_names (xds_protocol wildcard rules) to a subscription.

    A first request naming nothing is a (legacy) wildcard only for listeners and clusters, as
    xds_protocol has it; for routes and endpoints it asks for nothing. Envoy sends one when a
    listener it was building fails before its route configuration's name went out: answering it
    with every route configuration would earn no ACK (Envoy ignores a type it does not watch).

    Returns the names to look at again: EVERY for all of them (the first request, or a switch
    into or out of wildcard), else the names newly subscribed or dropped.
    """
    wildcard = sub.wildcard
    if explicit_wildcard:
        wildcard = True
    elif requested:
        wildcard = False
    elif first and legacy_wildcard:
        wildcard = True
    changed = set(requested ^ sub.names)
    sub.held.drop(changed)  # (re)subscribed resources are sent even if unchanged
    whole = first or wildcard != sub.wildcard
    sub.wildcard = wildcard
    sub.names = requested
    return cache.EVERY if whole else changed
