"""Watching files for edits: what endpoint files, the policy (and the files it names) and a directory
of kubeconfigs share.

Two parts:

- `Watch` wakes its owner when a file may have changed: inotify on the
  directories that hold them, read from the event loop (asyncinotify), so
  an edit is seen within about a millisecond and nothing runs in between;
  and a poll every `interval` as the fallback where inotify is unavailable
  (and as a backstop where it is). The directory is watched,
  not the file: editors replace a file by renaming another over it, and a
  Kubernetes ConfigMap volume swaps its `..data` symlink atomically; both
  show as events in the directory, and both change what `os.stat` of the
  file's path (which follows symlinks) says.
- `Seen` says whether a file really changed since it was last read: its
  stat, and while the stat cannot be trusted (written within the last two
  seconds: a second write in the same timestamp tick may leave size, inode
  and mtime as they were), the hash of its content. A `touch`, or a
  rewrite with the same bytes, is no change.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

RACY_NS = 2_000_000_000
"""A file modified this recently may be modified again within the filesystem's timestamp granularity
without its stat changing, so its stat is not trusted until it is older than this: until then, re-hash."""

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


class Watch:
    """Wakes when a watched file may have changed: `async for quiet in watch.events()` (`quiet`: inotify
    watches and reported nothing about the files: this is the backstop's wake-up).

    `paths` are files (their directories are watched; an event counts when it names one of them, or a
    ConfigMap volume's `..` entries) or directories (every event in them counts). `interval` is the
    fallback poll: where inotify works, events come at once and the poll is only a backstop.
    """

    def __init__(self, paths: Iterable[Path], *, interval: float, inotify: bool = True) -> None:
        self.interval = interval
        self.inotify = inotify
        self._dirs, self._names = _directories(paths)
        self._moved = asyncio.Event()

    def watch(self, paths: Iterable[Path]) -> None:
        """Watch these instead (the files a policy names change with the policy), from the next wake-up."""
        dirs, names = _directories(paths)
        if (dirs, names) != (self._dirs, self._names):
            self._dirs, self._names = dirs, names
            self._moved.set()

    async def events(self) -> AsyncGenerator[bool, None]:
        """Yields when a watched file may have changed, and at least every `interval`: whether inotify
        watched and saw nothing of the files (then a stat that is unchanged can be trusted)."""
        while True:
            self._moved.clear()
            dirs = [d for d in self._dirs if d.is_dir()]
            if self.inotify and dirs:
                async with contextlib.aclosing(self._inotify(dirs)) as events:
                    async for quiet in events:
                        yield quiet
                        if self._moved.is_set():
                            break
            else:  # nothing to watch with inotify (yet): poll until there is
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.interval):  # not wait_for: see _inotify
                        await self._moved.wait()
                yield False

    async def _inotify(self, dirs: list[Path]) -> AsyncGenerator[bool, None]:
        """inotify read from the event loop (no thread, nothing polled): events for the watched names."""
        import asyncinotify

        mask = (asyncinotify.Mask.CREATE | asyncinotify.Mask.MODIFY | asyncinotify.Mask.CLOSE_WRITE
                | asyncinotify.Mask.MOVED_TO | asyncinotify.Mask.MOVED_FROM | asyncinotify.Mask.DELETE
                | asyncinotify.Mask.ATTRIB | asyncinotify.Mask.DELETE_SELF | asyncinotify.Mask.MOVE_SELF)
        try:
            with asyncinotify.Inotify() as notify:
                for directory in dirs:
                    notify.add_watch(directory, mask)
                yield False  # watching from now on: look once, for what changed before
                while True:
                    # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancellation
                    # that arrives as the awaited read completes, and then stop() waits for ever
                    # (a test teardown hung so); this loop runs ten times a second.
                    try:
                        async with asyncio.timeout(self.interval):
                            event = await notify.get()
                    except TimeoutError:
                        yield True
                        continue
                    if event.mask & (asyncinotify.Mask.IGNORED | asyncinotify.Mask.DELETE_SELF
                                     | asyncinotify.Mask.MOVE_SELF):
                        yield False
                        return  # a watched directory went: set the watches up again
                    if self._counts(event.name):
                        yield False
        except OSError as exc:  # no inotify here (or no watches left): poll from now on
            log.warning("cannot watch files with inotify, polling instead", directories=[str(d) for d in dirs],
                        error=str(exc), interval=self.interval)
            self.inotify = False

    def _counts(self, name: object) -> bool:
        if self._names is None or name is None:
            return True
        text = str(name)
        return text in self._names or text.startswith("..")


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
