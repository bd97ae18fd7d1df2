"""The push loop: coalesce changes, rebuild what they reach once, and let the views signal their streams.

Changes arrive synchronously from the catalog and the policy loader and are
only recorded here (a set of services, the newest policy, the earliest time
a change was seen). One task turns them into pushes: it waits until the
burst has been quiet for `debounce` seconds (or `max_delay` has passed
since its first change), then updates the view cache once, which signals
the streams whose view changed. A burst of a thousand endpoint edits costs
one rebuild per view, not a thousand.

The task guards its loop: a push that fails is logged and counted, and the
loop carries on with the next change (docs/architecture.md, invariant 7).
A failure inside one service's build never gets this far: the view cache
keeps that service's last good resources and goes on with the others.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping

import structlog

from meshplane import aio
from meshplane.discovery import catalog as catalog_mod
from meshplane.discovery import model
from meshplane.policy import rules
from meshplane.xds import metrics as metrics_mod
from meshplane.xds import views

log = structlog.get_logger(__name__)


class PushLoop:
    def __init__(
        self,
        *,
        cache: views.ViewCache,
        services: Callable[[], Mapping[model.ServiceKey, model.Service]],
        metrics: metrics_mod.Metrics,
        debounce: float = 0.005,
        max_delay: float = 0.1,
    ) -> None:
        self._cache = cache
        self._services = services
        self._metrics = metrics
        self.debounce = debounce
        self.max_delay = max_delay
        self._pending: set[model.ServiceKey] = set()
        self._policy: rules.Policy | None = None
        self._first_seen: float | None = None
        self._last_change = 0.0
        self._event = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.pushes = 0

    def on_catalog_change(self, change: catalog_mod.Change) -> None:
        self._pending |= change.services
        self._record(change.seen_at)

    def on_policy(self, policy: rules.Policy, seen_at: float) -> None:
        self._policy = policy
        self._record(seen_at)

    def pending_since(self) -> float | None:
        """When (monotonic) the oldest change not yet handed to the views was seen; None when idle."""
        return self._first_seen

    def _record(self, seen_at: float) -> None:
        if self._first_seen is None or seen_at < self._first_seen:
            self._first_seen = seen_at
        self._last_change = time.monotonic()
        self._event.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="push-loop")

    async def stop(self) -> None:
        await aio.cancel(self._task)
        self._task = None

    async def _run(self) -> None:
        while True:
            await self._event.wait()
            started = time.monotonic()
            while True:  # debounce: wait for quiet, but not forever
                quiet_at = self._last_change + self.debounce
                now = time.monotonic()
                if now >= quiet_at or now - started >= self.max_delay:
                    break
                await asyncio.sleep(min(quiet_at, started + self.max_delay) - now)
            self._event.clear()
            try:
                self.flush()
            except Exception:  # a bug of ours: say so, and go on with the next change
                self._metrics.push_loop_errors.inc()
                log.exception("push failed; carrying on with the next change")

    def flush(self) -> None:
        """Apply everything pending now (the loop calls this; so does readiness, and tests may)."""
        if self._first_seen is None:
            return
        changed, self._pending = frozenset(self._pending), set()
        policy, self._policy = self._policy, None
        seen_at, self._first_seen = self._first_seen, None
        began = time.monotonic()
        self._metrics.debounce.observe(began - seen_at)
        new_policy = policy if policy is not None else self._cache.policy
        touched = self._cache.update(services=self._services(), policy=new_policy, changed=changed, seen_at=seen_at)
        self.pushes += 1
        built = time.monotonic() - began
        self._metrics.build.observe(built)
        self._metrics.views.set(len(self._cache.views))
        log.debug("push", services=len(changed), policy_changed=policy is not None, views=touched,
                  build_ms=round(built * 1000, 2))
