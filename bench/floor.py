"""The physical floor: the simplest grpcio ADS server there is, serving pre-serialised bytes.

No views, no versions, no subscriptions: a first CDS request gets the one CDS response, a
first EDS request (no nonce) gets the one EDS response with every ClusterLoadAssignment,
ACKs get nothing. On SIGUSR1 it writes one new EDS response (service 0's assignment with
endpoint 0's health flipped, a new version) to every open stream. Responses are built once
at start-up and written with an identity serialiser, as meshplane writes its own. What the
same load generator measures against it is what Python, grpcio and this machine cost before
any control-plane logic: meshplane's time divided by the floor's is the efficiency figure.

The content has meshplane's shape (one EDS cluster per service, one assignment per
cluster with the endpoints grouped by locality), but every proxy gets the same bytes.

With --server cpp the same bytes (written to files by _content, read by the server at start)
are served the same way by a minimal C++ gRPC server (bench/cppfloor/floor_server.cc, gRPC's
callback API and a generic service: no protobuf), built on first use by
bench/cppfloor/build.sh into bench/cppfloor/build/. The grpcio floor says what Python's gRPC
costs; the C++ floor says what gRPC itself, and the load generator, cost on this machine.

    .venv/bin/python -m bench.floor --proxies 1000 --services 100 --repeat 3     # measure
    .venv/bin/python -m bench.floor --server cpp                                 # the same, the C++ floor
    .venv/bin/python -m bench.floor serve --port 18100 --services 100             # just serve (grpcio)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import common

CPP_BUILD = common.ROOT / "bench" / "cppfloor" / "build.sh"
CPP_SERVER = common.ROOT / "bench" / "cppfloor" / "build" / "floor-server"


@dataclass(frozen=True)
class Implementation:
    """One server of the floor: what tables call it, and where convergence and storm keep its results."""

    label: str
    key: str  # its measurement, in convergence's and storm's results
    ratio_key: str  # meshplane's figure divided by its own, beside it


IMPLEMENTATIONS = {
    "grpcio": Implementation("grpcio floor", "floor", "ratio"),  # the keys it had when it was the only floor
    "cpp": Implementation("C++ floor", "cpp_floor", "cpp_ratio"),
}


class Unavailable(RuntimeError):
    """The C++ floor cannot be built here; the message says what is missing and how to install it."""


# --------------------------------------------------------------------------- the server (its own process)


def _content(mesh: common.Mesh) -> tuple[bytes, bytes, list[bytes]]:
    """CDS and EDS responses, and the bodies of pushes (service 0's assignment in both healths), as bytes."""
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.config.core.v3 import base_pb2, config_source_pb2
    from envoy.config.endpoint.v3 import endpoint_pb2
    from envoy.service.discovery.v3 import discovery_pb2
    from google.protobuf import any_pb2, duration_pb2

    ads = config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource(),
                                         resource_api_version=config_source_pb2.V3)

    def cla(s: int, unhealthy: bool = False) -> endpoint_pb2.ClusterLoadAssignment:
        msg = endpoint_pb2.ClusterLoadAssignment(cluster_name=mesh.cluster_name(s))
        groups: dict[str, Any] = {}
        for e in range(mesh.endpoints):
            zone, c = mesh.zone((s + e) % mesh.zones)
            group = groups.get(zone)
            if group is None:
                group = groups[zone] = msg.endpoints.add(
                    locality=base_pb2.Locality(region=mesh.region(c), zone=zone, sub_zone=mesh.cluster(c)),
                    priority=len(groups))
                group.load_balancing_weight.value = 1
            i = s * mesh.endpoints + e
            lb = group.lb_endpoints.add(health_status=2 if unhealthy and e == 0 else 1)
            lb.endpoint.address.socket_address.address = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
            lb.endpoint.address.socket_address.port_value = 8080
            lb.load_balancing_weight.value = 1
        return msg

    def packed(msg: Any) -> any_pb2.Any:
        out = any_pb2.Any()
        out.Pack(msg)
        return out

    clusters = [
        cluster_pb2.Cluster(name=mesh.cluster_name(s), type=cluster_pb2.Cluster.EDS,
                            eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ads),
                            connect_timeout=duration_pb2.Duration(seconds=1))
        for s in range(mesh.services)
    ]
    cds = discovery_pb2.DiscoveryResponse(version_info="1", nonce="1", type_url=common_type("cds"),
                                          resources=[packed(c) for c in clusters])
    eds = discovery_pb2.DiscoveryResponse(version_info="1", nonce="1", type_url=common_type("eds"),
                                          resources=[packed(cla(s)) for s in range(mesh.services)])
    # Push k is version, bodies[k % 2] (a resource field and type_url) and nonce (as meshplane assembles its own).
    bodies = [discovery_pb2.DiscoveryResponse(resources=[packed(cla(0, unhealthy=u))],
                                              type_url=common_type("eds")).SerializeToString()
              for u in (True, False)]
    return cds.SerializeToString(), eds.SerializeToString(), bodies


