"""A file is read only once its write is complete: rewrites in place (`cp`, `cat >`, a writer holding the
file open and writing pieces with pauses) are never read half written, with inotify or by polling; and an
edit that drops most of what a file gave is applied only once the file keeps it, and said loudly."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml

from meshplane import hold, watch
from meshplane.discovery import catalog as catalog_mod
from meshplane.discovery import filesource
from meshplane.policy import reload, rules, worker
from tests.conftest import cluster_doc, wait_for, write_yaml

WRITER = textwrap.dedent("""\
    import sys, time
    path, pause, reopen = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "reopen"
    pieces = sys.stdin.buffer.read().split(b"\\0")
    if reopen:  # truncate and close, then write it all a moment later (some tools do)
        open(path, "wb").close()
        time.sleep(pause)
    with open(path, "wb") as out:  # truncates, as cp and the shell's > do
        for piece in pieces:
            out.write(piece)
            out.flush()
            time.sleep(pause)
""")


async def write_slowly(path: Path, pieces: list[bytes], *, pause: float, reopen: bool = False) -> None:
    """A writer process: truncates `path`, then writes `pieces` one by one with `pause` after each, holding
    the file open all along (a generator streaming its output, a slow copy)."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(pause), "reopen" if reopen else "-"],
                            stdin=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(b"\0".join(pieces))
    proc.stdin.close()
    assert await asyncio.to_thread(proc.wait) == 0


async def shell(command: str) -> None:
    """Run `command` as an operator's shell would, while the event loop goes on (and the watchers with it)."""
    proc = await asyncio.create_subprocess_shell(command)
    assert await proc.wait() == 0, command


