"""Scale and cost growth: server CPU per endpoint change, and RSS, as proxies, views and services grow.

The claim under test: the cost of a change grows with the views (distinct proxy localities)
and the services that changed, not with the number of proxies or of services in total.
Three sweeps, one variable each, the others fixed; then the memory target:

  proxies   N = 100, 1,000, 5,000     (8 localities, 100 services)
  views     L = 1, 8, 32              (1,000 proxies, 100 services)
  services  S = 100, 1,000, 10,000    (100 proxies, 8 localities)
  memory    1,000 services x 10 endpoints, 2,000 proxies in 8 localities: RSS (target < 750 MB)

Each point starts a fresh `meshplane serve`, connects the proxies, then flips one endpoint's
health K times (bench.convergence's endpoint change). Per change: server CPU seconds (less
the idle rate), the push's p99 and all-ACKed times, the build time meshplane reports. Every
change pushes one assignment to every proxy, and every proxy's ACK names all its clusters, so
some cost per proxy and per service is inherent: the floor (bench.floor) takes the same
proxies and K pushes at every point (--no-floor skips it), and what matters is how the rest grows.

At 10,000 services a cluster's file holds 25,000 endpoints; an edit re-parses only the service
entries whose text changed (fileparse.parse_changed). That parse is measured apart too (the
same call, in this process, for the edit the benchmark makes) and reported beside the CPU.

serve watches its files with inotify; --poll-interval (the fallback poll, 0.005 here as before)
matters only where inotify is unavailable.

    .venv/bin/python -m bench.scale                    # every sweep, 3 changes per point (a few minutes)
    .venv/bin/python -m bench.scale --sweep proxies --proxies-list 100,1000
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common, convergence, floor, loadgen

SWEEPS = ("proxies", "views", "services", "memory")


def point(*, proxies: int, localities: int, services: int, endpoints: int, clusters: int, zones: int, changes: int,
          processes: int, poll_interval: float | None, timeout: float, with_floor: bool) -> dict[str, Any]:
    mesh = common.Mesh(services=services, endpoints=endpoints, clusters=clusters, zones=zones)
    with tempfile.TemporaryDirectory(prefix="meshplane-bench-") as tmp:
        workdir = Path(tmp)
        target, setup = convergence.start_target(mesh, workdir, proxies, localities, processes, timeout,
                                                 poll_interval)
        try:
            target.measure_idle()
            runs = [target.endpoint_change(timeout) for _ in range(changes)]
            end = common.memory_mib(target.server.pid)
        finally:
            convergence.stop_target(target)
        parse = parse_ms(mesh, workdir)
    base = None
    if with_floor:  # the same proxies and pushes against the floor: the part of the cost no server avoids
        measured = floor.measure(proxies=proxies, localities=localities, mesh=mesh, repeat=changes,
                                 processes=processes, timeout=timeout)
        runs_f = measured["push"]["runs"]
        base = {"cpu_per_push_s": common.spread(r["cpu_s"] for r in runs_f),
                "p99_ms": common.spread(r["p99"] for r in runs_f),
                "connect_all_ms": measured["storm"]["all_ms"], "rss_mib": measured["storm"]["rss_mib"],
                "hwm_mib": measured["storm"]["hwm_mib"]}
    return {
        "proxies": proxies, "views": setup["views"], "services": services, "endpoints": endpoints,
        "connect_all_ms": setup["connect"]["all_ms"], "connect_cpu_s": setup["connect"]["server_cpu_s"],
        "startup_s": setup["startup_s"],
        "rss_mib": setup["server_after_connect"]["rss_mib"], "hwm_mib": end["hwm_mib"], "rss_end_mib": end["rss_mib"],
        "cpu_per_change_s": common.spread(r["server_cpu_s"] for r in runs),
        "p99_ms": common.spread(r["p99"] for r in runs),
        "all_ms": common.spread(r["all_ms"] for r in runs),
        "build_ms": common.spread(r["build_ms"] for r in runs),
        "file_parse_ms": parse,
        "floor": base,
        "runs": runs,
    }


def parse_ms(mesh: common.Mesh, workdir: Path) -> float:
    """What meshplane's file source spends parsing the file a change touched (the same call, here): the
    file as it was, then with one endpoint's health flipped, parsed reusing what was parsed before."""
    from meshplane.discovery import fileparse

    path = mesh.file(workdir, mesh.zone(0)[1])
    text = path.read_text()
    edited = text.replace("health: healthy", "health: unhealthy", 1)
    _, last, _, _ = fileparse.parse_changed(text, path=str(path), last=None)
    times = []
    for _ in range(3):
        began = time.perf_counter()
        fileparse.parse_changed(edited, path=str(path), last=last)
        times.append(time.perf_counter() - began)
    return round(statistics.median(times) * 1000, 1)


