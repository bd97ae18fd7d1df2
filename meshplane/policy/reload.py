"""Hot reload of the policy file, keeping the last good policy when an edit is broken.

The file's directory is watched with inotify, and polled where that is
unavailable (meshplane/watch.py: an edit, a rename over it, or a ConfigMap
volume's `..data` swap is seen within about a millisecond). A content hash
makes a `touch`, or a rewrite with the same bytes, a no-op, so proxies are
not pushed for nothing. The files the policy names (gateway certificates
and keys) are watched with it: when one changes, the policy is loaded
again, so a rotated certificate reaches the gateways.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog

from meshplane import watch
from meshplane.policy import rules, validate

log = structlog.get_logger(__name__)

OnChange = Callable[[rules.Policy, float], Awaitable[None] | None]


class PolicyWatcher:
    """Owns the policy in force: `.current` is always the last valid one."""

    def __init__(
        self, path: Path | None, *, on_change: OnChange, interval: float = 0.1,
        known: Callable[[], validate.Known | None] | None = None,
        on_result: Callable[[str], None] = lambda result: None, inotify: bool = True,
    ) -> None:
        """`known`: what discovery knows when a policy is loaded (references to anything else are warned about).
        `on_result`: told "applied", "unchanged" (valid, and the same policy) or "rejected" after each
        reload once started (a `touch` or the same bytes rewritten is no reload)."""
        self.path = path
        self.known = known
        self.on_result = on_result
        self.interval = interval
        self.inotify = inotify
        self.on_change = on_change
        self.current = rules.Policy()
        self.last_errors: tuple[validate.Problem, ...] = ()
        self.last_warnings: tuple[validate.Problem, ...] = ()
        self._seen: watch.Seen | None = None
        self._named: dict[Path, watch.Seen] = {}  # files the policy names -> how they were when it was loaded
        self._task: asyncio.Task[None] | None = None
        self._watch: watch.Watch | None = None

    async def start(self) -> None:
        """Load the file once; raise validate.PolicyError if it is unusable, then watch it."""
        if self.path is None or self._task is not None:
            return
        stat = watch.stat_of(self.path)
        data = self._read()
        result = self._validate(data)
        if result.policy is None:
            self.last_errors = result.errors
            raise validate.PolicyError(result.errors)
        self._seen = _seen(stat, data)
        self._accept(result)
        self._task = asyncio.create_task(self._run(), name=f"policy-watcher:{self.path}")

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
        assert self.path is not None
        self._watch = watch.Watch([self.path, *self._named], interval=self.interval, inotify=self.inotify)
        events = self._watch.events()
        async with contextlib.aclosing(events):
            async for quiet in events:
                try:
                    await self.poll(quiet=quiet)
                except Exception:
                    # A bug in a callback must not stop later edits from being applied.
                    log.exception("policy watcher poll failed", path=str(self.path))

    async def poll(self, *, quiet: bool = False) -> bool:
        """Check the file once; apply a valid change. Returns whether a new policy was applied.
        `quiet`: inotify watches the files and saw nothing (their stats can be trusted)."""
        if self.path is None:
            return False
        stat = watch.stat_of(self.path)
        named_changed = any(seen.changed(path, quiet=quiet) for path, seen in self._named.items())
        if self._seen is not None and self._seen.unchanged(stat, quiet=quiet) and not named_changed:
            return False
        seen_at = time.monotonic()
        data = self._read()
        seen, last = _seen(stat, data), self._seen
        # Remember the broken version too, so that it is reported once, not on every event.
        self._seen = seen
        if last is not None and seen.digest == last.digest and not named_changed:
            return False
        result = self._validate(data)
        if result.policy is None:
            self._reject(result)
            # A broken certificate too is reported once, not on every event: remember how the files are now.
            self._named = {path: watch.Seen.now(path) for path in self._named}
            self.on_result("rejected")
            return False
        if result.policy == self.current:
            self._accept(result)
            self.on_result("unchanged")
            return False
        self._accept(result)
        self.on_result("applied")
        outcome = self.on_change(result.policy, seen_at)
        if inspect.isawaitable(outcome):
            await outcome
        return True

    def _read(self) -> bytes | OSError:
        """The content, read once so that the hash and the validated text agree (or why it cannot be read)."""
        assert self.path is not None
        try:
            return self.path.read_bytes()
        except OSError as exc:
            return exc

    def _validate(self, data: bytes | OSError) -> validate.LoadResult:
        assert self.path is not None
        if isinstance(data, OSError):
            return validate.unreadable(self.path, data)
        return validate.load_policy_bytes(data, path=str(self.path), known=self.known() if self.known else None)

    def _accept(self, result: validate.LoadResult) -> None:
        assert result.policy is not None
        self.current = result.policy
        assert self.path is not None
        base = self.path.parent
        self._named = {
            path: watch.Seen.now(path)
            for gateway in result.policy.gateways for listener in gateway.listeners if listener.tls is not None
            for path in (base / listener.tls.certificate_file, base / listener.tls.key_file)
        }
        if self._watch is not None:
            self._watch.watch([self.path, *self._named])
        self.last_errors = ()
        self.last_warnings = result.warnings
        for problem in result.warnings:
            log.warning("policy warning", problem=str(problem), **_fields(problem))
        log.info(
            "policy applied",
            path=str(self.path),
            services=len(result.policy.services),
            warnings=len(result.warnings),
        )

    def _reject(self, result: validate.LoadResult) -> None:
        self.last_errors = result.errors
        for problem in result.errors:
            log.error("policy rejected", problem=str(problem), **_fields(problem))
        log.error(
            "keeping the last good policy",
            path=str(self.path),
            errors=len(result.errors),
        )


def _seen(stat: watch.Stat | None, data: bytes | OSError) -> watch.Seen:
    """An unreadable file is seen as its error, so that it too is reported once, not on every event."""
    return watch.Seen.of(stat, data if isinstance(data, bytes) else f"unreadable: {data}".encode())


def _fields(problem: validate.Problem) -> dict[str, object]:
    return {
        "file": problem.file,
        "line": problem.line,
        "field": problem.field,
        "reason": problem.reason,
    }
