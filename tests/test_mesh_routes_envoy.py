"""Routes for sidecars through a real Envoy sidecar (a route whose parent is a Service): `reviews`
split 80/20 between v1 and v2 by label subset, and a tester's requests (a header) always to v2."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import binomial_bounds, wait_for
from tests.edge import Edge, Place

pytestmark = pytest.mark.envoy

V1 = Place("cluster-1", "r1", "z1", (("version", "v1"),))
V2 = Place("cluster-1", "r1", "z1", (("version", "v2"),))
POLICY = """\
apiVersion: meshplane.io/v2
routes:
  - name: reviews
    parentRefs: [{kind: Service, name: reviews, port: 8000}]
    rules:
      - matches: [{headers: [{name: end-user, value: tester}]}]
        backendRefs: [{name: reviews, port: 8000, labels: {version: v2}}]
      - backendRefs:
          - {name: reviews, port: 8000, labels: {version: v1}, weight: 80}
          - {name: reviews, port: 8000, labels: {version: v2}, weight: 20}
"""
SUBSETS = {"outbound|8000|version=v1|reviews.default.svc.cluster.local",
           "outbound|8000|version=v2|reviews.default.svc.cluster.local"}


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Edge]:
    world = Edge(tmp_path, {"reviews": [V1, V1, V2]}, gateway_at=V1, echo=True, sidecar=True)
    try:
        await world.start(POLICY)
        await wait_for(lambda: _version(world, {}), what="the sidecar routing reviews")
        yield world
    finally:
        await world.stop()


async def _version(world: Edge, headers: dict[str, str]) -> str:
    status, body = await world.request(world.port, "reviews", "/", headers)
    return str(json.loads(body)["name"]).rsplit("=", 1)[-1] if status == 200 else ""


async def test_reviews_split_80_20_by_label_subset_and_a_tester_always_gets_v2(mesh: Edge) -> None:
    n = 400
    versions = await _versions(mesh, n, {})
    assert sum(versions.values()) == n, versions
    lo, hi = binomial_bounds(n, 0.2, 1e-6)
    assert lo <= versions["v2"] <= hi, versions
    assert await _versions(mesh, 40, {"end-user": "tester"}) == {"v2": 40}
    assert mesh.gateway is not None
    dump = await mesh.gateway.config_dump()
    clusters = {c["cluster"]["name"] for section in dump["configs"] if section["@type"].endswith("ClustersConfigDump")
                for c in section.get("dynamic_active_clusters", [])}
    assert clusters >= SUBSETS, clusters
    assert mesh.nacks() == 0


async def _versions(mesh: Edge, n: int, headers: dict[str, str]) -> Counter[str]:
    """n requests through the sidecar: how many reached each version (failures count as their status)."""
    out: Counter[str] = Counter()
    for (status, body), count in (await mesh.tally(n, mesh.port, "reviews", "/", headers)).items():
        out[str(json.loads(body)["name"]).rsplit("=", 1)[-1] if status == 200 else str(status)] += count
    return out
