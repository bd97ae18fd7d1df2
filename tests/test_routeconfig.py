"""Route configurations as tables: Gateway API precedence whatever the file's order, matches, actions,
retries; backend clusters (subsets, active-standby) and their assignments."""

from __future__ import annotations

import random

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.retry.priority.previous_priorities.v3 import previous_priorities_config_pb2
from envoy.type.v3 import percent_pb2

from meshplane.discovery import model
from meshplane.policy import placement, routing, rules
from meshplane.xds import routeactions, routeconfig, translate

S = model.ServiceKey("default/s")


def _rule(*matches: routing.Match, to: str = "s") -> routing.Rule:
    return routing.Rule(matches=matches, backends=(routing.Backend(model.ServiceKey(f"default/{to}"), 80),))


def _prefix(value: str, **kw: object) -> routing.Match:
    return routing.Match(routing.PathMatch(routing.PathKind.PREFIX, value), **kw)  # type: ignore[arg-type]


def _header(name: str, value: str = "1") -> routing.ValueMatch:
    return routing.ValueMatch(name, routing.ValueKind.EXACT, value)


def test_precedence_is_gateway_apis_whatever_the_order_written() -> None:
    expected = [  # (route name, backend), in the order Envoy must try them
        ("z", routing.Match(routing.PathMatch(routing.PathKind.EXACT, "/a/b")), "exact"),
        ("z", routing.Match(routing.PathMatch(routing.PathKind.REGEX, "^/a/[0-9]+$")), "regex"),
        ("z", _prefix("/a/b/c"), "longest"),
        ("z", _prefix("/a/b", method="POST"), "method"),
        ("z", _prefix("/a/b", headers=(_header("x"), _header("y"))), "two-headers"),
        ("z", _prefix("/a/b", headers=(_header("x"),), query_params=(_header("q"), _header("r"))), "h1-q2"),
        ("z", _prefix("/a/b", headers=(_header("x"),), query_params=(_header("q"),)), "h1-q1"),
        ("a", _prefix("/a/b"), "tie-first-by-name"),
        ("z", _prefix("/a/b"), "tie-second-by-name"),
        ("z", _prefix("/"), "everything"),
    ]
    for seed in range(5):
        shuffled = list(expected)
        random.Random(seed).shuffle(shuffled)
        routes = [routing.Route(name, "default", (routing.ParentRef("Gateway", "edge"),), rules=(_rule(m, to=to),))
                  for name, m, to in shuffled]
        entries = routeconfig.route_entries(routes, routing.Retries())
        assert [e.route.cluster.rsplit("|", 1)[-1].split(".")[0] for e in entries] == [to for _, _, to in expected]


def test_matches_become_envoys() -> None:
    [exact, regex, segment, root] = routeconfig.route_entries(
        [routing.Route("r", "default", (), rules=(_rule(
            _prefix("/api/", headers=(routing.ValueMatch("x-v", routing.ValueKind.REGEX, "^v[0-9]$"),),
                    query_params=(_header("debug", "on"),), method="GET"),
            _prefix("/"),
            routing.Match(routing.PathMatch(routing.PathKind.EXACT, "/healthz")),
            routing.Match(routing.PathMatch(routing.PathKind.REGEX, "^/a.*")),
        ),))], routing.Retries())
    assert segment.match.path_separated_prefix == "/api"  # whole segments: not /apiary
    assert [(h.name, h.string_match.WhichOneof("match_pattern")) for h in segment.match.headers] == [
        ("x-v", "safe_regex"), (":method", "exact")]
    assert segment.match.query_parameters[0].string_match.exact == "on"
    assert root.match.prefix == "/" and exact.match.path == "/healthz" and regex.match.safe_regex.regex == "^/a.*"


def test_weights_retries_rewrites() -> None:
    rule = routing.Rule(
        backends=(routing.Backend(S, 80, 80, labels=(("version", "v1"),)), routing.Backend(S, 80, 20, labels=(
            ("version", "v2"),)), routing.Backend(S, 80, 0)),
        rewrite=routing.Rewrite(prefix="/"), matches=(_prefix("/old"),), timeout_ms=1500,
        retries=routing.Retries(attempts=1, per_try_timeout_ms=500, retry_on=("5xx",), status_codes=()),
    )
    [entry] = routeconfig.route_entries([routing.Route("r", "default", (), rules=(rule,))], routing.Retries())
    action = entry.route
    assert [(c.name, c.weight.value) for c in action.weighted_clusters.clusters] == [
        ("outbound|80|version=v1|s.default.svc.cluster.local", 80),
        ("outbound|80|version=v2|s.default.svc.cluster.local", 20)]  # a weight of 0 is left out
    assert action.timeout.ToMilliseconds() == 1500
    assert (action.retry_policy.retry_on, action.retry_policy.num_retries.value,
            action.retry_policy.per_try_timeout.ToMilliseconds()) == ("5xx", 1, 500)
    assert action.regex_rewrite.pattern.regex == "^(?:/old)/*" and action.regex_rewrite.substitution == "/"


