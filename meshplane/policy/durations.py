"""Durations in the policy: Go / Istio style strings (`100ms`, `30s`, `1m30s`), never bare numbers."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, Any

from pydantic import BeforeValidator, WithJsonSchema
from pydantic_core import PydanticCustomError

_UNIT_MS = {"ms": Decimal(1), "s": Decimal(1000), "m": Decimal(60_000), "h": Decimal(3_600_000)}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
DURATION_PATTERN = r"^(\d+(\.\d+)?(ms|s|m|h))+$"


def duration_ms(text: str, *, zero: bool = False) -> int:
    """ "1m30s" -> 90000. Raises ValueError naming the text if it is not a duration of >= 1ms
    (`zero`: or of 0, which Gateway API's timeouts take to mean "no timeout")."""
    pos = 0
    total = Decimal(0)
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += Decimal(match.group(1)) * _UNIT_MS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        if re.fullmatch(r"\d+(\.\d+)?", text.strip()):
            raise ValueError(f"duration {text!r} needs a unit, e.g. 30s (units: ms, s, m, h)")
        raise ValueError(
            f"{text!r} is not a duration; write a number and a unit, e.g. 100ms, 30s, 5m, 1m30s"
        )
    if total < 1 and not (zero and total == 0):
        raise ValueError(f"duration {text!r} is shorter than the minimum of 1ms")
    if total != total.to_integral_value():
        raise ValueError(f"duration {text!r} is not a whole number of milliseconds")
    return int(total)


def _check_duration(value: Any, *, zero: bool = False) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        reason = f"must be a duration such as 30s, got {value!r}"
    elif not isinstance(value, str):
        reason = f"duration needs a unit, e.g. 30s (got {value!r}; units: ms, s, m, h)"
    else:
        try:
            duration_ms(value, zero=zero)
        except ValueError as exc:
            reason = str(exc)
        else:
            return value
    # The reason goes in the context: user text may contain braces.
    raise PydanticCustomError("duration", "{reason}", {"reason": reason})


Duration = Annotated[
    str,
    BeforeValidator(_check_duration),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": DURATION_PATTERN,
            "description": "Go style duration, units ms, s, m, h: 100ms, 30s, 5m, 1m30s; >= 1ms.",
        }
    ),
]
Timeout = Annotated[
    str,
    BeforeValidator(lambda value: _check_duration(value, zero=True)),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": DURATION_PATTERN,
            "description": "Go style duration, units ms, s, m, h: 100ms, 30s, 5m, 1m30s; 0s: no timeout.",
        }
    ),
]
"""A Gateway API timeout: a duration, or 0s for none (GEP-2257, GEP-1742)."""
