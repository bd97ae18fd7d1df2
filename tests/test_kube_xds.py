"""What a proxy receives from a control plane fed by a Kubernetes cluster (a wire-protocol fake read
with the real `kubernetes` client), through an ADS client over real gRPC.

The API server expires its history (410 Gone, a paginated re-list), drops its watches, and goes
away for a while, while every CDS and EDS response is recorded. Invariant 6 at the wire: no
response ever carries an endpoint-less ClusterLoadAssignment for a service that still has
endpoints (nor a CDS without its cluster), and nothing is pushed that did not change.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_pb2

from meshplane import aio, app
from meshplane.xds import client as ads_client
from meshplane.xds import typeurls
from tests.conftest import wait_for
from tests.fakekube import FakeKubeAPI, endpoint, endpoint_slice, node, service
from tests.test_clusters import FAST

WEB = "outbound|8000||web.default.svc.cluster.local"
STEADY = "outbound|8000||steady.default.svc.cluster.local"


@dataclasses.dataclass(frozen=True)
class Pushed:
    version: str
    assignments: dict[str, tuple[tuple[str, int], ...]]  # name -> (address, health) of every lb endpoint


class Recorder:
    """Every CDS and EDS response the client gets, decoded; each one ACKed at once, as Envoy does."""

    def __init__(self, client: ads_client.AdsClient) -> None:
        self.client = client
        self.pushed: list[Pushed] = []  # EDS
        self.clusters: list[tuple[str, set[str]]] = []  # CDS: version, cluster names

    async def run(self) -> None:
        while True:
            response = await self.client.recv(timeout=60)
            if response.type_url == typeurls.CLUSTER:
                self.clusters.append((response.version_info, set(ads_client.resource_names(response))))
                await self.client.ack(response)
                continue
            assignments = {}
            for resource in response.resources:
                cla = endpoint_pb2.ClusterLoadAssignment()
                resource.Unpack(cla)
                assignments[cla.cluster_name] = tuple(sorted(
                    (lb.endpoint.address.socket_address.address, lb.health_status)
                    for group in cla.endpoints for lb in group.lb_endpoints))
            self.pushed.append(Pushed(response.version_info, assignments))
            await self.client.ack(response)

    def current(self, name: str) -> set[str]:
        """The addresses the proxy now has for `name`."""
        for push in reversed(self.pushed):
            if name in push.assignments:
                return {address for address, _ in push.assignments[name]}
        return set()


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


@pytest.fixture
async def proxy(
    fake: FakeKubeAPI, start_plane: Any, tmp_path: Path
) -> AsyncIterator[tuple[app.ControlPlane, Recorder]]:
    kubeconfig = fake.write_kubeconfig(tmp_path / "c1.yaml", cluster="c1")
    plane = await start_plane(kubeconfigs=(f"c1={kubeconfig}",), kube=dataclasses.replace(FAST, page_size=1))
    await wait_for(plane.ready, what="c1 synced")
    node = ads_client.node("sidecar-1", region="r1", zone="z1", cluster="c1")
    async with ads_client.AdsClient(f"127.0.0.1:{plane.ads_port}", node) as client:
        recorder = Recorder(client)
        await client.request(typeurls.CLUSTER)  # wildcard, as Envoy: a service that went away would leave CDS
        await client.request(typeurls.ENDPOINT, [WEB, STEADY])
        task = asyncio.create_task(recorder.run(), name="eds-recorder")
        try:
            await wait_for(lambda: recorder.current(WEB) and recorder.current(STEADY), what="first EDS")
            yield plane, recorder
        finally:
            await aio.cancel(task)


async def test_no_empty_or_needless_eds_through_relist_dropped_watches_and_an_outage(
    fake: FakeKubeAPI, proxy: tuple[app.ControlPlane, Recorder]
) -> None:
    plane, recorder = proxy
    def listed_since(n: int) -> set[str]:
        return {r.path.rsplit("/", 1)[-1] for r in fake.requests[n:] if not r.watch}

    kinds = {"services", "endpointslices", "nodes", "pods"}
    await wait_for(lambda: fake.open_watches() == 4, what="four watches open")

    # 1. 410 Gone with nothing changed: the watches drop, the history is compacted, every kind is listed
    # again (a page at a time): nothing to push.
    before, pushes = len(fake.requests), len(recorder.pushed)
    fake.stall(True)
    fake.drop_watches()
    fake.put("namespaces", {"metadata": {"name": "elsewhere"}})  # history moves on, nothing we watch changes
    fake.expire()
    fake.stall(False)
    await wait_for(lambda: listed_since(before) == kinds and fake.open_watches() == 4, what="re-listed, watching")
    # 2. 410 Gone with a change made while the watches were down: only that change is pushed.
    before = len(fake.requests)
    fake.stall(True)
    fake.drop_watches()
    fake.put("endpointslices", web_slice("10.0.0.1", "10.0.0.3"))
    fake.expire()
    fake.stall(False)
    await wait_for(lambda: recorder.current(WEB) == {"10.0.0.1", "10.0.0.3"}, what="the change made during the 410")
    # The change can be pushed as soon as endpointslices is listed again, before the other kinds are.
    await wait_for(lambda: listed_since(before) == kinds and fake.open_watches() == 4, what="every kind re-listed")
    assert [set(p.assignments) for p in recorder.pushed[pushes:]] == [{WEB}], "one push, of the service that changed"

    # 3. Dropped watches (no 410): re-watched from the last version; a drop alone pushes nothing.
    pushes = len(recorder.pushed)
    fake.drop_watches()
    await wait_for(lambda: fake.open_watches() == 4, what="watches re-opened")
    fake.drop_watches()
    fake.put("endpointslices", web_slice("10.0.0.1", "10.0.0.3", "10.0.0.4"))
    await wait_for(lambda: recorder.current(WEB) == {"10.0.0.1", "10.0.0.3", "10.0.0.4"}, what="change after a drop")
    assert [set(p.assignments) for p in recorder.pushed[pushes:]] == [{WEB}]

    # 4. The API server goes away for a while: the cluster is stale, its endpoints stay, nothing is pushed;
    # a change made meanwhile arrives when it comes back, and only that.
    pushes = len(recorder.pushed)
    fake.set_unreachable(True)
    await wait_for(lambda: plane.clusters.status()["c1"]["stale"], what="c1 stale")
    fake.put("endpointslices", web_slice("10.0.0.4", "10.0.0.5"))
    assert len(recorder.pushed) == pushes, "something was pushed while the API server was away"
    fake.set_unreachable(False)
    await wait_for(lambda: recorder.current(WEB) == {"10.0.0.4", "10.0.0.5"}, what="the outage's change")
    await wait_for(lambda: not plane.clusters.status()["c1"]["stale"], what="c1 not stale")
    assert [set(p.assignments) for p in recorder.pushed[pushes:]] == [{WEB}]

    # Through all of it: both services' clusters stay, never an endpoint-less assignment, never the same
    # content or version twice.
    for version, names in recorder.clusters:
        assert {WEB, STEADY} <= names, f"CDS {version} without a service that has endpoints: {recorder.clusters}"
    assert len(recorder.clusters) == 1, f"CDS pushed without a change: {[v for v, _ in recorder.clusters]}"
    for push in recorder.pushed:
        for name, endpoints in push.assignments.items():
            assert endpoints, f"an empty ClusterLoadAssignment for {name} in version {push.version}"
    versions = [p.version for p in recorder.pushed]
    assert len(versions) == len(set(versions)), f"a version pushed twice: {versions}"
    for name in (WEB, STEADY):
        sent = [p.assignments[name] for p in recorder.pushed if name in p.assignments]
        assert all(a != b for a, b in itertools.pairwise(sent)), f"{name} pushed without a change: {sent}"
    assert [set(p.assignments) for p in recorder.pushed] == [{WEB, STEADY}, {WEB}, {WEB}, {WEB}]


async def test_a_proxy_that_connects_once_ready_gets_the_synced_clusters(
    fake: FakeKubeAPI, start_plane: Any, tmp_path: Path
) -> None:
    kubeconfig = fake.write_kubeconfig(tmp_path / "c1.yaml", cluster="c1")
    # A push loop that would sit on the first sync for a long while: readiness must not wait for it.
    plane = await start_plane(kubeconfigs=(f"c1={kubeconfig}",), kube=FAST, debounce=30, max_delay=30)
    await wait_for(plane.ready, what="c1 synced")
    node = ads_client.node("sidecar-1", region="r1", zone="z1", cluster="c1")
    async with ads_client.AdsClient(f"127.0.0.1:{plane.ads_port}", node) as client:
        await client.request(typeurls.CLUSTER)
        cds = await client.recv()
        assert {WEB, STEADY} <= set(ads_client.resource_names(cds)), "ready, yet the proxy got no clusters"
        await client.ack(cds)
        await client.request(typeurls.ENDPOINT, [WEB, STEADY])
        eds = await client.recv()
        assert sorted(ads_client.resource_names(eds)) == sorted([WEB, STEADY])


async def test_a_proxy_that_connects_while_a_cluster_is_listing_is_held_then_gets_the_synced_clusters(
    fake: FakeKubeAPI, start_plane: Any, tmp_path: Path
) -> None:
    kubeconfig = fake.write_kubeconfig(tmp_path / "c1.yaml", cluster="c1")
    fake.stall(True)  # the API server takes the lists and answers none, for now
    plane = await start_plane(kubeconfigs=(f"c1={kubeconfig}",), kube=FAST, sync_timeout=60)
    assert not plane.ready()
    node = ads_client.node("sidecar-1", region="r1", zone="z1", cluster="c1")
    async with ads_client.AdsClient(f"127.0.0.1:{plane.ads_port}", node) as client:
        await client.request(typeurls.CLUSTER)
        await wait_for(lambda: any(typeurls.CLUSTER in s.types for s in plane.streams),
                       what="the request read")
        with pytest.raises(TimeoutError):  # an answer now would be the empty views of a plane still syncing
            await client.recv(timeout=0.5)
        fake.stall(False)
        cds = await client.recv(timeout=10)
        assert plane.ready()
        assert {WEB, STEADY} <= set(ads_client.resource_names(cds))


async def test_a_proxy_that_reconnects_to_a_syncing_plane_with_what_it_holds_gets_no_re_push(
    fake: FakeKubeAPI, start_plane: Any, tmp_path: Path
) -> None:
    """S4: a control plane restarts (or a proxy moves to another replica) while its clusters list again."""
    kubeconfig = fake.write_kubeconfig(tmp_path / "c1.yaml", cluster="c1")
    first = await start_plane(kubeconfigs=(f"c1={kubeconfig}",), kube=FAST)
    await wait_for(first.ready, what="c1 synced")
    node = ads_client.node("sidecar-1", region="r1", zone="z1", cluster="c1")
    async with ads_client.AdsClient(f"127.0.0.1:{first.ads_port}", node) as client:
        await client.request(typeurls.CLUSTER)
        cds = await client.recv()
        await client.ack(cds)
        await client.request(typeurls.ENDPOINT, [WEB, STEADY])
        eds = await client.recv()
        await client.ack(eds)
    fake.stall(True)
    second = await start_plane(kubeconfigs=(f"c1={kubeconfig}",), kube=FAST, sync_timeout=60)
    async with ads_client.AdsClient(f"127.0.0.1:{second.ads_port}", node) as client:
        await client.request(typeurls.CLUSTER, version_info=cds.version_info)
        await client.request(typeurls.ENDPOINT, [WEB, STEADY], version_info=eds.version_info)
        fake.stall(False)
        await wait_for(second.ready, what="the second plane synced")
        fake.put("endpointslices", web_slice("10.0.0.1", "10.0.0.7"))
        # The first thing this proxy hears of is the change: what it held was not sent again.
        update = await client.recv(timeout=10)
        assert update.type_url == typeurls.ENDPOINT
        assert ads_client.resource_names(update) == [WEB]


async def test_only_ports_known_to_speak_http_are_served(
    fake: FakeKubeAPI, start_plane: Any, tmp_path: Path
) -> None:
    """kube-dns's ports (DNS over UDP and TCP, metrics named without a convention) get no cluster and no
    route; a port is served when its appProtocol, else its name's prefix, says HTTP, HTTP/2 or gRPC."""
    fake.put("services", service("kube-dns", "default", [
        {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
        {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
        {"name": "metrics", "port": 9153, "protocol": "TCP", "targetPort": 9153},
    ]))
    fake.put("endpointslices", endpoint_slice("kube-dns-a", "default", "kube-dns",
                                              [endpoint("10.0.5.1", node_name="n1")],
                                              [{"name": "dns", "port": 53, "protocol": "UDP"},
                                               {"name": "dns-tcp", "port": 53}, {"name": "metrics", "port": 9153}]))
    fake.put("services", service("shop", "default", [
        {"name": "ui", "port": 8080, "appProtocol": "http"},
        {"name": "api", "port": 8443, "appProtocol": "kubernetes.io/h2c"},
        {"name": "grpc-orders", "port": 9090},
        {"name": "db", "port": 5432},
    ]))
    fake.put("endpointslices", endpoint_slice("shop-a", "default", "shop", [endpoint("10.0.6.1", node_name="n1")],
                                              [{"name": "ui", "port": 8080}, {"name": "api", "port": 8443},
                                               {"name": "grpc-orders", "port": 9090}, {"name": "db", "port": 5432}]))
    kubeconfig = fake.write_kubeconfig(tmp_path / "c1.yaml", cluster="c1")
    plane = await start_plane(kubeconfigs=(f"c1={kubeconfig}",), kube=FAST)
    await wait_for(plane.ready, what="c1 synced")
    node = ads_client.node("sidecar-1", region="r1", zone="z1", cluster="c1")
    async with ads_client.AdsClient(f"127.0.0.1:{plane.ads_port}", node) as client:
        await client.request(typeurls.CLUSTER)
        cds = await client.recv()
        assert sorted(n for n in ads_client.resource_names(cds) if "web" not in n and "steady" not in n) == [
            "outbound|8080||shop.default.svc.cluster.local",
            "outbound|8443||shop.default.svc.cluster.local",
            "outbound|9090||shop.default.svc.cluster.local",
        ]
        await client.ack(cds)
        await client.request(typeurls.ROUTE, ["outbound|http|default"])
        rds = await client.recv()
        [routes] = [route_pb2.RouteConfiguration.FromString(r.value) for r in rds.resources]
        hosts = sorted(vh.name for vh in routes.virtual_hosts if "web" not in vh.name and "steady" not in vh.name)
        assert hosts == ["shop.default.svc.cluster.local:8080", "shop.default.svc.cluster.local:8443",
                         "shop.default.svc.cluster.local:9090"]
