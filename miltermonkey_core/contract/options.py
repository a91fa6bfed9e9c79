"""Option value types shared by the daemon's configuration and every brain's options.

An admin writes sizes and durations the same way in ``[miltermonkey]`` and
in any ``[[brain]]`` table ("25MiB", "50k", "5d", "1h30m"), so the parsers
live here, once, for the core's schema and for brains' attrs ``Options``
classes alike.  Each raises :class:`ValueError` with a message that reads
well after "key: ", which is what ``check-config`` prints.
"""

from __future__ import annotations

import math
import re
from typing import Any, Final

__all__ = ["duration_converter", "parse_duration", "parse_size", "size_converter"]

_SIZE: Final = re.compile(r"(\d+)\s*([kmg]?)(?:i?b)?", re.IGNORECASE)
_SIZE_FACTORS: Final = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}

_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION: Final = re.compile(r"(?:\d+(?:\.\d+)?[smhdw])+")
_DURATION_PART: Final = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def parse_size(value: Any) -> int:
    """Bytes from a number or ``"512k"``, ``"10M"``, ``"25MiB"``, ``"1G"`` (powers of 1024).

    Binary units, as clamd and spamc count them: "25M" in a brain's options
    and clamd's ``StreamMaxLength 25M`` mean the same number of bytes.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"must be at least 0, got {value}")
        return value
    if isinstance(value, str) and (m := _SIZE.fullmatch(value.strip())):
        return int(m.group(1)) * _SIZE_FACTORS[m.group(2).lower()]
    raise ValueError(
        f"expected a size in bytes or like \"512k\", \"10M\", \"25MiB\", got {_shown(value)}")


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string like ``"5d"``, ``"12h"``, ``"1h30m"``, ``"90s"``.

    Retention times read better as "5d" than 432000, and that is how
    Postfix's own ``maximal_queue_lifetime`` is written.
    """
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        try:
            seconds = float(text)
        except ValueError:
            if _DURATION.fullmatch(text):
                seconds = sum(float(n) * _UNITS[u] for n, u in _DURATION_PART.findall(text))
    if seconds is None:
        raise ValueError('expected a duration in seconds or like "5d", "12h", "30m", "90s", '
                         f"got {_shown(value)}")
    if not math.isfinite(seconds):
        raise ValueError(f"expected a finite duration, got {_shown(value)}")
    return seconds


def size_converter(*, minimum: int = 0) -> Any:
    """An attrs converter for a size option of at least ``minimum`` bytes."""

    def convert(value: Any) -> int:
        n = parse_size(value)
        if n < minimum:
            raise ValueError(f"must be at least {minimum} bytes, got {_shown(value)}")
        return n

    return convert


def duration_converter(*, minimum: float = 0.0, exclusive: bool = False) -> Any:
    """An attrs converter for a duration option in seconds (``exclusive``: above ``minimum``)."""

    def convert(value: Any) -> float:
        seconds = parse_duration(value)
        if seconds < minimum or (exclusive and seconds == minimum):
            bound = "more than" if exclusive else "at least"
            raise ValueError(f"must be {bound} {minimum:g} seconds, got {_shown(value)}")
        return seconds

    return convert
