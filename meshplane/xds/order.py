"""Make before break, for both protocol servers: what of a push may go to a client now, and what waits
(docs/architecture.md, invariant 4; docs/xds.md).

Envoy applies each response as it arrives, and warms what it needs on its
own: a new or updated cluster is not used until its endpoints arrive. A
route that names a cluster the client has not warmed yet is answered 503
(`no_cluster`) until it has, and a cluster removed while a route the client
holds still names it, likewise. Writing CDS, EDS, LDS and RDS in that order
on one stream (`typeurls.PUSH_ORDER`) does not prevent either: the route
arrives while the cluster still warms. So, per stream:

- A resource is held back while something it refers to of an earlier type
  in the push order (a route's cluster) is not *settled* on this stream:
  not sent yet, or sent and not replied to yet (ACK or NACK: a NACK
  settles it too, or a broken cluster would hold its routes for ever). A cluster is
  settled only when its own assignment is too, where the client asks for
  it (a reference to a later type: the client asks for it because of the
  cluster, and Envoy does so before it ACKs the cluster).
- A removal is held back while a resource the stream holds refers to it
  and the view's version of that resource, still to be sent, does not
  (a route the view keeps naming a cluster that went away never will).
- What is held back waits in `Stream.waiting`, and is looked at again each
  time the client replies to a response (`Stream.replied`).

After a reconnect the server knows what a client holds only by version
(state of the world) or by name and version (delta), not what a held
route names: a removal is then not held back for it.

A reference the client does not subscribe to is not waited for: a
proxyless gRPC client asks for a cluster because a route names it, so the
route must go first. Nor is a reference the view does not have (such a
route fails as it would anyway). What refers to what comes from the
resources themselves (meshplane/xds/refs.py), not from the mesh.
"""

from __future__ import annotations

from collections.abc import Iterable

from meshplane.xds import cache, refs, resources, streams, typeurls

_POSITION = {type_url: i for i, type_url in enumerate(typeurls.PUSH_ORDER)}
_NEW_NEEDS_KEPT = 4096


class Order:
    """Decides, for one protocol server's streams, what of a push may go now."""

    def __init__(self) -> None:
        # (old mark, new mark) -> what the new resource refers to that the old one did not: computed once
        # per change of a resource, not once per stream (a route configuration naming 5,000 clusters).
        self._new_needs: dict[tuple[int, int], refs.Needs] = {}

    def sendable(
        self, stream: streams.Stream, watch: cache.ViewWatch, type_url: str, send: cache.ResourceMap, *,
        full_state: bool,
    ) -> cache.ResourceMap:
        """What of `send` may go now. A resource held back is left out, or, in a full-state response,
        replaced by the version the stream holds; it waits in `stream.waiting`."""
        position = _POSITION[type_url]
        sub = stream.types[type_url]
        held = sub.held.current
        readiness: _Readiness | None = None
        blocked: list[str] = []
        for name, resource in send.items():
            if not resource.needs:
                continue
            old = held.get(name)
            if old is not None and old.version == resource.version:
                continue  # not new to the client: nothing to wait for
            for ref_type, names in self._needs_new(old, resource):
                if _POSITION.get(ref_type, position) >= position:
                    continue
                readiness = readiness or _Readiness(stream, watch)
                if not readiness.ready(ref_type, names):
                    blocked.append(name)
                    break
        if not blocked:
            return send
        stream.waiting.setdefault(type_url, set()).update(blocked)
        out = dict(send)
        for name in blocked:
            was = held.get(name)
            if full_state and was is not None:
                out[name] = was
            else:
                del out[name]
        return out

    def removable(
        self, stream: streams.Stream, watch: cache.ViewWatch, type_url: str, names: Iterable[str]
    ) -> tuple[list[str], list[str]]:
        """Of `names` to remove, those to remove now, and those kept (they wait): a name is kept while a
        resource the stream holds refers to it and the view's version of that resource, still to be sent,
        does not. A held resource the view still has as it is (a gateway's route to a service that went
        away) will never stop naming it: waiting for it would keep the name for ever."""
        position = _POSITION[type_url]
        referred: set[str] = set()
        for later, sub in stream.types.items():
            if _POSITION.get(later, -1) <= position:
                continue
            have = watch.resources(later)
            for name, resource in sub.held.current.items():
                current = have.get(name)
                if current is None or current.version == resource.version:
                    continue  # gone from the view (its removal goes first), or the view will not change it
                still = dict(current.needs).get(type_url, frozenset())
                referred.update(n for t, refs_ in resource.needs if t == type_url for n in refs_ if n not in still)
        go = [n for n in names if n not in referred]
        keep = [n for n in names if n in referred]
        if keep:
            stream.waiting.setdefault(type_url, set()).update(keep)
        return go, keep

    def _needs_new(self, old: resources.Resource | None, new: resources.Resource) -> refs.Needs:
        if old is None or not old.needs:
            return new.needs
        key = (old.mark, new.mark)
        found = self._new_needs.get(key)
        if found is None:
            before = dict(old.needs)
            found = tuple((t, fresh) for t, names in new.needs if (fresh := names - before.get(t, frozenset())))
            if len(self._new_needs) >= _NEW_NEEDS_KEPT:
                self._new_needs.clear()
            self._new_needs[key] = found
        return found


