"""Per-stream state, one structure for every protocol server (docs/architecture.md, layer 4).

A stream is one client's connection: the proxy it classified as, its view,
and per resource type what it asked for, what it holds, and where the
exchange stands (the nonce in flight, the version it ACKed, its last NACK
with Envoy's message). The state-of-the-world and delta servers fill it
in; status endpoints read it, never the servers.

`Registry` holds the open streams, and the gate that holds them until the
control plane is ready (decision 0005): until `open()`, requests are read
and recorded, nothing is sent.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Protocol

from meshplane.xds import cache, proxy


@dataclass(frozen=True, slots=True)
class Nack:
    """A response the client rejected: the version it rejected, the one it kept, its message, and when
    (wall clock)."""

    rejected: str
    kept: str
    message: str
    at: float


class Sync(enum.StrEnum):
    """Where one type of one stream stands (`meshplane status`)."""

    SYNCED = "SYNCED"  # the client ACKed the latest version we sent
    STALE = "STALE"  # sent, not ACKed yet
    NACKED = "NACKED"  # the client rejected the latest version we sent
    NOT_SENT = "NOT SENT"  # asked for, nothing sent yet


_RANK = {Sync.SYNCED: 0, Sync.NOT_SENT: 1, Sync.STALE: 2, Sync.NACKED: 3}


class Many(enum.Enum):
    """More names than are worth keeping one by one: the whole type."""

    NAMES = "many names"


MANY = Many.NAMES

SETTLE_NAMES = 64
"""A response bringing more names than this is settled as a whole: its names are not kept (the first
push of a thousand clusters to a thousand streams would otherwise keep a million names until ACKed)."""


@dataclass(slots=True)
class TypeState:
    """One resource type on one stream."""

    wildcard: bool = False
    names: frozenset[str] = frozenset()  # shared by the streams that ask for the same names
    names_key: bytes | None = None  # requests.Request.names_key of the last request applied
    held: cache.Held = field(default_factory=cache.Held)
    nonce: str = ""  # of the last response sent
    answered: bool = False  # something was sent, or found held already
    # nonce -> earliest change time it carries (None: nothing new to time)
    inflight: dict[str, float | None] = field(default_factory=dict)
    sent_version: str = ""  # version_info of the last response sent
    sent_at: float | None = None  # wall clock
    acked_version: str = ""
    last_nack: Nack | None = None
    reported: str = ""  # the version the client said it holds when it (re)connected: checked at the first push
    not_found: frozenset[str] = frozenset()  # state of the world: subscribed names last answered as absent
    # delta: names to send even if held at that version (newly subscribed), and the version each nonce carried
    resend: set[str] = field(default_factory=set)
    nonce_versions: dict[str, str] = field(default_factory=dict)
    # nonce -> the names a response in flight brought new or changed (MANY: more than are worth a set): until
    # the client answers it, they are not settled, and what refers to them waits (meshplane/xds/order.py).
    unsettled: dict[str, frozenset[str] | Many] = field(default_factory=dict)

    def sent(self, nonce: str, *, seen: float | None, names: Collection[str]) -> None:
        """A response went out under `nonce`, bringing `names` (new or changed) and carrying changes first
        seen at `seen` (None: nothing new to time)."""
        self.nonce = nonce
        self.answered = True
        self.sent_at = time.time()
        self.inflight[nonce] = seen
        if names:
            self.unsettled[nonce] = frozenset(names) if len(names) <= SETTLE_NAMES else MANY

    def settle(self, nonce: str | None = None) -> None:
        """The client answered `nonce` (ACK or NACK): what it brought is settled. None: it answered the
        latest response (state of the world, where an answer to an older one is a stale nonce, ignored),
        so everything is."""
        if nonce is None:
            self.unsettled.clear()
        else:
            self.unsettled.pop(nonce, None)

    def settled(self, name: str) -> bool:
        """No response bringing `name` waits for the client's answer."""
        return not any(names is MANY or name in names for names in self.unsettled.values())

    def sync(self) -> Sync:
        if not self.wildcard and not self.names:
            return Sync.SYNCED  # it asks for nothing of this type (yet), and lacks nothing
        if not self.answered:
            return Sync.NOT_SENT
        if self.acked_version == self.sent_version:
            return Sync.SYNCED
        nack = self.last_nack
        if nack is not None and nack.rejected == self.sent_version:
            return Sync.NACKED
        return Sync.STALE

    def wants(self, name: str) -> bool:
        return self.wildcard or name in self.names

    def wanted(self, available: cache.ResourceMap) -> cache.ResourceMap:
        """What of `available` this subscription covers; for a wildcard, `available` itself."""
        if self.wildcard:
            return available
        return {n: available[n] for n in self.names if n in available}


Dirty = AbstractSet[str] | cache.Every
"""Names of a type to look at again on the next push, or EVERY. Never changed in place (may be shared)."""


