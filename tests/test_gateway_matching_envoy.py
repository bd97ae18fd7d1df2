"""Layer-7 matching through a real Envoy gateway, with Gateway API's precedence: paths (exact, whole
segment prefixes, RE2), headers, query parameters, methods, hostnames with a wildcard; filters that
set, add and remove headers and rewrite a prefix; 404 for nothing matched, 503 for no endpoint."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from meshplane.demo.ports import free_port
from tests.edge import HERE, Edge, gateway_policy, serving

pytestmark = pytest.mark.envoy

PORT = free_port()
POLICY = gateway_policy(PORT, """\
# Written in no particular order: precedence, not the file, decides.
- name: paths
  parentRefs: [{name: edge, sectionName: com}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /pre}}]
      backendRefs: [{name: prefix-short, port: 8000}]
    - matches: [{path: {type: RegularExpression, value: "^/re/[0-9]+$"}}]
      backendRefs: [{name: regex, port: 8000}]
    - matches: [{path: {type: PathPrefix, value: /pre/longer}}]
      backendRefs: [{name: prefix-long, port: 8000}]
    - matches: [{path: {type: Exact, value: /pre/longer/exact}}]
      backendRefs: [{name: exact, port: 8000}]
    - matches:
        - {path: {value: /h}, headers: [{name: x-a, value: "1"}]}
      backendRefs: [{name: one-header, port: 8000}]
    - matches:
        - path: {value: /h}
          headers: [{name: x-a, value: "1"}, {name: x-b, type: RegularExpression, value: "^[0-9]+$"}]
      backendRefs: [{name: two-headers, port: 8000}]
    - matches: [{path: {value: /q}, queryParams: [{name: v, value: "1"}]}]
      backendRefs: [{name: query, port: 8000}]
    - matches: [{path: {value: /m}}]
      backendRefs: [{name: any-method, port: 8000}]
    - matches: [{path: {value: /m}, method: POST}]
      backendRefs: [{name: post, port: 8000}]
    - matches: [{path: {value: /empty}}]
      backendRefs: [{name: no-endpoints, port: 8000}]
    - matches: [{path: {value: /rewrite}}]
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier:
            set: [{name: x-set, value: set}]
            add: [{name: x-add, value: added}]
            remove: [x-remove]
        - type: URLRewrite
          urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}
      backendRefs: [{name: filtered, port: 8000}]
- name: b-second
  parentRefs: [{name: edge, sectionName: com}]
  rules:
    - matches: [{path: {value: /tie}}]
      backendRefs: [{name: tie-b, port: 8000}]
- name: a-first
  parentRefs: [{name: edge, sectionName: com}]
  rules:
    - matches: [{path: {value: /tie}}]
      backendRefs: [{name: tie-a, port: 8000}]
- name: wildcard
  parentRefs: [{name: edge, sectionName: org}]
  rules:
    - backendRefs: [{name: wildcard, port: 8000}]
""")
SERVICES = ["prefix-short", "prefix-long", "exact", "regex", "one-header", "two-headers", "query", "any-method",
            "post", "filtered", "tie-a", "tie-b", "wildcard"]


@pytest.fixture
async def edge(tmp_path: Path) -> AsyncIterator[Edge]:
    async with serving(tmp_path, {s: [HERE] for s in SERVICES}, POLICY, echo=True,
                       ready=lambda world: _name(world, "/pre")) as world:
        yield world


async def _call(world: Edge, path: str, *, host: str = "example.com", headers: Mapping[str, str] | None = None,
                method: str = "GET") -> tuple[int, dict[str, Any]]:
    status, body = await world.request(PORT, host, path, headers, method=method)
    return status, json.loads(body) if status == 200 else {"body": body}


async def _name(world: Edge, path: str, **kw: Any) -> str:
    status, body = await _call(world, path, **kw)
    return str(body["name"]).split("@")[0] if status == 200 else str(status)


@pytest.mark.parametrize(("path", "kw", "reaches"), [
    ("/pre", {}, "prefix-short"),
    ("/pre/x", {}, "prefix-short"),
    ("/pre/longer", {}, "prefix-long"),
    ("/pre/longer/x", {}, "prefix-long"),
    ("/pre/longer/exact", {}, "exact"),
    ("/pre/longer/exact/x", {}, "prefix-long"),
    ("/prefix", {}, "404"),  # a prefix matches whole segments
    ("/re/123", {}, "regex"),
    ("/re/12a", {}, "404"),
    ("/h", {"headers": {"x-a": "1"}}, "one-header"),
    ("/h", {"headers": {"x-a": "1", "x-b": "42"}}, "two-headers"),
    ("/h", {"headers": {"x-a": "1", "x-b": "forty"}}, "one-header"),
    ("/h", {}, "404"),
    ("/q?v=1", {}, "query"),
    ("/q?v=2", {}, "404"),
    ("/m", {"method": "POST"}, "post"),
    ("/m", {"method": "GET"}, "any-method"),
    ("/tie", {}, "tie-a"),  # same match in two routes: the first by namespace/name wins
    ("/anything", {"host": "shop.example.org"}, "wildcard"),
    ("/anything", {"host": "example.org"}, "404"),  # *.example.org is not example.org
    ("/pre", {"host": "other.com"}, "404"),
    ("/empty", {}, "503"),  # a backend no source knows: no endpoint
    # Gateway API ignores a port in the Host header when matching hostnames (curl http://example.com:8080/).
    ("/pre", {"host": f"example.com:{PORT}"}, "prefix-short"),
    ("/pre", {"host": "example.com:80"}, "prefix-short"),
    ("/anything", {"host": f"shop.example.org:{PORT}"}, "wildcard"),
    ("/anything", {"host": f"example.org:{PORT}"}, "404"),
    ("/pre", {"host": f"other.com:{PORT}"}, "404"),
])
async def test_matching_and_precedence(edge: Edge, path: str, kw: dict[str, Any], reaches: str) -> None:
    assert await _name(edge, path, **kw) == reaches


async def test_a_host_with_a_port_reaches_its_backend_with_the_port_kept(edge: Edge) -> None:
    """The port is ignored for matching only: the backend sees the Host the client sent."""
    status, seen = await _call(edge, "/pre", host=f"example.com:{PORT}")
    assert status == 200 and seen["name"].startswith("prefix-short"), seen
    assert seen["headers"]["host"] == f"example.com:{PORT}"


async def test_filters_set_add_remove_headers_and_rewrite_the_prefix(edge: Edge) -> None:
    status, seen = await _call(edge, "/rewrite/deeper/path?x=1",
                               headers={"x-set": "original", "x-add": "first", "x-remove": "gone"})
    assert status == 200 and seen["name"].startswith("filtered")
    assert seen["path"] == "/deeper/path?x=1"
    headers = seen["headers"]
    assert headers["x-set"] == "set"
    assert headers["x-add"] == "first, added"
    assert "x-remove" not in headers
    assert edge.nacks() == 0
