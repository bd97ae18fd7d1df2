"""meshplane beside sovereign, a Python REST-JSON xDS control plane, in one run, on real Envoys.

    .venv/bin/python -m bench.peer_sovereign [--envoys 4] [--services 50] [--endpoints 10] [--repeat 5]
        [--sovereign eds@1,eds@0.1,inline@1,inline@0.1,eds@1x5] [--sovereign-venv /tmp/sovereign-venv]

sovereign lives in its own virtualenv so that its dependencies never meet meshplane's; this
script installs nothing (it says which pip command to run when that virtualenv is missing).

One phase per control plane setup, one after the other (never two at once: they would share the
two cores): meshplane, then each sovereign setup (--sovereign: EDS clusters like meshplane's, or
endpoints inline in CDS; Envoy's REST refresh_delay; gunicorn workers; configs in bench/peer/).
Start it with S services x E endpoints, start N real Envoys on it (ADS for meshplane; REST
polling every refresh_delay for sovereign, which has no push), wait until every Envoy holds
every cluster with all its endpoints, then `--repeat` times, `--period` seconds apart (plus an
offset under 1 s that spreads the changes over the phases of the pollers' cycles): mark one
endpoint of a different service unhealthy in the source file (written atomically: temp file +
os.replace) and time until every Envoy shows it. "Shows it" is the cluster's
`membership_healthy` gauge dropping to E-1 on the Envoy's admin /stats (a cheap request, polled
per Envoy every 5 ms for 0.5 s, then every 20 ms); Envoy updates that gauge in the same
main-thread step that changes the host set /clusters reports, and after each repeat
/clusters?format=json is checked on every Envoy to show the endpoint's eds_health_status
UNHEALTHY.

Cost: utime+stime of the control plane's process tree (sovereign's gunicorn master and its
workers) from /proc, over the whole phase and over the fixed measured window (repeat x
period, the same length for every phase, so the numbers compare); RSS and PSS of the tree at
the end and its peak (VmHWM); the Envoys' CPU in the window and how many xDS updates they
requested (their update_attempt counters: for REST, one per poll, 304 "not modified" included)
and the bytes they exchanged with the control plane. Other load on the machine spoils all of
it: each phase first waits (--quiet-wait) until other processes use under --quiet-below cores,
and the `others` column is what the rest of the machine used during the window (~0 when clean).

Results: a table on stdout and bench/results/peer_sovereign.json (machine, date, commit,
versions, the exact configs used); docs/benchmarks.md quotes them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from meshplane.demo.envoy import EnvoyNode, envoy_binary
from meshplane.demo.envoy import bootstrap as ads_bootstrap
from meshplane.demo.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
PEER_DIR = ROOT / "bench" / "peer"
RESULTS = ROOT / "bench" / "results" / "peer_sovereign.json"
DEFAULT_SOVEREIGN_VENV = Path("/tmp/sovereign-venv")
DEFAULT_SOVEREIGN_PHASES = "eds@1,eds@0.1,inline@1,inline@0.1,eds@1x5"
INSTALL_HINT = "python3.11 -m venv {venv} && {venv}/bin/pip install 'sovereign==0.32.12'"

REGION, CLUSTER_ID, ZONES, SERVICE_PORT, NAMESPACE = "region-a", "cluster-1", ("zone-a", "zone-b"), 8000, "default"
MESHPLANE_POLICY = "apiVersion: meshplane.io/v1\n"  # defaults only: EDS clusters, connect timeout 1s
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# --- the mesh, written for either control plane ---------------------------------------------

@dataclass
class Mesh:
    services: int
    endpoints: int
    unhealthy: set[tuple[int, int]] = field(default_factory=set)

    def cluster_name(self, s: int) -> str:
        return f"outbound|{SERVICE_PORT}||svc-{s}.{NAMESPACE}.svc.cluster.local"

    def address(self, s: int, e: int) -> str:
        return f"10.{s >> 8 & 255}.{s & 255}.{e + 1}"

    def _endpoint(self, s: int, e: int) -> dict[str, Any]:
        return {"address": self.address(s, e), "port": 8080, "zone": ZONES[e % len(ZONES)],
                "health": "unhealthy" if (s, e) in self.unhealthy else "healthy"}

    def meshplane_file(self) -> str:
        """meshplane's endpoint file (docs/serving.md): one cluster, all services."""
        return yaml.safe_dump({"cluster": CLUSTER_ID, "region": REGION, "services": [
            {"name": f"svc-{s}", "namespace": NAMESPACE,
             "ports": [{"name": "http", "port": SERVICE_PORT, "protocol": "HTTP"}],
             "endpoints": [self._endpoint(s, e) for e in range(self.endpoints)]}
            for s in range(self.services)]}, sort_keys=False)

    def sovereign_file(self) -> str:
        """sovereign's file source: a JSON list of instances, one per service, read by bench/peer/templates.
        JSON, not YAML: sovereign re-reads and re-parses the whole file every refresh, and PyYAML's
        pure-Python loader would make that the dominant cost."""
        return json.dumps([
            {"name": f"svc-{s}", "namespace": NAMESPACE, "port": SERVICE_PORT,
             "endpoints": [{**self._endpoint(s, e), "region": REGION, "cluster": CLUSTER_ID}
                           for e in range(self.endpoints)]}
            for s in range(self.services)], indent=1)


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --- /proc: CPU and memory of a process tree ------------------------------------------------

