"""What a flood of connections costs `meshplane serve --client-cert optional` (meshplane's own TLS relay,
meshplane/tlsfront.py): the file descriptors it holds.

    .venv/bin/python -m bench.relay_flood [--connections 3000]

A fresh `serve` with the shipped limits (`--max-streams-per-peer 1000`, `--max-streams 20000`), then from
one address (loopback): `--connections` TCP connections that never begin their TLS handshake, then as
many that finish it without a client certificate (allowed under `optional`) and never speak HTTP/2.
For each, the server's open file descriptors (/proc/PID/fd) once it has taken them, against idle, and
the connections refused (meshplane_xds_refused_streams_total); then they are closed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import ssl
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common
from tests import pki


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def settled(pid: int, *, seconds: float = 1.0, timeout: float = 60.0) -> int:
    """The server's descriptor count once it has stayed the same `seconds` (it has taken what it will)."""
    last, since, began = descriptors(pid), time.monotonic(), time.monotonic()
    while time.monotonic() - began < timeout:
        time.sleep(0.1)
        now = descriptors(pid)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= seconds:
            break
    return last


def refused(server: common.Meshplane) -> dict[str, float]:
    samples = server.metrics()
    return {dict(labels)["reason"]: value for (name, labels), value in samples.items()
            if name == "meshplane_xds_refused_streams_total" and value}


async def _handshaken(port: int, context: ssl.SSLContext, count: int) -> list[asyncio.StreamWriter]:
    gate = asyncio.Semaphore(64)

    async def one() -> asyncio.StreamWriter | None:
        async with gate:
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(
                    "127.0.0.1", port, ssl=context, server_hostname="localhost"), 30)
            except (OSError, ssl.SSLError, TimeoutError):
                return None  # refused: closed before or in the handshake
            return writer

    return [w for w in await asyncio.gather(*(one() for _ in range(count))) if w is not None]


def run(connections: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="meshplane-bench-flood-") as tmp:
        workdir = Path(tmp)
        ca = pki.CA()
        cert, key, _ = ca.write_server(workdir / "server")
        endpoints = workdir / "c1.yaml"
        endpoints.write_text("cluster: c1\nregion: r1\nservices:\n- name: svc\n  ports: [{name: http, port: 80}]\n"
                             "  endpoints: [{address: 127.0.0.1, zone: z1, port: 9}]\n")
        policy = common.write_policy(workdir / "policy.yaml")
        args = ["--tls-cert", str(cert), "--tls-key", str(key), "--client-ca", str(ca.write_ca(workdir / "ca.pem")),
                "--client-cert", "optional", "--max-streams-per-peer", "1000"]
        with common.Meshplane(workdir, [endpoints], policy, extra_args=args) as server:
            server.wait_ready()
            idle = settled(server.pid)
            result: dict[str, Any] = {"connections": connections, "idle_fds": idle}
            raw, began = [], time.monotonic()
            for _ in range(connections):
                try:
                    raw.append(socket.create_connection(("127.0.0.1", server.ads_port), timeout=5))
                except OSError:
                    break
            # Read before the first of them reaches its handshake timeout (10 s), which lets more in.
            result["never_handshaking"] = {"opened_in_s": round(time.monotonic() - began, 2),
                                           "held_fds": settled(server.pid, seconds=0.3) - idle,
                                           "refused": refused(server)}
            for sock in raw:
                sock.close()
            settled(server.pid)
            before = refused(server)
            context = ssl.create_default_context(cadata=ca.pem.decode())
            context.set_alpn_protocols(["h2"])
            asyncio.run(_idle_tls(server, context, connections, idle, result))
            result["anonymous_tls_idle"]["refused"] = {
                k: v - before.get(k, 0) for k, v in result["anonymous_tls_idle"]["refused"].items()
                if v - before.get(k, 0)}
        return result


async def _idle_tls(server: common.Meshplane, context: ssl.SSLContext, connections: int, idle: int,
                    result: dict[str, Any]) -> int:
    writers = await _handshaken(server.ads_port, context, connections)
    held = await asyncio.to_thread(settled, server.pid)
    result["anonymous_tls_idle"] = {"handshaken": len(writers), "held_fds": held - idle, "refused": refused(server)}
    for writer in writers:
        writer.transport.abort()
    return len(writers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.relay_flood", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=3000)
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/relay_flood.json)")
    args = parser.parse_args(argv)
    common.stop_on_sigterm()
    result = run(args.connections)
    path = common.write_results("relay_flood", {"machine": common.machine(), "flood": result}, args.out)
    print(result)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
