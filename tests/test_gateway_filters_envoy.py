"""Gateway API HTTPRoute fields as users bring them, through a real Envoy gateway: response headers
changed, redirects (status and Location, on a named and a wildcard host), a mirror receiving a copy,
backend request timeouts, and a GEP-1731 retry of status codes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from meshplane.demo.ports import free_port
from tests.conftest import wait_for
from tests.edge import HERE, EchoServer, Edge, gateway_policy, serving

pytestmark = pytest.mark.envoy

PORT = free_port()
POLICY = gateway_policy(PORT, """\
- name: regions
  parentRefs: [{name: edge, sectionName: org}]
  rules:
    - filters: [{type: RequestRedirect, requestRedirect: {scheme: https}}]
- name: filters
  parentRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: edge, sectionName: com}]
  rules:
    - name: response-headers
      matches: [{path: {value: /response}}]
      filters:
        - type: ResponseHeaderModifier
          responseHeaderModifier:
            set: [{name: x-set, value: set}]
            add: [{name: x-add, value: added}]
            remove: [x-remove]
      backendRefs: [{group: "", kind: Service, name: web, port: 8000}]
    - matches: [{path: {value: /old}}]
      filters:
        - type: RequestRedirect
          requestRedirect:
            scheme: https
            path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}
            statusCode: 301
    - matches: [{path: {value: /moved}}]
      filters:
        - type: RequestRedirect
          requestRedirect: {hostname: other.example.com}
    - matches: [{path: {value: /mirrored}}]
      filters:
        - type: RequestMirror
          requestMirror: {backendRef: {name: shadow, port: 8000}}
      backendRefs: [{name: web, port: 8000}]
    - matches: [{path: {value: /slow}}]
      timeouts: {request: 10s, backendRequest: 300ms}
      backendRefs: [{name: web, port: 8000}]
    - matches: [{path: {value: /long}}]
      timeouts: {backendRequest: 20s}
      backendRefs: [{name: web, port: 8000}]
    - matches: [{path: {value: /flaky}}]
      retry: {codes: [500], attempts: 2, backoff: 10ms}
      backendRefs: [{name: web, port: 8000}]
    - matches: [{path: {value: /other-codes}}]
      retry: {codes: [502], attempts: 2}
      backendRefs: [{name: web, port: 8000}]
""")


@pytest.fixture
async def edge(tmp_path: Path) -> AsyncIterator[Edge]:
    async with serving(tmp_path, {"web": [HERE], "shadow": [HERE]}, POLICY, ready=_serving, echo=True) as world:
        yield world


async def _serving(world: Edge) -> bool:
    return (await world.request(PORT, "example.com", "/response"))[0] == 200


def _echo(world: Edge, service: str) -> EchoServer:
    server = next(r.server for r in world.replicas if r.service == service)
    assert isinstance(server, EchoServer)
    return server


async def test_a_response_header_modifier_sets_adds_and_removes_response_headers(edge: Edge) -> None:
    status, headers, _ = await edge.exchange(PORT, "example.com", "/response",
                                             {"x-respond-x-set": "original", "x-respond-x-remove": "gone"})
    assert status == 200
    assert headers["x-set"] == "set"  # replaced
    assert headers["x-add"] == "added"
    assert "x-remove" not in headers
    assert edge.nacks() == 0


async def test_a_redirect_answers_its_status_and_location(edge: Edge) -> None:
    # The scheme given, no port: the scheme's own, not written; the prefix replaced, the query kept.
    status, headers, _ = await edge.exchange(PORT, f"example.com:{PORT}", "/old/page?q=1")
    assert (status, headers["location"]) == (301, "https://example.com/new/page?q=1")
    # Only a hostname: the listener's port (Gateway API), the request's path, 302 by default.
    status, headers, _ = await edge.exchange(PORT, "example.com", "/moved/x")
    assert (status, headers["location"]) == (302, f"http://other.example.com:{PORT}/moved/x")
    # A redirect reaches no backend.
    assert not [s for s in _echo(edge, "web").seen if s["path"].startswith(("/old", "/moved"))]


async def test_a_redirect_on_a_wildcard_host_writes_no_port_that_is_its_schemes_own(edge: Edge) -> None:
    status, headers, _ = await edge.exchange(PORT, "a.example.org", "/old?q=1")
    assert (status, headers["location"]) == (302, "https://a.example.org/old?q=1")
    # A Host with a port: Envoy replaces that port only by writing one (443, the same place).
    status, headers, _ = await edge.exchange(PORT, f"a.example.org:{PORT}", "/old")
    assert (status, headers["location"]) == (302, "https://a.example.org:443/old")
    assert edge.nacks() == 0


async def test_a_request_mirror_sends_a_copy_and_the_answer_comes_from_the_backend(edge: Edge) -> None:
    status, body = await edge.request(PORT, "example.com", "/mirrored?n=1", {"x-mark": "copied"})
    assert status == 200 and json.loads(body)["name"].startswith("web@")
    shadow = _echo(edge, "shadow")
    copies = await wait_for(lambda: [s for s in shadow.seen if s["path"] == "/mirrored?n=1"], what="the copy")
    [copy] = copies
    assert copy["headers"]["x-mark"] == "copied"
    assert copy["headers"]["host"] == "example.com-shadow"  # Envoy marks the copy, as with Istio's mirrors


async def test_a_backend_request_timeout_ends_a_slow_try(edge: Edge) -> None:
    status, _ = await edge.request(PORT, "example.com", "/slow", {"x-delay": "2"})
    assert status == 504, status  # the 2 s answer was in time for the 10 s request timeout, not for 300 ms


@pytest.mark.slow
@pytest.mark.any_protocol
async def test_a_backend_request_timeout_longer_than_15_s_is_not_cut_short_without_a_request_timeout(
        edge: Edge) -> None:
    """Envoy's default route timeout (15 s) would answer 504 before the 20 s a try may take."""
    status, body = await edge.request(PORT, "example.com", "/long", {"x-delay": "16"}, timeout=30)
    assert status == 200, body
    assert edge.gateway is not None
    action = _route(await edge.gateway.config_dump(include_eds=False), "/long")["route"]
    assert (action["timeout"], action["retry_policy"]["per_try_timeout"]) == ("60.075s", "20s")  # 3 tries, 2 waits


