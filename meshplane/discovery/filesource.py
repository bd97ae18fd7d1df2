"""A file source: one YAML file describes one cluster's services and endpoints.

The file stands in for a Kubernetes cluster (the demo, tests, static
deployments). Its directory is watched with inotify, polled where that is
unavailable (meshplane/watch.py); a `touch` or the same bytes rewritten is
no change. An edit costs what it changed: each entry of `services` is
parsed on its own, and only the entries whose text changed are parsed
again and handed to the catalog (`Catalog.update`). A broken edit is
logged with the file and the field, and the last good content stays.

Format::

    cluster: cluster-1            # the cluster id (sub_zone for Envoy)
    region: cn-hangzhou
    services:
      - name: mockb
        namespace: default        # optional, default "default"
        ports: [{name: http, port: 8000, protocol: HTTP}]   # or appProtocol: http, as Kubernetes'
        endpoints:
          - address: 127.0.0.1
            port: 18001           # or ports: {http: 18001}
            zone: cn-hangzhou-h
            labels: {version: v1}
            health: healthy       # healthy | draining | unhealthy
            weight: 1
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog
import yaml

from meshplane import aio, watch
from meshplane.discovery import catalog as catalog_mod
from meshplane.discovery import model

log = structlog.get_logger(__name__)


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class EndpointFileError(ValueError):
    """A broken endpoint file: the message names the file and the field."""


class Parsed:
    """An endpoint file as last parsed: its cluster and region, its services, and each service entry's
    text -> the service's key (empty when the file was parsed whole)."""

    def __init__(self, cluster: str, region: str, services: dict[model.ServiceKey, model.ServiceInCluster],
                 entries: dict[str, model.ServiceKey] | None = None) -> None:
        self.cluster, self.region, self.services = cluster, region, services
        self.entries = entries or {}


_SERVICES = re.compile(r"^services:[ \t]*(?:#.*)?$", re.MULTILINE)
# The first line that is neither blank nor a comment; group 2: it is a list item.
_FIRST = re.compile(r"^( *)(?:(-)(?: |$)|[^ \t\r\n#])", re.MULTILINE)


def split(text: str) -> tuple[str, list[str]] | None:
    """The file without its `services` entries, and each entry's text (a block-style list item, as
    written by hand or by yaml.safe_dump); None for any other layout (then the file is parsed whole).
    Found with C-speed searches (a file of 10,000 services is 2.8 MB): a literal-prefixed regex for
    where the list ends, str.split for the items."""
    found = _SERVICES.search(text)
    if found is None:
        return None
    body = found.end() + 1
    first = _FIRST.search(text, body)
    if first is None or first.group(2) is None:
        return None  # `services:` followed by something else than a block list
    pad = first.group(1)
    indent = len(pad)
    # The list ends at the first line, neither blank nor a comment, indented less than its items (or as
    # much, but not an item).
    ends = re.compile(rf"\n(?: {{0,{indent - 1}}}[^ \t\r\n#]| {{{indent}}}[^ \t\r\n#-])" if indent else
                      r"\n[^ \t\r\n#-]")
    stop = ends.search(text, first.start())
    end = stop.start() + 1 if stop is not None else len(text)
    item = pad + "- "
    pieces = text[first.start() + len(item):end].split("\n" + item)
    entries = [f"{item}{piece}\n" for piece in pieces[:-1]] + [item + pieces[-1]]  # each a whole item's lines
    return text[:body] + text[end:], entries


def parse_changed(
    text: str, *, path: str, last: Parsed | None
) -> tuple[model.ClusterId, Parsed, dict[model.ServiceKey, model.ServiceInCluster], set[model.ServiceKey]]:
    """Parse `text`, reusing `last` for the service entries whose text is unchanged: the cluster, the file
    as parsed, the services that are new or changed, and the keys no longer in the file. Any layout
    `split` does not know, or any error, parses the whole file (whose errors name the field)."""
    old = last.services if last is not None else {}
    parts = split(text)
    if parts is not None:
        try:
            parsed, changed = _parse_parts(*parts, path=path, last=last)
        except (EndpointFileError, yaml.YAMLError, ValueError):
            pass  # said exactly by the whole-file parse below (or it parses whole where an entry alone did not)
        else:
            return model.ClusterId(parsed.cluster), parsed, changed, old.keys() - parsed.services.keys()
    cluster, services = parse(text, path=path)
    changed = {k: v for k, v in services.items() if old.get(k) != v}
    return cluster, Parsed(cluster, "", services), changed, old.keys() - services.keys()


