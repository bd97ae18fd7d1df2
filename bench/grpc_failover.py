"""S1 for proxyless gRPC clients: failed calls and time to move at each failover step.

A fresh `meshplane serve` (shipped defaults, S1's policy with the outlier-detection `--interval`
asked for) serves echo replicas in S1's four zones (meshplane.demo.grpcecho) to grpcio's own xDS
client, one process per zone, each calling 20 times a second. Per run, three steps:

1. the replica in ap-northeast-1a stops (connection refused): its client must move to 1b;
2. the replica in 1b stops too: both ap-northeast-1 clients must move to cn-hangzhou;
3. (the replicas back, a fresh server) the replica in cn-hangzhou-h answers every call with an
   error: its client must move to cn-hangzhou-k once failure-percentage ejection takes it out.

Reported per step: the calls that failed, and the time from the break to the first call answered
in the new place (median and range over runs).

    .venv/bin/python -m bench.grpc_failover                      # interval 30s (S1's), 3 runs
    .venv/bin/python -m bench.grpc_failover --interval 1s --runs 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bench import common
from meshplane.demo import grpcmesh, topology

RATE = 20.0
HZ = topology.S1_CLUSTERS[0].zones
AP = topology.S1_CLUSTERS[1].zones


@contextlib.asynccontextmanager
async def _serving(workdir: Path, mesh: grpcmesh.Mesh, interval: str) -> AsyncIterator[common.Meshplane]:
    policy = workdir / "policy.yaml"
    policy.write_text(topology.s1_policy().replace("interval: 30s", f"interval: {interval}"))
    with common.Meshplane(workdir, mesh.files, policy) as server:
        server.wait_ready()
        yield server


async def _ready(clients: list[grpcmesh.XdsClient]) -> None:
    start = time.monotonic()
    for c in clients:
        await grpcmesh.moved(c, start, {c.zone}, timeout=30)


async def _zones_down(workdir: Path, interval: str) -> dict[str, Any]:
    async with grpcmesh.Mesh(workdir, {"echo": HZ + AP}) as mesh, _serving(workdir, mesh, interval) as server:
        clients = [grpcmesh.XdsClient(grpcmesh.s1_bootstrap(server.ads_port, z), "xds:///echo:50051", rate=RATE)
                   for z in (AP[0], AP[1])]
        async with clients[0], clients[1]:
            await _ready(clients)
            t0 = time.monotonic()
            await mesh.replicas["echo", AP[0]].stop()
            zone_failed, zone_took = await grpcmesh.moved(clients[0], t0, {AP[1]})
            t1 = time.monotonic()
            await mesh.replicas["echo", AP[1]].stop()
            region = [await grpcmesh.moved(c, t1, set(HZ)) for c in clients]
    return {"zone_failed": zone_failed, "zone_ms": zone_took * 1000,
            "region_failed": max(f for f, _ in region), "region_ms": max(t for _, t in region) * 1000}


async def _erroring(workdir: Path, interval: str, timeout: float) -> dict[str, Any]:
    async with grpcmesh.Mesh(workdir, {"echo": HZ}) as mesh, _serving(workdir, mesh, interval) as server, \
            grpcmesh.XdsClient(grpcmesh.s1_bootstrap(server.ads_port, HZ[0]), "xds:///echo:50051", rate=RATE) as c:
        await _ready([c])
        t0 = time.monotonic()
        mesh.replicas["echo", HZ[0]].failing = True
        failed, took = await grpcmesh.moved(c, t0, {HZ[1]}, timeout=timeout)
    return {"errors_failed": failed, "errors_ms": took * 1000}


async def run(*, interval: str, runs: int) -> dict[str, Any]:
    seconds = float(interval.rstrip("s")) if interval.endswith("s") and not interval.endswith("ms") else 60.0
    out: list[dict[str, Any]] = []
    for i in range(runs):
        with tempfile.TemporaryDirectory(prefix="meshplane-bench-") as tmp:
            one = await _zones_down(Path(tmp), interval)
        with tempfile.TemporaryDirectory(prefix="meshplane-bench-") as tmp:
            one.update(await _erroring(Path(tmp), interval, timeout=2 * seconds + 15))
        print(f"run {i + 1}: {one}", flush=True)
        out.append(one)
    keys = ("zone_failed", "zone_ms", "region_failed", "region_ms", "errors_failed", "errors_ms")
    return {"interval": interval, "rate": RATE, "runs": out, **{k: common.spread(r[k] for r in out) for k in keys}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--interval", default="30s", help="the policy's outlier-detection interval (default 30s)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="results file (default bench/results/...)")
    args = parser.parse_args()
    common.stop_on_sigterm()
    result = {"machine": common.machine(), **asyncio.run(run(interval=args.interval, runs=args.runs))}
    path = common.write_results(f"grpc_failover_{args.interval}", result, args.out)
    rows = [(step, result[f"{key}_failed"]["median"], result[f"{key}_ms"]["median"],
             f"{result[f'{key}_ms']['min']}-{result[f'{key}_ms']['max']}")
            for step, key in (("zone down (refused)", "zone"), ("region down", "region"),
                              ("endpoint answers errors", "errors"))]
    common.print_table(["step", "failed calls", "ms to move (median)", "range"], rows,
                       title=f"gRPC failover, interval {args.interval}, {RATE:g} calls/s per client")
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
