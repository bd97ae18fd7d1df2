"""Push convergence: from a change to every proxy's ACK of it, against `meshplane serve` and the floor.

Starts `meshplane serve` as a subprocess on generated endpoint files (S services x E endpoints
over C clusters and Z zones) and a policy file, connects N simulated proxies in L localities
(bench.loadgen, in worker processes), waits until every proxy holds a full ACKed config, then
repeats R times:

  (a) endpoint: one endpoint's health flips (one cluster file rewritten and swapped in with
      os.replace; t0 just after the swap). Per proxy: t0 -> its first ACK of an EDS response
      carrying that service's assignment. p50, p99, max, and the time until all N had ACKed.
  (b) policy: the policy's outlierDetection.consecutive5xxErrors changes: every cluster
      changes. t0 -> each proxy's CDS ACK (and the EDS re-sent for re-warming clusters).
  (c) service: a service is added to the endpoint files: t0 -> each proxy's CDS ACK naming it,
      and its EDS ACK of the new assignment (the proxy subscribes when it sees the cluster).

meshplane finds file edits by polling, every 100 ms by default, so times from t0 include 0-100 ms
(50 on average) of waiting for the poll; with --poll-interval 0.005 that wait is at most 5 ms,
and times from t0 are nearly times from meshplane seeing the change (as with Kubernetes
watches, which have no poll). The server's own meshplane_push_latency_seconds histogram (from
the change seen to the ACK *read* by the server) is reported beside, per change: under load the
server reads ACKs well after the proxies sent them, so it overstates what proxies experience.

Then the floor (bench.floor) serves the same N proxies the same way and pushes one EDS
response to all; meshplane's (a) divided by the floor's is the efficiency figure. With
--cpp-floor the C++ floor (bench/cppfloor) does the same after it, and meshplane's (a) is
divided by its figure too (cpp_floor and cpp_ratio in the results).

Server CPU seconds (every thread's, from /proc: common.cpu_seconds) are taken over each change,
from just before the write until the server has read every ACK (its ACK counters stop
moving), less the idle rate measured with every proxy connected; RSS and peak RSS (VmRSS,
VmHWM) before and after. `others_cpu_s` is what other processes on the machine used in the
same window: a run that shared the machine shows it there.

    .venv/bin/python -m bench.convergence                        # 1,000 proxies, 8 localities, 100 services
    .venv/bin/python -m bench.convergence --proxies 50 --services 20 --repeat 1   # smoke check
    .venv/bin/python -m bench.convergence --cpp-floor            # and the C++ floor beside the grpcio one
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import common, floor, loadgen

SETTLE = 0.5  # between changes: the previous push, its ACKs and the 100 ms file poll have gone by


class Target:
    """meshplane serving a generated mesh, with the load generator's proxies connected to it."""

    def __init__(self, server: common.Meshplane, gen: loadgen.LoadGen, mesh: common.Mesh, workdir: Path,
                 policy: Path) -> None:
        self.server = server
        self.gen = gen
        self.mesh = mesh
        self.workdir = workdir
        self.policy = policy
        self.policy_errors = 5
        self.idle_cpu_rate = 0.0

    def measure_idle(self, seconds: float = 1.0) -> float:
        """Server CPU per second with every proxy connected and nothing changing (file polls, keepalives)."""
        cpu0, t = common.cpu_seconds(self.server.pid), time.monotonic()
        time.sleep(seconds)
        self.idle_cpu_rate = (common.cpu_seconds(self.server.pid) - cpu0) / (time.monotonic() - t)
        return self.idle_cpu_rate

    def _begin(self) -> tuple[common.Samples, float, float, common.Others]:
        time.sleep(SETTLE)
        self.gen.mark()
        samples = self.server.metrics()  # scraped before the CPU window opens: /metrics costs CPU too
        others = common.Others([self.server.pid, *self.gen.pids])
        return samples, common.cpu_seconds(self.server.pid), sum(_cpu(p) for p in self.gen.pids), others

    def _end(self, began: tuple[common.Samples, float, float, common.Others], t0: float,
             **min_acks: int) -> dict[str, Any]:
        """Close the window once the server has read the ACKs too (it lags the proxies under load)."""
        before, cpu0, gen_cpu0, others = began
        after, deadline, last = self.server.metrics(), time.monotonic() + 10, -1.0
        while time.monotonic() < deadline:
            total = sum(common.counter_delta(before, after, "meshplane_xds_acks_total", type=k) for k in ("cds", "eds"))
            enough = all(common.counter_delta(before, after, "meshplane_xds_acks_total", type=k) >= n
                         for k, n in min_acks.items())
            if enough and total == last:  # nothing more arrived over the last 50 ms
                break
            last = total
            time.sleep(0.05)
            after = self.server.metrics()
        window = time.monotonic() - t0
        cpu = common.cpu_seconds(self.server.pid) - cpu0
        gen_cpu = sum(_cpu(p) for p in self.gen.pids) - gen_cpu0
        return {"server_cpu_s": round(cpu - self.idle_cpu_rate * window, 4), "server_cpu_raw_s": round(cpu, 4),
                "loadgen_cpu_s": round(gen_cpu, 3), "window_s": round(window, 3),
                # CPU that other processes on the machine used meanwhile: > ~5% of the window = a shared run
                "others_cpu_s": others.seconds(),
                "server_histogram": {k: common.histogram_delta(before, after, "meshplane_push_latency_seconds",
                                                               type=k) for k in ("cds", "eds")},
                "builds": int(common.counter_delta(before, after, "meshplane_push_build_seconds_count")),
                "build_ms": _mean_ms(before, after, "meshplane_push_build_seconds"),
                "debounce_ms": _mean_ms(before, after, "meshplane_push_debounce_seconds"),
                "responses": {k: int(common.counter_delta(before, after, "meshplane_xds_responses_total", type=k))
                              for k in ("cds", "eds")},
                "response_mib": {k: round(common.counter_delta(before, after, "meshplane_xds_response_bytes_total",
                                                               type=k) / 2**20, 3) for k in ("cds", "eds")}}

    def endpoint_change(self, timeout: float) -> dict[str, Any]:
        """One endpoint's health flips: t0 -> each proxy's ACK of the EDS response carrying it."""
        began = self._begin()
        t0 = self.mesh.flip_health(self.workdir)
        acked = self.gen.collect("eds", t0, name=self.mesh.cluster_name(0), timeout=timeout)
        return {**floor.push_summary(acked, t0), **self._end(began, t0, eds=self.gen.count)}

    def policy_change(self, timeout: float) -> dict[str, Any]:
        """consecutive5xxErrors changes for every service: t0 -> each proxy's CDS ACK."""
        began = self._begin()
        self.policy_errors = 6 if self.policy_errors == 5 else 5
        common.write_policy(self.policy, self.policy_errors)
        t0 = time.monotonic()
        cds = self.gen.collect("cds", t0, timeout=timeout)
        # Every cluster changed, so its endpoints are re-sent (Envoy re-warms an updated cluster).
        eds = self.gen.collect("eds", t0, name=self.mesh.cluster_name(0), timeout=timeout)
        result = floor.push_summary(cds, t0)
        result["eds_rewarm"] = floor.push_summary(eds, t0)
        return {**result, **self._end(began, t0, cds=self.gen.count, eds=self.gen.count)}

    def service_added(self, timeout: float) -> dict[str, Any]:
        """A new service: t0 -> each proxy's CDS ACK naming it (and its EDS ACK of the new assignment)."""
        began = self._begin()
        s, t0 = self.mesh.add_service(self.workdir)
        name = self.mesh.cluster_name(s)
        cds = self.gen.collect("cds", t0, name=name, timeout=timeout)
        eds = self.gen.collect("eds", t0, name=name, timeout=timeout)
        result = floor.push_summary(cds, t0)
        result["eds_new_service"] = floor.push_summary(eds, t0)
        return {**result, **self._end(began, t0, cds=self.gen.count, eds=self.gen.count)}


