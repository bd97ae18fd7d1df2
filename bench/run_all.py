"""Every benchmark at its documented size, one after the other; one table; bench/results/latest.json.

    .venv/bin/python -m bench.run_all                 # about 10 minutes on 2 cores
    .venv/bin/python -m bench.run_all --quick         # small sizes: checks the suite works (a minute or two)

In order (never two at once: they would share the cores):

  convergence            1,000 proxies, 8 localities, 100 services x 10 endpoints, R changes of each kind,
                         `meshplane serve` as shipped (files polled every 100 ms), and both floors
  convergence, 5 ms poll the same with `serve --poll-interval 0.005`: times from the file write are
                         then nearly times from meshplane seeing the change
  storm                  1,000 proxies connect at once, R fresh servers, and both floors
  slow readers           a new proxy's first configuration with 1,000 streams open that never read
  real Envoys            12 real Envoys beside 1,000 simulated proxies, the same changes timed on both
  scale                  proxies 100/1,000/5,000; views 1/8/32; services 100/1,000/10,000; memory point

Both floors: the grpcio one (bench.floor) and the C++ one (bench/cppfloor, built first by
bench/cppfloor/build.sh); meshplane is divided by each. When the C++ floor cannot be built
(no g++ or gRPC C++) the run says why, goes on with the grpcio floor alone, and records why in
latest.json (cpp_floor_skipped).

The peer (sovereign, bench/peer_sovereign.py, with real Envoys) needs its own virtualenv and
runs apart; --with-peer runs it last, and its latest results (bench/results/peer_sovereign.json)
are quoted in latest.json either way, with their own date.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path
from typing import Any

from bench import common, convergence, floor, loadgen, real_envoys, scale, slow_readers, storm

TARGET_P99_MS = 100.0
TARGET_FLOOR_RATIO = 2.0
TARGET_RSS_MIB = 750 / 1.048576  # 750 MB


def run(*, repeat: int, quick: bool, processes: int, with_peer: bool) -> dict[str, Any]:
    size: dict[str, Any] = {"proxies": 200, "services": 30} if quick else {"proxies": 1000, "services": 100}
    mesh: dict[str, Any] = {"endpoints": 10, "clusters": 4, "zones": 8}
    began = time.monotonic()
    out: dict[str, Any] = {"machine": common.machine(), "repeat": repeat, "quick": quick}
    floors: tuple[str, ...] = ("grpcio", "cpp")
    out["cpp_floor_skipped"] = floor.unavailable("cpp")
    if out["cpp_floor_skipped"]:
        print(f"{out['cpp_floor_skipped']}\n(the suite goes on with the grpcio floor alone)", flush=True)
        floors = ("grpcio",)
    quiet = out["quiet"] = {}
    print("convergence (shipped 100 ms file poll) ...", flush=True)
    quiet["convergence"] = common.wait_quiet()
    out["convergence"] = convergence.run(localities=8, repeat=repeat, processes=processes, floors=floors, **size,
                                         **mesh)
    convergence.print_result(out["convergence"])
    print("\nconvergence (5 ms file poll) ...", flush=True)
    quiet["convergence_fastpoll"] = common.wait_quiet()
    out["convergence_fastpoll"] = convergence.run(localities=8, repeat=repeat, processes=processes,
                                                  poll_interval=0.005, floors=floors, **size, **mesh)
    convergence.print_result(out["convergence_fastpoll"])
    print("\nstorm ...", flush=True)
    quiet["storm"] = common.wait_quiet()
    out["storm"] = storm.run(localities=8, repeat=repeat, processes=processes, floors=floors, **size, **mesh)
    storm.print_result(out["storm"])
    print("\nslow readers ...", flush=True)
    quiet["slow_readers"] = common.wait_quiet()
    out["slow_readers"] = slow_readers.run(streams=200 if quick else 1000, services=size["services"], repeat=repeat,
                                           timeout=120.0, **mesh)
    slow_readers.print_result(out["slow_readers"])
    print("\nreal Envoys beside the simulated proxies ...", flush=True)
    quiet["real_envoys"] = common.wait_quiet()
    out["real_envoys"] = real_envoys.run(envoys=4 if quick else 12, localities=8, repeat=repeat, processes=processes,
                                         **size, **mesh)
    real_envoys.print_result(out["real_envoys"])
    print("\nscale ...", flush=True)
    quiet["scale"] = common.wait_quiet()
    lists: dict[str, Any] = ({"proxies_list": (50, 200), "views_list": (1, 8), "services_list": (30, 300),
                              "views_proxies": 200, "services_proxies": 50, "sweeps": ("proxies", "views", "services")}
                             if quick else {})
    out["scale"] = scale.run(changes=repeat, processes=processes, wait=900.0, **lists)
    scale.print_result(out["scale"])
    if with_peer:
        print("\npeer (sovereign) ...", flush=True)
        subprocess.run([common.PYTHON, "-m", "bench.peer_sovereign"], cwd=common.ROOT, check=False)
    peer = common.RESULTS / "peer_sovereign.json"
    out["peer_sovereign"] = json.loads(peer.read_text()) if peer.exists() else None
    out["targets"] = targets(out)
    out["elapsed_s"] = round(time.monotonic() - began, 1)
    return out


def targets(out: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 4's targets against this run's medians."""
    rows = []
    for key, label in (("convergence", "100 ms poll, from file write"),
                       ("convergence_fastpoll", "5 ms poll, from file write")):
        c = out[key]
        ep = c["meshplane"]["endpoint"]
        p = c["params"]
        what = f"1 endpoint, {p['proxies']} proxies, {p['localities']} localities: p99 ({label})"
        rows.append(_target(what, ep["p99"], TARGET_P99_MS, "ms"))
        for server, impl in floor.IMPLEMENTATIONS.items():
            ratio = (c.get(impl.ratio_key) or {}).get("p99")
            if ratio is None:
                continue
            if server == "grpcio":  # issue 4's target is against the grpcio floor
                rows.append({"target": f"meshplane/{impl.label} p99, endpoint change ({label})", "value": ratio,
                             "spread": None, "goal": f"<= {TARGET_FLOOR_RATIO}", "met": ratio <= TARGET_FLOOR_RATIO})
            else:
                rows.append({"target": f"meshplane/{impl.label} p99, endpoint change ({label}; not an issue-4 target)",
                             "value": ratio, "spread": None, "goal": "-", "met": None})
    for impl in floor.IMPLEMENTATIONS.values():
        if out["storm"].get(impl.ratio_key):
            rows.append({"target": f"meshplane/{impl.label}, storm to full config (not an issue-4 target)",
                         "value": out["storm"][impl.ratio_key], "spread": None, "goal": "-", "met": None})
    memory = out["scale"].get("memory")
    if memory:
        point = memory["points"][0]
        rows.append({"target": "1,000 services x 10 endpoints, 2,000 proxies: peak RSS (MiB)",
                     "value": point["hwm_mib"], "spread": None, "goal": f"< {TARGET_RSS_MIB:.0f}",
                     "met": point["hwm_mib"] < TARGET_RSS_MIB})
    slow = out.get("slow_readers")
    if slow:
        settled = slow["settled_first_config_ms"]
        rows.append(_target(f"new proxy's full config with {slow['params']['streams']} non-reading streams open (ms)",
                            settled, 100.0, "ms"))
    rows.append({"target": "ahead of sovereign (bench/peer_sovereign.py)", "value": None, "spread": None,
                 "goal": "ratio > 1", "met": None})
    return rows


