"""Clients that never read: a new proxy's first configuration, and the server's memory, while N
streams are open that never read a response.

Starts `meshplane serve` (shipped defaults) on the generated mesh (S services x E endpoints over
C clusters), then opens N ADS streams (default 1,000) from a separate process, each on its own
connection with a 1 KiB HTTP/2 window, that ask for CDS (wildcard), EDS (every cluster), LDS
and RDS and never read: the server's writes to them block at once, as they do to any client
whose window and socket buffers are full (a hung or malicious one). Then, R times, each with a
fresh server:

  (a) settled: every non-reading stream is open and has been answered as far as it goes (the
      server's responses counter has stopped moving); one new simulated proxy (bench.loadgen)
      connects. Reported: from its stream opening to its full, ACKed configuration (CDS, then
      EDS for every cluster).
  (b) together: the new proxy connects in the same instant as the N non-readers start to.
      The same time.

And the server's RSS before the non-readers, with them stuck, and after 10 endpoint changes
pushed while they stay stuck (latest wins: nothing queues per change).

    .venv/bin/python -m bench.slow_readers                 # 1,000 non-readers, 3 runs
    .venv/bin/python -m bench.slow_readers --streams 100 --repeat 1
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import multiprocessing.connection
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common, loadgen

LDS = b"type.googleapis.com/envoy.config.listener.v3.Listener"
RDS = b"type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
NON_READER_OPTIONS = [
    ("grpc.use_local_subchannel_pool", 1),  # one connection per stream, like separate proxies
    ("grpc.http2.lookahead_bytes", 1024),  # the window this client grants: 1 KiB, and it never reads
    ("grpc.http2.bdp_probe", 0),
]


def _non_readers(conn: multiprocessing.connection.Connection, target: str, count: int, names: list[str],
                 localities: list[loadgen.Locality]) -> None:
    asyncio.run(_hold_non_readers(conn, target, count, names, localities))


async def _hold_non_readers(conn: multiprocessing.connection.Connection, target: str, count: int,
                            names: list[str], localities: list[loadgen.Locality]) -> None:
    import grpc

    conn.send("ready")
    await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # "go"
    eds_names = b"".join(loadgen._ld(3, n.encode()) for n in names)
    channels, calls = [], []
    for i in range(count):
        channel = grpc.aio.insecure_channel(target, options=NON_READER_OPTIONS)
        call = channel.stream_stream(loadgen.ADS_METHOD)()
        node = loadgen.node_field(f"never-reads-{i}", localities[i % len(localities)], 15001)
        await call.write(loadgen.request(loadgen.CDS, node=node))
        await call.write(loadgen.request(loadgen.EDS, names=eds_names))
        await call.write(loadgen.request(LDS))
        await call.write(loadgen.request(RDS, names=loadgen._ld(3, b"outbound|http|default")))
        channels.append(channel)
        calls.append(call)
    conn.send("open")
    await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # "stop"
    for call in calls:
        call.cancel()
    for channel in channels:
        await channel.close()
    conn.send("stopped")


class NonReaders:
    """N non-reading streams in a process of their own (spawned, imports done before any clock)."""

    def __init__(self, target: str, count: int, names: list[str], localities: list[loadgen.Locality]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_non_readers, args=(child, target, count, names, localities), daemon=True)
        self._proc.start()
        child.close()
        self._conn.recv()  # ready

    def go(self) -> None:
        self._conn.send("go")

    def wait_open(self, timeout: float = 300.0) -> None:
        if not self._conn.poll(timeout):
            raise TimeoutError("the non-reading streams did not open")
        self._conn.recv()

    def stop(self) -> None:
        self._conn.send("stop")
        if self._conn.poll(30):
            self._conn.recv()
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.terminate()


def _settled(server: common.Meshplane, *, quiet: float = 1.0, timeout: float = 300.0) -> float:
    """Wait until the server's responses counter has not moved for `quiet` seconds; how long that took."""
    started = time.monotonic()
    last, since = -1.0, time.monotonic()
    while time.monotonic() - started < timeout:
        sent = sum(v for (name, _), v in server.metrics().items() if name == "meshplane_xds_responses_total")
        if sent != last:
            last, since = sent, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return time.monotonic() - started
        time.sleep(0.1)
    raise TimeoutError("the server kept sending")


def _newcomer(server: common.Meshplane, mesh: common.Mesh, timeout: float) -> loadgen.LoadGen:
    gen = loadgen.LoadGen(server.target, 1, mesh.localities(1), processes=1, name="newcomer")
    gen.start()  # spawned and imported; its stream opens at connect()
    return gen


