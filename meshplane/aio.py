"""Small asyncio helpers shared by the long-lived tasks (sources, watchers, the push loop).

A long-lived task guards its loop (docs/architecture.md, invariant 7): what it raises is our bug, and a
task that dies silently leaves readiness green while a file or a cluster is no longer followed. `carry_on`
runs such a loop again after logging and counting what it raised, and `failed` logs and counts one failure
inside a loop that carries on by itself; `task_errors` is the count (`meshplane_task_errors_total`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import functools
import inspect
import threading
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

import structlog

log = structlog.get_logger(__name__)

T = TypeVar("T")

_errors: collections.Counter[str] = collections.Counter()  # task -> failures logged, in this process


async def cancel(task: asyncio.Task[Any] | None) -> None:
    """Cancel `task` and wait until it has ended, so nothing outlives its owner's stop()."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def failed(task: str, event: str, **fields: object) -> None:
    """Inside an `except Exception:` of a long-lived task that goes on: log the exception and count it."""
    _errors[task] += 1
    log.exception(event, task=task, **fields)


def task_errors() -> Mapping[str, int]:
    """How many failures each long-lived task has logged and carried on from, in this process."""
    return dict(_errors)


async def carry_on(task: str, body: Callable[[], Awaitable[None]], *, again_after: float, **fields: object) -> None:
    """Run `body` until it returns; whatever else it raises is logged and counted, and it runs again
    `again_after` seconds later (a watch whose directory vanished, a bug of ours: never the end of the task)."""
    while True:
        try:
            await body()
            return
        except Exception:
            failed(task, f"{task} failed; starting it again", again_after=again_after, **fields)
        await asyncio.sleep(again_after)


async def off_loop(function: Callable[..., T], /, *args: Any) -> T:
    """`function(*args)` in a daemon thread of its own, while the event loop goes on.

    Unlike `asyncio.to_thread`, neither a cancellation nor the end of `asyncio.run` waits for it
    (`asyncio.run` joins the default executor's threads at exit: a Ctrl-C or SIGTERM would wait for
    whatever they are doing); a cancelled call's result is dropped when it comes."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    context = contextvars.copy_context()

    def settle(outcome: Callable[[], None]) -> None:
        if not future.done():
            outcome()

    def run() -> None:
        try:
            answer = functools.partial(future.set_result, context.run(function, *args))
        except BaseException as exc:  # handed to the awaiting task, whatever it is
            answer = functools.partial(future.set_exception, exc)
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits for this any more
            loop.call_soon_threadsafe(settle, answer)

    threading.Thread(target=run, name=f"off-loop:{getattr(function, '__qualname__', function)}", daemon=True).start()
    return await future


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

    def follow(self, look: Handler, *, name: str, event: str, **context: Any) -> None:
        """Hand `look` every wake-up from now on, in a task named `name`; a bug in it is logged (`event`,
        with `context`), counted (as `name`'s: `task_errors`) and the next wake-up handed all the same: a
        watching task that dies leaves what it watches frozen, unseen."""
        assert self._events is not None
        self._task = asyncio.create_task(self._run(self._events, look, name, event, context), name=name)

    async def stop(self) -> None:
        await cancel(self._task)
        self._task = None
        events, self._events = self._events, None
        if events is not None:
            await events.aclose()

    @staticmethod
    async def _run(events: AsyncGenerator[bool, None], look: Handler, task: str, event: str,
                   context: dict[str, Any]) -> None:
        async with contextlib.aclosing(events):
            async for quiet in events:
                try:
                    await _result(look(quiet))
                except Exception:
                    failed(task.partition(":")[0], event, **context)


async def _result(outcome: Awaitable[bool | None] | bool | None) -> bool | None:
    return await outcome if inspect.isawaitable(outcome) else outcome