def rewarm(stream: streams.Stream, changed: Iterable[str]) -> None:
    """`changed` clusters went to the client changed: their assignments are to follow, even if unchanged
    and even if not asked for yet (Envoy re-warms an updated cluster and waits for its assignment).
    A name with no assignment in the view is dropped at the next `rewarm_now`."""
    stream.rewarm.update(changed)


def rewarm_now(
    stream: streams.Stream, assignments: streams.TypeState | None, have: cache.ResourceMap
) -> frozenset[str]:
    """The assignments of re-warming clusters to send now (`have`: the view's), even if held at that
    version: those the client asks for; the rest wait until it does. They are no longer held, so
    they are sent."""
    if not stream.rewarm:
        return frozenset()
    stream.rewarm.intersection_update(have.keys())  # an assignment the view lacks: nothing of ours to wait for
    if assignments is None:
        return frozenset()
    now = frozenset(stream.rewarm if assignments.wildcard else stream.rewarm & assignments.names)
    if now:
        stream.rewarm -= now
        assignments.held.drop(now)
    return now


class _Readiness:
    """Whether what a resource refers to is settled on one stream, asked once per push."""

    def __init__(self, stream: streams.Stream, watch: cache.ViewWatch) -> None:
        self.stream = stream
        self.watch = watch
        self._whole: dict[str, bool] = {}

    def ready(self, type_url: str, names: frozenset[str]) -> bool:
        """Whether these (of a type earlier in the push order than what refers to them) are settled."""
        sub = self.stream.types.get(type_url)
        if sub is None:
            return True  # the client does not subscribe to the type: it asks because of what refers to it
        have = self.watch.resources(type_url)
        if self._settled_whole(type_url) and all(self._later_whole(t) for t in self._later(type_url, have, names)):
            return True
        return all(self._one(sub, have, type_url, name) for name in names)

    def _one(self, sub: streams.TypeState, have: cache.ResourceMap, type_url: str, name: str) -> bool:
        resource = have.get(name)
        if resource is None or not sub.wants(name):
            return True  # nothing to wait for, or the client asks for it only because of what refers to it
        if name not in sub.held.current or not sub.settled(name):
            return False
        position = _POSITION[type_url]
        return all(self._later_ready(t, names) for t, names in resource.needs if _POSITION.get(t, -1) > position)

    def _later_ready(self, type_url: str, names: frozenset[str]) -> bool:
        """What a settled resource refers to of a later type (a cluster's assignment), where the client asks
        for it: held and settled. The client asks because of that resource, and Envoy asks for a new
        cluster's assignment before it ACKs the cluster (its CDS update holds EDS requests back and lets
        them go before the ACK), so by the time the cluster is settled the request is in. A client that
        does not ask for it does not use it: nothing to wait for."""
        sub = self.stream.types.get(type_url)
        if sub is None or self._later_whole(type_url):
            return True
        have = self.watch.resources(type_url)
        for name in names:
            if name not in have or not sub.wants(name):
                continue
            if name not in sub.held.current or not sub.settled(name):
                return False
        return True

    def _later(self, type_url: str, have: cache.ResourceMap, names: frozenset[str]) -> set[str]:
        """The later types that these resources refer to."""
        position = _POSITION[type_url]
        out: set[str] = set()
        for name in names:
            resource = have.get(name)
            if resource is not None:
                out.update(t for t, _ in resource.needs if _POSITION.get(t, -1) > position)
            if out:
                break  # resources of one type refer to the same later types (clusters: assignments)
        return out

    def _settled_whole(self, type_url: str) -> bool:
        """The stream holds exactly the view of this type, and nothing of it waits for an answer."""
        whole = self._whole.get(type_url)
        if whole is None:
            sub = self.stream.types.get(type_url)
            whole = self._whole[type_url] = sub is not None and not sub.unsettled and \
                sub.held.is_(self.watch.resources(type_url))
        return whole

    def _later_whole(self, type_url: str) -> bool:
        # Re-warming assignments the client asks for were dropped from what it holds (rewarm_now runs first),
        # so a stream re-warming does not hold the whole view: no need to look at Stream.rewarm here.
        return self._settled_whole(type_url)
