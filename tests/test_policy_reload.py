"""Hot reload: valid edits are applied, broken ones rejected with file:line, last good kept."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import structlog

from meshplane.discovery import model
from meshplane.policy import reload, rules, validate, worker
from tests import pki
from tests.conftest import wait_for

MOCKB = model.service_key("default", "mockb")


def policy_text(five_xx: int) -> str:
    return textwrap.dedent(f"""\
        apiVersion: meshplane.io/v1
        services:
          - name: mockb
            outlierDetection:
              consecutive5xxErrors: {five_xx}
    """)


BROKEN = textwrap.dedent("""\
    apiVersion: meshplane.io/v1
    services:
      - name: mockb
        outlierDetection:
          consecutive5xxErrors: 1
          interval: 30
""")


WARNS = textwrap.dedent("""\
    apiVersion: meshplane.io/v1
    services:
      - name: mockb
        outlierDetection: {consecutive5xxErrors: 0}
        locality:
          failover: [{from: a, to: b}]
""")


def write(path: Path, text: str) -> None:
    """Replace atomically, as editors and ConfigMap updates do."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def five_xx(policy: rules.Policy) -> int | None:
    od = policy.for_service(MOCKB).outlier_detection
    return None if od is None else od.consecutive_5xx_errors


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[rules.Policy, float]] = []

    def __call__(self, policy: rules.Policy, seen_at: float) -> None:
        self.calls.append((policy, seen_at))


Start = Callable[..., Awaitable[reload.PolicyWatcher]]


@pytest.fixture
async def start_watcher() -> AsyncIterator[Start]:
    watchers: list[reload.PolicyWatcher] = []

    async def start(
        path: Path | None, on_change: Any, interval: float = 0.01
    ) -> reload.PolicyWatcher:
        watcher = reload.PolicyWatcher(path, on_change=on_change, interval=interval)
        await watcher.start()
        watchers.append(watcher)
        return watcher

    yield start
    for watcher in watchers:
        await watcher.stop()


async def test_valid_broken_fixed(tmp_path: Path, start_watcher: Start) -> None:
    path = tmp_path / "policy.yaml"
    write(path, policy_text(1))
    calls = Recorder()
    watcher = await start_watcher(path, calls)
    assert five_xx(watcher.current) == 1
    assert calls.calls == []  # the initial load is not a change

    before = time.monotonic()
    write(path, policy_text(2))
    await wait_for(lambda: calls.calls, timeout=5, what="the valid edit to be applied")
    [(policy, seen_at)] = calls.calls
    assert five_xx(policy) == 2 and watcher.current is policy
    assert before <= seen_at <= time.monotonic()

    with structlog.testing.capture_logs() as logs:
        write(path, BROKEN)
        await wait_for(
            lambda: watcher.last_errors, timeout=5, what="the broken edit to be rejected"
        )
    assert len(calls.calls) == 1
    assert five_xx(watcher.current) == 2
    [problem] = watcher.last_errors
    expected = f"{path}:6: services[0].outlierDetection.interval: duration needs a unit"
    assert str(problem).startswith(expected)
    rejected = [e for e in logs if e["event"] == "policy rejected"]
    assert [e["problem"] for e in rejected] == [str(problem)]
    assert rejected[0]["log_level"] == "error"

    write(path, policy_text(3))
    await wait_for(lambda: len(calls.calls) == 2, timeout=5, what="the fixed file to be applied")
    assert five_xx(calls.calls[1][0]) == 3 and five_xx(watcher.current) == 3
    assert watcher.last_errors == ()


