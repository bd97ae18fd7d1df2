"""What a proxyless gRPC client is sent, resource by resource (the translation rules of docs/grpc.md);
tests/test_grpc_nack_causes.py checks the same rules against grpcio itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import message

from meshplane.discovery import model
from meshplane.policy import rules, validate
from meshplane.xds import client as ads_client
from meshplane.xds import proxy, translate, typeurls
from meshplane.xds.generators import base, proxyless
from tests.conftest import write_yaml

ECHO = model.Service(
    name="echo", namespace="default",
    ports=(model.ServicePort("grpc", 50051, model.Protocol.GRPC), model.ServicePort("http", 8000)),
    endpoints=tuple(
        model.Endpoint(address=f"10.0.0.{i}", ports=(("grpc", 7000), ("http", 8080)),
                       locality=model.Locality("r1", zone, "c1"))
        for i, zone in enumerate(["z1", "z1", "z2"])),
)
SHOP = model.Service(name="cart", namespace="shop", ports=(model.ServicePort("grpc", 9000, model.Protocol.GRPC),))
SERVICES = {ECHO.key: ECHO, SHOP.key: SHOP}


def _key(namespace: str = "default", zone: str = "z1") -> proxy.ViewKey:
    return proxy.ViewKey(kind=proxy.Kind.GRPC, locality=model.Locality("r1", zone, "c1"), namespace=namespace)


def _generate(policy: rules.Policy, key: proxy.ViewKey | None = None) -> dict[str, dict[str, message.Message]]:
    return base.generate(proxyless.GENERATOR, SERVICES, policy, key or _key())


def _policy(text: str) -> rules.Policy:
    loaded = validate.load_policy_text(text, path="policy.yaml")
    assert loaded.policy is not None, loaded.errors
    return loaded.policy


def test_a_node_of_grpcs_own_client_is_a_grpc_client_unless_it_says_otherwise() -> None:
    for agent in ("gRPC C-core linux Python", "gRPC Go", "gRPC Java"):
        node = ads_client.node("n")
        node.user_agent_name = agent
        assert proxy.classify(node).kind == proxy.Kind.GRPC
    node = ads_client.node("n", metadata={"role": "sidecar"})
    node.user_agent_name = "gRPC Go"
    assert proxy.classify(node).kind == proxy.Kind.SIDECAR
    node = ads_client.node("n", metadata={"role": "grpc"})
    node.user_agent_name = "envoy"
    assert proxy.classify(node).kind == proxy.Kind.GRPC
    assert proxy.classify(ads_client.node("n")).kind == proxy.Kind.SIDECAR


def test_listeners_are_every_name_a_client_may_dial_short_names_in_its_own_namespace() -> None:
    lds = _generate(rules.Policy())[typeurls.LISTENER]
    assert sorted(lds) == sorted([
        "echo:50051", "echo.default:50051", "echo.default.svc:50051", "echo.default.svc.cluster.local:50051",
        "cart.shop:9000", "cart.shop.svc:9000", "cart.shop.svc.cluster.local:9000",
    ])  # not the HTTP port; `cart:9000` is not the default namespace's
    assert "cart:9000" in _generate(rules.Policy(), _key("shop"))[typeurls.LISTENER]
    listener = lds["echo:50051"]
    assert isinstance(listener, listener_pb2.Listener)
    assert not listener.HasField("address")
    manager = hcm_pb2.HttpConnectionManager()
    assert listener.api_listener.api_listener.Unpack(manager)
    assert manager.rds.route_config_name == "echo.default.svc.cluster.local:50051"
    assert manager.rds.config_source.HasField("ads")
    assert [f.name for f in manager.http_filters] == ["envoy.filters.http.router"]


def test_a_route_configuration_per_port_whose_domains_are_the_listener_names() -> None:
    rds = _generate(rules.Policy())[typeurls.ROUTE]
    config = rds["echo.default.svc.cluster.local:50051"]
    assert isinstance(config, route_pb2.RouteConfiguration)
    [host] = config.virtual_hosts
    assert sorted(host.domains) == sorted(["echo:50051", "echo.default:50051", "echo.default.svc:50051",
                                           "echo.default.svc.cluster.local:50051"])
    [route] = host.routes
    assert route.match.prefix == "/"
    assert route.route.cluster == "outbound|50051||echo.default.svc.cluster.local"


ROUTES = """\
apiVersion: meshplane.io/v2
defaults:
  retries: {attempts: 3, retryOn: [connect-failure, unavailable, internal, "503"]}
