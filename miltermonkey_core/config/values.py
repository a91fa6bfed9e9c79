"""Checks for configuration values: each returns the normalised value or raises.

Every check accepts its own output, so the same function serves as an attrs
converter (a ``DaemonConfig`` built in code is checked too) and as a loader
step.  :class:`Invalid` carries only the message; the loader adds the file,
line and key, which is what turns "expected an integer" into an error an
admin can act on.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Iterable
from typing import Any, Final

from miltermonkey_core.contract.options import parse_duration, parse_size

Coerce = Callable[[Any], Any]


class Invalid(ValueError):
    """A value that does not fit its key; the caller adds the file, line and key."""


# --------------------------------------------------------------------------------------
# Value checks.  Each returns the normalised value and accepts its own output,
# so the same function can be an attrs converter and a loader step.
# --------------------------------------------------------------------------------------


def show(value: Any) -> str:
    """The value as the admin wrote it, for 'got ...' in messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list | tuple):
        return "a list"
    return repr(value)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _quoted_hint(value: Any, kind: str) -> str:
    if isinstance(value, str):
        return f" (a string: write it without quotes, e.g. {kind})"
    return ""


def _range_check(value: float, lo: float | None, hi: float | None) -> None:
    if lo is not None and hi is not None and not lo <= value <= hi:
        raise Invalid(f"must be between {lo:g} and {hi:g}, got {value:g}")
    if lo is not None and value < lo:
        raise Invalid(f"must be at least {lo:g}, got {value:g}")
    if hi is not None and value > hi:
        raise Invalid(f"must be at most {hi:g}, got {value:g}")


def integer(lo: int | None = None, hi: int | None = None) -> Coerce:
    def coerce(value: Any) -> int:
        if not is_int(value):
            hint = ""
            if isinstance(value, str) and value.strip().lstrip("-").isdigit():
                hint = _quoted_hint(value, value.strip())
            raise Invalid(f"expected an integer, got {show(value)}{hint}")
        _range_check(value, lo, hi)
        return int(value)

    return coerce


def number(lo: float | None = None, hi: float | None = None) -> Coerce:
    def coerce(value: Any) -> float:
        if not is_number(value) or not math.isfinite(value):
            raise Invalid(f"expected a number, got {show(value)}")
        _range_check(value, lo, hi)
        return float(value)

    return coerce


def boolean(value: Any) -> bool:
    """true/false; 1 and 0 too, because the seed documented ``milter_key`` as "1 or 0"."""
    if isinstance(value, bool):
        return value
    if is_int(value) and value in (0, 1):
        return bool(value)
    hint = ""
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
        hint = " (a string: write true or false without quotes)"
    raise Invalid(f"expected true or false, got {show(value)}{hint}")


def string(*, empty: bool = False) -> Coerce:
    def coerce(value: Any) -> str:
        if not isinstance(value, str):
            raise Invalid(f"expected a string, got {show(value)}")
        if not empty and not value.strip():
            raise Invalid("must not be empty")
        return value

    return coerce


def optional(inner: Coerce) -> Coerce:
    """None, or an empty string (TOML has no null), means "not set"."""

    def coerce(value: Any) -> Any:
        if value is None or value == "":
            return None
        return inner(value)

    return coerce


def choice(*choices: str) -> Coerce:
    def coerce(value: Any) -> str:
        if isinstance(value, str) and value.lower() in choices:
            return value.lower()
        listed = ", ".join(repr(c) for c in choices)
        hint = did_you_mean(value, choices) if isinstance(value, str) else ""
        raise Invalid(f"expected one of {listed}, got {show(value)}{hint}")

    return coerce


def duration(lo: float | None = None, *, whole: bool = True) -> Coerce:
    def coerce(value: Any) -> int | float:
        try:
            seconds = parse_duration(value)
        except ValueError as e:
            raise Invalid(str(e)) from None
        _range_check(seconds, lo, None)
        if whole:
            if seconds != int(seconds):
                raise Invalid(f"must be whole seconds, got {show(value)}")
            return int(seconds)
        return seconds

    return coerce


