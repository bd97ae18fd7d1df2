"""Policy v2: gateways, routes and retries, validated with file:line: field: reason, and what they resolve to."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from meshplane.discovery import model
from meshplane.policy import routecheck, routing, validate

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
