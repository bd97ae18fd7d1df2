"""What refused streams leave in the server's memory: RSS of `meshplane serve` over rounds of refusals.

    .venv/bin/python -m bench.refusals                  # 8 rounds of 144 MB refused, 8 rounds of 200 served streams
    .venv/bin/python -m bench.refusals --rounds 3 --served-rounds 0

Starts `meshplane serve` with the shipped limits (docs/security.md) and sends, in each round, streams
whose first request the limits refuse, each reason under both ADS methods where it applies:

  node_size     a node of 3 MB (--max-node-bytes, 64 KiB)                  INVALID_ARGUMENT
  request_size  a request of 4.5 MB (--max-request-bytes, 4 MiB)           RESOURCE_EXHAUSTED
  names         60,000 names, 3.4 MB (--max-names, 50,000)                 RESOURCE_EXHAUSTED
  bad_node      a node of 60 KB that meshplane cannot serve (port 70000)   INVALID_ARGUMENT

a few at once (--concurrency), and reads the server's VmRSS once every client of the round has its
status. Then, in further rounds, streams that are served (a node of 60 KB, a wildcard CDS request)
read their first response and close. RSS that keeps growing with the rounds is memory the server
kept; RSS that levels off is the allocator keeping a working set for the requests in flight.

The requests are encoded once and sent as bytes (a generic gRPC stub), so the client's cost is the
sending alone. tests/test_limits.py runs the same rounds, smaller, and asserts RSS levels off.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from bench import common
from meshplane.xds import adsbase, delta, sotw, typeurls
from meshplane.xds import client as ads_client

METHODS = {"sotw": f"/{adsbase.SERVICE}/{sotw.SotwServer.METHOD}",
           "delta": f"/{adsbase.SERVICE}/{delta.DeltaServer.METHOD}"}


@dataclass(frozen=True)
class Stream:
    """One stream's first request, encoded, and the status the server is to end the stream with."""

    reason: str  # meshplane_xds_refused_streams_total's reason; "served" for a stream that is served
    protocol: str  # "sotw" or "delta"
    raw: bytes
    code: grpc.StatusCode


def _node(node_id: str, **metadata: Any) -> Any:
    return ads_client.node(node_id, region="r1", zone="z1", cluster="c1", metadata=metadata or None)


def _request(protocol: str, node: Any, names: Sequence[str] = (), type_url: str = typeurls.CLUSTER) -> bytes:
    if protocol == "delta":
        message: Any = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, resource_names_subscribe=names)
    else:
        message = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=names)
    message.node.CopyFrom(node)
    return bytes(message.SerializeToString())


def refused_streams() -> list[Stream]:
    """One round's refused streams: 144 MB of requests, each refused for a limit at its shipped default."""
    out: list[Stream] = []
    invalid, exhausted = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED
    plain = _node("refused")
    many = [f"outbound|8000||service-{i}-{'x' * 40}.default.svc.cluster.local" for i in range(50_000)]
    names = [f"n{i}-{'x' * 50}" for i in range(60_000)]
    for protocol in ("sotw", "delta"):
        fat = _request(protocol, _node("fat", labels={"k": "v" * 3_000_000}))
        out += [Stream("node_size", protocol, fat, invalid)] * 10
        out += [Stream("names", protocol, _request(protocol, plain, names, typeurls.ENDPOINT), exhausted)] * 5
        bad = _node("bad", listener_port=70000, labels={"pad": "x" * 60_000})
        out += [Stream("bad_request", protocol, _request(protocol, bad), invalid)] * 5
    out += [Stream("request_size", "sotw", _request("sotw", plain, many, typeurls.ENDPOINT), exhausted)] * 10
    return out


def served_streams(count: int) -> list[Stream]:
    """Streams that are served (a node of 60 KB, under the 64 KiB limit), the two protocols in turn."""
    out = []
    for i in range(count):
        protocol = ("sotw", "delta")[i % 2]
        node = _node(f"served-{i}", labels={"pad": "x" * 60_000})
        out.append(Stream("served", protocol, _request(protocol, node), grpc.StatusCode.OK))
    return out


