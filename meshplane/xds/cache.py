"""What the protocol servers may know of the view cache: a narrow interface, in the manner of
go-control-plane's `cache.ConfigWatcher` (docs/architecture.md, layers 3 and 4).

A protocol server opens one `ViewWatch` per stream (`Views.watch`) and asks it
what the client's view holds now, per type, and with what version; the watch
calls back with the names that changed (the change signal). How views are
built, shared and kept up to date (meshplane/xds/views.py) is none of the
server's business, and neither the generators nor the policy are in reach.

`Held` is what one stream holds of one type. It may share the view's own map
instead of a copy: 2,000 proxies of one view then keep one map of 1,000
clusters between them, not 2,000 (decision 0004). That sharing is safe
because of two promises, both kept in this module's terms:
- a `ResourceMap` a view hands out is never changed afterwards (a rebuild
  makes a new map), which is why it is typed as a read-only `Mapping`;
- `Held` changes a map it shares only after copying it (copy on write).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from meshplane.xds import proxy, resources

ResourceMap = Mapping[str, resources.Resource]
"""name -> Resource, as a view holds them for one type. Never changed once handed out."""


class Every(enum.Enum):
    """The names of a type that changed, when they are all of them (a stream moved to another view)."""

    NAME = "every name"


EVERY = Every.NAME

Names = frozenset[str] | Every
Changes = Mapping[str, Names]
"""type URL -> the names of that type that changed (added, updated or removed), or EVERY."""

OnChange = Callable[[Changes], None]


class ViewWatch(Protocol):
    """One stream's handle on its view."""

    @property
    def key(self) -> proxy.ViewKey: ...

    def resources(self, type_url: str) -> ResourceMap:
        """What the view holds of `type_url` now (empty for a type the view does not serve)."""
        ...

    def version(self, type_url: str) -> str:
        """The version_info of all of `resources(type_url)`: `resources.type_version` of it, hashed once per change."""
        ...

    def caught_up(self, type_url: str, held: Held) -> bool:
        """Whether `held` is exactly what the view held before its last change of `type_url`,
        so that after sending the names that changed the stream holds exactly `resources(type_url)`."""
        ...

    def close(self) -> None:
        """The stream has ended: no more change signals."""
        ...


class Views(Protocol):
    """The view cache, as the protocol servers see it."""

    def watch(self, client: proxy.Proxy, on_change: OnChange) -> ViewWatch:
        """Attach a client to its view; `on_change` is called, synchronously, whenever the view changes."""
        ...


class Held:
    """What one stream holds of one type: name -> the Resource last sent under that name."""

    __slots__ = ("_map", "_owned")

    def __init__(self) -> None:
        self._map: ResourceMap = {}
        self._owned = True  # False while _map is a view's map (shared)

    @property
    def current(self) -> ResourceMap:
        """What the stream holds now (read only: change it through the methods below)."""
        return self._map

    def is_(self, other: ResourceMap | None) -> bool:
        """Whether this holds that very map (not merely an equal one)."""
        return self._map is other

    def hold(self, now: ResourceMap) -> None:
        """The stream now holds exactly `now` (a view's map, or a map nobody will change): shared, not copied."""
        self._map, self._owned = now, False

    def add(self, sent: Mapping[str, resources.Resource]) -> None:
        """The stream was sent `sent` besides what it held."""
        self._own().update(sent)

    def drop(self, names: Iterable[str]) -> None:
        """The stream no longer holds these (it unsubscribed, or they are to be sent again)."""
        held = [n for n in names if n in self._map]
        if held:
            own = self._own()
            for name in held:
                del own[name]

    def _own(self) -> dict[str, resources.Resource]:
        if not self._owned or not isinstance(self._map, dict):
            self._map, self._owned = dict(self._map), True
        assert isinstance(self._map, dict)
        return self._map


def updates(candidates: ResourceMap, held: Held) -> dict[str, resources.Resource]:
    """What of `candidates` the stream lacks, or holds at another version."""
    get = held.current.get
    return {n: r for n, r in candidates.items() if (h := get(n)) is None or h.version != r.version}
