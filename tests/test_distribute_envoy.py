"""Scenario S2's distribution rule through a real Envoy: from cn-hangzhou, 90% stays, 10% goes to
ap-northeast-1. Envoy honours locality weights only when the Cluster turns locality-weighted LB on."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from meshplane.demo import mesh as mesh_mod
from meshplane.demo import topology
from tests.conftest import binomial_bounds

pytestmark = pytest.mark.envoy

CLUSTERS = (
    topology.ClusterSpec("cluster-1", "cn-hangzhou", ("cn-hangzhou-h",)),
    topology.ClusterSpec("cluster-2", "ap-northeast-1", ("ap-northeast-1a",)),
)
POLICY = topology.s1_policy(extra=(
    "services:\n"
    "  - name: mockb\n"
    "    locality:\n"
    "      distribute:\n"
    "        - from: cn-hangzhou/*\n"
    "          to:\n"
    '            "cn-hangzhou/*": 90\n'
    '            "ap-northeast-1/*": 10\n'
))
MOCKB = "outbound|8000||mockb.default.svc.cluster.local"
REQUESTS = 400
BATCH = 20  # requests in flight at once


async def test_distribute_90_10_from_hangzhou(tmp_path: Path) -> None:
    async with mesh_mod.Mesh(tmp_path, clusters=CLUSTERS, policy=POLICY) as mesh:
        sidecar = mesh.envoys["cn-hangzhou-h"]
        dump = await sidecar.config_dump()
        cluster = next(
            c["cluster"]
            for section in dump["configs"] if section["@type"].endswith("ClustersConfigDump")
            for c in section.get("dynamic_active_clusters", [])
            if c["cluster"]["name"] == MOCKB
        )
        assert cluster["common_lb_config"]["locality_weighted_lb_config"] == {}
        eds = next(
            e["endpoint_config"]
            for section in dump["configs"] if section["@type"].endswith("EndpointsConfigDump")
            for e in section.get("dynamic_endpoint_configs", [])
            if e["endpoint_config"]["cluster_name"] == MOCKB
        )
        weights = {(g["locality"]["region"], g.get("priority", 0)): g["load_balancing_weight"]
                   for g in eds["endpoints"]}
        assert weights == {("cn-hangzhou", 0): 90, ("ap-northeast-1", 0): 10}

        traces: list[mesh_mod.Trace] = []
        for _ in range(REQUESTS // BATCH):
            traces += await asyncio.gather(*(mesh.request("cn-hangzhou-h") for _ in range(BATCH)))
        assert all(t.ok and t.zone_of("mocka") == "cn-hangzhou-h" for t in traces), traces
        remote = sum(t.zone_of("mockb") == "ap-northeast-1a" for t in traces)
        assert remote + sum(t.zone_of("mockb") == "cn-hangzhou-h" for t in traces) == REQUESTS

        # Were each request's locality drawn independently at 10%, a count outside these bounds
        # has a chance below 1e-9 each side (Envoy's weighted scheduler is tighter still). The
        # bounds (2.25%..20% of 400) are far from the even split Envoy makes without locality
        # weights (a count inside them at 50% has a chance below 1e-30).
        lo, hi = binomial_bounds(REQUESTS, 0.10, 1e-9)
        assert (lo, hi) == (9, 80)
        assert lo <= remote <= hi, f"{remote} of {REQUESTS} requests from cn-hangzhou left the region"