async def test_a_gateway_api_retry_retries_its_codes(edge: Edge) -> None:
    failing_twice = {"x-fail-status": "500", "x-fail-count": "2"}
    status, body = await edge.request(PORT, "example.com", "/flaky", failing_twice)
    assert status == 200, body
    assert json.loads(body)["try"] == 3  # two retries of the 500
    status, _ = await edge.request(PORT, "example.com", "/other-codes", failing_twice)
    assert status == 500  # 500 is not one of this rule's codes: not retried
    assert edge.gateway is not None
    dump = await edge.gateway.config_dump(include_eds=False)
    policy = _route(dump, "/flaky")["route"]["retry_policy"]
    assert policy["retry_back_off"]["base_interval"] == "0.010s"
    assert set(policy["retry_on"].split(",")) >= {"connect-failure", "reset", "retriable-status-codes"}


def _route(dump: dict[str, Any], prefix: str) -> dict[str, Any]:
    section = next(s for s in dump["configs"] if s["@type"].endswith(".RoutesConfigDump"))
    [config] = [r["route_config"] for r in section["dynamic_route_configs"]]
    routes: list[dict[str, Any]] = config["virtual_hosts"][0]["routes"]
    return next(r for r in routes if r["match"].get("path_separated_prefix") == prefix)


SIDECAR_POLICY = """\
apiVersion: meshplane.io/v2
routes:
  - name: web
    parentRefs: [{kind: Service, name: web, port: 8000}]
    rules:
      - matches: [{path: {value: /moved}}]
        filters: [{type: RequestRedirect, requestRedirect: {hostname: other.example.com}}]
      - filters:
          - {type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-set, value: set}]}}
        backendRefs: [{name: web, port: 8000}]
"""


async def test_a_sidecar_applies_the_filters_of_a_mesh_route(tmp_path: Path) -> None:
    """A sidecar's listener is the service port: a redirect that names only a hostname keeps it."""

    async def served(world: Edge) -> bool:
        return (await world.exchange(world.port, "web", "/"))[1].get("x-set") == "set"

    async with serving(tmp_path, {"web": [HERE]}, SIDECAR_POLICY, ready=served, echo=True, sidecar=True) as world:
        status, headers, _ = await world.exchange(world.port, "web:8000", "/moved/x")
        assert (status, headers["location"]) == (302, "http://other.example.com:8000/moved/x")
        assert world.nacks() == 0
