"""A gRPC echo service and a proxyless client of it, for docs/grpc.md, the tests and trying it out.

The service is `echo.Echo/Call` (bytes in, bytes out: no generated code). A
replica answers `NAME@ZONE`, so a response says where the call landed. A
replica can be told to fail (`failing`): it answers every call with INTERNAL
(what failure-percentage ejection reacts to); stopping it closes its port
(connection refused).

The client dials `xds:///NAME:PORT` with grpcio's own xDS client, which
reads its bootstrap from `GRPC_XDS_BOOTSTRAP` (a file) or
`GRPC_XDS_BOOTSTRAP_CONFIG` (the JSON itself), and calls at a steady rate,
printing one JSON line per call: `{"t": seconds since start, "ok": bool,
"code": "OK", "body": "echo@zone", "ms": latency}`.

    python -m meshplane.demo.grpcecho serve --name echo --zone z1 --port 50051
    python -m meshplane.demo.grpcecho call xds:///echo:50051 --rate 20 --count 10 [--header canary=true]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Sequence

import grpc

SERVICE = "echo.Echo"
METHOD = f"/{SERVICE}/Call"


class Replica:
    """One replica of an echo service on 127.0.0.1 (any loopback address): start, fail, recover, stop."""

    def __init__(self, name: str, zone: str, port: int, host: str = "127.0.0.1") -> None:
        self.name, self.zone, self.port, self.host = name, zone, port, host
        self.failing = False
        self.calls = 0
        self._server: grpc.aio.Server | None = None

    @property
    def answer(self) -> str:
        return f"{self.name}@{self.zone}"

    async def _call(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.calls += 1
        if self.failing:
            await context.abort(grpc.StatusCode.INTERNAL, f"{self.answer} is failing")
        return self.answer.encode()

    async def start(self) -> None:
        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(self._call)  # no (de)serialisers: bytes
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Call": handler}),))
        if server.add_insecure_port(f"{self.host}:{self.port}") == 0:
            raise OSError(f"cannot listen on {self.host}:{self.port}")
        await server.start()
        self._server = server

    async def stop(self) -> None:
        """Close the port and every connection: callers see connection refused from now on."""
        if self._server is not None:
            await self._server.stop(grace=None)
            self._server = None


async def _serve(args: argparse.Namespace) -> None:
    replica = Replica(args.name, args.zone, args.port, args.host)
    await replica.start()
    print(f"{replica.answer} listening on {args.host}:{args.port}", flush=True)
    await asyncio.Event().wait()


def _call(args: argparse.Namespace) -> int:
    metadata = tuple(tuple(h.split("=", 1)) for h in args.header)
    if any(len(m) != 2 for m in metadata):
        print("--header takes NAME=VALUE", file=sys.stderr)
        return 2
    start = time.monotonic()
    failed = 0
    with grpc.insecure_channel(args.target) as channel:
        call = channel.unary_unary(METHOD)
        n = 0
        while args.count == 0 or n < args.count:
            began = time.monotonic()
            line: dict[str, object] = {"t": round(began - start, 3)}
            try:
                body = call(b"", timeout=args.timeout, metadata=metadata, wait_for_ready=args.wait_for_ready)
                line.update(ok=True, code="OK", body=body.decode())
            except grpc.RpcError as exc:
                failed += 1
                line.update(ok=False, code=exc.code().name, body=exc.details() or "")
            line["ms"] = round((time.monotonic() - began) * 1000, 1)
            print(json.dumps(line), flush=True)
            n += 1
            with contextlib.suppress(ValueError):
                time.sleep(max(0.0, start + n / args.rate - time.monotonic()))
    return 1 if failed and args.count else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshplane.demo.grpcecho", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="one replica of an echo service")
    serve.add_argument("--name", default="echo")
    serve.add_argument("--zone", required=True)
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--host", default="127.0.0.1")
    call = sub.add_parser("call", help="call a service through grpcio's xDS client")
    call.add_argument("target", help="xds:///NAME:PORT")
    call.add_argument("--rate", type=float, default=10.0, help="calls per second (default 10)")
    call.add_argument("--count", type=int, default=0, help="stop after this many calls (default 0: never)")
    call.add_argument("--timeout", type=float, default=2.0, help="each call's deadline in seconds (default 2)")
    call.add_argument("--header", action="append", default=[], help="metadata NAME=VALUE on every call")
    call.add_argument("--wait-for-ready", action="store_true",
                      help="wait for the channel to be ready instead of failing a call at once")
    args = parser.parse_args(argv)
    if args.command == "serve":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve(args))
        return 0
    return _call(args)


if __name__ == "__main__":
    sys.exit(main())
