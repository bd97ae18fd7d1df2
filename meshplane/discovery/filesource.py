"""A file source: one YAML file describes one cluster's services and endpoints.

The file stands in for a Kubernetes cluster (the demo, tests, static
deployments). Its directory is watched with inotify, polled where that is
unavailable (meshplane/watch.py); a `touch` or the same bytes rewritten is
no change. An edit costs what it changed: each entry of `services` is
parsed on its own, and only the entries whose text changed are parsed
again (meshplane/discovery/fileparse.py) and handed to the catalog
(`Catalog.update`). An edit of a few entries is parsed on the event loop
(milliseconds); a bigger one, or a file parsed whole (seconds for 10,000
services), in a thread, so that pushes, streams and /healthz go on. A file
is read once its write is complete (at start-up too), and an edit that
drops most of its services is held until the file keeps it
(meshplane/hold.py). A broken edit is
logged with every problem (`file:line: field: reason`), and the last good
content stays. Each cluster has one file (`Claims`): a file naming a
cluster another file feeds is refused, at start-up and on an edit.

The fields and their rules are meshplane/discovery/filemodel.py's
(docs/serving.md lists them, docs/endpoints.schema.json is their schema)::

    cluster: cluster-1            # the cluster id (sub_zone for Envoy)
    region: cn-hangzhou
    services:
      - name: mockb
        namespace: default        # optional, default "default"
        ports: [{name: http, port: 8000, protocol: HTTP}]   # or appProtocol: http, as Kubernetes'
        endpoints:
          - address: 127.0.0.1    # an IPv4 or IPv6 address
            port: 18001           # or ports: {http: 18001}
            zone: cn-hangzhou-h
            labels: {version: v1}
            health: healthy       # healthy | draining | unhealthy
            weight: 1
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import time
from pathlib import Path

import structlog

from meshplane import aio, hold, problems, watch
from meshplane.discovery import catalog as catalog_mod
from meshplane.discovery import fileparse, model

log = structlog.get_logger(__name__)

ON_LOOP_ENTRIES = 50
"""An edit that parses at most this many service entries anew is parsed on the event loop (about 0.1 ms
each: a thread would only add its hand-offs); a bigger one, or a file parsed whole, in a thread."""


class Claims:
    """Which endpoint file feeds which cluster. Two files feeding one cluster would each replace the other's
    services on every edit, so the second is refused, naming the first."""

    def __init__(self) -> None:
        self._files: dict[model.ClusterId, Path] = {}

    def claim(self, cluster: model.ClusterId, *, path: Path, text: str) -> fileparse.EndpointFileError | None:
        """Record that `path` feeds `cluster`, or say why it cannot (another file does)."""
        other = self._files.setdefault(cluster, path)
        if other == path:
            return None
        found = re.search(r"^cluster[ \t]*:", text, re.MULTILINE)
        line = text.count("\n", 0, found.start()) + 1 if found is not None else 1
        return fileparse.EndpointFileError(found=[problems.Problem(
            str(path), line, "cluster", f"{cluster!r} is already the cluster of {other}: each cluster has one "
            "endpoint file (a second would replace the first's services)")])

    def release(self, cluster: model.ClusterId, *, path: Path) -> None:
        if self._files.get(cluster) == path:
            del self._files[cluster]


class FileSource:
    """Feeds one endpoint file into the catalog, now and on every edit."""

    def __init__(self, path: Path, *, interval: float = 0.1, inotify: bool = True,
                 claims: Claims | None = None) -> None:
        """`claims`: shared by every file source of one catalog, so that no two feed one cluster."""
        self.path = path
        self.interval = interval
        self.claims = claims if claims is not None else Claims()
        self.cluster: model.ClusterId | None = None
        self._seen: watch.Seen | None = None
        self._parsed: fileparse.Parsed | None = None
        self._task: asyncio.Task[None] | None = None
        self._watch = watch.Watch([path], interval=interval, inotify=inotify)
        self._hold = hold.Hold(held="endpoint file drops most of its services; applied if the file keeps them so",
                               said="endpoint file drops most of its services")
        self._last_error = ""

    async def load(self, catalog: catalog_mod.Catalog) -> None:
        """Read the file once it has settled; raise EndpointFileError if it is broken (used at start-up)."""
        seen_at = time.monotonic()
        got = await watch.read_settled(self.path)
        await self._take(catalog, got, seen_at=seen_at, raise_errors=True)

    async def start(self, catalog: catalog_mod.Catalog) -> None:
        await self.load(catalog)
        self._task = asyncio.create_task(
            aio.carry_on("endpoint-file", functools.partial(self._follow, catalog), again_after=max(self.interval, 1.0),
                         path=str(self.path)), name=f"file-source:{self.path}")

    async def stop(self) -> None:
        await aio.cancel(self._task)
        self._task = None

    async def watching(self) -> None:
        """Until the file is watched and has been looked at once since: a write from then on is seen."""
        await self._watch.ready.wait()

    async def _follow(self, catalog: catalog_mod.Catalog) -> None:
        events = self._watch.events()
        async with contextlib.aclosing(events):
            async for quiet in events:
                try:
                    await self.check(catalog, quiet=quiet)
                except Exception:  # a bug here must not stop later edits from being seen
                    aio.failed("endpoint-file", "endpoint file check failed", path=str(self.path))

    async def check(self, catalog: catalog_mod.Catalog, *, quiet: bool = False) -> None:
        """Look at the file once; hand what changed to the catalog. `quiet`: inotify saw nothing."""
        stat = watch.stat_of(self.path)
        if self._seen is not None and self._seen.unchanged(stat, quiet=quiet):
            return
        seen_at = time.monotonic()
        got = watch.read(self.path)
        if got.torn or self._watch.disturbed():
            return  # written while it was read: the watch wakes again once that write is complete
        await self._take(catalog, got, seen_at=seen_at, raise_errors=False)

    async def _take(self, catalog: catalog_mod.Catalog, got: watch.Read, *, seen_at: float,
                    raise_errors: bool) -> None:
        if isinstance(got.data, OSError):
            unread = f"--endpoints {self.path}: {problems.cannot_read(got.data)}"
            self._fail(catalog, fileparse.EndpointFileError(unread), raise_errors)
            return
        data = got.data
        # Still written after OPEN_WRITER_S at start-up: with no stat remembered, the first look reads it again.
        seen, last = watch.Seen.of(None if got.torn else got.stat, data), self._seen
        self._hold.saw(seen.digest)
        if last is not None and seen.digest == last.digest and not self._last_error:
            self._seen = seen
            return
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            self._seen = seen  # a broken edit too is looked at once, not on every event
            line = data[:exc.start].count(b"\n") + 1
            self._fail(catalog, fileparse.EndpointFileError(f"{self.path}:{line}: not UTF-8: {exc.reason}"),
                       raise_errors)
            return
        try:
            cluster, parsed, changed, removed = await self._parse(text)
        except fileparse.EndpointFileError as exc:
            self._seen = seen
            self._fail(catalog, exc, raise_errors)
            return
        # Written while it was parsed (off the loop, that can take a second): a complete version, and
        # applied, unless it drops most of the file (its writer may not be done: the watch wakes again).
        still = watch.stat_of(self.path) == got.stat and not self._watch.disturbed()
        if not self._kept(cluster, parsed, still=still):
            return
        self._seen = seen
        taken = self.claims.claim(cluster, path=self.path, text=text)
        if taken is not None:
            self._fail(catalog, taken, raise_errors)
            return
        self._last_error = ""
        if self.cluster is not None and cluster != self.cluster:
            self.claims.release(self.cluster, path=self.path)
            catalog.remove_cluster(self.cluster, seen_at=seen_at)
            self._parsed = None
        if self._parsed is None:
            change = catalog.apply(cluster, parsed.services, seen_at=seen_at)
        else:
            change = catalog.update(cluster, changed, removed, seen_at=seen_at)
        self.cluster, self._parsed = cluster, parsed
        log.info(
            "endpoint file loaded",
            path=str(self.path),
            cluster=cluster,
            services=len(parsed.services),
            # The first five by name: a file of 10,000 services changed whole is one line, not 300 KB of it.
            changed=hold.said(sorted(change.services) if change else [], of=len(parsed.services)),
        )

    async def _parse(self, text: str) -> tuple[model.ClusterId, fileparse.Parsed,
                                               dict[model.ServiceKey, model.ServiceInCluster], set[model.ServiceKey]]:
        """`fileparse.parse_changed` of the file: on the event loop when it parses a few entries anew,
        otherwise in a thread (10,000 services: about a second entry by entry, more parsed whole)."""
        path, last = str(self.path), self._parsed
        layout = fileparse.split(text)
        if layout is not None and fileparse.fresh(layout, last=last) <= ON_LOOP_ENTRIES:
            with contextlib.suppress(fileparse.Whole):
                return fileparse.parse_changed(text, path=path, last=last, whole=False, layout=layout)
        return await aio.off_loop(functools.partial(fileparse.parse_changed, text, path=path, last=last,
                                                    layout=layout))

    def _kept(self, cluster: model.ClusterId, parsed: fileparse.Parsed, *, still: bool) -> bool:
        """Whether the file as parsed may replace what it gave: yes, unless it drops most of its services
        (then once the file has kept them so for hold.HOLD_S)."""
        before = self._parsed.services if self._parsed is not None else {}
        lost = sorted(before.keys() - (parsed.services.keys() if cluster == self.cluster else set()))
        drops = {"dropped": hold.said(lost, of=len(before))} if hold.most(len(lost), of=len(before)) else None
        return self._hold.kept(drops, still=still, look=self._watch, path=str(self.path), cluster=self.cluster)

    def _fail(self, catalog: catalog_mod.Catalog, exc: fileparse.EndpointFileError, raise_errors: bool) -> None:
        if raise_errors:
            raise exc
        if str(exc) == self._last_error:
            return  # logged once, not on every event
        self._last_error = str(exc)
        log.error("endpoint file rejected, keeping last good", error=str(exc))
        if self.cluster is not None:
            catalog.mark_stale(self.cluster, str(exc))
