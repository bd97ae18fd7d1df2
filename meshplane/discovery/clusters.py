"""Which Kubernetes clusters meshplane discovers, and how their set changes at run time.

Clusters come from origins: kubeconfig files named on the command line, a
directory of kubeconfigs (one file per cluster), and Secrets in the local
cluster labelled for meshplane (the "remote secret" model of multi-primary
meshes). Each origin hands the registry its whole set of cluster specs
whenever it changes; the registry starts a source for a new cluster,
reconnects one whose credentials changed (keeping its endpoints until the
new connection has listed), and removes one that is gone.

A configuration that cannot be read (a half-written file, a Secret with a
broken kubeconfig) is not a cluster that is gone: the origin names it as
broken, and a cluster that runs keeps running on its last good spec (its
source, its endpoints) until the configuration is fixed or removed. Each
problem is logged once, naming the file or Secret and the reason.

meshplane only ever reads a cluster (list and watch); "discovery only" is
the only mode there is.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog
import yaml

from meshplane import aio, problems, watch, yamlpos
from meshplane.discovery import catalog as catalog_mod
from meshplane.discovery import model

log = structlog.get_logger(__name__)

SECRET_LABEL = "meshplane.io/multicluster"
"""Secrets labelled `meshplane.io/multicluster: "true"` carry remote clusters' kubeconfigs."""


