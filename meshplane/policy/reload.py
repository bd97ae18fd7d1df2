"""Hot reload of the policy file, keeping the last good policy when an edit is broken.

The file's directory is watched with inotify, and polled where that is
unavailable (meshplane/watch.py): a rename over it, or a ConfigMap volume's
`..data` swap, is seen within about a millisecond, and a rewrite in place
(`cp`, `cat >`) once its writer closes the file, never half written. A
content hash makes a `touch`, or a rewrite with the same bytes, a no-op, so
proxies are not pushed for nothing. The files the policy names (gateway
certificates and keys) are watched with it: when one changes, the policy is
loaded again, so a rotated certificate reaches the gateways.

A policy is validated in a worker process (meshplane/policy/worker.py), so
that a big one never holds up pushes, xDS streams, /healthz or /metrics;
the first load waits for the file to settle as a polled edit does. The
certificate files a policy names are read by the worker: how they were
then is what the watcher remembers, and a file that changed while the
worker read it is loaded again at the next look. An edit that drops most
of what is in force (an emptied file, most routes gone) is applied only
once the file has kept it for a second (meshplane/hold.py), and said at
warning level with what it drops. A warning is logged when it first appears
and when it goes; the rest are counted (`on_warnings`), and the full list
is `last_warnings` (/ready, `meshplane validate`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path

import structlog

from meshplane import aio, hold, problems, watch
from meshplane.policy import rules, validate, worker

log = structlog.get_logger(__name__)

OnChange = Callable[[rules.Policy, float], Awaitable[None] | None]


class PolicyWatcher:
    """Owns the policy in force: `.current` is always the last valid one."""

    def __init__(
        self, path: Path | None, *, on_change: OnChange, interval: float = 0.1,
        known: Callable[[], validate.Known | None] | None = None,
        on_result: Callable[[str], None] = lambda result: None, inotify: bool = True,
        on_warnings: Callable[[int, int], None] = lambda in_force, repeated: None,
    ) -> None:
        """`known`: what discovery knows when a policy is loaded (references to anything else are warned about).
        `on_result`: told "applied", "unchanged" (valid, and the same policy) or "rejected" after each
        reload once started (a `touch` or the same bytes rewritten is no reload). `on_warnings`: told, at
        each policy accepted, how many warnings it has and how many of them were there before (not logged again)."""
        self.path = path
        self.known = known
        self.on_result = on_result
        self.on_warnings = on_warnings
        self.interval = interval
        self.inotify = inotify
        self.on_change = on_change
        self.current = rules.Policy()
        self.last_errors: tuple[problems.Problem, ...] = ()
        self.last_warnings: tuple[problems.Problem, ...] = ()
        self._warned: dict[tuple[str, str], problems.Problem] = {}  # the warnings in force, by what they are about
        self._seen: watch.Seen | None = None
        self._named: dict[Path, watch.Seen] = {}  # files the policy names -> how they were when it was loaded
        self._hold = hold.Hold(held="policy edit drops most of the policy in force; applied if the file keeps it",
                               said="policy file drops most of the policy in force")
        self._polling = asyncio.Lock()  # a poll awaits the worker: one at a time, whoever calls
        self._task: asyncio.Task[None] | None = None
        self._watch: watch.Watch | None = None

    async def start(self) -> None:
        """Load the file once it has settled; raise validate.PolicyError if it is unusable, then watch it."""
        if self.path is None or self._task is not None:
            return
        got = await watch.read_settled(self.path)
        began = time.time_ns()
        result = await self._load(got.data)
        if result.policy is None:
            self.last_errors = result.errors
            raise validate.PolicyError(result.errors)
        # Still written after a while: no stat is remembered, so the watch's first look reads it again.
        self._seen = _seen(None if got.torn else got.stat, got.data)
        self._accept(result, before={}, began=began)
        self._watch = watch.Watch([self.path, *self._named], interval=self.interval, inotify=self.inotify)
        self._task = asyncio.create_task(
            aio.carry_on("policy-watcher", self._run, again_after=max(self.interval, 1.0), path=str(self.path)),
            name=f"policy-watcher:{self.path}")

    async def watching(self) -> None:
        """Until the files are watched and have been looked at once since: a write from then on is seen."""
        if self._watch is not None:
            await self._watch.ready.wait()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            # Our own cancellation of the task, unless stop() itself is being cancelled.
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise

    async def _run(self) -> None:
        assert self._watch is not None
        events = self._watch.events()
        async with contextlib.aclosing(events):
            async for quiet in events:
                try:
                    await self.poll(quiet=quiet)
                except Exception:
                    # A bug in a callback must not stop later edits from being applied.
                    aio.failed("policy-watcher", "policy watcher poll failed", path=str(self.path))

    async def poll(self, *, quiet: bool = False) -> bool:
        """Check the file once; apply a valid change. Returns whether a new policy was applied.
        `quiet`: inotify watches the files and saw nothing (their stats can be trusted)."""
        async with self._polling:
            return await self._poll(quiet=quiet)

    async def _poll(self, *, quiet: bool) -> bool:
        if self.path is None:
            return False
        stat = watch.stat_of(self.path)
        named_changed = any(seen.changed(path, quiet=quiet) for path, seen in self._named.items())
        if self._seen is not None and self._seen.unchanged(stat, quiet=quiet) and not named_changed:
            return False
        seen_at = time.monotonic()
        got = watch.read(self.path)
        if got.torn or (self._watch is not None and self._watch.disturbed()):
            return False  # written while it was read: the watch wakes again once that write is complete
        seen, last = _seen(got.stat, got.data), self._seen
        self._hold.saw(seen.digest)
        if last is not None and seen.digest == last.digest and not named_changed:
            self._seen = seen
            return False
        # The files the policy names as they are before the worker reads them: one that differs afterwards
        # changed while it was read, and the policy is loaded again at the next look.
        before, began = {path: watch.Seen.now(path) for path in self._named}, time.time_ns()
        result = await self._load(got.data)
        if result.policy is None:
            # Remember the broken version too, so that it is reported once, not on every event.
            self._seen = seen
            self._reject(result)
            # A broken certificate too is reported once, not on every event: remember how the files were.
            self._named = _as_read(self._named, before=before, began=began)
            self.on_result("rejected")
            return False
        # Written since it was read (validation can take seconds): a complete version, and applied, unless it
        # drops most of the policy (its writer may not be done: the watch wakes again for that write).
        still = watch.stat_of(self.path) == got.stat and not (self._watch is not None and self._watch.disturbed())
        if not self._hold.kept(dropped(self.current, result.policy), still=still, look=self._watch,
                               path=str(self.path)):
            return False
        self._seen = seen
        if result.policy == self.current:
            self._accept(result, before=before, began=began)
            self.on_result("unchanged")
            return False
        self._accept(result, before=before, began=began)
        self.on_result("applied")
        outcome = self.on_change(result.policy, seen_at)
        if inspect.isawaitable(outcome):
            await outcome
        return True

    async def _load(self, data: bytes | OSError) -> validate.LoadResult:
        assert self.path is not None
        if isinstance(data, OSError):
            return validate.unreadable(self.path, data)
        return await worker.load(data, path=str(self.path), known=self.known() if self.known else None)

    def _accept(self, result: validate.LoadResult, *, before: Mapping[Path, watch.Seen], began: int) -> None:
        """`before`: the named files as they were before the load began (`began`, time.time_ns())."""
        assert result.policy is not None
        self.current = result.policy
        assert self.path is not None
        base = self.path.parent
        self._named = _as_read(
            [path for gateway in result.policy.gateways for listener in gateway.listeners if listener.tls is not None
             for path in (base / listener.tls.certificate_file, base / listener.tls.key_file)],
            before=before, began=began)
        if self._watch is not None:
            self._watch.watch([self.path, *self._named])
        self.last_errors = ()
        self.last_warnings = result.warnings
        self._warn(result)
        log.info(
            "policy applied",
            path=str(self.path),
            services=len(result.policy.services),
            gateways=len(result.policy.gateways),
            routes=len(result.policy.routes),
            warnings=len(result.warnings),
        )

    def _warn(self, result: validate.LoadResult) -> None:
        """Log the warnings that are new, and those that went; count the ones that were there already."""
        assert result.policy is not None
        now = {_about(problem, result.policy): problem for problem in result.warnings}
        for key, problem in now.items():
            if key not in self._warned:
                log.warning("policy warning", problem=str(problem), **_fields(problem))
        for key, problem in self._warned.items():
            if key not in now:
                log.info("policy warning resolved", problem=str(problem), **_fields(problem))
        repeated = sum(key in self._warned for key in now)
        self._warned = now
        self.on_warnings(len(result.warnings), repeated)

    def _reject(self, result: validate.LoadResult) -> None:
        self.last_errors = result.errors
        for problem in result.errors:
            log.error("policy rejected", problem=str(problem), **_fields(problem))
        log.error(
            "keeping the last good policy",
            path=str(self.path),
            errors=len(result.errors),
        )


def dropped(old: rules.Policy, new: rules.Policy) -> dict[str, object] | None:
    """What `new` drops of `old` when that is most of it, or everything (an emptied file): per kind, how many
    of how many and the first names; None when `new` keeps most of `old`."""
    kinds: dict[str, tuple[set[str], set[str]]] = {
        "routes": ({r.key for r in old.routes}, {r.key for r in new.routes}),
        "gateways": ({g.name for g in old.gateways}, {g.name for g in new.gateways}),
        "services": ({str(k) for k in old.services}, {str(k) for k in new.services}),
    }
    lost = {kind: sorted(before - after) for kind, (before, after) in kinds.items()}
    emptied = new == rules.Policy() and old != rules.Policy()
    if not emptied and not hold.most(sum(map(len, lost.values())), of=sum(len(b) for b, _ in kinds.values())):
        return None
    said: dict[str, object] = {"emptied": emptied}
    for kind, names in lost.items():
        if names:
            said[f"dropped_{kind}"] = hold.said(names, of=len(kinds[kind][0]))
    return said


_INDEXED = re.compile(r"^(routes|gateways|services)\[(\d+)\]")


def _about(problem: problems.Problem, policy: rules.Policy) -> tuple[str, str]:
    """What a warning is about, wherever the file puts it: its field, with the index of the route, gateway
    or service it is in replaced by that one's name (a route added above moves the others' index and
    line), and its reason."""
    def named(found: re.Match[str]) -> str:
        kind, index = found.group(1), int(found.group(2))
        names = ([r.key for r in policy.routes] if kind == "routes" else
                 [g.name for g in policy.gateways] if kind == "gateways" else list(policy.services))
        return f"{kind}[{names[index]}]" if index < len(names) else found.group(0)

    return _INDEXED.sub(named, problem.field), problem.reason


_UNSEEN = watch.Seen(None, None)
"""A file as an unknown version: it differs from whatever the file holds, so the next look loads the policy."""

_CLOCK_LAG_NS = 10_000_000
"""How far behind time.time_ns() a file's timestamp may be when written (the kernel's coarse clock: a tick)."""


def _as_read(paths: Iterable[Path], *, before: Mapping[Path, watch.Seen], began: int) -> dict[Path, watch.Seen]:
    """How each file a policy names was when the worker read it, as far as can be told: as it is now, when it
    is as it was before the load began (`before`; or, for a file not named before, when it has not changed
    since the load began, by its ctime); otherwise unknown, so that the next look loads the policy again."""
    out = {}
    for path in dict.fromkeys(paths):
        now = watch.Seen.now(path)
        if path in before:
            same = before[path].digest == now.digest
        else:
            try:
                same = os.stat(path).st_ctime_ns < began - _CLOCK_LAG_NS
            except OSError:
                same = now.stat is None
        out[path] = now if same else _UNSEEN
    return out


def _seen(stat: watch.Stat | None, data: bytes | OSError) -> watch.Seen:
    """An unreadable file is seen as its error, so that it too is reported once, not on every event."""
    return watch.Seen.of(stat, data if isinstance(data, bytes) else f"unreadable: {data}".encode())


def _fields(problem: problems.Problem) -> dict[str, object]:
    return {
        "file": problem.file,
        "line": problem.line,
        "field": problem.field,
        "reason": problem.reason,
    }
