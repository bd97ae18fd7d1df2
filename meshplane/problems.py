"""A problem in a file an operator wrote, as `file:line: field: reason`, and the wording every such file shares.

The policy (meshplane/policy/validate.py) and the endpoint files
(meshplane/discovery/fileparse.py) both report through `Problem`, so
`meshplane validate`, the logs and `/ready` say a mistake the same way
whichever file it is in. Lines come from meshplane/yamlpos.py.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Problem:
    """`line` 0: the file as a whole (it could not be read), not a place in it; `field` then names what
    gave the file (a flag, as `--policy`) or is "(file)"."""

    file: str
    line: int
    field: str
    reason: str
    severity: Severity = "error"

    def __str__(self) -> str:
        if self.line:
            return f"{self.file}:{self.line}: {self.field}: {self.reason}"
        given = f"{self.field} " if self.field.startswith("--") else ""
        return f"{given}{self.file}: {self.reason}"


def cannot_read(exc: OSError) -> str:
    """Why a file cannot be read, the one way every file meshplane reads says it (after `--flag FILE: `)."""
    return f"cannot read it: {exc.strerror or exc}"


def unknown_field(key: object, known: Sequence[str]) -> str:
    """`unknown field 'endpoint'; did you mean 'endpoints'?` (or the fields allowed there, when none is close)."""
    reason = f"unknown field {safe_repr(key)}"
    if not known:
        return reason
    close = did_you_mean(key, known)
    if close is not None:
        return f"{reason}; did you mean {close!r}?"
    return f"{reason}; known fields here: {', '.join(known)}"


def did_you_mean(word: object, known: Sequence[str]) -> str | None:
    """The one of `known` that `word` is most likely a typo of, if any is close."""
    close = difflib.get_close_matches(str(word), known, n=1)
    return close[0] if close else None


def show(value: Any) -> str:
    """A value as an error message quotes it: short, and never failing."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = safe_repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def safe_repr(value: Any) -> str:
    """repr(), except for what repr() refuses (an int of more than 4,300 digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 10_000:
        return f"a number of {value.bit_length() * 3 // 10} digits or so"
    return repr(value)