def once(mesh: common.Mesh, streams: int, timeout: float) -> dict[str, Any]:
    names = [mesh.cluster_name(s) for s in range(mesh.services)]
    localities = mesh.localities(8)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="meshplane-bench-") as tmp:
        workdir = Path(tmp)
        files = mesh.write(workdir)
        policy = common.write_policy(workdir / "policy.yaml")
        # (a) settled
        with common.Meshplane(workdir, files, policy) as server:
            server.wait_ready()
            out["rss_before_mib"] = common.memory_mib(server.pid)["rss_mib"]
            stuck = NonReaders(server.target, streams, names, localities)
            try:
                stuck.go()
                stuck.wait_open()
                out["settle_s"] = round(_settled(server), 2)
                out["rss_stuck_mib"] = common.memory_mib(server.pid)["rss_mib"]
                gen = _newcomer(server, mesh, timeout)
                try:
                    out["settled"] = loadgen.connect_summary(gen.connect(timeout))
                finally:
                    gen.stop()
                for change in range(10):
                    mesh.flip_health(workdir, s=change, e=0)
                    time.sleep(0.3)
                _settled(server)
                after = common.memory_mib(server.pid)
                out["rss_after_10_changes_mib"] = after["rss_mib"]
                out["hwm_mib"] = after["hwm_mib"]
                samples = server.metrics()
                out["connected"] = samples.get(("meshplane_xds_connected_proxies", ()))
                out["stalled_writes"] = samples.get(("meshplane_xds_stalled_writes_total", ()))
            finally:
                stuck.stop()
        # (b) together
        with common.Meshplane(workdir, files, policy) as server:
            server.wait_ready()
            stuck = NonReaders(server.target, streams, names, localities)
            gen = _newcomer(server, mesh, timeout)
            try:
                stuck.go()
                out["together"] = loadgen.connect_summary(gen.connect(timeout))
                stuck.wait_open()
            finally:
                gen.stop()
                stuck.stop()
    return out


def run(*, streams: int, services: int, endpoints: int, clusters: int, zones: int, repeat: int,
        timeout: float) -> dict[str, Any]:
    mesh = common.Mesh(services=services, endpoints=endpoints, clusters=clusters, zones=zones)
    runs = [once(mesh, streams, timeout) for _ in range(repeat)]
    return {
        "params": {"streams": streams, "services": services, "endpoints": endpoints, "clusters": clusters,
                   "zones": zones, "repeat": repeat},
        "runs": runs,
        "settled_first_config_ms": common.spread(r["settled"]["all_ms"] for r in runs),
        "together_first_config_ms": common.spread(r["together"]["all_ms"] for r in runs),
        "rss_stuck_mib": common.spread(r["rss_stuck_mib"] for r in runs),
        "rss_after_10_changes_mib": common.spread(r["rss_after_10_changes_mib"] for r in runs),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.slow_readers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=1000, help="non-reading streams")
    parser.add_argument("--services", type=int, default=100)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--clusters", type=int, default=4)
    parser.add_argument("--zones", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=120.0, help="longest wait for the new proxy's config")
    parser.add_argument("--out", type=Path, help="results file (default bench/results/slow_readers.json)")
    args = parser.parse_args(argv)
    common.stop_on_sigterm()
    result = run(streams=args.streams, services=args.services, endpoints=args.endpoints, clusters=args.clusters,
                 zones=args.zones, repeat=args.repeat, timeout=args.timeout)
    result["machine"] = common.machine()
    path = common.write_results("slow_readers", result, args.out)
    print_result(result)
    print(f"wrote {path}")
    return 0


def print_result(result: dict[str, Any]) -> None:
    streams = result["params"]["streams"]
    common.print_table(
        ["case", "new proxy's full config ms (median, range)", "server RSS MiB (median, range)"],
        [
            ["before the non-readers", "-", _fmt(common.spread(r["rss_before_mib"] for r in result["runs"]))],
            [f"{streams} non-readers open, then the new proxy", _fmt(result["settled_first_config_ms"]),
             _fmt(result["rss_stuck_mib"])],
            ["... after 10 endpoint changes", "-", _fmt(result["rss_after_10_changes_mib"])],
            [f"the new proxy with the {streams} non-readers, together", _fmt(result["together_first_config_ms"]),
             "-"],
        ],
        title=f"slow readers: {streams} streams that never read, medians of {result['params']['repeat']}",
    )


def _fmt(spread: dict[str, Any]) -> str:
    return f"{common.fmt(spread.get('median'))} ({common.fmt(spread.get('min'))}-{common.fmt(spread.get('max'))})"


if __name__ == "__main__":
    raise SystemExit(main())
