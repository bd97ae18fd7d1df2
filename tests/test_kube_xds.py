"""What a proxy receives from a control plane fed by a Kubernetes cluster (a wire-protocol fake read
with the real `kubernetes` client), through an ADS client over real gRPC."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshplane.xds import client as ads_client
from meshplane.xds import types
from tests.conftest import wait_for
from tests.fakekube import FakeKubeAPI, endpoint, endpoint_slice, node, service
from tests.test_clusters import FAST

WEB = "outbound|8000||web.default.svc.cluster.local"
STEADY = "outbound|8000||steady.default.svc.cluster.local"


def web_slice(*addresses: str) -> dict[str, Any]:
    return endpoint_slice("web-a", "default", "web", [endpoint(a, node_name="n1") for a in addresses],
                          [{"name": "http", "port": 9000}])


@pytest.fixture
def fake() -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI("c1") as api:
        api.put("nodes", node("n1", "r1", "z1"))
        for name in ("web", "steady"):
            api.put("services", service(name, "default", [{"name": "http", "port": 8000}]))
        api.put("endpointslices", web_slice("10.0.0.1", "10.0.0.2"))
        api.put("endpointslices", endpoint_slice("steady-a", "default", "steady",
                                                 [endpoint("10.0.9.1", node_name="n1")],
                                                 [{"name": "http", "port": 9000}]))
        yield api


async def test_a_proxy_that_connects_once_ready_gets_the_synced_clusters(
    fake: FakeKubeAPI, start_plane: Any, tmp_path: Path
) -> None:
    kubeconfig = fake.write_kubeconfig(tmp_path / "c1.yaml", cluster="c1")
    # A push loop that would sit on the first sync for a long while: readiness must not wait for it.
    plane = await start_plane(kubeconfigs=(f"c1={kubeconfig}",), kube=FAST, debounce=30, max_delay=30)
    await wait_for(plane.ready, what="c1 synced")
    node = ads_client.node("sidecar-1", region="r1", zone="z1", cluster="c1")
    async with ads_client.AdsClient(f"127.0.0.1:{plane.ads_port}", node) as client:
        await client.request(types.CLUSTER)
        cds = await client.recv()
        assert {WEB, STEADY} <= set(ads_client.resource_names(cds)), "ready, yet the proxy got no clusters"
        await client.ack(cds)
        await client.request(types.ENDPOINT, [WEB, STEADY])
        eds = await client.recv()
        assert sorted(ads_client.resource_names(eds)) == sorted([WEB, STEADY])
