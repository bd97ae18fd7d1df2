"""A gateway in front of backends in several clusters, all real: the control plane, HTTP replicas on
loopback, one Envoy gateway. The S3 tests (and the failover and HTTPS ones) build their world with it;
`serving` and `gateway_policy` are the preamble of the tests of one gateway's routes."""

from __future__ import annotations

import asyncio
import contextlib
import textwrap
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from meshplane import app
from meshplane.demo import backend, envoy
from meshplane.demo.ports import free_port
from tests.conftest import wait_for


@dataclass(frozen=True)
class Place:
    cluster: str
    region: str
    zone: str
    labels: tuple[tuple[str, str], ...] = ()  # the replica's pod labels

    def named(self, service: str) -> str:
        """What a replica here answers: service@zone, and its labels (service@zone:version=v1)."""
        return f"{service}@{self.zone}" + "".join(f":{k}={v}" for k, v in self.labels)


HERE = Place("cluster-1", "r1", "z1")
"""One place for a gateway and its backends, where a test is about routes, not localities."""


class EchoServer:
    """A replica that answers with its name, the path it was asked and the request's headers (JSON),
    and keeps what it was asked (`seen`). A request steers its answer with headers:
    `x-respond-NAME: V` adds the response header `NAME: V`; `x-fail-status: 500` with
    `x-fail-count: N` fails the first N tries of the request (by its x-request-id, which Envoy keeps
    across retries); `x-delay: SECONDS` answers that late."""

    def __init__(self, name: str, port: int) -> None:
        self.name = name
        self.port = port
        self.seen: list[dict[str, Any]] = []
        self._tries: Counter[str] = Counter()
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        async def echo(request: web.Request) -> web.Response:
            headers: dict[str, str] = {}
            for name, value in request.headers.items():  # a repeated header: its values joined
                headers[name.lower()] = f"{headers[name.lower()]}, {value}" if name.lower() in headers else value
            answer = {"name": self.name, "path": request.path_qs, "method": request.method, "headers": headers}
            self.seen.append(answer)
            key = headers.get("x-request-id", "")
            self._tries[key] += 1
            answer["try"] = self._tries[key]
            if "x-delay" in headers:
                await asyncio.sleep(float(headers["x-delay"]))
            status = 200
            if "x-fail-status" in headers and self._tries[key] <= int(headers.get("x-fail-count", "1")):
                status = int(headers["x-fail-status"])
            extra = {k.removeprefix("x-respond-"): v for k, v in headers.items() if k.startswith("x-respond-")}
            return web.json_response(answer, status=status, headers=extra)

        app_ = web.Application()
        app_.router.add_route("*", "/{tail:.*}", echo)
        self._runner = web.AppRunner(app_, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@dataclass
class Replica:
    service: str
    place: Place
    port: int
    server: backend.ReplicaServer | EchoServer
    health: str = "healthy"
    listed: bool = True  # in its cluster's endpoint file


class Edge:
    """`replicas`: service -> the places of its replicas (a place twice: two replicas there)."""

    def __init__(self, workdir: Path, replicas: Mapping[str, Sequence[Place]], *, gateway_at: Place,
                 echo: bool = False, sidecar: bool = False, service_ports: Sequence[int] = (8000,)) -> None:
        """`sidecar`: the proxy is a sidecar (its outbound listener on `self.port`), not the gateway `edge`.
        `service_ports`: every service's ports, each served by every replica on its own one port."""
        self.workdir = workdir
        self.service_ports = tuple(service_ports)
        self.gateway_at = gateway_at
        self.sidecar = sidecar
        self.port = free_port()
        self.clusters = {p.cluster: p.region for places in replicas.values() for p in places}
        self.clusters.setdefault(gateway_at.cluster, gateway_at.region)
        self.replicas: list[Replica] = []
        for service, places in replicas.items():
            for place in places:
                port = free_port()
                server: backend.ReplicaServer | EchoServer = EchoServer(place.named(service), port) if echo \
                    else backend.ReplicaServer(backend.Replica(
                        service=service, zone=place.zone, region=place.region, cluster=place.cluster, port=port,
                        next_service=None, sidecar_port=None))
                self.replicas.append(Replica(service, place, port, server))
        self.absent: set[str] = set()  # services left out of the endpoint files altogether
        self.plane: app.ControlPlane | None = None
        self.gateway: envoy.EnvoyProcess | None = None
        self.policy_path = workdir / "policy.yaml"

    def endpoint_files(self) -> list[Path]:
        paths = []
        for cluster, region in sorted(self.clusters.items()):
            services: dict[str, list[Replica]] = {}
            for r in self.replicas:
                if r.place.cluster == cluster and r.service not in self.absent:
                    services.setdefault(r.service, [])
                    if r.listed:
                        services[r.service].append(r)
            names = ["http"] + [f"http-{port}" for port in self.service_ports[1:]]
            doc: dict[str, Any] = {"cluster": cluster, "region": region, "services": [
                {"name": service,
                 "ports": [{"name": n, "port": port, "protocol": "HTTP"}
                           for n, port in zip(names, self.service_ports, strict=True)],
                 "endpoints": [{"address": "127.0.0.1", "ports": dict.fromkeys(names, r.port), "zone": r.place.zone,
                                "health": r.health, "labels": dict(r.place.labels)} for r in reps]}
                for service, reps in sorted(services.items())
            ]}
            path = self.workdir / f"{cluster}.yaml"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
            tmp.replace(path)
            paths.append(path)
        return paths

    def write_policy(self, text: str) -> None:
        tmp = self.policy_path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.policy_path)

    async def start(self, policy: str, **config: Any) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.write_policy(policy)
        await asyncio.gather(*(r.server.start() for r in self.replicas))
        self.plane = app.ControlPlane(app.Config(
            endpoint_files=tuple(self.endpoint_files()), policy_file=self.policy_path,
            ads_port=0, http_port=0, poll_interval=0.02, **config))
        await self.plane.start()
        at = self.gateway_at
        metadata: dict[str, Any] = {"role": "gateway", "gateway": "edge", "listener_address": "127.0.0.1"}
        if self.sidecar:
            metadata = {"role": "sidecar", "listener_address": "127.0.0.1", "listener_port": self.port}
        self.gateway = envoy.EnvoyProcess(
            node=envoy.EnvoyNode(id="proxy~edge", cluster="edge", region=at.region, zone=at.zone, sub_zone=at.cluster,
                                 metadata=metadata),
            ads_port=self.plane.ads_port, workdir=self.workdir)
        await self.gateway.start()
        await self.gateway.wait_ready()

    async def stop(self) -> None:
        if self.gateway is not None:
            await self.gateway.stop()
        await asyncio.gather(*(r.server.stop() for r in self.replicas), return_exceptions=True)
        if self.plane is not None:
            await self.plane.stop()

    async def request(self, port: int, host: str, path: str = "/", headers: Mapping[str, str] | None = None,
                      method: str = "GET", timeout: float = 3) -> tuple[int, str]:
        status, _, body = await self.exchange(port, host, path, headers, method=method, timeout=timeout)
        return status, body

    async def exchange(self, port: int, host: str, path: str = "/", headers: Mapping[str, str] | None = None,
                       method: str = "GET", timeout: float = 3) -> tuple[int, dict[str, str], str]:
        """One request: (status, response headers, body); status 0 and the error's name if it failed
        (or took longer than `timeout` seconds)."""
        try:
            status, got, body = await backend.http_request(port, host, path, headers=headers, method=method,
                                                           timeout=timeout)
        except (OSError, TimeoutError) as exc:
            return 0, {}, f"!{type(exc).__name__}"
        return status, got, body.strip()

    async def tally(self, n: int, port: int, host: str, path: str = "/",
                    headers: Mapping[str, str] | None = None, batch: int = 20) -> Counter[tuple[int, str]]:
        """n requests (batch at a time): how many got each (status, body)."""
        out: Counter[tuple[int, str]] = Counter()
        for start in range(0, n, batch):
            got = await asyncio.gather(*(self.request(port, host, path, headers) for _ in range(min(batch, n - start))))
            out.update(got)
        return out

    def nacks(self) -> float:
        assert self.plane is not None
        registry = self.plane.metrics.registry
        return sum(registry.get_sample_value("meshplane_xds_nacks_total", {"type": t}) or 0.0
                   for t in ("cds", "eds", "lds", "rds"))

    def set(self, service: str, cluster: str, *, health: str | None = None, listed: bool | None = None,
            count: int | None = None) -> None:
        """Change `count` (default all) replicas of `service` in `cluster` in the endpoint files."""
        chosen = [r for r in self.replicas if r.service == service and r.place.cluster == cluster]
        for r in chosen[:count] if count is not None else chosen:
            if health is not None:
                r.health = health
            if listed is not None:
                r.listed = listed
        self.endpoint_files()


def gateway_policy(port: int, routes: str) -> str:
    """A v2 policy of the gateway `edge`, with the listeners `com` (example.com) and `org` (any name below
    example.org) on `port`, and `routes`: the entries of its `routes` list, as YAML."""
    return f"""\
apiVersion: meshplane.io/v2
gateways:
  - name: edge
    listeners:
      - {{name: com, port: {port}, hostname: example.com}}
      - {{name: org, port: {port}, hostname: "*.example.org"}}
routes:
{textwrap.indent(textwrap.dedent(routes), "  ")}"""


@contextlib.asynccontextmanager
async def serving(workdir: Path, replicas: Mapping[str, Sequence[Place]], policy: str, *,
                  ready: Callable[[Edge], Awaitable[object]], gateway_at: Place = HERE,
                  **options: Any) -> AsyncIterator[Edge]:
    """An `Edge` (`options`: its other keyword arguments) started with `policy`, once `ready(world)` is
    true (it serves); stopped on leaving."""
    world = Edge(workdir, replicas, gateway_at=gateway_at, **options)
    try:
        await world.start(policy)
        await wait_for(lambda: ready(world), what="the gateway serving")
        yield world
    finally:
        await world.stop()