class Stream:
    """One client's stream, whichever protocol it speaks."""

    def __init__(self, stream_id: int, peer: str, *, protocol: str = "sotw",
                 on_stall: Callable[[Stream], None] = lambda stream: None) -> None:
        self.id = stream_id
        self.peer = peer
        self.protocol = protocol  # "sotw" or "delta"
        self.identity: str | None = None  # the client certificate's SPIFFE id ("" none in it; None: no certificate)
        self.certificate_asked = False  # its port asked for a client certificate but let it in without one
        self._on_stall = on_stall
        self.connected_at = time.time()
        self.proxy: proxy.Proxy | None = None
        self.watch: cache.ViewWatch | None = None
        self.types: dict[str, TypeState] = {}
        self.dirty: dict[str, Dirty] = {}
        self.dirty_since: float | None = None  # monotonic: when the oldest change not yet pushed was marked
        # Make before break (meshplane/xds/order.py): names held back until what they refer to is settled,
        # or kept until nothing the client holds refers to them; looked at again when the client answers.
        self.waiting: dict[str, set[str]] = {}
        # Clusters sent changed whose assignments are to follow, sent even if unchanged (Envoy re-warms an
        # updated cluster and waits for them), as soon as the client asks for them.
        self.rewarm: set[str] = set()
        self.wake = asyncio.Event()
        self._nonces = itertools.count(1)

    @property
    def node_id(self) -> str:
        return self.proxy.id if self.proxy is not None else ""

    def sync(self, type_url: str) -> Sync:
        """Where one type stands; a type whose view changed and is not written yet is STALE, whatever
        the client ACKed."""
        state = self.types[type_url].sync()
        if (type_url in self.dirty or type_url in self.waiting) and state != Sync.NOT_SENT:
            return Sync.STALE
        return state

    def worst(self) -> Sync:
        """The client's state: the worst of its types' (NACKED, STALE, NOT SENT, SYNCED)."""
        worst, rank = Sync.SYNCED, 0
        for type_url in self.types:  # counted for every client at every scrape: no set, no enum hashing
            state = self.sync(type_url)
            if state is not Sync.SYNCED and (r := _RANK[state]) > rank:
                worst, rank = state, r
        return worst

    def mark(self, changes: Mapping[str, Dirty]) -> None:
        """Record names to look at again, and wake the writer."""
        if self.dirty_since is None:
            self.dirty_since = time.monotonic()
        for type_url, names in changes.items():
            mark_dirty(self.dirty, type_url, names)
        self.wake.set()

    def replied(self) -> None:
        """The client replied to a response (ACK or NACK): what waited on it is looked at again."""
        if self.waiting:
            waiting, self.waiting = self.waiting, {}
            self.mark({type_url: frozenset(names) for type_url, names in waiting.items()})

    def next_nonce(self) -> str:
        return str(next(self._nonces))

    def stalled(self) -> None:
        """A write to this stream's client was not taken in time (its push slot was given back)."""
        self._on_stall(self)


def mark_dirty(dirty: dict[str, Dirty], type_url: str, names: Dirty) -> None:
    current = dirty.get(type_url)
    if current is None or names is cache.EVERY:
        dirty[type_url] = names
    elif current is not cache.EVERY:
        dirty[type_url] = current | names


def peer_address(peer: str) -> str:
    """The address of a gRPC peer (`ipv4:10.0.0.1:5000`, `ipv6:[::1]:5000`), without its port."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return peer
    return rest.rpartition(":")[0].strip("[]") or rest


class Registry:
    """The open streams of every protocol server, and the gate that holds them until ready."""

    def __init__(self, *, held: bool = False) -> None:
        self._streams: dict[int, Stream] = {}
        self._by_address: dict[str, int] = {}
        self._ids = itertools.count(1)
        self.serving = not held

    def open_stream(self, peer: str, *, protocol: str = "sotw",
                    on_stall: Callable[[Stream], None] = lambda stream: None) -> Stream:
        stream = Stream(next(self._ids), peer, protocol=protocol, on_stall=on_stall)
        self._streams[stream.id] = stream
        address = peer_address(peer)
        self._by_address[address] = self._by_address.get(address, 0) + 1
        return stream

    def close_stream(self, stream: Stream) -> None:
        if self._streams.pop(stream.id, None) is not None:
            address = peer_address(stream.peer)
            left = self._by_address.get(address, 1) - 1
            if left:
                self._by_address[address] = left
            else:
                self._by_address.pop(address, None)

    def from_address(self, address: str) -> int:
        """Open streams from one peer address."""
        return self._by_address.get(address, 0)

    def __iter__(self) -> Iterator[Stream]:
        return iter(list(self._streams.values()))

    def __len__(self) -> int:
        return len(self._streams)

    def open(self) -> None:
        """Start answering the streams held so far (the control plane is ready)."""
        if self.serving:
            return
        self.serving = True
        for stream in self._streams.values():
            stream.wake.set()


class Callbacks(Protocol):
    """Observability hooks: metrics and logs hang off these, not off the protocol code."""

    def stream_opened(self, stream: Stream) -> None: ...
    def stream_closed(self, stream: Stream) -> None: ...
    def response_sent(self, stream: Stream, type_url: str, *, resources: int, size: int) -> None: ...
    def acked(self, stream: Stream, type_url: str, *, latency: float | None) -> None: ...
    def nacked(self, stream: Stream, type_url: str, *, version: str, detail: str) -> None: ...
    def stale_nonce(self, stream: Stream, type_url: str) -> None: ...
    def write_stalled(self, stream: Stream) -> None: ...
    def request_received(self, stream: Stream, type_url: str) -> None: ...
    def push_started(self, stream: Stream, queued: float) -> None: ...
    def refused(self, stream: Stream | None, code: str, reason: str) -> None: ...

