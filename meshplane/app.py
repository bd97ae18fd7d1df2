"""The control plane assembled: sources -> catalog -> push loop -> view cache -> ADS server.

`ControlPlane` is what `meshplane serve` and `meshplane demo` run, and what
end-to-end tests start in-process. Its HTTP port serves /metrics
(Prometheus), /ready, /healthz and /debug/* (what the control plane would
send, and why).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import grpc
import structlog
from prometheus_client import exposition

from meshplane.discovery import catalog as catalog_mod
from meshplane.discovery import filesource, model
from meshplane.policy import locality as locality_mod
from meshplane.policy import reload
from meshplane.policy import types as policy_types
from meshplane.xds import metrics as metrics_mod
from meshplane.xds import push, server, views

log = structlog.get_logger(__name__)


@dataclass(frozen=True, kw_only=True)
class Config:
    endpoint_files: tuple[Path, ...] = ()
    policy_file: Path | None = None
    ads_host: str = "127.0.0.1"
    ads_port: int = 18000
    http_host: str = "127.0.0.1"
    http_port: int = 18001  # 0: no HTTP port
    debounce: float = 0.005
    max_delay: float = 0.1
    poll_interval: float = 0.1
    identifier: str = "meshplane"
    extra: dict[str, Any] = field(default_factory=dict)


class ControlPlane:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = metrics_mod.Metrics()
        self.catalog = catalog_mod.Catalog()
        self.sources = [filesource.FileSource(p, interval=config.poll_interval) for p in config.endpoint_files]
        self.policy_watcher = reload.PolicyWatcher(
            config.policy_file, on_change=self._on_policy, interval=config.poll_interval
        )
        self.cache: views.ViewCache | None = None
        self.ads: server.AdsServer | None = None
        self.push: push.PushLoop | None = None
        self._grpc: grpc.aio.Server | None = None
        self._http: asyncio.Server | None = None
        self.ads_port = 0
        self.http_port = 0

    async def start(self) -> None:
        """Load everything once (raising on broken input), then serve."""
        await self.policy_watcher.start()
        for source in self.sources:
            await source.start(self.catalog)
        self.cache = views.ViewCache(services=self.catalog.services, policy=self.policy_watcher.current)
        self.ads = server.AdsServer(self.cache, callbacks=self.metrics, identifier=self.config.identifier)
        self.push = push.PushLoop(
            cache=self.cache, server=self.ads, services=lambda: self.catalog.services,
            metrics=self.metrics, debounce=self.config.debounce, max_delay=self.config.max_delay,
        )
        self.catalog.subscribe(self.push.on_catalog_change)
        self.push.start()
        self._grpc = grpc.aio.server(
            options=[("grpc.keepalive_time_ms", 30_000), ("grpc.http2.max_pings_without_data", 0)]
        )
        self._grpc.add_generic_rpc_handlers((self.ads.rpc_handler(),))
        self.ads_port = self._grpc.add_insecure_port(f"{self.config.ads_host}:{self.config.ads_port}")
        if self.ads_port == 0:
            raise OSError(f"cannot listen for ADS on {self.config.ads_host}:{self.config.ads_port}")
        await self._grpc.start()
        if self.config.http_port >= 0:
            self._http = await asyncio.start_server(self._http_request, self.config.http_host, self.config.http_port)
            self.http_port = self._http.sockets[0].getsockname()[1]
        log.info("control plane serving", ads=f"{self.config.ads_host}:{self.ads_port}",
                 http=f"{self.config.http_host}:{self.http_port}", services=len(self.catalog.services))

    async def stop(self) -> None:
        if self._grpc is not None:
            await self._grpc.stop(grace=0.5)
            self._grpc = None
        if self._http is not None:
            self._http.close()
            await self._http.wait_closed()
            self._http = None
        if self.push is not None:
            await self.push.stop()
        for source in self.sources:
            await source.stop()
        await self.policy_watcher.stop()

    async def __aenter__(self) -> ControlPlane:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _on_policy(self, policy: policy_types.Policy, seen_at: float) -> None:
        self.metrics.policy_reloads.labels("applied").inc()
        if self.push is not None:
            self.push.on_policy(policy, seen_at)

    def ready(self) -> bool:
        return self._grpc is not None and self.catalog.ready()

    # HTTP: metrics, readiness, debug

    async def _http_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=5)
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass
            parts = line.decode("latin-1").split()
            target = urlsplit(parts[1] if len(parts) > 1 else "/")
            status, ctype, body = self._route(target.path, parse_qs(target.query))
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    def _route(self, path: str, query: dict[str, list[str]]) -> tuple[str, str, bytes]:
        if path == "/metrics":
            self._refresh_gauges()
            return "200 OK", exposition.CONTENT_TYPE_LATEST, exposition.generate_latest(self.metrics.registry)
        if path == "/healthz":
            return "200 OK", "text/plain", b"ok\n"
        if path == "/ready":
            ok = self.ready()
            body = {"ready": ok, "clusters": self._cluster_status()}
            return ("200 OK" if ok else "503 Service Unavailable"), "application/json", _json(body)
        if path == "/debug/views" and self.cache is not None:
            return "200 OK", "application/json", _json(
                [{"view": str(v.key), "streams": v.streams,
                  "resources": {t.rsplit(".", 1)[-1]: len(r) for t, r in v.resources.items()}}
                 for v in self.cache.views.values()]
            )
        if path == "/debug/placements":
            return self._placements(query)
        return "404 Not Found", "text/plain", b"not found\n"

    def _placements(self, query: dict[str, list[str]]) -> tuple[str, str, bytes]:
        """Where traffic from a locality goes for a service, and why (the priority table we send)."""
        def arg(name: str) -> str:
            return query.get(name, [""])[0]
        key = model.ServiceKey(arg("service") if "/" in arg("service") else f"default/{arg('service')}")
        service = self.catalog.services.get(key)
        if service is None or self.cache is None:
            return "404 Not Found", "application/json", _json({"error": f"unknown service {key!r}"})
        client = model.Locality(region=arg("region"), zone=arg("zone"), cluster=arg("cluster"))
        settings = self.cache.policy.for_service(key).locality
        placements = locality_mod.place(service.endpoints, client=client, client_labels={}, settings=settings)
        return "200 OK", "application/json", _json({
            "service": key, "client": str(client),
            "placements": [
                {"priority": p.priority, "locality": str(p.locality), "weight": p.weight,
                 "endpoints": [{"address": e.address, "ports": dict(e.ports), "health": e.health.value}
                               for e in p.endpoints]}
                for p in placements
            ],
        })

    def _cluster_status(self) -> dict[str, Any]:
        return {c: {"synced": s.synced, "stale": s.stale, "error": s.error} for c, s in self.catalog.status().items()}

    def _refresh_gauges(self) -> None:
        for cluster, status in self.catalog.status().items():
            self.metrics.cluster_synced.labels(cluster).set(1 if status.synced else 0)
            self.metrics.cluster_stale.labels(cluster).set(1 if status.stale else 0)


def _json(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()

