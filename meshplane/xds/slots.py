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
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable


class Slot:
    """A held push slot; `write` gives it back early if the client stalls."""

    __slots__ = ("_give_back", "_on_stall", "_stall_after", "stalled")

    def __init__(self, give_back: Callable[[], None], stall_after: float, on_stall: Callable[[], None]) -> None:
        self._give_back = give_back
        self._stall_after = stall_after
        self._on_stall = on_stall
        self.stalled = False

    async def write(self, write: Awaitable[None]) -> None:
        """Await a write; if it has not completed after `stall_after`, give the slot back and keep waiting."""
        def stall() -> None:
            if not self.stalled:
                self.stalled = True
                self._on_stall()
            self._give_back()

        timer = asyncio.get_running_loop().call_later(self._stall_after, stall)
        try:
            await write
        finally:
            timer.cancel()


class PushSlots:
    def __init__(self, size: int, *, stall_after: float) -> None:
        self._semaphore = asyncio.Semaphore(size)
        self.stall_after = stall_after

    def locked(self) -> bool:
        """Whether every slot is held."""
        return self._semaphore.locked()

    @contextlib.asynccontextmanager
    async def slot(self, *, on_stall: Callable[[], None] = lambda: None) -> AsyncIterator[Slot]:
        """Hold a slot until the block ends, or until a write in it stalls (`on_stall` is told, once)."""
        await self._semaphore.acquire()
        held = True

        def give_back() -> None:
            nonlocal held
            if held:
                held = False
                self._semaphore.release()

        try:
            yield Slot(give_back, self.stall_after, on_stall)
        finally:
            give_back()
