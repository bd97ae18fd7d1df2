"""Hot reload of the policy file, keeping the last good policy when an edit is broken.

The file is polled (stat, then a content hash) rather than watched with
inotify: editors and ConfigMap volumes replace files by rename or symlink
swaps that inotify reports inconsistently, and a stat every 100 ms is free.
The hash makes a `touch`, or a rewrite with the same bytes, a no-op, so
proxies are not pushed for nothing. The files the policy names (gateway
certificates and keys) are polled with it: when one changes, the policy is
loaded again, so a rotated certificate reaches the gateways.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from meshplane.policy import rules, validate

log = structlog.get_logger(__name__)

OnChange = Callable[[rules.Policy, float], Awaitable[None] | None]

# A file modified this recently may be modified again within the filesystem's
# timestamp granularity without its stat changing (same size, same inode), so
# its stat is not trusted until it is older than this: until then, re-hash.
_RACY_NS = 2_000_000_000


class PolicyWatcher:
    """Owns the policy in force: `.current` is always the last valid one."""

    def __init__(
        self, path: Path | None, *, on_change: OnChange, interval: float = 0.1,
        known: Callable[[], validate.Known | None] | None = None,
        on_result: Callable[[str], None] = lambda result: None,
    ) -> None:
        """`known`: what discovery knows when a policy is loaded (references to anything else are warned about).
        `on_result`: told "applied", "unchanged" (valid, and the same policy) or "rejected" after each
        reload once started (a `touch` or the same bytes rewritten is no reload)."""
        self.path = path
        self.known = known
        self.on_result = on_result
        self.interval = interval
        self.on_change = on_change
        self.current = rules.Policy()
        self.last_errors: tuple[validate.Problem, ...] = ()
        self.last_warnings: tuple[validate.Problem, ...] = ()
        self._stat: tuple[int, int, int] | None = None
        self._digest: bytes | None = None
        self._named: dict[Path, _Seen] = {}  # files the policy names -> how they were when it was loaded
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Load the file once; raise validate.PolicyError if it is unusable, then watch it."""
        if self.path is None or self._task is not None:
            return
        stat = self._stat_key()
        digest, data = self._read()
        result = self._validate(data)
        if result.policy is None:
            self.last_errors = result.errors
            raise validate.PolicyError(result.errors)
        self._remember(stat, digest)
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
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.poll()
            except Exception:
                # A bug in a callback must not stop later edits from being applied.
                log.exception("policy watcher poll failed", path=str(self.path))

    async def poll(self) -> bool:
        """Check the file once; apply a valid change. Returns whether a new policy was applied."""
        if self.path is None:
            return False
        stat = self._stat_key()
        named_changed = any(seen.changed() for seen in self._named.values())
        if stat is not None and stat == self._stat and not named_changed:
            return False
        seen_at = time.monotonic()
        digest, data = self._read()
        if digest == self._digest and not named_changed:
            self._remember(stat, digest)
            return False
        result = self._validate(data)
        # Remember the broken version too, so that it is reported once, not on every poll.
        self._remember(stat, digest)
        if result.policy is None:
            self._reject(result)
            # A broken certificate too is reported once, not on every poll: remember how the files are now.
            self._named = {path: _Seen.now(path) for path in self._named}
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

    def _stat_key(self) -> tuple[int, int, int] | None:
        assert self.path is not None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _read(self) -> tuple[bytes, bytes | OSError]:
        """The content (read once, so the hash and the validated text agree) and its hash.

        An unreadable file hashes its error, so it too is reported once, not on every poll.
        """
        assert self.path is not None
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            return hashlib.sha256(f"unreadable: {exc}".encode()).digest(), exc
        return hashlib.sha256(data).digest(), data

    def _validate(self, data: bytes | OSError) -> validate.LoadResult:
        assert self.path is not None
        if isinstance(data, OSError):
            return validate.unreadable(self.path, data)
        return validate.load_policy_bytes(data, path=str(self.path), known=self.known() if self.known else None)

    def _remember(self, stat: tuple[int, int, int] | None, digest: bytes) -> None:
        racy = stat is not None and time.time_ns() - stat[0] < _RACY_NS
        self._stat = None if racy else stat
        self._digest = digest

    def _accept(self, result: validate.LoadResult) -> None:
        assert result.policy is not None
        self.current = result.policy
        assert self.path is not None
        base = self.path.parent
        self._named = {
            path: _Seen.now(path)
            for gateway in result.policy.gateways for listener in gateway.listeners if listener.tls is not None
            for path in (base / listener.tls.certificate_file, base / listener.tls.key_file)
        }
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


@dataclass(frozen=True)
class _Seen:
    """A file as it was: its stat, and its content's hash while the stat cannot be trusted (see _RACY_NS)."""

    path: Path
    stat: tuple[int, int, int] | None
    digest: bytes | None

    @classmethod
    def now(cls, path: Path) -> _Seen:
        try:
            st = os.stat(path)
            racy = time.time_ns() - st.st_mtime_ns < _RACY_NS
            digest = hashlib.sha256(path.read_bytes()).digest() if racy else None
        except OSError:
            return cls(path, None, None)
        return cls(path, (st.st_mtime_ns, st.st_size, st.st_ino), digest)

    def changed(self) -> bool:
        again = _Seen.now(self.path)
        if again.stat != self.stat:
            return True
        if self.digest is None:
            return False
        if again.digest is None:  # no longer racy: hash once more to be sure
            try:
                return hashlib.sha256(self.path.read_bytes()).digest() != self.digest
            except OSError:
                return True
        return again.digest != self.digest


def _fields(problem: validate.Problem) -> dict[str, object]:
    return {
        "file": problem.file,
        "line": problem.line,
        "field": problem.field,
        "reason": problem.reason,
    }
