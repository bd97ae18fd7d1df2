"""Several Kubernetes clusters at once: kubeconfig files, a kubeconfig directory, remote secrets, readiness.

Every cluster is a wire-protocol fake API server read by the real `kubernetes` client.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshplane import app
from meshplane.discovery import kubesource, model
from tests.conftest import wait_for
from tests.fakekube import FakeKubeAPI, endpoint, endpoint_slice, kubeconfig_secret, node, service

MOCKB = model.service_key("default", "mockb")
FAST = kubesource.KubeOptions(watch_timeout=5.0, backoff_initial=0.05, backoff_max=0.2, request_timeout=2.0)


def seed(fake: FakeKubeAPI, *, region: str, zone: str, address: str) -> None:
    fake.put("nodes", node(f"node-{zone}", region, zone))
    fake.put("services", service("mockb", "default", [{"name": "http", "port": 8000}]))
    fake.put("endpointslices", endpoint_slice(
        "mockb-abc", "default", "mockb", [endpoint(address, node_name=f"node-{zone}")],
        [{"name": "http", "port": 9000}],
    ))


@pytest.fixture
def fakes() -> Iterator[list[FakeKubeAPI]]:
    started: list[FakeKubeAPI] = []
    for name, region, zone, address in (("c1", "r1", "z1", "10.1.0.1"), ("c2", "r2", "z2", "10.2.0.1"),
                                        ("c3", "r3", "z3", "10.3.0.1")):
        fake = FakeKubeAPI(name)
        fake.start()
        seed(fake, region=region, zone=zone, address=address)
        started.append(fake)
    yield started
    for fake in started:
        fake.stop()


def localities(plane: app.ControlPlane) -> dict[str, str]:
    service = plane.catalog.services.get(MOCKB)
    return {ep.address: str(ep.locality) for ep in service.endpoints} if service else {}


async def test_kubeconfig_files_merge_clusters_with_their_localities(
    fakes: list[FakeKubeAPI], start_plane: Any, tmp_path: Path
) -> None:
    c1 = fakes[0].write_kubeconfig(tmp_path / "one.yaml", cluster="c1")
    c2 = fakes[1].write_kubeconfig(tmp_path / "two.yaml", cluster="c2", context="cluster-two")
    plane = await start_plane(kubeconfigs=(f"c1={c1}", str(c2)), kube=FAST)
    await wait_for(lambda: len(localities(plane)) == 2, what="endpoints of both clusters")
    assert localities(plane) == {"10.1.0.1": "r1/z1/c1", "10.2.0.1": "r2/z2/cluster-two"}
    await wait_for(plane.ready, what="ready once both listed")
    status = plane._cluster_status()
    assert {c: (s["synced"], s["origin"]) for c, s in status.items()} == {
        "c1": (True, f"kubeconfig {c1}"), "cluster-two": (True, f"kubeconfig {c2}"),
    }


async def test_kubeconfig_dir_adds_rotates_and_removes_clusters(
    fakes: list[FakeKubeAPI], start_plane: Any, tmp_path: Path
) -> None:
    directory = tmp_path / "clusters"
    directory.mkdir()
    fakes[0].write_kubeconfig(directory / "c1.yaml", cluster="c1")
    plane = await start_plane(kubeconfig_dirs=(directory,), kube=FAST, kubeconfig_dir_interval=0.05)
    await wait_for(lambda: localities(plane) == {"10.1.0.1": "r1/z1/c1"}, what="c1 from the directory")

    fakes[1].write_kubeconfig(directory / "east.yaml", cluster="c2")  # a new file: a new cluster
    await wait_for(lambda: localities(plane).get("10.2.0.1") == "r2/z2/east", what="east added")

    _write_atomically(directory / "east.yaml", fakes[2].kubeconfig(cluster="c3"))  # rotated to another server
    await wait_for(lambda: localities(plane) == {"10.1.0.1": "r1/z1/c1", "10.3.0.1": "r3/z3/east"},
                   what="east reconnected to its new server")

    (directory / "east.yaml").unlink()
    await wait_for(lambda: localities(plane) == {"10.1.0.1": "r1/z1/c1"}, what="east removed")
    assert list(plane.clusters.clusters) == ["c1"]


async def test_remote_secrets_add_rotate_and_remove_clusters(
    fakes: list[FakeKubeAPI], start_plane: Any, tmp_path: Path
) -> None:
    local, remote, replacement = fakes
    labels = {"meshplane.io/multicluster": "true"}
    local.put("secrets", kubeconfig_secret("remote-east", "meshplane-system", "east",
                                           remote.kubeconfig(cluster="c2"), labels=labels))
    local.put("secrets", kubeconfig_secret("not-for-us", "meshplane-system", "ignored",
                                           replacement.kubeconfig(cluster="c3")))  # no label: ignored
    path = local.write_kubeconfig(tmp_path / "local.yaml", cluster="c1")
    plane = await start_plane(local_cluster=f"home={path}", remote_secrets_namespace="meshplane-system", kube=FAST)
    await wait_for(lambda: localities(plane) == {"10.1.0.1": "r1/z1/home", "10.2.0.1": "r2/z2/east"},
                   what="local cluster and the remote one from its secret")
    await wait_for(plane.ready, what="ready")

    local.put("secrets", kubeconfig_secret("remote-east", "meshplane-system", "east",
                                           replacement.kubeconfig(cluster="c3"), labels=labels))
    await wait_for(lambda: localities(plane) == {"10.1.0.1": "r1/z1/home", "10.3.0.1": "r3/z3/east"},
                   what="the rotated secret's server")

    local.delete("secrets", "meshplane-system", "remote-east")
    await wait_for(lambda: localities(plane) == {"10.1.0.1": "r1/z1/home"}, what="east removed with its secret")


async def test_ready_waits_for_every_cluster_to_list_once(
    fakes: list[FakeKubeAPI], start_plane: Any, tmp_path: Path
) -> None:
    good = fakes[0].write_kubeconfig(tmp_path / "good.yaml", cluster="c1")
    slow = fakes[1].write_kubeconfig(tmp_path / "slow.yaml", cluster="c2")
    fakes[1].stall(True)  # accepts requests and answers none until released: its first list cannot end
    plane = await start_plane(kubeconfigs=(f"good={good}", f"slow={slow}"), kube=FAST, sync_timeout=60)
    await wait_for(lambda: "10.1.0.1" in localities(plane), what="the good cluster synced")
    assert not plane.ready()  # certain: the slow cluster has not listed, and its timeout is a minute away
    status = plane._cluster_status()
    assert status["slow"]["synced"] is False and status["slow"]["sync_timed_out"] is False
    assert status["good"]["synced"] is True

    fakes[1].stall(False)  # its list is answered: ready without waiting for the timeout
    await wait_for(plane.ready, what="ready once every cluster listed")
    assert "10.2.0.1" in localities(plane) and plane._cluster_status()["slow"]["synced"] is True


async def test_ready_after_the_sync_timeout_without_a_cluster_that_cannot_list(
    fakes: list[FakeKubeAPI], start_plane: Any, tmp_path: Path
) -> None:
    good = fakes[0].write_kubeconfig(tmp_path / "good.yaml", cluster="c1")
    down = fakes[1].write_kubeconfig(tmp_path / "down.yaml", cluster="c2")
    fakes[1].set_unreachable(True)
    plane = await start_plane(kubeconfigs=(f"good={good}", f"down={down}"), kube=FAST, sync_timeout=0.3)
    await wait_for(lambda: "10.1.0.1" in localities(plane), what="the good cluster synced")
    await wait_for(plane.ready, what="ready after the sync timeout")
    status = plane._cluster_status()
    assert status["down"]["synced"] is False and status["down"]["sync_timed_out"] is True
    assert status["good"]["synced"] is True

    fakes[1].set_unreachable(False)  # it comes back: it syncs and its endpoints arrive
    await wait_for(lambda: "10.2.0.1" in localities(plane), what="the late cluster's endpoints")
    assert plane._cluster_status()["down"]["synced"] is True


async def test_a_broken_kubeconfig_stops_start_up_naming_it(start_plane: Any, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Config\n")
    with pytest.raises(ValueError, match=f"{bad}: not a kubeconfig"):
        await start_plane(kubeconfigs=(f"x={bad}",))


def _write_atomically(path: Path, doc: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc))
    tmp.replace(path)
