"""Connection storm: N proxies connect at once, as after a control-plane restart.

Each repetition starts a fresh `meshplane serve` (no views built yet, as after a restart),
waits for /ready, spawns the load generator's workers (imports done before any clock
starts), then opens all N streams at once. Reported: the time from the first stream opened
until every proxy holds a full ACKed configuration (CDS, and EDS for every cluster), the
per-proxy p50/p99 of that, the server's CPU seconds over the storm, and its RSS after and
peak RSS (VmHWM, which includes start-up; start-up's own peak is reported beside it).
The floor (bench.floor) takes the same storm, the same way; with --cpp-floor the C++ floor
(bench/cppfloor) takes it too, after the grpcio one.

The simulated proxies connect without a version (like a proxy that restarted too);
reconnecting Envoys that report the version they hold get no re-push from meshplane, so
this is the heavier case.

    .venv/bin/python -m bench.storm                     # 1,000 proxies, 8 localities, 100 services, 3 runs
    .venv/bin/python -m bench.storm --cpp-floor         # and the C++ floor beside the grpcio one
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from bench import common, convergence, floor, loadgen


def storm_once(mesh: common.Mesh, proxies: int, localities: int, processes: int, timeout: float,
               protocol: str = "sotw") -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="meshplane-bench-") as tmp:
        workdir = Path(tmp)
        files = mesh.write(workdir)
        policy = common.write_policy(workdir / "policy.yaml")
        with common.Meshplane(workdir, files, policy) as server:
            startup = server.wait_ready()
            before = common.memory_mib(server.pid)
            with loadgen.LoadGen(server.target, proxies, mesh.localities(localities), processes=processes,
                                 protocol=protocol) as gen:
                cpu0, sent0 = common.cpu_seconds(server.pid), server.metrics()
                result = loadgen.connect_summary(gen.connect(timeout))
                result["server_cpu_s"] = round(common.cpu_seconds(server.pid) - cpu0, 3)
                sent = server.metrics()
                result["sent_mib"] = round(sum(common.counter_delta(sent0, sent, "meshplane_xds_response_bytes_total",
                                                                    type=k) for k in ("cds", "eds")) / 2**20, 2)
                after = common.memory_mib(server.pid)
                result.update(startup_s=round(startup, 2), rss_before_mib=before["rss_mib"],
                              hwm_startup_mib=before["hwm_mib"], rss_mib=after["rss_mib"], hwm_mib=after["hwm_mib"])
    return result


def run(*, proxies: int, localities: int, services: int, endpoints: int, clusters: int, zones: int, repeat: int,
        processes: int, timeout: float = 300.0, floors: tuple[str, ...] = ("grpcio",),
        protocols: tuple[str, ...] = ("sotw",)) -> dict[str, Any]:
    """`protocols`: the proxies' xDS protocol, runs interleaved; `meshplane` is the first's.

    `floors`: keys of floor.IMPLEMENTATIONS, each taking `repeat` storms after meshplane's.
    """
    mesh = common.Mesh(services=services, endpoints=endpoints, clusters=clusters, zones=zones)
    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in protocols}
    for _ in range(repeat):
        for protocol in protocols:
            runs[protocol].append(storm_once(mesh, proxies, localities, processes, timeout, protocol))
    by_protocol = {p: {"runs": r, **_spread(r, cpu="server_cpu_s")} for p, r in runs.items()}
    result: dict[str, Any] = {
        "params": {"proxies": proxies, "localities": localities, "services": services, "endpoints": endpoints,
                   "clusters": clusters, "zones": zones, "repeat": repeat, "loadgen_processes": processes,
                   "protocols": list(protocols), "floors": list(floors)},
        "meshplane": by_protocol[protocols[0]],
        "by_protocol": by_protocol,
        **{key: None for impl in floor.IMPLEMENTATIONS.values() for key in (impl.key, impl.ratio_key)},
    }
    for server in floors:
        impl = floor.IMPLEMENTATIONS[server]
        floor_runs = [floor.measure(proxies=proxies, localities=localities, mesh=mesh, repeat=0, processes=processes,
                                    timeout=timeout, server=server)["storm"] for _ in range(repeat)]
        result[impl.key] = {"runs": floor_runs, **_spread(floor_runs, cpu="cpu_s")}
        m, f = result["meshplane"]["all_ms"]["median"], result[impl.key]["all_ms"]["median"]
        result[impl.ratio_key] = round(m / f, 2) if m and f else None
    return result


def _spread(runs: list[dict[str, Any]], *, cpu: str) -> dict[str, Any]:
    out = floor.over_runs(runs)
    out["cpu_s"] = common.spread(r[cpu] for r in runs)
    out["hwm_mib"] = common.spread(r.get("hwm_mib") for r in runs)
    out["rss_mib"] = common.spread(r.get("rss_mib") for r in runs)
    out["sent_mib"] = common.spread(r.get("sent_mib") for r in runs)
    return out


def print_result(result: dict[str, Any]) -> None:
    p = result["params"]
    rows = []
    by_protocol = result.get("by_protocol") or {"sotw": result["meshplane"]}
    for label, d in (*((f"meshplane {p}", d) for p, d in by_protocol.items()),
                     *((impl.label, result.get(impl.key)) for impl in floor.IMPLEMENTATIONS.values())):
        if d:
            rows.append([label, d["all_ms"]["median"], f"{common.fmt(d['all_ms']['min'])}-"
                         f"{common.fmt(d['all_ms']['max'])}", d["p50"]["median"], d["p99"]["median"],
                         d["cpu_s"]["median"], d["rss_mib"]["median"], d["hwm_mib"]["median"],
                         d.get("sent_mib", {}).get("median")])
    common.print_table(["server", "all full ms", "range", "p50 ms", "p99 ms", "CPU s", "RSS MiB", "peak MiB",
                        "sent MiB"], rows,
                       title=f"storm: {p['proxies']} proxies connect at once, {p['localities']} localities, "
                             f"{p['services']} services x {p['endpoints']} endpoints, median of {p['repeat']}")
    for impl in floor.IMPLEMENTATIONS.values():
        if result.get(impl.ratio_key):
            print(f"meshplane/{impl.label} (all full, medians): {result[impl.ratio_key]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.storm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--proxies", type=int, default=1000)
    parser.add_argument("--localities", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    convergence.add_mesh_args(parser)
    convergence.add_floor_args(parser)
    parser.add_argument("--protocols", default="sotw,delta",
                        help="the simulated proxies' xDS protocols, runs interleaved (sotw, delta)")
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/storm.json)")
    args = parser.parse_args(argv)
    floors = convergence.parse_floors(parser, args)
    common.stop_on_sigterm()
    quiet = common.wait_quiet(max_wait=0)
    result = run(proxies=args.proxies, localities=args.localities, services=args.services, endpoints=args.endpoints,
                 clusters=args.clusters, zones=args.zones, repeat=args.repeat, processes=args.processes,
                 timeout=max(args.timeout, 300.0), floors=floors,
                 protocols=tuple(p for p in args.protocols.split(",") if p))
    path = common.write_results("storm", {"machine": common.machine(), "quiet": quiet, "storm": result}, args.out)
    print_result(result)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
