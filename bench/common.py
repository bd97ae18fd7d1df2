"""What every benchmark shares: the generated mesh, the server under test, /proc readings, statistics, results.

Everything here runs in the coordinating process, never on a measured hot path.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshplane.demo.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PYTHON = sys.executable

# --------------------------------------------------------------------------- machine and results


def machine() -> dict[str, Any]:
    """Where and on what a result was measured: quoted next to every number in docs/benchmarks.md."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    # Other people edit meshplane/ while benchmarks run: say which files differed from the commit.
    dirty = [line[3:] for line in git("status", "--porcelain", "--", "meshplane").splitlines()]
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": _cpu_model(),
        "kernel": os.uname().release,
        "python": platform.python_version(),
        "commit": git("rev-parse", "--short", "HEAD"),
        "meshplane_dirty_files": dirty,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def stop_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so the finally blocks that stop servers and workers run."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def write_results(name: str, data: Mapping[str, Any], out: Path | None = None) -> Path:
    path = out if out is not None else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, title: str = "") -> None:
    text = [[_cell(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) if text else len(h) for i, h in enumerate(headers)]
    if title:
        print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in text:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


def fmt(value: Any) -> str:
    return _cell(value)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


# --------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default), q in 0..100."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def latency_summary(times: Sequence[float | None], *, scale: float = 1000.0) -> dict[str, Any]:
    """p50/p99/max of per-proxy times (seconds in, milliseconds out); `missing` counts proxies that never got there."""
    got = [t * scale for t in times if t is not None]
    return {
        "n": len(got),
        "missing": len(times) - len(got),
        "p50": _round(percentile(got, 50)),
        "p99": _round(percentile(got, 99)),
        "max": _round(max(got) if got else None),
        "mean": _round(statistics.fmean(got) if got else None),
    }


def spread(values: Iterable[float | None]) -> dict[str, Any]:
    """Median and range over repetitions: what docs/benchmarks.md quotes."""
    got = [v for v in values if v is not None]
    if not got:
        return {"median": None, "min": None, "max": None, "runs": 0}
    return {"median": _round(statistics.median(got)), "min": _round(min(got)), "max": _round(max(got)),
            "runs": len(got)}


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


# --------------------------------------------------------------------------- /proc


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of `pid` (gRPC's C threads included), not of its children.

    Summed from each thread's /proc/PID/task/TID/schedstat (nanoseconds): utime + stime in
    /proc/PID/stat count 10 ms ticks, too coarse for one push to 100 proxies. Threads that have
    exited no longer count; the servers measured here keep theirs.
    """
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):  # a thread that ended while we looked
                total += int((task / "schedstat").read_text().split()[0])
    except OSError:
        total = 0
    if total:
        return total / 1e9
    stat = Path(f"/proc/{pid}/stat").read_text()  # no schedstat (kernel without it): ticks
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / _TICK


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak resident since start) in MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return {"rss_mib": out.get("VmRSS", 0.0), "hwm_mib": out.get("VmHWM", 0.0)}


# --------------------------------------------------------------------------- the generated mesh


@dataclass
class Mesh:
    """S services x E endpoints over C clusters (one endpoint file each) in R regions and Z zones.

    Zone z belongs to cluster z % C, and a cluster to region c % R. Endpoint e of service s is
    in zone (s + e) % Z, so every service spans several zones and clusters (it is merged
    across files, as a multi-cluster service is) and every zone serves every service.
    """

    services: int = 100
    endpoints: int = 10
    clusters: int = 4
    zones: int = 8
    regions: int = 2
    health: dict[tuple[int, int], str] = field(default_factory=dict)
    extra: list[int] = field(default_factory=list)  # services added later, by index

    def __post_init__(self) -> None:
        if self.zones < self.clusters:
            raise ValueError("need at least one zone per cluster")

    def cluster(self, c: int) -> str:
        return f"cluster-{c}"

    def region(self, c: int) -> str:
        return f"region-{c % self.regions}"

    def zone(self, z: int) -> tuple[str, int]:
        """(zone name, cluster index) of zone z."""
        c = z % self.clusters
        return f"{self.region(c)}-z{z}", c

    def localities(self, count: int) -> list[tuple[str, str, str]]:
        """`count` distinct proxy localities (region, zone, sub_zone): the views.

        The first Z are the zones that hold endpoints; beyond that, further zones of the same
        clusters that hold none (proxies of other workloads): each still a distinct view.
        """
        out = []
        for i in range(count):
            zone, c = self.zone(i % self.zones)
            if i >= self.zones:
                zone = f"{zone}-x{i // self.zones}"
            out.append((self.region(c), zone, self.cluster(c)))
        return out

    def cluster_name(self, s: int) -> str:
        """The Envoy cluster meshplane makes of service s (translate.cluster_name)."""
        return f"outbound|8000||svc-{s}.default.svc.cluster.local"

    def _all(self) -> list[int]:
        return [*range(self.services), *self.extra]

    def file(self, directory: Path, c: int) -> Path:
        return directory / f"{self.cluster(c)}.yaml"

    def files(self, directory: Path) -> list[Path]:
        return [self.file(directory, c) for c in range(self.clusters)]

    def write(self, directory: Path) -> list[Path]:
        directory.mkdir(parents=True, exist_ok=True)
        for c in range(self.clusters):
            self.write_cluster(directory, c)
        return self.files(directory)

    def write_cluster(self, directory: Path, c: int) -> Path:
        path = self.file(directory, c)
        atomic_write(path, self.render_cluster(c))
        return path

    def render_cluster(self, c: int) -> str:
        """One cluster's file, written by hand: yaml.dump is far slower at 100k endpoints."""
        lines = [f"cluster: {self.cluster(c)}", f"region: {self.region(c)}", "services:"]
        for s in self._all():
            eps = []
            for e in range(self.endpoints):
                zone, zc = self.zone((s + e) % self.zones)
                if zc != c:
                    continue
                i = s * self.endpoints + e
                address = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
                health = self.health.get((s, e), "healthy")
                eps.append(f"      - {{address: {address}, port: 8080, zone: {zone}, health: {health}}}")
            if not eps:
                continue
            lines += [f"  - name: svc-{s}", "    ports: [{name: http, port: 8000, protocol: HTTP}]", "    endpoints:",
                      *eps]
        return "\n".join(lines) + "\n"

    def flip_health(self, directory: Path, s: int = 0, e: int = 0) -> float:
        """Toggle one endpoint healthy <-> unhealthy in the one file that holds it; return t0, just after the swap."""
        key = (s, e)
        self.health[key] = "unhealthy" if self.health.get(key, "healthy") == "healthy" else "healthy"
        self.write_cluster(directory, self.zone((s + e) % self.zones)[1])
        return time.monotonic()

    def add_service(self, directory: Path) -> tuple[int, float]:
        """A new service in every file that holds one of its endpoints; returns its index and t0.

        Every file is rendered before the first is swapped in, so t0 (after the last swap) is
        at most microseconds after the first.
        """
        s = self.services + len(self.extra)
        self.extra.append(s)
        touched = sorted({self.zone((s + e) % self.zones)[1] for e in range(self.endpoints)})
        texts = {c: self.render_cluster(c) for c in touched}
        for c, text in texts.items():
            atomic_write(self.file(directory, c), text)
        return s, time.monotonic()


POLICY = """\
apiVersion: meshplane.io/v1
defaults:
  connectTimeout: 1s
  outlierDetection:
    consecutive5xxErrors: {errors}
    interval: 10s
    baseEjectionTime: 30s
    maxEjectionPercent: 100
"""


def write_policy(path: Path, errors: int = 5) -> Path:
    atomic_write(path, POLICY.format(errors=errors))
    return path


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- the server under test


class Meshplane:
    """`meshplane serve` as a subprocess (its own GIL, its own /proc numbers), on free loopback ports."""

    def __init__(self, workdir: Path, endpoint_files: Sequence[Path], policy: Path, *,
                 poll_interval: float | None = None, traced: Path | None = None,
                 extra_args: Sequence[str] = ()) -> None:
        self.ads_port = free_port()
        self.http_port = free_port()
        self.log = workdir / "meshplane.log"
        self.traced = traced
        # The shipped command line; under tracemalloc if asked (bench/traced.py).
        launcher = ["meshplane"] if traced is None else ["bench.traced", str(traced)]
        args = [PYTHON, "-m", *launcher, "--log-level", "warning", "serve",
                *(a for f in endpoint_files for a in ("--endpoints", str(f))),
                "--policy", str(policy), "--ads", f"127.0.0.1:{self.ads_port}",
                "--http", f"127.0.0.1:{self.http_port}",
                # Every simulated proxy connects from loopback: one address, thousands of streams.
                "--max-streams-per-peer", "0",
                *(["--poll-interval", str(poll_interval)] if poll_interval is not None else []), *extra_args]
        self.command = args
        self._log = self.log.open("wb")
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.ads_port}"

    def wait_ready(self, timeout: float = 300.0) -> float:
        """Block until /ready answers 200; return how long start-up took."""
        began = time.monotonic()
        while time.monotonic() - began < timeout:
            if self.proc.poll() is not None:
                self._log.flush()
                tail = self.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"meshplane exited with {self.proc.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/ready", timeout=2) as r:
                    if r.status == 200:
                        return time.monotonic() - began
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"meshplane not ready after {timeout}s; see {self.log}")

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return scrape(f"http://127.0.0.1:{self.http_port}/metrics")

    def views(self) -> list[dict[str, Any]]:
        """/debug/views: the distinct views served and their stream counts."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/debug/views", timeout=30) as r:
            return list(json.loads(r.read()))

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()

    def __enter__(self) -> Meshplane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_process(proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """SIGTERM the one process we started, then SIGKILL it if it does not go."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=30) as r:
        text = r.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def histogram_delta(before: Samples, after: Samples, name: str, **labels: str) -> dict[str, Any]:
    """One histogram's observations between two scrapes: count, mean, and cumulative bucket counts."""
    want = tuple(sorted(labels.items()))

    def value(samples: Samples, suffix: str, extra: tuple[tuple[str, str], ...] = ()) -> float:
        return samples.get((name + suffix, tuple(sorted(want + extra))), 0.0)

    count = value(after, "_count") - value(before, "_count")
    total = value(after, "_sum") - value(before, "_sum")
    buckets = {}
    for (sample, labelset), v in after.items():
        if sample != name + "_bucket":
            continue
        le = dict(labelset).get("le", "")
        if tuple((k, x) for k, x in labelset if k != "le") != want:
            continue
        buckets[le] = v - before.get((sample, labelset), 0.0)
    return {"count": int(count), "mean_ms": _round(total / count * 1000) if count else None,
            "p50_ms": _bucket_quantile(buckets, count, 0.50), "p99_ms": _bucket_quantile(buckets, count, 0.99),
            "buckets_ms": {_le_ms(k): int(v) for k, v in sorted(buckets.items(), key=lambda kv: float(kv[0]))}}