async def test_touch_without_change_is_not_a_change(tmp_path: Path, start_watcher: Start) -> None:
    path = tmp_path / "policy.yaml"
    write(path, policy_text(1))
    calls = Recorder()
    # Polled by hand (the task would sleep for an hour), so each poll's outcome is known.
    watcher = await start_watcher(path, calls, interval=3600)
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns - 10_000_000_000))
    assert await watcher.poll() is False
    path.write_text(policy_text(1))  # rewritten in place, same bytes
    assert await watcher.poll() is False
    assert calls.calls == []

    path.write_text(policy_text(4))  # same size, same inode: only the content tells
    assert await watcher.poll() is True
    assert [five_xx(p) for p, _ in calls.calls] == [4]


async def test_edit_within_the_timestamp_granularity_is_seen(
    tmp_path: Path, start_watcher: Start
) -> None:
    """Coarse mtimes: a second same-size edit in place may leave the whole stat unchanged."""
    path = tmp_path / "policy.yaml"
    write(path, policy_text(1))
    calls = Recorder()
    watcher = await start_watcher(path, calls, interval=3600)
    frozen = time.time_ns()
    os.utime(path, ns=(frozen, frozen))
    assert await watcher.poll() is False
    path.write_text(policy_text(6))
    os.utime(path, ns=(frozen, frozen))
    assert await watcher.poll() is True
    assert five_xx(watcher.current) == 6


async def test_broken_file_is_reported_once(tmp_path: Path, start_watcher: Start) -> None:
    path = tmp_path / "policy.yaml"
    write(path, policy_text(1))
    watcher = await start_watcher(path, Recorder(), interval=3600)
    with structlog.testing.capture_logs() as logs:
        write(path, BROKEN)
        assert await watcher.poll() is False
        os.utime(path)
        assert await watcher.poll() is False
    assert [e["event"] for e in logs].count("policy rejected") == 1


async def test_deleted_file_keeps_the_last_good(tmp_path: Path, start_watcher: Start) -> None:
    path = tmp_path / "policy.yaml"
    write(path, policy_text(1))
    calls = Recorder()
    watcher = await start_watcher(path, calls)
    path.unlink()
    await wait_for(lambda: watcher.last_errors, timeout=5, what="the missing file to be reported")
    assert watcher.last_errors[0].line == 0 and "cannot read" in watcher.last_errors[0].reason
    assert five_xx(watcher.current) == 1 and calls.calls == []
    write(path, policy_text(5))
    await wait_for(lambda: calls.calls, timeout=5, what="the restored file to be applied")
    assert five_xx(watcher.current) == 5


async def test_async_callback_and_warnings(tmp_path: Path, start_watcher: Start) -> None:
    path = tmp_path / "policy.yaml"
    write(path, policy_text(1))
    seen: list[rules.Policy] = []

    async def on_change(policy: rules.Policy, seen_at: float) -> None:
        await asyncio.sleep(0)
        seen.append(policy)

    watcher = await start_watcher(path, on_change)
    with structlog.testing.capture_logs() as logs:
        write(path, WARNS)
        await wait_for(lambda: seen, timeout=5, what="the edit with a warning to be applied")
    [policy] = seen
    assert policy.for_service(MOCKB).locality.failover == (rules.FailoverRule("a", "b"),)
    warnings = [e for e in logs if e["event"] == "policy warning"]
    assert len(warnings) == 1 and "failover needs outlier detection" in warnings[0]["problem"]
    assert watcher.last_warnings and watcher.last_errors == ()


async def test_a_failing_callback_does_not_stop_the_watcher(
    tmp_path: Path, start_watcher: Start
) -> None:
    path = tmp_path / "policy.yaml"
    write(path, policy_text(1))
    calls = Recorder()

    def on_change(policy: rules.Policy, seen_at: float) -> None:
        calls(policy, seen_at)
        if len(calls.calls) == 1:
            raise RuntimeError("push failed")

    watcher = await start_watcher(path, on_change)
    with structlog.testing.capture_logs():
        write(path, policy_text(2))
        await wait_for(lambda: calls.calls, timeout=5, what="the first edit")
    write(path, policy_text(3))
    await wait_for(lambda: len(calls.calls) == 2, timeout=5, what="the second edit after a failure")
    assert five_xx(watcher.current) == 3


