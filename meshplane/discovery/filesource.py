"""A file source: one YAML file describes one cluster's services and endpoints.

The file stands in for a Kubernetes cluster (the demo, tests, static
deployments). It is polled (stat, then a content hash) rather than watched
with inotify because editors replace files in ways inotify reports
inconsistently, and a stat every 100 ms costs nothing. A broken edit is
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
import hashlib
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog
import yaml

from meshplane import aio
from meshplane.discovery import catalog as catalog_mod
from meshplane.discovery import model

log = structlog.get_logger(__name__)


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class EndpointFileError(ValueError):
    """A broken endpoint file: the message names the file and the field."""


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

    def __init__(self, path: Path, *, interval: float = 0.1) -> None:
        self.path = path
        self.interval = interval
        self.cluster: model.ClusterId | None = None
        self._stat: tuple[int, int, int] | None = None
        self._digest = b""
        self._task: asyncio.Task[None] | None = None
        self._last_error = ""

    def load(self, catalog: catalog_mod.Catalog) -> None:
        """Read the file once; raise EndpointFileError if it is broken (used at start-up)."""
        self._poll(catalog, raise_errors=True)

    async def start(self, catalog: catalog_mod.Catalog) -> None:
        self.load(catalog)
        self._task = asyncio.create_task(self._run(catalog), name=f"file-source:{self.path}")

    async def stop(self) -> None:
        await aio.cancel(self._task)
        self._task = None

    async def _run(self, catalog: catalog_mod.Catalog) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self._poll(catalog, raise_errors=False)

    def _poll(self, catalog: catalog_mod.Catalog, *, raise_errors: bool) -> None:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            self._fail(catalog, EndpointFileError(f"{self.path}: cannot read: {exc.strerror}"), raise_errors)
            return
        stat = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stat == self._stat:
            return
        seen_at = time.monotonic()
        self._stat = stat
        try:
            text = self.path.read_text()
        except OSError as exc:
            self._fail(catalog, EndpointFileError(f"{self.path}: cannot read: {exc.strerror}"), raise_errors)
            return
        digest = hashlib.sha256(text.encode()).digest()
        if digest == self._digest:
            return
        try:
            cluster, services = parse(text, path=str(self.path))
        except EndpointFileError as exc:
            self._fail(catalog, exc, raise_errors)
            return
        self._digest = digest
        self._last_error = ""
        if self.cluster is not None and cluster != self.cluster:
            catalog.remove_cluster(self.cluster, seen_at=seen_at)
        self.cluster = cluster
        change = catalog.apply(cluster, services, seen_at=seen_at)
        log.info(
            "endpoint file loaded",
            path=str(self.path),
            cluster=cluster,
            services=len(services),
            changed=sorted(change.services) if change else [],
        )

    def _fail(self, catalog: catalog_mod.Catalog, exc: EndpointFileError, raise_errors: bool) -> None:
        if raise_errors:
            raise exc
        if str(exc) == self._last_error:
            return  # logged once, not on every poll
        self._last_error = str(exc)
        log.error("endpoint file rejected, keeping last good", error=str(exc))
        if self.cluster is not None:
            catalog.mark_stale(self.cluster, str(exc))
