"""A whole local mesh: control plane, real backends, one real Envoy sidecar per zone.

A caller in each zone calls mocka there; each replica calls the next
service through its own zone's sidecar, and every replica answers with its
zone, so a response body is the trace of where each hop landed:
`mocka@cn-hangzhou-h -> mockb@cn-hangzhou-h -> mockc@cn-hangzhou-h`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from meshplane import app
from meshplane.demo import backend, envoy, topology
from meshplane.xds import streams


@dataclass(frozen=True)
class Trace:
    status: int
    body: str

    @property
    def hops(self) -> list[tuple[str, str]]:
        """[(service, zone), ...] for the hops that answered."""
        out = []
        for part in self.body.split(" -> "):
            service, _, zone = part.strip().partition("@")
            if zone and not service.startswith("!"):
                out.append((service, zone.split()[0]))
        return out

    def zone_of(self, service: str) -> str | None:
        return next((z for s, z in self.hops if s == service), None)

    @property
    def ok(self) -> bool:
        return self.status == 200


class Mesh:
    def __init__(
        self,
        workdir: Path,
        *,
        clusters: Sequence[topology.ClusterSpec] = topology.S1_CLUSTERS,
        policy: str | None = None,
        ads_port: int = 0,
        http_port: int = 0,
        debounce: float = 0.005,
        gateway_port: int | None = None,
    ) -> None:
        """`gateway_port`: also run the gateway `edge` (topology.GATEWAY) in the first zone; its
        listener's port, which the policy must give it too."""
        self.workdir = workdir
        self.topo = topology.Topology.build(clusters)
        self.policy_path = workdir / "policy.yaml"
        self.policy_text = policy if policy is not None else topology.s1_policy()
        self._ads_port = ads_port
        self._http_port = http_port
        self._debounce = debounce
        self.plane: app.ControlPlane | None = None
        self.servers: dict[tuple[str, str], backend.ReplicaServer] = {}
        self.envoys: dict[str, envoy.EnvoyProcess] = {}
        self.health: dict[tuple[str, str], str] = {}
        self.gateway_port = gateway_port
        self.gateway: envoy.EnvoyProcess | None = None

    async def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.policy_path.write_text(self.policy_text)
        files = self.topo.write_endpoint_files(self.workdir)
        self.plane = app.ControlPlane(app.Config(
            endpoint_files=tuple(files), policy_file=self.policy_path,
            ads_port=self._ads_port, http_port=self._http_port, debounce=self._debounce,
            poll_interval=0.05,
        ))
        await self.plane.start()
        for r in self.topo.replicas:
            sidecar = self.topo.sidecars[r.zone]
            server = backend.ReplicaServer(backend.Replica(
                service=r.service, zone=r.zone, region=r.cluster.region, cluster=r.cluster.name,
                port=r.port, next_service=self.topo.next_service(r.service),
                sidecar_port=sidecar.listener_port,
            ))
            self.servers[(r.service, r.zone)] = server
        await asyncio.gather(*(s.start() for s in self.servers.values()))
        for zone, sidecar in self.topo.sidecars.items():
            self.envoys[zone] = envoy.EnvoyProcess(
                node=envoy.EnvoyNode(
                    id=sidecar.node_id, cluster="meshplane-demo", region=sidecar.cluster.region,
                    zone=zone, sub_zone=sidecar.cluster.name,
                    metadata={"listener_port": sidecar.listener_port, "listener_address": "127.0.0.1"},
                ),
                ads_port=self.plane.ads_port,
                workdir=self.workdir,
            )
        if self.gateway_port is not None:
            spec = self.topo.clusters[0]
            self.gateway = envoy.EnvoyProcess(
                node=envoy.EnvoyNode(
                    id=f"gateway~{topology.GATEWAY}", cluster=topology.GATEWAY, region=spec.region,
                    zone=spec.zones[0], sub_zone=spec.name,
                    metadata={"role": "gateway", "gateway": topology.GATEWAY, "listener_address": "127.0.0.1"},
                ),
                ads_port=self.plane.ads_port,
                workdir=self.workdir,
            )
        proxies = [*self.envoys.values(), *([self.gateway] if self.gateway else [])]
        await asyncio.gather(*(e.start() for e in proxies))
        # Every proxy holds its whole configuration before any request: a request balanced onto a zone
        # whose sidecar has no routes yet fails there, and the caller's outlier detection ejects a
        # healthy replica for the rest of the run.
        await self._wait_synced(len(proxies))
        await asyncio.gather(*(self._wait_serving(zone) for zone in self.envoys))
        if self.gateway is not None:
            await self._wait_gateway()

    async def _wait_synced(self, proxies: int, timeout: float = 30) -> None:
        assert self.plane is not None
        registry = self.plane.streams
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            clients = [s for s in registry if s.proxy is not None]
            if len(clients) >= proxies and all(s.worst() == streams.Sync.SYNCED for s in clients):
                return
            await asyncio.sleep(0.05)
        states = {s.node_id: s.worst().value for s in registry}
        raise RuntimeError(f"{proxies} proxies never all held their configuration (now: {states})")

    async def _wait_gateway(self, timeout: float = 30) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        last: Trace | None = None
        while asyncio.get_running_loop().time() < deadline:
            last = await self.gateway_request("/mocka")
            if last.ok:
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"the gateway never served example.com/mocka (last: {last})")

    async def _wait_serving(self, zone: str, timeout: float = 30) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        last: Trace | None = None
        while asyncio.get_running_loop().time() < deadline:
            last = await self.request(zone, via_sidecar=True)
            if last.ok and (await self.request(zone)).ok:
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"sidecar in {zone} never served mocka (last: {last})")

    async def stop(self) -> None:
        proxies = [*self.envoys.values(), *([self.gateway] if self.gateway else [])]
        await asyncio.gather(*(e.stop() for e in proxies), return_exceptions=True)
        await asyncio.gather(*(s.stop() for s in self.servers.values()), return_exceptions=True)
        if self.plane is not None:
            await self.plane.stop()

    async def __aenter__(self) -> Mesh:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def request(self, zone: str, *, via_sidecar: bool = False) -> Trace:
        """One request from a caller in `zone` to the first service of the chain.

        By default the caller is co-located with that zone's first replica (as a
        user of mocka in its pod), so the trace shows what the sidecars decided for
        every later hop; `via_sidecar` sends it through the zone's sidecar instead.
        """
        first = self.topo.chain[0]
        if via_sidecar:
            port, host = self.topo.sidecars[zone].listener_port, first
        else:
            port, host = self.topo.replica(first, zone).port, "localhost"
        try:
            status, body = await backend.http_get(port, host)
        except (OSError, TimeoutError) as exc:
            return Trace(0, f"!{exc.__class__.__name__}")
        return Trace(status, body.strip())

    async def gateway_request(self, path: str, headers: dict[str, str] | None = None) -> Trace:
        """One request through the gateway, for example.com."""
        assert self.gateway_port is not None
        try:
            status, _, body = await backend.http_request(self.gateway_port, topology.GATEWAY_HOST, path,
                                                         headers=headers)
        except (OSError, TimeoutError) as exc:
            return Trace(0, f"!{exc.__class__.__name__}")
        return Trace(status, body.strip())

    async def break_replica(self, service: str, zone: str) -> None:
        """The replica stops listening: connections to it are refused.

        Like a crashed process, its open connections are reset. We wait until the
        sidecars have seen those resets, so the next request meets a refused
        connection (what S1 describes) rather than racing a reset in flight.
        """
        await self.servers[(service, zone)].stop()
        port = self.topo.replica(service, zone).port
        proxies = [*self.envoys.values(), *([self.gateway] if self.gateway else [])]
        deadline = asyncio.get_running_loop().time() + 5
        while asyncio.get_running_loop().time() < deadline:
            active = await asyncio.gather(*(_active_connections(e, port) for e in proxies))
            if not any(active):
                return
            await asyncio.sleep(0.02)

    async def fix_replica(self, service: str, zone: str) -> None:
        await self.servers[(service, zone)].start()

    def set_health(self, service: str, zone: str, health: str) -> None:
        """Report a replica's health through the endpoint files (as a readiness probe would)."""
        self.health[(service, zone)] = health
        self.topo.write_endpoint_files(self.workdir, health=self.health)


async def _active_connections(proxy: envoy.EnvoyProcess, port: int) -> int:
    """Connections `proxy` holds open to 127.0.0.1:port, by its admin /clusters."""
    total = 0
    for cluster in (await proxy.clusters_json()).get("cluster_statuses", []):
        for host in cluster.get("host_statuses", []):
            if host.get("address", {}).get("socket_address", {}).get("port_value") != port:
                continue
            for stat in host.get("stats", []):
                if stat.get("name") == "cx_active":
                    total += int(stat.get("value", 0))
    return total