def byte_size(value: Any) -> int:
    """Bytes as a number or ``"512k"``, ``"10M"``, ``"25MiB"`` (powers of 1024)."""
    try:
        return parse_size(value)
    except ValueError as e:
        raise Invalid(str(e)) from None


def file_mode(value: Any) -> str:
    """A permission mode as the four-digit octal string ``chmod`` takes.

    A bare decimal 660 in TOML is a classic slip for 0o660; it is out of range
    as a mode, so it is refused with the spelling that works.
    """
    if is_int(value):
        mode = int(value)
    elif isinstance(value, str) and re.fullmatch(r"0?o?[0-7]{3,4}", value.strip().lower()):
        mode = int(value.strip().lower().replace("o", ""), 8)
    else:
        raise Invalid(f'expected an octal mode like "0660", got {show(value)}')
    if not 0 <= mode <= 0o777:
        raise Invalid(f'must be a mode between "0000" and "0777" (write "0660", not 660), '
                       f"got {show(value)}")
    return f"{mode:04o}"


#: What a brain's configured name may be: it is written into milter keys and log lines.
BRAIN_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

_HEADER_NAME: Final = re.compile(r"[!-9;-~]+")


def header_name(value: Any) -> str:
    if not isinstance(value, str):
        raise Invalid(f"expected a header name, got {show(value)}")
    name = value.strip().removesuffix(":")
    if not _HEADER_NAME.fullmatch(name):
        raise Invalid(f"{value!r} is not a valid header name (printable ASCII, no ':' or space)")
    return name


def header_list(value: Any) -> tuple[str, ...]:
    """One header name or a list of them (the seed took a single name)."""
    if isinstance(value, str):
        return () if not value.strip() else (header_name(value),)
    if isinstance(value, list | tuple):
        return tuple(header_name(v) for v in value)
    raise Invalid(f"expected a header name or a list of header names, got {show(value)}")


def log_target(value: Any) -> str:
    if isinstance(value, str):
        if value.lower() in ("auto", "syslog", "stderr"):
            return value.lower()
        if value.startswith("/"):
            return value
    raise Invalid(
        f'expected "auto", "syslog", "stderr" or an absolute file path, got {show(value)}'
    )


HOST: Final = re.compile(r"[A-Za-z0-9._%-]+|[0-9A-Fa-f:.%A-Za-z]*:[0-9A-Fa-f:.%A-Za-z]*")


def port_number(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise Invalid(f"port {text!r} is not a number between 1 and 65535")
    return int(text)


def host_port(value: Any) -> str:
    """``host:port`` or ``[v6addr]:port`` for the SMTP relay taking notices."""
    if not isinstance(value, str):
        raise Invalid(f'expected "host:port", got {show(value)}')
    text = value.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or (":" in host and not text.startswith("[")):
        raise Invalid(f'expected "host:port" (IPv6 as "[::1]:25"), got {show(value)}')
    port_number(port)
    return text


def cache_target(value: Any) -> str:
    """``memory``, ``off``, or a redis-py URL (``redis://``, ``rediss://``, ``unix://``)."""
    if not isinstance(value, str):
        raise Invalid(f'expected "memory", "off" or "redis://host:port/db", got {show(value)}')
    text = value.strip()
    if text.lower() in ("memory", "off"):
        return text.lower()
    if text.startswith(("redis://", "rediss://", "unix://")):
        return text
    raise Invalid(f'expected "memory", "off" or a Redis URL like "redis://127.0.0.1:6379/0", '
                  f"got {show(value)}")


def did_you_mean(word: Any, candidates: Iterable[str]) -> str:
    if not isinstance(word, str):
        return ""
    pool = list(candidates)
    match = difflib.get_close_matches(word, pool, n=1, cutoff=0.6)
    if not match:
        lowered = {c.lower(): c for c in pool}
        if word.lower() in lowered:
            match = [lowered[word.lower()]]
    return f"; did you mean {match[0]!r}?" if match else ""
