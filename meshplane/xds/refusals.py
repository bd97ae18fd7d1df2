"""Recent refusals of xDS clients by peer address and reason: what `/debug/syncz` and `meshplane
status` list, and the log lines they are written as.

A refused proxy retries, for as long as it runs (Envoy about every 0.5-1 s): each refusal logged was
a warning line every 0.7 s per proxy, the same line, while the operator needed to know once who is
refused and why, and whether it goes on. So a refusal is logged when it is first seen for its peer
address and reason, then at most once per `interval`, with the number of refusals not logged since
(`suppressed`). Every one is counted (meshplane_xds_refused_streams_total) and kept here: the last
message, node and identity, when it began, when it last happened, how many times.

Bounded, as a stranger can make any number of refusals: at most `keep` peers (the longest quiet is
forgotten first), each forgotten `window` after its last refusal.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from meshplane.xds import streams

log = structlog.get_logger(__name__)

INTERVAL = 60.0
WINDOW = 600.0
KEEP = 1000
MESSAGE_CHARS = 1024  # what is kept of a refusal's message and node id (KEEP of them at most)
NODE_CHARS = 256


@dataclass(slots=True)
class Refusal:
    """One peer address refused for one reason, as last seen."""

    address: str
    reason: str
    code: str
    message: str
    node: str
    identity: str | None
    first: float  # wall clock
    last: float
    count: int = 1
    suppressed: int = 0  # refusals since the last logged
    logged: float = 0.0


class Refusals:
    """Records refusals, logs them no more often than once per `interval` per peer address and reason."""

    def __init__(self, *, interval: float = INTERVAL, window: float = WINDOW, keep: int = KEEP,
                 clock: Callable[[], float] = time.time) -> None:
        self.interval, self.window, self.keep = interval, window, keep
        self._clock = clock
        self._by_key: dict[tuple[str, str], Refusal] = {}
        self._swept = 0.0

    def record(self, event: str, *, peer: str, code: str, reason: str, message: str, node: str = "",
               identity: str | None = None, **context: Any) -> None:
        """A client refused: `event` is the log line's, `peer` gRPC's peer string, `context` more for the log."""
        now = self._clock()
        self._forget(now)
        # Kept for /debug/syncz: a refused node's message may quote up to --max-node-bytes of its data.
        message, node = _cut(message, MESSAGE_CHARS), _cut(node, NODE_CHARS)
        address = streams.peer_address(peer)
        entry = self._by_key.get((address, reason))
        if entry is None:
            entry = Refusal(address, reason, code, message, node, identity, first=now, last=now, count=0)
            self._by_key[(address, reason)] = entry
            if len(self._by_key) > self.keep:
                del self._by_key[min(self._by_key, key=lambda k: self._by_key[k].last)]
        entry.count += 1
        entry.last, entry.code, entry.message, entry.node, entry.identity = now, code, message, node, identity
        if entry.count > 1 and now - entry.logged < self.interval:
            entry.suppressed += 1
            return
        repeats = {"suppressed": entry.suppressed} if entry.suppressed else {}
        log.warning(event, peer=peer, node=node, status=code, error=message, **repeats, **context)
        entry.suppressed, entry.logged = 0, now

    def refuse(self, event: str, *, callbacks: streams.Callbacks, stream: streams.Stream | None = None, peer: str,
               code: str, reason: str, message: str, node: str = "", identity: str | None = None,
               **context: Any) -> None:
        """A client refused, wherever it was (a stream, the TLS relay's handshake or its limits): recorded
        and logged as `record` says (with the stream's id), and counted (`callbacks.refused`)."""
        if stream is not None:
            context["stream"] = stream.id
        self.record(event, peer=peer, code=code, reason=reason, message=message, node=node, identity=identity,
                    **context)
        callbacks.refused(stream, code, reason)

    def recent(self) -> list[Refusal]:
        """Every peer address and reason refused in the last `window`, the latest first."""
        self._forget(self._clock(), at_once=True)
        return sorted(self._by_key.values(), key=lambda r: r.last, reverse=True)

    def _forget(self, now: float, *, at_once: bool = False) -> None:
        if not at_once and now - self._swept < 1.0:  # a flood of refusals walks the table once a second
            return
        self._swept = now
        for key in [key for key, r in self._by_key.items() if now - r.last > self.window]:
            del self._by_key[key]


def _cut(text: str, most: int) -> str:
    return text if len(text) <= most else text[:most] + "..."
