"""Edits seen at once: endpoint files, the policy and a kubeconfig directory watched with inotify, polled
where that is unavailable; and an endpoint file edit costing what it changed."""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import asyncinotify
import pytest
import structlog
import yaml

from meshplane import aio
from meshplane import watch as watch_mod
from meshplane.discovery import catalog as catalog_mod
from meshplane.discovery import filemodel, fileparse, filesource, model
from meshplane.policy import reload
from meshplane.xds import metrics as metrics_mod
from tests.conftest import cluster_doc, wait_for, write_yaml

NEVER = 3600.0
"""A poll interval no test waits for: what it sees, inotify told it."""


def _doc(*ports: int, health: str = "healthy") -> dict[str, Any]:
    return cluster_doc("c1", "r1", {f"svc{i}": [{"zone": "z1", "port": port, "health": health}]
                                    for i, port in enumerate(ports)})


def _ports(catalog: catalog_mod.Catalog, name: str) -> list[int]:
    service = catalog.services.get(model.ServiceKey(f"default/{name}"))
    return [] if service is None else [ep.port_for("http") or 0 for ep in service.endpoints]


@pytest.mark.parametrize("how", ["rewrite", "rename over", "configmap swap"])
async def test_an_endpoint_file_edit_is_seen_at_once_without_polling(tmp_path: Path, how: str) -> None:
    if how == "configmap swap":  # a ConfigMap volume: file -> ..data/file, ..data -> a timestamped directory
        (tmp_path / "..2026_1").mkdir()
        write_yaml(tmp_path / "..2026_1" / "c1.yaml", _doc(9001))
        (tmp_path / "..data").symlink_to("..2026_1")
        (tmp_path / "c1.yaml").symlink_to("..data/c1.yaml")
    else:
        write_yaml(tmp_path / "c1.yaml", _doc(9001))
    catalog = catalog_mod.Catalog()
    source = filesource.FileSource(tmp_path / "c1.yaml", interval=NEVER)
    await source.start(catalog)
    try:
        assert _ports(catalog, "svc0") == [9001]
        start = time.monotonic()
        if how == "rewrite":
            (tmp_path / "c1.yaml").write_text(yaml.safe_dump(_doc(9002)))
        elif how == "rename over":
            write_yaml(tmp_path / "c1.yaml", _doc(9002))
        else:  # what the kubelet does: a new directory, a new ..data link renamed over the old one
            (tmp_path / "..2026_2").mkdir()
            write_yaml(tmp_path / "..2026_2" / "c1.yaml", _doc(9002))
            (tmp_path / "..data_tmp").symlink_to("..2026_2")
            os.rename(tmp_path / "..data_tmp", tmp_path / "..data")
        await wait_for(lambda: _ports(catalog, "svc0") == [9002], timeout=2, what="the edit seen")
        assert time.monotonic() - start < 1.0
    finally:
        await source.stop()


async def test_polling_is_the_fallback_and_sees_a_rewrite_in_the_same_tick(tmp_path: Path) -> None:
    """Without inotify, every poll stats the file; a second write with the same size, inode and mtime (the
    same timestamp tick) is still seen, because a stat that recent is not trusted: the content is hashed."""
    path = write_yaml(tmp_path / "c1.yaml", _doc(9001))
    catalog = catalog_mod.Catalog()
    source = filesource.FileSource(path, interval=0.02, inotify=False)
    await source.start(catalog)
    try:
        before = os.stat(path)
        path.write_text(path.read_text().replace("9001", "9002"))  # same size
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # the same tick
        assert os.stat(path).st_mtime_ns == before.st_mtime_ns and os.stat(path).st_size == before.st_size
        await wait_for(lambda: _ports(catalog, "svc0") == [9002], timeout=2, what="the same-tick rewrite seen")
    finally:
        await source.stop()


