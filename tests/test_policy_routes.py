"""Policy v2: gateways, routes and retries, validated with file:line: field: reason, and what they resolve to."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from meshplane.discovery import model
from meshplane.policy import routecheck, routing, rules, validate

HEAD = "apiVersion: meshplane.io/v2\n"
GATEWAY = """\
gateways:
  - name: edge
    listeners:
      - {name: http, port: 8080, hostname: example.com}
"""


def load(text: str, *, known: routecheck.Known | None = None, tmp: Path | None = None) -> validate.LoadResult:
    path = str((tmp or Path("/nonexistent")) / "policy.yaml")
    return validate.load_policy_text(textwrap.dedent(text), path=path, known=known)


def problems(result: validate.LoadResult) -> list[str]:
    return [f"{p.line}: {p.field}: {p.reason}" for p in (*result.errors, *result.warnings)]


def route(rules: str, parent: str = "{name: edge}", extra: str = "") -> str:
    return HEAD + GATEWAY + f"""\
routes:
  - name: r
    parentRefs: [{parent}]
{extra}    rules:
{textwrap.indent(textwrap.dedent(rules), "      ")}"""


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param(route("- matches: [{path: {type: RegularExpression, value: 'a(?=b)'}}]\n"
                       "  backendRefs: [{name: s, port: 80}]\n"),
                 "10: routes[0].rules[0].matches[0].path.value: 'a(?=b)' is not a valid RE2 regular expression: "
                 "invalid perl operator: (?=", id="regex-lookahead"),
    pytest.param(route("- matches: [{headers: [{name: x, type: RegularExpression, value: '(a)\\1'}]}]\n"
                       "  backendRefs: [{name: s, port: 80}]\n"),
                 "10: routes[0].rules[0].matches[0].headers[0].value: '(a)\\\\1' is not a valid RE2 regular "
                 "expression: invalid escape sequence: \\1", id="regex-backreference"),
    pytest.param(route("- matches: [{path: {type: RegularExpression, value: '^/api/v[0-9]+/(users|items)/[a-z0-9-]"
                       "{1,64}$'}}]\n  backendRefs: [{name: s, port: 80}]\n"),
                 "10: routes[0].rules[0].matches[0].path.value: '^/api/v[0-9]+/(users|items)/[a-z0-9-]{1,64}$' "
                 "compiles to an RE2 program of size 275; Envoy rejects more than 100", id="regex-too-big"),
    pytest.param(route("- backendRefs: [{name: s, port: 80, weight: 0}, {name: t, port: 80, weight: 0}]\n"),
                 "10: routes[0].rules[0].backendRefs: every weight is 0", id="weights-all-zero"),
    pytest.param(route("- backendRefs: [{name: s, port: 80}]\n", parent="{name: edgy}"),
                 "8: routes[0].parentRefs[0].name: no gateway 'edgy' in this policy (gateways: edge)",
                 id="unknown-gateway"),
    pytest.param(route("- backendRefs: [{name: s, port: 80}]\n", parent="{name: edge, sectionName: https}"),
                 "8: routes[0].parentRefs[0].sectionName: gateway 'edge' has no listener 'https' "
                 "(listeners: http)", id="unknown-listener"),
    pytest.param(route("- backendRefs: [{name: s, port: 80, clusters: [c1, c1]}]\n"),
                 "10: routes[0].rules[0].backendRefs[0].clusters: a cluster is listed twice", id="cluster-twice"),
    pytest.param(route("- matches: [{path: {type: Exact, value: /a}}]\n"
                       "  filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, "
                       "replacePrefixMatch: /b}}}]\n  backendRefs: [{name: s, port: 80}]\n"),
                 "11: routes[0].rules[0].filters[0].urlRewrite.path: ReplacePrefixMatch needs every match of the "
                 "rule to be a PathPrefix match", id="prefix-rewrite-needs-prefix"),
    pytest.param(route("- matches: [{path: {type: Exact, value: a}}]\n  backendRefs: [{name: s, port: 80}]\n"),
                 "10: routes[0].rules[0].matches[0].path.value: 'a': a path starts with '/'", id="path-slash"),
    pytest.param(HEAD + "gateways:\n  - name: edge\n    listeners:\n      - {name: a, port: 80}\n"
                 "      - {name: b, port: 80}\n",
                 "6: gateways[0].listeners[1]: port 80 and host '*' are already claimed by "
                 "gateways[0].listeners[0] (edge/a)", id="same-port-and-host"),
    pytest.param(HEAD + "gateways:\n  - name: a\n    listeners: [{name: x, port: 80, hostname: example.com}]\n"
                 "  - name: b\n    listeners: [{name: x, port: 80, hostname: example.com}]\n",
                 "6: gateways[1].listeners[0]: port 80 and host 'example.com' are already claimed by "
                 "gateways[0].listeners[0] (a/x)", id="two-gateways-one-port-and-host"),
    pytest.param(HEAD + "gateways:\n  - name: a\n    listeners:\n      - {name: x, port: 80, hostname: a.com}\n"
                 "      - {name: y, port: 80, hostname: b.com, protocol: HTTPS, tls: {certificateFile: c, "
                 "keyFile: k}}\n",
                 "6: gateways[0].listeners[1].protocol: port 80 is HTTP in gateways[0].listeners[0] (a/x): "
                 "one port has one protocol", id="one-protocol-per-port"),
    pytest.param(HEAD + "gateways:\n  - name: a\n    listeners: [{name: x, port: 443, protocol: HTTPS}]\n",
                 "4: gateways[0].listeners[0]: an HTTPS listener needs tls", id="https-without-tls"),
    pytest.param(HEAD + "gateways:\n  - name: a\n    listeners: [{name: x, port: 443, protocol: HTTPS, "
                 "tls: {certificateFile: none.crt, keyFile: none.key}}]\n",
                 "4: gateways[0].listeners[0].tls.certificateFile: cannot read /nonexistent/none.crt",
                 id="certificate-missing"),
    pytest.param(HEAD + GATEWAY + "  - name: edge\n    listeners: [{name: y, port: 81}]\n",
                 "6: gateways[1].name: duplicate gateway 'edge'", id="duplicate-gateway"),
    pytest.param(route("- backendRefs: [{name: s, port: 80}]\n") + "  - name: r\n    parentRefs: [{name: edge}]\n"
                 "    rules: [{backendRefs: [{name: s, port: 80}]}]\n",
                 "11: routes[1].name: duplicate route default/r (first defined as routes[0])", id="duplicate-route"),
    pytest.param(route("- backendRefs: [{name: s, port: 70000}]\n"),
                 "10: routes[0].rules[0].backendRefs[0].port: 70000 is not a port number (1-65535)",
                 id="port-range"),
    pytest.param(route("- backendRefs: [{name: s, port: 80}]\n", extra="    hostnames: [Example.com]\n"),
                 "9: routes[0].hostnames[0]: 'Example.com' is not a hostname", id="hostname-case"),
    pytest.param(route("- filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: ':path', "
                       "value: /}]}}]\n  backendRefs: [{name: s, port: 80}]\n"),
                 "10: routes[0].rules[0].filters[0].requestHeaderModifier.set[0].name: ':path' is not an HTTP "
                 "header name", id="pseudo-header"),
    pytest.param(HEAD + "defaults:\n  retries: {attempts: 11}\n",
                 "3: defaults.retries.attempts: 11 retries: must be from 0 to 10", id="retries-range"),
    pytest.param("apiVersion: meshplane.io/v1\ndefaults:\n  retries: {attempts: 1}\n",
                 "3: defaults.retries: retries need apiVersion: meshplane.io/v2", id="v1-retries"),
])
def test_rejected(text: str, expected: str) -> None:
    result = load(text)
    assert result.policy is None
    assert any(p.startswith(expected) for p in problems(result)), problems(result)


def test_references_unknown_to_discovery_are_warnings() -> None:
    known = routecheck.Known(services={model.ServiceKey("default/s"): frozenset({80})}, clusters=frozenset({"c1"}))
    result = load(route("- backendRefs: [{name: s, port: 81}, {name: t, port: 80}, {name: s, port: 80, "
                        "clusters: [c1, c2]}]\n") + "defaults: {outlierDetection: {consecutive5xxErrors: 1}}\n",
                  known=known)
    assert result.policy is not None and result.errors == ()
    assert problems(result) == [
        "10: routes[0].rules[0].backendRefs[0].port: service default/s has no port 81 (ports: 80)",
        "10: routes[0].rules[0].backendRefs[1].name: no source knows service default/t yet",
        "10: routes[0].rules[0].backendRefs[2].clusters[1]: no source knows cluster 'c2' yet (known: c1)",
    ]


def test_a_route_resolves_to_what_the_generators_read() -> None:
    result = load(HEAD + GATEWAY + textwrap.dedent("""\
        defaults:
          retries: {attempts: 3, perTryTimeout: 2s, retryOn: [connect-failure, "503", "504"]}
        routes:
          - name: r
            namespace: shop
            parentRefs: [{name: edge}, {kind: Service, name: cart, port: 8000}]
            hostnames: [example.com]
            rules:
              - matches: [{path: {value: /a}, headers: [{name: X-User, value: me}], method: POST}]
                filters:
                  - {type: RequestHeaderModifier, requestHeaderModifier: {remove: [x-debug]}}
                backendRefs:
                  - {name: cart, port: 8000, weight: 3, clusters: [c1, c2]}
                  - {name: cart, namespace: other, port: 9000, labels: {version: v2}, spread: nearest}
                timeouts: {request: 10s}
        """))
    assert result.errors == (), result.errors
    policy = result.policy
    assert policy is not None
    assert policy.retries == routing.Retries(3, 2000, ("connect-failure", "retriable-status-codes"), (503, 504))
    [r] = policy.routes
    assert r.key == "shop/r" and r.hostnames == ("example.com",)
    assert r.parents == (routing.ParentRef("Gateway", "edge", "shop"), routing.ParentRef("Service", "cart", "shop",
                                                                                         port=8000))
    [rule] = r.rules
    assert rule.matches == (routing.Match(routing.PathMatch(routing.PathKind.PREFIX, "/a"),
                                          (routing.ValueMatch("x-user", routing.ValueKind.EXACT, "me"),), (), "POST"),)
    assert rule.headers == routing.HeaderModifier(remove=("x-debug",))
    assert rule.timeout_ms == 10_000 and rule.retries is None
    standby, subset = rule.backends
    assert (standby.service, standby.weight, standby.clusters) == ("shop/cart", 3, ("c1", "c2"))
    assert standby.subset == "cluster=c1>c2"
    assert (subset.service, subset.labels, subset.spread) == ("other/cart", (("version", "v2"),),
                                                              routing.Spread.NEAREST)
    assert subset.subset == "version=v2,lb=nearest"
    assert policy.gateway_routes("edge") == (r,) and policy.mesh_routes(model.ServiceKey("shop/cart")) == (r,)
    assert policy.backends("edge", model.ServiceKey("shop/cart")) == {standby.selects()}
    assert policy.backends(routing.MESH, model.ServiceKey("other/cart")) == {subset.selects()}


# --- active-standby needs outlier detection (issue 18, item 11) ---------------------------------

STANDBY = "- backendRefs: [{name: s, port: 80, clusters: [cluster-1, cluster-2]}]\n"


def test_active_standby_without_outlier_detection_warns_but_applies() -> None:
    result = load(route(STANDBY))
    assert result.errors == () and result.policy is not None
    assert [str(w) for w in result.warnings] == [
        "/nonexistent/policy.yaml:10: routes[0].rules[0].backendRefs[0].clusters: active-standby needs outlier "
        "detection (service default/s has none): an endpoint of cluster-1 that refuses connections is never "
        "ejected, so every request that meets it fails there first and is retried in cluster-2, and cluster-1 "
        "never empties; set outlierDetection in defaults or on the service"]


def test_active_standby_whose_outlier_detection_ejects_nothing_warns() -> None:
    services = "services:\n  - name: s\n    outlierDetection: {consecutive5xxErrors: 0}\n"
    result = load(route(STANDBY) + services)
    assert [(w.line, w.field) for w in result.warnings] == [(10, "routes[0].rules[0].backendRefs[0].clusters")]
    assert "the outlierDetection in effect for default/s ejects nothing" in result.warnings[0].reason


@pytest.mark.parametrize("extra", [
    # The defaults' outlier detection, or the service's own; maxEjectionPercent does not matter here:
    # an active-standby cluster may always eject all of its endpoints.
    pytest.param("defaults:\n  outlierDetection: {consecutive5xxErrors: 1}\n", id="defaults"),
    pytest.param("services:\n  - name: s\n    outlierDetection: {consecutive5xxErrors: 1, maxEjectionPercent: 0}\n",
                 id="service"),
])
def test_active_standby_with_outlier_detection_gives_no_warning(extra: str) -> None:
    result = load(route(STANDBY) + extra)
    assert result.errors == () and result.warnings == (), problems(result)


def test_one_cluster_pinned_is_not_active_standby_and_gives_no_warning() -> None:
    result = load(route("- backendRefs: [{name: s, port: 80, clusters: [cluster-2]}]\n"))
    assert result.errors == () and result.warnings == (), problems(result)


OUTLIER_DETECTION = "defaults:\n  outlierDetection: {consecutive5xxErrors: 1}\n"


@pytest.mark.parametrize(("retries", "where"), [
    pytest.param("  retry: {attempts: 1}\n", (11, "routes[0].rules[0].retry.attempts"), id="gateway-api-retry"),
    pytest.param("  retries: {attempts: 1}\n", (11, "routes[0].rules[0].retries.attempts"), id="istio-retries"),
])
def test_an_active_standby_rule_with_one_retry_warns_that_it_never_reaches_the_next_cluster(
        retries: str, where: tuple[int, str]) -> None:
    result = load(route(STANDBY + retries) + OUTLIER_DETECTION)
    assert result.errors == () and result.policy is not None
    assert [(w.line, w.field, w.reason) for w in result.warnings] == [(*where, (
        "1 retry stays in cluster-1: an active-standby rule retries in the next cluster only from its second "
        "retry, so when cluster-1 breaks at once its requests fail, until outlier detection ejects its endpoints, "
        "instead of being retried in cluster-2; give attempts: 2 or more"))]


def test_one_retry_from_the_defaults_warns_on_each_active_standby_rule_it_applies_to() -> None:
    defaults = "defaults:\n  outlierDetection: {consecutive5xxErrors: 1}\n  retries: {attempts: 1}\n"
    result = load(route(STANDBY + "- backendRefs: [{name: s, port: 80}]\n" + STANDBY + "  retry: {attempts: 2}\n")
                  + defaults)
    assert [(w.line, w.field) for w in result.warnings] == [(10, "routes[0].rules[0].backendRefs[0].clusters")]
    assert result.warnings[0].reason.startswith("1 retry (defaults.retries, line 16) stays in cluster-1: ")


@pytest.mark.parametrize("retries", ["", "  retry: {attempts: 2}\n", "  retries: {attempts: 0}\n"])
def test_an_active_standby_rule_with_two_retries_or_none_gives_no_retry_warning(retries: str) -> None:
    result = load(route(STANDBY + retries) + OUTLIER_DETECTION)
    assert result.errors == () and result.warnings == (), problems(result)


# --- the Gateway API fields users bring (issue 18, item 14) ----------------------------------------

ALL_FIELDS = """\
- name: first
  matches: [{path: {value: /a}}]
  filters:
    - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-a, value: "1"}]}}
    - {type: ResponseHeaderModifier, responseHeaderModifier: {add: [{name: x-b, value: "2"}], remove: [server]}}
    - {type: RequestMirror, requestMirror: {backendRef: {name: m, port: 80}, percent: 25}}
    - {type: RequestMirror, requestMirror: {backendRef: {group: "", kind: Service, name: m2, namespace: o, port: 81},
                                           fraction: {numerator: 1, denominator: 3}}}
  backendRefs: [{group: "", kind: Service, name: s, port: 80}]
  timeouts: {request: 10s, backendRequest: 2s}
  retry: {codes: [500, 502], attempts: 3, backoff: 100ms}