def _cpu(pid: int) -> float:
    try:
        return common.cpu_seconds(pid)
    except OSError:
        return 0.0


def _mean_ms(before: common.Samples, after: common.Samples, name: str) -> float | None:
    n = common.counter_delta(before, after, name + "_count")
    return round(common.counter_delta(before, after, name + "_sum") / n * 1000, 2) if n else None


def start_target(mesh: common.Mesh, workdir: Path, proxies: int, localities: int, processes: int,
                 timeout: float, poll_interval: float | None = None, protocol: str = "sotw",
                 server_args: Sequence[str] = (), credentials: loadgen.Credentials | None = None,
                 per_channel: int = 50) -> tuple[Target, dict[str, Any]]:
    """Write the mesh, start meshplane (with `server_args` more), connect the proxies (over TLS with
    `credentials`): the state every measurement starts from."""
    files = mesh.write(workdir)
    policy = common.write_policy(workdir / "policy.yaml")
    server = common.Meshplane(workdir, files, policy, poll_interval=poll_interval, extra_args=server_args)
    gen: loadgen.LoadGen | None = None
    try:
        startup = server.wait_ready()
        setup: dict[str, Any] = {"startup_s": round(startup, 2), "server_before_connect": common.memory_mib(server.pid),
                                 "server_cpu_startup_s": round(common.cpu_seconds(server.pid), 2),
                                 "command": " ".join(server.command)}
        gen = loadgen.LoadGen(server.target, proxies, mesh.localities(localities), processes=processes,
                              protocol=protocol, credentials=credentials, per_channel=per_channel)
        gen.start()
        cpu0 = common.cpu_seconds(server.pid)
        setup["connect"] = loadgen.connect_summary(gen.connect(timeout))
        setup["connect"]["server_cpu_s"] = round(common.cpu_seconds(server.pid) - cpu0, 3)
        setup["server_after_connect"] = common.memory_mib(server.pid)
        setup["views"] = len(server.views())
        setup["connected"] = server.metrics().get(("meshplane_xds_connected_proxies", ()))
    except BaseException:
        if gen is not None:
            gen.stop()
        server.stop()
        raise
    return Target(server, gen, mesh, workdir, policy), setup


