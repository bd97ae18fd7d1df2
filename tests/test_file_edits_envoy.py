"""Files rewritten in place under traffic through a real Envoy gateway: a large policy copied over with
`cp` and `cat >` (and a broken one after), and a 10,000-service endpoint file written in slow pieces by a
process holding it open. No push ever carries fewer routes, listeners, clusters or endpoints than before
and after, no request fails, and `meshplane explain` answers for the gateway after the broken edit."""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshplane import app
from meshplane.demo import backend, envoy
from meshplane.demo.ports import free_port
from meshplane.xds import client as ads_client
from tests.conftest import wait_for, write_yaml
from tests.edge import EchoServer
from tests.pushes import Holding, Pushes
from tests.test_half_written import pieces_of, shell, write_slowly

pytestmark = [pytest.mark.envoy, pytest.mark.slow]

PORT = free_port()
GATEWAY = {"role": "gateway", "gateway": "edge", "listener_address": "127.0.0.1"}


class Traffic:
    """Requests through the gateway to `hosts` in turn, back to back: what each answered."""

    def __init__(self, hosts: list[str]) -> None:
        self.hosts = itertools.cycle(hosts)
        self.answers: list[tuple[str, int, str]] = []  # host, status, body
        self._task: asyncio.Task[None] | None = None

    @property
    def failed(self) -> list[tuple[str, int, str]]:
        return [a for a in self.answers if a[1] != 200]

    async def _run(self) -> None:
        while True:
            host = next(self.hosts)
            try:
                status, body = await backend.http_get(PORT, host, "/", timeout=5)
            except (OSError, TimeoutError) as exc:
                status, body = 0, type(exc).__name__
            self.answers.append((host, status, body.strip()))
            await asyncio.sleep(0.005)

    async def __aenter__(self) -> Traffic:
        self._task = asyncio.create_task(self._run(), name="traffic")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


class World:
    """A control plane (in this process), one Envoy gateway `edge`, and a recorder of every push to its view."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.plane: app.ControlPlane | None = None
        self.gateway: envoy.EnvoyProcess | None = None
        self.pushes: Pushes | None = None

    async def start(self, endpoint_files: tuple[Path, ...], policy: Path, recorder: dict[str, Any]) -> None:
        # The backstop looks every 20 ms: far more often than any writer pauses.
        self.plane = app.ControlPlane(app.Config(endpoint_files=endpoint_files, policy_file=policy, ads_port=0,
                                                 http_port=0, poll_interval=0.02))
        await self.plane.start()
        node = envoy.EnvoyNode(id="proxy~edge", cluster="edge", region="r1", zone="z1", sub_zone="c1",
                               metadata=GATEWAY)
        self.gateway = envoy.EnvoyProcess(node=node, ads_port=self.plane.ads_port, workdir=self.workdir)
        await self.gateway.start()
        await self.gateway.wait_ready()
        self.pushes = Pushes(f"127.0.0.1:{self.plane.ads_port}",
                             ads_client.node("recorder", region="r1", zone="z1", cluster="c1", metadata=recorder))
        await self.pushes.start()

    async def stop(self) -> None:
        try:
            if self.pushes is not None:
                await self.pushes.stop()
            if self.gateway is not None:
                await self.gateway.stop()
        finally:
            if self.plane is not None:
                await self.plane.stop()

    async def removed(self) -> dict[str, int]:
        """Envoy's count of listeners and clusters it removed (an emptied policy removes both)."""
        assert self.gateway is not None
        return await self.gateway.stats(
            filter=r"^(listener_manager\.listener_removed|cluster_manager\.cluster_removed)$")


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    made = World(tmp_path)
    try:
        yield made
    finally:
        await made.stop()


def _policy(n: int, variant: str, *, broken: bool = False) -> str:
    """A gateway with `n` routes (host h{i}.example.com, to service{i % 3}), each setting x-variant."""
    routes = "".join(
        f"  - name: r{i}\n    parentRefs: [{{name: edge}}]\n    hostnames: [h{i}.example.com]\n    rules:\n"
        f"      - filters: [{{type: RequestHeaderModifier, requestHeaderModifier: "
        f"{{set: [{{name: x-variant, value: {variant}}}]}}}}]\n"
        f"        backendRefs: [{{name: service{i % 3}, port: 8000}}]\n" for i in range(n))
    text = ("apiVersion: meshplane.io/v2\ngateways:\n  - name: edge\n    listeners:\n"
            f"      - {{name: http, port: {PORT}}}\nroutes:\n{routes}")
    return text[: text.rindex("8000")] + "0}]\n" if broken else text  # the last route's port: 0


