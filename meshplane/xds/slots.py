"""Push slots: at most N streams compose and write a heavy push at once, and a client that does
not read cannot keep one (docs/xds.md, "Pushing"; decisions 0004 and 0006).

After a restart every proxy wants its whole configuration at once; with
slots, those configurations exist a batch at a time instead of all at once
(Istio's PILOT_PUSH_THROTTLE is 100 too). A slot covers composing a push
and writing it.

A client that does not read must not keep a slot: its write never
completes, and everyone behind it in line would wait. But a write's time
alone does not tell a client that does not read from one that reads
slowly, and in a reconnect storm every client reads slowly (each shares
its CPU and the network with a thousand others): giving their slots back
after a fixed short time would let every configuration exist at once
again. So a write counts as stalled when it has waited far longer than
writes to other clients take now: `STALL_FACTOR` times the recent typical
heavy write (a moving average of completed ones), and at least
`stall_after` seconds, at most `MAX_STALL`. On a calm control plane that
is `stall_after` (100 ms); in a storm it grows with the storm. A stalled
write gives its slot back at once, and the stream goes on waiting for its
client without one. Such a stream holds at most the one push it was
writing (it composes nothing more until that is taken), so clients that
never read cost bounded memory and make others wait at most the stall
time each, once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from types import TracebackType

STALL_FACTOR = 4.0
"""A write stalls when it has waited this many times longer than the recent typical heavy write."""
MAX_STALL = 5.0
"""However slow writes are, one that has waited this long (seconds) gives its slot back."""
_SMOOTHING = 0.1  # weight of each completed write in the moving average


class Slot:
    """A held push slot (an async context manager); `write` gives it back early if the client stalls."""

    __slots__ = ("_held", "_on_stall", "_slots", "_timer", "stalled")

    def __init__(self, slots: PushSlots, on_stall: Callable[[], None]) -> None:
        self._slots = slots
        self._on_stall = on_stall
        self._held = False
        self._timer: asyncio.TimerHandle | None = None  # while a write is under way
        self.stalled = False

    async def __aenter__(self) -> Slot:
        await self._slots._semaphore.acquire()
        self._held = True
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._give_back()

    async def write(self, write: Awaitable[None]) -> None:
        """Await a write; if it stalls (module docstring), give the slot back and keep waiting."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        self._timer = loop.call_at(started + self._slots.stall_time(), self._check, started)
        try:
            await write
        finally:
            self._timer.cancel()
            self._timer = None
        if not self.stalled:
            self._slots.completed(loop.time() - started)

    def _check(self, started: float) -> None:
        """The write has waited its stall time as it was when it began; stalled if it still has, now."""
        loop = asyncio.get_running_loop()
        due = started + self._slots.stall_time()
        if loop.time() < due:  # writes to others have grown slower meanwhile: wait longer
            self._timer = loop.call_at(due, self._check, started)
            return
        if not self.stalled:
            self.stalled = True
            self._on_stall()
        self._give_back()

    def _give_back(self) -> None:
        if self._held:
            self._held = False
            self._slots._semaphore.release()


class PushSlots:
    def __init__(self, size: int, *, stall_after: float) -> None:
        self._semaphore = asyncio.Semaphore(size)
        self.stall_after = stall_after
        self.typical_write = 0.0  # seconds: moving average of heavy writes that completed

    def stall_time(self) -> float:
        """How long a heavy write may wait for its client before it gives its slot back."""
        return min(max(self.stall_after, STALL_FACTOR * self.typical_write), MAX_STALL)

    def completed(self, seconds: float) -> None:
        """A heavy write completed after `seconds`."""
        self.typical_write += _SMOOTHING * (seconds - self.typical_write)

    def locked(self) -> bool:
        """Whether every slot is held."""
        return self._semaphore.locked()

    def slot(self, on_stall: Callable[[], None]) -> Slot:
        """`async with slots.slot(...)`: hold a slot until the block ends, or until a write in it
        stalls (`on_stall` is told, once)."""
        return Slot(self, on_stall)
