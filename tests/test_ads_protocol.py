"""xds_protocol discipline, checked with a real gRPC ADS client against a running control plane."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2

from meshplane import app
from meshplane.xds import client as ads_client
from meshplane.xds import streams, typeurls
from tests.conftest import cluster_doc, held_back, wait_for, write_yaml

MOCKB = "outbound|8000||mockb.default.svc.cluster.local"
MOCKC = "outbound|8000||mockc.default.svc.cluster.local"


def _doc(mockb_health: str = "healthy", extra_mockb: int = 0) -> dict[str, Any]:
    mockb = [{"zone": "z1", "port": 9001, "health": mockb_health}]
    mockb += [{"zone": "z2", "port": 9100 + i} for i in range(extra_mockb)]
    return cluster_doc("c1", "r1", {"mockb": mockb, "mockc": [{"zone": "z1", "port": 9002}]})


@pytest.fixture
def endpoints(tmp_path: Path) -> Path:
    return write_yaml(tmp_path / "c1.yaml", _doc())


def _client(plane: app.ControlPlane, node_id: str = "sidecar-1", **kw: Any) -> ads_client.AdsClient:
    node = ads_client.node(node_id, region="r1", zone="z1", cluster="c1", metadata=kw or None)
    return ads_client.AdsClient(f"127.0.0.1:{plane.ads_port}", node)


def _cla(response: Any) -> list[endpoint_pb2.ClusterLoadAssignment]:
    out = []
    for res in response.resources:
        cla = endpoint_pb2.ClusterLoadAssignment()
        res.Unpack(cla)
        out.append(cla)
    return out


def _metric(plane: app.ControlPlane, name: str, **labels: str) -> float:
    value = plane.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def test_wildcard_cds_sends_every_cluster(start_plane: Any, endpoints: Path) -> None:
    plane = await start_plane(endpoint_files=(endpoints,))
    async with _client(plane) as c:
        await c.request(typeurls.CLUSTER)
        cds = await c.recv()
        assert cds.type_url == typeurls.CLUSTER
        assert sorted(ads_client.resource_names(cds)) == [MOCKB, MOCKC]
        assert cds.nonce and cds.version_info
        assert cds.control_plane.identifier == "meshplane"


async def test_ack_then_quiet_and_only_subscribed_changes_pushed(start_plane: Any, endpoints: Path) -> None:
    plane = await start_plane(endpoint_files=(endpoints,))
    async with _client(plane, "watches-mockb") as b, _client(plane, "watches-mockc") as cc:
        await b.request(typeurls.ENDPOINT, [MOCKB])
        await cc.request(typeurls.ENDPOINT, [MOCKC])
        first_b, first_c = await b.recv(), await cc.recv()
        await b.ack(first_b)
        await cc.ack(first_c)
        await b.expect_nothing(0.3)  # an ACK is not answered

        write_yaml(endpoints, _doc(mockb_health="unhealthy"))
        update = await b.recv()
        assert ads_client.resource_names(update) == [MOCKB]
        assert update.version_info != first_b.version_info
        [cla] = _cla(update)
        assert cla.endpoints[0].lb_endpoints[0].health_status == health_check_pb2.UNHEALTHY
        await cc.expect_nothing(0.3)  # mockc did not change: not pushed
        await b.ack(update)
        await wait_for(lambda: _metric(plane, "meshplane_push_latency_seconds_count", type="eds") >= 1,
                       what="push latency observed on ACK")


async def test_nack_is_counted_and_the_rejected_version_is_not_resent(start_plane: Any, endpoints: Path) -> None:
    plane = await start_plane(endpoint_files=(endpoints,))
    async with _client(plane) as c:
        await c.request(typeurls.ENDPOINT, [MOCKB])
        good = await c.recv()
        await c.ack(good)
        write_yaml(endpoints, _doc(mockb_health="draining"))
        bad = await c.recv()
        await c.nack(bad, kept_version=good.version_info, message="we do not like it")
        await wait_for(lambda: _metric(plane, "meshplane_xds_nacks_total", type="eds") == 1, what="NACK counted")
        await c.expect_nothing(0.5)  # no resend loop
        write_yaml(endpoints, _doc(mockb_health="healthy", extra_mockb=1))
        newer = await c.recv()  # new content is sent again
        assert newer.version_info not in (good.version_info, bad.version_info)


async def test_stale_nonce_is_ignored(start_plane: Any, endpoints: Path) -> None:
    plane = await start_plane(endpoint_files=(endpoints,))
    async with _client(plane) as c:
        await c.request(typeurls.ENDPOINT, [MOCKB])
        first = await c.recv()
        await c.ack(first)
        write_yaml(endpoints, _doc(mockb_health="unhealthy"))
        second = await c.recv()
        # A request carrying the older nonce (and a new subscription) is stale: ignored.
        await c.request(typeurls.ENDPOINT, [MOCKB, MOCKC], version_info=first.version_info, nonce=first.nonce)
        await c.expect_nothing(0.3)
        assert _metric(plane, "meshplane_xds_stale_nonces_total", type="eds") == 1
        await c.request(typeurls.ENDPOINT, [MOCKB, MOCKC], version_info=second.version_info, nonce=second.nonce)
        third = await c.recv()
        assert ads_client.resource_names(third) == [MOCKC]


async def test_resubscribed_resource_is_sent_again_even_unchanged(start_plane: Any, endpoints: Path) -> None:
    plane = await start_plane(endpoint_files=(endpoints,))
    async with _client(plane) as c:
        await c.request(typeurls.ENDPOINT, [MOCKB, MOCKC])
        both = await c.recv()
        assert sorted(ads_client.resource_names(both)) == [MOCKB, MOCKC]
        await c.ack(both, names=[MOCKB])  # drop mockc
        await c.expect_nothing(0.2)
        await c.request(typeurls.ENDPOINT, [MOCKB, MOCKC], version_info=both.version_info, nonce=both.nonce)
        again = await c.recv()
        assert ads_client.resource_names(again) == [MOCKC]


async def _held_by_a_client_that_left(plane: app.ControlPlane) -> tuple[Any, Any]:
    """Subscribe to every cluster and their endpoints, ACK both, end the stream: the CDS and EDS responses
    held, whose versions a reconnect reports."""
    async with _client(plane) as c:
        await c.request(typeurls.CLUSTER)
        cds = await c.recv()
        await c.ack(cds)
        await c.request(typeurls.ENDPOINT, [MOCKB, MOCKC])
        eds = await c.recv()
        await c.ack(eds)
    return cds, eds


async def test_reconnect_with_known_versions_gets_no_repush(start_plane: Any, endpoints: Path) -> None:
    plane = await start_plane(endpoint_files=(endpoints,))
    cds, eds = await _held_by_a_client_that_left(plane)
    sent_before = _metric(plane, "meshplane_xds_responses_total", type="cds")
    async with _client(plane) as again:
        await again.request(typeurls.CLUSTER, version_info=cds.version_info)
        await again.request(typeurls.ENDPOINT, [MOCKB, MOCKC], version_info=eds.version_info)
        await again.expect_nothing(0.4)
    assert _metric(plane, "meshplane_xds_responses_total", type="cds") == sent_before
    async with _client(plane) as stale:  # a proxy holding something else gets the current state
        await stale.request(typeurls.CLUSTER, version_info="some-other-version")
        assert sorted(ads_client.resource_names(await stale.recv())) == [MOCKB, MOCKC]


async def test_versions_are_content_hashes_identical_across_restarts(start_plane: Any, endpoints: Path) -> None:
    versions = []
    for _ in range(2):
        plane = await start_plane(endpoint_files=(endpoints,))
        async with _client(plane) as c:
            await c.request(typeurls.CLUSTER)
            cds = await c.recv()
            await c.request(typeurls.ENDPOINT, [MOCKB], with_node=False)
            eds = await c.recv()
            versions.append((cds.version_info, eds.version_info, bytes(eds.resources[0].value)))
        await plane.stop()
    assert versions[0] == versions[1]


async def test_streams_of_one_view_share_it(start_plane: Any, endpoints: Path) -> None:
    plane = await start_plane(endpoint_files=(endpoints,))
    async with _client(plane, "a") as a, _client(plane, "b") as b, _client(plane, "c", listener_port=15002) as c:
        for client in (a, b, c):
            await client.request(typeurls.ENDPOINT, [MOCKB])
            await client.recv()
        assert plane.cache is not None
        assert sorted(v.streams for v in plane.cache.views.values()) == [1, 2]


async def test_first_request_without_node_is_rejected(start_plane: Any, endpoints: Path) -> None:
    plane = await start_plane(endpoint_files=(endpoints,))
    async with _client(plane) as c:
        await c.request(typeurls.CLUSTER, with_node=False)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await c.recv()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "node" in (err.value.details() or "")


async def test_make_before_break_order(start_plane: Any, endpoints: Path) -> None:
    mockd = "outbound|8000||mockd.default.svc.cluster.local"
    plane = await start_plane(endpoint_files=(endpoints,))
    async with _client(plane) as c:
        await c.request(typeurls.CLUSTER)
        cds = await c.recv()
        await c.request(typeurls.ENDPOINT, [MOCKB, MOCKC])
        await c.ack(cds)
        await c.ack(await c.recv())
        await c.request(typeurls.LISTENER)
        lds = await c.recv()
        await c.ack(lds)
        await c.request(typeurls.ROUTE, ["outbound|http|default"])
        rds = await c.recv()
        await c.ack(rds)

        # A new service: its cluster arrives first, the route that names it only once the client has ACKed
        # the cluster and its endpoints (it asks for them, as Envoy does for a cluster it warms).
        doc = _doc()
        doc["services"].append(cluster_doc("c1", "r1", {"mockd": [{"zone": "z1", "port": 9003}]})["services"][0])
        write_yaml(endpoints, doc)
        first = await c.recv()
        assert first.type_url == typeurls.CLUSTER
        assert mockd in ads_client.resource_names(first)
        routes_sent = _metric(plane, "meshplane_xds_responses_total", type="rds")
        route = "outbound|http|default"
        await wait_for(lambda: held_back(plane, typeurls.ROUTE, route, after=typeurls.LISTENER),
                       what="the route held back: the cluster it names is not ACKed")
        await c.request(typeurls.ENDPOINT, [MOCKB, MOCKC, mockd])
        eds = await c.recv()
        assert ads_client.resource_names(eds) == [mockd]
        await c.ack(first)
        await wait_for(lambda: held_back(plane, typeurls.ROUTE, route, after=typeurls.CLUSTER),
                       what="the route still held back once the cluster is ACKed: its endpoints are not")
        assert _metric(plane, "meshplane_xds_responses_total", type="rds") == routes_sent
        await c.ack(eds, [MOCKB, MOCKC, mockd])
        second = await c.recv()
        assert second.type_url == typeurls.ROUTE
        await c.ack(second)

        # mockd goes away: routes stop naming it before its cluster is removed.
        write_yaml(endpoints, _doc())
        first, second = await c.recv(), await c.recv()
        assert [first.type_url, second.type_url] == [typeurls.ROUTE, typeurls.CLUSTER]
        assert sorted(ads_client.resource_names(second)) == [MOCKB, MOCKC]


async def test_a_burst_of_changes_is_one_push(start_plane: Any, endpoints: Path) -> None:
    plane = await start_plane(endpoint_files=(endpoints,), debounce=0.2, max_delay=1.0)
    assert plane.push is not None
    before = plane.push.pushes
    async with _client(plane) as c:
        await c.request(typeurls.ENDPOINT, [MOCKB])
        await c.ack(await c.recv())
        for extra in range(1, 6):  # five edits within the debounce window
            write_yaml(endpoints, _doc(extra_mockb=extra))
            await wait_for(lambda e=extra: len(plane.catalog.services["default/mockb"].endpoints) == e + 1,  # type: ignore[index]
                           what=f"edit {extra} seen")
        update = await c.recv()
        [cla] = _cla(update)
        assert sum(len(g.lb_endpoints) for g in cla.endpoints) == 6
        await c.expect_nothing(0.4)
    assert plane.push.pushes - before == 1


async def _held_by_a_stream_that_ended(plane: app.ControlPlane, names: list[str]) -> Any:
    """Subscribe to EDS `names`, ACK the response, end the stream: what the proxy holds then."""
    async with _client(plane) as c:
        await c.request(typeurls.ENDPOINT, names)
        held = await c.recv()
        await c.ack(held)
    return held


async def test_a_name_added_across_a_reconnect_is_sent_though_the_version_is_known(
    start_plane: Any, endpoints: Path
) -> None:
    """A proxy that held [mockb] at version V reconnects asking [mockb, mockc] and reporting V:
    V vouches for mockb alone, so mockc must be sent (xds_protocol: newly requested names are sent)."""
    plane = await start_plane(endpoint_files=(endpoints,))
    held = await _held_by_a_stream_that_ended(plane, [MOCKB])
    async with _client(plane) as again:
        await again.request(typeurls.ENDPOINT, [MOCKB, MOCKC], version_info=held.version_info)
        response = await again.recv()
        assert MOCKC in ads_client.resource_names(response)
        await again.ack(response)
        write_yaml(endpoints, _doc(mockb_health="unhealthy"))  # and later changes keep coming
        update = await again.recv()
        assert ads_client.resource_names(update) == [MOCKB]


async def test_a_proxy_holding_exactly_what_it_asks_for_gets_no_repush_after_reconnect(
    start_plane: Any, endpoints: Path
) -> None:
    """The other side of the rule above: a version still vouches for the names it was sent with."""
    plane = await start_plane(endpoint_files=(endpoints,))
    held = await _held_by_a_stream_that_ended(plane, [MOCKB])
    async with _client(plane) as again:
        await again.request(typeurls.ENDPOINT, [MOCKB], version_info=held.version_info)
        await again.expect_nothing(0.4)
        write_yaml(endpoints, _doc(mockb_health="unhealthy"))
        update = await again.recv()
        assert ads_client.resource_names(update) == [MOCKB]
        assert update.version_info != held.version_info


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": "x"}
    for _ in range(depth):
        value = {"x": value}
    return value


@pytest.mark.parametrize(
    ("metadata", "named"),
    [
        ({"listener_port": "abc"}, ["metadata.listener_port", "'abc'"]),
        ({"listener_port": 70000}, ["metadata.listener_port", "70000"]),
        ({"listener_port": 1.5}, ["metadata.listener_port", "1.5"]),
        ({"listener_port": 0}, ["metadata.listener_port", "0"]),
        ({"listener_address": "not-an-ip"}, ["metadata.listener_address", "'not-an-ip'"]),
        ({"namespace": 7}, ["metadata.namespace", "7"]),
        ({"namespace": "Not_A_Namespace"}, ["metadata.namespace", "'Not_A_Namespace'"]),
        ({"labels": "app=web"}, ["metadata.labels", "'app=web'"]),
        ({"labels": {"app": 3}}, ["metadata.labels.app", "3"]),
        ({"role": "gatewy"}, ["metadata.role", "'gatewy'", "sidecar"]),
        ({"deep": _nested(60)}, ["node.metadata", "nest"]),
    ],
    ids=["port-text", "port-too-big", "port-fraction", "port-zero", "address", "namespace-number",
         "namespace-invalid", "labels-not-a-map", "label-not-text", "unknown-role", "nested-60-deep"],
)
async def test_bad_node_data_is_refused_naming_the_field_and_value(
    start_plane: Any, endpoints: Path, metadata: dict[str, Any], named: list[str]
) -> None:
    plane = await start_plane(endpoint_files=(endpoints,))
    async with _client(plane, **metadata) as c:
        await c.request(typeurls.CLUSTER)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await c.recv()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    for text in named:
        assert text in (err.value.details() or ""), err.value.details()
    async with _client(plane, "a-good-one") as good:  # nothing already working is lost
        await good.request(typeurls.CLUSTER)
        assert sorted(ads_client.resource_names(await good.recv())) == [MOCKB, MOCKC]


async def test_node_metadata_as_istio_writes_it_is_accepted(start_plane: Any, endpoints: Path) -> None:
    """Istio's node metadata carries numbers as text: a port given as "15002" is the port 15002."""
    plane = await start_plane(endpoint_files=(endpoints,))
    meta = {"listener_port": "15002", "listener_address": "127.0.0.1", "namespace": "shop",
            "labels": {"app": "web", "version": "v1"}, "role": "sidecar"}
    async with _client(plane, **meta) as c:
        await c.request(typeurls.LISTENER)
        lds = await c.recv()
    listener = listener_pb2.Listener()
    lds.resources[0].Unpack(listener)
    assert (listener.address.socket_address.address, listener.address.socket_address.port_value) == (
        "127.0.0.1", 15002)


