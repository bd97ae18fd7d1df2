"""What grpcio's xDS client NACKs, and that meshplane's translation for gRPC clients avoids it.

Each case serves a real grpcio client a listener, route configuration, cluster and assignment from
a minimal fixed ADS server: first in the form Envoy takes and gRPC rejects (the NACK, with gRPC's
reason, is seen in its trace), then as meshplane's proxyless generator makes it (ACKed, and the call
succeeds). So each rule of the translation is checked against the client that imposes it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
import pytest
from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, message

from meshplane.demo import grpcecho
from meshplane.demo.grpcmesh import XdsClient, bootstrap
from meshplane.demo.ports import free_port
from meshplane.discovery import model
from meshplane.policy import rules, validate
from meshplane.xds import listeners, routeconfig, translate, typeurls
from meshplane.xds.generators import proxyless
from tests.conftest import wait_for

pytestmark = pytest.mark.slow

SERVICE = model.Service(name="echo", namespace="default",
                        ports=(model.ServicePort("grpc", 50051, model.Protocol.GRPC),))
PORT = SERVICE.ports[0]
CLUSTER = translate.cluster_name(SERVICE, PORT)
ROUTE = routeconfig.grpc_route_config_name(SERVICE, PORT)
LISTENER = "echo:50051"


class FixedAds:
    """A state-of-the-world ADS server that answers each type with the resources it was given."""

    def __init__(self, resources: dict[str, list[message.Message]]) -> None:
        self.resources = resources
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def _stream(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        sent = 0
        async for raw in requests:
            request = discovery_pb2.DiscoveryRequest.FromString(raw)
            if request.response_nonce:
                continue  # an ACK or a NACK: the client's trace says which
            sent += 1
            response = discovery_pb2.DiscoveryResponse(type_url=request.type_url, version_info="1", nonce=str(sent))
            for resource in self.resources.get(request.type_url, []):
                packed = any_pb2.Any()
                packed.Pack(resource)
                response.resources.append(packed)
            yield response.SerializeToString()

    async def __aenter__(self) -> FixedAds:
        self.server = grpc.aio.server()
        handler = grpc.stream_stream_rpc_method_handler(self._stream)
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "envoy.service.discovery.v3.AggregatedDiscoveryService", {"StreamAggregatedResources": handler}),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        await self.server.stop(grace=None)


def _endpoint(port: int) -> endpoint_components_pb2.LbEndpoint:
    return endpoint_components_pb2.LbEndpoint(endpoint=endpoint_components_pb2.Endpoint(address=address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port))))


def _group(zone: str, priority: int, *ports: int, weight: int = 1) -> endpoint_components_pb2.LocalityLbEndpoints:
    group = endpoint_components_pb2.LocalityLbEndpoints(
        locality=base_pb2.Locality(region="r1", zone=zone, sub_zone="c1"), priority=priority,
        lb_endpoints=[_endpoint(p) for p in ports])
    if weight:
        group.load_balancing_weight.value = weight
    return group


@dataclass(frozen=True)
class Case:
    """A resource set in Envoy's form (`bad`), what gRPC says of it, and meshplane's form of it."""

    bad: Callable[[int, int], dict[str, list[message.Message]]]
    reason: str  # part of gRPC's NACK message
    fixed: Callable[[dict[str, list[message.Message]]], dict[str, list[message.Message]]]


def _base(alive: int) -> dict[str, list[message.Message]]:
    policy = rules.Policy()
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=CLUSTER, endpoints=[_group("z1", 0, alive)])
    return {
        typeurls.LISTENER: [listeners.build_api_listener(name=LISTENER, route_name=ROUTE)],
        typeurls.ROUTE: [routeconfig.grpc_route_config(SERVICE, PORT, policy)],
        typeurls.CLUSTER: list(proxyless._clusters(SERVICE, policy, None).values()),
        typeurls.ENDPOINT: [cla],
    }


def _with_assignment(groups: Callable[[int, int], list[endpoint_components_pb2.LocalityLbEndpoints]]
                     ) -> Callable[[int, int], dict[str, list[message.Message]]]:
    def bad(alive: int, other: int) -> dict[str, list[message.Message]]:
        out = _base(alive)
        out[typeurls.ENDPOINT] = [endpoint_pb2.ClusterLoadAssignment(cluster_name=CLUSTER,
                                                                     endpoints=groups(alive, other))]
        return out
    return bad


def _fix_assignment(resources: dict[str, list[message.Message]]) -> dict[str, list[message.Message]]:
    cla = resources[typeurls.ENDPOINT][0]
    assert isinstance(cla, endpoint_pb2.ClusterLoadAssignment)
    return {**resources, typeurls.ENDPOINT: [proxyless.grpc_assignment(cla)]}


def _separated_prefix(alive: int, other: int) -> dict[str, list[message.Message]]:
    out = _base(alive)
    config = route_pb2.RouteConfiguration()
    config.CopyFrom(out[typeurls.ROUTE][0])
    config.virtual_hosts[0].routes[0].match.Clear()
    config.virtual_hosts[0].routes[0].match.path_separated_prefix = "/echo.Echo"
    out[typeurls.ROUTE] = [config]
    return out


def _policy_prefix(resources: dict[str, list[message.Message]]) -> dict[str, list[message.Message]]:
    """The same route as the policy writes it (`path: {value: /echo.Echo}`), as meshplane sends it to gRPC."""
    loaded = validate.load_policy_text(
        "apiVersion: meshplane.io/v2\nroutes:\n- name: echo\n  parentRefs: [{kind: Service, name: echo, port: 50051}]\n"
        "  rules:\n  - matches: [{path: {value: /echo.Echo}}]\n    backendRefs: [{name: echo, port: 50051}]\n",
        path="policy.yaml")
    assert loaded.policy is not None, loaded.errors
    return {**resources, typeurls.ROUTE: [routeconfig.grpc_route_config(SERVICE, PORT, loaded.policy)]}


CASES = {
    "path_separated_prefix": Case(_separated_prefix, "invalid path specifier", _policy_prefix),
    "priority gap": Case(_with_assignment(lambda a, o: [_group("z1", 0, a), _group("z2", 2, o)]),
                         "priority 2 >= number of localities", _fix_assignment),
    "locality twice in a priority": Case(_with_assignment(lambda a, o: [_group("z1", 0, a), _group("z1", 0, o)]),
                                         "duplicate locality", _fix_assignment),
    "address twice in a cluster": Case(_with_assignment(lambda a, o: [_group("z1", 0, a), _group("z2", 1, a)]),
                                       "duplicate endpoint address", _fix_assignment),
}


async def _run(resources: dict[str, list[message.Message]], replica_port: int) -> XdsClient:
    async with FixedAds(resources) as ads:
        boot = bootstrap(ads.port, node_id="grpc-nack", region="r1", zone="z1", cluster="c1")
        async with XdsClient(boot, f"xds:///{LISTENER}", rate=20) as c:
            start = time.monotonic()
            await wait_for(lambda: c.nacks() or c.ok_in({"z1"}, start, 3), timeout=20,
                           what="a NACK or calls that succeed")
            return c


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
async def test_grpc_nacks_the_envoy_form_and_acks_meshplanes(case: Case) -> None:
    replica = grpcecho.Replica("echo", "z1", free_port())
    await replica.start()
    try:
        other = free_port()
        bad = case.bad(replica.port, other)
        c = await _run(bad, replica.port)
        assert any(case.reason in line for line in c.nacks()), (c.nacks(), c.received())
        c = await _run(case.fixed(bad), replica.port)
        assert not c.nacks(), c.nacks()
        assert any(x.ok and x.zone == "z1" for x in c.calls), c.calls
    finally:
        await replica.stop()



REDIRECTING = """\
apiVersion: meshplane.io/v2
routes:
- name: echo
  parentRefs: [{kind: Service, name: echo, port: 50051}]
  rules:
  - matches: [{headers: [{name: x-moved, value: "yes"}]}]
    filters: [{type: RequestRedirect, requestRedirect: {hostname: other.example.com}}]
  - filters:
    - {type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-a, value: "1"}]}}
    - {type: RequestMirror, requestMirror: {backendRef: {name: echo, port: 50051}}}
    retry: {codes: [503], attempts: 2, backoff: 20ms}
    backendRefs: [{name: echo, port: 50051}]