def test_every_sidecar_route_retries_like_istio_on_another_host_and_priority() -> None:
    service = model.Service("s", "default", (model.ServicePort("http", 80),))
    config = routeconfig.sidecar_route_config("default", [service], rules.Policy())
    retry = config.virtual_hosts[0].routes[0].route.retry_policy
    assert retry.retry_on == "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
    assert (retry.num_retries.value, list(retry.retriable_status_codes)) == (2, [503])
    assert retry.retry_host_predicate[0].name == "envoy.retry_host_predicates.previous_hosts"
    assert retry.retry_priority.name == "envoy.retry_priorities.previous_priorities"
    off = routeconfig.sidecar_route_config("default", [service], rules.Policy(retries=routing.Retries(attempts=0)))
    assert not off.virtual_hosts[0].routes[0].route.HasField("retry_policy")


def _endpoint(cluster: str, zone: str, n: int, **labels: str) -> model.Endpoint:
    return model.Endpoint(address=f"10.0.0.{n}", ports=(("http", 8080),), locality=model.Locality("r1", zone, cluster),
                          labels=tuple(sorted(labels.items())))


def test_active_standby_puts_clusters_in_order_and_the_standby_stays_idle() -> None:
    endpoints = [_endpoint("c2", "b", 1), _endpoint("c1", "a", 2), _endpoint("c1", "a2", 3), _endpoint("c3", "c", 4)]
    backend = routing.Backend(S, 80, clusters=("c1", "c2"))
    placed = placement.place_backend(endpoints, backend, client=model.Locality("r9", "z", "c3"), client_labels={},
                                     settings=rules.LocalitySettings(), spread=routing.Spread.EVERYWHERE)
    assert [(p.priority, p.locality.cluster) for p in placed] == [(0, "c1"), (0, "c1"), (1, "c2")]  # not c3
    cla = translate.build_load_assignment("x", "http", placed, standby=True)
    assert cla.policy.overprovisioning_factor.value == translate.STANDBY_OVERPROVISIONING
    service = model.Service("s", "default", (model.ServicePort("http", 80),))
    od = rules.OutlierDetection(consecutive_5xx_errors=1, max_ejection_percent=10, min_health_percent=30)
    cluster = translate.build_cluster(service, service.ports[0], rules.ServicePolicy(outlier_detection=od),
                                      name=translate.backend_cluster_name(backend), standby=True)
    assert cluster.name == "outbound|80|cluster=c1>c2|s.default.svc.cluster.local"
    assert cluster.outlier_detection.max_ejection_percent.value == 100  # the active cluster can empty completely
    assert cluster.common_lb_config.healthy_panic_threshold.value == 0
    assert cluster.common_lb_config.update_merge_window.ToMilliseconds() == 0


def test_a_gateway_spreads_by_endpoint_count_unless_asked_for_nearest() -> None:
    endpoints = [_endpoint("c1", "a", 1), _endpoint("c1", "b", 2), _endpoint("c2", "c", 3, version="v2")]
    here = model.Locality("r1", "a", "c1")
    spread = placement.place_backend(endpoints, routing.Backend(S, 80), client=here, client_labels={},
                                     settings=rules.LocalitySettings(), spread=routing.Spread.EVERYWHERE)
    assert {p.priority for p in spread} == {0} and sum(len(p.endpoints) for p in spread) == 3
    nearest = placement.place_backend(endpoints, routing.Backend(S, 80, spread=routing.Spread.NEAREST), client=here,
                                      client_labels={}, settings=rules.LocalitySettings(),
                                      spread=routing.Spread.EVERYWHERE)
    assert [(p.priority, p.locality.zone) for p in nearest] == [(0, "a"), (1, "b"), (1, "c")]  # same region
    subset = placement.place_backend(endpoints, routing.Backend(S, 80, labels=(("version", "v2"),)), client=here,
                                     client_labels={}, settings=rules.LocalitySettings(),
                                     spread=routing.Spread.EVERYWHERE)
    assert [p.locality.cluster for p in subset] == ["c2"]
    pinned = placement.place_backend(endpoints, routing.Backend(S, 80, labels=(("topology.istio.io/cluster", "c1"),)),
                                     client=here, client_labels={}, settings=rules.LocalitySettings(),
                                     spread=routing.Spread.EVERYWHERE)
    assert {p.locality.cluster for p in pinned} == {"c1"}


# --- Gateway API filters, timeouts and retries (issue 18, item 14) --------------------------------

