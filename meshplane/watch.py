"""Watching files for edits: what endpoint files, the policy (and the files it names) and a directory
of kubeconfigs share.

Three parts:

- `Watch` says when to look at the files: once a write to them is complete.
  inotify watches the directories that hold them, read from the event loop
  (asyncinotify): editors replace a file by renaming another over it, and a
  Kubernetes ConfigMap volume swaps its `..data` symlink atomically; both
  show as events in the directory, and both change what `os.stat` of the
  file's path (which follows symlinks) says. A write in place (`cp`, `cat >`,
  a tool streaming its output) truncates the file and writes it in pieces:
  its MODIFY events mean a write is under way, and only its CLOSE_WRITE (or
  a rename, or a `..data` swap) says it is complete, so the watch wakes its
  owner within about a millisecond of the close, never in between, however
  long the writer pauses. Where inotify says nothing of a change (no inotify
  here: the poll every `interval`; a write inotify cannot see, made on
  another machine of a network filesystem: the same poll, as a backstop),
  a file whose stat changed is *settling*: it is looked at once its stat
  has stayed the same for `SETTLE_S` (or its mtime is that old already).
  A file kept open for writing with no write for `OPEN_WRITER_S` is read
  as it is, with a warning.
- `read` reads a file whole, or says it changed while being read; and
  `Watch.disturbed` says whether a write began since the watch said to look.
  Either way the owner does not use what it read: the watch wakes it again.
- `Seen` says whether a file really changed since it was last read: its
  stat, and while the stat cannot be trusted (written within the last two
  seconds: a second write in the same timestamp tick may leave size, inode
  and mtime as they were), the hash of its content. A `touch`, or a
  rewrite with the same bytes, is no change.
- `read_settled` is the first read of a file, at start-up, before any watch
  has seen its writes: it waits until the file has settled as a polled one
  must, and reads it again if it changed while being read.

What an owner does with an edit that would drop most of what it serves
(hold it until the file has kept it) is meshplane/hold.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

RACY_NS = 2_000_000_000
"""A file modified this recently may be modified again within the filesystem's timestamp granularity
without its stat changing, so its stat is not trusted until it is older than this: until then, re-hash."""

SETTLE_S = 0.2
"""A change inotify did not vouch for (no inotify, or a write it cannot see) is looked at once the file's
stat has stayed the same this long, or its mtime is this old: a writer pausing between pieces for less
than this is never read half way."""

OPEN_WRITER_S = 5.0
"""A file written and still open (MODIFY with no CLOSE_WRITE yet) is waited for; once no write has come
for this long it is read as it is (a writer that keeps it open for ever, or `truncate(2)` by path, which
closes nothing), with a warning."""

Stat = tuple[int, int, int]  # mtime ns, size, inode


def stat_of(path: Path) -> Stat | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def digest_of(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


@dataclass(frozen=True, slots=True)
class Read:
    """A file read whole: its stat before the read, its content (or why it cannot be read), and whether it
    changed while being read (`torn`: what was read may be half of one version; look again once it settles)."""

    stat: Stat | None
    data: bytes | OSError
    torn: bool


def read(path: Path) -> Read:
    before = stat_of(path)
    try:
        data: bytes | OSError = path.read_bytes()
    except OSError as exc:
        data = exc
    return Read(before, data, stat_of(path) != before)


async def read_settled(path: Path) -> Read:
    """`path` read whole once it has settled, as a polled file must (its stat the same for `SETTLE_S`, or
    its mtime that old), and read again, once settled again, when it changed while read: the first read,
    before any watch has seen the file's writes (a `cp` under way when meshplane starts). A file still
    changing after `OPEN_WRITER_S` is read as it is, with a warning."""
    began = time.monotonic()
    stat, since, by_mtime = stat_of(path), began, True
    while True:
        now = time.monotonic()
        if (current := stat_of(path)) != stat:
            stat, since = current, now
        old = (time.time_ns() - stat[0]) / 1e9 if stat is not None and by_mtime else 0.0
        wait = SETTLE_S - max(now - since, old)
        if stat is None or wait <= 0:
            got = read(path)
            if not got.torn:
                return got
            # Its mtime said it was old, and it changed while read: from now on only our own clock decides.
            stat, since, by_mtime, wait = stat_of(path), time.monotonic(), False, SETTLE_S
        if now - began >= OPEN_WRITER_S:
            log.warning("file still being written after a while: reading it as it is", path=str(path),
                        seconds=OPEN_WRITER_S)
            return read(path)
        await asyncio.sleep(wait)


@dataclass(frozen=True, slots=True)
class Seen:
    """A file as it was read: its stat, and its content's hash (kept to compare while the stat is racy)."""

    stat: Stat | None
    digest: bytes | None

    @classmethod
    def of(cls, stat: Stat | None, data: bytes | None) -> Seen:
        return cls(stat, None if data is None else digest_of(data))

    @classmethod
    def now(cls, path: Path) -> Seen:
        stat = stat_of(path)
        try:
            data = path.read_bytes() if stat is not None else None
        except OSError:
            data = None
        return cls.of(stat, data)

    def unchanged(self, stat: Stat | None, *, quiet: bool = False) -> bool:
        """The file's stat is what it was, and can be trusted: no need to read it again. It can when it is
        old enough, or when inotify watches and reported nothing (`quiet`): a write in the same timestamp
        tick would have been reported."""
        return stat is not None and stat == self.stat and (quiet or time.time_ns() - stat[0] >= RACY_NS)

    def changed(self, path: Path, *, quiet: bool = False) -> bool:
        """Whether `path`'s content differs from what was seen (an unreadable file differs from a readable one)."""
        stat = stat_of(path)
        if self.unchanged(stat, quiet=quiet):
            return False
        return Seen.now(path).digest != self.digest