def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()  # fields from 3 (state) on; comm may hold spaces


def tree(root: int) -> list[int]:
    """root and its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            children.setdefault(int(st[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_seconds(root: int) -> float:
    """utime+stime of the tree, plus cutime+cstime of the root (children it has reaped)."""
    total = 0
    for pid in tree(root):
        if (st := _stat(pid)) is not None:
            total += int(st[11]) + int(st[12]) + (int(st[13]) + int(st[14]) if pid == root else 0)
    return total / CLK_TCK


def memory_mib(root: int) -> dict[str, float]:
    """Sum over the tree of RSS, PSS (shared pages split between sharers: fair for forked
    workers) and peak RSS (VmHWM)."""
    rss = pss = hwm = 0
    for pid in tree(root):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm += int(line.split()[1])
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1])
    return {"rss_mib": round(rss / 1024, 1), "pss_mib": round(pss / 1024, 1), "peak_rss_mib": round(hwm / 1024, 1)}


def machine_busy() -> float:
    """CPU seconds all cores have spent not idle since boot (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK  # user..steal, less idle and iowait


def own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def wait_quiet(limit: float, max_wait: float) -> float:
    """Wait (up to max_wait s) until the machine's other load is under `limit` cores, measured
    over 1 s; other benchmarks on the same two cores would distort every number. Returns the
    last measured load."""
    deadline = time.monotonic() + max_wait
    while True:
        b0, t0 = machine_busy(), time.monotonic()
        time.sleep(1.0)
        load = (machine_busy() - b0) / (time.monotonic() - t0)
        if load < limit or time.monotonic() >= deadline:
            if load >= limit:
                print(f"  machine still busy ({load:.2f} cores in use by others); measuring anyway", file=sys.stderr)
            return round(load, 2)
        print(f"  machine busy ({load:.2f} cores in use); waiting for it to quiet down", file=sys.stderr)
        time.sleep(4.0)


# --- processes --------------------------------------------------------------------------------

def _pdeathsig() -> list[str]:
    """`setpriv --pdeathsig TERM --`: the kernel stops a child if this script dies unexpectedly."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []


def _stop(proc: subprocess.Popen[bytes], *, group: bool, timeout: float = 10.0) -> None:
    """SIGTERM (to its process group when it leads one), wait, then SIGKILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(proc.pid, signal.SIGTERM)
            else:
                proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                if group:
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    proc.kill()
            proc.wait()
    if group:  # workers left behind by a leader that exited on its own
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.read()


def wait_for(check: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.05,
             alive: Callable[[], str | None] = lambda: None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            if check():
                return
        if (dead := alive()) is not None:
            raise RuntimeError(f"{what}: {dead}")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Envoy:
    """One real Envoy: its own bootstrap, admin port (chosen by Envoy) and log file in workdir."""

    def __init__(self, name: str, config: dict[str, Any], workdir: Path) -> None:
        self.name, self.config, self.workdir = name, config, workdir
        self.bootstrap_path = workdir / f"{name}.json"
        self.log_path = workdir / f"{name}.log"
        self.address_path = workdir / f"{name}.admin"
        self.proc: subprocess.Popen[bytes] | None = None
        self.admin = ""

    def start(self) -> None:
        self.bootstrap_path.write_text(json.dumps(self.config, indent=2))
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*_pdeathsig(), str(envoy_binary()), "-c", str(self.bootstrap_path),
                 "--admin-address-path", str(self.address_path), "--disable-hot-restart",
                 "--concurrency", "1", "--log-level", "warning"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

        def admin_up() -> bool:
            text = self.address_path.read_text().strip() if self.address_path.exists() else ""
            if not text.rpartition(":")[2].isdigit():
                return False
            self.admin = f"http://{text}"
            return http_get(f"{self.admin}/server_info", 1.0)[0] == 200

        wait_for(admin_up, timeout=20, what=f"{self.name} admin port", alive=self.dead)

    def dead(self) -> str | None:
        if self.proc is not None and self.proc.poll() is not None:
            return f"{self.name} exited with {self.proc.returncode}; log:\n{_log_tail(self.log_path)}"
        return None

    def get(self, path: str, timeout: float = 5.0) -> bytes:
        status, body = http_get(f"{self.admin}{path}", timeout)
        if status != 200:
            raise RuntimeError(f"{self.name} GET {path}: {status} {body[:200]!r}")
        return body

    def stats(self, regex: str) -> dict[str, int]:
        doc = json.loads(self.get("/stats?format=json&filter=" + urllib.parse.quote(regex, safe="")))
        return {s["name"]: s["value"] for s in doc.get("stats", []) if isinstance(s.get("value"), int)}

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc, group=False, timeout=5.0)


def stat_regex(name: str) -> str:
    """An anchored RE2 matching exactly the stat `name` (cluster names hold '.' and '|')."""
    return "^" + re.sub(r"([.|+()\[\]{}^$*?\\])", r"\\\1", name) + "$"


# --- the two control planes ---------------------------------------------------------------------

class Meshplane:
    label = "meshplane"
    xds_cluster = "xds_cluster"  # the demo bootstrap's name for the ADS server

    def __init__(self, mesh: Mesh, workdir: Path) -> None:
        self.mesh, self.workdir = mesh, workdir
        self.source = workdir / "endpoints.yaml"
        self.policy = workdir / "policy.yaml"
        self.ads_port, self.http_port = free_port(), free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "meshplane.log"
        self.argv = [sys.executable, "-m", "meshplane", "--log-level", "warning", "serve",
                     "--endpoints", str(self.source), "--policy", str(self.policy),
                     "--ads", f"127.0.0.1:{self.ads_port}", "--http", f"127.0.0.1:{self.http_port}"]

    def write_source(self) -> None:
        write_atomically(self.source, self.mesh.meshplane_file())

    def start(self) -> None:
        self.policy.write_text(MESHPLANE_POLICY)
        self.write_source()
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([*_pdeathsig(), *self.argv], stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True, cwd=self.workdir)
        wait_for(lambda: http_get(f"http://127.0.0.1:{self.http_port}/ready", 1.0)[0] == 200,
                 timeout=60, what="meshplane /ready", alive=self.dead)

    def dead(self) -> str | None:
        if self.proc is not None and self.proc.poll() is not None:
            return f"meshplane exited with {self.proc.returncode}; log:\n{_log_tail(self.log)}"
        return None

    def bootstrap(self, node: EnvoyNode) -> dict[str, Any]:
        # The demo's ADS bootstrap; admin port 0: Envoy picks one and writes it to --admin-address-path.
        return ads_bootstrap(node=node, ads_host="127.0.0.1", ads_port=self.ads_port, admin_port=0)

    def node_metadata(self) -> dict[str, Any]:
        # meshplane also sends LDS/RDS: an outbound listener per Envoy, each on its own port.
        return {"listener_address": "127.0.0.1", "listener_port": free_port()}

    def push_latency(self) -> tuple[float, float]:
        """meshplane_push_latency_seconds (change seen by its file watcher -> Envoy's ACK): (sum, count)
        over every xDS type."""
        body = http_get(f"http://127.0.0.1:{self.http_port}/metrics")[1]
        total = count = 0.0
        for line in body.decode().splitlines():
            if line.startswith("meshplane_push_latency_seconds_sum"):
                total += float(line.rsplit(" ", 1)[1])
            elif line.startswith("meshplane_push_latency_seconds_count"):
                count += float(line.rsplit(" ", 1)[1])
        return total, count

    def configs(self) -> dict[str, Any]:
        return {"command": " ".join(self.argv), "policy.yaml": MESHPLANE_POLICY,
                "endpoints.yaml (first service)": _first_service(self.mesh.meshplane_file(), "services")}

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc, group=True)


