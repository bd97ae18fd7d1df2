"""Several Kubernetes clusters at once: kubeconfig files, a kubeconfig directory, remote secrets, readiness.

Every cluster is a wire-protocol fake API server read by the real `kubernetes` client.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml

from meshplane import app
from meshplane.demo import backend
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


def published(plane: app.ControlPlane) -> list[dict[str, str]]:
    """mockb's endpoints after every change the catalog publishes from now on (what would be pushed)."""
    seen: list[dict[str, str]] = []
    plane.catalog.subscribe(lambda change: seen.append(localities(plane)) if MOCKB in change.services else None)
    return seen


def unreadable(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"].startswith("cluster configuration unreadable")]


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
    # A poll that never comes: inotify alone sees the edits.
    plane = await start_plane(kubeconfig_dirs=(directory,), kube=FAST, kubeconfig_dir_interval=3600)
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


async def ready_body(plane: app.ControlPlane) -> tuple[int, dict[str, Any]]:
    """GET /ready from the running plane's HTTP port: (status, JSON body)."""
    status, body = await backend.http_get(plane.http_port, "localhost", "/ready")
    return status, json.loads(body)


async def test_ready_stays_ready_when_a_cluster_is_added_or_reconnected_at_run_time(
    fakes: list[FakeKubeAPI], start_plane: Any, tmp_path: Path
) -> None:
    directory = tmp_path / "clusters"
    directory.mkdir()
    fakes[0].write_kubeconfig(directory / "c1.yaml", cluster="c1")
    plane = await start_plane(kubeconfig_dirs=(directory,), kube=FAST, kubeconfig_dir_interval=0.02, sync_timeout=60)
    await wait_for(plane.ready, what="ready at start-up")
    fakes[1].stall(True)  # the clusters that follow cannot list, and their sync timeout is a minute away

    fakes[1].write_kubeconfig(directory / "c2.yaml", cluster="c2")  # added at run time
    await wait_for(lambda: "c2" in plane.clusters.clusters, what="c2 added")
    assert plane.ready(), "a cluster added at run time made the control plane unready"
    status, body = await ready_body(plane)
    assert status == 200 and body["ready"] is True
    assert (body["clusters"]["c1"]["state"], body["clusters"]["c2"]["state"]) == ("synced", "syncing")

    _write_atomically(directory / "c1.yaml", fakes[1].kubeconfig(cluster="c1"))  # rotated to the stalled server
    await wait_for(lambda: plane.clusters.clusters["c1"].kubeconfig["clusters"][0]["cluster"]["server"]
                   == fakes[1].url, what="c1 reconnected")
    assert plane.ready(), "a cluster reconnected at run time made the control plane unready"
    status, body = await ready_body(plane)
    assert status == 200 and body["clusters"]["c1"]["state"] == "syncing"
    assert localities(plane) == {"10.1.0.1": "r1/z1/c1"}  # its endpoints stay until the new connection lists

    fakes[1].stall(False)
    await wait_for(lambda: {str(e.locality) for e in plane.catalog.services[MOCKB].endpoints}
                   == {"r2/z2/c1", "r2/z2/c2"}, what="both clusters listed from the released server")
    status, body = await ready_body(plane)
    assert {c: s["state"] for c, s in body["clusters"].items()} == {"c1": "synced", "c2": "synced"}


async def test_ready_body_and_log_say_how_each_cluster_stands(
    fakes: list[FakeKubeAPI], start_plane: Any, tmp_path: Path
) -> None:
    good = fakes[0].write_kubeconfig(tmp_path / "good.yaml", cluster="c1")
    down = fakes[1].write_kubeconfig(tmp_path / "down.yaml", cluster="c2")
    fakes[1].set_unreachable(True)

    def timeouts() -> list[dict[str, Any]]:
        return [e for e in logs if e["event"].startswith("cluster not synced within the sync timeout")
                and e["cluster"] == "down"]

    with structlog.testing.capture_logs() as logs:
        plane = await start_plane(kubeconfigs=(f"good={good}", f"down={down}"), kube=FAST, sync_timeout=0.3)
        await wait_for(lambda: "10.1.0.1" in localities(plane), what="the good cluster synced")
        await wait_for(timeouts, what="the sync timeout logged")
        status, body = await ready_body(plane)
        assert status == 200 and body["ready"] is True
        assert body["clusters"]["good"] == {"state": "synced", "synced": True, "stale": False, "error": "",
                                            "sync_timed_out": False, "origin": f"kubeconfig {good}"}
        timed_out = body["clusters"]["down"]
        assert timed_out["state"] == "sync timed out" and timed_out["sync_timed_out"] is True
        assert timed_out["synced"] is False and timed_out["stale"] is True and "refused" in timed_out["error"]

        fakes[0].set_unreachable(True)  # the good cluster's API server goes away after its first sync
        await wait_for(lambda: plane.clusters.status()["good"]["stale"], what="good stale")
        status, body = await ready_body(plane)
        assert status == 200 and body["ready"] is True
        stale = body["clusters"]["good"]
        assert stale["state"] == "stale" and stale["synced"] is True and "refused" in stale["error"]
        assert localities(plane) == {"10.1.0.1": "r1/z1/good"}  # its last known endpoints are served
        for _ in range(3):
            assert (await ready_body(plane))[0] == 200
    [logged] = timeouts()  # once, however often /ready is asked
    assert logged["log_level"] == "warning" and logged["timeout"] == 0.3 and "refused" in logged["error"]
    stale_logs = [e for e in logs if e["event"] == "cluster stale, keeping last known endpoints"]
    assert any(e["cluster"] == "good" and "refused" in e["error"] for e in stale_logs), stale_logs


async def test_stale_ttl_drops_a_reconnected_cluster_whose_new_server_never_lists(
    fakes: list[FakeKubeAPI], start_plane: Any, tmp_path: Path
) -> None:
    directory = tmp_path / "clusters"
    directory.mkdir()
    fakes[0].write_kubeconfig(directory / "east.yaml", cluster="c1")
    plane = await start_plane(kubeconfig_dirs=(directory,), kube=dataclasses.replace(FAST, stale_ttl=0.5),
                              kubeconfig_dir_interval=0.02)
    await wait_for(lambda: localities(plane) == {"10.1.0.1": "r1/z1/east"}, what="east")
    fakes[1].set_unreachable(True)
    with structlog.testing.capture_logs() as logs:
        _write_atomically(directory / "east.yaml", fakes[1].kubeconfig(cluster="c2"))  # new credentials, a dead server
        await wait_for(lambda: not localities(plane), what="east's endpoints dropped after the stale TTL")
    assert [e for e in logs if "past stale_ttl" in e["event"] and e["cluster"] == "east"]
    fakes[1].set_unreachable(False)  # the new server answers: its endpoints come
    await wait_for(lambda: localities(plane) == {"10.2.0.1": "r2/z2/east"}, what="east from its new server")


async def test_stale_ttl_counts_from_when_the_endpoints_became_stale_not_from_the_reconnect(
    fakes: list[FakeKubeAPI], start_plane: Any, tmp_path: Path
) -> None:
    directory = tmp_path / "clusters"
    directory.mkdir()
    fakes[0].write_kubeconfig(directory / "east.yaml", cluster="c1")
    plane = await start_plane(kubeconfig_dirs=(directory,), kube=dataclasses.replace(FAST, stale_ttl=30),
                              kubeconfig_dir_interval=0.02)
    await wait_for(lambda: localities(plane) == {"10.1.0.1": "r1/z1/east"}, what="east")
    fakes[0].set_unreachable(True)
    await wait_for(lambda: plane.catalog.status()["east"].stale, what="east stale")
    # As if the outage had lasted 29.5 of its 30 s already (the old source's own timer is left as it was).
    plane.catalog.status()["east"].stale_since -= 29.5
    fakes[1].set_unreachable(True)
    _write_atomically(directory / "east.yaml", fakes[1].kubeconfig(cluster="c2"))  # rotated: still no server
    port = fakes[1].url.rsplit(":", 1)[1]
    await wait_for(lambda: port in plane.clusters.status()["east"]["error"], what="the new source failing")
    # the new source never listed; the TTL runs out half a second after the first outage began, not 30 s later
    await wait_for(lambda: not localities(plane), timeout=5, what="dropped on the first outage's clock")


async def test_a_broken_kubeconfig_stops_start_up_naming_it(start_plane: Any, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Config\n")
    with pytest.raises(ValueError, match=f"{bad}: not a kubeconfig"):
        await start_plane(kubeconfigs=(f"x={bad}",))


BROKEN_KUBECONFIGS = {
    "half-written": "apiVersion: v1\nkind: Config\n",
    "not YAML": "clusters: [{name: c1\n",
    "unusable": yaml.safe_dump({"apiVersion": "v1", "kind": "Config", "current-context": "c1",
                                "clusters": [{"name": "c1", "cluster": {"server": "http://127.0.0.1:1"}}],
                                "contexts": [{"name": "c1", "context": {"cluster": "elsewhere", "user": "u"}}],
                                "users": [{"name": "u", "user": {"token": "t"}}]}),
}


@pytest.mark.parametrize("content", BROKEN_KUBECONFIGS.values(), ids=BROKEN_KUBECONFIGS.keys())
async def test_a_broken_kubeconfig_file_keeps_the_running_cluster_until_fixed(
    fakes: list[FakeKubeAPI], start_plane: Any, tmp_path: Path, content: str
) -> None:
    directory = tmp_path / "clusters"
    directory.mkdir()
    path = fakes[0].write_kubeconfig(directory / "c1.yaml", cluster="c1")
    good = path.read_text()
    plane = await start_plane(kubeconfig_dirs=(directory,), kube=FAST, kubeconfig_dir_interval=0.02)
    await wait_for(lambda: localities(plane) == {"10.1.0.1": "r1/z1/c1"}, what="c1 from the directory")
    pushed = published(plane)
    with structlog.testing.capture_logs() as logs:
        path.write_text(content)  # an edit in progress, or a bad one
        fakes[1].write_kubeconfig(directory / "c2.yaml", cluster="c2")  # the directory changes again
        await wait_for(lambda: "10.2.0.1" in localities(plane), what="c2 added: the broken file was read")
        assert "10.1.0.1" in localities(plane), "a broken file removed its running cluster"
        # c1's source still runs: a change in the cluster still arrives
        fakes[0].put("endpointslices", endpoint_slice(
            "mockb-abc", "default", "mockb", [endpoint("10.1.0.2", node_name="node-z1")],
            [{"name": "http", "port": 9000}]))
        await wait_for(lambda: localities(plane).get("10.1.0.2") == "r1/z1/c1", what="c1 still watched")
        fakes[2].write_kubeconfig(directory / "c3.yaml", cluster="c3")  # another scan, c1's file still broken
        await wait_for(lambda: "10.3.0.1" in localities(plane), what="c3 added")
        path.write_text(good)  # fixed
        await wait_for(lambda: any(e["event"] == "cluster configuration readable again" for e in logs),
                       what="the repair logged")
    [error] = unreadable(logs)  # once, though the directory was scanned again with the file still broken
    assert error["cluster"] == "c1" and str(path) in error["error"]
    assert error["error"].startswith({
        "apiVersion: v1\nkind: Config\n": f"{path}: not a kubeconfig (needs clusters and contexts)",
        "clusters: [{name: c1\n": f"{path}:2: invalid YAML: while parsing a flow mapping expected ',' or '}}'",
    }.get(content, f"kubeconfig {path}: cannot be used (context 'c1'): Expected object with name elsewhere")), error
    assert "\n" not in error["error"], error
    assert error["event"] == "cluster configuration unreadable; the cluster keeps running on its last good one"
    assert not [e for e in logs if e["event"] in ("cluster removed", "cluster credentials changed, reconnecting")]
    assert pushed and all("10.1.0.2" in p or "10.1.0.1" in p for p in pushed), f"c1 went away: {pushed}"
    assert plane.clusters.clusters["c1"].kubeconfig == yaml.safe_load(good)


async def test_a_broken_remote_secret_keeps_the_running_cluster_until_fixed(
    fakes: list[FakeKubeAPI], start_plane: Any, tmp_path: Path
) -> None:
    local, remote, other = fakes
    labels = {"meshplane.io/multicluster": "true"}
    good = kubeconfig_secret("remote-east", "meshplane-system", "east", remote.kubeconfig(cluster="c2"), labels=labels)
    local.put("secrets", good)
    path = local.write_kubeconfig(tmp_path / "local.yaml", cluster="c1")
    plane = await start_plane(local_cluster=f"home={path}", remote_secrets_namespace="meshplane-system", kube=FAST)
    await wait_for(lambda: localities(plane).get("10.2.0.1") == "r2/z2/east", what="east from its secret")
    pushed = published(plane)
    with structlog.testing.capture_logs() as logs:
        local.put("secrets", kubeconfig_secret("remote-east", "meshplane-system", "east", "clusters: [oops",
                                               labels=labels))
        local.put("secrets", kubeconfig_secret("remote-west", "meshplane-system", "west",
                                               other.kubeconfig(cluster="c3"), labels=labels))
        await wait_for(lambda: "10.3.0.1" in localities(plane), what="west added: the broken secret was read")
        assert "10.2.0.1" in localities(plane), "a broken secret removed its running cluster"
        remote.put("endpointslices", endpoint_slice(
            "mockb-abc", "default", "mockb", [endpoint("10.2.0.2", node_name="node-z2")],
            [{"name": "http", "port": 9000}]))
        await wait_for(lambda: localities(plane).get("10.2.0.2") == "r2/z2/east", what="east still watched")
        local.put("secrets", kubeconfig_secret("unrelated", "meshplane-system", "north",
                                               other.kubeconfig(cluster="c3", context="north"), labels=labels))
        await wait_for(lambda: "north" in plane.clusters.clusters, what="another sync, east's secret still broken")
        local.put("secrets", good)
        await wait_for(lambda: any(e["event"] == "cluster configuration readable again" for e in logs),
                       what="the repair logged")
    [error] = unreadable(logs)
    assert error["cluster"] == "east"
    assert error["error"].startswith("secret meshplane-system/remote-east key east: invalid YAML: "), error
    assert "\n" not in error["error"], error
    assert not [e for e in logs if e["event"] in ("cluster removed", "cluster credentials changed, reconnecting")]
    assert pushed and all("10.2.0.1" in p or "10.2.0.2" in p for p in pushed), f"east went away: {pushed}"


@pytest.mark.parametrize("vanishes", ["before its stat", "after its stat"])
async def test_a_file_deleted_mid_scan_does_not_stop_the_directory_polling(
    fakes: list[FakeKubeAPI], start_plane: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vanishes: str
) -> None:
    directory = tmp_path / "clusters"
    directory.mkdir()
    fakes[0].write_kubeconfig(directory / "c1.yaml", cluster="c1")
    plane = await start_plane(kubeconfig_dirs=(directory,), kube=FAST, kubeconfig_dir_interval=0.02)
    await wait_for(lambda: "10.1.0.1" in localities(plane), what="c1")
    real_stat = Path.stat

    def racing_stat(self: Path, **kwargs: Any) -> os.stat_result:
        """The file is deleted by someone else right when the scan looks at it."""
        if self.name != "vanishing.yaml":
            return real_stat(self, **kwargs)
        if vanishes == "before its stat":
            self.unlink(missing_ok=True)
            return real_stat(self, **kwargs)
        result = real_stat(self, **kwargs)
        self.unlink(missing_ok=True)
        return result

    monkeypatch.setattr(Path, "stat", racing_stat)
    fakes[1].write_kubeconfig(directory / "vanishing.yaml", cluster="c2")
    await wait_for(lambda: not os.path.exists(directory / "vanishing.yaml"), what="the file seen and gone")
    fakes[2].write_kubeconfig(directory / "c3.yaml", cluster="c3")
    await wait_for(lambda: "10.3.0.1" in localities(plane), what="the directory still polled")
    assert set(plane.clusters.clusters) == {"c1", "c3"}


def _write_atomically(path: Path, doc: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc))
    tmp.replace(path)


async def test_a_kubeconfig_being_written_at_start_is_read_once_whole(
    fakes: list[FakeKubeAPI], start_plane: Any, tmp_path: Path
) -> None:
    """meshplane started while a kubeconfig is still being written (synced from elsewhere as the pod
    starts): cut inside `users:` it is YAML with clusters and contexts, and was taken with a broken
    credential (then reconnected once whole). It is read once, whole."""
    directory = tmp_path / "clusters"
    directory.mkdir()
    text = yaml.safe_dump(fakes[0].kubeconfig(cluster="c1", token="a-token-long-enough-to-cut"))
    cut = text.index("token: ") + len("token: a-token")
    path = directory / "c1.yaml"

    def write() -> None:
        with path.open("w") as out:
            out.write(text[:cut])
            out.flush()
            for piece in (text[cut:cut + 4], text[cut + 4:cut + 8], text[cut + 8:]):  # a tool streaming its output
                time.sleep(0.1)  # less than watch.SETTLE_S: a longer pause before the watch begins goes unseen
                out.write(piece)
                out.flush()

    writing = asyncio.create_task(asyncio.to_thread(write))
    await wait_for(lambda: path.exists() and path.stat().st_size >= cut, what="the file half written")
    with structlog.testing.capture_logs() as logs:
        plane = await start_plane(kubeconfig_dirs=(directory,), kube=FAST, kubeconfig_dir_interval=3600)
        await writing
        await wait_for(lambda: localities(plane) == {"10.1.0.1": "r1/z1/c1"}, what="c1 from the directory")
    assert plane.clusters.clusters["c1"].kubeconfig == yaml.safe_load(text)
    assert not unreadable(logs)
    assert not [e for e in logs if e["event"] == "cluster credentials changed, reconnecting"]


async def test_a_kubeconfig_replaced_with_the_same_size_and_mtime_is_seen(
    fakes: list[FakeKubeAPI], start_plane: Any, tmp_path: Path
) -> None:
    """`rsync -a` (or any copy keeping the mtime) of a kubeconfig of the same size, pointing elsewhere: a new
    file all the same (its inode; and a stat this recent is not trusted, the content is compared)."""
    directory = tmp_path / "clusters"
    directory.mkdir()
    path = fakes[0].write_kubeconfig(directory / "c1.yaml", cluster="c1")
    plane = await start_plane(kubeconfig_dirs=(directory,), kube=FAST, kubeconfig_dir_interval=3600)
    await wait_for(lambda: localities(plane) == {"10.1.0.1": "r1/z1/c1"}, what="c1 from the directory")
    before = path.stat()
    text = yaml.safe_dump(fakes[1].kubeconfig(cluster="c1"))
    assert len(text) == before.st_size  # both fakes on loopback, ports of five digits
    copy = directory / ".c1.yaml.rsync"
    copy.write_text(text)
    os.utime(copy, ns=(before.st_atime_ns, before.st_mtime_ns))
    copy.replace(path)
    await wait_for(lambda: localities(plane) == {"10.2.0.1": "r2/z2/c1"}, what="c1 moved to its new server")
