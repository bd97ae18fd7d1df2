"""`meshplane demo`: the S1 mesh, live, with the S3 gateway in front. Break replicas and watch traffic move.

What a round shows is INTRO; the commands are COMMANDS (typed, or given with
--script, ';'-separated), and `help` prints them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import signal
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshplane import ask
from meshplane.demo import mesh as mesh_mod
from meshplane.demo import screen, topology
from meshplane.demo.ports import free_port

# Requests through the gateway each round: (label, path, headers).
GATEWAY_REQUESTS = (
    ("gw /mocka", "/mocka", None),
    ("gw /mocka +canary", "/mocka", {"canary": "cluster-2"}),
    ("gw /standby", "/standby", None),
)

INTRO = f"""\
Every round sends one request straight to mocka in each zone (as a client next to it would: no sidecar on \
that first hop); mocka calls mockb, and mockb calls mockc, each through the Envoy sidecar of its own zone. \
The gw rows go to example.com through the gateway edge (an Envoy in cn-hangzhou-h, in front of both \
clusters): /mocka is balanced over mocka in both clusters, +canary (the header canary: cluster-2) reaches \
only cluster-2's mocka, and /standby stays in cluster-1 while it has a healthy mocka.
Each column is the zone where that service answered: {screen.MOVED} marks a hop that left its caller's \
zone (it failed over), {screen.FAILED} a hop that failed and why."""


@dataclass(frozen=True)
class Command:
    verb: str
    usage: str  # its arguments
    about: str
    least: int  # arguments
    most: int | None


COMMANDS = (
    Command("break", "SERVICE ZONE", "the replica refuses connections (outlier detection moves traffic)", 2, 2),
    Command("fix", "SERVICE ZONE", "it listens again (back once its ejection ends, 15s)", 2, 2),
    Command("break-region", "SERVICE REGION", "every replica of the service in that region", 2, 2),
    Command("fix-region", "SERVICE REGION", "they listen again", 2, 2),
    Command("break-cluster", "CLUSTER", "every replica in that cluster (see /standby move)", 1, 1),
    Command("fix-cluster", "CLUSTER", "they listen again", 1, 1),
    Command("unready", "SERVICE ZONE", "report it unhealthy through the endpoint file (an EDS push)", 2, 2),
    Command("ready", "SERVICE ZONE", "report it healthy again", 2, 2),
    Command("where", "SERVICE ZONE [zone=Z|cluster=C|region=R ...]",
            "`meshplane explain`: the priority table that zone's sidecar gets, why, and where its traffic goes "
            "now (replicas broken here count as down), or if those failed too", 2, None),
    Command("status", "", "`meshplane status`: every Envoy and whether it has ACKed the latest config", 0, 0),
    Command("help", "", "this list", 0, 0),
    Command("sleep", "SECONDS", "(scripts) keep watching for a while", 1, 1),
    Command("quit", "", "stop everything (Ctrl-C does too)", 0, 0),
)
_BY_VERB = {c.verb: c for c in COMMANDS}


class BadCommand(ValueError):
    """A command that cannot run as given; the message says why and what exists."""


def commands_text(topo: topology.Topology) -> str:
    """The commands, each with what it does, and the names the mesh has."""
    usages = [f"{c.verb} {c.usage}".rstrip() for c in COMMANDS]
    width = min(max(map(len, usages)), 25) + 2
    lines = ["Commands (type help to see them again):"]
    for usage, c in zip(usages, COMMANDS, strict=True):
        if len(usage) >= width:  # too long to share its line
            lines.append(f"  {usage}")
            usage = ""
        about = textwrap.wrap(c.about, width=screen.WIDTH - 2 - width) or [""]
        lines.append(f"  {usage:<{width}}{about[0]}".rstrip())
        lines += [f"  {'':<{width}}{more}" for more in about[1:]]
    lines.append(f"Services: {', '.join(topo.chain)}. Zones: {', '.join(topo.zones())}.")
    lines.append(f"Regions: {', '.join(_regions(topo))}. Clusters: {', '.join(c.name for c in topo.clusters)}.")
    return screen.fit("\n".join(lines))


