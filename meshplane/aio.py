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
import threading
from collections.abc import Awaitable, Callable, Mapping
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