def _target(what: str, spread: dict[str, Any], goal: float, unit: str) -> dict[str, Any]:
    value = spread["median"]
    return {"target": what, "value": value, "spread": f"{common.fmt(spread['min'])}-{common.fmt(spread['max'])}",
            "goal": f"<= {goal:g} {unit}", "met": value is not None and value <= goal}


def print_summary(out: dict[str, Any]) -> None:
    m = out["machine"]
    rows = []
    for key, label in (("convergence", "poll 100 ms"), ("convergence_fastpoll", "poll 5 ms")):
        c = out[key]
        for scenario, name in (("endpoint", "endpoint (EDS)"), ("policy", "policy (CDS)"),
                               ("service", "service added (CDS)")):
            d = c["meshplane"][scenario]
            rows.append([f"convergence {name}, {label}", d["p50"]["median"], d["p99"]["median"],
                         f"{common.fmt(d['p99']['min'])}-{common.fmt(d['p99']['max'])}", d["all_ms"]["median"],
                         d["server_cpu_s"]["median"]])
        for impl in floor.IMPLEMENTATIONS.values():
            if c.get(impl.key):
                f = c[impl.key]["push"]
                rows.append([f"{impl.label} EDS push ({label} run)", f["p50"]["median"], f["p99"]["median"],
                             f"{common.fmt(f['p99']['min'])}-{common.fmt(f['p99']['max'])}", f["all_ms"]["median"],
                             common.spread(r["cpu_s"] for r in f["runs"])["median"]])
    s = out["storm"]
    for key, name in (("meshplane", "meshplane"), *((i.key, i.label) for i in floor.IMPLEMENTATIONS.values())):
        d = s.get(key)
        if d:
            rows.append([f"storm {name} (connect to full config)", d["p50"]["median"], d["p99"]["median"],
                         f"{common.fmt(d['p99']['min'])}-{common.fmt(d['p99']['max'])}", d["all_ms"]["median"],
                         d["cpu_s"]["median"]])
    p = out["convergence"]["params"]
    common.print_table(["benchmark", "p50 ms", "p99 ms", "p99 range", "all ms", "server CPU s"], rows,
                       title=f"meshplane {m['commit']} on {m['nproc']} cores ({m['cpu']}), {m['date']}: "
                             f"{p['proxies']} proxies, {p['services']} services, medians of {out['repeat']}")
    slow_readers.print_result(out["slow_readers"])
    real_envoys.print_result(out["real_envoys"])
    scale.print_result(out["scale"])
    common.print_table(["target", "value", "spread", "goal", "met"],
                       [[t["target"], t["value"], t["spread"], t["goal"],
                         {True: "yes", False: "NO", None: "-"}[t["met"]]] for t in out["targets"]],
                       title="issue 4 targets")
    if out.get("cpp_floor_skipped"):
        print(f"\nno C++ floor in this run: {out['cpp_floor_skipped']}")
    if out.get("peer_sovereign"):
        print(f"\npeer: see bench/results/peer_sovereign.json ({out['peer_sovereign'].get('date', 'undated')})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of every measurement (>= 3 to quote)")
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the suite runs")
    parser.add_argument("--processes", type=int, default=loadgen.default_processes(),
                        help="load generator worker processes")
    parser.add_argument("--with-peer", action="store_true", help="also run bench.peer_sovereign (needs its venv)")
    parser.add_argument("--out", type=Path, help="default bench/results/latest.json (quick: latest-quick.json)")
    args = parser.parse_args(argv)
    common.stop_on_sigterm()
    out = run(repeat=args.repeat, quick=args.quick, processes=args.processes, with_peer=args.with_peer)
    path = common.write_results("latest-quick" if args.quick else "latest", out, args.out)
    print("\n" + "=" * 100)
    print_summary(out)
    print(f"\nwrote {path} ({out['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
