"""Parse and format durations written as "500ms", "3s", "2m", "1h"."""

from __future__ import annotations

import math
import re

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


def parse_duration(value: object) -> float:
    """Seconds from "500ms" / "3s" / "2m" / "1h" or a bare non-negative number of seconds.

    Raises ValueError with a message that shows the accepted forms.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like \"500ms\", \"3s\" or \"2m\", got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _PATTERN.match(value)):
        seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    else:
        raise ValueError(f"expected a duration like \"500ms\", \"3s\" or \"2m\", got {value!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"a duration must be a finite number >= 0, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest exact string parse_duration reads back as the same value."""
    millis = round(seconds * 1000)
    if millis % 3_600_000 == 0 and millis:
        return f"{millis // 3_600_000}h"
    if millis % 60_000 == 0 and millis:
        return f"{millis // 60_000}m"
    if millis % 1000 == 0:
        return f"{millis // 1000}s"
    return f"{millis}ms"