routes:
  - name: echo
    parentRefs: [{kind: Service, name: echo, port: 50051}]
    rules:
      - matches: [{path: {value: /echo.Echo}, headers: [{name: canary, value: "true"}]}]
        backendRefs: [{name: echo, port: 50051, labels: {version: v2}}]
        timeouts: {request: 2s}
      - matches: [{path: {type: Exact, value: /echo.Echo/Call}}]
        backendRefs:
          - {name: echo, port: 50051, weight: 90}
          - {name: echo, port: 50051, labels: {version: v2}, weight: 10}
      - matches: [{path: {type: RegularExpression, value: "/echo\\\\..*"}}]
        backendRefs: [{name: echo, port: 50051}]
      - matches: [{path: {value: /q}, queryParams: [{name: a, value: b}]}, {path: {value: /m}, method: GET}]
        backendRefs: [{name: echo, port: 50051}]
"""


def test_policy_routes_become_what_grpc_matches_with_the_same_meaning() -> None:
    config = _generate(_policy(ROUTES))[typeurls.ROUTE]["echo.default.svc.cluster.local:50051"]
    assert isinstance(config, route_pb2.RouteConfiguration)
    routes = config.virtual_hosts[0].routes
    specifiers = [r.match.WhichOneof("path_specifier") for r in routes]
    assert "path_separated_prefix" not in specifiers  # gRPC NACKs it
    # Exact first, then the regex, then the prefix as two routes: the path itself and what is under it.
    assert [(s, getattr(r.match, s) if s != "safe_regex" else r.match.safe_regex.regex)
            for s, r in zip(specifiers, routes, strict=True)] == [
        ("path", "/echo.Echo/Call"), ("safe_regex", "/echo\\..*"), ("path", "/echo.Echo"), ("prefix", "/echo.Echo/")]
    # A query parameter or a GET: no gRPC call can match them, so they are left out.
    for r in routes[2:]:
        assert [(h.name, h.string_match.exact) for h in r.match.headers] == [("canary", "true")]
        assert r.route.cluster == "outbound|50051|version=v2|echo.default.svc.cluster.local"
        assert r.route.max_stream_duration.max_stream_duration.seconds == 2
    weights = [(c.name, c.weight.value) for c in routes[0].route.weighted_clusters.clusters]
    assert weights == [("outbound|50051||echo.default.svc.cluster.local", 90),
                       ("outbound|50051|version=v2|echo.default.svc.cluster.local", 10)]
    # Retries on the gRPC status codes only; no host or priority predicates (gRPC has none).
    policy = routes[0].route.retry_policy
    assert policy.retry_on == "unavailable,internal" and policy.num_retries.value == 3
    assert not policy.retry_host_predicate and not policy.HasField("retry_priority")


def test_no_retry_policy_when_no_condition_is_a_grpc_status() -> None:
    policy = _policy(ROUTES.replace("[connect-failure, unavailable, internal, \"503\"]", "[connect-failure]"))
    config = _generate(policy)[typeurls.ROUTE]["echo.default.svc.cluster.local:50051"]
    assert isinstance(config, route_pb2.RouteConfiguration)
    assert not any(r.route.HasField("retry_policy") for r in config.virtual_hosts[0].routes)


FILTERED = """\
apiVersion: meshplane.io/v2
routes:
  - name: echo
    parentRefs: [{kind: Service, name: echo, port: 50051}]
    rules:
      - matches: [{path: {type: Exact, value: /echo.Echo/Old}}]
        filters: [{type: RequestRedirect, requestRedirect: {hostname: other.example.com}}]
      - matches: [{path: {type: Exact, value: /echo.Echo/Call}}]
        filters:
          - {type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-a, value: "1"}]}}
          - {type: RequestMirror, requestMirror: {backendRef: {name: echo, port: 50051}}}
        retry: {codes: [503], attempts: 3, backoff: 50ms}
        timeouts: {request: 5s, backendRequest: 1s}
        backendRefs: [{name: echo, port: 50051}]
      - matches: [{path: {type: Exact, value: /echo.Echo/Once}}]
        retries: {attempts: 0}
        timeouts: {request: 5s, backendRequest: 1s}
        backendRefs: [{name: echo, port: 50051}]