def run(*, sweeps: tuple[str, ...] = SWEEPS, proxies_list: tuple[int, ...] = (100, 1000, 5000),
        views_list: tuple[int, ...] = (1, 8, 32), services_list: tuple[int, ...] = (100, 1000, 10000),
        changes: int = 3, processes: int = 1, poll_interval: float | None = 0.005, timeout: float = 300.0,
        clusters: int = 4, zones: int = 8, wait: float = 0.0, views_proxies: int = 1000,
        services_proxies: int = 100, with_floor: bool = True) -> dict[str, Any]:
    base: dict[str, Any] = {"endpoints": 10, "clusters": clusters, "zones": zones, "changes": changes,
                            "processes": processes, "poll_interval": poll_interval, "timeout": timeout,
                            "with_floor": with_floor}
    plan: dict[str, list[dict[str, Any]]] = {
        "proxies": [{"proxies": n, "localities": 8, "services": 100} for n in proxies_list],
        "views": [{"proxies": views_proxies, "localities": v, "services": 100} for v in views_list],
        "services": [{"proxies": services_proxies, "localities": 8, "services": s} for s in services_list],
        "memory": [{"proxies": 2000, "localities": 8, "services": 1000}],
    }
    result: dict[str, Any] = {"params": {**base, "file_poll_interval_s": poll_interval or 0.1,
                                         "sweeps": list(sweeps)}}
    for sweep in sweeps:
        points = []
        for spec in plan[sweep]:
            print(f"scale {sweep}: {spec} ...", flush=True)
            common.wait_quiet(max_wait=wait)
            points.append(point(**spec, **base))
        result[sweep] = {"points": points, "growth": growth(points, sweep) if sweep != "memory" else None}
    if "memory" in sweeps:
        rss = result["memory"]["points"][0]["hwm_mib"]
        result["memory"]["target_mib"] = 750 / 1.048576  # 750 MB in MiB
        result["memory"]["met"] = rss < result["memory"]["target_mib"]
    return result


def growth(points: list[dict[str, Any]], sweep: str) -> dict[str, Any]:
    """How much the varied quantity grew from the first point to the last, and how much CPU per change did."""
    key = {"proxies": "proxies", "views": "views", "services": "services"}[sweep]
    first, last = points[0], points[-1]
    c0, c1 = first["cpu_per_change_s"]["median"], last["cpu_per_change_s"]["median"]
    out = {"quantity": key, "x": round(last[key] / first[key], 2) if first[key] else None,
           "cpu_per_change_x": round(c1 / c0, 2) if c0 and c1 else None,
           "rss_x": round(last["rss_mib"] / first["rss_mib"], 2), "floor_cpu_per_push_x": None}
    if first.get("floor") and last.get("floor"):
        f0, f1 = first["floor"]["cpu_per_push_s"]["median"], last["floor"]["cpu_per_push_s"]["median"]
        out["floor_cpu_per_push_x"] = round(f1 / f0, 2) if f0 and f1 else None
    return out


def print_result(result: dict[str, Any]) -> None:
    rows = []
    for sweep in SWEEPS:
        if sweep not in result:
            continue
        for p in result[sweep]["points"]:
            cpu = p["cpu_per_change_s"]
            f = p.get("floor") or {}
            rows.append([sweep, p["proxies"], p["views"], p["services"], cpu["median"],
                         f"{common.fmt(cpu['min'])}-{common.fmt(cpu['max'])}", p["file_parse_ms"],
                         p["build_ms"]["median"], p["p99_ms"]["median"], p["all_ms"]["median"], p["connect_all_ms"],
                         p["rss_mib"], p["hwm_mib"], (f.get("cpu_per_push_s") or {}).get("median"),
                         (f.get("p99_ms") or {}).get("median"), f.get("hwm_mib")])
    poll = result["params"]["file_poll_interval_s"] * 1000
    common.print_table(["sweep", "proxies", "views", "services", "CPU/change s", "range", "parse ms", "build ms",
                        "p99 ms", "all ms", "connect ms", "RSS MiB", "peak MiB", "floor CPU s", "floor p99",
                        "floor peak"], rows,
                       title=f"scale: one endpoint change, median of {result['params']['changes']} per point, "
                             f"file poll {poll:g} ms")
    for sweep in ("proxies", "views", "services"):
        g = result.get(sweep, {}).get("growth")
        if g:
            print(f"{sweep} x{g['x']}: CPU per change x{g['cpu_per_change_x']} (floor's per push "
                  f"x{g['floor_cpu_per_push_x']}), RSS x{g['rss_x']}")
    if "memory" in result:
        m = result["memory"]
        print(f"memory: 1,000 services x 10 endpoints, 2,000 proxies: peak {m['points'][0]['hwm_mib']} MiB "
              f"(target < {m['target_mib']:.0f} MiB = 750 MB): {'met' if m['met'] else 'MISSED'}")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="append", choices=SWEEPS, help="run only these (repeatable)")
    parser.add_argument("--proxies-list", type=_ints, default=(100, 1000, 5000))
    parser.add_argument("--views-list", type=_ints, default=(1, 8, 32))
    parser.add_argument("--services-list", type=_ints, default=(100, 1000, 10000))
    parser.add_argument("--changes", type=int, default=3, help="endpoint changes per point")
    parser.add_argument("--processes", type=int, default=loadgen.default_processes(),
                        help="load generator worker processes")
    parser.add_argument("--poll-interval", type=float, default=0.005, help="serve's file poll (0.1 = shipped)")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--no-floor", action="store_true", help="skip the floor at each point")
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/scale.json)")
    args = parser.parse_args(argv)
    common.stop_on_sigterm()
    result = run(sweeps=tuple(args.sweep or SWEEPS), proxies_list=args.proxies_list, views_list=args.views_list,
                 services_list=args.services_list, changes=args.changes, processes=args.processes,
                 poll_interval=args.poll_interval, timeout=args.timeout, with_floor=not args.no_floor)
    path = common.write_results("scale", {"machine": common.machine(), "scale": result}, args.out)
    print_result(result)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