- matches: [{path: {value: /old}}]
  filters:
    - type: RequestRedirect
      requestRedirect: {scheme: https, hostname: b.example.com, port: 8443, statusCode: 301,
                        path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}
- backendRefs: [{name: s, port: 80}]
  timeouts: {request: 0s}
"""


def test_gateway_api_fields_resolve_to_what_the_generators_read() -> None:
    result = load(route(ALL_FIELDS, parent="{group: gateway.networking.k8s.io, kind: Gateway, name: edge}"))
    assert result.errors == () and result.warnings == (), problems(result)
    assert result.policy is not None
    [r] = result.policy.routes
    first, redirect, unbounded = r.rules
    assert first.name == "first"
    assert first.headers == routing.HeaderModifier(set=(("x-a", "1"),))
    assert first.response_headers == routing.HeaderModifier(add=(("x-b", "2"),), remove=("server",))
    assert first.mirrors == (routing.Mirror(routing.Backend(model.ServiceKey("default/m"), 80), 250_000),
                             routing.Mirror(routing.Backend(model.ServiceKey("o/m2"), 81), 333_333))
    assert (first.timeout_ms, first.backend_timeout_ms) == (10_000, 2_000)
    assert first.retries == routing.Retries(
        attempts=3, retry_on=(*routing.GATEWAY_API_RETRY_ON, "retriable-status-codes"), status_codes=(500, 502),
        backoff_ms=100)
    assert redirect.backends == () and redirect.redirect == routing.Redirect(
        scheme="https", hostname="b.example.com", port=8443, prefix="/new", status_code=301)
    assert unbounded.timeout_ms == 0
    # The mirrors' services get their clusters at the gateway, as backends do.
    assert policy_backends(result.policy, "default/m") == {routing.Backend(model.ServiceKey("default/m"), 80)}


def policy_backends(policy: rules.Policy, key: str) -> frozenset[routing.Backend]:
    return policy.backends("edge", model.ServiceKey(key))


def _filter(text: str, backends: str = "  backendRefs: [{name: s, port: 80}]\n") -> str:
    return route(f"- matches: [{{path: {{value: /a}}}}]\n  filters: [{text}]\n" + backends)


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param(_filter("{type: CORS, cors: {allowOrigins: ['*']}}"),
                 "11: routes[0].rules[0].filters[0].type: CORS is a Gateway API HTTPRoute filter meshplane does not "
                 "support (supported: RequestHeaderModifier, ResponseHeaderModifier, RequestMirror, "
                 "RequestRedirect, URLRewrite)", id="cors"),
    pytest.param(_filter("{type: ExtensionRef, extensionRef: {group: x, kind: y, name: z}}"),
                 "11: routes[0].rules[0].filters[0].extensionRef: Gateway API's ExtensionRef filter is not "
                 "supported", id="extension-ref"),
    pytest.param(_filter("{type: ResponseHeaderModifer}"),
                 "11: routes[0].rules[0].filters[0].type: unknown filter type 'ResponseHeaderModifer'; did you "
                 "mean 'ResponseHeaderModifier'?", id="filter-typo"),
    pytest.param(route("- backendRefs: [{name: s, port: 80}]\n  sessionPersistence: {sessionName: x}\n"),
                 "11: routes[0].rules[0].sessionPersistence: Gateway API's sessionPersistence (experimental) is "
                 "not supported", id="session-persistence"),
    pytest.param(route("- backendRefs: [{name: s, port: 80, filters: []}]\n"),
                 "10: routes[0].rules[0].backendRefs[0].filters: per-backend filters (Gateway API "
                 "HTTPBackendRef.filters) are not supported: put the filters on the rule", id="backend-filters"),
    pytest.param(route("- backendRefs: [{name: s, port: 80, kind: ServiceImport}]\n"),
                 "10: routes[0].rules[0].backendRefs[0].kind: 'ServiceImport': meshplane sends requests to "
                 "Kubernetes Services only", id="backend-kind"),
    pytest.param(route("- backendRefs: [{name: s, port: 80}]\n", parent="{group: '', name: edge}"),
                 "8: routes[0].parentRefs[0].group: a Gateway parent's group is 'gateway.networking.k8s.io', "
                 "not ''", id="parent-group"),
    pytest.param(_filter("{type: ResponseHeaderModifier, requestHeaderModifier: {remove: [a]}}"),
                 "11: routes[0].rules[0].filters[0]: type ResponseHeaderModifier needs responseHeaderModifier",
                 id="filter-needs-its-field"),
    pytest.param(_filter("{type: RequestRedirect, requestRedirect: {}, urlRewrite: {hostname: a.com}}"),
                 "11: routes[0].rules[0].filters[0].urlRewrite: urlRewrite is not for a filter of type "
                 "RequestRedirect", id="filter-other-field"),
    pytest.param(_filter("{type: RequestRedirect, requestRedirect: {}}, {type: URLRewrite, urlRewrite: {}}", ""),
                 "11: routes[0].rules[0].filters[1].type: a rule takes a RequestRedirect or a URLRewrite filter, "
                 "not both", id="redirect-and-rewrite"),
    pytest.param(_filter("{type: RequestRedirect, requestRedirect: {}}, "
                         "{type: RequestMirror, requestMirror: {backendRef: {name: m, port: 80}}}", ""),
                 "11: routes[0].rules[0].filters[1].type: RequestMirror has nothing to copy", id="redirect-mirror"),
    pytest.param(_filter("{type: RequestRedirect, requestRedirect: {hostname: '*.example.com'}}", ""),
                 "11: routes[0].rules[0].filters[0].requestRedirect.hostname: '*.example.com' is not a hostname: "
                 "lowercase DNS labels separated by '.' (no wildcard", id="redirect-wildcard"),
    pytest.param(_filter("{type: RequestRedirect, requestRedirect: {statusCode: 304}}", ""),
                 "11: routes[0].rules[0].filters[0].requestRedirect.statusCode", id="redirect-status"),
    pytest.param(route("- matches: [{path: {type: Exact, value: /a}}]\n  filters: [{type: RequestRedirect, "
                       "requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}]\n"),
                 "11: routes[0].rules[0].filters[0].requestRedirect.path: ReplacePrefixMatch needs every match of "
                 "the rule to be a PathPrefix match", id="redirect-prefix-needs-prefix"),
    pytest.param(_filter("{type: RequestMirror, requestMirror: {backendRef: {name: m, port: 80}, percent: 5, "
                         "fraction: {numerator: 1}}}"),
                 "11: routes[0].rules[0].filters[0].requestMirror: give percent or fraction, not both",
                 id="mirror-percent-and-fraction"),
    pytest.param(_filter("{type: RequestMirror, requestMirror: {backendRef: {name: m, port: 80}, "
                         "fraction: {numerator: 3, denominator: 2}}}"),
                 "11: routes[0].rules[0].filters[0].requestMirror.fraction: numerator 3 is more than denominator 2",
                 id="mirror-fraction"),
    pytest.param(route("- matches: [{path: {value: /a}}]\n"),
                 "10: routes[0].rules[0].backendRefs: a rule needs at least one backendRef (or a RequestRedirect "
                 "filter)", id="no-backends"),
    pytest.param(route("- backendRefs: [{name: s, port: 80}]\n  timeouts: {request: 1s, backendRequest: 2s}\n"),
                 "11: routes[0].rules[0].timeouts.backendRequest: backendRequest 2s is longer than request 1s",
                 id="backend-request-longer"),
    pytest.param(route("- backendRefs: [{name: s, port: 80}]\n  timeouts: {backendRequest: 2s}\n"
                       "  retries: {perTryTimeout: 1s}\n"),
                 "11: routes[0].rules[0].timeouts.backendRequest: give timeouts.backendRequest or "
                 "retries.perTryTimeout, not both", id="backend-request-and-per-try"),
    pytest.param(route("- backendRefs: [{name: s, port: 80}]\n  retry: {attempts: 1}\n  retries: {attempts: 1}\n"),
                 "11: routes[0].rules[0].retry: give retry (Gateway API) or retries (Istio's shape), not both",
                 id="retry-and-retries"),
    pytest.param(route("- backendRefs: [{name: s, port: 80}]\n  retry: {codes: [200]}\n"),
                 "11: routes[0].rules[0].retry.codes[0]: 200 is not an HTTP status code to retry (400-599)",
                 id="retry-code"),
    pytest.param(route("- backendRefs: [{name: s, port: 80}]\n  retry: {attempts: 0}\n"),
                 "11: routes[0].rules[0].retry.attempts: 0 retries: must be from 1 to 10 (Gateway API's retry "
                 "takes at least 1; retries: {attempts: 0} turns retries off)", id="retry-attempts"),
    pytest.param(route("- name: a\n  backendRefs: [{name: s, port: 80}]\n- name: a\n"
                       "  backendRefs: [{name: s, port: 80}]\n"),
                 "12: routes[0].rules[1].name: duplicate rule name 'a' (first given to rules[0])",
                 id="rule-name-twice"),
])
def test_gateway_api_fields_rejected(text: str, expected: str) -> None:
    result = load(text)
    assert result.policy is None
    assert any(p.startswith(expected) for p in problems(result)), problems(result)


def test_a_redirect_with_backends_warns_that_they_are_not_used_and_a_mirror_to_an_unknown_service() -> None:
    known = routecheck.Known(services={model.ServiceKey("default/s"): frozenset({80})}, clusters=frozenset())
    result = load(_filter("{type: RequestRedirect, requestRedirect: {hostname: b.example.com}}"), known=known)
    assert result.errors == () and result.policy is not None
    assert problems(result) == [
        "12: routes[0].rules[0].backendRefs: ignored: the rule's RequestRedirect answers every request itself"]
    mirrored = load(_filter("{type: RequestMirror, requestMirror: {backendRef: {name: nope, port: 80}}}"),
                    known=known)
    assert problems(mirrored) == [
        "11: routes[0].rules[0].filters[0].requestMirror.backendRef.name: no source knows service default/nope yet"]


def test_an_empty_replace_prefix_match_is_gateway_apis_slash() -> None:
    result = load(_filter("{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: ''}}}"))
    assert result.policy is not None, problems(result)
    [rule] = result.policy.routes[0].rules
    assert rule.rewrite == routing.Rewrite(prefix="/")