@dataclass(slots=True)
class _Look:
    """A file as the watch last saw it: its stat, since when (monotonic), and whether it has settled."""

    stat: Stat | None
    since: float
    settled: bool


class Watch:
    """Says when to look at the watched files: `async for quiet in watch.events()` (`quiet`: inotify
    watches and reported nothing about the files: this is the backstop's wake-up, and an unchanged stat
    can be trusted). It wakes once any write to them is complete, and at least every `interval`.

    `paths` are files (their directories are watched; an event counts when it names one of them, or a
    ConfigMap volume's `..` entries) or directories (an event counts when its name is not hidden and
    `include` accepts it, and the files so named are the ones that must settle). `interval` is the
    fallback poll: where inotify works, events come at once and the poll is only a backstop.
    """

    def __init__(self, paths: Iterable[Path], *, interval: float, inotify: bool = True,
                 include: Callable[[str], bool] | None = None) -> None:
        self.interval = interval
        self.inotify = inotify
        self._include = include
        self._files: tuple[Path, ...] = ()
        self._dirs: tuple[Path, ...] = ()
        self._names: frozenset[str] | None = frozenset()
        self._set(paths)
        self._moved = asyncio.Event()
        self._notify: Any = None  # asyncinotify.Inotify while watching with it
        self._writing: dict[str, float] = {}  # names written and not yet closed -> when last written (monotonic)
        self._vouched: set[str] = set()  # names whose write completed since the last look
        self._swapped = False  # a `..` entry changed: a ConfigMap volume swapped every file at once
        self._heard = True  # something may have changed that inotify did not vouch for: not quiet
        self._due = True  # a look is due once the files settle
        self._again: float | None = None  # look_again's moment (monotonic)
        self._looks: dict[Path, _Look] = {}
        self.ready = asyncio.Event()
        """Set once the files are watched (inotify set up, or polling) and the owner has taken its first look:
        a write from then on is seen as it happens."""

    def watch(self, paths: Iterable[Path]) -> None:
        """Watch these instead (the files a policy names change with the policy), from the next wake-up."""
        if self._set(paths):
            self._moved.set()

    def _set(self, paths: Iterable[Path]) -> bool:
        absolute = tuple(Path(os.path.abspath(p)) for p in paths)
        dirs, names = _directories(absolute)
        if (dirs, names) == (self._dirs, self._names):
            return False
        self._dirs, self._names = dirs, names
        self._files = tuple(p for p in absolute if not p.is_dir())
        return True

    def look_again(self, after: float) -> None:
        """Wake once more, `after` seconds from now, even if nothing happens (an owner holding an edit back)."""
        moment = time.monotonic() + after
        self._again = moment if self._again is None else min(self._again, moment)

    def disturbed(self) -> bool:
        """Whether a write to the files began (or completed) since the watch last said to look: then what
        its owner read may be half a file. The watch wakes it again once that write is complete."""
        if self._notify is not None:
            self._drain()
        return bool(self._writing) or (self._due and self._notify is not None)

    async def events(self) -> AsyncGenerator[bool, None]:
        """Yields when the watched files may have changed and have settled, and at least every `interval`:
        whether inotify watched and saw nothing of the files (then a stat that is unchanged can be trusted)."""
        while True:
            self._moved.clear()
            dirs = [d for d in self._dirs if d.is_dir()]
            if self.inotify and dirs:
                self._notify = self._open(dirs)
            self._due, self._heard = True, True  # watching from now on: look once, for what changed before
            try:
                async with contextlib.aclosing(self._looks_due()) as looks:
                    async for quiet in looks:
                        yield quiet
                        self.ready.set()
            finally:
                notify, self._notify = self._notify, None
                if notify is not None:
                    notify.close()

    async def _looks_due(self) -> AsyncGenerator[bool, None]:
        """Until the watched directories change (`watch`, or one went): a look each time one is due and the
        files have settled."""
        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        notify = self._notify
        tick = time.monotonic() + self.interval
        while not self._moved.is_set():
            now = time.monotonic()
            if self._again is not None and now >= self._again:
                self._again, self._due, self._heard = None, True, True
            if now >= tick:  # the poll, or inotify's backstop
                if notify is None and self.inotify and any(d.is_dir() for d in self._dirs):
                    return  # a directory to watch is there now: watch it with inotify
                tick = now + self.interval
                self._due = True
                self._heard = self._heard or notify is None
            wait = self._unsettled(now) if self._due else None
            if self._due and wait is None:
                quiet = not self._heard
                self._due, self._heard, self._swapped = False, False, False
                self._vouched.clear()
                yield quiet
                continue
            deadline = min(tick, now + wait if wait is not None else tick, self._again or tick)
            # Only while waiting is the descriptor's readiness awaited (an owner that awaits something
            # between looks must not leave the loop woken by events nobody reads), and it is read
            # synchronously below: a timeout never cuts a read short and loses its events.
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancellation that
            # arrives as the awaited call completes, and then stop() waits for ever (a test teardown hung so).
            readable.clear()
            if notify is not None:
                loop.add_reader(notify.fd, readable.set)
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                        await (readable.wait() if notify is not None else self._moved.wait())
            finally:
                if notify is not None:
                    loop.remove_reader(notify.fd)
            if readable.is_set() and not self._drain():
                return  # a watched directory went: set the watches up again

    def _open(self, dirs: list[Path]) -> Any:
        """An inotify descriptor watching `dirs`, or None (then the watch polls from now on)."""
        import asyncinotify

        mask = (asyncinotify.Mask.CREATE | asyncinotify.Mask.MODIFY | asyncinotify.Mask.CLOSE_WRITE
                | asyncinotify.Mask.MOVED_TO | asyncinotify.Mask.MOVED_FROM | asyncinotify.Mask.DELETE
                | asyncinotify.Mask.ATTRIB | asyncinotify.Mask.DELETE_SELF | asyncinotify.Mask.MOVE_SELF)
        notify = None
        try:
            notify = asyncinotify.Inotify(sync_timeout=0)  # sync_get: what is there, without waiting
            for directory in dirs:
                notify.add_watch(directory, mask)
        except OSError as exc:  # no inotify here (or no watches left): poll from now on
            log.warning("cannot watch files with inotify, polling instead", directories=[str(d) for d in dirs],
                        error=str(exc), interval=self.interval)
            self.inotify = False
            if notify is not None:
                notify.close()
            return None
        self._writing.clear()  # what the last descriptor knew is not known to this one: stats decide
        return notify

    def _drain(self) -> bool:
        """Take every event inotify has now, without waiting; False when a watched directory went."""
        import asyncinotify

        notify = self._notify
        while True:
            try:
                event = notify.sync_get()
            except BlockingIOError:
                return True
            if event is None:
                return True
            mask = event.mask
            if mask & asyncinotify.Mask.Q_OVERFLOW:  # events were lost: the stats decide
                self._writing.clear()
                self._due = self._heard = True
                continue
            if mask & (asyncinotify.Mask.IGNORED | asyncinotify.Mask.DELETE_SELF | asyncinotify.Mask.MOVE_SELF):
                self._due = self._heard = True
                self._moved.set()
                return False
            name = None if event.name is None else str(event.name)
            if name is None or not self._counts(name):
                continue
            self._due = self._heard = True
            if name.startswith(".."):
                self._swapped = True  # a ConfigMap's ..data: every file changed at once, atomically
            elif mask & (asyncinotify.Mask.MODIFY | asyncinotify.Mask.CREATE) and not mask & asyncinotify.Mask.ISDIR:
                self._writing[name] = time.monotonic()  # a write under way
            elif mask & (asyncinotify.Mask.CLOSE_WRITE | asyncinotify.Mask.MOVED_TO):
                self._writing.pop(name, None)  # complete: closed by its writer, or renamed in whole
                self._vouched.add(name)
            elif mask & (asyncinotify.Mask.DELETE | asyncinotify.Mask.MOVED_FROM):
                self._writing.pop(name, None)

    def _unsettled(self, now: float) -> float | None:
        """None when every watched file has settled; otherwise how long until one may have."""
        waits = []
        for name, written in list(self._writing.items()):
            left = written + OPEN_WRITER_S - now
            if left > 0:
                waits.append(left)
                continue
            del self._writing[name]
            log.warning("file open for writing with nothing written for a while: reading it as it is",
                        name=name, directories=[str(d) for d in self._dirs], seconds=OPEN_WRITER_S)
        for path in self._watched():
            stat = stat_of(path)
            look = self._looks.get(path)
            # Its writer closed it, or a whole file took its place: complete, however recent.
            vouched = stat is not None and (self._swapped or not self._vouched.isdisjoint(_names_of(path)))
            if look is None or look.stat != stat:
                old = stat is not None and time.time_ns() - stat[0] >= SETTLE_S * 1e9
                if look is not None and not vouched:
                    self._heard = True  # changed, and inotify did not say so: not a quiet look
                look = self._looks[path] = _Look(stat, now, vouched or old)
            if not look.settled:
                if vouched or now - look.since >= SETTLE_S:
                    look.settled = True
                else:
                    waits.append(look.since + SETTLE_S - now)
        return min(waits) if waits else None

    def _watched(self) -> list[Path]:
        """The files that must settle: the watched files; in a watched directory, those `include` accepts."""
        if self._names is not None:
            return list(self._files)
        found = []
        for directory in self._dirs:
            with contextlib.suppress(OSError):
                found += [Path(e.path) for e in os.scandir(directory) if self._counts(e.name) and e.is_file()]
        return found

    def _counts(self, name: str) -> bool:
        if name.startswith(".."):
            return True
        if self._names is None:  # a directory: hidden files (editors' swap files, temporary files) never count
            return not name.startswith(".") and (self._include is None or self._include(name))
        return name in self._names


def _names_of(path: Path) -> set[str]:
    """The names inotify reports a file's writes under: its own, and (a symlink) its target's."""
    return {path.name, path.resolve().name}


def _directories(paths: Iterable[Path]) -> tuple[tuple[Path, ...], frozenset[str] | None]:
    """The directories to watch, and the names in them that count (None: every name, a directory was given).
    A file's directory is watched, and so is the directory of the file it is a symlink to."""
    dirs: set[Path] = set()
    names: set[str] | None = set()
    for path in (Path(os.path.abspath(p)) for p in paths):
        if path.is_dir():
            dirs.add(path)
            names = None
            continue
        dirs.add(path.parent)
        target = path.resolve()
        dirs.add(target.parent)
        if names is not None:
            names.update((path.name, target.name))
    return tuple(sorted(dirs)), None if names is None else frozenset(names)