async def exchange(channel: grpc.aio.Channel, stream: Stream) -> grpc.StatusCode:
    """Open a stream, send its request, and return how the server ended it (OK: a served stream got its
    first response, and was then closed by the client)."""
    call = channel.stream_stream(METHODS[stream.protocol])()  # bytes in, bytes out: no serialiser
    await call.write(stream.raw)
    if stream.code == grpc.StatusCode.OK:
        await call.read()
        call.cancel()
        return grpc.StatusCode.OK
    code: grpc.StatusCode = await call.code()
    return code


async def send(target: str, streams: Sequence[Stream], *, concurrency: int) -> list[grpc.StatusCode]:
    """Send every stream, `concurrency` at once; the status of each, in order."""
    limit = asyncio.Semaphore(concurrency)
    async with grpc.aio.insecure_channel(target) as channel:
        async def one(stream: Stream) -> grpc.StatusCode:
            async with limit:
                return await exchange(channel, stream)

        return list(await asyncio.gather(*(one(s) for s in streams)))


def rounds(server: common.Meshplane, streams: Sequence[Stream], *, count: int, concurrency: int,
           what: str) -> list[dict[str, Any]]:
    """`count` rounds of `streams`; RSS after each (MiB), and the bytes sent so far."""
    out: list[dict[str, Any]] = []
    sent = 0
    for i in range(count):
        began = time.monotonic()
        codes = asyncio.run(send(server.target, streams, concurrency=concurrency))
        wrong = [(s.reason, s.protocol, c.name) for s, c in zip(streams, codes, strict=True) if c != s.code]
        if wrong:
            raise AssertionError(f"{what} round {i + 1}: streams not ended as the limits say: {wrong[:5]}")
        sent += sum(len(s.raw) for s in streams)
        out.append({"round": i + 1, "sent_mb": round(sent / 1e6, 1), "seconds": round(time.monotonic() - began, 2),
                    **common.memory_mib(server.pid)})
        print(f"  {what} round {i + 1}: {sent / 1e6:7.1f} MB sent, RSS {out[-1]['rss_mib']} MiB", flush=True)
    return out


def run(*, refused_rounds: int, served_rounds: int, served_per_round: int, concurrency: int) -> dict[str, Any]:
    mesh = common.Mesh(services=10, endpoints=2)
    with tempfile.TemporaryDirectory(prefix="meshplane-bench-") as tmp:
        workdir = Path(tmp)
        files = mesh.write(workdir)
        policy = common.write_policy(workdir / "policy.yaml")
        with common.Meshplane(workdir, files, policy) as server:
            server.wait_ready(120)
            idle = common.memory_mib(server.pid)
            print(f"idle: RSS {idle['rss_mib']} MiB", flush=True)
            refused = rounds(server, refused_streams(), count=refused_rounds, concurrency=concurrency,
                             what="refused")
            served = rounds(server, served_streams(served_per_round), count=served_rounds,
                            concurrency=concurrency, what="served")
            counted = {labels: value for (name, labels), value in server.metrics().items()
                       if name == "meshplane_xds_refused_streams_total"}
    return {"idle": idle, "concurrency": concurrency, "refused": refused, "served": served,
            "served_per_round": served_per_round,
            "refusals_counted": {dict(labels)["reason"]: value for labels, value in counted.items()}}


def print_result(result: dict[str, Any]) -> None:
    idle = result["idle"]["rss_mib"]
    for kind in ("refused", "served"):
        common.print_table(
            ["round", "MB sent (total)", "RSS MiB", "over idle", "peak RSS MiB"],
            [(r["round"], r["sent_mb"], r["rss_mib"], round(r["rss_mib"] - idle, 1), r["hwm_mib"])
             for r in result[kind]],
            title=f"{kind} streams, {result['concurrency']} at once (idle RSS {idle} MiB)",
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.refusals", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8, help="rounds of refused streams (144 MB each)")
    parser.add_argument("--served-rounds", type=int, default=8)
    parser.add_argument("--served-per-round", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=5, help="streams open at once")
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/refusals.json)")
    args = parser.parse_args(argv)
    common.stop_on_sigterm()
    quiet = common.wait_quiet(max_wait=0)
    result = run(refused_rounds=args.rounds, served_rounds=args.served_rounds,
                 served_per_round=args.served_per_round, concurrency=args.concurrency)
    print_result(result)
    path = common.write_results("refusals", {"machine": common.machine(), "quiet": quiet, "refusals": result},
                                args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