def _echoed(body: str) -> dict[str, Any]:
    """What an echo replica answered (its name, the request's headers); {} for anything else."""
    try:
        answer = json.loads(body)
    except ValueError:
        return {}
    return answer if isinstance(answer, dict) else {}


def _variant(body: str) -> str:
    return str(_echoed(body).get("headers", {}).get("x-variant", ""))


def _fewest(holdings: list[Holding]) -> tuple[int, int, int, int]:
    return (min(h.listeners for h in holdings), min(h.routes for h in holdings),
            min(h.clusters for h in holdings), min(h.endpoints for h in holdings))


@pytest.mark.parametrize("command", ["cp {new} {path}", "cat {new} > {path}"])
async def test_a_large_policy_rewritten_in_place_under_traffic_loses_no_route_and_no_request(
        world: World, tmp_path: Path, command: str) -> None:
    n = 1000  # about 290 KB: cat writes it in several pieces
    replicas = [EchoServer(f"service{s}@z1", free_port()) for s in range(3)]
    for replica in replicas:
        await replica.start()
    try:
        endpoints = write_yaml(tmp_path / "c1.yaml", {"cluster": "c1", "region": "r1", "services": [
            {"name": f"service{s}", "ports": [{"name": "http", "port": 8000}],
             "endpoints": [{"address": "127.0.0.1", "port": r.port, "zone": "z1"}]} for s, r in enumerate(replicas)]})
        policy = tmp_path / "policy.yaml"
        policy.write_text(_policy(n, "a"))
        for variant in "ab":
            (tmp_path / f"{variant}.yaml").write_text(_policy(n, variant))
        (tmp_path / "broken.yaml").write_text(_policy(n, "c", broken=True))
        await world.start((endpoints,), policy, recorder=GATEWAY)
        assert world.plane is not None and world.pushes is not None
        hosts = [f"h{i}.example.com" for i in range(0, n, n // 10)]
        await wait_for(lambda: _every_host_answers(hosts), timeout=30, what="the gateway serving its routes")
        await wait_for(lambda: _holds(world, routes=n), timeout=30, what="the recorder holding every route")
        full = _fewest([world.pushes.holdings[-1]])
        assert full == (1, n, 3, 3)
        began = time.monotonic()
        async with Traffic(hosts) as traffic:
            for edit in range(6):
                variant = "ba"[edit % 2]
                await shell(command.format(new=tmp_path / f"{variant}.yaml", path=policy))
                await wait_for(lambda v=variant: traffic.answers and _variant(traffic.answers[-1][2]) == v,
                               timeout=30, what=f"edit {edit} (x-variant {variant}) serving")
            rejected = world.plane.metrics.registry.get_sample_value(
                "meshplane_policy_reloads_total", {"result": "rejected"}) or 0
            await shell(command.format(new=tmp_path / "broken.yaml", path=policy))
            await wait_for(lambda: (world.plane.metrics.registry.get_sample_value(
                "meshplane_policy_reloads_total", {"result": "rejected"}) or 0) > rejected,
                timeout=30, what="the broken copy rejected")
            sent = len(traffic.answers)
            await wait_for(lambda: len(traffic.answers) >= sent + 20, what="traffic after the broken copy")
        # As an operator asks, from a shell, while the control plane serves on.
        explain = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "meshplane", "explain", "--gateway", "edge", "--host", "h7.example.com",
            "--path", "/", "--server", f"http://127.0.0.1:{world.plane.http_port}",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(explain.communicate(), 60)
        assert explain.returncode == 0, err.decode()
        assert "service1" in out.decode(), out.decode()
        assert not traffic.failed, f"{len(traffic.failed)} of {len(traffic.answers)} failed: {traffic.failed[:5]}"
        assert _variant(traffic.answers[-1][2]) == "a"  # the last good policy serves on
        world.pushes.check()
        pushed = world.pushes.since(began)
        assert pushed and _fewest(pushed) == full, [h for h in pushed if (h.listeners, h.routes) != (1, n)][:5]
        assert await world.removed() == {"listener_manager.listener_removed": 0, "cluster_manager.cluster_removed": 0}
    finally:
        for replica in replicas:
            await replica.stop()


def _holds(world: World, **counts: int) -> bool:
    assert world.pushes is not None
    world.pushes.check()
    last = world.pushes.last()
    return last is not None and all(getattr(last, k) == v for k, v in counts.items())


async def _every_host_answers(hosts: list[str]) -> bool:
    for host in hosts:
        try:
            if (await backend.http_get(PORT, host, "/", timeout=2))[0] != 200:
                return False
        except (OSError, TimeoutError):
            return False
    return True


async def test_a_10000_service_endpoint_file_written_in_slow_pieces_under_traffic(
        world: World, tmp_path: Path) -> None:
    services, routed = 10_000, 10
    replicas = [EchoServer(f"svc{services - routed + i}@z1", free_port()) for i in range(routed)]
    moved = EchoServer(f"svc{services - 1}@moved", free_port())
    for replica in (*replicas, moved):
        await replica.start()
    try:
        idle = free_port()  # the services no route names: an address nothing is sent to

        def doc(last: EchoServer) -> dict[str, Any]:
            ports = [idle] * (services - routed) + [r.port for r in replicas[:-1]] + [last.port]
            return {"cluster": "c1", "region": "r1", "services": [
                {"name": f"svc{i}", "ports": [{"name": "http", "port": 8000}],
                 "endpoints": [{"address": "127.0.0.1", "port": port, "zone": "z1"}]} for i, port in enumerate(ports)]}

        endpoints = write_yaml(tmp_path / "c1.yaml", doc(replicas[-1]))
        hosts = [f"h{i}.example.com" for i in range(routed)]
        policy = tmp_path / "policy.yaml"
        policy.write_text("apiVersion: meshplane.io/v2\ngateways:\n  - name: edge\n    listeners:\n"
                          f"      - {{name: http, port: {PORT}}}\nroutes:\n" + "".join(
                              f"  - name: r{i}\n    parentRefs: [{{name: edge}}]\n    hostnames: [{host}]\n"
                              f"    rules: [{{backendRefs: [{{name: svc{services - routed + i}, port: 8000}}]}}]\n"
                              for i, host in enumerate(hosts)))
        # The recorder is a sidecar: it is sent every one of the 10,000 services.
        await world.start((endpoints,), policy, recorder={"listener_address": "127.0.0.1"})
        assert world.pushes is not None
        await wait_for(lambda: _every_host_answers(hosts), timeout=60, what="the gateway serving its routes")
        await wait_for(lambda: _holds(world, endpoints=services), timeout=60,
                       what="the recorder holding every service's endpoint")
        full = world.pushes.holdings[-1]
        assert (full.clusters, full.endpoints) == (services, services)
        began = time.monotonic()
        text = yaml.safe_dump(doc(moved), sort_keys=False)  # svc9999 moves to another replica
        async with Traffic(hosts) as traffic:
            # 20 pieces at service boundaries, 0.1 s apart, the file open all along.
            await write_slowly(endpoints, pieces_of(text, at="- name:", count=20), pause=0.1)
            await wait_for(lambda: any(_echoed(a[2]).get("name") == "svc9999@moved" for a in traffic.answers[-10:]),
                           timeout=30, what="the moved endpoint serving")
        assert not traffic.failed, f"{len(traffic.failed)} of {len(traffic.answers)} failed: {traffic.failed[:5]}"
        world.pushes.check()
        pushed = world.pushes.since(began)
        assert pushed, "the move was not pushed"
        fewest = (min(h.clusters for h in pushed), min(h.endpoints for h in pushed))
        assert fewest == (services, services), [(h.type, h.clusters, h.endpoints) for h in pushed][:10]
        assert (await world.removed())["cluster_manager.cluster_removed"] == 0
    finally:
        for replica in (*replicas, moved):
            await replica.stop()