"""


def test_gateway_api_filters_timeouts_and_retries_become_what_grpc_does_with_the_same_meaning() -> None:
    config = _generate(_policy(FILTERED))[typeurls.ROUTE]["echo.default.svc.cluster.local:50051"]
    assert isinstance(config, route_pb2.RouteConfiguration)
    redirected, call, once = config.virtual_hosts[0].routes
    # A redirect stays one: gRPC fails the calls it matches (UNAVAILABLE), as through a proxy.
    assert redirected.WhichOneof("action") == "redirect"
    # Header changes and mirrors are not applied: gRPC has neither.
    assert not call.response_headers_to_add and not call.route.request_mirror_policies
    # GEP-1731: of its conditions gRPC keeps the status codes it knows, and the back-off (gRFC A44).
    policy = call.route.retry_policy
    assert (policy.retry_on, policy.num_retries.value) == ("unavailable,cancelled", 3)
    assert policy.retry_back_off.base_interval.ToMilliseconds() == 50
    # gRPC has no timeout per try: the call's deadline is the request's, or without retries the backend's.
    assert call.route.max_stream_duration.max_stream_duration.seconds == 5
    assert once.route.max_stream_duration.max_stream_duration.seconds == 1


def _cluster(policy: rules.Policy) -> cluster_pb2.Cluster:
    cluster = _generate(policy)[typeurls.CLUSTER]["outbound|50051||echo.default.svc.cluster.local"]
    assert isinstance(cluster, cluster_pb2.Cluster)
    return cluster


def test_outlier_detection_is_failure_percentage_ejection_for_grpc() -> None:
    od = rules.OutlierDetection(consecutive_5xx_errors=3, consecutive_local_origin_failures=1,
                                split_external_local_origin_errors=True, interval_ms=1000,
                                base_ejection_time_ms=30_000, max_ejection_percent=100)
    cluster = _cluster(rules.Policy(defaults=rules.ServicePolicy(outlier_detection=od)))
    assert cluster.type == cluster_pb2.Cluster.EDS and cluster.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN
    assert cluster.eds_cluster_config.eds_config.HasField("ads")
    out = cluster.outlier_detection
    assert out.enforcing_failure_percentage.value == 100
    assert out.failure_percentage_threshold.value == proxyless.FAILURE_PERCENTAGE_THRESHOLD
    assert out.failure_percentage_minimum_hosts.value == 1
    assert out.failure_percentage_request_volume.value == 1  # the smallest count: consecutive local-origin 1
    assert out.enforcing_success_rate.value == 0
    assert (out.interval.seconds, out.base_ejection_time.seconds, out.max_ejection_percent.value) == (1, 30, 100)
    assert not out.HasField("consecutive_5xx") and not out.split_external_local_origin_errors
    # Detectors turned off (0) stay off.
    off = _cluster(rules.Policy(defaults=rules.ServicePolicy(
        outlier_detection=rules.OutlierDetection(consecutive_5xx_errors=0))))
    assert off.outlier_detection.enforcing_failure_percentage.value == 0
    assert not _cluster(rules.Policy()).HasField("outlier_detection")


def test_only_grpc_ports_get_clusters_and_assignments() -> None:
    built = _generate(rules.Policy())
    assert sorted(built[typeurls.CLUSTER]) == sorted(built[typeurls.ENDPOINT]) == [
        "outbound|50051||echo.default.svc.cluster.local", "outbound|9000||cart.shop.svc.cluster.local"]


def _group(cla: Any, zone: str, priority: int, *addresses: str, weight: int = 1) -> None:
    group = cla.endpoints.add(locality=base_pb2.Locality(region="r1", zone=zone, sub_zone="c1"), priority=priority)
    group.load_balancing_weight.value = weight
    for address in addresses:
        group.lb_endpoints.add().endpoint.address.socket_address.address = address


def test_an_assignment_is_made_into_what_grpc_accepts() -> None:
    cla = translate.build_load_assignment("c", "grpc", ())
    _group(cla, "z1", 0, "10.0.0.1")
    _group(cla, "z1", 0, "10.0.0.2")        # the same locality twice in a priority: merged
    _group(cla, "z2", 2, "10.0.0.1", "10.0.0.3")  # a gap (no priority 1); an address seen nearer: dropped
    _group(cla, "z3", 3, weight=0)          # no endpoint: left out
    out = proxyless.grpc_assignment(cla)
    got = [(g.locality.zone, g.priority, g.load_balancing_weight.value,
            [e.endpoint.address.socket_address.address for e in g.lb_endpoints]) for g in out.endpoints]
    assert got == [("z1", 0, 1, ["10.0.0.1", "10.0.0.2"]), ("z2", 1, 1, ["10.0.0.3"])]


def test_assignments_are_nearest_first_as_a_sidecars() -> None:
    eds = _generate(rules.Policy(), _key(zone="z2"))[typeurls.ENDPOINT]
    cla = eds["outbound|50051||echo.default.svc.cluster.local"]
    assert [(g.locality.zone, g.priority) for g in cla.endpoints] == [("z2", 0), ("z1", 1)]  # type: ignore[attr-defined]


async def test_names_not_served_are_answered_at_once_as_not_found(start_plane: Any, tmp_path: Path) -> None:
    endpoints = write_yaml(tmp_path / "c1.yaml", {"cluster": "c1", "region": "r1", "services": [
        {"name": "echo", "ports": [{"name": "grpc", "port": 50051, "protocol": "GRPC"}],
         "endpoints": [{"address": "127.0.0.1", "port": 7000, "zone": "z1"}]}]})
    plane = await start_plane(endpoint_files=(endpoints,))
    node = ads_client.node("grpc-1", region="r1", zone="z1", cluster="c1", metadata={"role": "grpc"})
    async with ads_client.AdsClient(f"127.0.0.1:{plane.ads_port}", node) as c:
        await c.request(typeurls.LISTENER, ["echo:50051", "nope:1"])
        first = await c.recv()
        assert ads_client.resource_names(first) == ["echo:50051"]
        assert [(e.resource_name.name, e.error_detail.code) for e in first.resource_errors] == [("nope:1", 5)]
        assert "meshplane serves no Listener 'nope:1'" in first.resource_errors[0].error_detail.message
        await c.ack(first, names=["echo:50051", "nope:1"])
        await c.expect_nothing(0.2)  # the ACK changes nothing
        # Asking for one more missing name is answered too (nothing else changed).
        await c.request(typeurls.LISTENER, ["echo:50051", "nope:1", "nope:2"])
        second = await c.recv()
        assert [e.resource_name.name for e in second.resource_errors] == ["nope:1", "nope:2"]
        assert second.version_info == first.version_info  # what it holds is the same