def pieces_of(text: str, *, at: str, count: int) -> list[bytes]:
    """`text` cut into about `count` pieces, each ending just before a line starting with `at` (an entry):
    every piece written so far is a valid document, only shorter."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.startswith(at)]
    cuts = starts[:: max(1, len(starts) // count)][1:]
    bounds = [0, *cuts, len(lines)]
    return ["".join(lines[a:b]).encode() for a, b in itertools.pairwise(bounds)]


async def watching(owner: filesource.FileSource | reload.PolicyWatcher) -> None:
    """Until the owner's watch is set up and has looked once (with inotify: a write before that is only seen
    by its stat)."""
    async with asyncio.timeout(5):
        await owner.watching()


def _endpoints(n: int, port: int) -> dict[str, Any]:
    return cluster_doc("c1", "r1", {f"svc{i}": [{"zone": "z1", "port": port}] for i in range(n)})


def _ports(catalog: catalog_mod.Catalog) -> set[int]:
    return {ep.port_for("http") or 0 for s in catalog.services.values() for ep in s.endpoints}


def _held_then_said(logs: Sequence[Mapping[str, Any]], *, held: str, said: str) -> Mapping[str, Any]:
    """The one warning `said`, logged after the edit was `held` (at info, once: not at every look while it
    waits): what it says."""
    events = [e["event"] for e in logs]
    [warning] = [e for e in logs if e["event"] == said]
    assert events.count(held) == 1, events
    assert events.index(said) > events.index(held) and warning["log_level"] == "warning", events
    return warning


def _loud(logs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [e for e in logs if e["log_level"] in ("warning", "error")]


PAUSE = 0.05
"""How long the slow writers pause between pieces."""


def margin(monkeypatch: pytest.MonkeyPatch, *, inotify: bool) -> None:
    """Polling cannot see a writer: its pauses must be shorter than the settling time. Made 20 times longer
    than they are, so that a scheduler stall of a loaded machine cannot make a pause look like the end."""
    if not inotify:
        monkeypatch.setattr(watch, "SETTLE_S", 20 * PAUSE)


@pytest.mark.parametrize("inotify", [True, False], ids=["inotify", "poll"])
async def test_an_endpoint_file_written_in_slow_pieces_is_read_once_complete(
        tmp_path: Path, inotify: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    margin(monkeypatch, inotify=inotify)
    n = 400
    path = write_yaml(tmp_path / "c1.yaml", _endpoints(n, 9000))
    catalog = catalog_mod.Catalog()
    sizes: list[int] = []
    catalog.subscribe(lambda change: sizes.append(len(catalog.services)))
    # The backstop (and the poll) looks every 20 ms, far more often than the writer pauses.
    source = filesource.FileSource(path, interval=0.02, inotify=inotify)
    await source.start(catalog)
    await watching(source)
    try:
        text = yaml.safe_dump(_endpoints(n, 9001), sort_keys=False)
        with structlog.testing.capture_logs() as logs:
            await write_slowly(path, pieces_of(text, at="- name:", count=10), pause=PAUSE)
            await wait_for(lambda: _ports(catalog) == {9001}, timeout=5, what="the rewritten file applied")
        assert sizes and min(sizes) == n, f"the catalog had {min(sizes)} of {n} services at one point"
        assert not _loud(logs), _loud(logs)
    finally:
        await source.stop()


def _policy(n: int, prefix: str = "svc") -> str:
    """A gateway with `n` routes, each to a service of its own."""
    routes = "".join(
        f"  - name: r{i}\n    parentRefs: [{{name: edge}}]\n    hostnames: [h{i}.example.com]\n"
        f"    rules:\n      - matches: [{{path: {{type: PathPrefix, value: /{prefix}{i}}}}}]\n"
        f"        backendRefs: [{{name: s{i}, port: 8000}}]\n" for i in range(n))
    return ("apiVersion: meshplane.io/v2\ngateways:\n  - name: edge\n    listeners:\n"
            f"      - {{name: http, port: 8080}}\nroutes:\n{routes}")


def _prefixes(policy: rules.Policy) -> set[str]:
    return {m.path.value for r in policy.routes for rule in r.rules for m in rule.matches}


@contextlib.asynccontextmanager
async def watching_policy(path: Path, applied: Applied, *, inotify: bool = True) -> AsyncIterator[reload.PolicyWatcher]:
    """A policy watcher on `path` (its backstop every 20 ms), once its watch is set up; stopped after."""
    watcher = reload.PolicyWatcher(path, on_change=applied, interval=0.02, inotify=inotify)
    await watcher.start()
    try:
        await watching(watcher)
        yield watcher
    finally:
        await watcher.stop()


class Applied:
    """The policies a watcher applied, in order."""

    def __init__(self) -> None:
        self.policies: list[rules.Policy] = []

    def __call__(self, policy: rules.Policy, seen_at: float) -> None:
        self.policies.append(policy)

    def routes(self) -> list[int]:
        return [len(p.routes) for p in self.policies]


@pytest.mark.parametrize("inotify", [True, False], ids=["inotify", "poll"])
async def test_a_policy_written_in_slow_pieces_is_never_applied_half_way(
        tmp_path: Path, inotify: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    margin(monkeypatch, inotify=inotify)
    n = 120
    path = tmp_path / "policy.yaml"
    path.write_text(_policy(n))
    applied = Applied()
    async with watching_policy(path, applied, inotify=inotify):
        with structlog.testing.capture_logs() as logs:
            await write_slowly(path, pieces_of(_policy(n, "new"), at="  - name:", count=8), pause=PAUSE)
            await wait_for(lambda: applied.policies and _prefixes(applied.policies[-1]) == {
                f"/new{i}" for i in range(n)}, timeout=10, what="the rewritten policy applied")
    assert applied.routes() == [n], applied.routes()
    assert not _loud(logs), _loud(logs)


@pytest.mark.parametrize("command", ["cp {new} {path}", "cat {new} > {path}"])
async def test_a_policy_rewritten_in_place_with_cp_or_cat_is_never_applied_half_way(
        tmp_path: Path, command: str) -> None:
    """What an operator types, run by a shell: the file is truncated, then written."""
    n = 400  # about 100 KB: the copy is more than one write
    path = tmp_path / "policy.yaml"
    path.write_text(_policy(n))
    variants = [tmp_path / "a.yaml", tmp_path / "b.yaml"]
    variants[0].write_text(_policy(n, "a"))
    variants[1].write_text(_policy(n, "b"))
    applied = Applied()
    async with watching_policy(path, applied) as watcher:
        for edit in range(6):
            await shell(command.format(new=variants[edit % 2], path=path))
            want = {f"/{'ab'[edit % 2]}{i}" for i in range(n)}
            await wait_for(lambda want=want: applied.policies and _prefixes(applied.policies[-1]) == want,
                           timeout=10, what=f"edit {edit} applied")
        assert len(watcher.current.routes) == n
    assert applied.routes() == [n] * 6, applied.routes()


async def test_a_policy_truncated_closed_and_written_again_is_not_emptied(tmp_path: Path) -> None:
    """The close after the truncation says the (empty) file is complete; the second that follows before
    it is applied holds it back, and the full file replaces it."""
    n = 50
    path = tmp_path / "policy.yaml"
    path.write_text(_policy(n))
    applied = Applied()
    async with watching_policy(path, applied) as watcher:
        with structlog.testing.capture_logs() as logs:
            await write_slowly(path, [_policy(n, "new").encode()], pause=hold.HOLD_S / 4, reopen=True)
            await wait_for(lambda: applied.policies, timeout=5, what="the rewritten policy applied")
        assert applied.routes() == [n] and _prefixes(watcher.current) == {f"/new{i}" for i in range(n)}
    assert not _loud(logs), _loud(logs)
    assert [e for e in logs if "applied if the file keeps it" in e["event"]], "the empty file was not held"


async def test_an_emptied_policy_is_applied_once_it_stays_empty_and_said_loudly(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(_policy(7))
    applied = Applied()
    async with watching_policy(path, applied) as watcher:
        with structlog.testing.capture_logs() as logs:
            await shell(f": > {path}")
            await wait_for(lambda: applied.policies, timeout=5, what="the empty policy applied")
        assert watcher.current == rules.Policy()
    said = _held_then_said(logs, held="policy edit drops most of the policy in force; applied if the file keeps it",
                           said="policy file drops most of the policy in force")
    assert said["path"] == str(path) and said["emptied"] is True
    assert said["dropped_routes"] == "7 of 7: default/r0, default/r1, default/r2, default/r3, default/r4, ..."
    assert said["dropped_gateways"] == "1 of 1: edge"


async def test_an_edit_that_keeps_most_of_the_policy_is_applied_at_once(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(_policy(4))
    applied = Applied()
    watcher = reload.PolicyWatcher(path, on_change=applied, interval=3600)
    await watcher.start()
    try:
        path.write_text(_policy(2))  # 2 of 5 (4 routes, a gateway) go: not most
        assert await watcher.poll() is True
        assert applied.routes() == [2]
    finally:
        await watcher.stop()


async def test_an_endpoint_file_that_loses_most_of_its_services_is_held_then_said_loudly(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c1.yaml", _endpoints(10, 9000))
    catalog = catalog_mod.Catalog()
    source = filesource.FileSource(path, interval=0.02)
    await source.start(catalog)
    await watching(source)
    try:
        with structlog.testing.capture_logs() as logs:
            write_yaml(path, _endpoints(3, 9000))
            await wait_for(lambda: len(catalog.services) == 3, timeout=5, what="the shorter file applied")
        said = _held_then_said(logs, held="endpoint file drops most of its services; applied if the file keeps them so",
                               said="endpoint file drops most of its services")
        assert said["path"] == str(path) and said["cluster"] == "c1"
        assert said["dropped"] == "7 of 10: default/svc3, default/svc4, default/svc5, default/svc6, default/svc7, ..."
        write_yaml(path, _endpoints(2, 9000))  # 1 of 3 goes: not most, at once and quietly
        with structlog.testing.capture_logs() as logs:
            await wait_for(lambda: len(catalog.services) == 2, timeout=5, what="one service removed")
        assert not _loud(logs)
    finally:
        await source.stop()


async def test_a_file_kept_open_is_read_once_no_write_has_come_for_a_while(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer that never closes (or `truncate(2)` by path): read as it is, with a warning, once it has
    written nothing for OPEN_WRITER_S."""
    monkeypatch.setattr(watch, "OPEN_WRITER_S", 0.5)
    path = write_yaml(tmp_path / "c1.yaml", _endpoints(2, 9000))
    catalog = catalog_mod.Catalog()
    source = filesource.FileSource(path, interval=0.02)
    await source.start(catalog)
    await watching(source)
    try:
        with structlog.testing.capture_logs() as logs, path.open("w") as out:
            out.write(yaml.safe_dump(_endpoints(2, 9001)))
            out.flush()
            await wait_for(lambda: _ports(catalog) == {9001}, timeout=5, what="the file read while open")
        [said] = [e for e in logs if e["event"].startswith("file open for writing")]
        assert said["log_level"] == "warning" and said["name"] == "c1.yaml"
    finally:
        await source.stop()


