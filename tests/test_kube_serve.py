"""What `meshplane serve` asks of a Kubernetes API server: the shipped RBAC, and --namespaces.

Each test reads the requests a wire-protocol fake API server received from the real `kubernetes`
client, so the RBAC in deploy/kubernetes is checked against what meshplane really does.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshplane.demo import backend
from meshplane.demo.ports import free_port
from tests.conftest import wait_for
from tests.fakekube import FakeKubeAPI, endpoint, endpoint_slice, kubeconfig_secret, node, pod, service
from tests.test_clusters import FAST

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes" / "base"
Grant = tuple[str, str, str]  # API group, resource, verb


def granted(kind: str, name: str) -> set[Grant]:
    """(group, resource, verb) that the named ClusterRole or Role in deploy/kubernetes grants."""
    for path in sorted(DEPLOY.glob("rbac-*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == kind and doc["metadata"]["name"] == name:
                return {(group, resource, verb) for rule in doc["rules"] for group in rule["apiGroups"]
                        for resource in rule["resources"] for verb in rule["verbs"]}
    raise AssertionError(f"no {kind} {name} in {DEPLOY}")


def requested(fake: FakeKubeAPI) -> set[tuple[str, str, str, str]]:
    """(group, resource, verb, namespace) of every request the fake received."""
    seen = set()
    for r in fake.requests:
        parts = r.path.strip("/").split("/")
        group, rest = ("", parts[2:]) if parts[0] == "api" else (parts[1], parts[3:])
        namespace = ""
        if rest[0] == "namespaces" and len(rest) > 2:
            namespace, rest = rest[1], rest[2:]
        verb = "get" if len(rest) > 1 else "watch" if r.watch else "list"
        assert r.method == "GET", r
        seen.add((group, rest[0], verb, namespace))
    return seen


def seed(fake: FakeKubeAPI, namespace: str, address: str) -> None:
    fake.put("services", service("web", namespace, [{"name": "http", "port": 80}]))
    fake.put("pods", pod("web-1", namespace, {"app": "web"}))
    fake.put("endpointslices", endpoint_slice("web-a", namespace, "web",
                                              [endpoint(address, node_name="n1", pod="web-1", ns=namespace)],
                                              [{"name": "http", "port": 8080}]))


@pytest.fixture
def fakes() -> Iterator[tuple[FakeKubeAPI, FakeKubeAPI]]:
    with FakeKubeAPI("local") as local, FakeKubeAPI("remote") as remote:
        for fake in (local, remote):
            fake.put("nodes", node("n1", "r1", "z1"))
        seed(local, "shop", "10.1.0.1")
        seed(remote, "shop", "10.2.0.1")
        seed(remote, "elsewhere", "10.2.9.1")
        yield local, remote


async def test_the_shipped_rbac_grants_exactly_what_meshplane_uses(
    fakes: tuple[FakeKubeAPI, FakeKubeAPI], start_plane: Any, tmp_path: Path
) -> None:
    local, remote = fakes
    local.put("secrets", kubeconfig_secret("remote-east", "meshplane-system", "east", remote.kubeconfig(cluster="c2"),
                                           labels={"meshplane.io/multicluster": "true"}))
    path = local.write_kubeconfig(tmp_path / "local.yaml", cluster="c1")
    plane = await start_plane(local_cluster=f"home={path}", remote_secrets_namespace="meshplane-system", kube=FAST)
    await wait_for(plane.ready, what="both clusters synced")
    await wait_for(lambda: local.open_watches() == 5 and remote.open_watches() == 4, what="every watch open")

    reader = granted("ClusterRole", "meshplane-reader")  # every cluster meshplane reads
    secrets = granted("Role", "meshplane-remote-secrets")  # the local cluster, its own namespace
    for group, resource, verb, namespace in requested(local) | requested(remote):
        if resource == "secrets":
            assert (group, resource, verb) in secrets and namespace == "meshplane-system"
        else:
            assert (group, resource, verb) in reader, f"RBAC does not allow {verb} {resource}"
    # ... and nothing more: a verb or a resource meshplane does not use is not granted
    assert reader == {(g, r, v) for g, r, v, _ in requested(remote)}
    assert secrets == {(g, r, v) for g, r, v, _ in requested(local) if r == "secrets"}
    assert {v for _, _, v in reader | secrets} == {"list", "watch"}


async def test_serve_namespaces_flag_watches_only_those_namespaces(
    fakes: tuple[FakeKubeAPI, FakeKubeAPI], tmp_path: Path
) -> None:
    _, remote = fakes
    path = remote.write_kubeconfig(tmp_path / "c2.yaml", cluster="c2")
    http_port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshplane", "serve", "--kubeconfig", f"c2={path}", "--namespaces", "shop",
        "--ads", "127.0.0.1:0", "--http", f"127.0.0.1:{http_port}",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async def get(target: str) -> tuple[int, Any]:
            try:
                status, body = await backend.http_get(http_port, "localhost", target)
            except OSError:
                return 0, None
            return status, json.loads(body)

        await wait_for(lambda: _first(get("/ready")), timeout=20, what="/ready answering 200")
        status, shop = await get("/debug/placements?service=shop/web")
        assert status == 200
        assert [e["address"] for p in shop["placements"] for e in p["endpoints"]] == ["10.2.0.1"]
        assert (await get("/debug/placements?service=elsewhere/web"))[0] == 404
        namespaced = {(resource, namespace) for _, resource, _, namespace in requested(remote)}
        assert namespaced == {("services", "shop"), ("endpointslices", "shop"), ("pods", "shop"), ("nodes", "")}
    finally:
        proc.send_signal(2)
        assert await asyncio.wait_for(proc.wait(), 10) == 0


async def _first(answer: Any) -> bool:
    status, _ = await answer
    return bool(status == 200)