async def test_a_policy_edit_and_a_configmap_swap_are_seen_at_once(tmp_path: Path) -> None:
    (tmp_path / "..v1").mkdir()
    (tmp_path / "..v1" / "policy.yaml").write_text("apiVersion: meshplane.io/v1\n")
    (tmp_path / "..data").symlink_to("..v1")
    (tmp_path / "policy.yaml").symlink_to("..data/policy.yaml")
    applied: list[Any] = []
    watcher = reload.PolicyWatcher(tmp_path / "policy.yaml", interval=NEVER,
                                   on_change=lambda policy, seen_at: applied.append(policy))
    await watcher.start()
    try:
        (tmp_path / "..v2").mkdir()
        (tmp_path / "..v2" / "policy.yaml").write_text(
            "apiVersion: meshplane.io/v1\ndefaults:\n  connectTimeout: 250ms\n")
        (tmp_path / "..data_tmp").symlink_to("..v2")
        os.rename(tmp_path / "..data_tmp", tmp_path / "..data")
        await wait_for(lambda: applied, timeout=2, what="the swapped policy applied")
        assert applied[-1].defaults.connect_timeout_ms == 250
    finally:
        await watcher.stop()


# --- an edit costs what it changed ---------------------------------------------------------------

def _many(n: int, changed: int | None = None) -> str:
    return yaml.safe_dump(cluster_doc("c1", "r1", {
        f"svc{i}": [{"zone": "z1", "port": 9000 + (1 if i == changed else 0)}] for i in range(n)}), sort_keys=False)


def test_only_the_entries_whose_text_changed_are_parsed_again(monkeypatch: pytest.MonkeyPatch) -> None:
    _, parsed, changed, removed = fileparse.parse_changed(_many(50), path="c1.yaml", last=None)
    assert len(changed) == 50 and not removed
    calls: list[int] = []
    real = filemodel.service
    monkeypatch.setattr(filemodel, "service", lambda *a, **k: calls.append(1) or real(*a, **k))
    _, again, changed, removed = fileparse.parse_changed(_many(50, changed=7), path="c1.yaml", last=parsed)
    assert list(changed) == [model.ServiceKey("default/svc7")] and not removed
    assert len(calls) == 1  # one entry parsed, 49 reused
    assert again.services == fileparse.parse_whole(_many(50, changed=7), path="c1.yaml")[1]
    # An entry moved is not a change; one removed is reported removed.
    text = _many(50, changed=7)
    layout = fileparse.split(text)
    assert layout is not None
    moved = layout.rest + "".join(reversed(layout.entries[1:]))
    _, _, changed, removed = fileparse.parse_changed(moved, path="c1.yaml", last=again)
    assert not changed and removed == {model.ServiceKey("default/svc0")}


@pytest.mark.parametrize("text", [
    # entries at the key's indentation, comments and blank lines between them
    "cluster: c1\nregion: r1\nservices:\n- name: a\n  ports: [{name: http, port: 80}]\n\n# b\n- name: b\n"
    "  ports: [{name: http, port: 80}]\n",
    # indented entries, a key after the list
    "cluster: c1\nservices:\n  - name: a\n    ports: [{name: http, port: 80}]\n  - name: b\n"
    "    ports: [{name: http, port: 80}]\nregion: r1\n",
    # flow style: parsed whole
    "cluster: c1\nregion: r1\nservices: [{name: a, ports: [{name: http, port: 80}]}, {name: b, ports: "
    "[{name: http, port: 80}]}]\n",
    # an anchor in one entry used in another: parsed whole
    "cluster: c1\nregion: r1\nservices:\n- name: a\n  ports: &p [{name: http, port: 80}]\n- name: b\n  ports: *p\n",
])
def test_every_layout_parses_as_the_whole_file_does(text: str) -> None:
    cluster, parsed, changed, _ = fileparse.parse_changed(text, path="c1.yaml", last=None)
    assert (cluster, parsed.services) == fileparse.parse_whole(text, path="c1.yaml")
    assert sorted(changed) == [model.ServiceKey("default/a"), model.ServiceKey("default/b")]