def parse(line: str, topo: topology.Topology) -> tuple[str, list[str]] | None:
    """A command line's verb and arguments, checked against the mesh's names (None: an empty line)."""
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise BadCommand(f"{line.strip()!r}: {exc}") from None
    if not words:
        return None
    verb, args = words[0], words[1:]
    command = _BY_VERB.get(verb)
    if command is None:
        raise BadCommand(f"unknown command {verb!r} (commands: {', '.join(_BY_VERB)}; `help` says what each does)")
    if len(args) < command.least or (command.most is not None and len(args) > command.most):
        raise BadCommand(f"{line.strip()!r}: write {verb} {command.usage}".rstrip())
    names = {"SERVICE": list(topo.chain), "ZONE": topo.zones(), "REGION": _regions(topo),
             "CLUSTER": [c.name for c in topo.clusters]}
    named = list(zip(command.usage.split(), args, strict=False))
    if verb == "where":  # then what is supposed down: zone=Z, cluster=C, region=R, each a name the mesh has
        named = named[:2]
        for supposed in args[2:]:
            what, _, value = supposed.partition("=")
            if what not in ("zone", "cluster", "region"):
                raise BadCommand(f"{line.strip()!r}: {supposed!r}: write zone=Z, cluster=C or region=R")
            named.append((what.upper(), value))
    for name, value in named:
        known = names.get(name)
        if known is not None and value not in known:
            raise BadCommand(f"{line.strip()!r}: no {name.lower()} {value!r} ({name.lower()}s: {', '.join(known)})")
    if verb == "sleep":
        try:
            float(args[0])
        except ValueError:
            raise BadCommand(f"{line.strip()!r}: {args[0]!r} is not a number of seconds") from None
    return verb, args


def _regions(topo: topology.Topology) -> list[str]:
    return list(dict.fromkeys(c.region for c in topo.clusters))


async def main(*, workdir: Path | None, interval: float, script: str | None) -> int:
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="meshplane-demo-")))
        gateway_port = free_port()
        # Short ejections so that `fix` is visible within the demo; S1's 5m is for production.
        policy = topology.demo_policy(gateway_port=gateway_port, base_ejection="15s")
        mesh = mesh_mod.Mesh(workdir, policy=policy, http_port=0, gateway_port=gateway_port)
        steps = None
        if script is not None:
            try:  # a typo in a script fails at once, not after the mesh has started
                steps = [step for line in script.split(";") if (step := parse(line, mesh.topo)) is not None]
            except BadCommand as exc:
                _say(f"--script: {exc}")
                return 2
        _say(f"starting: control plane, {len(mesh.topo.replicas)} backends, "
             f"{len(mesh.topo.sidecars)} Envoy sidecars and a gateway (files and logs in {workdir})")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        failed: list[str] = []
        try:
            await mesh.start()
            assert mesh.plane is not None
            http = f"http://127.0.0.1:{mesh.plane.http_port}"
            _say(f"ready. ADS on 127.0.0.1:{mesh.plane.ads_port}; the HTTP port (/metrics, /ready, /debug: "
                 f"{http}/ lists its pages) on {http}; policy {mesh.policy_path}; the gateway on "
                 f"127.0.0.1:{gateway_port} (curl -H 'Host: example.com' 127.0.0.1:{gateway_port}/mocka)")
            print(screen.fit(INTRO), commands_text(mesh.topo), sep="\n", flush=True)
            watcher = asyncio.create_task(_watch(mesh, interval, hints=script is None))
            commands = asyncio.create_task(
                _script(mesh, steps, stop, failed) if steps is not None else _keyboard(mesh, stop))
            await stop.wait()
            for task in (watcher, commands):
                task.cancel()
            await asyncio.gather(watcher, commands, return_exceptions=True)
        finally:
            _say("stopping everything")
            await mesh.stop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
    _say("stopped" + (f"; the script failed at {failed[0]!r}" if failed else ""))
    return 1 if failed else 0


HINT_EVERY = 10
"""Rounds between reminders that `help` lists the commands (when reading the keyboard)."""


async def _watch(mesh: mesh_mod.Mesh, interval: float, *, hints: bool) -> None:
    round_no = 0
    zones = mesh.topo.zones()
    while True:
        round_no += 1
        traces = await asyncio.gather(*(mesh.request(zone) for zone in zones))
        through = await asyncio.gather(*(mesh.gateway_request(path, headers) for _, path, headers in GATEWAY_REQUESTS))
        rows = [screen.Row(f"from {zone}", zone, t.status, t.body) for zone, t in zip(zones, traces, strict=True)]
        rows += [screen.Row(label, None, t.status, t.body)
                 for (label, _, _), t in zip(GATEWAY_REQUESTS, through, strict=True)]
        print(screen.round_table(round_no, time.strftime("%H:%M:%S"), rows, chain=mesh.topo.chain, zones=zones),
              flush=True)
        if hints and round_no % HINT_EVERY == 0:
            print("  (type help for the commands, quit to stop)", flush=True)
        await asyncio.sleep(interval)