def stop_target(target: Target) -> None:
    target.gen.stop()
    target.server.stop()


def run(*, proxies: int, localities: int, services: int, endpoints: int, clusters: int, zones: int, repeat: int,
        processes: int, timeout: float = 60.0, poll_interval: float | None = None,
        floors: tuple[str, ...] = ("grpcio",), profile: bool = False,
        protocols: tuple[str, ...] = ("sotw",)) -> dict[str, Any]:
    """`protocols`: measured one after the other, each against a fresh server; `meshplane` is the first's.

    `floors`: keys of floor.IMPLEMENTATIONS, measured after meshplane in this order.
    """
    mesh = common.Mesh(services=services, endpoints=endpoints, clusters=clusters, zones=zones)
    by_protocol = {}
    for protocol in protocols:
        with tempfile.TemporaryDirectory(prefix="meshplane-bench-") as tmp:
            target, setup = start_target(mesh, Path(tmp), proxies, localities, processes, timeout, poll_interval,
                                         protocol)
            try:
                setup["idle_cpu_per_s"] = round(target.measure_idle(), 4)
                with _profiling(profile, target.server.pid, f"convergence-endpoint-{protocol}"):
                    endpoint = [target.endpoint_change(timeout) for _ in range(repeat)]
                with _profiling(profile, target.server.pid, f"convergence-policy-{protocol}"):
                    policy = [target.policy_change(timeout) for _ in range(repeat)]
                with _profiling(profile, target.server.pid, f"convergence-service-{protocol}"):
                    service = [target.service_added(timeout) for _ in range(repeat)]
                setup["server_end"] = common.memory_mib(target.server.pid)
            finally:
                stop_target(target)
        by_protocol[protocol] = {
            "setup": setup,
            "endpoint": {"runs": endpoint, **_spread(endpoint, "eds")},
            "policy": {"runs": policy, **_spread(policy, "cds")},
            "service": {"runs": service, **_spread(service, None)},
        }
    result: dict[str, Any] = {
        "params": {"proxies": proxies, "localities": localities, "services": services, "endpoints": endpoints,
                   "clusters": clusters, "zones": zones, "repeat": repeat, "loadgen_processes": processes,
                   "file_poll_interval_s": poll_interval if poll_interval is not None else 0.1,
                   "protocols": list(protocols), "floors": list(floors)},
        "meshplane": by_protocol[protocols[0]],
        "by_protocol": by_protocol,
        **{key: None for impl in floor.IMPLEMENTATIONS.values() for key in (impl.key, impl.ratio_key)},
    }
    for server in floors:
        impl = floor.IMPLEMENTATIONS[server]
        result[impl.key] = floor.measure(proxies=proxies, localities=localities, mesh=common.Mesh(
            services=services, endpoints=endpoints, clusters=clusters, zones=zones), repeat=repeat,
            processes=processes, timeout=timeout, server=server)
        result[impl.ratio_key] = ratios(result["meshplane"]["endpoint"], result[impl.key]["push"])
    return result


