"""`meshplane demo`: the S1 mesh, live, with the S3 gateway in front. Break replicas and watch traffic move.

Every round sends one request straight to mocka in each zone (as a client
next to it would: no sidecar on that first hop); mocka calls mockb, and
mockb calls mockc, each through the Envoy sidecar of its own zone. Then
three requests through the gateway `edge` (an Envoy in cn-hangzhou-h, in
front of both clusters): example.com/mocka (active-active over both
clusters), the same with the header `canary: cluster-2` (only cluster-2's
mocka), and example.com/standby (cluster-1 while it has a healthy mocka,
then cluster-2). Each line shows where every hop landed. Commands (typed,
or given with --script, ';'-separated):

  break SERVICE ZONE       the replica refuses connections (outlier detection moves traffic)
  fix SERVICE ZONE         it listens again (back after the ejection time)
  break-region SERVICE REGION / fix-region SERVICE REGION
  break-cluster CLUSTER / fix-cluster CLUSTER   every replica in that cluster (see /standby move)
  unready SERVICE ZONE     report it unhealthy through the endpoint file (an EDS push)
  ready SERVICE ZONE
  where SERVICE ZONE [zone=Z|cluster=C|region=R ...]
                           `meshplane explain`: the priority table that zone's sidecar gets, why, and
                           where its traffic goes now (replicas broken here count as down), or if
                           those failed too
  status                   `meshplane status`: every Envoy and whether it has ACKed the latest config
  sleep SECONDS            (scripts) keep watching for a while
  quit                     stop everything (Ctrl-C does too)
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meshplane import ask
from meshplane.demo import mesh as mesh_mod
from meshplane.demo import topology
from meshplane.demo.ports import free_port

# Requests through the gateway each round: (label, path, headers).
GATEWAY_REQUESTS = (
    ("example.com/mocka", "/mocka", None),
    ("  canary: cluster-2", "/mocka", {"canary": "cluster-2"}),
    ("example.com/standby", "/standby", None),
)


async def main(*, workdir: Path | None, interval: float, script: str | None) -> int:
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="meshplane-demo-")))
        gateway_port = free_port()
        # Short ejections so that `fix` is visible within the demo; S1's 5m is for production.
        policy = topology.demo_policy(gateway_port=gateway_port, base_ejection="15s")
        mesh = mesh_mod.Mesh(workdir, policy=policy, http_port=0, gateway_port=gateway_port)
        _say(f"starting: control plane, {len(mesh.topo.replicas)} backends, "
             f"{len(mesh.topo.sidecars)} Envoy sidecars and a gateway (files and logs in {workdir})")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await mesh.start()
            assert mesh.plane is not None
            _say(f"ready. ADS on 127.0.0.1:{mesh.plane.ads_port}; metrics and /debug on "
                 f"http://127.0.0.1:{mesh.plane.http_port}; policy {mesh.policy_path}; "
                 f"gateway on 127.0.0.1:{gateway_port} (curl -H 'Host: example.com' "
                 f"127.0.0.1:{gateway_port}/mocka)")
            _say(__doc__.split("\n\n", 1)[1].rstrip() if __doc__ else "")
            watcher = asyncio.create_task(_watch(mesh, interval))
            commands = asyncio.create_task(_commands(mesh, script, stop))
            await stop.wait()
            for task in (watcher, commands):
                task.cancel()
            await asyncio.gather(watcher, commands, return_exceptions=True)
        finally:
            _say("stopping everything")
            await mesh.stop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
    _say("stopped")
    return 0


async def _watch(mesh: mesh_mod.Mesh, interval: float) -> None:
    round_no = 0
    while True:
        round_no += 1
        traces = await asyncio.gather(*(mesh.request(zone) for zone in mesh.topo.zones()))
        through = await asyncio.gather(*(mesh.gateway_request(path, headers) for _, path, headers in GATEWAY_REQUESTS))
        lines = [f"round {round_no} ({time.strftime('%H:%M:%S')})"]
        for zone, trace in zip(mesh.topo.zones(), traces, strict=True):
            lines.append(f"  from {zone:<18} {trace.status:>3}  {trace.body.replace(' -> ', ' > ')}")
        for (label, _, _), trace in zip(GATEWAY_REQUESTS, through, strict=True):
            lines.append(f"  gw {label:<20} {trace.status:>3}  {trace.body.replace(' -> ', ' > ')}")
        print("\n".join(lines), flush=True)
        await asyncio.sleep(interval)


async def _commands(mesh: mesh_mod.Mesh, script: str | None, stop: asyncio.Event) -> None:
    if script is not None:
        for line in script.split(";"):
            await _execute(mesh, line, stop)
        stop.set()
        return
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while not stop.is_set():
        typed = await reader.readline()
        if not typed:
            return  # stdin closed: keep watching until Ctrl-C
        await _execute(mesh, typed.decode(), stop)


async def _execute(mesh: mesh_mod.Mesh, line: str, stop: asyncio.Event) -> None:
    words = shlex.split(line)
    if not words:
        return
    verb, args = words[0], words[1:]
    try:
        if verb == "quit":
            stop.set()
        elif verb == "sleep":
            await asyncio.sleep(float(args[0]))
        elif verb in ("break", "fix") and len(args) == 2:
            _check(mesh, *args)
            await (mesh.break_replica if verb == "break" else mesh.fix_replica)(*args)
            _say(f"{verb}: {args[0]} in {args[1]}")
        elif verb in ("break-region", "fix-region") and len(args) == 2:
            zones = mesh.topo.zones(args[1])
            if not zones:
                raise ValueError(f"unknown region {args[1]!r}")
            for zone in zones:
                _check(mesh, args[0], zone)
                await (mesh.break_replica if verb == "break-region" else mesh.fix_replica)(args[0], zone)
            _say(f"{verb}: {args[0]} in {', '.join(zones)}")
        elif verb in ("break-cluster", "fix-cluster") and len(args) == 1:
            spec = next((c for c in mesh.topo.clusters if c.name == args[0]), None)
            if spec is None:
                raise ValueError(f"unknown cluster {args[0]!r}; clusters: "
                                 f"{', '.join(c.name for c in mesh.topo.clusters)}")
            act = mesh.break_replica if verb == "break-cluster" else mesh.fix_replica
            await asyncio.gather(*(act(service, zone) for zone in spec.zones for service in mesh.topo.chain))
            _say(f"{verb}: every replica in {args[0]} ({', '.join(spec.zones)})")
        elif verb in ("unready", "ready") and len(args) == 2:
            _check(mesh, *args)
            mesh.set_health(args[0], args[1], "unhealthy" if verb == "unready" else "healthy")
            _say(f"{verb}: {args[0]} in {args[1]} (endpoint file updated)")
        elif verb == "where" and len(args) >= 2:
            _say(await _where(mesh, args[0], args[1], args[2:]))
        elif verb == "status" and not args:
            _say(await _ask(mesh, "/debug/syncz", lambda answer: ask.format_status(answer["clients"]), {}))
        else:
            _say(f"unknown command {line.strip()!r}; try: break mockb ap-northeast-1a")
    except (ValueError, IndexError, KeyError) as exc:
        _say(f"cannot {line.strip()!r}: {exc}")


def _check(mesh: mesh_mod.Mesh, service: str, zone: str) -> None:
    if (service, zone) not in mesh.servers:
        raise ValueError(f"no replica of {service!r} in zone {zone!r}; zones: {', '.join(mesh.topo.zones())}")


async def _where(mesh: mesh_mod.Mesh, service: str, zone: str, suppose: list[str]) -> str:
    """`meshplane explain` for that zone's sidecar, with the replicas the demo broke as down (outlier
    detection ejects them) and any `zone=Z`, `cluster=C`, `region=R` supposed down too."""
    sidecar = mesh.topo.sidecars[zone]
    down = [f"endpoint=127.0.0.1:{server.replica.port}" for server in mesh.servers.values() if not server.running]
    return await _ask(mesh, "/debug/explain", ask.format_explain, {
        "service": service, "from": f"{sidecar.cluster.region}/{zone}/{sidecar.cluster.name}",
        "down": [*down, *suppose]})


async def _ask(mesh: mesh_mod.Mesh, path: str, show: Callable[[Any], str], params: dict[str, Any]) -> str:
    """One question to the demo's control plane, as `meshplane status | explain` asks it."""
    assert mesh.plane is not None
    server = f"http://127.0.0.1:{mesh.plane.http_port}"
    try:
        return show(await asyncio.to_thread(ask.get, server, path, params))
    except ask.Unanswered as exc:
        return f"{path}: {exc}"


def _say(text: str) -> None:
    print(f"meshplane demo: {text}" if "\n" not in text else text, flush=True)
