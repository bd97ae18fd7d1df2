"""The incremental (delta) ADS server, `DeltaAggregatedResources` (Envoy's xds_protocol), beside the
state-of-the-world one on the same port and the same views (docs/architecture.md, layer 4).

A client says what it subscribes to and unsubscribes from, and on reconnect
which versions it holds (`initial_resource_versions`); the server sends the
resources that differ from what the client holds and names the ones it
should drop (`removed_resources`). Rules kept here, each with its test in
tests/test_ads_delta.py:

- `*`, or (for clusters and listeners) a first request naming nothing, is
  a wildcard subscription; a first route or endpoint request naming
  nothing asks for nothing (decision 0012).
- Subscription changes apply whatever the request's nonce: a stale nonce
  makes a request no ACK, it does not undo what it asks for.
- A name newly subscribed is sent even when unchanged; a subscribed name
  the view lacks is reported in `removed_resources` and stays subscribed:
  it is sent when it appears.
- The first answer to a wildcard subscription is sent even when empty
  (Envoy waits for it to finish initialising); a reconnect whose reported
  versions match what is served gets nothing at all.
- A NACKed response is not re-sent: the client keeps what it had until
  the content changes. The last NACK is kept for `meshplane status`.
- A cluster whose definition changed is followed by its endpoints, sent
  again even if unchanged (Envoy re-warms an updated cluster and waits for
  them: envoy#13009); removed clusters go last, after the listeners and
  routes that stopped naming them (make before break).
- Responses reuse each resource's encoded `Any` and content version: a
  change is serialised once per view, whichever protocol carries it.

Per-stream state is `streams.Stream`, as for state of the world, and is
dropped with the stream.
"""

from __future__ import annotations

import time
from typing import Any

from envoy.service.discovery.v3 import discovery_pb2

from meshplane.xds import adsbase, cache, order, resources, streams, typeurls, wire


class DeltaServer(adsbase.StreamServer):
    """Serves views to delta ADS streams (`DeltaAggregatedResources`)."""

    METHOD = "DeltaAggregatedResources"
    PROTOCOL = "delta"
    CONTROL_PLANE_FIELD = resources.DELTA_CONTROL_PLANE

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._order = order.Order()

    # requests

    def _on_raw(self, stream: streams.Stream, raw: bytes) -> str | None:
        req = wire.decode_delta(raw)
        error = self._identify(stream, req.node, req.HasField("node"))
        if error is not None:
            return error
        type_url = req.type_url
        served, error = self._served_type(stream, type_url)
        if not served:
            return error
        self._check_names(len(req.resource_names_subscribe) + len(req.resource_names_unsubscribe))
        sub = stream.types.get(type_url)
        first = sub is None
        if sub is None:
            sub = stream.types[type_url] = streams.TypeState()
        if req.response_nonce:
            if req.response_nonce in sub.nonce_versions:
                self._on_reply(stream, sub, req)
            else:
                self._callbacks.stale_nonce(stream, type_url)  # no ACK; its subscription changes still count
        look_at = _resubscribe(sub, req, first=first, legacy_wildcard=type_url in typeurls.FULL_STATE)
        if look_at is cache.EVERY or look_at:
            stream.mark({type_url: look_at})
        return None

    def _on_reply(self, stream: streams.Stream, sub: streams.TypeState,
                  req: discovery_pb2.DeltaDiscoveryRequest) -> None:
        version = sub.nonce_versions.pop(req.response_nonce)
        seen = sub.inflight.pop(req.response_nonce, None)
        sub.settle(req.response_nonce)
        stream.replied()
        if req.HasField("error_detail"):
            message = req.error_detail.message
            sub.last_nack = streams.Nack(version, sub.acked_version, message.strip(), time.time())
            self._callbacks.nacked(stream, req.type_url, version=sub.acked_version, detail=message)
            return
        sub.acked_version = version
        latency = None if seen is None else time.monotonic() - seen
        self._callbacks.acked(stream, req.type_url, latency=latency)

    # responses

    def _compose(self, stream: streams.Stream) -> list[bytes]:
        watch = stream.watch
        if watch is None:
            return []
        dirty = self._take_dirty(stream)
        out: list[bytes] = []
        cds = stream.types.get(typeurls.CLUSTER)
        removed_clusters: list[str] = []
        if cds is not None and typeurls.CLUSTER in dirty:
            have, names = watch.resources(typeurls.CLUSTER), dirty[typeurls.CLUSTER]
            now = _now(cds, watch, typeurls.CLUSTER, names)
            send, removed_clusters = _differences(cds, have, names)
            held = cds.held.current  # before this response: which of them the proxy had at another version
            changed = {n for n, r in send.items() if (was := held.get(n)) is not None and was.version != r.version}
            self._respond(stream, watch, typeurls.CLUSTER, cds, send, [], out,
                          now=have if now and not removed_clusters else None)
            order.rewarm(stream, changed)
        eds = stream.types.get(typeurls.ENDPOINT)
        again = order.rewarm_now(stream, eds, watch.resources(typeurls.ENDPOINT))
        if again and eds is not None:
            # An updated cluster warms again and waits for its endpoints: send them even if unchanged (and
            # even if the client asks for them only later, reporting the version it holds).
            eds.resend |= again
            streams.mark_dirty(dirty, typeurls.ENDPOINT, again)
        for type_url in (typeurls.ENDPOINT, typeurls.LISTENER, typeurls.ROUTE):
            sub = stream.types.get(type_url)
            if sub is None or type_url not in dirty:
                continue
            have, names = watch.resources(type_url), dirty[type_url]
            now = _now(sub, watch, type_url, names)
            send, removed = _differences(sub, have, names)
            sendable = self._order.sendable(stream, watch, type_url, send, full_state=False)
            if sendable is not send:
                sub.resend |= send.keys() - sendable.keys()  # sent once what they refer to is settled
            self._respond(stream, watch, type_url, sub, dict(sendable), removed, out,
                          now=have if now and sendable is send else None)
        if removed_clusters and cds is not None:
            go, _ = self._order.removable(stream, watch, typeurls.CLUSTER, removed_clusters)
            self._respond(stream, watch, typeurls.CLUSTER, cds, {}, go, out)
        return out

    def _respond(
        self,
        stream: streams.Stream,
        watch: cache.ViewWatch,
        type_url: str,
        sub: streams.TypeState,
        send: dict[str, resources.Resource],
        removed: list[str],
        out: list[bytes],
        *,
        now: cache.ResourceMap | None = None,
    ) -> None:
        """Send `send` and `removed`; `now`: the view's map, when after this the stream holds exactly that
        (it is then shared, not copied and compared)."""
        if not send and not removed:
            if sub.answered:
                return
            if not sub.wildcard or sub.reported:
                # A reconnect that holds what is served, or a subscription to nothing yet: nothing to say.
                if sub.reported:
                    sub.answered, sub.reported = True, ""
                    sub.acked_version = sub.sent_version = _holds(sub, watch, type_url)
                    sub.sent_at = time.time()
                return
            # else: the first answer to a wildcard, empty: sent, Envoy waits for it.
        held = sub.held.current
        seen = [r.seen_at for n, r in send.items() if r.seen_at is not None and n in held]
        if now is not None:
            sub.held.hold(now)
            version = watch.version(type_url)
        else:
            sub.held.drop(removed)
            sub.held.add(send)
            version = _holds(sub, watch, type_url)
        nonce = stream.next_nonce()
        message = resources.delta_response(
            system_version_info=version, resources=send.values(), removed=removed, type_url=type_url, nonce=nonce,
            control_plane=self._control_plane,
        )
        sub.reported = ""
        sub.sent_version = version
        sub.nonce_versions[nonce] = version
        sub.sent(nonce, seen=min(seen) if seen else None, names=send.keys())
        out.append(message)
        self._callbacks.response_sent(stream, type_url, resources=len(send), size=len(message))


