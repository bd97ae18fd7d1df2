"""Slow clients among many: N streams of which a share never read, against the same N that all read.

Starts `meshplane serve` (shipped defaults, 5 ms file poll) on the generated mesh, connects the
reading proxies (bench.loadgen: N x (1 - share)), and in one of the two runs also opens the
non-reading streams (bench.slow_readers: they ask for CDS, EDS, LDS and RDS and never read, so the
server's writes to them block at once). Then R endpoint changes, each timed from the file write to
every reading proxy's ACK of it. Reported per run: the readers' p50 / p99, the server's RSS before
any stream, with every stream open, and after the changes; the runs alternate with and without the
slow streams, each against a fresh server.

    .venv/bin/python -m bench.mixed_readers                          # 5,000 streams, 10 % never read
    .venv/bin/python -m bench.mixed_readers --streams 500 --repeat 2   # smoke check
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from bench import common, convergence, slow_readers


def once(mesh: common.Mesh, *, readers: int, slow: int, repeat: int, processes: int,
         timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="meshplane-bench-") as tmp:
        target, setup = convergence.start_target(mesh, Path(tmp), readers, 8, processes, timeout, 0.005)
        stuck = None
        try:
            out: dict[str, Any] = {"readers": readers, "slow": slow, "connect": setup["connect"],
                                   "rss_before_mib": setup["server_before_connect"]["rss_mib"]}
            if slow:
                stuck = slow_readers.NonReaders(target.server.target, slow,
                                                [mesh.cluster_name(s) for s in range(mesh.services)],
                                                mesh.localities(8))
                stuck.go()
                stuck.wait_open()
                out["settle_s"] = round(slow_readers._settled(target.server), 2)
            out["rss_connected_mib"] = common.memory_mib(target.server.pid)["rss_mib"]
            target.measure_idle()
            changes = [target.endpoint_change(timeout) for _ in range(repeat)]
            after = common.memory_mib(target.server.pid)
            out.update(rss_after_mib=after["rss_mib"], hwm_mib=after["hwm_mib"],
                       p50_ms=common.spread(c["p50"] for c in changes),
                       p99_ms=common.spread(c["p99"] for c in changes),
                       all_acked_ms=common.spread(c["all_ms"] for c in changes),
                       server_cpu_s=common.spread(c["server_cpu_s"] for c in changes),
                       stalled_writes=target.server.metrics().get(("meshplane_xds_stalled_writes_total", ())))
        finally:
            if stuck is not None:
                stuck.stop()
            convergence.stop_target(target)
    return out


def run(*, streams: int, share: float, runs: int, repeat: int, services: int, endpoints: int, clusters: int,
        zones: int, processes: int, timeout: float) -> dict[str, Any]:
    mesh = common.Mesh(services=services, endpoints=endpoints, clusters=clusters, zones=zones)
    slow = round(streams * share)
    results: dict[str, list[dict[str, Any]]] = {"with_slow": [], "without_slow": []}
    for _ in range(runs):  # alternating, so that a drift of the machine touches both alike
        results["without_slow"].append(once(mesh, readers=streams - slow, slow=0, repeat=repeat,
                                            processes=processes, timeout=timeout))
        results["with_slow"].append(once(mesh, readers=streams - slow, slow=slow, repeat=repeat,
                                         processes=processes, timeout=timeout))
    return {"params": {"streams": streams, "slow": slow, "runs": runs, "repeat": repeat, "services": services,
                       "endpoints": endpoints, "clusters": clusters, "zones": zones, "loadgen_processes": processes},
            **results}


def print_result(result: dict[str, Any]) -> None:
    p = result["params"]
    rows = []
    for label in ("without_slow", "with_slow"):
        for r in result[label]:
            rows.append([label.replace("_", " "), r["readers"], r["slow"], r["p50_ms"]["median"],
                         r["p99_ms"]["median"], f"{common.fmt(r['p99_ms']['min'])}-{common.fmt(r['p99_ms']['max'])}",
                         r["rss_before_mib"], r["rss_connected_mib"], r["rss_after_mib"], r["hwm_mib"]])
    common.print_table(["run", "readers", "never read", "p50 ms", "p99 ms", "p99 range", "RSS before",
                        "RSS all open", "RSS after", "peak MiB"], rows,
                       title=f"{p['streams']} streams, {p['slow']} never read; endpoint changes from the file "
                             f"write to every reader's ACK, median of {p['repeat']} per run")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.mixed_readers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=5000)
    parser.add_argument("--share", type=float, default=0.1, help="the share of streams that never read")
    parser.add_argument("--runs", type=int, default=2, help="runs of each kind, alternating")
    parser.add_argument("--repeat", type=int, default=5, help="endpoint changes per run")
    convergence.add_mesh_args(parser)
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/mixed_readers.json)")
    args = parser.parse_args(argv)
    common.stop_on_sigterm()
    quiet = common.wait_quiet(max_wait=0)
    result = run(streams=args.streams, share=args.share, runs=args.runs, repeat=args.repeat, services=args.services,
                 endpoints=args.endpoints, clusters=args.clusters, zones=args.zones, processes=args.processes,
                 timeout=max(args.timeout, 120.0))
    path = common.write_results("mixed_readers", {"machine": common.machine(), "quiet": quiet,
                                                  "mixed_readers": result}, args.out)
    print_result(result)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
