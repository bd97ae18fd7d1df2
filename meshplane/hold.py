"""Holding back an edit that would drop most of what a file gave, until the file has kept it a while.

A writer that truncates a file, closes it and writes it again a moment later (some tools do) makes its
close vouch for an empty file; a writer that pauses longer than the settling time where inotify cannot
see it (meshplane/watch.py) is read half way. Either would take most of the services, routes or
gateways away from every proxy for a moment. So an edit that drops most of what is in force is applied
only once the file has kept that content for `HOLD_S`, then said at warning level with what goes; any
smaller edit is applied at once. The endpoint files (meshplane/discovery/filesource.py) and the policy
(meshplane/policy/reload.py) hold their edits so.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import structlog

from meshplane import watch

log = structlog.get_logger(__name__)

HOLD_S = 1.0
"""An edit that would drop most of what a file gave (every route, most services) is applied only once the
file has kept that content this long."""


class Hold:
    """How long a file has kept its content, as its owner's reads saw it, and whether an edit that drops most
    of what is in force may be applied now. `held` and `said` are what the owner logs when it holds such an
    edit back (info) and when it applies it (warning)."""

    def __init__(self, *, held: str = "", said: str = "", after: float | None = None) -> None:
        """`after`: HOLD_S (as it is when the hold is made) unless given."""
        self.held, self.said = held, said
        self.after = HOLD_S if after is None else after
        self._digest: bytes | None = None
        self._since = 0.0
        self._told: bytes | None = None  # the content last said to be held back: said once, not at every look

    def saw(self, digest: bytes | None) -> float:
        """The file holds this content now (every read says so); the clock starts again whenever it differs.
        How many seconds more it must keep it to have kept it `after` (0: it has)."""
        now = time.monotonic()
        if digest != self._digest:
            self._digest, self._since = digest, now
        return max(0.0, self._since + self.after - now)

    def kept(self, drops: Mapping[str, object] | None, *, still: bool, look: watch.Watch | None,
             **fields: object) -> bool:
        """Whether the edit last seen (and loaded since) may replace what is in force: yes when it keeps most
        of it (`drops` is None); otherwise only once the file has kept it `after` seconds, counted from its
        first read, so the time its load took counts too, and then said loudly with `drops`. `still`: the file
        is as it was read (nothing written since): if not, its writer may not be done, and the watch wakes its
        owner again for that write. `look`: the watch asked to look again when the wait is over."""
        if drops is None:
            return True
        wait = self._since + self.after - time.monotonic()
        if not still or wait > 0:
            if self._told != self._digest:
                self._told = self._digest
                log.info(self.held, seconds=round(max(wait, 0.0), 3), **fields)
            if still and look is not None:
                look.look_again(wait)
            return False
        log.warning(self.said, **fields, **drops)
        return True


def most(lost: int, *, of: int) -> bool:
    """`lost` of `of` is most of it: the share of an edit that is held and said loudly."""
    return of > 0 and lost * 2 > of


def said(lost: Sequence[str], *, of: int) -> str:
    """What an edit drops, as a warning says it: `7 of 10: a, b, c, d, e, ...`."""
    return f"{len(lost)} of {of}: " + ", ".join(lost[:5]) + (", ..." if len(lost) > 5 else "")
