"""Small asyncio helpers shared by the long-lived tasks (sources, watchers, the push loop)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import structlog

log = structlog.get_logger(__name__)


async def cancel(task: asyncio.Task[Any] | None) -> None:
    """Cancel `task` and wait until it has ended, so nothing outlives its owner's stop()."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


Handler = Callable[[bool], Awaitable[bool | None] | bool | None]


class Follower:
    """Wake-ups from an async generator (`watch.Watch.events()`, yielding whether the look is quiet), taken
    in order: the first until the owner says it has what it needs to start (`first`), then each in a task
    of their own (`follow`) until `stop`. The generator is closed however it ends, so its inotify
    descriptor is too (a task cancelled before it began would leave it to the collector)."""

    def __init__(self, events: AsyncGenerator[bool, None]) -> None:
        self._events: AsyncGenerator[bool, None] | None = events
        self._task: asyncio.Task[None] | None = None

    async def first(self, look: Handler) -> None:
        """Hand `look` wake-ups until it returns true; what it raises ends the following (and is raised)."""
        assert self._events is not None
        try:
            while not await _result(look(await anext(self._events))):
                pass
        except BaseException:
            await self.stop()
            raise

    def follow(self, look: Handler, *, name: str, failed: str, **context: Any) -> None:
        """Hand `look` every wake-up from now on, in a task named `name`; a bug in it is logged (`failed`,
        with `context`) and the next wake-up handed all the same: a watching task that dies leaves what it
        watches frozen, unseen."""
        assert self._events is not None
        self._task = asyncio.create_task(self._run(self._events, look, failed, context), name=name)

    async def stop(self) -> None:
        await cancel(self._task)
        self._task = None
        events, self._events = self._events, None
        if events is not None:
            await events.aclose()

    @staticmethod
    async def _run(events: AsyncGenerator[bool, None], look: Handler, failed: str, context: dict[str, Any]) -> None:
        async with contextlib.aclosing(events):
            async for quiet in events:
                try:
                    await _result(look(quiet))
                except Exception:
                    log.exception(failed, **context)


async def _result(outcome: Awaitable[bool | None] | bool | None) -> bool | None:
    return await outcome if inspect.isawaitable(outcome) else outcome
