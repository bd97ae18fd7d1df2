"""Which Kubernetes clusters meshplane discovers, and how their set changes at run time.

Clusters come from origins: kubeconfig files named on the command line, a
directory of kubeconfigs (one file per cluster), and Secrets in the local
cluster labelled for meshplane (the "remote secret" model of multi-primary
meshes). Each origin hands the registry its whole set of cluster specs
whenever it changes; the registry starts a source for a new cluster,
reconnects one whose credentials changed (keeping its endpoints until the
new connection has listed), and removes one that is gone.

meshplane only ever reads a cluster (list and watch); "discovery only" is
the only mode there is.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog
import yaml

from meshplane import aio
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
    timed_out_logged: bool = False


@dataclass
class ClusterRegistry:
    catalog: catalog_mod.Catalog
    make_source: SourceFactory
    sync_timeout: float = 30.0
    _entries: dict[model.ClusterId, _Entry] = field(default_factory=dict)
    _by_origin: dict[str, set[model.ClusterId]] = field(default_factory=dict)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def set_origin(self, origin: str, specs: Mapping[model.ClusterId, ClusterSpec]) -> None:
        """Make the clusters of `origin` exactly `specs`: add, reconnect, remove."""
        async with self._lock:
            previous = self._by_origin.get(origin, set())
            for cluster in sorted(previous - specs.keys()):
                await self._remove(cluster)
            for cluster, spec in sorted(specs.items()):
                owner = self._owner(cluster)
                if owner not in (None, origin):
                    log.error("cluster id configured twice; keeping the first", cluster=cluster,
                              first=owner, ignored=origin)
                    continue
                entry = self._entries.get(cluster)
                if entry is None:
                    await self._add(spec)
                elif entry.spec.fingerprint != spec.fingerprint:
                    log.info("cluster credentials changed, reconnecting", cluster=cluster, origin=spec.origin)
                    await entry.source.stop()  # its endpoints stay in the catalog until the new source lists
                    await self._add(spec)
            self._by_origin[origin] = {c for c in specs if self._owner(c) in (None, origin) and c in self._entries}

    def _owner(self, cluster: model.ClusterId) -> str | None:
        return next((o for o, cs in self._by_origin.items() if cluster in cs), None)

    async def _add(self, spec: ClusterSpec) -> None:
        source = self.make_source(spec)
        self._entries[spec.id] = _Entry(spec=spec, source=source, added_at=time.monotonic())
        self.catalog.expect(spec.id)
        await source.start(self.catalog)
        log.info("cluster added", cluster=spec.id, origin=spec.origin)

    async def _remove(self, cluster: model.ClusterId) -> None:
        entry = self._entries.pop(cluster, None)
        if entry is None:
            return
        await entry.source.stop()
        self.catalog.remove_cluster(cluster, seen_at=time.monotonic())
        log.info("cluster removed", cluster=cluster, origin=entry.spec.origin)

    async def stop(self) -> None:
        for entry in list(self._entries.values()):
            await entry.source.stop()
        self._entries.clear()
        self._by_origin.clear()

    @property
    def clusters(self) -> Mapping[model.ClusterId, ClusterSpec]:
        return {c: e.spec for c, e in self._entries.items()}

    def ready(self) -> bool:
        """Every cluster has listed once, or its sync timeout has passed (then it is logged once)."""
        now = time.monotonic()
        ok = True
        for cluster, entry in self._entries.items():
            if entry.source.synced:
                continue
            if now - entry.added_at < self.sync_timeout:
                ok = False
            elif not entry.timed_out_logged:
                entry.timed_out_logged = True
                log.warning("cluster not synced within the sync timeout; ready without it",
                            cluster=cluster, timeout=self.sync_timeout, error=entry.source.error)
        return ok

    def status(self) -> dict[str, dict[str, Any]]:
        now = time.monotonic()
        return {
            cluster: {
                "origin": e.spec.origin,
                "synced": e.source.synced,
                "stale": e.source.stale,
                "error": e.source.error,
                "sync_timed_out": not e.source.synced and now - e.added_at >= self.sync_timeout,
            }
            for cluster, e in sorted(self._entries.items())
        }


# Origins


def parse_kubeconfig_arg(arg: str) -> tuple[model.ClusterId | None, Path, str | None]:
    """`[ID=]PATH[#CONTEXT]` -> (id or None, path, context or None)."""
    cluster: str | None = None
    if "=" in arg and not arg.startswith(("/", ".")):
        cluster, arg = arg.split("=", 1)
    path, _, context = arg.partition("#")
    return (model.ClusterId(cluster) if cluster else None), Path(path), (context or None)


def load_kubeconfig(path: Path) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: not a readable kubeconfig: {exc}") from exc
    return check_kubeconfig(doc, where=str(path))


def check_kubeconfig(doc: Any, *, where: str) -> dict[str, Any]:
    if not isinstance(doc, dict) or not doc.get("clusters") or not doc.get("contexts"):
        raise ValueError(f"{where}: not a kubeconfig (needs clusters and contexts)")
    return doc


def spec_from_file(arg: str) -> ClusterSpec:
    """A `--kubeconfig [ID=]PATH[#CONTEXT]` argument; the id defaults to the context's name."""
    cluster, path, context = parse_kubeconfig_arg(arg)
    doc = load_kubeconfig(path)
    context = context or doc.get("current-context")
    if not context:
        raise ValueError(f"{path}: no current-context; name one as {path}#CONTEXT")
    return ClusterSpec(id=cluster or model.ClusterId(context), kubeconfig=doc, context=context,
                       origin=f"kubeconfig {path}")