def _parse_parts(
    rest: str, entries: list[str], *, path: str, last: Parsed | None
) -> tuple[Parsed, dict[model.ServiceKey, model.ServiceInCluster]]:
    """The file parsed entry by entry, reusing `last`'s services for the entries it has word for word;
    and the services of the entries parsed anew."""
    doc = yaml.load(rest, Loader=_LOADER)
    if not isinstance(doc, dict) or "services" not in doc or doc["services"] is not None:
        raise ValueError("not the layout split() expects")
    where = _Where(path)
    cluster = where.text(doc, "cluster", required=True)
    region = where.text(doc, "region", required=True)
    reuse = last is not None and (last.cluster, last.region) == (cluster, region)
    known = last.entries if reuse and last is not None else {}
    services: dict[model.ServiceKey, model.ServiceInCluster] = {}
    fresh: dict[model.ServiceKey, model.ServiceInCluster] = {}
    keys: dict[str, model.ServiceKey] = {}
    for i, entry in enumerate(entries):
        key = known.get(entry)
        if key is not None and last is not None:
            svc = last.services[key]
        else:
            items = yaml.load(entry, Loader=_LOADER)
            if not isinstance(items, list) or len(items) != 1:
                raise ValueError("an entry that is not one list item")
            svc = _service(where.at(f"services[{i}]"), items[0], cluster=cluster, region=region)
            key = svc.key
            fresh[key] = svc
        if key in services:
            raise EndpointFileError(f"{path}: services[{i}]: duplicate service {key}")
        services[key] = svc
        keys[entry] = key
    return Parsed(cluster, region, services, keys), fresh


