"""The policy worker process can hold up nothing: a validation past its deadline is stopped and the edit
rejected naming the file; an edit the worker dies on is rejected, never validated in meshplane's own
process; a stopped watcher stops its validation; a dead worker is reaped at once; Ctrl-C on `serve` is
meshplane's to handle, not the worker's (no traceback)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import structlog

from meshplane.demo.ports import free_port
from meshplane.policy import reload, rules, validate, worker
from tests.conftest import wait_for
from tests.test_half_written import Applied, _policy


def _state(pid: int) -> str:
    """The process's state letter (Z: a zombie, ended and not reaped), or "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def _read_bytes(pid: int) -> int:
    """How many bytes the process has read (its request on stdin among them)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError(f"no rchar for {pid}")


async def _started(path: Path, applied: Applied, *, inotify: bool = False) -> reload.PolicyWatcher:
    """A watcher whose edits are polled by the test (or, with inotify, seen by its watch)."""
    watcher = reload.PolicyWatcher(path, on_change=applied, interval=3600, inotify=inotify)
    await watcher.start()
    await watcher.watching()  # its first look taken: it cannot race the test's polls
    return watcher


async def _validating(path: Path, text: str, *, by_watch: bool = False
                      ) -> tuple[int, asyncio.Task[bool] | None, reload.PolicyWatcher, Applied]:
    """A watcher on `path`, then `text` written and polled (by the test, or by the watcher's own watch):
    once the worker has read the request, its pid and the test's poll."""
    path.write_text(_policy(1))
    applied = Applied()
    watcher = await _started(path, applied, inotify=by_watch)
    assert worker._process is not None
    pid = worker._process.pid
    before = _read_bytes(pid)
    path.write_text(text)
    poll = None if by_watch else asyncio.create_task(watcher.poll())
    await wait_for(lambda: _read_bytes(pid) >= before + len(text), what="the worker given the edit")
    return pid, poll, watcher, applied


async def test_a_validation_past_its_deadline_is_stopped_and_the_edit_rejected_naming_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(_policy(1))
    applied = Applied()
    watcher = await _started(path, applied)
    try:
        assert worker._process is not None
        slow = worker._process.pid
        monkeypatch.setattr(worker, "DEADLINE_S", 0.2)  # 1,500 routes take seconds
        path.write_text(_policy(1500))
        with structlog.testing.capture_logs() as logs:
            assert await watcher.poll() is False
        [problem] = watcher.last_errors
        assert str(problem) == (f"--policy {path}: validating it took longer than 0.2 s, and it was stopped "
                                "(`meshplane validate` shows how long it takes)")
        assert next(e["event"] for e in logs if e["log_level"] == "error") == (
            "policy validation took too long and was stopped")
        await wait_for(lambda: _state(slow) in ("", "Z"), what="the worker killed")
        assert len(watcher.current.routes) == 1 and applied.routes() == []
        monkeypatch.setattr(worker, "DEADLINE_S", 60.0)
        path.write_text(_policy(2))  # the next edit: another worker
        assert await watcher.poll() is True
        assert applied.routes() == [2] and worker._process is not None and worker._process.pid != slow
    finally:
        await watcher.stop()


async def test_an_edit_the_worker_dies_on_is_rejected_and_never_validated_in_meshplane(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    with structlog.testing.capture_logs() as logs:
        pid, poll, watcher, applied = await _validating(path, _policy(2000))
        try:
            os.kill(pid, signal.SIGKILL)  # as the OOM killer would, on this edit
            assert poll is not None and await poll is False
        finally:
            await watcher.stop()
    [problem] = watcher.last_errors
    assert str(problem) == (f"--policy {path}: the policy worker process died validating it (killed by SIGKILL; "
                            "out of memory?): the edit is not validated again")
    assert applied.routes() == [] and len(watcher.current.routes) == 1
    events = [e["event"] for e in logs]
    assert "the policy worker process died validating the policy; the next edit starts another" in events
    assert not [e for e in events if "own process" in e or "starting another" in e], events


async def test_validation_runs_in_meshplane_only_where_no_worker_can_be_started(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    worker._stop()
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python-here"))
    path = tmp_path / "policy.yaml"
    path.write_text(_policy(3))
    with structlog.testing.capture_logs() as logs:
        watcher = await _started(path, Applied())
    await watcher.stop()
    assert len(watcher.current.routes) == 3 and worker._process is None
    assert [e["event"] for e in logs if e["log_level"] == "error"] == [
        "no policy worker process can be started; validating in meshplane's own process"]


async def test_stopping_a_watcher_stops_its_validation(tmp_path: Path) -> None:
    """What a Ctrl-C or SIGTERM of `serve` does during a reload: nothing waits for the validation."""
    pid, _, watcher, applied = await _validating(tmp_path / "policy.yaml", _policy(3000), by_watch=True)
    await watcher.stop()
    await wait_for(lambda: _state(pid) == "", what="the validating worker killed and reaped")
    assert applied.routes() == []
    assert await worker.load(b"apiVersion: meshplane.io/v2\n", path="p.yaml", known=None) == (
        validate.LoadResult(rules.Policy(), (), ()))  # the next validation gets a worker of its own


async def test_a_worker_that_dies_idle_is_reaped_at_once(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(_policy(1))
    watcher = await _started(path, Applied())
    try:
        assert worker._process is not None
        pid = worker._process.pid
        os.kill(pid, signal.SIGKILL)
        await wait_for(lambda: _state(pid) == "", what="the dead worker reaped, with no reload to notice it")
    finally:
        await watcher.stop()


@pytest.mark.parametrize("when", ["idle", "validating"])
async def test_ctrl_c_on_serve_prints_no_traceback_and_leaves_no_worker(tmp_path: Path, when: str) -> None:
    """A terminal's Ctrl-C: SIGINT to the whole foreground process group of `meshplane serve`."""
    path = tmp_path / "policy.yaml"
    path.write_text(_policy(1))
    http_port = free_port()
    serve = subprocess.Popen(
        [sys.executable, "-m", "meshplane", "serve", "--policy", str(path), "--ads", "127.0.0.1:0",
         "--http", f"127.0.0.1:{http_port}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True)  # its own process group, as a shell gives a job
    assert serve.stderr is not None
    lines: list[str] = []
    reader = asyncio.create_task(asyncio.to_thread(lambda: lines.extend(serve.stderr or ())))
    try:
        await wait_for(lambda: any("policy applied" in line.decode() for line in lines) or serve.poll() is not None,
                       timeout=30, what="serve loading its policy (its signal handlers set)")
        workers = _children(serve.pid)
        assert len(workers) == 1, workers
        if when == "validating":
            before = _read_bytes(workers[0])
            text = _policy(3000)
            path.write_text(text)
            await wait_for(lambda: _read_bytes(workers[0]) >= before + len(text), timeout=30,
                           what="the worker given the edit")
        os.killpg(serve.pid, signal.SIGINT)
        status = await asyncio.to_thread(serve.wait, 30)
        await reader
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
        serve.stderr.close()
    stderr = b"".join(lines).decode()
    assert status == 0, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert "starting another" not in stderr, stderr
    await wait_for(lambda: _state(workers[0]) in ("", "Z"), what="the worker ended with serve")


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == pid:
                found.append(int(entry.name))
    return found
