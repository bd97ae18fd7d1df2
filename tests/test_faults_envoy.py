"""Faults meshplane survives (docs/security.md): `meshplane serve` killed with SIGKILL under real Envoy
traffic and restarted, and the policy file replaced by garbage, truncated or deleted while serving.
(An API server lost under traffic: tests/test_kube_envoy.py.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import structlog

from meshplane.demo import backend, envoy
from meshplane.demo.ports import free_port
from meshplane.xds import client as ads_client
from meshplane.xds import typeurls
from tests.conftest import cluster_doc, wait_for, write_yaml
from tests.test_multi_primary_envoy import Replica, Traffic, replica_servers  # noqa: F401 (fixture)

pytestmark = pytest.mark.envoy


async def test_kill_9_under_traffic_fails_no_request_and_the_restart_repushes_nothing(
    tmp_path: Path, replica_servers: list[Replica]  # noqa: F811
) -> None:
    hello = backend.ReplicaServer(backend.Replica("helloworld", "z1", "r1", "c1", free_port(), None, None))
    await hello.start()
    files = tmp_path / "c1.yaml"

    def endpoints(port: int) -> None:
        write_yaml(files, cluster_doc("c1", "r1", {"helloworld": [{"zone": "z1", "port": port}]}, port=5000))

    endpoints(hello.replica.port)
    server = Replica("meshplane", tmp_path, ["--endpoints", str(files)], max_connection_age=0)
    replica_servers.append(server)
    await server.start()
    listener = free_port()
    proxy = envoy.EnvoyProcess(
        node=envoy.EnvoyNode(id="sidecar-1", cluster="t", region="r1", zone="z1", sub_zone="c1",
                             metadata={"listener_port": listener, "listener_address": "127.0.0.1"}),
        ads_port=server.ads_port, workdir=tmp_path)

    async def synced() -> bool:
        try:
            return [(c["node"], c["state"]) for c in await server.clients()] == [("sidecar-1", "SYNCED")]
        except OSError:
            return False

    try:
        await proxy.start()
        await wait_for(synced, timeout=15, what="the Envoy synced")
        with Traffic(listener, "helloworld") as traffic:
            await wait_for(lambda: traffic.sent >= 10, timeout=10, what="traffic through the Envoy")
            server.kill()
            await server.start()  # the same ports: as a restarted pod behind its Service
            await wait_for(synced, timeout=15, what="the Envoy back on the restarted server")
            assert await server.metric("meshplane_xds_responses_total") == 0  # nothing re-pushed
            moved = backend.ReplicaServer(backend.Replica("helloworld", "z2", "r1", "c1", free_port(), None, None))
            await moved.start()
            try:
                endpoints(moved.replica.port)  # a change after the restart arrives
                await wait_for(lambda: traffic.bodies and traffic.bodies[-1] == "helloworld@z2", timeout=10,
                               what="traffic following a change made after the restart")
            finally:
                await moved.stop()
        assert traffic.failed == 0, f"{traffic.failed} of {traffic.sent} requests failed"
    finally:
        await proxy.stop()
        await hello.stop()


@pytest.mark.any_protocol  # no Envoy: what the control plane does with its own input
@pytest.mark.parametrize("damage", ["garbage", "truncated", "deleted"])
async def test_a_damaged_policy_file_keeps_the_last_good_logs_and_counts(
    start_plane: Any, tmp_path: Path, damage: str
) -> None:
    endpoints = write_yaml(tmp_path / "c1.yaml", cluster_doc("c1", "r1", {"mockb": [{"zone": "z1", "port": 9}]}))
    policy = tmp_path / "policy.yaml"
    good = "apiVersion: meshplane.io/v1\ndefaults:\n  connectTimeout: 2s\n  outlierDetection:\n" \
           "    consecutive5xxErrors: 3\n    baseEjectionTime: 30s\n"
    policy.write_text(good)
    plane = await start_plane(endpoint_files=(endpoints,), policy_file=policy)

    def rejected() -> float:
        return plane.metrics.registry.get_sample_value("meshplane_policy_reloads_total", {"result": "rejected"}) or 0

    async with ads_client.AdsClient(f"127.0.0.1:{plane.ads_port}", ads_client.node("s", region="r1")) as c:
        await c.request(typeurls.CLUSTER)
        first = await c.recv()
        await c.ack(first)
        with structlog.testing.capture_logs() as logs:
            if damage == "garbage":
                policy.write_bytes(b"\x00\xff{{{ not: [yaml\n")
            elif damage == "truncated":
                policy.write_text(good[: good.index("baseEjectionTime") + 8])  # cut in the middle of a key
            else:
                policy.unlink()
            await wait_for(lambda: rejected() == 1, what="the damaged policy counted as rejected")
        await c.expect_nothing(0.3)  # nothing pushed: the last good policy stays in force
        assert plane.policy_watcher.current.defaults.outlier_detection is not None
        warned = [e for e in logs if e["log_level"] in ("warning", "error")]
        assert warned and str(policy) in json.dumps(warned, default=str), logs
        # A good edit afterwards applies.
        policy.write_text(good.replace("2s", "3s"))
        assert ads_client.resource_names(await c.recv()) == ads_client.resource_names(first)
