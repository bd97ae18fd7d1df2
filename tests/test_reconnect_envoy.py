"""A real Envoy that moves to another replica across a policy edit: the cluster that changed while it
was away is sent with its endpoints, so Envoy re-warms it at once, not after its 15 s
initial_fetch_timeout (docs/xds.md, make before break)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from meshplane import app
from meshplane.demo import backend, envoy
from meshplane.demo.ports import free_port
from tests.conftest import cluster_doc, wait_for, write_yaml
from tests.test_multi_primary_envoy import Traffic

pytestmark = pytest.mark.envoy

HELLO = "outbound|5000||helloworld.default.svc.cluster.local"


def _policy(connect_timeout: str) -> str:
    return (f"apiVersion: meshplane.io/v1\ndefaults:\n  connectTimeout: {connect_timeout}\n  outlierDetection:\n"
            "    consecutive5xxErrors: 1\n    interval: 1s\n    baseEjectionTime: 30s\n")


def _active_connect_timeout(dump: dict[str, Any]) -> str | None:
    for config in dump["configs"]:
        for entry in config.get("dynamic_active_clusters", ()):
            if entry["cluster"]["name"] == HELLO:
                return str(entry["cluster"].get("connect_timeout"))
    return None


async def test_a_cluster_changed_while_the_proxy_was_away_comes_with_its_endpoints(
    start_plane: Any, tmp_path: Path
) -> None:
    hello = backend.ReplicaServer(backend.Replica("helloworld", "z1", "r1", "c1", free_port(), None, None))
    await hello.start()
    files = write_yaml(tmp_path / "c1.yaml", cluster_doc("c1", "r1", {"helloworld": [
        {"zone": "z1", "port": hello.replica.port}]}, port=5000))
    # Each replica reads its own copy of the policy: b's is edited while the proxy is on a, as when a
    # rolling restart (or a replica's failure) coincides with a policy change.
    policy_a, policy_b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    policy_a.write_text(_policy("2s"))
    policy_b.write_text(_policy("2s"))
    a: app.ControlPlane = await start_plane(endpoint_files=(files,), policy_file=policy_a)
    b: app.ControlPlane = await start_plane(endpoint_files=(files,), policy_file=policy_b)
    listener = free_port()
    proxy = envoy.EnvoyProcess(
        node=envoy.EnvoyNode(id="sidecar-1", cluster="t", region="r1", zone="z1", sub_zone="c1",
                             metadata={"listener_port": listener, "listener_address": "127.0.0.1"}),
        ads_port=a.ads_port, workdir=tmp_path, ads_replicas=[("127.0.0.1", a.ads_port), ("127.0.0.1", b.ads_port)])
    try:
        await proxy.start()
        await proxy.wait_ready()
        assert _active_connect_timeout(await proxy.config_dump()) == "2s"
        with Traffic(listener, "helloworld") as traffic:
            await wait_for(lambda: traffic.sent >= 5 and traffic.bodies[-1].startswith("helloworld@"),
                           what="traffic through the Envoy")
            policy_b.write_text(_policy("3s"))
            await wait_for(lambda: b.cache is not None and b.cache.policy.defaults.connect_timeout_ms == 3000,
                           what="b applying its edit")
            await a.stop()
            away = time.monotonic()
            await wait_for(lambda: any(s.proxy is not None for s in b.streams), what="the Envoy on replica b")

            async def rewarmed() -> bool:
                dump = await proxy.config_dump()
                warming = any(c.get("dynamic_warming_clusters") for c in dump["configs"])
                return not warming and _active_connect_timeout(dump) == "3s"

            # Without the endpoints, Envoy keeps the updated cluster warming for its initial_fetch_timeout (15 s).
            await wait_for(rewarmed, timeout=10, what="the changed cluster active on the Envoy, its endpoints sent")
            assert time.monotonic() - away < 10
            stats = await proxy.stats(filter=r"init_fetch_timeout")
            assert not any(stats.values()), stats
            sent = traffic.sent
            await wait_for(lambda: traffic.sent >= sent + 5, what="more traffic after the move")
        assert traffic.failed == 0, f"{traffic.failed} of {traffic.sent} requests failed"
        assert json.dumps(await proxy.config_dump(include_eds=True)).count(f'"port_value": {hello.replica.port}') >= 1
    finally:
        await proxy.stop()
        await hello.stop()
