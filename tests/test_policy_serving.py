"""Policy edits on a running control plane: valid ones are pushed, broken ones change nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2

from meshplane.xds import client as ads_client
from meshplane.xds import typeurls
from tests.conftest import cluster_doc, wait_for, write_yaml

POLICY = """\
apiVersion: meshplane.io/v1
defaults:
  outlierDetection:
    consecutive5xxErrors: {n}
    interval: 1s
"""


def _clusters(response: Any) -> dict[str, cluster_pb2.Cluster]:
    out = {}
    for res in response.resources:
        c = cluster_pb2.Cluster()
        res.Unpack(c)
        out[c.name] = c
    return out


async def test_valid_edit_is_pushed_broken_edit_keeps_last_good(start_plane: Any, tmp_path: Path) -> None:
    endpoints = write_yaml(tmp_path / "c1.yaml", cluster_doc("c1", "r1", {"svc": [{"zone": "z1", "port": 9009}]}))
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(n=3))
    plane = await start_plane(endpoint_files=(endpoints,), policy_file=policy)
    node = ads_client.node("sidecar", region="r1", zone="z1", cluster="c1")
    async with ads_client.AdsClient(f"127.0.0.1:{plane.ads_port}", node) as c:
        await c.request(typeurls.CLUSTER)
        first = await c.recv()
        [cluster] = _clusters(first).values()
        assert cluster.outlier_detection.consecutive_5xx.value == 3
        await c.ack(first)

        policy.write_text(POLICY.format(n=7))
        second = await c.recv()
        [cluster] = _clusters(second).values()
        assert cluster.outlier_detection.consecutive_5xx.value == 7
        await c.ack(second)

        policy.write_text(POLICY.format(n=7) + "    maxEjectionPercent: 250\n")
        await wait_for(lambda: plane.policy_watcher.last_errors, what="the broken edit rejected")
        problems = [str(p) for p in plane.policy_watcher.last_errors]
        assert any(p.startswith(f"{policy}:6: ") and "maxEjectionPercent" in p for p in problems), problems
        await c.expect_nothing(0.4)  # nothing pushed
        od = plane.policy_watcher.current.defaults.outlier_detection
        assert od is not None and od.consecutive_5xx_errors == 7  # last good policy in force
