"""Scenario S4, multi-primary: two live `meshplane serve` replicas serve the same configuration, and a
real Envoy moves from one to the other when its replica is killed, under traffic, without a failed
request or a needless re-push; when the replica returns, connections move back as they age."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from meshplane import app
from meshplane.demo import backend, envoy
from meshplane.demo.ports import free_port
from meshplane.xds import client as ads_client
from meshplane.xds import typeurls
from tests.conftest import cluster_doc, wait_for, write_yaml
from tests.fakekube import FakeKubeAPI, endpoint, endpoint_slice, node, service
from tests.test_clusters import FAST

pytestmark = pytest.mark.envoy

HELLO = "outbound|5000||helloworld.default.svc.cluster.local"


class Replica:
    """`meshplane serve` as a process of its own (so that it can be killed with SIGKILL)."""

    def __init__(self, name: str, workdir: Path, args: list[str], *, max_connection_age: float) -> None:
        self.name = name
        self.ads_port, self.http_port = free_port(), free_port()
        self.args = [*args, "--ads", f"127.0.0.1:{self.ads_port}", "--http", f"127.0.0.1:{self.http_port}",
                     "--poll-interval", "0.02", "--max-connection-age", str(max_connection_age),
                     "--max-connection-age-grace", "1"]
        self.log = workdir / f"{name}.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "meshplane", "--log-format", "json", "serve", *self.args,
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log)
        await wait_for(self._ready, timeout=30, what=f"{self.name} ready (log: {self.log})")

    async def _ready(self) -> bool:
        try:
            return bool(await self.get("/ready"))
        except OSError:
            return False

    async def get(self, path: str) -> Any:
        def go() -> Any:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=2) as response:
                body = response.read()
                return json.loads(body) if path != "/metrics" else body.decode()
        return await asyncio.to_thread(go)

    async def clients(self) -> list[dict[str, Any]]:
        return list((await self.get("/debug/syncz"))["clients"])

    async def metric(self, name: str) -> float:
        text = await self.get("/metrics")
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await asyncio.wait_for(self.proc.wait(), timeout=10)


class Traffic:
    """Requests through an Envoy listener, one every 20 ms, counting what failed."""

    def __init__(self, port: int, host: str) -> None:
        self.port, self.host = port, host
        self.sent = self.failed = 0
        self.bodies: list[str] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            try:
                status, body = await backend.http_get(self.port, self.host, timeout=2)
            except (OSError, TimeoutError):
                status, body = 0, ""
            self.sent += 1
            self.failed += status != 200
            self.bodies.append(body.strip())
            await asyncio.sleep(0.02)

    def __enter__(self) -> Traffic:
        self._task = asyncio.create_task(self._run(), name="traffic")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


@pytest.fixture
async def replica_servers(tmp_path: Path) -> AsyncIterator[list[Replica]]:
    made: list[Replica] = []
    yield made
    for replica in made:
        await replica.stop()


async def test_a_killed_replica_costs_no_request_and_no_repush(
    tmp_path: Path, replica_servers: list[Replica], xds_protocol: str
) -> None:
    v1 = backend.ReplicaServer(backend.Replica("helloworld", "z1", "r1", "c1", free_port(), None, None))
    v2 = backend.ReplicaServer(backend.Replica("helloworld", "z2", "r1", "c1", free_port(), None, None))
    await v1.start()
    await v2.start()
    files = tmp_path / "c1.yaml"

    def endpoints(*servers: backend.ReplicaServer) -> None:
        doc = cluster_doc("c1", "r1", {"helloworld": [{"zone": s.replica.zone, "port": s.replica.port}
                                                     for s in servers]}, port=5000)
        write_yaml(files, doc)

    endpoints(v1)
    a, b = (Replica(name, tmp_path, ["--endpoints", str(files)], max_connection_age=3) for name in ("a", "b"))
    replica_servers += [a, b]
    await a.start()
    await b.start()
    listener = free_port()
    proxy = envoy.EnvoyProcess(
        node=envoy.EnvoyNode(id="sidecar-1", cluster="t", region="r1", zone="z1", sub_zone="c1",
                             metadata={"listener_port": listener, "listener_address": "127.0.0.1"}),
        ads_port=a.ads_port, workdir=tmp_path, ads_replicas=[("127.0.0.1", a.ads_port), ("127.0.0.1", b.ads_port)])
    try:
        await proxy.start()

        async def on(replica: Replica) -> bool:
            try:
                return [(c["node"], c["state"]) for c in await replica.clients()] == [("sidecar-1", "SYNCED")]
            except OSError:
                return False

        await wait_for(lambda: on(a), timeout=15, what="the Envoy on its nearest replica, a")
        with Traffic(listener, "helloworld") as traffic:
            await wait_for(lambda: traffic.sent >= 10 and traffic.bodies[-1].startswith("helloworld@"),
                           timeout=10, what="traffic through the Envoy")
            stats_before = await proxy.stats(filter="update_")

            killed = time.monotonic()
            a.kill()
            await wait_for(lambda: on(b), timeout=10, what="the Envoy on replica b")
            moved = time.monotonic() - killed
            assert moved < 2.0, f"the Envoy took {moved:.2f}s to move to the other replica"
            # b had what a had: it sent nothing, and Envoy applied no update.
            assert await b.metric("meshplane_xds_responses_total") == 0
            stats_after = await proxy.stats(filter="update_")
            for name in ("cluster_manager.cds.update_success", "listener_manager.lds.update_success"):
                assert stats_after.get(name) == stats_before.get(name), (name, stats_before, stats_after)

            # A change made afterwards reaches it, through b.
            endpoints(v1, v2)

            async def holds_v2() -> bool:
                dump = await proxy.config_dump()
                return f'"port_value": {v2.replica.port}' in json.dumps(dump)

            await wait_for(holds_v2, timeout=10, what="the endpoint added after the failover, in the Envoy")

            # a comes back; b closes connections as they age (3 s +- 10 %, then 1 s of grace): the Envoy
            # goes back to its nearest replica.
            await a.start()
            await wait_for(lambda: on(a), timeout=15, what="the Envoy back on replica a")
            await asyncio.sleep(0.5)  # a few more requests after the move
        assert traffic.failed == 0, f"{traffic.failed} of {traffic.sent} requests failed"
        assert traffic.sent > 100
    finally:
        await proxy.stop()
        await v1.stop()
        await v2.stop()


@pytest.mark.any_protocol  # no Envoy: a client of each protocol to each replica
async def test_two_replicas_serve_identical_resources_and_versions(start_plane: Any, tmp_path: Path) -> None:
    files = write_yaml(tmp_path / "c1.yaml", cluster_doc("c1", "r1", {"helloworld": [{"zone": "z1", "port": 9001}],
                                                                      "mockb": [{"zone": "z2", "port": 9002}]},
                                                         port=5000))
    planes = [await start_plane(endpoint_files=(files,)) for _ in range(2)]
    node = ads_client.node("sidecar-1", region="r1", zone="z1", cluster="c1")
    seen_sotw, seen_delta = [], []
    for plane in planes:
        async with ads_client.AdsClient(f"127.0.0.1:{plane.ads_port}", node) as sotw, \
                ads_client.DeltaClient(f"127.0.0.1:{plane.ads_port}", node) as delta:
            got: dict[str, Any] = {}
            for type_url in typeurls.PUSH_ORDER:
                names = [] if type_url in typeurls.FULL_STATE else (
                    [HELLO] if type_url == typeurls.ENDPOINT else ["outbound|http|default"])
                await sotw.request(type_url, names)
                response = await sotw.recv()
                await sotw.ack(response)  # a route is sent once the clusters it names are ACKed
                got[type_url] = (response.version_info, [r.SerializeToString() for r in response.resources])
                await delta.delta(type_url, names or ["*"])
                dresponse = await delta.recv_delta()
                await delta.ack_delta(dresponse)
                got[type_url + "/delta"] = (dresponse.system_version_info,
                                            sorted((r.name, r.version, r.resource.SerializeToString())
                                                   for r in dresponse.resources))
            seen_sotw.append({k: v for k, v in got.items() if not k.endswith("/delta")})
            seen_delta.append({k: v for k, v in got.items() if k.endswith("/delta")})
    assert seen_sotw[0] == seen_sotw[1]
    assert seen_delta[0] == seen_delta[1]
    # And one protocol's version of a type is the other's.
    assert all(seen_sotw[0][t][0] == seen_delta[0][t + "/delta"][0] for t in typeurls.PUSH_ORDER)


async def test_each_replica_discovers_both_clusters_and_traffic_reaches_both(
    start_plane: Any, tmp_path: Path
) -> None:
    """helloworld v1 in cluster 1, v2 in cluster 2; replica a runs in cluster 1 and discovers cluster 2
    (discovery only: it serves no proxy there), replica b the other way round. A client in cluster 1
    reaches both versions through either replica's sidecar."""
    servers = {c: backend.ReplicaServer(backend.Replica("helloworld", f"zone-{c}", "r1", c, free_port(), None, None,
                                                        host=f"127.0.0.{i + 2}"))
               for i, c in enumerate(("c1", "c2"))}
    fakes = {c: FakeKubeAPI(c) for c in servers}
    for c, fake in fakes.items():
        fake.start()
        server = servers[c]
        fake.put("nodes", node(f"node-{c}", "r1", f"zone-{c}"))
        fake.put("services", service("helloworld", "default", [{"name": "http", "port": 5000}]))
        fake.put("endpointslices", endpoint_slice(
            f"helloworld-{c}", "default", "helloworld",
            [endpoint(server.replica.host, node_name=f"node-{c}")], [{"name": "http", "port": server.replica.port}]))
    policy = tmp_path / "policy.yaml"
    # Spread over both clusters, as Istio does without outlier detection (docs/policy.md, decision 0003).
    policy.write_text("apiVersion: meshplane.io/v1\nservices:\n  - name: helloworld\n    locality: {enabled: false}\n")
    configs = {c: f.write_kubeconfig(tmp_path / f"{c}.yaml", cluster=c) for c, f in fakes.items()}
    try:
        for server in servers.values():
            await server.start()
        a: app.ControlPlane = await start_plane(
            local_cluster=f"c1={configs['c1']}", kubeconfigs=(f"c2={configs['c2']}",), kube=FAST, policy_file=policy)
        b: app.ControlPlane = await start_plane(
            local_cluster=f"c2={configs['c2']}", kubeconfigs=(f"c1={configs['c1']}",), kube=FAST, policy_file=policy)
        for plane in (a, b):
            await wait_for(plane.ready, what="both clusters synced")
        for i, plane in enumerate((a, b)):
            listener = free_port()
            proxy_node = envoy.EnvoyNode(id=f"sidecar-{i}", cluster="t", region="r1", zone="zone-c1", sub_zone="c1",
                                         metadata={"listener_port": listener, "listener_address": "127.0.0.1"})
            async with envoy.EnvoyProcess(node=proxy_node, ads_port=plane.ads_port, workdir=tmp_path / str(i)):
                seen: set[str] = set()

                async def both(listener: int = listener, seen: set[str] = seen) -> bool:
                    try:
                        status, body = await backend.http_get(listener, "helloworld")
                    except OSError:
                        return False
                    if status == 200:
                        seen.add(body.strip())
                    return seen == {"helloworld@zone-c1", "helloworld@zone-c2"}

                await wait_for(both, timeout=20, what=f"v1 and v2 both reached through replica {'ab'[i]}")
    finally:
        for server in servers.values():
            await server.stop()
        for fake in fakes.values():
            fake.stop()