async def _script(mesh: mesh_mod.Mesh, steps: list[tuple[str, list[str]]], stop: asyncio.Event,
                  failed: list[str]) -> None:
    """Run the script's commands in order; the first that fails ends it (and the demo exits 1)."""
    for verb, args in steps:
        if not await _execute(mesh, verb, args, stop):
            failed.append(shlex.join([verb, *args]))
            break
    stop.set()


async def _keyboard(mesh: mesh_mod.Mesh, stop: asyncio.Event) -> None:
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while not stop.is_set():
        typed = await reader.readline()
        if not typed:
            return  # stdin closed: keep watching until Ctrl-C
        try:
            step = parse(typed.decode(), mesh.topo)
        except BadCommand as exc:
            _say(str(exc))
            continue
        if step is not None:
            await _execute(mesh, *step, stop)


async def _execute(mesh: mesh_mod.Mesh, verb: str, args: list[str], stop: asyncio.Event) -> bool:
    """Run one parsed command; False (and why, on the screen) when it could not be done."""
    try:
        if verb == "quit":
            stop.set()
        elif verb == "help":
            print(commands_text(mesh.topo), flush=True)
        elif verb == "sleep":
            await asyncio.sleep(float(args[0]))
        elif verb in ("break", "fix"):
            service, zone = args
            await (mesh.break_replica if verb == "break" else mesh.fix_replica)(service, zone)
            _say(f"{verb}: {service} in {zone}")
        elif verb in ("break-region", "fix-region"):
            service, region = args
            zones = mesh.topo.zones(region)
            for zone in zones:
                await (mesh.break_replica if verb == "break-region" else mesh.fix_replica)(service, zone)
            _say(f"{verb}: {service} in {', '.join(zones)}")
        elif verb in ("break-cluster", "fix-cluster"):
            spec = next(c for c in mesh.topo.clusters if c.name == args[0])
            act = mesh.break_replica if verb == "break-cluster" else mesh.fix_replica
            await asyncio.gather(*(act(service, zone) for zone in spec.zones for service in mesh.topo.chain))
            _say(f"{verb}: every replica in {args[0]} ({', '.join(spec.zones)})")
        elif verb in ("unready", "ready"):
            service, zone = args
            mesh.set_health(service, zone, "unhealthy" if verb == "unready" else "healthy")
            _say(f"{verb}: {service} in {zone} (endpoint file updated)")
        elif verb == "where":
            print(await _where(mesh, args[0], args[1], args[2:]), flush=True)
        elif verb == "status":
            print(screen.fit(await _ask(mesh, "/debug/syncz",
                                        lambda answer: ask.format_status(answer["clients"], narrow=True), {})),
                  flush=True)
    except ask.Unanswered as exc:
        _say(f"cannot {shlex.join([verb, *args])!r}: {exc}")
        return False
    return True


async def _where(mesh: mesh_mod.Mesh, service: str, zone: str, suppose: list[str]) -> str:
    """`meshplane explain` for that zone's sidecar, with the replicas the demo broke as down (outlier
    detection ejects them) and any `zone=Z`, `cluster=C`, `region=R` supposed down too."""
    sidecar = mesh.topo.sidecars[zone]
    down = [f"endpoint=127.0.0.1:{server.replica.port}" for server in mesh.servers.values() if not server.running]
    return screen.fit(await _ask(mesh, "/debug/explain", lambda answer: ask.format_explain(answer, narrow=True), {
        "service": service, "from": f"{sidecar.cluster.region}/{zone}/{sidecar.cluster.name}",
        "down": [*down, *suppose]}))


async def _ask(mesh: mesh_mod.Mesh, path: str, show: Callable[[Any], str], params: dict[str, Any]) -> str:
    """One question to the demo's control plane, as `meshplane status | explain` asks it."""
    assert mesh.plane is not None
    server = f"http://127.0.0.1:{mesh.plane.http_port}"
    return show(await asyncio.to_thread(ask.get, server, path, params))


def _say(text: str) -> None:
    print(screen.fit(f"meshplane demo: {text}"), flush=True)
