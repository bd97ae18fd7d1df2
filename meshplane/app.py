"""The control plane assembled: sources -> catalog -> push loop -> view cache -> ADS server
(docs/architecture.md draws it).

`ControlPlane` is what `meshplane serve` and `meshplane demo` run, and what
end-to-end tests start in-process. Its HTTP port (meshplane/admin.py) serves
/metrics (Prometheus), /ready, /healthz and /debug/* (what the control plane
would send, and why).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import structlog
from prometheus_client import exposition

import meshplane
from meshplane import admin, aio, credentials, explain, listen, tlsfront
from meshplane import tls as tls_mod
from meshplane.discovery import catalog as catalog_mod
from meshplane.discovery import clusters, filesource, kube, kubesource, model, remotesecrets
from meshplane.policy import placement, reload, rules, validate
from meshplane.xds import adsbase, delta, generators, identity, push, refusals, slots, sotw, streams, syncz, views
from meshplane.xds import metrics as metrics_mod

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
    poll_interval: float = 0.1  # files are watched with inotify; this is the fallback poll (and a backstop)
    inotify: bool = True  # False: find file edits by polling only
    max_concurrent_pushes: int = 100
    stall_after: float = 0.1  # a heavy push's write not taken by its client in this long gives its slot back
    http_timeout: float = 5.0  # an idle or half-sent HTTP request is closed after this long
    identifier: str = "meshplane"
    # An ADS connection is closed (GOAWAY) after about this long, and its streams after the grace
    # period more: clients reconnect, so they rebalance over replicas that came back (0: never).
    max_connection_age: float = 1800.0
    max_connection_age_grace: float = 10.0
    # TLS on the ADS port (docs/security.md): then `ads_host:ads_port` is TLS, and a plaintext
    # listener exists only if asked for.
    tls: tls_mod.TlsFiles | None = None
    ads_plaintext: str | None = None  # HOST:PORT
    trust_domain: str = "cluster.local"
    limits: adsbase.Limits = field(default_factory=adsbase.Limits)
    # Kubernetes clusters (docs/kubernetes.md)
    local_cluster: str | None = None  # ID[=KUBECONFIG[#CONTEXT]]: also where remote secrets live
    kubeconfigs: tuple[str, ...] = ()  # [ID=]PATH[#CONTEXT]
    kubeconfig_dirs: tuple[Path, ...] = ()
    remote_secrets_namespace: str | None = None
    kube: kubesource.KubeOptions = field(default_factory=kubesource.KubeOptions)
    sync_timeout: float = 30.0
    kubeconfig_dir_interval: float = 1.0


class ControlPlane:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = metrics_mod.Metrics()
        self.catalog = catalog_mod.Catalog()
        claims = filesource.Claims()  # one file per cluster, across every endpoint file
        self.sources = [filesource.FileSource(p, interval=config.poll_interval, inotify=config.inotify, claims=claims)
                        for p in config.endpoint_files]
        self.policy_watcher = reload.PolicyWatcher(
            config.policy_file, on_change=self._on_policy, interval=config.poll_interval, known=self._known,
            on_result=lambda result: self.metrics.policy_reloads.labels(result).inc(), inotify=config.inotify,
            on_warnings=self.metrics.policy_warned,
        )
        self.clusters = clusters.ClusterRegistry(self.catalog, self._kube_source, sync_timeout=config.sync_timeout)
        self.kubeconfig_dirs = [
            clusters.KubeconfigDir(d, self.clusters, interval=config.kubeconfig_dir_interval, inotify=config.inotify)
            for d in config.kubeconfig_dirs
        ]
        self.remote_secrets: remotesecrets.RemoteSecrets | None = None
        self._started_at = 0.0
        self._ready = False  # latched by ready()
        self._readiness: asyncio.Task[None] | None = None
        self.cache: views.ViewCache | None = None
        self.streams = streams.Registry(held=True)  # answered once ready()
        self.refused = refusals.Refusals()  # clients refused lately, by address and reason (both protocols)
        self.ads: sotw.SotwServer | None = None
        self.delta: delta.DeltaServer | None = None
        self.push: push.PushLoop | None = None
        self._grpc: grpc.aio.Server | None = None
        self._http: admin.HttpPort | None = None
        self.ads_port = 0
        self.ads_plaintext_port = 0
        self.tls: credentials.ServerTls | None = None
        self._front: tlsfront.TlsFront | None = None  # with --client-cert optional: meshplane's own TLS
        self.http_port = 0

    async def start(self) -> None:
        """Load everything once (raising on broken input), then serve."""
        for flag, (host, port) in self._addresses().items():  # a port taken: refused before anything starts
            listen.check(flag, host, port)
        if self.config.tls is not None:  # so are certificates that cannot be used
            self.tls = await credentials.ServerTls.open(
                self.config.tls, on_reload=self.metrics.tls_reloaded, interval=self.config.poll_interval,
                inotify=self.config.inotify)
            if self.config.tls.optional_client_cert:  # grpcio cannot ask for a certificate it does not require
                self._front = tlsfront.TlsFront(self.tls, client_limits=self.config.limits,
                                                on_refused=self._relay_refused)
        peers = self._front.peer if self._front is not None else identity.from_grpc
        await self.policy_watcher.start()
        for source in self.sources:
            await source.start(self.catalog)
        self.cache = views.ViewCache(
            services=self.catalog.services, policy=self.policy_watcher.current, generators=generators.by_kind(),
            on_build_error=self.metrics.build_failed,
        )
        # Both protocols on one port, one registry and one set of push slots: a reconnect storm is
        # bounded whichever protocol its clients speak.
        push_slots = slots.PushSlots(self.config.max_concurrent_pushes, stall_after=self.config.stall_after)
        self.ads = sotw.SotwServer(
            self.cache, registry=self.streams, callbacks=self.metrics, identifier=self.config.identifier,
            push_slots=push_slots, trust_domain=self.config.trust_domain, limits=self.config.limits,
            refused=self.refused, peers=peers,
        )
        self.delta = delta.DeltaServer(
            self.cache, registry=self.streams, callbacks=self.metrics, identifier=self.config.identifier,
            push_slots=push_slots, trust_domain=self.config.trust_domain, limits=self.config.limits,
            refused=self.refused, peers=peers,
        )
        self.push = push.PushLoop(
            cache=self.cache, services=lambda: self.catalog.services,
            metrics=self.metrics, debounce=self.config.debounce, max_delay=self.config.max_delay,
        )
        self.catalog.subscribe(self.push.on_catalog_change)
        self.push.start()
        self._started_at = time.monotonic()
        await self._start_kubernetes()
        self._readiness = asyncio.create_task(self._announce_ready(), name="readiness")
        options: list[tuple[str, int]] = [("grpc.keepalive_time_ms", 30_000), ("grpc.http2.max_pings_without_data", 0),
                                          ("grpc.so_reuseport", 0)]  # a second control plane on the port: refused
        # gRPC refuses what is far over the request limit itself; up to 1 MiB over, meshplane does, and counts it.
        request_bytes = self.config.limits.request_bytes
        options.append(("grpc.max_receive_message_length", request_bytes + 2**20 if request_bytes else -1))
        if self.config.max_connection_age > 0:  # gRPC adds +-10 % jitter: reconnects do not come all at once
            options += [("grpc.max_connection_age_ms", int(self.config.max_connection_age * 1000)),
                        ("grpc.max_connection_age_grace_ms", int(self.config.max_connection_age_grace * 1000))]
        self._grpc = grpc.aio.server(options=options)
        self._grpc.add_generic_rpc_handlers((self.ads.rpc_handler(), self.delta.rpc_handler()))
        addresses = self._addresses()
        if self._front is not None:  # gRPC serves the relay's private socket; the ADS address is the relay's
            if not self._grpc.add_insecure_port(self._front.grpc_address):
                raise listen.ListenError(f"cannot listen on {self._front.grpc_address} for the TLS relay")
        elif self.tls is not None:
            self.ads_port = _bind(self._grpc, "--ads", addresses["--ads"], self.tls.credentials)
        else:
            self.ads_port = _bind(self._grpc, "--ads", addresses["--ads"])
        if "--ads-plaintext" in addresses:
            self.ads_plaintext_port = _bind(self._grpc, "--ads-plaintext", addresses["--ads-plaintext"])
        await self._grpc.start()
        if self._front is not None:
            self.ads_port = await self._front.start(*addresses["--ads"])
        self.ready()  # with nothing to sync (endpoint files only), ready and answering at once
        if "--http" in addresses:
            host, port = addresses["--http"]
            self._http = admin.HttpPort(self._pages(), timeout=self.config.http_timeout)
            self.http_port = await self._http.start(host, port)
        log.info("control plane serving", ads=listen.join(self.config.ads_host, self.ads_port),
                 tls=self.config.tls is not None, ads_plaintext=self.config.ads_plaintext or "",
                 http=listen.join(self.config.http_host, self.http_port), services=len(self.catalog.services))

    def _addresses(self) -> dict[str, tuple[str, int]]:
        """Where the control plane listens, by the `serve` flag that says so."""
        config = self.config
        addresses = {"--ads": (config.ads_host, config.ads_port)}
        if config.ads_plaintext:
            addresses["--ads-plaintext"] = listen.parse(config.ads_plaintext)
        if config.http_port >= 0:
            addresses["--http"] = (config.http_host, config.http_port)
        return addresses

    async def _start_kubernetes(self) -> None:
        """Clusters from the command line first (errors stop start-up), then the run-time origins."""
        specs = [clusters.spec_from_file(arg) for arg in self.config.kubeconfigs]
        local = self._local_spec()
        if local is not None:
            specs.insert(0, local)
        await self.clusters.set_origin("command line", {s.id: s for s in specs}, strict=True)
        for directory in self.kubeconfig_dirs:
            await directory.start()
        if self.config.remote_secrets_namespace:
            if local is None:
                raise ValueError("--remote-secrets needs --local-cluster: the Secrets are read from the local cluster")
            self.remote_secrets = remotesecrets.RemoteSecrets(
                api_client=self._client(local), namespace=self.config.remote_secrets_namespace, registry=self.clusters,
                options=self.config.kube.reflector_options(),
            )
            await self.remote_secrets.start()

    def _local_spec(self) -> clusters.ClusterSpec | None:
        if not self.config.local_cluster:
            return None
        cluster, _, where = self.config.local_cluster.partition("=")
        if where:
            spec = clusters.spec_from_file(self.config.local_cluster, flag="--local-cluster")
            return clusters.ClusterSpec(id=spec.id, kubeconfig=spec.kubeconfig, context=spec.context, origin="local")
        return clusters.ClusterSpec(id=model.ClusterId(cluster), kubeconfig=None, origin="local")

    def _client(self, spec: clusters.ClusterSpec) -> Any:
        if spec.kubeconfig is None:
            return kube.local_client(in_cluster=bool(os.environ.get("KUBERNETES_SERVICE_HOST")))
        return kube.client_from_kubeconfig(spec.kubeconfig, context=spec.context)

    def _kube_source(self, spec: clusters.ClusterSpec) -> clusters.Source:
        return _OwnedSource(kubesource.KubeSource(spec.id, self._client(spec), options=self.config.kube))

    async def _announce_ready(self) -> None:
        """Say once, in the log, when the control plane is ready and how each cluster stands."""
        while not self.ready():  # which opens the held streams the moment it turns true
            await asyncio.sleep(0.05)
        log.info("ready", clusters=self._cluster_status())

    async def stop(self) -> None:
        await aio.cancel(self._readiness)
        self._readiness = None
        if self.remote_secrets is not None:
            await self.remote_secrets.stop()
        for directory in self.kubeconfig_dirs:
            await directory.stop()
        await self.clusters.stop()
        if self._front is not None:  # no new TLS connection for a server that stops: they would find no gRPC
            self._front.close()
        if self._grpc is not None:
            await self._grpc.stop(grace=0.5)  # the relayed connections' streams end here, within the grace
            self._grpc = None
        if self._front is not None:
            await self._front.stop()
            self._front = None
        if self.tls is not None:
            await self.tls.stop()
        if self._http is not None:
            await self._http.stop()
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

    def _relay_refused(self, event: str, *, peer: str, code: str, reason: str, message: str) -> None:
        """A client refused by meshplane's own TLS (--client-cert optional): its handshake, or a connection cap."""
        self.refused.refuse(event, callbacks=self.metrics, peer=peer, code=code, reason=reason, message=message)

    def _known(self) -> validate.Known | None:
        """What discovery knows, for the policy's warnings; nothing before the plane is ready (while
        clusters are still listing, every service would look unknown)."""
        if not self._ready:
            return None
        return known_from(self.catalog.services, self.catalog.status())

    def _on_policy(self, policy: rules.Policy, seen_at: float) -> None:
        if self.push is not None:
            self.push.on_policy(policy, seen_at)

    def ready(self) -> bool:
        """Serving, and start-up is over: every cluster listed once or timed out, the remote secrets listed.

        Latched, as Istio does: readiness gates start-up only, so a cluster added or reconnected at run
        time (or one that goes stale) never turns it off. /ready's body and the log say how each cluster stands.
        """
        if self._grpc is None:
            return False
        if not self._ready:
            secrets = self.remote_secrets
            waited = time.monotonic() - self._started_at >= self.config.sync_timeout
            self._ready = self.clusters.ready() and (secrets is None or secrets.synced.is_set() or waited)
            if self._ready and self.push is not None:
                # The push loop may still be debouncing the first syncs: the streams held until now, and a
                # proxy sent here because we are ready, must get them, not the empty views the cache was built with.
                self.push.flush()
                self.streams.open()
        return self._ready

    def build_errors(self) -> list[views.BuildError]:
        """Builds failing now: their services are served their last good resources."""
        return self.cache.build_errors() if self.cache is not None else []

    # HTTP: metrics, readiness, debug

    def _pages(self) -> dict[str, admin.Page]:
        listed: dict[str, tuple[admin.Page, str]] = {
            "/metrics": (self._metrics_page, "Prometheus metrics"),
            "/healthz": (lambda query: admin.Reply(200, "text/plain", b"ok\n"), "200 while the process runs"),
            "/ready": (self._ready_page, "200 once start-up is over (503 before); each cluster, build errors, version"),
            "/debug/syncz": (self._syncz_page, "every connected proxy and, per type, SYNCED / STALE / NACKED / "
                                               "NOT SENT (meshplane status; ?kind= &locality= &state=)"),
            "/debug/config_dump": (self._config_dump_page, "what was sent to one proxy and what it ACKed "
                                                           "(meshplane config-dump; ?proxy=NODE_ID)"),
            "/debug/explain": (self._explain_page, "where a client's traffic goes and why, and what if "
                                                   "(meshplane explain; ?service=S&from=R/Z/C, &down=...)"),
            "/debug/placements": (self._placements, "the priority table alone (?service=S&region=R&zone=Z&cluster=C)"),
            "/debug/views": (self._views_page, "the distinct views served, their streams and resources"),
        }
        index = admin.index_page(f"meshplane {meshplane.version()}: this HTTP port serves (docs/serving.md)",
                                 {path: about for path, (_, about) in listed.items()})
        return {"/": index, "/debug": index, "/debug/": index, **{path: page for path, (page, _) in listed.items()}}

    def _syncz_page(self, query: Mapping[str, str]) -> admin.Reply:
        """Every connected client and, per type, SYNCED / STALE / NACKED / NOT SENT (`meshplane status`)."""
        everyone = syncz.clients(self.streams, now=time.time(), now_monotonic=time.monotonic())
        try:
            table = syncz.select(everyone, query)
        except ValueError as exc:
            return admin.Reply(400, "application/json", _json({"error": str(exc)}))
        pending = self.push.pending_since() if self.push is not None else None
        # A change seen but not yet handed to the views: every client may be behind it.
        behind = None if pending is None else round(time.monotonic() - pending, 3)
        return admin.Reply(200, "application/json", _json(
            {"version": meshplane.version(), "pending_change_s": behind, "clients": table, "connected": len(everyone),
             **syncz.refused(self.refused)}))

    def _config_dump_page(self, query: Mapping[str, str]) -> admin.Reply:
        """What was sent to one client (`?proxy=NODE_ID`) and what it ACKed, per type."""
        node = query.get("proxy", "")
        if not node:
            return admin.Reply(400, "application/json", _json({"error": "give the proxy: ?proxy=NODE_ID"}))
        found = [s for s in self.streams if s.proxy is not None and s.proxy.id == node]
        if not found:
            known = sorted({s.proxy.id for s in self.streams if s.proxy is not None})
            return admin.Reply(404, "application/json", _json(
                {"error": f"no client with node id {node!r} is connected", "connected": known}))
        # Several streams of one id (a proxy restarting): the newest is the one that counts.
        return admin.Reply(200, "application/json", _json(syncz.config_dump(max(found, key=lambda s: s.id))))

    def _metrics_page(self, query: Mapping[str, str]) -> admin.Reply:
        self._refresh_gauges()
        return admin.Reply(200, exposition.CONTENT_TYPE_LATEST, exposition.generate_latest(self.metrics.registry))

    def _ready_page(self, query: Mapping[str, str]) -> admin.Reply:
        ok = self.ready()
        body = {"ready": ok, "version": meshplane.version(), "clusters": self._cluster_status(),
                "build_errors": [{"service": e.service, "type": e.type, "error": e.error}
                                 for e in self.build_errors()],
                # A rotation that could not be taken does not make the plane unready (the previous certificate
                # is served), but it is here until a good one is, with the date the served one expires.
                "tls": self.tls.status() if self.tls is not None else None,
                # The policy in force: its warnings; and the errors of the last edit, if it was rejected.
                "policy": {"warnings": [str(p) for p in self.policy_watcher.last_warnings],
                           "errors": [str(p) for p in self.policy_watcher.last_errors]}}
        return admin.Reply(200 if ok else 503, "application/json", _json(body))

    def _views_page(self, query: Mapping[str, str]) -> admin.Reply:
        views_now = self.cache.views.values() if self.cache is not None else ()
        return admin.Reply(200, "application/json", _json(
            [{"view": str(v.key), "streams": v.streams,
              "resources": {t.rsplit(".", 1)[-1]: len(r) for t, r in v.resources.items()}}
             for v in views_now]
        ))

    def _placements(self, query: Mapping[str, str]) -> admin.Reply:
        """Where traffic from a locality goes for a service, and why (the priority table we send)."""
        def arg(name: str) -> str:
            return query.get(name, "")
        if not arg("service"):
            return admin.Reply(400, "application/json", _json({"error": "give the service: ?service=NAMESPACE/NAME"}))
        key = explain.service_key(arg("service"))
        service = self.catalog.services.get(key)
        if service is None or self.cache is None:
            return admin.Reply(404, "application/json", _json({"error": f"unknown service {key!r}"}))
        origin = "/".join((arg("region"), arg("zone"), arg("cluster"))) if arg("region") else arg("zone")
        try:
            client = explain.locality(origin, self.catalog.services) if origin else model.Locality()
        except explain.ExplainError as exc:
            return admin.Reply(400, "application/json", _json({"error": str(exc)}))
        settings = self.cache.policy.for_service(key).locality
        placements = placement.place(service.endpoints, client=client, client_labels={}, settings=settings)
        return admin.Reply(200, "application/json", _json({
            "service": key, "client": str(client),
            "placements": [
                {"priority": p.priority, "locality": str(p.locality), "weight": p.weight, "reason": p.reason,
                 "endpoints": [{"address": e.address, "ports": dict(e.ports), "health": e.health.value}
                               for e in p.endpoints]}
                for p in placements
            ],
        }))

    def _explain_page(self, query: Mapping[str, str]) -> admin.Reply:
        """`meshplane explain`: the priority table a client receives and why; with `down`, what if."""
        if self.cache is None:
            return admin.Reply(503, "application/json", _json({"error": "not started"}))

        def running(gateway: str) -> str:
            """Where a connected proxy of that gateway says it runs (for `spread: nearest` backends)."""
            return next((str(s.proxy.locality) for s in self.streams if s.proxy is not None
                         and s.proxy.gateway == gateway and s.proxy.locality.known), "")

        try:
            answer = explain.from_query(self.catalog.services, self.cache.policy, query, running=running)
        except explain.ExplainError as exc:
            about = {"parameter": exc.parameter} if exc.parameter else {}  # the command names its flag
            return admin.Reply(400, "application/json", _json({"error": str(exc), **about}))
        return admin.Reply(200, "application/json", _json(answer))

    def _cluster_status(self) -> dict[str, Any]:
        status: dict[str, Any] = {
            c: {"synced": s.synced, "stale": s.stale, "error": s.error} for c, s in self.catalog.status().items()
        }
        for cluster, kube_status in self.clusters.status().items():
            status[cluster] = kube_status
        return status

    def _refresh_gauges(self) -> None:
        self.metrics.count_clients(self.streams)
        if self.tls is not None:
            self.metrics.tls_expiry.labels(str(self.tls.files.cert)).set(self.tls.serving.not_after)
        for cluster, status in self.catalog.status().items():
            self.metrics.cluster_synced.labels(cluster).set(1 if status.synced else 0)
            self.metrics.cluster_stale.labels(cluster).set(1 if status.stale else 0)