@pytest.mark.parametrize("text", [
    "cluster: c1\nregion: r1\nservices:\n- name: a\n  ports: [{name: http, port: 0}]\n",
    "cluster: c1\nregion: r1\nservices:\n- name: a\n  ports: [{name: http, port: 80}]\n- name: a\n"
    "  ports: [{name: http, port: 80}]\n",
    "cluster: c1\nservices:\n- name: a\n  ports: [{name: http, port: 80}]\n",
    "cluster: c1\nregion: r1\nservices:\n- name: a\n  ports: [{name: http, port: 80}\n",
])
def test_errors_are_the_whole_files(text: str) -> None:
    with pytest.raises(fileparse.EndpointFileError) as whole:
        fileparse.parse_whole(text, path="c1.yaml")
    with pytest.raises(fileparse.EndpointFileError) as changed:
        fileparse.parse_changed(text, path="c1.yaml", last=None)
    assert str(changed.value) == str(whole.value)


def test_the_catalog_compares_only_what_a_source_says_changed() -> None:
    catalog = catalog_mod.Catalog()
    one = fileparse.parse(_many(3), path="c1.yaml")[1]
    catalog.apply(model.ClusterId("c1"), one, seen_at=0.0)
    two = fileparse.parse(_many(3, changed=1), path="c1.yaml")[1]
    key = model.ServiceKey("default/svc1")
    change = catalog.update(model.ClusterId("c1"), {key: two[key]}, seen_at=1.0)
    assert change is not None and change.services == {key}
    assert catalog.update(model.ClusterId("c1"), {key: two[key]}, seen_at=2.0) is None  # equal: nothing
    change = catalog.update(model.ClusterId("c1"), {}, [model.ServiceKey("default/svc0")], seen_at=3.0)
    assert change is not None and change.services == {model.ServiceKey("default/svc0")}
    assert sorted(catalog.services) == [model.ServiceKey("default/svc1"), model.ServiceKey("default/svc2")]


async def test_a_watch_stops_when_cancelled_however_busy_its_directory(tmp_path: Path) -> None:
    """Cancelled at any moment while events pour in, a watch ends and closes its inotify descriptor
    (with asyncio.wait_for, Python 3.11 swallowed a cancellation that met a completed read: the watch
    kept running, stop() waited for ever, and each such watch kept a descriptor open)."""
    path = tmp_path / "c1.yaml"
    path.write_text("x")
    writing = True

    async def writer() -> None:
        i = 0
        while writing:
            path.write_text(str(i))
            i += 1
            await asyncio.sleep(0.0005)

    async def watching() -> None:
        async for _ in watch_mod.Watch([path], interval=0.002).events():
            pass

    busy = asyncio.create_task(writer())
    rng = random.Random(7)
    try:
        for n in range(150):
            task = asyncio.create_task(watching())
            await asyncio.sleep(rng.random() * 0.01)
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=1.0)
            assert done, f"watch {n} still running 1 s after it was cancelled"
    finally:
        writing = False
        await busy


async def test_a_watch_costs_nothing_while_its_owner_awaits_between_looks(tmp_path: Path) -> None:
    """An owner may await between looks (the policy watcher awaits its worker process for seconds):
    meanwhile events in the directory queue up, and the event loop is not woken for them at every turn."""
    watched, other = tmp_path / "policy.yaml", tmp_path / "c1.yaml"
    watched.write_text("x")
    cpu: list[float] = []

    async def owner() -> None:
        async for _ in watch_mod.Watch([watched], interval=NEVER).events():
            other.write_text("an event in the directory, for another file")
            began = time.process_time()
            await asyncio.sleep(1.0)  # as a validation in the worker process
            cpu.append(time.process_time() - began)
            return

    await asyncio.wait_for(owner(), 10)
    assert cpu[0] < 0.1, f"the event loop spun for {cpu[0]:.2f} s of CPU while the owner waited 1 s"