AT_EXAMPLE = routeactions.Listening("http", 8080, "example.com")


def _entry(rule: routing.Rule, where: routeactions.Listening = AT_EXAMPLE,
           retries: routing.Retries | None = None) -> route_components_pb2.Route:
    [entry] = routeconfig.route_entries([routing.Route("r", "default", (), rules=(rule,))],
                                        retries or routing.Retries(), where=where)
    return entry


def _entries(rule: routing.Rule, where: routeactions.Listening) -> list[route_components_pb2.Route]:
    return routeconfig.route_entries([routing.Route("r", "default", (), rules=(rule,))], routing.Retries(), where=where)


Location = tuple[str, str, int]
WILDCARD = routeactions.Listening("http", 8080, None)  # a wildcard host (or a sidecar's several names)
REDIRECTS: list[tuple[routing.Redirect, routeactions.Listening, list[tuple[bool, Location]]]] = [
    # redirect, where it came in -> per Envoy route: (only for a Host with a port?, the Location's
    # (scheme, host, port) as Envoy builds it; "" and 0: the request's, or none written)
    (routing.Redirect(scheme="https"), AT_EXAMPLE, [(False, ("https", "example.com", 0))]),  # 443: not written
    (routing.Redirect(hostname="b.example"), AT_EXAMPLE, [(False, ("", "b.example", 8080))]),  # the listener's
    (routing.Redirect(), routeactions.Listening("https", 443, "example.com"), [(False, ("", "example.com", 0))]),
    (routing.Redirect(port=80), AT_EXAMPLE, [(False, ("", "example.com", 0))]),
    (routing.Redirect(port=8443, scheme="https"), routeactions.Listening("http", 80, None),
     [(False, ("https", "", 8443))]),
    (routing.Redirect(), WILDCARD, [(False, ("", "", 8080))]),
    # The request's host and the scheme's own port: Envoy keeps a Host without a port as it is, and replaces
    # the port of one with a port only by writing one (`https://a.example.org:443/`, the same place).
    (routing.Redirect(scheme="https"), WILDCARD, [(True, ("https", "", 443)), (False, ("https", "", 0))]),
    (routing.Redirect(), routeactions.Listening("http", 80, None), [(True, ("", "", 80)), (False, ("", "", 0))]),
]


@pytest.mark.parametrize(("redirect", "where", "locations"), REDIRECTS)
def test_a_redirect_gets_gateway_apis_port(redirect: routing.Redirect, where: routeactions.Listening,
                                          locations: list[tuple[bool, Location]]) -> None:
    entries = _entries(routing.Rule(matches=(_prefix("/a"),), redirect=redirect), where)
    assert [(routeactions.HOST_WITH_PORT in e.match.headers,
             (e.redirect.scheme_redirect, e.redirect.host_redirect, e.redirect.port_redirect))
            for e in entries] == locations
    for entry in entries:
        assert entry.WhichOneof("action") == "redirect"
        assert entry.match.path_separated_prefix == "/a"
        assert entry.redirect.response_code == route_components_pb2.RedirectAction.FOUND  # Gateway API's default


def test_a_redirects_path_and_status() -> None:
    prefix = _entry(routing.Rule(matches=(_prefix("/old"),), redirect=routing.Redirect(prefix="/new", status_code=308)))
    assert prefix.redirect.prefix_rewrite == "/new"
    assert prefix.redirect.response_code == route_components_pb2.RedirectAction.PERMANENT_REDIRECT
    root = _entry(routing.Rule(matches=(_prefix("/old"),), redirect=routing.Redirect(prefix="/")))
    assert (root.redirect.regex_rewrite.pattern.regex, root.redirect.regex_rewrite.substitution) == ("^(?:/old)/*", "/")
    full = _entry(routing.Rule(redirect=routing.Redirect(full_path="/here", status_code=301)))
    assert full.redirect.path_redirect == "/here"
    assert full.redirect.response_code == route_components_pb2.RedirectAction.MOVED_PERMANENTLY


def test_response_headers_mirrors_and_the_rule_name() -> None:
    rule = _rule(_prefix("/a"))
    rule = routing.Rule(
        matches=rule.matches, backends=rule.backends, name="first",
        response_headers=routing.HeaderModifier(set=(("x-s", "1"),), add=(("x-a", "2"),), remove=("x-r",)),
        mirrors=(routing.Mirror(routing.Backend(model.ServiceKey("default/m"), 81)),
                 routing.Mirror(routing.Backend(model.ServiceKey("other/m"), 82), per_million=250_000)))
    entry = _entry(rule)
    assert entry.name == "default/r/first"
    assert [(h.header.key, h.header.value, h.append_action) for h in entry.response_headers_to_add] == [
        ("x-s", "1", base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD),
        ("x-a", "2", base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD)]
    assert list(entry.response_headers_to_remove) == ["x-r"]
    everything, quarter = entry.route.request_mirror_policies
    assert everything.cluster == "outbound|81||m.default.svc.cluster.local"
    assert not everything.HasField("runtime_fraction")
    assert quarter.cluster == "outbound|82||m.other.svc.cluster.local"
    fraction = quarter.runtime_fraction.default_value
    assert (fraction.numerator, fraction.denominator) == (250_000, percent_pb2.FractionalPercent.MILLION)