"""


async def test_grpc_takes_gateway_api_filters_a_redirect_fails_its_calls_others_are_served() -> None:
    """A RequestRedirect stays a redirect for gRPC, which fails the calls it matches (UNAVAILABLE), as a
    proxy's redirect fails a gRPC call; the other filters are left out. Nothing is NACKed."""
    loaded = validate.load_policy_text(REDIRECTING, path="policy.yaml")
    assert loaded.policy is not None, loaded.errors
    replica = grpcecho.Replica("echo", "z1", free_port())
    await replica.start()
    try:
        resources = {**_base(replica.port),
                     typeurls.ROUTE: [routeconfig.grpc_route_config(SERVICE, PORT, loaded.policy)]}
        async with FixedAds(resources) as ads:
            boot = bootstrap(ads.port, node_id="grpc-filters", region="r1", zone="z1", cluster="c1")
            async with XdsClient(boot, f"xds:///{LISTENER}", rate=20) as served, \
                    XdsClient(boot, f"xds:///{LISTENER}", rate=20, headers=("x-moved=yes",)) as moved:
                start = time.monotonic()
                await wait_for(lambda: served.ok_in({"z1"}, start, 3) and len(moved.since(start)) >= 3,
                               timeout=20, what="calls answered")
                assert not served.nacks() and not moved.nacks(), (served.nacks(), moved.nacks())
                assert {(c.ok, c.code) for c in moved.since(start)[-3:]} == {(False, "UNAVAILABLE")}, moved.calls
    finally:
        await replica.stop()
