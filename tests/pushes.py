"""What meshplane pushes, push by push: a state-of-the-world ADS client that follows a proxy's whole
configuration (CDS and LDS, then the EDS and RDS they name), as Envoy does, and after every response
records what it holds: clusters, endpoints, listeners, routes. Beside a real Envoy of the same view, it
sees every push that Envoy is sent, including one Envoy would replace before a test could look."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2

from meshplane.xds import client, typeurls


@dataclass(frozen=True)
class Holding:
    """What the client held after one response, and when (monotonic)."""

    at: float
    type: str  # cds, eds, lds, rds: what the response carried
    clusters: int
    endpoints: int
    listeners: int
    routes: int


class Pushes:
    """`holdings`: one per response, in order. Start with `start()`, end with `stop()`."""

    def __init__(self, target: str, node: Any) -> None:
        self.client = client.AdsClient(target, node)
        self.client.options = [("grpc.max_receive_message_length", -1)]  # 10,000 clusters are 6.7 MB
        self.holdings: list[Holding] = []
        self._clusters: dict[str, Any] = {}
        self._endpoints: dict[str, int] = {}  # cluster -> endpoints held
        self._listeners: dict[str, Any] = {}
        self._routes: dict[str, int] = {}  # route configuration -> routes held
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.client.connect()
        await self.client.request(typeurls.CLUSTER)
        await self.client.request(typeurls.LISTENER)
        self._task = asyncio.create_task(self._run(), name="pushes")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.client.close()

    def check(self) -> None:
        """Raise what ended the recording early, if anything did."""
        if self._task is not None and self._task.done() and not self._task.cancelled():
            self._task.result()

    def last(self) -> Holding | None:
        return self.holdings[-1] if self.holdings else None

    def since(self, moment: float) -> list[Holding]:
        return [h for h in self.holdings if h.at >= moment]

    async def _run(self) -> None:
        while True:
            response = await self.client.recv(timeout=3600)
            got = client.resources(response)
            kind = typeurls.SHORT_NAMES[response.type_url]
            if kind == "cds":  # whole each time: what is not in it is gone
                self._clusters = got
                await self.client.ack(response)
                await self._follow(typeurls.ENDPOINT, sorted(got), self._endpoints)
            elif kind == "lds":
                self._listeners = got
                await self.client.ack(response)
                await self._follow(typeurls.ROUTE, sorted(_route_names(got.values())), self._routes)
            elif kind == "eds":
                self._endpoints.update({name: sum(len(p.lb_endpoints) for p in cla.endpoints)
                                        for name, cla in got.items()})
                await self.client.ack(response, sorted(self._endpoints))
            else:
                self._routes.update({name: sum(len(vh.routes) for vh in rc.virtual_hosts)
                                     for name, rc in got.items()})
                await self.client.ack(response, sorted(self._routes))
            self.holdings.append(Holding(
                at=time.monotonic(), type=kind, clusters=len(self._clusters), endpoints=sum(self._endpoints.values()),
                listeners=len(self._listeners), routes=sum(self._routes.values())))

    async def _follow(self, type_url: str, names: list[str], held: dict[str, int]) -> None:
        """Ask for exactly `names` of `type_url` when that changes (what is no longer named is dropped)."""
        if sorted(held) == names:
            return
        for name in set(held) - set(names):
            del held[name]
        for name in names:
            held.setdefault(name, 0)
        await self.client.request(type_url, names)


def _route_names(listeners: Any) -> set[str]:
    names = set()
    for listener in listeners:
        for chain in listener.filter_chains:
            for f in chain.filters:
                if f.typed_config.Is(hcm_pb2.HttpConnectionManager.DESCRIPTOR):
                    manager = hcm_pb2.HttpConnectionManager()
                    f.typed_config.Unpack(manager)
                    names.add(manager.rds.route_config_name)
    return names