@dataclass(frozen=True)
class ClusterSpec:
    """How to reach one cluster. `kubeconfig` None means the in-cluster service account."""

    id: model.ClusterId
    kubeconfig: Mapping[str, Any] | None
    context: str | None = None
    origin: str = ""

    @property
    def fingerprint(self) -> str:
        """Changes when the credentials or address change (a rotated secret)."""
        blob = json.dumps([self.kubeconfig, self.context], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()


class Source(Protocol):
    @property
    def synced(self) -> bool: ...
    @property
    def stale(self) -> bool: ...
    @property
    def error(self) -> str: ...

    async def start(self, catalog: catalog_mod.Catalog) -> None: ...
    async def stop(self) -> None: ...


SourceFactory = Callable[[ClusterSpec], Source]


@dataclass
class _Entry:
    spec: ClusterSpec
    source: Source
    added_at: float
    overdue: asyncio.TimerHandle | None = None  # logs once if the first sync takes longer than the timeout

    def cancel(self) -> None:
        if self.overdue is not None:
            self.overdue.cancel()
            self.overdue = None


@dataclass
class ClusterRegistry:
    catalog: catalog_mod.Catalog
    make_source: SourceFactory
    sync_timeout: float = 30.0
    _entries: dict[model.ClusterId, _Entry] = field(default_factory=dict)
    _by_origin: dict[str, set[model.ClusterId]] = field(default_factory=dict)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _problems: dict[tuple[str, model.ClusterId], str] = field(default_factory=dict)  # (origin, cluster) -> error

    async def set_origin(
        self, origin: str, specs: Mapping[model.ClusterId, ClusterSpec], *,
        broken: Mapping[model.ClusterId, str] | None = None, strict: bool = False,
    ) -> None:
        """Make the clusters of `origin` exactly `specs`: add, reconnect, remove.

        `broken` names clusters of `origin` whose configuration could not be read (id -> what and
        where): one that runs keeps its last good spec and source, one that does not is not added.
        A spec the source factory rejects (an unusable kubeconfig) counts as broken too, unless
        `strict` (the command line), where it raises ValueError.
        """
        unusable = dict(broken or {})
        async with self._lock:
            previous = self._by_origin.get(origin, set())
            for cluster in sorted(previous - specs.keys() - unusable.keys()):
                await self._remove(cluster)
            for cluster, spec in sorted(specs.items()):
                owner = self._owner(cluster)
                if owner not in (None, origin):
                    log.error("cluster id configured twice; keeping the first", cluster=cluster,
                              first=owner, ignored=origin)
                    continue
                entry = self._entries.get(cluster)
                if entry is None or entry.spec.fingerprint != spec.fingerprint:
                    try:
                        await self._connect(spec, replacing=entry)
                    except ValueError as exc:
                        if strict:
                            raise ValueError(f"{spec.origin}: {exc}") from None
                        unusable[cluster] = f"{spec.origin}: {exc}"
            mine = specs.keys() | unusable.keys()
            self._by_origin[origin] = {c for c in mine if self._owner(c) in (None, origin) and c in self._entries}
            self._report(origin, specs, unusable)

    def _report(self, origin: str, specs: Mapping[model.ClusterId, ClusterSpec],
                problems: Mapping[model.ClusterId, str]) -> None:
        """Log each broken configuration once, and its repair."""
        for cluster, error in sorted(problems.items()):
            if self._problems.get((origin, cluster)) == error:
                continue
            self._problems[(origin, cluster)] = error
            if cluster in self._by_origin[origin]:
                log.error("cluster configuration unreadable; the cluster keeps running on its last good one",
                          cluster=cluster, error=error)
            else:
                log.error("cluster configuration unreadable; cluster not added", cluster=cluster, error=error)
        for key in [k for k in self._problems if k[0] == origin and k[1] not in problems]:
            del self._problems[key]
            if key[1] in specs:
                log.info("cluster configuration readable again", cluster=key[1], origin=specs[key[1]].origin)

    def _owner(self, cluster: model.ClusterId) -> str | None:
        return next((o for o, cs in self._by_origin.items() if cluster in cs), None)

    async def _connect(self, spec: ClusterSpec, *, replacing: _Entry | None) -> None:
        """Start a source for `spec` (ValueError if its kubeconfig is unusable: then nothing changes)."""
        source = self.make_source(spec)
        if replacing is not None:
            log.info("cluster credentials changed, reconnecting", cluster=spec.id, origin=spec.origin)
            replacing.cancel()
            await replacing.source.stop()  # its endpoints stay in the catalog until the new source lists
        entry = _Entry(spec=spec, source=source, added_at=time.monotonic())
        entry.overdue = asyncio.get_running_loop().call_later(self.sync_timeout, self._overdue, entry)
        self._entries[spec.id] = entry
        self.catalog.expect(spec.id)
        await source.start(self.catalog)
        if replacing is None:
            log.info("cluster added", cluster=spec.id, origin=spec.origin)

    async def _remove(self, cluster: model.ClusterId) -> None:
        entry = self._entries.pop(cluster, None)
        if entry is None:
            return
        entry.cancel()
        await entry.source.stop()
        self.catalog.remove_cluster(cluster, seen_at=time.monotonic())
        log.info("cluster removed", cluster=cluster, origin=entry.spec.origin)

    async def stop(self) -> None:
        for entry in list(self._entries.values()):
            entry.cancel()
            await entry.source.stop()
        self._entries.clear()
        self._by_origin.clear()

    @property
    def clusters(self) -> Mapping[model.ClusterId, ClusterSpec]:
        return {c: e.spec for c, e in self._entries.items()}

    def _overdue(self, entry: _Entry) -> None:
        entry.overdue = None
        if self._entries.get(entry.spec.id) is entry and not entry.source.synced:
            log.warning("cluster not synced within the sync timeout; ready without it", cluster=entry.spec.id,
                        origin=entry.spec.origin, timeout=self.sync_timeout, error=entry.source.error)

    def ready(self) -> bool:
        """Every cluster has listed once, or its sync timeout has passed (logged once, when it passes)."""
        now = time.monotonic()
        return all(e.source.synced or now - e.added_at >= self.sync_timeout for e in self._entries.values())

    def status(self) -> dict[str, dict[str, Any]]:
        """Per cluster: origin, state (synced, stale, syncing, sync timed out), and the flags and error behind it."""
        now = time.monotonic()
        status: dict[str, dict[str, Any]] = {}
        for cluster, e in sorted(self._entries.items()):
            timed_out = not e.source.synced and now - e.added_at >= self.sync_timeout
            if e.source.synced:
                state = "stale" if e.source.stale else "synced"
            else:
                state = "sync timed out" if timed_out else "syncing"
            status[cluster] = {"origin": e.spec.origin, "state": state, "synced": e.source.synced,
                               "stale": e.source.stale, "error": e.source.error, "sync_timed_out": timed_out}
        return status


# Origins


def parse_kubeconfig_arg(arg: str) -> tuple[model.ClusterId | None, Path, str | None]:
    """`[ID=]PATH[#CONTEXT]` -> (id or None, path, context or None)."""
    cluster: str | None = None
    if "=" in arg and not arg.startswith(("/", ".")):
        cluster, arg = arg.split("=", 1)
    path, _, context = arg.partition("#")
    return (model.ClusterId(cluster) if cluster else None), Path(path), (context or None)


def load_kubeconfig(path: Path) -> dict[str, Any]:
    """A kubeconfig file, checked: ValueError naming the file (and the line) and what is wrong, in one line."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: {problems.cannot_read(exc)}") from exc
    return parse_kubeconfig(data, path=path)


def parse_kubeconfig(data: bytes, *, path: Path) -> dict[str, Any]:
    """A kubeconfig file's bytes, checked: ValueError naming the file (and the line) and what is wrong."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason})") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        error = yamlpos.syntax_error(exc, text)
        raise ValueError(f"{path}:{error.line}: {error.reason}" if error.line else f"{path}: {error.reason}") from None
    return check_kubeconfig(doc, where=str(path))


def check_kubeconfig(doc: Any, *, where: str) -> dict[str, Any]:
    if not isinstance(doc, dict) or not doc.get("clusters") or not doc.get("contexts"):
        raise ValueError(f"{where}: not a kubeconfig (needs clusters and contexts)")
    return doc


def spec_from_file(arg: str, *, flag: str = "--kubeconfig") -> ClusterSpec:
    """A `--kubeconfig [ID=]PATH[#CONTEXT]` argument (or `--local-cluster`'s ID=PATH[#CONTEXT]); the id
    defaults to the context's name. ValueError names the flag, as given, and the file."""
    cluster, path, context = parse_kubeconfig_arg(arg)
    given = flag if arg == str(path) else f"{flag} {arg}:"  # `--kubeconfig c2.yaml: ...` says it once
    try:
        doc = load_kubeconfig(path)
    except ValueError as exc:
        raise ValueError(f"{given} {exc}") from None
    context = context or doc.get("current-context")
    if not context:
        raise ValueError(f"{given} {path}: no current-context; name one as {path}#CONTEXT")
    return ClusterSpec(id=cluster or model.ClusterId(context), kubeconfig=doc, context=context,
                       origin=f"kubeconfig {path}")


@dataclass(frozen=True, slots=True)
class _KubeconfigFile:
    """A kubeconfig of a directory as last read: how it was (watch.Seen), and its cluster or why not."""

    seen: watch.Seen
    spec: ClusterSpec | None
    error: str = ""


class KubeconfigDir:
    """A directory of kubeconfigs, one per cluster (cluster id = file name without extension), watched with
    inotify (polled every `interval` where that is unavailable: meshplane/watch.py).

    Files are read as the other watched files are: once a write to them is complete, each whole
    (`watch.read`), and not used when one changed while it was read or a write began since the watch
    woke (`Watch.disturbed`): a kubeconfig cut inside `users:` is still YAML with clusters and contexts,
    and would restart its cluster's watchers with a broken credential. A file is read again only when
    `watch.Seen` says it changed (a `touch` is no change; a rewrite in the same timestamp tick is)."""

    def __init__(self, directory: Path, registry: ClusterRegistry, *, interval: float = 1.0,
                 inotify: bool = True) -> None:
        self.directory = directory
        self.registry = registry
        self._watch = watch.Watch([directory], interval=interval, inotify=inotify, include=_kubeconfig_name)
        self._follower = aio.Follower(self._watch.events())
        self._read: dict[Path, _KubeconfigFile] | None = None  # None: never scanned whole
        self._dir_error = ""

    async def start(self) -> None:
        """Scan once the directory's files have settled (a file being written is waited for), then follow it."""
        if not self.directory.is_dir():
            raise ValueError(f"--kubeconfig-dir {self.directory}: not a directory")
        await self._follower.first(lambda quiet: self.scan(quiet=quiet))
        self._follower.follow(lambda quiet: self.scan(quiet=quiet), name=f"kubeconfig-dir:{self.directory}",
                              event="kubeconfig directory scan failed; trying again", directory=str(self.directory))

    async def stop(self) -> None:
        await self._follower.stop()

    def _files(self) -> list[Path] | None:
        """The candidate files; None if the directory cannot be read (then nothing changes)."""
        try:
            paths = sorted(self.directory.iterdir())
        except OSError as exc:
            if str(exc) != self._dir_error:
                log.error("kubeconfig directory unreadable; keeping its clusters", directory=str(self.directory),
                          error=str(exc))
            self._dir_error = str(exc)
            return None
        self._dir_error = ""
        files = []
        for path in paths:
            if not _kubeconfig_name(path.name):
                continue
            try:
                st = path.stat()  # one stat: the file may go between the listing and here
            except OSError:
                continue  # gone: the next scan sees the directory without it
            if stat.S_ISREG(st.st_mode):
                files.append(path)
        return files

    async def scan(self, *, quiet: bool = False) -> bool:
        """Hand the registry the directory's clusters if a file changed; False (nothing handed) when a file
        was being written: the watch wakes again once that write is complete. `quiet`: as the watch says."""
        paths = self._files()
        if paths is None:
            return True
        before = self._read or {}
        now: dict[Path, _KubeconfigFile] = {}
        changed = self._read is None
        for path in paths:
            old = before.get(path)
            if old is not None and old.seen.unchanged(watch.stat_of(path), quiet=quiet):
                now[path] = old
                continue
            got = watch.read(path)
            if got.torn or self._watch.disturbed():
                return False
            if isinstance(got.data, FileNotFoundError):
                continue  # gone since the listing
            data = got.data if isinstance(got.data, bytes) else f"unreadable: {got.data}".encode()
            seen = watch.Seen.of(got.stat, data)
            if old is not None and seen.digest == old.seen.digest:  # a touch, or the same bytes again
                now[path] = dataclasses.replace(old, seen=seen)
                continue
            now[path] = _kubeconfig_file(path, got.data, seen)
            changed = True
        if changed or now.keys() != before.keys():
            specs = {f.spec.id: f.spec for f in now.values() if f.spec is not None}
            broken = {model.ClusterId(p.stem): f.error for p, f in now.items() if f.spec is None}
            await self.registry.set_origin(f"dir:{self.directory}", specs, broken=broken)
        self._read = now  # only now: a scan that failed half way is tried again
        return True


def _kubeconfig_file(path: Path, data: bytes | OSError, seen: watch.Seen) -> _KubeconfigFile:
    """A kubeconfig of a directory, read whole: its cluster, or (half written, or broken) why not: then the
    cluster keeps its last good file."""
    cluster = model.ClusterId(path.stem)
    try:
        if isinstance(data, OSError):
            raise ValueError(f"{path}: {problems.cannot_read(data)}")
        doc = parse_kubeconfig(data, path=path)
    except ValueError as exc:
        return _KubeconfigFile(seen, None, str(exc))
    return _KubeconfigFile(seen, ClusterSpec(id=cluster, kubeconfig=doc, context=doc.get("current-context"),
                                             origin=f"kubeconfig {path}"))


def _kubeconfig_name(name: str) -> bool:
    """A name in a kubeconfig directory that may be a kubeconfig (not hidden, a known suffix or none)."""
    return not name.startswith(".") and Path(name).suffix in ("", ".yaml", ".yml", ".conf")


def specs_from_secrets(
    secrets: Mapping[str, Mapping[str, Any]], *, namespace: str
) -> tuple[dict[model.ClusterId, ClusterSpec], dict[model.ClusterId, str]]:
    """Remote secrets -> (cluster specs, broken cluster id -> why). Each data key of a labelled Secret is a
    cluster id, its value a kubeconfig."""
    specs: dict[model.ClusterId, ClusterSpec] = {}
    broken: dict[model.ClusterId, str] = {}
    for name, data in sorted(secrets.items()):
        for key, encoded in sorted(data.items()):
            where = f"secret {namespace}/{name} key {key}"
            cluster = model.ClusterId(key)
            try:
                text = base64.b64decode(encoded, validate=True).decode()
                doc = check_kubeconfig(yaml.safe_load(text), where=where)
            except yaml.YAMLError as exc:
                error = yamlpos.syntax_error(exc, text)
                broken.setdefault(cluster, f"{where}: {error.reason}" + (f" (line {error.line})" if error.line else ""))
                continue
            except (ValueError, TypeError) as exc:
                broken.setdefault(cluster, str(exc) if str(exc).startswith(where) else f"{where}: {exc}")
                continue
            if cluster in specs:
                log.error("cluster id in two remote secrets; keeping the first", cluster=cluster, ignored=where)
                continue
            broken.pop(cluster, None)
            specs[cluster] = ClusterSpec(id=cluster, kubeconfig=doc, context=doc.get("current-context"),
                                         origin=where)
    return specs, broken