def _le_ms(le: str) -> str:
    return "+Inf" if le == "+Inf" else f"{float(le) * 1000:g}"


def _bucket_quantile(buckets: Mapping[str, float], count: float, q: float) -> float | None:
    """Prometheus' histogram_quantile: linear within the bucket holding quantile q (milliseconds)."""
    if not count:
        return None
    lower, below = 0.0, 0.0
    for le, v in sorted(buckets.items(), key=lambda kv: float(kv[0])):
        if v >= q * count:
            if le == "+Inf":
                return _round(lower * 1000)
            upper = float(le)
            inside = v - below
            return _round((lower + (upper - lower) * ((q * count - below) / inside if inside else 1.0)) * 1000)
        lower, below = float(le), v
    return None


def counter_delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


# --------------------------------------------------------------------------- profiles


class Profile:
    """py-spy sampling a process while a block runs; writes collapsed stacks and a top-functions summary.

    Profiling pauses the target at every sample, so numbers measured under it are not quoted;
    it is for finding where the time goes (`--profile` runs separately from the measured runs).
    """

    def __init__(self, pid: int, name: str, directory: Path = RESULTS / "profiles", *, native: bool = False,
                 rate: int = 250) -> None:
        self.pid = pid
        directory.mkdir(parents=True, exist_ok=True)
        self.raw = directory / f"{name}.txt"
        self.summary_path = directory / f"{name}.summary.txt"
        self.args = [str(Path(PYTHON).parent / "py-spy"), "record", "--pid", str(pid), "--format", "raw",
                     "--rate", str(rate), "--output", str(self.raw), *(["--native"] if native else [])]
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Profile:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # attach before the measured work starts
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.raw.exists():
            self.summary_path.write_text(summarize_profile(self.raw))

    def summary(self) -> str:
        return self.summary_path.read_text() if self.summary_path.exists() else ""


