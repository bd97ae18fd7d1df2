"""What meshplane's memory is made of, at the issue's memory target size, under tracemalloc.

    .venv/bin/python -m bench.memory                   # 1,000 services x 10 endpoints, 2,000 proxies
    .venv/bin/python -m bench.memory --proxies 500 --services 200

Starts `meshplane serve` under tracemalloc (bench/traced.py), connects the proxies (bench.loadgen),
flips one endpoint (every proxy ACKs once more, as in steady state), then asks the server for
its allocation sites. Prints RSS (VmRSS/VmHWM), the Python memory tracemalloc sees, and the top
sites by line and by file; what RSS holds beyond the traced total is gRPC's C core, the
interpreter, allocator fragmentation and tracemalloc's own bookkeeping. The untraced RSS of the
same point is bench.scale's "memory" sweep; the floor's (bench.floor) shows what gRPC alone costs
per stream.
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common, convergence, loadgen


def run(*, proxies: int, services: int, endpoints: int, localities: int, processes: int,
        timeout: float) -> dict[str, Any]:
    mesh = common.Mesh(services=services, endpoints=endpoints)
    with tempfile.TemporaryDirectory(prefix="meshplane-bench-") as tmp:
        workdir = Path(tmp)
        files = mesh.write(workdir)
        policy = common.write_policy(workdir / "policy.yaml")
        report = workdir / "tracemalloc.txt"
        with common.Meshplane(workdir, files, policy, poll_interval=0.005, traced=report) as server:
            server.wait_ready(timeout)
            before = common.memory_mib(server.pid)
            with loadgen.LoadGen(server.target, proxies, mesh.localities(localities), processes=processes) as gen:
                connect = loadgen.connect_summary(gen.connect(timeout))
                connected = common.memory_mib(server.pid)
                target = convergence.Target(server, gen, mesh, workdir, policy)
                change = target.endpoint_change(timeout)
                os.kill(server.pid, signal.SIGUSR2)
                deadline = time.monotonic() + 120
                while not report.exists() and time.monotonic() < deadline:
                    time.sleep(0.2)
                time.sleep(1.0)  # the report is written in one go; give it a moment to finish
                after = common.memory_mib(server.pid)
                text = report.read_text() if report.exists() else "no report"
    return {"proxies": proxies, "services": services, "endpoints": endpoints, "before_connect": before,
            "connected": connected, "after_change": after, "connect_all_ms": connect["all_ms"],
            "change_all_ms": change["all_ms"], "tracemalloc": text}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--proxies", type=int, default=2000)
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--localities", type=int, default=8)
    parser.add_argument("--processes", type=int, default=loadgen.default_processes())
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/memory.json)")
    args = parser.parse_args(argv)
    common.stop_on_sigterm()
    quiet = common.wait_quiet(max_wait=0)
    result = run(proxies=args.proxies, services=args.services, endpoints=args.endpoints, localities=args.localities,
                 processes=args.processes, timeout=args.timeout)
    path = common.write_results("memory", {"machine": common.machine(), "quiet": quiet, "memory": result}, args.out)
    print(f"meshplane under tracemalloc: {args.services} services x {args.endpoints} endpoints, {args.proxies} proxies")
    print(f"RSS before connect {result['before_connect']['rss_mib']} MiB, connected {result['connected']['rss_mib']} "
          f"MiB, after a change {result['after_change']['rss_mib']} MiB (peak {result['after_change']['hwm_mib']} MiB)")
    print(result["tracemalloc"])
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