def _profiling(enabled: bool, pid: int, name: str) -> contextlib.AbstractContextManager[Any]:
    return common.Profile(pid, name) if enabled else contextlib.nullcontext()


def _spread(runs: list[dict[str, Any]], kind: str | None) -> dict[str, Any]:
    out = floor.over_runs(runs)
    out["server_cpu_s"] = common.spread(r["server_cpu_s"] for r in runs)
    out["sent_kib"] = common.spread(round(sum(r["response_mib"].values()) * 1024, 1) for r in runs)
    if kind is not None:  # the server's own clock, from the change seen to the ACK read (no histogram for new names)
        hists = [r["server_histogram"][kind] for r in runs]
        out["server_histogram"] = {k: common.spread(h[k] for h in hists) for k in ("mean_ms", "p50_ms", "p99_ms")}
    return out


def ratios(mesh: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """meshplane / floor, median to median (meshplane's times from the file write, poll wait included)."""
    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 2) if a is not None and b else None

    return {k: ratio(mesh[k]["median"], base[k]["median"]) for k in ("p50", "p99", "all_ms")}


def print_result(result: dict[str, Any]) -> None:
    p = result["params"]
    rows = []

    def row(label: str, d: dict[str, Any]) -> None:
        rows.append([label, d["p50"]["median"], d["p99"]["median"], _range(d["p99"]),
                     d["max"]["median"], d["all_ms"]["median"], d["server_cpu_s"]["median"], d["sent_kib"]["median"]])

    def hist_row(label: str, d: dict[str, Any]) -> None:
        h = d["server_histogram"]
        rows.append([label, h["p50_ms"]["median"], h["p99_ms"]["median"], _range(h["p99_ms"]), None, None, None, None])

    by_protocol = result.get("by_protocol") or {"sotw": result["meshplane"]}
    for protocol, mp in by_protocol.items():
        row(f"{protocol} endpoint (EDS), from write", mp["endpoint"])
        hist_row("  server's histogram, from seen", mp["endpoint"])
        row(f"{protocol} policy (CDS), from write", mp["policy"])
        hist_row("  server's histogram, from seen", mp["policy"])
        row(f"{protocol} service added (CDS), write", mp["service"])
    for impl in floor.IMPLEMENTATIONS.values():
        if result.get(impl.key):
            fl = result[impl.key]["push"]
            rows.append([f"{impl.label} EDS push, from signal", fl["p50"]["median"], fl["p99"]["median"],
                         _range(fl["p99"]), fl["max"]["median"], fl["all_ms"]["median"],
                         common.spread(r["cpu_s"] for r in fl["runs"])["median"], None])
    poll = p["file_poll_interval_s"] * 1000
    common.print_table(["what", "p50 ms", "p99 ms", "p99 range", "max ms", "all ACKed ms", "server CPU s",
                        "sent KiB"], rows,
                       title=f"convergence: {p['proxies']} proxies in {p['localities']} localities, "
                             f"{p['services']} services x {p['endpoints']} endpoints, file poll {poll:g} ms, "
                             f"median of {p['repeat']}")
    for protocol, mp in by_protocol.items():
        conn = mp["setup"]["connect"]
        print(f"{protocol} connect: all {p['proxies']} full in {conn['all_ms']} ms; views {mp['setup']['views']}; "
              f"server RSS {mp['setup']['server_after_connect']['rss_mib']} MiB "
              f"(peak {mp['setup']['server_end']['hwm_mib']} MiB)")
    for impl in floor.IMPLEMENTATIONS.values():
        if result.get(impl.ratio_key):
            ratio = ", ".join(f"{k} {v}" for k, v in result[impl.ratio_key].items())
            print(f"meshplane/{impl.label} (medians, endpoint change): {ratio}")