def test_a_file_changed_while_read_is_torn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"one")
    got = watch.read(path)
    assert (got.data, got.torn) == (b"one", False) and got.stat == watch.stat_of(path)
    assert isinstance(watch.read(tmp_path / "missing").data, FileNotFoundError)
    first = watch.stat_of(path)
    stat_of, rewrites = watch.stat_of, []

    def rewritten_after_the_first_stat(at: Path) -> watch.Stat | None:
        stat = stat_of(at)
        if not rewrites:
            rewrites.append(at)
            at.write_bytes(b"two, half written")  # between the stat before the read and the one after
        return stat

    monkeypatch.setattr(watch, "stat_of", rewritten_after_the_first_stat)
    got = watch.read(path)
    assert rewrites == [path] and got.torn and got.stat == first and got.data == b"two, half written"


def test_most_is_more_than_half() -> None:
    assert [hold.most(lost, of=4) for lost in range(5)] == [False, False, False, True, True]
    assert not hold.most(0, of=0)


@pytest.mark.parametrize("kind", ["endpoint file", "policy"])
async def test_a_file_being_written_when_meshplane_starts_is_read_once_complete(tmp_path: Path, kind: str) -> None:
    """No watch has seen the write begin: the first read waits for the file to settle, as a polled one."""
    if kind == "endpoint file":
        n, at = 400, "- name:"
        path = write_yaml(tmp_path / "c1.yaml", _endpoints(n, 9000))
        text = yaml.safe_dump(_endpoints(n, 9001), sort_keys=False)
    else:
        n, at = 120, "  - name:"
        path = tmp_path / "policy.yaml"
        path.write_text(_policy(n))
        text = _policy(n, "new")
    full = len(text.encode())
    writer = asyncio.create_task(write_slowly(path, pieces_of(text, at=at, count=10), pause=PAUSE))
    await wait_for(lambda: 0 < path.stat().st_size < full, timeout=10, what="the writer under way")
    try:
        if kind == "endpoint file":
            catalog = catalog_mod.Catalog()
            source = filesource.FileSource(path, interval=3600)
            await source.start(catalog)
            await source.stop()
            assert len(catalog.services) == n and _ports(catalog) == {9001}
        else:
            watcher = reload.PolicyWatcher(path, on_change=Applied(), interval=3600)
            await watcher.start()
            await watcher.stop()
            assert _prefixes(watcher.current) == {f"/new{i}" for i in range(n)}
        assert writer.done(), "read before its writer was done"
    finally:
        await writer