@dataclass(frozen=True)
class SovereignSetup:
    """One sovereign phase: `mode` eds (EDS clusters, like meshplane) or inline (STATIC clusters
    carrying their endpoints in CDS), Envoy's REST `refresh_delay` in seconds, gunicorn workers."""

    mode: str
    refresh_delay: float
    workers: int = 1

    @classmethod
    def parse(cls, spec: str) -> SovereignSetup:
        m = re.fullmatch(r"(eds|inline)@(\d+(?:\.\d+)?)(?:x(\d+))?", spec.strip())
        if not m or float(m[2]) <= 0:
            raise ValueError(f"not MODE@SECONDS[xWORKERS] with MODE eds or inline: {spec!r}")
        return cls(m[1], float(m[2]), int(m[3] or 1))

    @property
    def label(self) -> str:
        return f"sovereign {self.mode} {self.refresh_delay:g}s" + (f" x{self.workers}w" if self.workers != 1 else "")


class Sovereign:
    xds_cluster = "sovereign"

    def __init__(self, mesh: Mesh, workdir: Path, *, venv: Path, setup: SovereignSetup) -> None:
        self.mesh, self.workdir, self.venv, self.setup = mesh, workdir, venv, setup
        self.label = setup.label
        self.source = workdir / "instances.json"
        self.config_paths = [workdir / "sovereign.yaml", workdir / f"templates-{setup.mode}.yaml"]
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "sovereign.log"
        self.env = {"SOVEREIGN_CONFIG": ",".join(f"file://{p}" for p in self.config_paths),
                    "SOVEREIGN_HOST": "127.0.0.1", "SOVEREIGN_PORT": str(self.port),
                    "SOVEREIGN_WORKERS": str(setup.workers)}

    @property
    def duration(self) -> str:
        return f"{self.setup.refresh_delay:.3f}s"

    def write_source(self) -> None:
        write_atomically(self.source, self.mesh.sovereign_file())

    def start(self) -> None:
        for path in self.config_paths:
            text = (PEER_DIR / path.name).read_text()
            for key, value in {"PEER_DIR": str(PEER_DIR), "WORK_DIR": str(self.workdir),
                               "REFRESH_DELAY": self.duration}.items():
                text = text.replace("${" + key + "}", value)
            path.write_text(text)
        self.write_source()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SOVEREIGN_", "VIRTUAL_ENV", "PYTHON"))}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([*_pdeathsig(), str(self.venv / "bin" / "sovereign")],
                                         env={**env, **self.env}, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True, cwd=self.workdir)
        # /deepcheck renders every template: the source has been read and the templates load.
        wait_for(lambda: http_get(f"http://127.0.0.1:{self.port}/deepcheck", 2.0)[0] == 200,
                 timeout=60, what="sovereign /deepcheck", alive=self.dead)

    def dead(self) -> str | None:
        if self.proc is not None and self.proc.poll() is not None:
            return f"sovereign exited with {self.proc.returncode}; log:\n{_log_tail(self.log)}"
        return None

    def bootstrap(self, node: EnvoyNode) -> dict[str, Any]:
        """CDS polled over REST from sovereign; the clusters' EDS is REST too (bench/peer/templates)."""
        return {
            "node": {"id": node.id, "cluster": node.cluster,
                     "locality": {"region": node.region, "zone": node.zone, "sub_zone": node.sub_zone}},
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
            "dynamic_resources": {"cds_config": {"resource_api_version": "V3", "api_config_source": {
                "api_type": "REST", "transport_api_version": "V3", "cluster_names": ["sovereign"],
                "refresh_delay": self.duration, "request_timeout": "5s"}}},
            "static_resources": {"clusters": [{
                "name": "sovereign", "type": "STATIC", "connect_timeout": "1s",
                "load_assignment": {"cluster_name": "sovereign", "endpoints": [{"lb_endpoints": [{"endpoint": {
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": self.port}}}}]}]},
            }]},
        }

    def node_metadata(self) -> dict[str, Any]:
        return {}

    def push_latency(self) -> tuple[float, float]:
        return 0.0, 0.0  # sovereign keeps no such measurement

    def configs(self) -> dict[str, Any]:
        templates = ["clusters.py", "endpoints.py"] if self.setup.mode == "eds" else ["clusters_inline.py"]
        return {"command": " ".join(f"{k}={v}" for k, v in self.env.items()) + f" {self.venv}/bin/sovereign",
                **{path.name: path.read_text() for path in self.config_paths},
                "templates": [f"bench/peer/templates/{t}" for t in templates],
                "instances.json (first service)": json.loads(self.mesh.sovereign_file())[0]}

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc, group=True)


ControlPlane = Meshplane | Sovereign


def _first_service(text: str, key: str) -> Any:
    doc = yaml.safe_load(text)
    return {**{k: v for k, v in doc.items() if k != key}, key: doc[key][:1]}


# --- one phase ----------------------------------------------------------------------------------

@dataclass
class Options:
    envoys: int
    repeat: int
    period: float
    settle: float
    timeout: float


def wait_converged(envoys: Sequence[Envoy], regex: str, want: int, t0: float, timeout: float) -> list[float | None]:
    """Per Envoy: seconds from t0 until its gauge reads `want` (None: not within timeout)."""

    def one(envoy: Envoy) -> float | None:
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, RuntimeError, ValueError):
                if want in envoy.stats(regex).values():
                    return time.monotonic() - t0
            time.sleep(0.005 if time.monotonic() - t0 < 0.5 else 0.02)  # fine early, light later
        return None

    with ThreadPoolExecutor(len(envoys)) as pool:
        return list(pool.map(one, envoys))


def host_health(envoy: Envoy, cluster: str, address: str) -> str | None:
    doc = json.loads(envoy.get("/clusters?format=json", timeout=10.0))
    for status in doc.get("cluster_statuses", []):
        if status["name"] == cluster:
            for host in status.get("host_statuses", []):
                if host["address"]["socket_address"]["address"] == address:
                    return str(host["health_status"].get("eds_health_status"))
    return None


@dataclass
class EnvoyCounters:
    cpu_s: float = 0.0
    xds_requests: int = 0  # update_attempt, CDS and every EDS cluster: for REST one per poll
    tx_bytes: int = 0  # to the control plane
    rx_bytes: int = 0  # from the control plane

    def __sub__(self, other: EnvoyCounters) -> EnvoyCounters:
        return EnvoyCounters(self.cpu_s - other.cpu_s, self.xds_requests - other.xds_requests,
                             self.tx_bytes - other.tx_bytes, self.rx_bytes - other.rx_bytes)


def envoy_counters(envoys: Sequence[Envoy], xds_cluster: str) -> EnvoyCounters:
    out = EnvoyCounters()
    for envoy in envoys:
        assert envoy.proc is not None
        out.cpu_s += cpu_seconds(envoy.proc.pid)
        out.xds_requests += sum(envoy.stats(r"update_attempt$").values())
        cx = envoy.stats(stat_regex(f"cluster.{xds_cluster}.")[:-1] + r"upstream_cx_[rt]x_bytes_total$")
        out.tx_bytes += cx.get(f"cluster.{xds_cluster}.upstream_cx_tx_bytes_total", 0)
        out.rx_bytes += cx.get(f"cluster.{xds_cluster}.upstream_cx_rx_bytes_total", 0)
    return out


def run_phase(cp: ControlPlane, mesh: Mesh, opts: Options, workdir: Path) -> dict[str, Any]:
    envoys: list[Envoy] = []
    phase_start = time.monotonic()
    try:
        cp.start()
        assert cp.proc is not None
        pid = cp.proc.pid
        for i in range(opts.envoys):
            zone = ZONES[i % len(ZONES)]
            node = EnvoyNode(id=f"envoy-{i}", cluster="bench", region=REGION, zone=zone, sub_zone=CLUSTER_ID,
                             metadata=cp.node_metadata())
            envoy = Envoy(f"envoy-{i}", cp.bootstrap(node), workdir)
            envoys.append(envoy)
            envoy.start()

        def complete() -> bool:  # every Envoy: every service's cluster with all its endpoints
            return all(sum(1 for v in e.stats(r"^cluster\.outbound.*\.membership_total$").values()
                           if v == mesh.endpoints) == mesh.services for e in envoys)

        wait_for(complete, timeout=120, what=f"{cp.label}: every Envoy fully configured", interval=0.2,
                 alive=lambda: cp.dead() or next((d for e in envoys if (d := e.dead())), None))
        initial_config_s = time.monotonic() - phase_start
        time.sleep(opts.settle)  # let start-up work finish before the window opens

        cpu0, envoy0 = cpu_seconds(pid), envoy_counters(envoys, cp.xds_cluster)
        push0 = cp.push_latency()
        busy0, own0 = machine_busy(), own_cpu()
        window_start = time.monotonic()
        repeats = []
        for r in range(opts.repeat):
            # Changes land at evenly spread phases of a 1 s cycle (golden-ratio offsets): with a
            # period that is a whole number of seconds, they would otherwise all hit sovereign's
            # 1 s source refresh (and meshplane's 100 ms file poll) at nearly the same phase, and
            # the repeats would sample one waiting time instead of the distribution.
            offset = (r * 0.6180339887) % 1.0
            time.sleep(max(0.0, window_start + r * opts.period + offset - time.monotonic()))
            s = (r * 7 + 3) % mesh.services  # a different service each time
            cluster, address = mesh.cluster_name(s), mesh.address(s, 0)
            mesh.unhealthy.add((s, 0))
            cp.write_source()
            t0 = time.monotonic()
            per_envoy = wait_converged(envoys, stat_regex(f"cluster.{cluster}.membership_healthy"),
                                       mesh.endpoints - 1, t0, opts.timeout)
            shown = [host_health(e, cluster, address) for e in envoys]
            repeats.append({"service": f"svc-{s}", "endpoint": address, "per_envoy_s": per_envoy,
                            "all_s": None if None in per_envoy else max(x for x in per_envoy if x is not None),
                            "clusters_shows": shown})
            if None in per_envoy or any(h != "UNHEALTHY" for h in shown):
                print(f"  {cp.label}: repeat {r}: not converged everywhere: {per_envoy} {shown}", file=sys.stderr)
        time.sleep(max(0.0, window_start + opts.repeat * opts.period - time.monotonic()))
        window = time.monotonic() - window_start
        cpu1, envoy = cpu_seconds(pid), envoy_counters(envoys, cp.xds_cluster) - envoy0
        busy, own = machine_busy() - busy0, own_cpu() - own0
        push1 = cp.push_latency()
        detect_to_ack = (push1[0] - push0[0]) / (push1[1] - push0[1]) if push1[1] > push0[1] else None
        memory = memory_mib(pid)
        total_cpu = cpu1
        return {
            "label": cp.label, "configs": {**cp.configs(), "envoy-0 bootstrap": envoys[0].config},
            "initial_config_s": round(initial_config_s, 3),
            "repeats": repeats, "window_s": round(window, 3),
            "cpu_window_s": round(cpu1 - cpu0, 3), "cpu_total_s": round(total_cpu, 3),
            "cpu_window_percent": round(100 * (cpu1 - cpu0) / window, 1),
            "envoys_cpu_window_s": round(envoy.cpu_s, 3),
            "envoy_xds_updates_per_s": round(envoy.xds_requests / window, 1),
            "envoys_to_cp_kib_per_s": round(envoy.tx_bytes / window / 1024, 1),
            "cp_to_envoys_kib_per_s": round(envoy.rx_bytes / window / 1024, 1),
            # meshplane only: its own histogram, from its file watcher seeing the change to each ACK
            "cp_detect_to_ack_mean_s": None if detect_to_ack is None else round(detect_to_ack, 4),
            "processes": len(tree(pid)), **memory,
            "machine_busy_cores_window": round(busy / window, 2),
            # Everything else the machine ran in the window (other users' jobs): should be ~0.
            "others_busy_cores_window": round((busy - (cpu1 - cpu0) - envoy.cpu_s - own) / window, 2),
        }
    finally:
        for envoy in envoys:
            envoy.stop()
        cp.stop()


# --- reporting ------------------------------------------------------------------------------------

def summarize(phase: dict[str, Any]) -> dict[str, Any]:
    alls = [r["all_s"] for r in phase["repeats"]]
    done = [x for x in alls if x is not None]
    per = [x for r in phase["repeats"] for x in r["per_envoy_s"] if x is not None]
    return {
        "converged": f"{len(done)}/{len(alls)}",
        "all_median_s": round(statistics.median(done), 3) if done else None,
        "all_min_s": round(min(done), 3) if done else None,
        "all_max_s": round(max(done), 3) if done else None,
        "per_envoy_median_s": round(statistics.median(per), 3) if per else None,
    }


COLUMNS: list[tuple[str, int, Callable[[dict[str, Any]], float | None], str]] = [
    # header, width, value, format
    ("start s", 8, lambda p: p["initial_config_s"], ".2f"),
    ("all Envoys: median s", 21, lambda p: p["summary"]["all_median_s"], ".3f"),
    ("min", 7, lambda p: p["summary"]["all_min_s"], ".3f"),
    ("max", 7, lambda p: p["summary"]["all_max_s"], ".3f"),
    ("per Envoy p50", 14, lambda p: p["summary"]["per_envoy_median_s"], ".3f"),
    ("CPU window s", 13, lambda p: p["cpu_window_s"], ".2f"),
    ("CPU %", 7, lambda p: p["cpu_window_percent"], ".1f"),
    ("CPU total s", 12, lambda p: p["cpu_total_s"], ".2f"),
    ("RSS MiB", 8, lambda p: p["rss_mib"], ".1f"),
    ("PSS MiB", 8, lambda p: p["pss_mib"], ".1f"),
    ("xDS req/s", 10, lambda p: p["envoy_xds_updates_per_s"], ".1f"),
    ("to CP KiB/s", 12, lambda p: p["envoys_to_cp_kib_per_s"], ".1f"),
    ("others", 7, lambda p: p["others_busy_cores_window"], ".2f"),
]


def print_table(phases: Sequence[dict[str, Any]]) -> None:
    head = f"{'control plane':<24}" + "".join(f"{h:>{w}}" for h, w, _, _ in COLUMNS)
    print(head)
    print("-" * len(head))
    for p in phases:
        cells = ["-" if (v := get(p)) is None else format(v, fmt) for _, _, get, fmt in COLUMNS]
        print(f"{p['label']:<24}" + "".join(f"{c:>{w}}" for c, (_, w, _, _) in zip(cells, COLUMNS, strict=True)))
    base = phases[0]
    for p in phases[1:]:
        a, b = p["summary"]["all_median_s"], base["summary"]["all_median_s"]
        if a and b and base["cpu_window_s"] > 0:
            print(f"{p['label']} / {base['label']}: convergence x{a / b:.1f}, "
                  f"CPU in window x{p['cpu_window_s'] / base['cpu_window_s']:.1f}")


def _run(argv: Sequence[str], **kw: Any) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True, **kw).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"


def environment(venv: Path) -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal:"))
    from importlib.metadata import version
    sov = _run([str(venv / "bin" / "python"), "-c",
                "import importlib.metadata as m, sys; print(sys.version.split()[0], "
                "*(m.version(p) for p in ('sovereign', 'fastapi', 'uvicorn', 'gunicorn', 'pydantic')))"]).split()
    dirty = _run(["git", "status", "--porcelain"], cwd=ROOT)
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem / 2**20, 1),
                    "kernel": platform.release(), "platform": platform.platform()},
        "git_commit": _run(["git", "rev-parse", "HEAD"], cwd=ROOT), "git_dirty": bool(dirty),
        "versions": {
            "python (meshplane)": platform.python_version(), "meshplane": version("meshplane"),
            "grpcio": version("grpcio"),
            "envoy": _run([str(envoy_binary()), "--version"]).split("version:")[-1].strip(),
            **({f"{k} (sovereign venv)": v for k, v in zip(("python", "sovereign", "fastapi", "uvicorn", "gunicorn",
                                                               "pydantic"), sov, strict=False)} if len(sov) == 6 else
               {"sovereign venv": " ".join(sov)}),
        },
    }