def _range(d: dict[str, Any]) -> str:
    return f"{common.fmt(d['min'])}-{common.fmt(d['max'])}" if d["runs"] else "-"


def add_mesh_args(parser: argparse.ArgumentParser, *, services: int = 100) -> None:
    parser.add_argument("--services", type=int, default=services)
    parser.add_argument("--endpoints", type=int, default=10, help="per service")
    parser.add_argument("--clusters", type=int, default=4, help="endpoint files (Kubernetes clusters)")
    parser.add_argument("--zones", type=int, default=8)
    parser.add_argument("--processes", type=int, default=loadgen.default_processes(),
                        help="load generator worker processes")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for any one convergence")


def add_floor_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-floor", action="store_true", help="skip the grpcio floor")
    parser.add_argument("--cpp-floor", action="store_true",
                        help="also the C++ floor (bench/cppfloor, built first; needs g++ and gRPC C++)")


def parse_floors(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[str, ...]:
    """The floors asked for; a C++ floor that cannot be built stops here, before any measurement."""
    floors = (*(() if args.no_floor else ("grpcio",)), *(("cpp",) if args.cpp_floor else ()))
    for server in floors:
        if why := floor.unavailable(server):
            parser.error(why)
    return floors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.convergence", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--proxies", type=int, default=1000)
    parser.add_argument("--localities", type=int, default=8, help="distinct proxy localities (views)")
    parser.add_argument("--repeat", type=int, default=3)
    add_mesh_args(parser)
    parser.add_argument("--poll-interval", type=float, default=None,
                        help="serve --poll-interval (seconds); default: serve's own, 0.1 s")
    add_floor_args(parser)
    parser.add_argument("--profile", action="store_true",
                        help="sample the server with py-spy during each scenario (bench/results/profiles/); "
                             "its pauses slow the server, so do not quote times from such a run")
    parser.add_argument("--protocols", default="sotw,delta",
                        help="the simulated proxies' xDS protocols, measured one after the other (sotw, delta)")
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/convergence.json)")
    args = parser.parse_args(argv)
    floors = parse_floors(parser, args)
    common.stop_on_sigterm()
    quiet = common.wait_quiet(max_wait=0)
    result = run(proxies=args.proxies, localities=args.localities, services=args.services, endpoints=args.endpoints,
                 clusters=args.clusters, zones=args.zones, repeat=args.repeat, processes=args.processes,
                 timeout=args.timeout, poll_interval=args.poll_interval, floors=floors,
                 profile=args.profile, protocols=tuple(p for p in args.protocols.split(",") if p))
    path = common.write_results("convergence", {"machine": common.machine(), "quiet": quiet, "convergence": result},
                                args.out)
    print_result(result)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