async def test_an_endpoint_edit_of_many_entries_is_parsed_while_the_loop_goes_on(tmp_path: Path) -> None:
    """Every entry of 10,000 changed: about a second of parsing, off the event loop (ordering, not timing:
    the loop keeps turning between meshplane's read of the file and the catalog's change)."""
    n = 10_000
    path = tmp_path / "c1.yaml"
    path.write_text(_many(n))
    catalog = catalog_mod.Catalog()
    source = filesource.FileSource(path, interval=NEVER)
    await source.start(catalog)
    changed: list[float] = []
    catalog.subscribe(lambda change: changed.append(time.monotonic()))
    read, turns, stop = threading.Event(), [], asyncio.Event()
    at: dict[str, float] = {}

    def reader_closed() -> None:  # as another program would see it: meshplane closing the file it read
        with asyncinotify.Inotify(sync_timeout=60) as notify:
            notify.add_watch(tmp_path, asyncinotify.Mask.CLOSE_NOWRITE)
            read.set()
            while (event := notify.sync_get()) is not None and str(event.name) != "c1.yaml":
                pass
        at["read"] = time.monotonic()

    async def turning() -> None:
        while not stop.is_set():
            turns.append(time.monotonic())
            await asyncio.sleep(0.005)

    try:
        await source.watching()
        closed = asyncio.create_task(asyncio.to_thread(reader_closed))
        await asyncio.to_thread(read.wait, 10)
        ticker = asyncio.create_task(turning())
        write_yaml(path, cluster_doc("c1", "r1", {f"svc{i}": [{"zone": "z1", "port": 9001}] for i in range(n)}))
        await closed
        await wait_for(lambda: changed, timeout=60, what="the edit applied")
        stop.set()
        await ticker
    finally:
        await source.stop()
    assert _ports(catalog, "svc9999") == [9001]
    assert [t for t in turns if at["read"] < t < changed[0]], "the loop did not turn while the file was parsed"


@pytest.mark.parametrize("owner", ["endpoint file", "policy"])
async def test_a_watching_task_that_fails_logs_counts_and_carries_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, owner: str) -> None:
    """A bug in the watch itself (not in one look) used to end the task silently: later edits were never seen."""
    task = "endpoint-file" if owner == "endpoint file" else "policy-watcher"
    before = aio.task_errors().get(task, 0)
    unsettled, failures = watch_mod.Watch._unsettled, []

    def failing_once(self: watch_mod.Watch, now: float) -> float | None:
        if not failures:
            failures.append(now)
            raise RuntimeError("a bug of ours")
        return unsettled(self, now)

    catalog = catalog_mod.Catalog()
    applied: list[Any] = []
    if owner == "endpoint file":
        path = write_yaml(tmp_path / "c1.yaml", _doc(9001))
        running: Any = filesource.FileSource(path, interval=0.02)
        await running.start(catalog)
    else:
        path = tmp_path / "policy.yaml"
        path.write_text("apiVersion: meshplane.io/v1\n")
        running = reload.PolicyWatcher(path, interval=0.02, on_change=lambda policy, seen_at: applied.append(policy))
        await running.start()
    try:
        with structlog.testing.capture_logs() as logs:
            monkeypatch.setattr(watch_mod.Watch, "_unsettled", failing_once)
            await wait_for(lambda: failures, what="the watch failing")
            if owner == "endpoint file":
                write_yaml(path, _doc(9002))
                await wait_for(lambda: _ports(catalog, "svc0") == [9002], what="the edit after the failure")
            else:
                path.write_text("apiVersion: meshplane.io/v1\ndefaults:\n  connectTimeout: 250ms\n")
                await wait_for(lambda: applied, what="the edit after the failure")
    finally:
        await running.stop()
    [said] = [e for e in logs if e["event"] == f"{task} failed; starting it again"]
    assert said["log_level"] == "error" and said["path"] == str(path)
    assert aio.task_errors()[task] == before + 1
    sample = metrics_mod.Metrics().registry.get_sample_value("meshplane_task_errors_total", {"task": task})
    assert sample == before + 1
