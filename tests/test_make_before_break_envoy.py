"""Make before break through a real Envoy: a route reaches a proxy only once every cluster it names,
and that cluster's endpoints, have been ACKed by that proxy; a cluster goes only once no route the
proxy holds names it. Probed as fast as Envoy answers: not one request answered 503 (no_cluster)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import pytest

from meshplane.demo.ports import free_port
from meshplane.xds import streams
from tests.conftest import wait_for
from tests.edge import Edge, Place

pytestmark = [pytest.mark.envoy, pytest.mark.slow]

HERE = Place("cluster-1", "cn-beijing", "cn-beijing-a")
PORT = free_port()
NEW_ROUTES = 30
FLIPS = 20


def _policy(routes: list[tuple[str, str, int]]) -> str:
    """A gateway `edge` on PORT; routes: (path prefix, service, port)."""
    lines = [
        "apiVersion: meshplane.io/v2",
        "gateways:",
        "  - name: edge",
        f"    listeners: [{{name: http, port: {PORT}, hostname: example.com}}]",
        "routes:",
    ]
    for i, (path, service, port) in enumerate(routes):
        lines += [
            f"  - name: r{i}",
            "    parentRefs: [{name: edge}]",
            "    hostnames: [example.com]",
            "    rules:",
            f"      - matches: [{{path: {{type: PathPrefix, value: {path}}}}}]",
            f"        backendRefs: [{{name: {service}, port: {port}}}]",
        ]
    return "\n".join(lines) + "\n"


class Probe:
    """Requests one after another, each as soon as the last is answered: the status and body of each."""

    def __init__(self, world: Edge, port: int, host: str, path: str) -> None:
        self.world, self.port, self.host, self.path = world, port, host, path
        self.got: list[tuple[int, str]] = []
        self._task: asyncio.Task[None] | None = None
        self._stop = False

    async def __aenter__(self) -> Probe:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        # Stopped, not cancelled: Python 3.11's wait_for (inside each request) can swallow a cancellation.
        assert self._task is not None
        self._stop = True
        await self._task

    async def _run(self) -> None:
        while not self._stop:
            self.got.append(await self.world.request(self.port, self.host, self.path))

    def answered_by(self, service: str) -> int:
        return sum(1 for status, body in self.got if status == 200 and body.startswith(f"{service}@"))

    async def arrival_of(self, service: str) -> None:
        """Probe until `service` has answered 20 times: before its route, nothing but no route (404);
        from its first answer on, nothing but answers (no 503 `no_cluster`, no flap back)."""
        await wait_for(lambda: self.answered_by(service) >= 20, what=f"{service} answering")
        first = next(i for i, (status, _) in enumerate(self.got) if status == 200)
        before, after = Counter(s for s, _ in self.got[:first]), Counter(s for s, _ in self.got[first:])
        assert set(before) <= {404}, (service, before)
        assert set(after) == {200}, (service, after)


def _synced(world: Edge) -> bool:
    """Every proxy has ACKed everything its view holds now."""
    assert world.plane is not None
    clients = list(world.plane.streams)
    return bool(clients) and all(s.worst() == streams.Sync.SYNCED for s in clients)


async def _routes_to(world: Edge, cluster: str) -> bool:
    """Envoy's route configurations name this cluster (and only as the route's cluster)."""
    assert world.gateway is not None
    dump = await world.gateway.config_dump(include_eds=False)
    routes = [c for c in dump["configs"] if c["@type"].endswith("RoutesConfigDump")]
    return f'"cluster": "{cluster}"' in json.dumps(routes)


async def _no_cluster(world: Edge) -> int:
    assert world.gateway is not None
    return sum((await world.gateway.stats(filter=r"\.no_cluster$")).values())


async def test_a_new_route_to_a_new_service_is_never_answered_503(tmp_path: Path) -> None:
    services = [f"svc{i}" for i in range(NEW_ROUTES + 1)]
    world = Edge(tmp_path, {s: [HERE] for s in services}, gateway_at=HERE)
    routes = [(f"/{services[0]}", services[0], 8000)]
    try:
        await world.start(_policy(routes))
        await wait_for(lambda: _synced(world), what="the gateway synced")
        for service in services[1:]:
            routes.append((f"/{service}", service, 8000))
            async with Probe(world, PORT, "example.com", f"/{service}/probe") as probe:
                world.write_policy(_policy(routes))
                await probe.arrival_of(service)
        assert await _no_cluster(world) == 0
        assert world.nacks() == 0
    finally:
        await world.stop()


async def test_a_route_flipped_between_two_ports_loses_no_request(tmp_path: Path) -> None:
    world = Edge(tmp_path, {"flip": [HERE]}, gateway_at=HERE, service_ports=(8000, 8001))
    try:
        await world.start(_policy([("/flip", "flip", 8000)]))
        await wait_for(lambda: _synced(world), what="the gateway synced")
        async with Probe(world, PORT, "example.com", "/flip/probe") as probe:
            await wait_for(lambda: probe.answered_by("flip") > 0, what="flip answering")
            for i in range(FLIPS):
                port = 8001 if i % 2 == 0 else 8000
                world.write_policy(_policy([("/flip", "flip", port)]))
                # The flip has landed when Envoy's route names the new port's cluster; it is over (the old
                # cluster gone) when the gateway has ACKed all it holds; then a few requests more.
                await wait_for(lambda p=port: _routes_to(world, f"outbound|{p}||flip.default.svc.cluster.local"),
                               what=f"flip {i} in Envoy's routes")
                flipped = len(probe.got)
                await wait_for(lambda n=flipped: len(probe.got) > n + 5 and _synced(world),  # type: ignore[misc]
                               what=f"flip {i} synced")
        assert Counter(status for status, _ in probe.got) == Counter({200: len(probe.got)})
        assert await _no_cluster(world) == 0
        assert world.nacks() == 0
    finally:
        await world.stop()


async def test_a_new_service_reaches_a_sidecar_with_its_cluster_first(tmp_path: Path) -> None:
    services = [f"svc{i}" for i in range(NEW_ROUTES + 1)]
    world = Edge(tmp_path, {s: [HERE] for s in services}, gateway_at=HERE, sidecar=True)
    world.absent = set(services[1:])
    try:
        await world.start("apiVersion: meshplane.io/v2\n")
        await wait_for(lambda: _synced(world), what="the sidecar synced")
        for service in services[1:]:
            async with Probe(world, world.port, service, "/probe") as probe:
                world.absent.discard(service)
                world.endpoint_files()
                await probe.arrival_of(service)
        assert await _no_cluster(world) == 0
        assert world.nacks() == 0
    finally:
        await world.stop()