@contextlib.contextmanager
def workspace(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="peer-sovereign-"))
    try:
        yield path
    finally:
        if keep:
            print(f"work files kept in {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envoys", type=int, default=4, help="real Envoys per control plane")
    parser.add_argument("--services", type=int, default=50)
    parser.add_argument("--endpoints", type=int, default=10, help="endpoints per service")
    parser.add_argument("--repeat", type=int, default=5, help="endpoint changes per control plane (>= 3)")
    parser.add_argument("--period", type=float, default=5.0,
                        help="seconds between changes, plus an offset under 1 s that spreads their phase "
                             "(the measured window is repeat x period)")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds after full configuration before the window")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds a change may take to reach every Envoy")
    parser.add_argument("--sovereign", default=DEFAULT_SOVEREIGN_PHASES, metavar="MODE@SECONDS[xWORKERS],...",
                        help="sovereign phases, one per entry: MODE eds (EDS clusters, like meshplane) or inline "
                             "(endpoints inside CDS), Envoy's REST refresh_delay, gunicorn workers (default 1; "
                             f"sovereign's own default is 2 x cores + 1) (default: {DEFAULT_SOVEREIGN_PHASES})")
    parser.add_argument("--sovereign-venv", type=Path, default=DEFAULT_SOVEREIGN_VENV)
    parser.add_argument("--quiet-below", type=float, default=0.2,
                        help="before each phase, wait until other processes use fewer cores than this")
    parser.add_argument("--quiet-wait", type=float, default=300.0, help="longest wait for that, seconds")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, bootstraps)")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.envoys < 1 or args.services < 1 or args.endpoints < 2:
        parser.error("need --repeat >= 1, --envoys >= 1, --services >= 1, --endpoints >= 2")
    try:
        setups = [SovereignSetup.parse(spec) for spec in args.sovereign.split(",")]
    except ValueError as exc:
        parser.error(str(exc))

    if not (args.sovereign_venv / "bin" / "sovereign").exists():
        print(f"sovereign is not installed in {args.sovereign_venv}; create its own virtualenv with:\n\n"
              f"    {INSTALL_HINT.format(venv=args.sovereign_venv)}\n", file=sys.stderr)
        return 2

    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so every process started is stopped
    # and the work directory removed by the finally blocks.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    opts = Options(envoys=args.envoys, repeat=args.repeat, period=args.period, settle=args.settle,
                   timeout=args.timeout)
    phases = []
    with workspace(args.keep) as work:
        planes: list[Callable[[Path], ControlPlane]] = [lambda d: Meshplane(Mesh(args.services, args.endpoints), d)]
        for setup in setups:
            planes.append(lambda d, setup=setup: Sovereign(Mesh(args.services, args.endpoints), d,
                                                           venv=args.sovereign_venv, setup=setup))
        for i, make in enumerate(planes):
            workdir = work / f"phase-{i}"
            workdir.mkdir()
            cp = make(workdir)
            quiet = wait_quiet(args.quiet_below, args.quiet_wait)
            print(f"== {cp.label}: {args.envoys} Envoys, {args.services} services x {args.endpoints} endpoints, "
                  f"{args.repeat} changes {args.period:g}s apart", flush=True)
            phase = run_phase(cp, cp.mesh, opts, workdir)
            phase["summary"] = summarize(phase)
            phase["others_busy_cores_before"] = quiet
            phases.append(phase)

    print()
    print_table(phases)
    result = {
        **environment(args.sovereign_venv),
        "command": " ".join([".venv/bin/python -m bench.peer_sovereign",
                             *(argv if argv is not None else sys.argv[1:])]),
        "parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
        "phases": phases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