def summarize_profile(raw: Path, top: int = 25) -> str:
    """Self and inclusive sample shares per function, from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = [_frame(f) for f in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for f in set(frames):
            inclusive[f] = inclusive.get(f, 0) + count
    lines = [f"{total} samples (non-idle)", "", "self %   function"]
    lines += [f"{100 * n / total:6.1f}   {f}" for f, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]]
    lines += ["", "incl %   function"]
    lines += [f"{100 * n / total:6.1f}   {f}" for f, n in sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]]
    return "\n".join(lines) + "\n" if total else "no samples\n"


def _frame(frame: str) -> str:
    """'func (path/file.py:12)' -> 'func (file.py)': aggregate over line numbers."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0].rsplit('/', 1)[-1].rstrip(')')})" if where else name


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine has spent busy since boot (/proc/stat)."""
    values = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / _TICK  # all but idle and iowait (guest is in user)


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class Others:
    """CPU that processes other than ours used over a window: whether a run shared the machine.

    `ours` are the pids measured (server, load generator workers); this process counts too.
    """

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self.start = self._sample()

    def _sample(self) -> tuple[float, float]:
        ours = own_cpu_seconds()
        for pid in self.pids:
            with contextlib.suppress(OSError):  # a worker that already exited
                ours += cpu_seconds(pid)
        return machine_busy_seconds(), ours

    def seconds(self) -> float:
        busy1, ours1 = self._sample()
        busy0, ours0 = self.start
        return round(max(0.0, (busy1 - busy0) - (ours1 - ours0)), 3)


def background_cpu(seconds: float = 1.0) -> float:
    """Cores' worth of CPU the machine is busy with (from /proc/stat), measured while our benchmark is idle.

    Anything above ~0.1 means something else is running and the numbers that follow will be slower.
    """

    def busy_total() -> tuple[int, int]:
        values = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = values[3] + values[4]  # idle + iowait
        return sum(values) - idle, sum(values)

    b0, t0 = busy_total()
    time.sleep(seconds)
    b1, t1 = busy_total()
    cores = len(os.sched_getaffinity(0))
    return round((b1 - b0) / (t1 - t0) * cores, 2) if t1 > t0 else 0.0


def wait_quiet(limit: float = 0.25, max_wait: float = 900.0) -> dict[str, float]:
    """Wait (up to max_wait) until nothing else keeps the machine busy; say what was seen.

    Our benchmarks measure a server and a load generator sharing the cores: anything else
    running slows both and makes the numbers incomparable. The single benchmarks only check
    (max_wait 0) and warn; run_all waits.
    """
    began = time.monotonic()
    busy = background_cpu()
    while busy > limit and time.monotonic() - began < max_wait:
        print(f"  (machine busy with {busy} cores of other work; waiting for it to finish)", flush=True)
        time.sleep(10)
        busy = background_cpu()
    if busy > limit:
        print(f"  WARNING: {busy} cores busy with other work: numbers from this run are not comparable", flush=True)
    return {"background_cores": busy, "waited_s": round(time.monotonic() - began, 1)}
