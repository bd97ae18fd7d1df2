"""Endpoint slices without their Service: told apart from a Service that is merely late, before warning.

A Service and its EndpointSlices reach us on two watches, each in its own
thread, so a Service and a slice written a millisecond apart arrive in
either order; a Service deleted before its slices (the EndpointSlice
controller and the garbage collector remove them a moment later) leaves
them behind for a moment too. Both are normal. The slices are left out
at once either way (a slice without its Service has no ports to route),
but a warning is due only once the sources have settled and the Service is
still missing. Settled means, for the slices of service K first seen
without K at time t, when the slices watch was at resourceVersion v:

1. `grace` has passed since t (10 s by default): the controller's clean-up
   after a deleted Service, and a Service written just after its slices,
   both land well within it; and
2. no watch of the cluster is re-listing or failing (the caller checks); and
3. the services watch has reached v: its store is current at or past the
   slices' write (a list, an event or a bookmark at v or later), so a
   Service written before the slices would be in it. Kubernetes promises
   resourceVersions that compare as integers (KEP-5504, GA in 1.35; etcd's
   one revision for every kind before that). Versions that are not
   integers cannot be compared: condition 1 alone then decides; or
4. instead of 3, `backstop` has passed since t: the services watch may have
   had nothing to deliver since v. The watch cache of current API servers
   sends a bookmark about every minute, which moves it past v well within
   the backstop (the reflector's `bookmark_silence`, 120 s); without
   bookmarks, a watch that has said nothing for that long is not hiding a
   Service.

Each orphan is reported once (the caller's `Problems` keeps that promise);
when its Service arrives or its slices go, it is forgotten, so a new orphan
of the same name is reported again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import structlog

from meshplane.discovery import model

log = structlog.get_logger(__name__)

CaughtUp = Callable[[model.ServiceKey, str], bool | None]  # (service, slices' version) -> reached, or unknown

_POLL = 1.0  # seconds between looks at orphans past their grace that wait for the services watch


@dataclass(slots=True)
class _Orphan:
    since: float  # monotonic time its slices were first seen without it
    after: str  # the slices watch's resourceVersion then
    reported: bool = False
    waiting: bool = False  # past its grace, held back until the services watch reaches `after` (said once)


class Orphans:
    """Services whose slices are here without them, and when each is due to be reported (module docstring)."""

    def __init__(self, *, grace: float, backstop: float, cluster: model.ClusterId) -> None:
        """`cluster`: whose slices these are (named in the log)."""
        self.grace = grace
        self.cluster = cluster
        self.backstop = max(grace, backstop)
        self._orphans: dict[model.ServiceKey, _Orphan] = {}

    def note(self, key: model.ServiceKey, *, now: float, after: str) -> None:
        """K's slices are here without K; the first note of a run starts its clock."""
        if key not in self._orphans:
            self._orphans[key] = _Orphan(since=now, after=after)

    def resolve(self, key: model.ServiceKey) -> bool:
        """K has its Service again, or no slices: forget it. True if it had been reported."""
        orphan = self._orphans.pop(key, None)
        return orphan is not None and orphan.reported

    def due(self, now: float, caught_up: CaughtUp) -> list[tuple[model.ServiceKey, float]]:
        """The orphans to report now, with how long each has been one; each is returned once."""
        out = []
        for key, orphan in self._orphans.items():
            age = now - orphan.since
            if orphan.reported or age < self.grace:
                continue
            if caught_up(key, orphan.after) is not False or age >= self.backstop:
                orphan.reported = True
                out.append((key, age))
            elif not orphan.waiting:
                orphan.waiting = True
                log.debug("endpoint slices without their service past the grace: waiting for the services watch",
                          cluster=self.cluster, object=f"Service {key}", slices_version=orphan.after,
                          for_seconds=round(age, 1))
        return out

    def next_check(self, now: float) -> float | None:
        """Seconds until `due` may have something new; None when nothing waits to be reported."""
        poll = min(_POLL, self.grace) if self.grace > 0 else _POLL
        waits = [o.since + self.grace - now for o in self._orphans.values() if not o.reported]
        return min((w if w > 0 else poll for w in waits), default=None)