def parse(text: str, *, path: str) -> tuple[model.ClusterId, dict[model.ServiceKey, model.ServiceInCluster]]:
    try:
        doc = yaml.load(text, Loader=_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f"{mark.line + 1}" if mark is not None else "0"
        raise EndpointFileError(f"{path}:{line}: not valid YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise EndpointFileError(f"{path}: top level must be a mapping with cluster, region, services")
    where = _Where(path)
    cluster = where.text(doc, "cluster", required=True)
    region = where.text(doc, "region", required=True)
    services: dict[model.ServiceKey, model.ServiceInCluster] = {}
    for i, raw in enumerate(where.items(doc, "services")):
        svc = _service(where.at(f"services[{i}]"), raw, cluster=cluster, region=region)
        if svc.key in services:
            raise EndpointFileError(f"{path}: services[{i}]: duplicate service {svc.key}")
        services[svc.key] = svc
    return model.ClusterId(cluster), services


def _service(where: _Where, raw: Any, *, cluster: str, region: str) -> model.ServiceInCluster:
    if not isinstance(raw, dict):
        raise where.error("must be a mapping")
    name = where.text(raw, "name", required=True)
    namespace = where.text(raw, "namespace") or "default"
    ports = []
    for j, p in enumerate(where.items(raw, "ports")):
        pw = where.at(f"ports[{j}]")
        if not isinstance(p, dict):
            raise pw.error("must be a mapping with name, port, protocol")
        ports.append(model.ServicePort(name=pw.text(p, "name", required=True), port=pw.port(p, "port"),
                                       protocol=_protocol(pw, p)))
    if not ports:
        raise where.error("ports: a service needs at least one port")
    endpoints = []
    for k, e in enumerate(where.items(raw, "endpoints")):
        endpoints.append(_endpoint(where.at(f"endpoints[{k}]"), e, ports=ports, cluster=cluster, region=region))
    return model.ServiceInCluster(name=name, namespace=namespace, ports=tuple(ports), endpoints=tuple(endpoints))


def _protocol(where: _Where, raw: Mapping[str, Any]) -> model.Protocol:
    """`protocol` (what Envoy speaks: HTTP, the default), or Kubernetes' `appProtocol`, or both if they agree."""
    stated = None
    if "protocol" in raw:
        text = str(raw["protocol"]).upper()
        try:
            stated = model.Protocol(text)
        except ValueError:
            choices = ", ".join(x.value for x in model.Protocol)
            raise where.error(f"protocol: {text!r} is not one of {choices}") from None
    if raw.get("appProtocol") is None:
        return stated or model.Protocol.HTTP
    app = where.text(raw, "appProtocol")
    implied = model.app_protocol(app)
    if stated is not None and stated != implied:
        raise where.at("appProtocol").error(
            f"{app!r} is {implied.value}, but protocol says {stated.value} (protocol here is what Envoy speaks to "
            "the port, not Kubernetes' TCP or UDP: give one of the two, or both alike)")
    return implied


def _endpoint(
    where: _Where, raw: Any, *, ports: list[model.ServicePort], cluster: str, region: str
) -> model.Endpoint:
    if not isinstance(raw, dict):
        raise where.error("must be a mapping")
    if "port" in raw:
        if len(ports) != 1:
            raise where.error("port: the service has several ports; use ports: {name: number}")
        port_map = {ports[0].name: where.port(raw, "port")}
    elif isinstance(raw.get("ports"), dict):
        port_map = {str(k): where.port(raw["ports"], k) for k in raw["ports"]}
        unknown = set(port_map) - {p.name for p in ports}
        if unknown:
            raise where.error(f"ports: {sorted(unknown)} are not ports of the service")
    else:
        port_map = {p.name: p.port for p in ports}
    health_text = str(raw.get("health", "healthy")).lower()
    try:
        health = model.Health(health_text)
    except ValueError:
        raise where.error(f"health: {health_text!r} is not one of healthy, draining, unhealthy") from None
    labels = raw.get("labels") or {}
    if not isinstance(labels, dict):
        raise where.error("labels: must be a mapping of strings")
    weight = raw.get("weight", 1)
    if not isinstance(weight, int) or isinstance(weight, bool) or not 1 <= weight <= 128:
        raise where.error(f"weight: {weight!r} must be an integer from 1 to 128")
    return model.Endpoint(
        address=where.text(raw, "address", required=True),
        ports=tuple(sorted(port_map.items())),
        locality=model.Locality(region=region, zone=where.text(raw, "zone"), cluster=cluster),
        labels=tuple(sorted((str(k), str(v)) for k, v in labels.items())),
        health=health,
        weight=weight,
    )


class _Where:
    """Builds error messages that say which file and which field."""

    def __init__(self, path: str, field: str = "") -> None:
        self.path = path
        self.field = field

    def at(self, sub: str) -> _Where:
        return _Where(self.path, f"{self.field}.{sub}" if self.field else sub)

    def error(self, reason: str) -> EndpointFileError:
        return EndpointFileError(f"{self.path}: {self.field or '(top)'}: {reason}")

    def text(self, raw: Mapping[str, Any], key: str, *, required: bool = False) -> str:
        value = raw.get(key)
        if value is None:
            if required:
                raise self.at(key).error("required")
            return ""
        if not isinstance(value, str | int) or isinstance(value, bool):
            raise self.at(key).error(f"must be a string, not {value!r}")
        return str(value)

    def port(self, raw: Mapping[Any, Any], key: Any) -> int:
        value = raw.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
            raise self.at(str(key)).error(f"{value!r} is not a port number (1-65535)")
        return value

    def items(self, raw: Mapping[str, Any], key: str) -> list[Any]:
        value = raw.get(key) or []
        if not isinstance(value, list):
            raise self.at(key).error("must be a list")
        return value


class FileSource:
    """Feeds one endpoint file into the catalog, now and on every edit."""

    def __init__(self, path: Path, *, interval: float = 0.1, inotify: bool = True) -> None:
        self.path = path
        self.interval = interval
        self.inotify = inotify
        self.cluster: model.ClusterId | None = None
        self._seen: watch.Seen | None = None
        self._parsed: Parsed | None = None
        self._task: asyncio.Task[None] | None = None
        self._watch: watch.Watch | None = None
        self._hold = watch.Hold()
        self._last_error = ""

    def load(self, catalog: catalog_mod.Catalog) -> None:
        """Read the file once; raise EndpointFileError if it is broken (used at start-up)."""
        self.check(catalog, raise_errors=True)

    async def start(self, catalog: catalog_mod.Catalog) -> None:
        self.load(catalog)
        self._task = asyncio.create_task(self._run(catalog), name=f"file-source:{self.path}")

    async def stop(self) -> None:
        await aio.cancel(self._task)
        self._task = None

    async def _run(self, catalog: catalog_mod.Catalog) -> None:
        self._watch = watch.Watch([self.path], interval=self.interval, inotify=self.inotify)
        events = self._watch.events()
        async with contextlib.aclosing(events):
            async for quiet in events:
                try:
                    self.check(catalog, raise_errors=False, quiet=quiet)
                except Exception:  # a bug here must not stop later edits from being seen
                    log.exception("endpoint file check failed", path=str(self.path))

    def check(self, catalog: catalog_mod.Catalog, *, raise_errors: bool, quiet: bool = False) -> None:
        """Look at the file once; hand what changed to the catalog. `quiet`: inotify saw nothing."""
        stat = watch.stat_of(self.path)
        if self._seen is not None and self._seen.unchanged(stat, quiet=quiet):
            return
        seen_at = time.monotonic()
        got = watch.read(self.path)
        if not raise_errors and (got.torn or (self._watch is not None and self._watch.disturbed())):
            return  # written while it was read: the watch wakes again once that write is complete
        if isinstance(got.data, OSError):
            self._fail(catalog, EndpointFileError(f"{self.path}: cannot read: {got.data.strerror}"), raise_errors)
            return
        data = got.data
        # At start-up a file written while it was read is taken as read; with no stat remembered, the
        # watch's first look reads it again.
        seen, last = watch.Seen.of(None if got.torn else got.stat, data), self._seen
        held = self._hold.saw(seen.digest)
        if last is not None and seen.digest == last.digest and not self._last_error:
            self._seen = seen
            return
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            self._seen = seen  # a broken edit too is looked at once, not on every event
            line = data[:exc.start].count(b"\n") + 1
            self._fail(catalog, EndpointFileError(f"{self.path}:{line}: not UTF-8: {exc.reason}"), raise_errors)
            return
        try:
            cluster, parsed, changed, removed = parse_changed(text, path=str(self.path), last=self._parsed)
        except EndpointFileError as exc:
            self._seen = seen
            self._fail(catalog, exc, raise_errors)
            return
        if not self._kept(cluster, parsed, wait=held):
            return
        self._seen = seen
        self._last_error = ""
        if self.cluster is not None and cluster != self.cluster:
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
            changed=sorted(change.services) if change else [],
        )

    def _kept(self, cluster: model.ClusterId, parsed: Parsed, *, wait: float) -> bool:
        """Whether the file as parsed may replace what it gave: yes, unless it drops most of its services and
        must keep this content `wait` seconds more to have kept it watch.HOLD_S (a writer that truncated it may
        not be done)."""
        before = self._parsed.services if self._parsed is not None else {}
        lost = sorted(before.keys() - (parsed.services.keys() if cluster == self.cluster else set()))
        if not watch.most(len(lost), of=len(before)):
            return True
        if wait > 0:
            log.info("endpoint file drops most of its services; applied if the file keeps them so",
                     path=str(self.path), seconds=round(wait, 3))
            if self._watch is not None:
                self._watch.look_again(wait)
            return False
        log.warning("endpoint file drops most of its services", path=str(self.path), cluster=self.cluster,
                    dropped=watch.said(lost, of=len(before)))
        return True

    def _fail(self, catalog: catalog_mod.Catalog, exc: EndpointFileError, raise_errors: bool) -> None:
        if raise_errors:
            raise exc
        if str(exc) == self._last_error:
            return  # logged once, not on every event
        self._last_error = str(exc)
        log.error("endpoint file rejected, keeping last good", error=str(exc))
        if self.cluster is not None:
            catalog.mark_stale(self.cluster, str(exc))