async def test_an_edit_dropping_most_of_the_policy_is_held_from_its_read_not_from_the_end_of_its_validation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Validating it took longer than the hold: the file kept it all along, so it is applied, validated once."""
    monkeypatch.setattr(hold, "HOLD_S", 0.01)
    n = 600  # far longer to validate than the hold
    path = tmp_path / "policy.yaml"
    path.write_text(_policy(n))
    loads, load = [], worker.load

    async def counted(data: bytes, *, path: str, known: Any) -> Any:
        loads.append(len(data))
        return await load(data, path=path, known=known)

    monkeypatch.setattr(worker, "load", counted)
    applied = Applied()
    async with watching_policy(path, applied) as watcher:
        loads.clear()
        renamed = _policy(n, "new").replace("  - name: r", "  - name: q")  # every route goes, others come
        with structlog.testing.capture_logs() as logs:
            write_atomically(path, renamed)
            await wait_for(lambda: applied.policies, timeout=30, what="the edit applied")
        assert {r.name for r in watcher.current.routes} == {f"q{i}" for i in range(n)}
    assert len(loads) == 1, f"validated {len(loads)} times"
    [said] = [e for e in logs if e["event"] == "policy file drops most of the policy in force"]
    assert said["log_level"] == "warning" and said["dropped_routes"].startswith(f"{n} of {n}: ")


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
