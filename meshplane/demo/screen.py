"""What `meshplane demo` prints: each round as a table of where every hop landed, and everything else
wrapped, within 80 columns (a terminal's default).

A round is one row per request and one column per service of the chain:
the zone that answered, `*` when a hop landed outside the zone of the hop
before it (its caller's zone for the first hop of a `from` row: it failed
over), and `!` with the reason where a hop failed.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

WIDTH = 80
MOVED = "*"
FAILED = "!"

_REASONS = {"ConnectionRefusedError": "refused", "TimeoutError": "timeout", "ConnectionResetError": "reset",
            "IncompleteReadError": "cut off"}
"""A failed hop's exception, in a word."""


@dataclass(frozen=True)
class Row:
    """One request of a round: its label, where its caller runs (None when a gateway chose the first
    hop), and the answer (the status, and the trace of hops as the backends write it)."""

    label: str
    caller_zone: str | None
    status: int
    body: str


def cells(row: Row) -> list[str]:
    """Per hop, the zone that answered (marked when it left its caller's zone), or why it failed."""
    out: list[str] = []
    previous = row.caller_zone
    for part in (p.strip() for p in row.body.split(" -> ")):
        _, at, zone = part.partition("@")
        if part.startswith(FAILED) or not at or not zone:
            # "!mockb 503", "!TimeoutError", or not a trace at all (Envoy's "no healthy upstream")
            words = part.removeprefix(FAILED).split(maxsplit=1)
            reason = (words[-1] if part.startswith(FAILED) else part) if words else str(row.status)
            out.append(FAILED + _REASONS.get(reason, reason))
            break
        zone = zone.split()[0]
        out.append(zone + (MOVED if previous is not None and zone != previous else ""))
        previous = zone
    return out


def round_table(number: int, clock: str, rows: Sequence[Row], *, chain: Sequence[str], zones: Sequence[str]) -> str:
    """The round's heading (its number and time over the service names), then a line per row; the
    columns are as wide every round (a zone's name and its marker). A failed hop ends its row, so its
    reason may run on past its column, up to the screen's edge."""
    label_width = max((len(r.label) for r in rows), default=0)
    every = [cells(r) for r in rows]
    cell_width = max([len(z) + len(MOVED) for z in zones] + [len(s) for s in chain]) + 2
    lead = 2 + label_width + 1 + 3 + 1  # indent, label, status
    lines = [f"{f'round {number} ({clock})':<{lead}}" + "".join(f"{s:<{cell_width}}" for s in chain).rstrip()]
    for row, cs in zip(rows, every, strict=True):
        line = f"  {row.label:<{label_width}} {row.status or '-':>3} " + "".join(f"{c:<{cell_width}}" for c in cs)
        lines.append(line.rstrip()[:WIDTH])
    return "\n".join(lines)


def fit(text: str, *, width: int = WIDTH) -> str:
    """Wrap each line longer than `width`, its continuation indented under it (4 more spaces)."""
    out = []
    for line in text.splitlines():
        if len(line) <= width:
            out.append(line)
            continue
        indent = " " * (len(line) - len(line.lstrip()))
        out.extend(textwrap.wrap(line.strip(), width=width, initial_indent=indent, subsequent_indent=indent + "    ",
                                 break_long_words=False, break_on_hyphens=False))
    return "\n".join(out)