def common_type(kind: str) -> str:
    from bench import loadgen

    return loadgen.KINDS[kind].decode()


async def _serve(port: int, mesh: common.Mesh) -> None:
    import grpc
    from envoy.service.discovery.v3 import discovery_pb2

    from bench import loadgen

    cds, eds, bodies = _content(mesh)
    eds_type = common_type("eds")
    queues: set[asyncio.Queue[bytes | None]] = set()
    pushes = itertools.count(1)

    async def read(requests: Any, queue: asyncio.Queue[bytes | None]) -> None:
        async for req in requests:
            if not req.response_nonce:  # a first request (or a subscription change): send it all
                queue.put_nowait(eds if req.type_url == eds_type else cds)
        queue.put_nowait(None)

    async def stream(requests: Any, context: Any) -> None:
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        queues.add(queue)
        reader = asyncio.create_task(read(requests, queue))
        try:
            while (message := await queue.get()) is not None:
                await context.write(message)
        finally:
            queues.discard(queue)
            reader.cancel()

    def push() -> None:
        k = next(pushes)
        tag = f"push-{k}".encode()
        message = b"".join((loadgen._ld(1, tag), bodies[k % 2], loadgen._ld(5, tag)))
        for queue in queues:
            queue.put_nowait(message)

    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", -1),
        # gRPC core refuses new calls the application has not picked up yet beyond 1,000 (at random)
        # and 3,000 (all): a storm of thousands of streams on an asyncio server, which picks them up
        # one by one, gets many refused. Configuration, not logic, so the floor lifts the limits.
        ("grpc.server.max_pending_requests", 100_000),
        ("grpc.server.max_pending_requests_hard_limit", 100_000),
    ])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "envoy.service.discovery.v3.AggregatedDiscoveryService",
        {"StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
            stream, request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
            response_serializer=lambda b: b)},
    ),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, push)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print(f"ready {port} cds={len(cds)}B eds={len(eds)}B", flush=True)
    await stop.wait()
    await server.stop(0.5)