async def test_invalid_first_load_raises(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    write(path, BROKEN)
    watcher = reload.PolicyWatcher(path, on_change=Recorder())
    with pytest.raises(validate.PolicyError) as info:
        await watcher.start()
    assert str(info.value) == (
        f"{path}:6: services[0].outlierDetection.interval: "
        "duration needs a unit, e.g. 30s (got 30; units: ms, s, m, h)"
    )
    assert info.value.problems == watcher.last_errors
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("policy-watcher")]


async def test_missing_file_at_start_raises(tmp_path: Path) -> None:
    watcher = reload.PolicyWatcher(tmp_path / "nope.yaml", on_change=Recorder())
    with pytest.raises(validate.PolicyError, match=r"^--policy \S+/nope\.yaml: cannot read it: No such file or dir"):
        await watcher.start()


async def test_no_path_is_the_default_policy() -> None:
    watcher = reload.PolicyWatcher(None, on_change=Recorder())
    await watcher.start()
    assert watcher.current == rules.Policy()
    assert await watcher.poll() is False
    await watcher.stop()


async def test_stop_leaves_no_task(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    write(path, policy_text(1))
    watcher = reload.PolicyWatcher(path, on_change=Recorder(), interval=0.01)
    await watcher.start()
    [task] = [t for t in asyncio.all_tasks() if t.get_name() == f"policy-watcher:{path}"]
    await watcher.stop()
    assert task.done() and task.cancelled()
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("policy-watcher")]
    await watcher.stop()  # idempotent


def _routes(names: list[str]) -> str:
    """A gateway's routes, each to a service no source knows (a warning each, once discovery is known)."""
    routes = "".join(f"  - name: {n}\n    parentRefs: [{{name: edge}}]\n    rules:\n"
                     f"      - backendRefs: [{{name: {n}, port: 8000}}]\n" for n in names)
    return ("apiVersion: meshplane.io/v2\ngateways:\n  - name: edge\n    listeners: [{name: http, port: 8080}]\n"
            + (f"routes:\n{routes}" if names else ""))


async def test_a_warning_is_logged_when_it_appears_and_when_it_goes_and_counted_in_between(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    write(path, _routes([]))
    counted: list[tuple[int, int]] = []
    # Polled by hand (no inotify, no poll for an hour), so each edit is one reload.
    watcher = reload.PolicyWatcher(path, on_change=Recorder(), interval=3600, inotify=False,
                                   known=lambda: validate.Known(services={}, clusters=frozenset()),
                                   on_warnings=lambda in_force, repeated: counted.append((in_force, repeated)))
    await watcher.start()
    try:
        names: list[str] = []
        with structlog.testing.capture_logs() as logs:
            for i in range(20):  # routes added one at a time
                names.append(f"r{i:02}")
                write(path, _routes(names))
                assert await watcher.poll() is True
        warned = [e for e in logs if e["event"] == "policy warning"]
        assert [e["field"] for e in warned] == [f"routes[{i}].rules[0].backendRefs[0].name" for i in range(20)]
        assert all(e["log_level"] == "warning" for e in warned)
        assert counted[-20:] == [(i + 1, i) for i in range(20)]  # in force; found again, not logged
        assert len(watcher.last_warnings) == 20

        with structlog.testing.capture_logs() as logs:
            write(path, _routes(["a-first", *names]))  # above the others: their lines and indexes move
            assert await watcher.poll() is True
        assert [e["problem"] for e in logs if e["event"] == "policy warning"] == [
            f"{path}:9: routes[0].rules[0].backendRefs[0].name: no source knows service default/a-first yet"]

        with structlog.testing.capture_logs() as logs:
            write(path, _routes(["a-first", *names[1:]]))  # r00 goes, and its warning with it
            assert await watcher.poll() is True
        assert [e["event"] for e in logs if "warning" in e["event"]] == ["policy warning resolved"]
        [gone] = [e for e in logs if e["event"] == "policy warning resolved"]
        assert "default/r00" in gone["problem"] and gone["log_level"] == "info"
        assert counted[-1] == (20, 20)
    finally:
        await watcher.stop()


async def test_a_worker_process_that_dies_is_replaced_and_the_edit_applied(tmp_path: Path,
                                                                         start_watcher: Start) -> None:
    path = tmp_path / "policy.yaml"
    write(path, policy_text(1))
    calls = Recorder()
    watcher = await start_watcher(path, calls, interval=3600)
    dead = worker._process
    assert dead is not None
    dead.kill()  # as the OOM killer would
    dead.wait()
    write(path, policy_text(2))
    with structlog.testing.capture_logs() as logs:
        assert await watcher.poll() is True
    assert five_xx(watcher.current) == 2
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
        "policy worker process failed; starting another"]
    assert worker._process is not None and worker._process.pid != dead.pid


