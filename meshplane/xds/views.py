"""The view cache: every live view's resources, built once and rebuilt only where a change reaches
(docs/architecture.md, layer 3; the protocol servers see it through `cache.Views`).

A client's resources are a pure function of its view key plus the catalog
and the policy (invariant 1); the generator of its kind says how, type by
type (meshplane/xds/generators/). The cache knows no kind. It keeps what
each builder built per *scope* (the part of a view key the builder reads):
a piece. Views whose keys share a scope share the piece, down to the very
same encoded resources: clusters are one piece for every sidecar,
assignments one per client locality. A change of one service rebuilds that
service's part of the live pieces, for the live views only (invariant 2).

A build that raises is our bug, not the operator's: it is logged once,
counted and listed in /ready, and the service keeps its last good resources
while every other change goes on being pushed (invariant 7).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass

import structlog

from meshplane.discovery import model
from meshplane.policy import rules
from meshplane.xds import cache, proxy, resources, typeurls
from meshplane.xds.generators import base

log = structlog.get_logger(__name__)

Resources = dict[str, resources.Resource]
_NOTHING: cache.ResourceMap = {}


@dataclass(frozen=True, slots=True)
class BuildError:
    """A build that raised: which service (empty for a whole-catalog type), which type, and the error."""

    service: str
    type: str  # short name: cds, eds, lds, rds
    error: str


class _Piece:
    """What one builder built for one scope, shared by the views whose keys have that scope."""

    __slots__ = ("builder", "by_service", "marks", "resources", "scope", "type_url", "version", "views")

    def __init__(self, type_url: str, builder: base.Builder, scope: Hashable) -> None:
        self.type_url = type_url
        self.builder = builder
        self.scope = scope
        self.by_service: dict[model.ServiceKey, Resources] = {}  # PerService builders only
        self.resources: cache.ResourceMap = _NOTHING  # replaced, never changed, once handed out
        self.version = ""  # of `resources`, made when first asked for
        self.marks: int | None = None  # of `resources` (resources.marks), once summed; then kept up to date
        self.views = 0

    def current_version(self) -> str:
        if not self.version:
            if self.marks is None:
                self.marks = resources.marks(self.resources.values())
            self.version = resources.version_of(self.marks)
        return self.version

    def replace(self, new: cache.ResourceMap, marks: int | None = None) -> None:
        """`new` replaces the resources; `marks`: its sum of marks, if known."""
        self.resources, self.version, self.marks = new, "", marks


class View:
    """One view: the pieces its key selects, what they held before the last change, its watches."""

    __slots__ = ("key", "pieces", "previous", "resources", "watches")

    def __init__(self, key: proxy.ViewKey, pieces: dict[str, _Piece]) -> None:
        self.key = key
        self.pieces = pieces
        self.resources: dict[str, cache.ResourceMap] = {t: p.resources for t, p in pieces.items()}
        self.previous: dict[str, cache.ResourceMap] = {}
        self.watches: dict[_Watch, None] = {}  # ordered, and O(1) to remove

    @property
    def streams(self) -> int:
        return len(self.watches)

    def refresh(self) -> None:
        self.previous = self.resources
        self.resources = {t: p.resources for t, p in self.pieces.items()}


class _Watch:
    """A stream's handle on its view (implements cache.ViewWatch)."""

    __slots__ = ("_cache", "client", "on_change", "view")

    def __init__(self, owner: ViewCache, client: proxy.Proxy, on_change: cache.OnChange, view: View) -> None:
        self._cache = owner
        self.client = client
        self.on_change = on_change
        self.view = view

    @property
    def key(self) -> proxy.ViewKey:
        return self.view.key

    def resources(self, type_url: str) -> cache.ResourceMap:
        return self.view.resources.get(type_url, _NOTHING)

    def version(self, type_url: str) -> str:
        piece = self.view.pieces.get(type_url)
        return piece.current_version() if piece is not None else resources.type_version(())

    def caught_up(self, type_url: str, held: cache.Held) -> bool:
        return held.is_(self.view.previous.get(type_url))

    def close(self) -> None:
        self._cache._detach(self)


