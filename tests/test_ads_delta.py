"""The delta xDS rules (meshplane/xds/delta.py), each checked with a real gRPC delta client
(`DeltaAggregatedResources`) against a running control plane."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.endpoint.v3 import endpoint_pb2

from meshplane import app
from meshplane.xds import client as ads_client
from meshplane.xds import typeurls
from tests.conftest import cluster_doc, held_back, wait_for, write_yaml

MOCKB = "outbound|8000||mockb.default.svc.cluster.local"
MOCKC = "outbound|8000||mockc.default.svc.cluster.local"
MOCKD = "outbound|8000||mockd.default.svc.cluster.local"


def _doc(*, mockb_port: int = 9001, mockd: bool = False, mockc: bool = True) -> dict[str, Any]:
    services = {"mockb": [{"zone": "z1", "port": mockb_port}]}
    if mockc:
        services["mockc"] = [{"zone": "z1", "port": 9002}]
    if mockd:
        services["mockd"] = [{"zone": "z1", "port": 9003}]
    return cluster_doc("c1", "r1", services)


@pytest.fixture
def endpoints(tmp_path: Path) -> Path:
    return write_yaml(tmp_path / "c1.yaml", _doc())


def _client(plane: app.ControlPlane, node_id: str = "sidecar-1") -> ads_client.DeltaClient:
    node = ads_client.node(node_id, region="r1", zone="z1", cluster="c1")
    return ads_client.DeltaClient(f"127.0.0.1:{plane.ads_port}", node)


def _names(response: Any) -> list[str]:
    return sorted(r.name for r in response.resources)


def _metric(plane: app.ControlPlane, name: str, **labels: str) -> float:
    return plane.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_wildcard_clusters_sent_with_versions_equal_to_state_of_the_world(
    start_plane: Any, endpoints: Path
) -> None:
    plane = await start_plane(endpoint_files=(endpoints,))
    async with _client(plane) as delta, ads_client.AdsClient(
            f"127.0.0.1:{plane.ads_port}", ads_client.node("sotw-1", region="r1", zone="z1", cluster="c1")) as sotw:
        await delta.delta(typeurls.CLUSTER)  # a first request naming nothing: the legacy wildcard
        response = await delta.recv_delta()
        assert response.type_url == typeurls.CLUSTER and _names(response) == [MOCKB, MOCKC]
        assert response.nonce and response.system_version_info
        assert response.control_plane.identifier == "meshplane"
        await sotw.request(typeurls.CLUSTER)
        whole = await sotw.recv()
        # The same encoded resources: byte for byte, and the same version for the whole set.
        assert {r.name: r.resource.SerializeToString() for r in response.resources} == \
            {name: res.SerializeToString() for name, res in zip(ads_client.resource_names(whole), whole.resources,
                                                                 strict=True)}
        assert response.system_version_info == whole.version_info


async def test_first_wildcard_answered_even_when_empty_and_empty_named_request_asks_nothing(
    start_plane: Any, tmp_path: Path
) -> None:
    plane = await start_plane(endpoint_files=(write_yaml(tmp_path / "c1.yaml", cluster_doc("c1", "r1", {})),))
    async with _client(plane) as c:
        await c.delta(typeurls.LISTENER, ["*"])
        response = await c.recv_delta()
        assert response.type_url == typeurls.LISTENER  # the sidecar's listener exists even with no services
        await c.delta(typeurls.CLUSTER, ["*"])
        empty = await c.recv_delta()
        assert empty.type_url == typeurls.CLUSTER and not empty.resources and empty.nonce
        await c.delta(typeurls.ENDPOINT)  # first EDS request naming nothing: asks for nothing
        await c.expect_nothing(0.3)


async def test_named_subscriptions_new_names_sent_even_unchanged_and_missing_ones_reported_removed(
    start_plane: Any, endpoints: Path
) -> None:
    plane = await start_plane(endpoint_files=(endpoints,))
    async with _client(plane) as c:
        await c.delta(typeurls.ENDPOINT, [MOCKB, MOCKD])
        first = await c.recv_delta()
        assert _names(first) == [MOCKB]
        assert list(first.removed_resources) == [MOCKD]  # does not exist: said so, and stays subscribed
        await c.ack_delta(first)
        await c.expect_nothing(0.2)

        await c.delta(typeurls.ENDPOINT, [MOCKC])
        added = await c.recv_delta()
        assert _names(added) == [MOCKC] and not added.removed_resources
        await c.ack_delta(added)

        # Subscribed again while subscribed (Envoy does, re-warming a cluster): sent again, unchanged.
        await c.delta(typeurls.ENDPOINT, [MOCKB])
        resent = await c.recv_delta()
        assert _names(resent) == [MOCKB] and resent.resources[0].version == first.resources[0].version
        await c.ack_delta(resent)

        # Unsubscribe and subscribe again: sent again though nothing changed.
        await c.delta(typeurls.ENDPOINT, unsubscribe=[MOCKC])
        await c.expect_nothing(0.2)
        await c.delta(typeurls.ENDPOINT, [MOCKC])
        again = await c.recv_delta()
        assert _names(again) == [MOCKC]
        await c.ack_delta(again)

        # mockd appears: sent, because the removal did not end the subscription.
        write_yaml(endpoints, _doc(mockd=True))
        appeared = await c.recv_delta()
        assert _names(appeared) == [MOCKD]
        await c.ack_delta(appeared)

        # One endpoint changes: only its assignment is sent.
        write_yaml(endpoints, _doc(mockd=True, mockb_port=9101))
        changed = await c.recv_delta()
        assert _names(changed) == [MOCKB] and not changed.removed_resources
        cla = endpoint_pb2.ClusterLoadAssignment()
        changed.resources[0].resource.Unpack(cla)
        assert cla.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value == 9101


async def test_subscription_changes_apply_even_with_a_stale_nonce(start_plane: Any, endpoints: Path) -> None:
    plane = await start_plane(endpoint_files=(endpoints,))
    async with _client(plane) as c:
        await c.delta(typeurls.ENDPOINT, [MOCKB])
        first = await c.recv_delta()
        await c.delta(typeurls.ENDPOINT, [MOCKC], nonce="not-a-nonce-we-sent")
        later = await c.recv_delta()
        assert _names(later) == [MOCKC]
        assert _metric(plane, "meshplane_xds_stale_nonces_total", type="eds") == 1
        assert _metric(plane, "meshplane_xds_acks_total", type="eds") == 0  # a stale nonce is no ACK
        await c.ack_delta(first)
        await c.ack_delta(later)
        await wait_for(lambda: _metric(plane, "meshplane_xds_acks_total", type="eds") == 2, what="both ACKs")


async def test_reconnect_with_initial_versions_gets_only_what_differs(start_plane: Any, endpoints: Path) -> None:
    plane = await start_plane(endpoint_files=(endpoints,))
    async with _client(plane) as c:
        await c.delta(typeurls.CLUSTER, ["*"])
        await c.ack_delta(await c.recv_delta())
        await c.delta(typeurls.ENDPOINT, [MOCKB, MOCKC])
        await c.ack_delta(await c.recv_delta())
        held = {t: dict(v) for t, v in c.held.items()}
    sent = _metric(plane, "meshplane_xds_responses_total", type="cds")

    # Same content: reconnecting reporting what it holds gets nothing at all.
    async with _client(plane) as c:
        await c.delta(typeurls.CLUSTER, ["*"], initial_versions=held[typeurls.CLUSTER])
        await c.delta(typeurls.ENDPOINT, [MOCKB, MOCKC], initial_versions=held[typeurls.ENDPOINT])
        await c.expect_nothing(0.3)
        assert _metric(plane, "meshplane_xds_responses_total", type="cds") == sent

        async def synced() -> bool:
            table = json.loads(await _get(plane, "/debug/syncz"))["clients"]
            return [e["state"] for e in table] == ["SYNCED"]

        await wait_for(synced, what="the reconnected client SYNCED without a push")
        dump = json.loads(await _get(plane, "/debug/config_dump?proxy=sidecar-1"))
        clusters = next(c for c in dump["configs"] if c["@type"].endswith(".ClustersConfigDump"))
        assert {e["name"] for e in clusters["dynamic_active_clusters"]} == {MOCKB, MOCKC}

    # mockc gone and mockb changed while it was away: only mockb sent, mockc reported removed.
    write_yaml(endpoints, _doc(mockb_port=9101, mockc=False))
    assert plane.cache is not None
    views = plane.cache.views
    await wait_for(lambda: all(MOCKC not in v.resources.get(typeurls.CLUSTER, {}) for v in views.values()),
                   what="the change built")
    async with _client(plane) as c:
        await c.delta(typeurls.CLUSTER, ["*"], initial_versions=held[typeurls.CLUSTER])
        clusters = await c.recv_delta()
        assert _names(clusters) == [] and list(clusters.removed_resources) == [MOCKC]
        await c.delta(typeurls.ENDPOINT, [MOCKB, MOCKC], initial_versions=held[typeurls.ENDPOINT])
        assignments = await c.recv_delta()
        assert _names(assignments) == [MOCKB] and list(assignments.removed_resources) == [MOCKC]


async def _get(plane: app.ControlPlane, path: str) -> str:
    import asyncio

    def go() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{plane.http_port}{path}", timeout=5) as response:
            return str(response.read().decode())

    return await asyncio.to_thread(go)


async def test_a_nacked_response_is_not_resent_and_status_shows_it(start_plane: Any, endpoints: Path) -> None:
    plane = await start_plane(endpoint_files=(endpoints,))
    async with _client(plane) as c:
        await c.delta(typeurls.ENDPOINT, [MOCKB])
        await c.ack_delta(await c.recv_delta())
        write_yaml(endpoints, _doc(mockb_port=9101))
        rejected = await c.recv_delta()
        await c.nack_delta(rejected, "no thanks")
        await c.expect_nothing(0.4)  # never re-sent in a loop
        await wait_for(lambda: _metric(plane, "meshplane_xds_nacks_total", type="eds") == 1, what="the NACK counted")
        (entry,) = json.loads(await _get(plane, "/debug/syncz"))["clients"]
        assert entry["types"]["eds"]["state"] == "NACKED"
        assert entry["types"]["eds"]["last_nack"]["message"] == "no thanks"
        assert entry["protocol"] == "delta"
        write_yaml(endpoints, _doc(mockb_port=9102))  # new content: sent
        assert _names(await c.recv_delta()) == [MOCKB]


async def _plane_timing_out_after_1s(start_plane: Any, tmp_path: Path) -> tuple[app.ControlPlane, Path, Path]:
    """A plane whose policy sets every cluster's connect timeout to 1 s (editing it changes every cluster):
    the plane, its policy file and its endpoint file."""
    endpoints = write_yaml(tmp_path / "c1.yaml", _doc())
    policy = tmp_path / "policy.yaml"
    policy.write_text("apiVersion: meshplane.io/v1\ndefaults:\n  connectTimeout: 1s\n")
    return await start_plane(endpoint_files=(endpoints,), policy_file=policy), policy, endpoints


async def test_an_updated_cluster_is_followed_by_its_endpoints_and_removed_clusters_go_last(
    start_plane: Any, tmp_path: Path
) -> None:
    plane, policy, endpoints = await _plane_timing_out_after_1s(start_plane, tmp_path)
    async with _client(plane) as c:
        for type_url, names in ((typeurls.CLUSTER, ["*"]), (typeurls.ENDPOINT, [MOCKB, MOCKC]),
                                (typeurls.LISTENER, ["*"])):
            await c.delta(type_url, names)
            await c.ack_delta(await c.recv_delta())
        await c.delta(typeurls.ROUTE, ["outbound|http|default"])
        await c.ack_delta(await c.recv_delta())
        # Every cluster changes; the assignments did not, and are sent again right after.
        policy.write_text("apiVersion: meshplane.io/v1\ndefaults:\n  connectTimeout: 2s\n")
        clusters = await c.recv_delta()
        assert clusters.type_url == typeurls.CLUSTER and _names(clusters) == [MOCKB, MOCKC]
        assignments = await c.recv_delta()
        assert assignments.type_url == typeurls.ENDPOINT and _names(assignments) == [MOCKB, MOCKC]
        await c.ack_delta(clusters)
        await c.ack_delta(assignments)
        # mockc goes: routes stop naming it before the cluster is removed.
        write_yaml(endpoints, _doc(mockc=False))
        order = []
        for _ in range(3):
            response = await c.recv_delta()
            order.append((response.type_url, list(response.removed_resources)))
            await c.ack_delta(response)
        assert order[-1] == (typeurls.CLUSTER, [MOCKC]), order
        assert [t for t, _ in order][:2] == [typeurls.ENDPOINT, typeurls.ROUTE], order


async def test_bad_requests_end_the_stream_naming_what(start_plane: Any, endpoints: Path) -> None:
    plane = await start_plane(endpoint_files=(endpoints,))
    c = _client(plane)
    async with c:
        await c.delta(typeurls.CLUSTER, ["*"], with_node=False)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await c.recv_delta()
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "first DeltaDiscoveryRequest on a stream must carry node" in (error.value.details() or "")


async def test_stream_state_is_freed_when_the_stream_ends(start_plane: Any, endpoints: Path) -> None:
    plane = await start_plane(endpoint_files=(endpoints,))
    for i in range(3):
        async with _client(plane, f"sidecar-{i}") as c:
            await c.delta(typeurls.CLUSTER, ["*"])
            await c.recv_delta()
            assert len(plane.streams) == 1
        await wait_for(lambda: len(plane.streams) == 0, what="the stream's state dropped")
    assert _metric(plane, "meshplane_xds_connected_proxies") == 0
    assert all(v.streams == 0 for v in plane.cache.views.values())  # type: ignore[union-attr]


async def test_a_route_waits_until_its_new_cluster_and_its_endpoints_are_acked(
    start_plane: Any, endpoints: Path
) -> None:
    plane = await start_plane(endpoint_files=(endpoints,))
    async with _client(plane) as c:
        for type_url, names in ((typeurls.CLUSTER, ["*"]), (typeurls.ENDPOINT, [MOCKB, MOCKC]),
                                (typeurls.LISTENER, ["*"]), (typeurls.ROUTE, ["outbound|http|default"])):
            await c.delta(type_url, names)
            await c.ack_delta(await c.recv_delta())
        write_yaml(endpoints, _doc(mockd=True))
        clusters = await c.recv_delta()
        assert clusters.type_url == typeurls.CLUSTER and _names(clusters) == [MOCKD]
        routes_sent = _metric(plane, "meshplane_xds_responses_total", type="rds")
        route = "outbound|http|default"
        await wait_for(lambda: held_back(plane, typeurls.ROUTE, route, after=typeurls.LISTENER),
                       what="the route naming mockd held back: its cluster is not ACKed")
        await c.delta(typeurls.ENDPOINT, [MOCKD])  # as Envoy asks for a cluster's endpoints before its ACK
        assignments = await c.recv_delta()
        assert _names(assignments) == [MOCKD]
        await c.ack_delta(clusters)
        await wait_for(lambda: held_back(plane, typeurls.ROUTE, route, after=typeurls.CLUSTER),
                       what="the route still held back once the cluster is ACKed: its endpoints are not")
        assert _metric(plane, "meshplane_xds_responses_total", type="rds") == routes_sent
        (entry,) = json.loads(await _get(plane, "/debug/syncz"))["clients"]
        assert entry["types"]["rds"]["state"] == "STALE"  # what waits is not SYNCED
        await c.ack_delta(assignments)
        routes = await c.recv_delta()
        assert routes.type_url == typeurls.ROUTE and _names(routes) == ["outbound|http|default"]


async def test_a_reconnect_learning_of_a_changed_cluster_gets_its_endpoints_though_it_reports_them_current(
    start_plane: Any, tmp_path: Path
) -> None:
    plane, policy, _ = await _plane_timing_out_after_1s(start_plane, tmp_path)
    async with _client(plane) as c:
        await c.delta(typeurls.CLUSTER, ["*"])
        await c.ack_delta(await c.recv_delta())
        await c.delta(typeurls.ENDPOINT, [MOCKB, MOCKC])
        await c.ack_delta(await c.recv_delta())
        held = {t: dict(v) for t, v in c.held.items()}
    # The clusters change while the proxy is away; their endpoints do not.
    policy.write_text("apiVersion: meshplane.io/v1\ndefaults:\n  connectTimeout: 2s\n")
    assert plane.cache is not None
    cache = plane.cache
    await wait_for(lambda: cache.policy.defaults.connect_timeout_ms == 2000, what="the edit applied")
    async with _client(plane) as c:
        # Envoy asks for the clusters first, and for their endpoints once it has the clusters.
        await c.delta(typeurls.CLUSTER, ["*"], initial_versions=held[typeurls.CLUSTER])
        clusters = await c.recv_delta()
        assert _names(clusters) == [MOCKB, MOCKC]
        await c.delta(typeurls.ENDPOINT, [MOCKB, MOCKC], initial_versions=held[typeurls.ENDPOINT])
        assignments = await c.recv_delta()
        assert assignments.type_url == typeurls.ENDPOINT and _names(assignments) == [MOCKB, MOCKC]


async def test_a_cluster_whose_service_went_is_removed_though_the_gateway_route_still_names_it(
    start_plane: Any, endpoints: Path, tmp_path: Path
) -> None:
    """As for state of the world (test_ads_protocol): the gateway's route keeps naming the cluster."""
    from tests.test_ads_protocol import GATEWAY_POLICY

    policy = tmp_path / "policy.yaml"
    policy.write_text(GATEWAY_POLICY)
    plane = await start_plane(endpoint_files=(endpoints,), policy_file=policy)
    node = ads_client.node("gateway-1", region="r1", zone="z1", cluster="c1",
                           metadata={"role": "gateway", "gateway": "edge"})
    async with ads_client.DeltaClient(f"127.0.0.1:{plane.ads_port}", node) as c:
        for type_url, names in ((typeurls.CLUSTER, ["*"]), (typeurls.ENDPOINT, [MOCKB, MOCKC]),
                                (typeurls.LISTENER, ["*"]), (typeurls.ROUTE, ["gateway|edge|8080"])):
            await c.delta(type_url, names)
            await c.ack_delta(await c.recv_delta())
        write_yaml(endpoints, _doc(mockc=False))
        removed: list[str] = []
        while MOCKC not in removed:  # the assignment's removal, then the cluster's
            response = await c.recv_delta()
            if response.type_url == typeurls.CLUSTER:
                removed += response.removed_resources
            await c.ack_delta(response)

        async def synced() -> bool:
            (entry,) = json.loads(await _get(plane, "/debug/syncz"))["clients"]
            return bool(entry["state"] == "SYNCED")

        await wait_for(synced, what="the gateway SYNCED once the cluster is removed")