def build_cpp() -> Path:
    """The C++ floor's binary, built by bench/cppfloor/build.sh if its source is newer; Unavailable if it cannot be."""
    done = subprocess.run(["bash", str(CPP_BUILD)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise Unavailable((done.stderr or done.stdout).strip() or f"{CPP_BUILD} exited with {done.returncode}")
    return CPP_SERVER


def unavailable(server: str) -> str | None:
    """Why a floor cannot run here (the C++ one: what its build said), or None; builds the C++ floor if need be."""
    if server != "cpp":
        return None
    try:
        build_cpp()
    except Unavailable as exc:
        return str(exc)
    return None


def write_content(mesh: common.Mesh, directory: Path) -> None:
    """The floor's responses as the C++ floor reads them: cds.bin, eds.bin, push-0.bin, push-1.bin."""
    cds, eds, bodies = _content(mesh)
    (directory / "cds.bin").write_bytes(cds)
    (directory / "eds.bin").write_bytes(eds)
    for k, body in enumerate(bodies):
        (directory / f"push-{k}.bin").write_bytes(body)


class Floor:
    """A floor server as a subprocess (`server`: grpcio or cpp): its own GIL and /proc numbers, like meshplane's."""

    def __init__(self, mesh: common.Mesh, server: str = "grpcio") -> None:
        self.port = common.free_port()
        self._files: tempfile.TemporaryDirectory[str] | None = None
        if server == "cpp":
            binary = build_cpp()
            self._files = tempfile.TemporaryDirectory(prefix="meshplane-cppfloor-")
            write_content(mesh, Path(self._files.name))
            args = [str(binary), "--port", str(self.port), "--content", self._files.name,
                    "--eds-type-url", common_type("eds")]
        else:
            args = [common.PYTHON, "-m", "bench.floor", "serve", "--port", str(self.port), "--services",
                    str(mesh.services), "--endpoints", str(mesh.endpoints), "--clusters", str(mesh.clusters),
                    "--zones", str(mesh.zones)]
        self.proc = subprocess.Popen(args, cwd=common.ROOT, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.banner = self.proc.stdout.readline().strip()  # blocks until built and listening
        if not self.banner.startswith("ready"):
            self.stop()
            raise RuntimeError(f"{server} floor server failed to start: {self.banner!r}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def push(self) -> float:
        """Push one new EDS version to every stream; the time just before the signal (t0)."""
        t0 = time.monotonic()
        os.kill(self.proc.pid, signal.SIGUSR1)
        return t0

    def stop(self) -> None:
        common.stop_process(self.proc)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self._files is not None:
            self._files.cleanup()

    def __enter__(self) -> Floor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- measuring it


def measure(*, proxies: int, localities: int, mesh: common.Mesh, repeat: int, processes: int,
            settle: float = 0.3, timeout: float = 60.0, profile: bool = False,
            server: str = "grpcio") -> dict[str, Any]:
    """Storm (all connect at once) and `repeat` EDS pushes against a floor: the same numbers meshplane gets.

    `server` is a key of IMPLEMENTATIONS; the C++ floor raises Unavailable when it cannot be built.
    """
    from bench import loadgen

    with Floor(mesh, server) as floor:
        mem_before = common.memory_mib(floor.pid)
        cpu0 = common.cpu_seconds(floor.pid)
        with loadgen.LoadGen(floor.target, proxies, mesh.localities(localities), processes=processes) as gen:
            storm = loadgen.connect_summary(gen.connect(timeout))
            storm["cpu_s"] = round(common.cpu_seconds(floor.pid) - cpu0, 3)
            storm.update(common.memory_mib(floor.pid))
            runs = []
            with common.Profile(floor.pid, "floor-push") if profile else contextlib.nullcontext():
                for _ in range(repeat):
                    time.sleep(settle)
                    gen.mark()
                    others = common.Others([floor.pid, *gen.pids])
                    cpu0 = common.cpu_seconds(floor.pid)
                    t0 = floor.push()
                    acked = gen.collect("eds", t0, timeout=timeout)
                    run = push_summary(acked, t0)
                    run["cpu_s"] = round(common.cpu_seconds(floor.pid) - cpu0, 4)
                    run["others_cpu_s"] = others.seconds()
                    runs.append(run)
        return {"server": server, "proxies": proxies, "banner": floor.banner, "memory_before": mem_before,
                "storm": storm, "push": {"runs": runs, **over_runs(runs)}}


def push_summary(acked: list[float | None], t0: float) -> dict[str, Any]:
    """Per-proxy time from t0 to its first ACK after t0, and the time until all had ACKed."""
    since = [None if t is None else t - t0 for t in acked]
    got = [t for t in since if t is not None]
    return {**common.latency_summary(since),
            "all_ms": round(max(got) * 1000, 3) if got and len(got) == len(since) else None}


def over_runs(runs: list[dict[str, Any]], keys: tuple[str, ...] = ("p50", "p99", "max", "all_ms")) -> dict[str, Any]:
    return {k: common.spread(r.get(k) for r in runs) for k in keys}


def main(argv: list[str] | None = None) -> int:
    from bench import loadgen

    argv = sys.argv[1:] if argv is None else argv
    serving = bool(argv) and argv[0] == "serve"
    parser = argparse.ArgumentParser(prog="python -m bench.floor" + (" serve" if serving else ""),
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", type=int, default=100)
    parser.add_argument("--endpoints", type=int, default=10, help="per service")
    parser.add_argument("--clusters", type=int, default=4)
    parser.add_argument("--zones", type=int, default=8)
    if serving:
        parser.add_argument("--port", type=int, required=True)
        args = parser.parse_args(argv[1:])
        mesh = common.Mesh(services=args.services, endpoints=args.endpoints, clusters=args.clusters, zones=args.zones)
        asyncio.run(_serve(args.port, mesh))
        return 0
    parser.add_argument("--server", choices=IMPLEMENTATIONS, default="grpcio",
                        help="grpcio (bench.floor serve) or cpp (bench/cppfloor, built on first use)")
    parser.add_argument("--proxies", type=int, default=1000)
    parser.add_argument("--localities", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--processes", type=int, default=loadgen.default_processes())
    parser.add_argument("--profile", action="store_true",
                        help="sample the grpcio floor with py-spy during the pushes "
                             "(bench/results/profiles/floor-push.*)")
    parser.add_argument("--out", type=Path,
                        help="results JSON (default bench/results/floor.json; with --server cpp, floor-cpp.json)")
    args = parser.parse_args(argv)
    if args.profile and args.server != "grpcio":
        parser.error("--profile samples Python (py-spy): only the grpcio floor")
    common.stop_on_sigterm()
    quiet = common.wait_quiet(max_wait=0)
    mesh = common.Mesh(services=args.services, endpoints=args.endpoints, clusters=args.clusters, zones=args.zones)
    try:
        result = measure(proxies=args.proxies, localities=args.localities, mesh=mesh, repeat=args.repeat,
                         processes=args.processes, profile=args.profile, server=args.server)
    except Unavailable as exc:
        print(exc, file=sys.stderr)
        return 1
    params = {k: v for k, v in vars(args).items() if k != "out"}
    name = "floor" if args.server == "grpcio" else f"floor-{args.server}"
    path = common.write_results(name, {"machine": common.machine(), "quiet": quiet, "params": params,
                                       "floor": result}, args.out)
    push = result["push"]
    common.print_table(
        ["what", "p50 ms", "p99 ms", "max ms", "all ms", "server CPU s"],
        [["storm (connect to full config)", result["storm"]["p50"], result["storm"]["p99"], result["storm"]["max"],
          result["storm"]["all_ms"], result["storm"]["cpu_s"]],
         *[[f"push {i + 1}", r["p50"], r["p99"], r["max"], r["all_ms"], r["cpu_s"]]
           for i, r in enumerate(push["runs"])]],
        title=f"{IMPLEMENTATIONS[args.server].label}: {args.proxies} proxies, "
              f"{args.services} services x {args.endpoints} endpoints",
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