def test_a_backend_request_timeout_is_each_tries_or_without_retries_the_requests() -> None:
    rule = routing.Rule(matches=(_prefix("/a"),), backends=_rule().backends, timeout_ms=10_000,
                        backend_timeout_ms=300)
    tried = _entry(rule).route
    assert (tried.timeout.ToMilliseconds(), tried.retry_policy.per_try_timeout.ToMilliseconds()) == (10_000, 300)
    once = _entry(rule, retries=routing.Retries(attempts=0)).route
    assert once.timeout.ToMilliseconds() == 300 and not once.HasField("retry_policy")
    unbounded = _entry(routing.Rule(backends=_rule().backends, timeout_ms=0)).route
    assert unbounded.HasField("timeout") and unbounded.timeout.ToMilliseconds() == 0  # 0s: no timeout


ROUTE_TIMEOUTS = [  # rule's (request, backendRequest), retries -> Envoy's route timeout (None: unset, Envoy's 15 s)
    # Without `request`, the tries' timeouts and Envoy's longest waits between them (25 and 50 ms by default).
    ((None, 30_000), routing.Retries(), 90_075),
    ((None, 10_000), routing.Retries(attempts=3, backoff_ms=100), 40_700),  # waits of 100, 200, 400 ms
    ((None, 10_000), routing.Retries(attempts=10, backoff_ms=100), 110_000 + 100 + 200 + 400 + 800 + 6 * 1000),
    ((None, 4_000), routing.Retries(), None),  # 12.075 s of tries: Envoy's 15 s already fits them
    ((None, None), routing.Retries(per_try_timeout_ms=10_000), 30_075),  # Istio's perTryTimeout alike
    ((None, 0), routing.Retries(), 0),  # tries without a limit: the request has none either
    ((None, 0), routing.Retries(attempts=0), 0),
    ((None, None), routing.Retries(), None),
    ((10_000, 30_000), routing.Retries(), 10_000),  # the rule's own limit stands
    ((0, 30_000), routing.Retries(), 0),
    ((None, 30_000), routing.Retries(attempts=0), 30_000),  # one try: the whole request
    ((10_000, 300), routing.Retries(attempts=0), 300),
    ((10_000, 0), routing.Retries(attempts=0), 10_000),
]


@pytest.mark.parametrize(("timeouts", "retries", "expected"), ROUTE_TIMEOUTS)
def test_a_request_without_its_own_timeout_gets_one_that_fits_its_tries(
        timeouts: tuple[int | None, int | None], retries: routing.Retries, expected: int | None) -> None:
    request, backend = timeouts
    action = _entry(routing.Rule(backends=_rule().backends, timeout_ms=request, backend_timeout_ms=backend,
                                 retries=retries)).route
    assert (action.timeout.ToMilliseconds() if action.HasField("timeout") else None) == expected
    if retries.attempts and (backend or retries.per_try_timeout_ms):
        assert action.retry_policy.per_try_timeout.ToMilliseconds() == (backend or retries.per_try_timeout_ms)


def test_active_standby_rules_try_twice_per_priority_others_once() -> None:
    standby = _entry(routing.Rule(backends=(routing.Backend(S, 80, clusters=("c1", "c2")),))).route
    nearest = _entry(routing.Rule(backends=(routing.Backend(S, 80, clusters=("c1",)),))).route

    def frequency(action: route_components_pb2.RouteAction) -> int:
        config = previous_priorities_config_pb2.PreviousPrioritiesConfig()
        action.retry_policy.retry_priority.typed_config.Unpack(config)
        return config.update_frequency

    assert (frequency(standby), frequency(nearest)) == (2, 1)


def test_gateway_route_configurations_ignore_the_port_of_the_host_sidecars_do_not() -> None:
    gateway = routing.Gateway("edge", (routing.Listener("http", 8080, "HTTP", "example.com"),))
    assert routeconfig.gateway_route_config(gateway, 8080, rules.Policy(gateways=(gateway,))) \
        .ignore_port_in_host_matching
    service = model.Service("s", "default", (model.ServicePort("http", 80),))
    assert not routeconfig.sidecar_route_config("default", [service], rules.Policy()).ignore_port_in_host_matching