class KubeconfigDir:
    """A directory of kubeconfigs, one per cluster (cluster id = file name without extension), polled."""

    def __init__(self, directory: Path, registry: ClusterRegistry, *, interval: float = 1.0) -> None:
        self.directory = directory
        self.registry = registry
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._seen: dict[Path, tuple[int, int]] = {}
        self._errors: set[str] = set()

    async def start(self) -> None:
        if not self.directory.is_dir():
            raise ValueError(f"{self.directory}: not a directory of kubeconfigs")
        await self.scan()
        self._task = asyncio.create_task(self._run(), name=f"kubeconfig-dir:{self.directory}")

    async def stop(self) -> None:
        await aio.cancel(self._task)
        self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.scan()

    async def scan(self) -> None:
        files = sorted(p for p in self.directory.iterdir()
                       if p.is_file() and not p.name.startswith(".") and p.suffix in ("", ".yaml", ".yml", ".conf"))
        stats = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in files}
        if stats == self._seen:
            return
        self._seen = stats
        specs: dict[model.ClusterId, ClusterSpec] = {}
        errors = set()
        for path in files:
            try:
                doc = load_kubeconfig(path)
            except ValueError as exc:
                errors.add(str(exc))
                continue
            cluster = model.ClusterId(path.stem)
            specs[cluster] = ClusterSpec(id=cluster, kubeconfig=doc, context=doc.get("current-context"),
                                         origin=f"kubeconfig dir {self.directory}")
        for error in sorted(errors - self._errors):
            log.error("kubeconfig skipped", error=error)
        self._errors = errors
        await self.registry.set_origin(f"dir:{self.directory}", specs)


def specs_from_secrets(
    secrets: Mapping[str, Mapping[str, Any]], *, namespace: str
) -> dict[model.ClusterId, ClusterSpec]:
    """Remote secrets -> cluster specs. Each data key of a labelled Secret is a cluster id, its value a kubeconfig."""
    specs: dict[model.ClusterId, ClusterSpec] = {}
    for name, data in sorted(secrets.items()):
        for key, encoded in sorted(data.items()):
            where = f"secret {namespace}/{name} key {key}"
            try:
                doc = check_kubeconfig(yaml.safe_load(base64.b64decode(encoded)), where=where)
            except (ValueError, yaml.YAMLError, TypeError) as exc:
                log.error("remote secret skipped", error=str(exc))
                continue
            cluster = model.ClusterId(key)
            if cluster in specs:
                log.error("cluster id in two remote secrets; keeping the first", cluster=cluster, ignored=where)
                continue
            specs[cluster] = ClusterSpec(id=cluster, kubeconfig=doc, context=doc.get("current-context"),
                                         origin=f"secret {namespace}/{name}")
    return specs