class _OwnedSource:
    """A Kubernetes source that owns its API client (closed with the source)."""

    def __init__(self, source: kubesource.KubeSource) -> None:
        self._source = source

    @property
    def synced(self) -> bool:
        return self._source.synced

    @property
    def stale(self) -> bool:
        return self._source.stale

    @property
    def error(self) -> str:
        return self._source.error

    async def start(self, catalog: catalog_mod.Catalog) -> None:
        await self._source.start(catalog)

    async def stop(self) -> None:
        await self._source.stop()
        client: Any = self._source.api_client
        client.close()


def known_from(
    services: Mapping[model.ServiceKey, model.Service], clusters: Mapping[model.ClusterId, object]
) -> validate.Known:
    return validate.Known(
        services={key: frozenset(p.port for p in service.ports) for key, service in services.items()},
        clusters=frozenset(clusters) | {c for s in services.values() for c in s.clusters},
    )


def _bind(server: grpc.aio.Server, flag: str, address: tuple[str, int],
          credentials: grpc.ServerCredentials | None = None) -> int:
    """Add a port to the gRPC server; the port bound, or ListenError naming the flag and why not."""
    where = listen.join(*address)
    try:
        port = int(server.add_secure_port(where, credentials) if credentials else server.add_insecure_port(where))
    except RuntimeError:  # gRPC says only "Failed to bind": find out why as `check` does
        port = 0
    if port == 0:
        listen.check(flag, *address)
        raise listen.ListenError(f"{flag} {where}: gRPC cannot listen there (GRPC_VERBOSITY=debug says why)")
    return port


def _json(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()

