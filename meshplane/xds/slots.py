"""Push slots: at most N streams compose and write a heavy push at once, and a client that does
not read cannot keep one (docs/xds.md, "Pushing"; decisions 0004 and 0006).

After a restart every proxy wants its whole configuration at once; with
slots, those configurations exist a batch at a time instead of all at once
(Istio's PILOT_PUSH_THROTTLE is 100 too). A slot covers composing a push
and writing it. A write that the client has not taken within
`stall_after` seconds means the client is not reading (a healthy client
takes a response as soon as it arrives; Envoy's and grpc's windows are
megabytes): the slot is given back at once, and the stream goes on waiting
for its client without one. Such a stream holds at most the one push it
was writing (it composes nothing more until that is taken), so clients
that never read cost bounded memory and never make anyone else wait longer
than `stall_after` each, once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from types import TracebackType


class Slot:
    """A held push slot (an async context manager); `write` gives it back early if the client stalls."""

    __slots__ = ("_held", "_on_stall", "_slots", "stalled")

    def __init__(self, slots: PushSlots, on_stall: Callable[[], None]) -> None:
        self._slots = slots
        self._on_stall = on_stall
        self._held = False
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
        """Await a write; if it has not completed after `stall_after`, give the slot back and keep waiting."""
        timer = asyncio.get_running_loop().call_later(self._slots.stall_after, self._stall)
        try:
            await write
        finally:
            timer.cancel()

    def _stall(self) -> None:
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

    def locked(self) -> bool:
        """Whether every slot is held."""
        return self._semaphore.locked()

    def slot(self, on_stall: Callable[[], None]) -> Slot:
        """`async with slots.slot(...)`: hold a slot until the block ends, or until a write in it
        stalls (`on_stall` is told, once)."""
        return Slot(self, on_stall)