def _holds(sub: streams.TypeState, watch: cache.ViewWatch, type_url: str) -> str:
    """The version of what the stream holds of a type (the view's, shared, when it holds all of it)."""
    if adsbase.adopt(sub.held, watch.resources(type_url)):
        return watch.version(type_url)
    return resources.type_version(sub.held.current.values())


def _now(sub: streams.TypeState, watch: cache.ViewWatch, type_url: str, names: streams.Dirty) -> bool:
    """Whether, once sent what changed of `names`, the stream holds exactly the view: it held the view's
    previous build, and it wants every name that changed (as in state of the world)."""
    if names is cache.EVERY or sub.resend or not watch.caught_up(type_url, sub.held):
        return False
    return sub.wildcard or all(sub.wants(n) for n in names)


def _differences(
    sub: streams.TypeState, have: cache.ResourceMap, names: streams.Dirty
) -> tuple[dict[str, resources.Resource], list[str]]:
    """What to send (wanted, and not held at that version, or newly subscribed) and what to report
    removed (wanted or held, and not in the view), among `names` (EVERY: all of them)."""
    held = sub.held.current
    if names is cache.EVERY:
        consider: set[str] = {*have, *held, *sub.names, *sub.resend} if sub.wildcard else \
            {*sub.names, *held, *sub.resend}
    else:
        consider = set(names) | sub.resend
    send: dict[str, resources.Resource] = {}
    removed: list[str] = []
    for name in consider:
        if not sub.wants(name):
            continue  # unsubscribed: the client drops it itself
        resource = have.get(name)
        if resource is not None:
            was = held.get(name)
            if name in sub.resend or was is None or was.version != resource.version:
                send[name] = resource
        elif name in held or name in sub.resend:
            removed.append(name)  # it stays subscribed: sent when it appears
    sub.resend.clear()
    return send, sorted(removed)


def _resubscribe(sub: streams.TypeState, req: discovery_pb2.DeltaDiscoveryRequest, *, first: bool,
                 legacy_wildcard: bool) -> streams.Dirty:
    """Apply a request's subscribe / unsubscribe lists (and, first, the versions it holds)."""
    if not first and not req.resource_names_subscribe and not req.resource_names_unsubscribe:
        return frozenset()  # an ACK or NACK alone: the subscription stands
    subscribe = set(req.resource_names_subscribe)
    unsubscribe = set(req.resource_names_unsubscribe)
    wildcard = sub.wildcard
    if typeurls.WILDCARD in subscribe or (first and not subscribe and legacy_wildcard):
        wildcard = True
    if typeurls.WILDCARD in unsubscribe:
        wildcard = False
    subscribe.discard(typeurls.WILDCARD)
    unsubscribe.discard(typeurls.WILDCARD)
    reported = dict(req.initial_resource_versions) if first else {}
    if reported:
        # What it holds from before (another replica, or this one before a reconnect): send only what differs.
        sub.held.add({n: resources.Resource(name=n, version=v, field=b"", mark=resources.mark(n, v))
                      for n, v in reported.items()})
        sub.reported = "initial_resource_versions"  # compared at the first push (state of the world: a version)
    sub.names = frozenset((sub.names | subscribe) - unsubscribe)
    sub.held.drop(unsubscribe)
    sub.resend -= unsubscribe
    sub.resend |= {n for n in subscribe if n not in reported}
    whole = first or wildcard != sub.wildcard
    sub.wildcard = wildcard
    return cache.EVERY if whole else frozenset(subscribe | unsubscribe)