async def test_a_reconnect_learning_of_changed_clusters_gets_their_endpoints_though_it_reports_them_current(
    start_plane: Any, endpoints: Path, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("apiVersion: meshplane.io/v1\ndefaults:\n  connectTimeout: 1s\n")
    plane = await start_plane(endpoint_files=(endpoints,), policy_file=policy)
    cds, eds = await _held_by_a_client_that_left(plane)
    policy.write_text("apiVersion: meshplane.io/v1\ndefaults:\n  connectTimeout: 2s\n")
    assert plane.cache is not None
    cache = plane.cache
    await wait_for(lambda: cache.policy.defaults.connect_timeout_ms == 2000, what="the edit applied")
    async with _client(plane) as c:
        # It reports the versions it holds: the clusters' is old, the endpoints' current.
        await c.request(typeurls.CLUSTER, version_info=cds.version_info)
        again = await c.recv()
        assert again.type_url == typeurls.CLUSTER and again.version_info != cds.version_info
        await c.request(typeurls.ENDPOINT, [MOCKB, MOCKC], version_info=eds.version_info)
        assignments = await c.recv()
        assert assignments.type_url == typeurls.ENDPOINT and assignments.version_info == eds.version_info
        assert sorted(ads_client.resource_names(assignments)) == [MOCKB, MOCKC]

    # A reconnect that holds what is served is sent nothing, endpoints included.
    async with _client(plane) as c:
        await c.request(typeurls.CLUSTER, version_info=again.version_info)
        await c.request(typeurls.ENDPOINT, [MOCKB, MOCKC], version_info=eds.version_info)
        await c.expect_nothing(0.3)


GATEWAY_POLICY = """\
apiVersion: meshplane.io/v2
gateways:
  - name: edge
    listeners: [{name: http, port: 8080, hostname: example.com}]
routes:
  - name: both
    parentRefs: [{name: edge}]
    rules:
      - matches: [{path: {type: PathPrefix, value: /b}}]
        backendRefs: [{name: mockb, port: 8000}]
      - matches: [{path: {type: PathPrefix, value: /c}}]
        backendRefs: [{name: mockc, port: 8000}]
"""


async def test_a_cluster_whose_service_went_is_removed_though_the_gateway_route_still_names_it(
    start_plane: Any, endpoints: Path, tmp_path: Path
) -> None:
    """A gateway's routes come from the policy: a route to a service that went away goes on naming its
    cluster. Waiting for the route to stop naming it before removing the cluster would wait for ever."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(GATEWAY_POLICY)
    plane = await start_plane(endpoint_files=(endpoints,), policy_file=policy)
    node = ads_client.node("gateway-1", region="r1", zone="z1", cluster="c1",
                           metadata={"role": "gateway", "gateway": "edge"})
    async with ads_client.AdsClient(f"127.0.0.1:{plane.ads_port}", node) as c:
        await c.request(typeurls.CLUSTER)
        cds = await c.recv()
        assert sorted(ads_client.resource_names(cds)) == [MOCKB, MOCKC]
        await c.request(typeurls.ENDPOINT, [MOCKB, MOCKC])
        await c.ack(cds)
        await c.ack(await c.recv())
        await c.request(typeurls.LISTENER)
        await c.ack(await c.recv())
        await c.request(typeurls.ROUTE, ["gateway|edge|8080"])
        await c.ack(await c.recv())

        doc = _doc()
        doc["services"] = [s for s in doc["services"] if s["name"] != "mockc"]
        write_yaml(endpoints, doc)
        removal = await c.recv()
        assert removal.type_url == typeurls.CLUSTER and ads_client.resource_names(removal) == [MOCKB]
        await c.ack(removal)

        await wait_for(lambda: [s.worst() for s in plane.streams] == [streams.Sync.SYNCED],
                       what="the gateway SYNCED once the cluster is removed")