class ViewCache:
    """Builds and keeps the resources of every live view (implements cache.Views)."""

    def __init__(
        self,
        *,
        services: Mapping[model.ServiceKey, model.Service],
        policy: rules.Policy,
        generators: Mapping[proxy.Kind, base.Generator],
        on_build_error: Callable[[str], None] = lambda type_url: None,
    ) -> None:
        self._services = services
        self._policy = policy
        self._label_keys = policy.client_label_keys()
        self._generators = generators
        self._on_build_error = on_build_error
        self._views: dict[proxy.ViewKey, View] = {}
        self._pieces: dict[tuple[base.Builder, Hashable], _Piece] = {}
        self._errors: dict[tuple[_Piece, model.ServiceKey | None], BuildError] = {}

    @property
    def policy(self) -> rules.Policy:
        return self._policy

    @property
    def views(self) -> Mapping[proxy.ViewKey, View]:
        return self._views

    def build_errors(self) -> list[BuildError]:
        """The builds failing now (their services keep their last good resources), once each."""
        return sorted(set(self._errors.values()), key=lambda e: (e.service, e.type, e.error))

    # cache.Views

    def watch(self, client: proxy.Proxy, on_change: cache.OnChange) -> _Watch:
        key = client.view_key(self._label_keys)
        watch = _Watch(self, client, on_change, self._view(key))
        watch.view.watches[watch] = None
        return watch

    def _detach(self, watch: _Watch) -> None:
        view = watch.view
        if view.watches.pop(watch, False) is False:
            return  # closed already
        if not view.watches:
            del self._views[view.key]
            for piece in view.pieces.values():
                piece.views -= 1  # a piece no view uses is dropped at the next update, not now:
                # a proxy that reconnects meanwhile finds it built

    # building

    def _view(self, key: proxy.ViewKey) -> View:
        view = self._views.get(key)
        if view is None:
            generator = self._generators[key.kind]
            pieces = {t: self._piece(t, builder, builder.scope(key)) for t, builder in generator.types.items()}
            for piece in pieces.values():
                piece.views += 1
            view = self._views[key] = View(key, pieces)
        return view

    def _piece(self, type_url: str, builder: base.Builder, scope: Hashable) -> _Piece:
        piece = self._pieces.get((builder, scope))
        if piece is None:
            piece = self._pieces[(builder, scope)] = _Piece(type_url, builder, scope)
            if isinstance(builder, base.PerService):
                self._rebuild_services(piece, self._services.keys(), seen_at=None)
            else:
                self._rebuild_whole(piece, seen_at=None)
        return piece

    def update(
        self,
        *,
        services: Mapping[model.ServiceKey, model.Service],
        policy: rules.Policy,
        changed: frozenset[model.ServiceKey],
        seen_at: float,
    ) -> int:
        """Rebuild what `changed` services (and a new policy) reach; signal the views that changed.

        Returns how many views changed.
        """
        old_services, old_policy = self._services, self._policy
        self._services, self._policy = services, policy
        policy_changed = policy != old_policy
        self._pieces = {k: p for k, p in self._pieces.items() if p.views > 0}
        live = set(self._pieces.values())
        self._errors = {k: e for k, e in self._errors.items() if k[0] in live}

        changed_pieces: dict[_Piece, frozenset[str]] = {}
        keys = old_services.keys() | services.keys() if policy_changed else frozenset()
        for piece in self._pieces.values():
            builder = piece.builder
            if isinstance(builder, base.PerService):
                stale = changed | _policy_stale(piece, keys, old_policy, policy) if policy_changed else changed
                names = self._rebuild_services(piece, stale, seen_at=seen_at)
            elif (policy_changed and builder.reads_policy(old_policy, piece.scope)
                  != builder.reads_policy(policy, piece.scope)) or any(
                builder.reads_service(old_services.get(k)) != builder.reads_service(services.get(k)) for k in changed
            ):
                names = self._rebuild_whole(piece, seen_at=seen_at)
            else:
                continue
            if names:
                changed_pieces[piece] = names

        touched = 0
        if changed_pieces:
            for view in self._views.values():
                changes = {t: changed_pieces[p] for t, p in view.pieces.items() if p in changed_pieces}
                if changes:
                    touched += 1
                    view.refresh()
                    for watch in view.watches:
                        watch.on_change(changes)
        if policy_changed and (label_keys := policy.client_label_keys()) != self._label_keys:
            self._label_keys = label_keys
            touched += self._rekey()
        return touched

    def _rekey(self) -> int:
        """Move the watches whose view key changed with the policy (it reads other client labels now)."""
        moved = 0
        for view in list(self._views.values()):
            for watch in list(view.watches):
                key = watch.client.view_key(self._label_keys)
                if key == view.key:
                    continue
                self._detach(watch)
                watch.view = self._view(key)
                watch.view.watches[watch] = None
                watch.on_change(dict.fromkeys(watch.view.pieces.keys() | view.pieces.keys(), cache.EVERY))
                moved += 1
        return moved

    def _rebuild_services(
        self, piece: _Piece, keys: Iterable[model.ServiceKey], *, seen_at: float | None
    ) -> frozenset[str]:
        """Rebuild `keys`' part of a per-service piece; the names whose resource changed."""
        fresh: Resources = {}
        names: set[str] = set()
        for key in keys:
            old = piece.by_service.get(key, {})
            service = self._services.get(key)
            if service is None:
                new: Resources = {}
            else:
                built = self._build(piece, key)
                if built is None:
                    continue  # a failed build: the service keeps what it had
                new = _keep_equal(old, built, piece.type_url, seen_at)
            if new:
                piece.by_service[key] = new
            else:
                piece.by_service.pop(key, None)
            for name in old.keys() | new.keys():
                if old.get(name) is not new.get(name):
                    names.add(name)
                    if name in new:
                        fresh[name] = new[name]
        if names:
            # A copy of a dict that never lost a key is a memcpy (CPython), so a name still there is replaced
            # in place, not removed and added again: a piece of 10,000 is copied in a tenth of the time.
            merged = dict(piece.resources)
            marks = piece.marks  # kept up to date with what changed: a piece of 10,000 is not summed again
            for name in names:
                gone = merged.get(name) if name in fresh else merged.pop(name, None)
                if marks is not None and gone is not None:
                    marks -= gone.mark
            merged.update(fresh)
            if marks is not None:
                marks += resources.marks(fresh.values())
            piece.replace(merged, marks)
        return frozenset(names)

    def _rebuild_whole(self, piece: _Piece, *, seen_at: float | None) -> frozenset[str]:
        """Rebuild a whole-catalog piece; the names whose resource changed."""
        built = self._build(piece, None)
        if built is None:
            return frozenset()
        old = piece.resources
        new = _keep_equal(old, built, piece.type_url, seen_at)
        names = frozenset(n for n in old.keys() | new.keys() if old.get(n) is not new.get(n))
        if names:
            piece.replace(new)
        return names

    def _build(self, piece: _Piece, service: model.ServiceKey | None) -> base.Built | None:
        """Build one service's part of a piece (a whole piece: service None); on an exception,
        record it (logged once), count it, and return None."""
        builder = piece.builder
        try:
            if isinstance(builder, base.PerService):
                assert service is not None
                built = builder.build(self._services[service], self._policy, piece.scope)
            else:
                built = builder.build(self._services, self._policy, piece.scope)
        except Exception as exc:  # a bug of ours: keep serving what was built before
            error = BuildError(service or "", typeurls.SHORT_NAMES.get(piece.type_url, piece.type_url),
                               f"{type(exc).__name__}: {exc}")
            if error not in self._errors.values():
                log.error("build failed; the last good resources stay", service=error.service, type=error.type,
                          error=error.error, exc_info=exc)
            self._errors[(piece, service)] = error
            self._on_build_error(piece.type_url)
            return None
        self._errors.pop((piece, service), None)
        return built


def _policy_stale(
    piece: _Piece, keys: Iterable[model.ServiceKey], old: rules.Policy, new: rules.Policy
) -> frozenset[model.ServiceKey]:
    """The services whose policy changed in what the piece's builder reads of it, for its scope."""
    builder = piece.builder
    assert isinstance(builder, base.PerService)
    scope = piece.scope
    return frozenset(k for k in keys if builder.reads_policy(old, k, scope) != builder.reads_policy(new, k, scope))


def _keep_equal(old: cache.ResourceMap, built: base.Built, type_url: str, seen_at: float | None) -> Resources:
    """Encode `built`; where a resource's content is unchanged, keep the old object (same version, same seen_at)."""
    out: Resources = {}
    for name, msg in built.items():
        resource = resources.build(name, msg, type_url=type_url, seen_at=seen_at)
        previous = old.get(name)
        out[name] = previous if previous is not None and previous.version == resource.version else resource
    return out