def test_the_worker_process_ends_with_meshplane_however_meshplane_ends(tmp_path: Path) -> None:
    """Killed with SIGKILL (no atexit, no finally), meshplane leaves no worker behind: its stdin closes."""
    script = ("import asyncio, os, signal\nfrom meshplane.policy import worker\n"
              "asyncio.run(worker.load(b'apiVersion: meshplane.io/v1', path='p.yaml', known=None))\n"
              "print(worker._process.pid, flush=True)\nos.kill(os.getpid(), signal.SIGKILL)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr
    pid = int(done.stdout)
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid), f"worker {pid} outlived meshplane"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its parent (init, here) has yet to reap it


def _tls_policy(routes: int = 1) -> str:
    return ("apiVersion: meshplane.io/v2\ngateways:\n  - name: edge\n    listeners:\n"
            "      - {name: https, port: 8443, protocol: HTTPS, hostname: example.com,\n"
            "         tls: {certificateFile: c.pem, keyFile: k.pem}}\nroutes:\n" + "".join(
                f"  - name: r{i}\n    parentRefs: [{{name: edge}}]\n    rules:\n"
                f"      - backendRefs: [{{name: mockb, port: 8000}}]\n" for i in range(routes)))


def _served(policy: rules.Policy) -> bytes:
    tls = policy.gateways[0].listeners[0].tls
    assert tls is not None
    return tls.certificate


@pytest.mark.parametrize("when", ["at start-up", "on an edit"])
async def test_a_certificate_rotated_while_the_policy_is_validated_is_loaded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str) -> None:
    """The worker reads the files a policy names: a rotation landing while it validates (seconds for a big
    policy) is not taken for the version it read."""
    ca = pki.CA()
    old, new = ca.issue("example.com", dns=("example.com",)), ca.issue("example.com", dns=("example.com",))
    pki.write(tmp_path / "c.pem", old[0])
    pki.write(tmp_path / "k.pem", old[1])
    path = tmp_path / "policy.yaml"
    write(path, _tls_policy())
    real, rotations = worker.load, []

    async def rotating(data: bytes, *, path: str, known: validate.Known | None) -> validate.LoadResult:
        result = await real(data, path=path, known=known)  # the worker has read the old pair
        if not rotations:
            rotations.append(1)
            pki.write(tmp_path / "c.pem", new[0])
            pki.write(tmp_path / "k.pem", new[1])
        return result

    if when == "at start-up":
        monkeypatch.setattr(worker, "load", rotating)
    watcher = reload.PolicyWatcher(path, on_change=Recorder(), interval=0.02)
    await watcher.start()
    try:
        assert _served(watcher.current) == old[0]  # what the worker read
        await watcher.watching()
        if when == "on an edit":
            monkeypatch.setattr(worker, "load", rotating)
            write(path, _tls_policy(2))
        await wait_for(lambda: _served(watcher.current) == new[0], timeout=5, what="the rotated certificate served")
    finally:
        await watcher.stop()
