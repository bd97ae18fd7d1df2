"""An application reaches a service through its sidecar by any name Kubernetes DNS gives it (real Envoy)."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshplane.demo import backend, topology
from meshplane.demo import mesh as mesh_mod

pytestmark = pytest.mark.envoy

ZONE = "cn-hangzhou-h"
ONE_ZONE = (topology.ClusterSpec("cluster-1", "cn-hangzhou", (ZONE,)),)

NAMES = ["mockb", "mockb.default", "mockb.default.svc", "mockb.default.svc.cluster.local"]
MATCHING = NAMES + [f"{name}:8000" for name in NAMES]
NOT_MATCHING = [
    "mockb:9000",  # not a port of mockb
    "mockb.default.svc.cluster.local:9000",
    "mockb.other",  # another namespace
    "mockb.default.svc.cluster",
    "mockd",  # no such service
]


async def test_service_names_route_to_the_service_other_hosts_get_404(tmp_path: Path) -> None:
    async with mesh_mod.Mesh(tmp_path, clusters=ONE_ZONE) as mesh:
        listener = mesh.topo.sidecars[ZONE].listener_port
        for host in MATCHING:
            status, body = await backend.http_get(listener, host)
            trace = mesh_mod.Trace(status, body.strip())
            assert trace.ok, (host, trace)
            assert trace.hops == [("mockb", ZONE), ("mockc", ZONE)], (host, trace)
        for host in NOT_MATCHING:
            status, body = await backend.http_get(listener, host)
            assert status == 404, (host, status, body)  # Envoy: no virtual host matches
