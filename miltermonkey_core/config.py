"""The effective configuration: attrs models, TOML loading and precise errors.

A milter that refuses to start, or starts with a silently ignored typo, costs
mail.  So every value is checked when the file is read, and every problem is
a :class:`~miltermonkey_core.errors.ConfigError` naming the file, the line and
the key, with a "did you mean" where a near miss is likely.  tomllib gives no
line numbers, so :class:`TomlLocator` finds them in the text itself.

The seed configured the daemon through Perl ``use`` arguments; its option
names stay the canonical names here and readable spellings are accepted as
aliases (:data:`ALIASES`), so a 2005 config translates word for word.  The
same validation serves the TOML file and the script form
(:mod:`miltermonkey_core.script`): both produce :class:`RawTable` lists and
hand them to :func:`build_config`.
"""

from __future__ import annotations

import difflib
import enum
import json
import math
import pathlib
import re
import tomllib
import types
import typing
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import resources
from typing import Any, Final

import attrs

from miltermonkey_core.errors import ConfigError

__all__ = [
    "ALIASES",
    "BRAIN_ALIASES",
    "BRAIN_KEYS",
    "DAEMON_TABLE",
    "ON_ERROR_POLICIES",
    "BrainEntry",
    "Config",
    "DaemonConfig",
    "Endpoint",
    "RawItem",
    "RawTable",
    "TomlLocator",
    "build_brain_options",
    "build_config",
    "embedded_default",
    "load_any",
    "load_config",
    "load_script",
    "loads",
    "parse_connection",
    "parse_duration",
    "to_toml_value",
]

#: The table holding the daemon's own options.
DAEMON_TABLE: Final = "miltermonkey"
#: The array of tables listing the brains, in the order they run.
BRAIN_TABLE: Final = "brain"
#: What may happen to a message when a brain fails (see ``dispatch``).
ON_ERROR_POLICIES: Final = ("tempfail", "accept", "tag", "reject", "mta")

Coerce = Callable[[Any], Any]


class _Invalid(ValueError):
    """A value that does not fit its key; the caller adds the file, line and key."""


# --------------------------------------------------------------------------------------
# Value checks.  Each returns the normalised value and accepts its own output,
# so the same function can be an attrs converter and a loader step.
# --------------------------------------------------------------------------------------


def _show(value: Any) -> str:
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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _quoted_hint(value: Any, kind: str) -> str:
    if isinstance(value, str):
        return f" (a string: write it without quotes, e.g. {kind})"
    return ""


def _range_check(value: float, lo: float | None, hi: float | None) -> None:
    if lo is not None and hi is not None and not lo <= value <= hi:
        raise _Invalid(f"must be between {lo:g} and {hi:g}, got {value:g}")
    if lo is not None and value < lo:
        raise _Invalid(f"must be at least {lo:g}, got {value:g}")
    if hi is not None and value > hi:
        raise _Invalid(f"must be at most {hi:g}, got {value:g}")


def _int(lo: int | None = None, hi: int | None = None) -> Coerce:
    def coerce(value: Any) -> int:
        if not _is_int(value):
            hint = ""
            if isinstance(value, str) and value.strip().lstrip("-").isdigit():
                hint = _quoted_hint(value, value.strip())
            raise _Invalid(f"expected an integer, got {_show(value)}{hint}")
        _range_check(value, lo, hi)
        return int(value)

    return coerce


def _float(lo: float | None = None, hi: float | None = None) -> Coerce:
    def coerce(value: Any) -> float:
        if not _is_number(value) or not math.isfinite(value):
            raise _Invalid(f"expected a number, got {_show(value)}")
        _range_check(value, lo, hi)
        return float(value)

    return coerce


def _bool(value: Any) -> bool:
    """true/false; 1 and 0 too, because the seed documented ``milter_key`` as "1 or 0"."""
    if isinstance(value, bool):
        return value
    if _is_int(value) and value in (0, 1):
        return bool(value)
    hint = ""
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
        hint = " (a string: write true or false without quotes)"
    raise _Invalid(f"expected true or false, got {_show(value)}{hint}")


def _str(*, empty: bool = False) -> Coerce:
    def coerce(value: Any) -> str:
        if not isinstance(value, str):
            raise _Invalid(f"expected a string, got {_show(value)}")
        if not empty and not value.strip():
            raise _Invalid("must not be empty")
        return value

    return coerce


def _optional(inner: Coerce) -> Coerce:
    """None, or an empty string (TOML has no null), means "not set"."""

    def coerce(value: Any) -> Any:
        if value is None or value == "":
            return None
        return inner(value)

    return coerce


def _choice(*choices: str) -> Coerce:
    def coerce(value: Any) -> str:
        if isinstance(value, str) and value.lower() in choices:
            return value.lower()
        listed = ", ".join(repr(c) for c in choices)
        hint = _did_you_mean(value, choices) if isinstance(value, str) else ""
        raise _Invalid(f"expected one of {listed}, got {_show(value)}{hint}")

    return coerce


_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION: Final = re.compile(r"(?:\d+(?:\.\d+)?[smhdw])+")
_DURATION_PART: Final = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string like ``"5d"``, ``"12h"``, ``"1h30m"``, ``"90s"``.

    Retention times read better as "5d" than 432000, and that is how
    Postfix's own ``maximal_queue_lifetime`` is written.
    """
    if _is_number(value):
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        try:
            return float(text)
        except ValueError:
            pass
        if _DURATION.fullmatch(text):
            return sum(float(n) * _UNITS[u] for n, u in _DURATION_PART.findall(text))
    raise _Invalid(
        f'expected a duration in seconds or like "5d", "12h", "30m", "90s", got {_show(value)}'
    )


def _duration(lo: float | None = None, *, whole: bool = True) -> Coerce:
    def coerce(value: Any) -> int | float:
        seconds = parse_duration(value)
        if not math.isfinite(seconds):
            raise _Invalid(f"expected a finite duration, got {_show(value)}")
        _range_check(seconds, lo, None)
        if whole:
            if seconds != int(seconds):
                raise _Invalid(f"must be whole seconds, got {_show(value)}")
            return int(seconds)
        return seconds

    return coerce


_SIZE: Final = re.compile(r"(\d+)\s*([kmg]?)(?:i?b)?", re.IGNORECASE)


def _size(value: Any) -> int:
    """Bytes as a number or ``"512k"``, ``"10M"``, ``"1G"`` (powers of 1024)."""
    if _is_int(value):
        if value < 0:
            raise _Invalid(f"must be at least 0, got {value}")
        return int(value)
    if isinstance(value, str) and (m := _SIZE.fullmatch(value.strip())):
        factor = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m.group(2).lower()]
        return int(m.group(1)) * factor
    raise _Invalid(f'expected a size in bytes or like "512k", "10M", got {_show(value)}')


def _mode(value: Any) -> str:
    """A permission mode as the four-digit octal string ``chmod`` takes.

    A bare decimal 660 in TOML is a classic slip for 0o660; it is out of range
    as a mode, so it is refused with the spelling that works.
    """
    if _is_int(value):
        mode = int(value)
    elif isinstance(value, str) and re.fullmatch(r"0?o?[0-7]{3,4}", value.strip().lower()):
        mode = int(value.strip().lower().replace("o", ""), 8)
    else:
        raise _Invalid(f'expected an octal mode like "0660", got {_show(value)}')
    if not 0 <= mode <= 0o777:
        raise _Invalid(f'must be a mode between "0000" and "0777" (write "0660", not 660), '
                       f"got {_show(value)}")
    return f"{mode:04o}"


_HEADER_NAME: Final = re.compile(r"[!-9;-~]+")


def _header_name(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected a header name, got {_show(value)}")
    name = value.strip().removesuffix(":")
    if not _HEADER_NAME.fullmatch(name):
        raise _Invalid(f"{value!r} is not a valid header name (printable ASCII, no ':' or space)")
    return name


def _header_list(value: Any) -> tuple[str, ...]:
    """One header name or a list of them (the seed took a single name)."""
    if isinstance(value, str):
        return () if not value.strip() else (_header_name(value),)
    if isinstance(value, list | tuple):
        return tuple(_header_name(v) for v in value)
    raise _Invalid(f"expected a header name or a list of header names, got {_show(value)}")


def _log_target(value: Any) -> str:
    if isinstance(value, str):
        if value.lower() in ("auto", "syslog", "stderr"):
            return value.lower()
        if value.startswith("/"):
            return value
    raise _Invalid(
        f'expected "auto", "syslog", "stderr" or an absolute file path, got {_show(value)}'
    )


_HOST: Final = re.compile(r"[A-Za-z0-9._%-]+|[0-9A-Fa-f:.%A-Za-z]*:[0-9A-Fa-f:.%A-Za-z]*")


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise _Invalid(f"port {text!r} is not a number between 1 and 65535")
    return int(text)


def _host_port(value: Any) -> str:
    """``host:port`` or ``[v6addr]:port`` for the SMTP relay taking notices."""
    if not isinstance(value, str):
        raise _Invalid(f'expected "host:port", got {_show(value)}')
    text = value.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or (":" in host and not text.startswith("[")):
        raise _Invalid(f'expected "host:port" (IPv6 as "[::1]:25"), got {_show(value)}')
    _port(port)
    return text


# --------------------------------------------------------------------------------------
# The milter socket.
# --------------------------------------------------------------------------------------


@attrs.frozen
class Endpoint:
    """Where the daemon listens, parsed from a ``connection`` string."""

    family: str  # inet | inet6 | unix
    host: str | None = None
    port: int | None = None
    path: str | None = None

    @property
    def spec(self) -> str:
        """libmilter's spelling, which is what pymilter hands to ``smfi_setconn``."""
        if self.family == "unix":
            return f"unix:{self.path}"
        at = f"@{self.host}" if self.host else ""
        return f"{self.family}:{self.port}{at}"


_SCHEMES: Final = ("inet", "inet6", "unix")


def parse_connection(value: Any) -> Endpoint:
    """Read libmilter's ``inet:PORT@HOST``, ``inet6:PORT@HOST``, ``unix:/path``.

    Postfix spells the same socket ``inet:HOST:PORT``; admins copy it from
    ``main.cf``, so it is accepted and normalised rather than failing at
    bind time.  ``tcp:`` (a common slip from other tools) is refused with
    the spelling that works.
    """
    if not isinstance(value, str):
        raise _Invalid(f'expected a socket like "inet:8890@127.0.0.1", got {_show(value)}')
    text = value.strip()
    scheme, sep, rest = text.partition(":")
    scheme = scheme.lower()
    if not sep:
        if text.startswith("/"):
            raise _Invalid(f"missing the socket type: write 'unix:{text}'")
        if text.isdigit():
            raise _Invalid(f"missing the socket type: write 'inet:{text}@127.0.0.1'")
        raise _Invalid(
            f"expected inet:PORT@HOST, inet6:PORT@HOST or unix:/path, got {_show(value)}"
        )
    if scheme in ("unix", "local"):
        if not rest.startswith("/"):
            raise _Invalid(f"the unix socket path must be absolute, got {rest!r}")
        return Endpoint("unix", path=rest)
    if scheme in ("tcp", "tcp4", "tcp6", "ip", "ipv4", "ipv6"):
        family = "inet6" if scheme.endswith("6") else "inet"
        try:
            suggestion = f" (write {parse_connection(f'{family}:{rest}').spec!r})"
        except _Invalid:
            suggestion = " (write inet:PORT@HOST, inet6:PORT@HOST or unix:/path)"
        raise _Invalid(f"{scheme!r} is not a milter socket type{suggestion}")
    if scheme not in ("inet", "inet4", "inet6"):
        raise _Invalid(
            f"unknown socket type {scheme!r}; expected inet:PORT@HOST, inet6:PORT@HOST "
            f"or unix:/path{_did_you_mean(scheme, _SCHEMES)}"
        )
    family = "inet6" if scheme == "inet6" else "inet"
    host: str | None
    if "@" in rest:  # libmilter: port@host
        port_text, host = rest.split("@", 1)
        host = host.removeprefix("[").removesuffix("]")
    elif rest.startswith("["):  # Postfix: [v6addr]:port
        host, sep, port_text = rest[1:].partition("]:")
        if not sep:
            raise _Invalid(f"expected inet:[ADDRESS]:PORT, got {_show(value)}")
    elif rest.count(":") == 1:  # Postfix: host:port
        host, port_text = rest.split(":")
    elif ":" in rest:
        raise _Invalid(f"ambiguous IPv6 address: write inet6:PORT@ADDRESS, got {_show(value)}")
    else:  # the seed's inet:6609: every interface
        port_text, host = rest, None
    if host is not None:
        if not host or not _HOST.fullmatch(host):
            raise _Invalid(f"bad host {host!r} in {_show(value)}")
        if ":" in host:
            family = "inet6"
    return Endpoint(family, host=host, port=_port(port_text.strip()))


def _connection(value: Any) -> str:
    return parse_connection(value).spec


# --------------------------------------------------------------------------------------
# The daemon's options.
# --------------------------------------------------------------------------------------


def _opt(default: Any, coerce: Coerce, doc: str) -> Any:
    """An option with its check (also run on direct construction) and a one-line doc."""
    return attrs.field(default=default, converter=coerce, metadata={"doc": doc})


@attrs.frozen(kw_only=True)
class DaemonConfig:
    """The ``[miltermonkey]`` table.  Seed names are canonical; see :data:`ALIASES`."""

    connection: str = _opt("inet:8890@127.0.0.1", _connection,
                           "socket to listen on: inet:PORT@HOST, inet6:PORT@HOST or unix:/path")
    socket_mode: str = _opt("0660", _mode, "permissions of a unix socket")
    socket_group: str | None = _opt(None, _optional(_str()), "group of a unix socket")
    cid_timeout: int = _opt(600, _duration(1), "seconds a silent session is kept in memory")
    debug_level: int = _opt(10, _int(0, 99),
                            "log messages of level <= this (0-99; ~50 is useful; less is more)")
    debug_mode: bool = _opt(False, _bool, "also log to stderr")
    log_target: str = _opt("auto", _log_target,
                           "auto (syslog if /dev/log is there, else stderr), syslog, stderr, path")
    defaultexpiration: int = _opt(432000, _duration(1),
                                  "seconds a milter key stays valid (5d = Postfix queue lifetime)")
    milter_key: bool = _opt(True, _bool, "sign which brains ran, and trust such signatures")
    milterkeyheader: str = _opt("X-Milter-Key", _header_name, "header holding the milter key")
    miltersecretfile: str = _opt("/etc/mail/miltersecret", _str(),
                                 "file with the milter key secrets (not world readable)")
    key_id: str | None = _opt(None, _optional(_str()),
                              "secret that signs new keys (unset: the first in the file)")
    key_body_binding: str = _opt("body", _choice("body", "none"),
                                 "bind keys to the body digest (none: survive list footers)")
    key_clock_skew: int = _opt(300, _duration(0), "seconds of clock skew tolerated on keys")
    alternate_key_header: tuple[str, ...] = _opt((), _header_list,
                                                 "other headers whose keys are trusted too")
    pidfile: str | None = _opt(None, _optional(_str()), "pid file to write (unset: none)")
    miltername: str = _opt("MilterMonkey", _str(), "name in logs and the Sendmail X= line")
    threads: int = _opt(20, _int(1, 10000), "messages judged at once (worker threads)")
    jobsperthread: int = _opt(200, _int(0),
                              "messages a worker thread handles before retiring (0: never)")
    on_error: str = _opt("tempfail", _choice(*ON_ERROR_POLICIES),
                         "what a brain failure does to the message (a [[brain]] may override)")
    shutdown_timeout: float = _opt(30.0, _duration(0, whole=False),
                                   "seconds messages in progress get to finish on SIGTERM")
    eom_timeout: float = _opt(240.0, _duration(0.001, whole=False),
                              "seconds all brains together may take at end of message")
    progress_interval: float = _opt(10.0, _duration(0, whole=False),
                                    "seconds between progress replies to the MTA (0: none)")
    milter_timeout: int = _opt(600, _duration(1), "libmilter's socket read/write timeout")
    spool_threshold: int = _opt(1048576, _size, "bodies larger than this go to a temp file")
    tmpdir: str | None = _opt(None, _optional(_str()),
                              "directory for spooled bodies and temp files (unset: system)")
    max_message_size: int = _opt(0, _size, "refuse larger messages (0: no limit)")
    noreply: str = _opt("auto", _choice("auto", "always", "never"),
                        "negotiate no-reply for stages no brain answers")
    user: str | None = _opt(None, _optional(_str()), "user to switch to after binding")
    group: str | None = _opt(None, _optional(_str()), "group to switch to after binding")
    hostname: str | None = _opt(None, _optional(_str()),
                                "this host's name in keys and notices (unset: FQDN)")
    sendmail_path: str = _opt("/usr/sbin/sendmail", _str(), "sendmail binary for notices")
    notify_smtp: str | None = _opt(None, _optional(_host_port),
                                   "host:port to send notices to by SMTP instead of sendmail")

    @property
    def endpoint(self) -> Endpoint:
        return parse_connection(self.connection)


#: Accepted spellings besides the canonical names: readable forms of the
#: seed's run-together names, and the seed brains' ``sendmailpath``.
ALIASES: Final[Mapping[str, str]] = {
    "socket": "connection",
    "default_expiration": "defaultexpiration",
    "milter_key_header": "milterkeyheader",
    "milter_secret_file": "miltersecretfile",
    "secret_file": "miltersecretfile",
    "alternate_key_headers": "alternate_key_header",
    "pid_file": "pidfile",
    "milter_name": "miltername",
    "jobs_per_thread": "jobsperthread",
    "sendmailpath": "sendmail_path",
    "tempdir": "tmpdir",
}

_DAEMON_FIELDS: Final = {f.name: f for f in attrs.fields(DaemonConfig)}


# --------------------------------------------------------------------------------------
# Brains and the whole configuration.
# --------------------------------------------------------------------------------------

#: Keys of a ``[[brain]]`` table that the framework reads; the rest are options.
BRAIN_KEYS: Final = ("use", "name", "on_error", "on_timeout", "timeout", "evaluation",
                     "skip_if_key", "expiration", "breaker_failures", "breaker_window",
                     "breaker_cooldown")
BRAIN_ALIASES: Final[Mapping[str, str]] = {"evaluation_mode": "evaluation"}
_BRAIN_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@attrs.frozen(kw_only=True)
class BrainEntry:
    """One ``[[brain]]`` table: which brain, how it is run, and its raw options.

    ``options`` stay raw here: they are checked against the brain's own
    ``Options`` class by :func:`build_brain_options`, which needs the brain
    imported.  ``line``/``option_lines``/``path`` only serve error messages.
    """

    use: str
    name: str
    #: None: the brain class's ``default_on_error``, else the daemon's ``on_error``.
    on_error: str | None = None
    #: None: ``on_error``.
    on_timeout: str | None = None
    timeout: float = 60.0
    evaluation: bool = False
    skip_if_key: bool = False
    expiration: int | None = None
    #: Circuit breaker: this many failures within ``breaker_window`` seconds open it
    #: for ``breaker_cooldown`` seconds (0 failures: no breaker).
    breaker_failures: int = 5
    breaker_window: float = 60.0
    breaker_cooldown: float = 30.0
    options: dict[str, Any] = attrs.field(factory=dict)
    line: int | None = attrs.field(default=None, eq=False)
    option_lines: Mapping[str, int] = attrs.field(factory=dict, eq=False, repr=False)
    path: str | None = attrs.field(default=None, eq=False, repr=False)

    def error(self, message: str, key: str | None = None) -> ConfigError:
        """A ConfigError located at ``key`` of this table (or its header)."""
        line = self.option_lines.get(key, self.line) if key else self.line
        return ConfigError(message, path=self.path, line=line, key=key)


@attrs.frozen(kw_only=True)
class Config:
    """Everything the daemon needs to start, with every default filled in."""

    daemon: DaemonConfig = attrs.field(factory=DaemonConfig)
    brains: tuple[BrainEntry, ...] = ()
    path: str | None = None
    #: Where it came from: "toml", "script" or "embedded".
    source: str = "embedded"
    #: Line of each daemon key as written (canonical name -> line), for errors.
    daemon_lines: Mapping[str, int] = attrs.field(factory=dict, eq=False, repr=False)

    def brain(self, name: str) -> BrainEntry:
        for b in self.brains:
            if b.name == name:
                return b
        raise KeyError(name)

    def error(self, message: str, key: str | None = None) -> ConfigError:
        """A ConfigError at daemon option ``key``, for checks made after loading.

        The daemon can use it too, e.g. when the ``connection`` cannot be bound.
        """
        line = self.daemon_lines.get(ALIASES.get(key, key)) if key else None
        return ConfigError(message, path=self.path, line=line, key=key)

    def with_effective_policies(self, classes: Mapping[str, type]) -> Config:
        """The same config with each brain's ``on_error`` resolved, as the daemon runs it.

        ``classes`` maps brain names to their classes (for ``default_on_error``).
        """
        brains = tuple(
            attrs.evolve(b, on_error=effective_on_error(b, classes.get(b.name), self.daemon))
            for b in self.brains
        )
        return attrs.evolve(self, brains=brains)

    def to_toml(self, options: Mapping[str, Any] | None = None) -> str:
        """The effective configuration as TOML that :func:`loads` reads back.

        ``options`` maps brain names to built ``Options`` instances; their
        fields (defaults included) replace the raw options where given.
        """
        return _render(self, options or {})


# --------------------------------------------------------------------------------------
# Error helpers.
# --------------------------------------------------------------------------------------


def effective_on_error(entry: BrainEntry, cls: type | None, daemon: DaemonConfig) -> str:
    """The config's policy, else the brain class's own default, else the daemon's."""
    return entry.on_error or getattr(cls, "default_on_error", None) or daemon.on_error


def _did_you_mean(word: Any, candidates: Iterable[str]) -> str:
    if not isinstance(word, str):
        return ""
    pool = list(candidates)
    match = difflib.get_close_matches(word, pool, n=1, cutoff=0.6)
    if not match:
        lowered = {c.lower(): c for c in pool}
        if word.lower() in lowered:
            match = [lowered[word.lower()]]
    return f"; did you mean {match[0]!r}?" if match else ""


# --------------------------------------------------------------------------------------
# Finding lines in TOML text.
# --------------------------------------------------------------------------------------

TablePath = tuple[str | int, ...]


def _key_segments(raw: str) -> tuple[str, ...]:
    """Split a (possibly dotted, quoted) TOML key the way tomllib does."""
    try:
        node: Any = tomllib.loads(f"{raw} = 0")
    except tomllib.TOMLDecodeError:
        return (raw.strip(),)
    out: list[str] = []
    while isinstance(node, dict) and len(node) == 1:
        (key, node), = node.items()
        out.append(key)
    return tuple(out)


class TomlLocator:
    """Line numbers of keys and table headers in a TOML document.

    Tables are addressed as paths in which an array of tables is followed by
    its index: ``("miltermonkey",)``, ``("brain", 2)``, ``("brain", 0, "sub")``.
    The text must already have passed tomllib, so the scanner only has to
    follow strings, comments, and brackets that continue a value on the next
    line; anything it cannot place gives ``None``, never a wrong line.
    """

    def __init__(self, text: str) -> None:
        self._text = text
        self._starts = [0] + [i + 1 for i, c in enumerate(text) if c == "\n"]
        self._keys: dict[tuple[TablePath, str], int] = {}
        self._tables: dict[TablePath, int] = {}
        self._counts: dict[TablePath, int] = {}
        self._scan()

    def key_line(self, table: TablePath, key: str) -> int | None:
        """Line of ``key = ...`` in ``table`` (or of a header creating it)."""
        return self._keys.get((tuple(table), key))

    def table_line(self, table: TablePath) -> int | None:
        """Line of the ``[table]`` / ``[[table]]`` header."""
        return self._tables.get(tuple(table))

    # --- the scanner -------------------------------------------------------------

    def _line(self, pos: int) -> int:
        return bisect_right(self._starts, pos)

    def _resolve(self, segments: Sequence[str], array: bool) -> TablePath:
        path: TablePath = ()
        for i, seg in enumerate(segments):
            path = (*path, seg)
            if array and i == len(segments) - 1:
                n = self._counts.get(path, 0)
                self._counts[path] = n + 1
                path = (*path, n)
            elif path in self._counts:
                path = (*path, self._counts[path] - 1)
        return path

    def _note(self, table: TablePath, segments: Sequence[str], line: int) -> None:
        """Record a key and the implicit tables a dotted key or header creates."""
        path = table
        for seg in segments:
            self._keys.setdefault((path, seg), line)
            path = (*path, seg)
            if path in self._counts:
                path = (*path, self._counts[path] - 1)

    def _skip_string(self, pos: int) -> int:
        """Position just after the string starting at ``pos``."""
        text = self._text
        for quote in ('"""', "'''"):
            if text.startswith(quote, pos):
                i = pos + 3
                while True:
                    j = text.find(quote, i)
                    if j < 0:
                        return len(text)
                    if quote == '"""' and _escaped(text, j):
                        i = j + 1
                        continue
                    j += 3
                    while j < len(text) and text[j] == quote[0]:  # """a"""" ends on the last
                        j += 1
                    return j
        quote = text[pos]
        i = pos + 1
        while i < len(text):
            c = text[i]
            if c == "\\" and quote == '"':
                i += 2
                continue
            if c in (quote, "\n"):
                return i + 1
            i += 1
        return i

    def _skip_comment(self, pos: int) -> int:
        end = self._text.find("\n", pos)
        return len(self._text) if end < 0 else end

    def _until(self, pos: int, stop: str) -> int:
        """Position of the first ``stop`` char outside strings, from ``pos``."""
        text = self._text
        while pos < len(text) and text[pos] not in stop:
            pos = self._skip_string(pos) if text[pos] in "\"'" else pos + 1
        return pos

    def _skip_value(self, pos: int) -> int:
        text = self._text
        depth = 0
        while pos < len(text):
            c = text[pos]
            if c in "\"'":
                pos = self._skip_string(pos)
                continue
            if c == "#":
                pos = self._skip_comment(pos)
                continue
            if c in "[{":
                depth += 1
            elif c in "]}":
                depth -= 1
            elif c == "\n" and depth <= 0:
                return pos
            pos += 1
        return pos

    def _scan(self) -> None:
        text = self._text
        table: TablePath = ()
        pos = 0
        while pos < len(text):
            c = text[pos]
            if c in " \t\r\n":
                pos += 1
            elif c == "#":
                pos = self._skip_comment(pos)
            elif c == "[":
                array = text.startswith("[[", pos)
                start = pos + (2 if array else 1)
                end = self._until(start, "]")
                segments = _key_segments(text[start:end])
                line = self._line(pos)
                parent = self._resolve(segments[:-1], array=False)
                table = self._resolve(segments, array=array)
                self._tables.setdefault(table, line)
                self._note(parent, segments[-1:], line)
                pos = self._skip_comment(end)  # rest of the header line is ]] and a comment
            else:
                end = self._until(pos, "=\n")
                if end >= len(text) or text[end] != "=":
                    pos = end + 1
                    continue
                self._note(table, _key_segments(text[pos:end]), self._line(pos))
                pos = self._skip_value(end + 1)


def _escaped(text: str, pos: int) -> bool:
    """True if the character at ``pos`` is escaped by an odd run of backslashes."""
    n = 0
    while pos - n - 1 >= 0 and text[pos - n - 1] == "\\":
        n += 1
    return n % 2 == 1


# --------------------------------------------------------------------------------------
# Building a Config from located key/value pairs (shared by TOML and script).
# --------------------------------------------------------------------------------------


@attrs.frozen
class RawItem:
    """One ``key = value`` as written, with the line it was written on."""

    key: str
    value: Any
    line: int | None = None


@attrs.frozen
class RawTable:
    """A table as written: the daemon table or one ``[[brain]]``."""

    items: tuple[RawItem, ...] = ()
    line: int | None = None


def _installed_brains() -> Mapping[str, Any]:
    from miltermonkey_core.plugins import installed_brains  # late: avoids a cycle

    return installed_brains()


def _canonical(
    table: RawTable,
    aliases: Mapping[str, str],
    path: str | None,
) -> dict[str, RawItem]:
    """Items by canonical key; the same option given twice is an error."""
    out: dict[str, RawItem] = {}
    for item in table.items:
        canon = aliases.get(item.key, item.key)
        if canon in out:
            first = out[canon]
            where = f" at line {first.line}" if first.line else ""
            raise ConfigError(
                f"given twice (first as {first.key!r}{where})",
                path=path, line=item.line, key=item.key,
            )
        out[canon] = item
    return out


def _build_daemon(table: RawTable, path: str | None) -> tuple[DaemonConfig, dict[str, int]]:
    items = _canonical(table, ALIASES, path)
    kwargs: dict[str, Any] = {}
    lines: dict[str, int] = {}
    for canon, item in items.items():
        field = _DAEMON_FIELDS.get(canon)
        if field is None:
            hint = _did_you_mean(item.key, [*_DAEMON_FIELDS, *ALIASES])
            if item.key == BRAIN_TABLE or item.key in BRAIN_KEYS:
                hint = "; brains are configured in [[brain]] tables"
            raise ConfigError(f"unknown key in [{DAEMON_TABLE}]{hint}",
                              path=path, line=item.line, key=item.key)
        assert field.converter is not None
        try:
            kwargs[canon] = field.converter(item.value)  # type: ignore[operator]
        except _Invalid as e:
            raise ConfigError(str(e), path=path, line=item.line, key=item.key) from None
        if item.line:
            lines[canon] = item.line
    return DaemonConfig(**kwargs), lines


_BRAIN_CHECKS: Final[Mapping[str, Coerce]] = {
    "use": _str(),
    "name": _str(),
    "on_error": _choice(*ON_ERROR_POLICIES),
    "on_timeout": _choice(*ON_ERROR_POLICIES),
    "timeout": _duration(0.001, whole=False),
    "evaluation": _bool,
    "skip_if_key": _bool,
    "expiration": _optional(_duration(1)),
    "breaker_failures": _int(0, 1_000_000),
    "breaker_window": _duration(0.001, whole=False),
    "breaker_cooldown": _duration(0, whole=False),
}


def _build_brain(
    table: RawTable,
    daemon: DaemonConfig,
    path: str | None,
    installed: Mapping[str, Any] | None,
) -> BrainEntry:
    items = _canonical(table, BRAIN_ALIASES, path)
    common: dict[str, Any] = {}
    options: dict[str, Any] = {}
    lines: dict[str, int] = {}
    for canon, item in items.items():
        if item.line:
            lines[item.key] = item.line
            lines.setdefault(canon, item.line)
        check = _BRAIN_CHECKS.get(canon)
        if check is None:
            options[item.key] = item.value
            continue
        try:
            common[canon] = check(item.value)
        except _Invalid as e:
            raise ConfigError(str(e), path=path, line=item.line, key=item.key) from None
    if "use" not in common:
        have = f" (installed: {', '.join(sorted(installed))})" if installed else ""
        raise ConfigError(f'every [[brain]] needs use = "<brain>"{have}',
                          path=path, line=table.line, key="use")
    use = common["use"]
    if installed is not None and use not in installed:
        have = ", ".join(sorted(installed)) or "none"
        hint = _did_you_mean(use, installed) or (
            f"; install the package providing it (e.g. pip install miltermonkey-{use})"
        )
        raise ConfigError(f"no brain called {use!r} is installed (installed brains: {have}){hint}",
                          path=path, line=lines.get("use", table.line), key="use")
    name = common.get("name", use)
    if not _BRAIN_NAME.fullmatch(name):
        raise ConfigError(
            f"brain name {name!r} must be letters, digits, '.', '_' or '-' "
            "(it is written into the milter key and log lines)",
            path=path, line=lines.get("name", lines.get("use", table.line)), key="name",
        )
    return BrainEntry(
        use=use,
        name=name,
        on_error=common.get("on_error"),
        on_timeout=common.get("on_timeout"),
        breaker_failures=common.get("breaker_failures", 5),
        breaker_window=common.get("breaker_window", 60.0),
        breaker_cooldown=common.get("breaker_cooldown", 30.0),
        timeout=common.get("timeout", 60.0),
        evaluation=common.get("evaluation", False),
        skip_if_key=common.get("skip_if_key", False),
        expiration=common.get("expiration"),
        options=options,
        line=table.line,
        option_lines=lines,
        path=path,
    )


def build_config(
    daemon: RawTable,
    brains: Sequence[RawTable],
    *,
    path: str | None = None,
    source: str = "toml",
    installed: Mapping[str, Any] | None = None,
    check_installed: bool = True,
) -> Config:
    """Check located raw tables and build the Config; the first problem raises.

    ``installed`` (brain name -> entry point) defaults to what is installed;
    ``check_installed=False`` skips that look-up (for tools that only edit).
    """
    if installed is None and check_installed:
        installed = _installed_brains()
    daemon_cfg, lines = _build_daemon(daemon, path)
    entries: list[BrainEntry] = []
    seen: dict[str, BrainEntry] = {}
    for table in brains:
        entry = _build_brain(table, daemon_cfg, path, installed if check_installed else None)
        if entry.name in seen:
            other = seen[entry.name]
            where = f" at line {other.line}" if other.line else ""
            key = "name" if "name" in entry.option_lines else "use"
            raise entry.error(
                f"brain name {entry.name!r} is already used by the [[brain]]{where}; "
                f'give one of them its own name = "..."',
                key=key,
            )
        seen[entry.name] = entry
        entries.append(entry)
    return Config(daemon=daemon_cfg, brains=tuple(entries), path=path, source=source,
                  daemon_lines=lines)


# --------------------------------------------------------------------------------------
# TOML files.
# --------------------------------------------------------------------------------------

_TOML_POS: Final = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")


def _toml_error(e: tomllib.TOMLDecodeError, path: str | None) -> ConfigError:
    msg = str(e)
    line = None
    if m := _TOML_POS.search(msg):
        line = int(m.group(1))
        msg = f"TOML syntax error: {msg[: m.start()]} (column {m.group(2)})"
    else:
        msg = f"TOML syntax error: {msg}"
    return ConfigError(msg, path=path, line=line)


def loads(
    text: str,
    *,
    path: str | None = None,
    source: str = "toml",
    installed: Mapping[str, Any] | None = None,
) -> Config:
    """Parse and check a TOML configuration given as text."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise _toml_error(e, path) from None
    loc = TomlLocator(text)
    daemon = RawTable()
    brains: list[RawTable] = []
    for key, value in data.items():
        line = loc.key_line((), key)
        if key == DAEMON_TABLE:
            if not isinstance(value, dict):
                raise ConfigError(f"must be a table: write [{DAEMON_TABLE}] and the options "
                                  "below it", path=path, line=line, key=key)
            daemon = RawTable(
                tuple(RawItem(k, v, loc.key_line((key,), k)) for k, v in value.items()),
                loc.table_line((key,)),
            )
        elif key == BRAIN_TABLE:
            if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
                raise ConfigError(f"must be an array of tables: write [[{BRAIN_TABLE}]] for "
                                  "each brain", path=path, line=line, key=key)
            for i, t in enumerate(value):
                tline = loc.table_line((key, i)) or line
                brains.append(RawTable(
                    tuple(RawItem(k, v, loc.key_line((key, i), k) or tline)
                          for k, v in t.items()),
                    tline,
                ))
        else:
            if key in _DAEMON_FIELDS or key in ALIASES:
                hint = f"; daemon options go in the [{DAEMON_TABLE}] table"
            else:
                hint = _did_you_mean(key, (DAEMON_TABLE, BRAIN_TABLE)) or (
                    f"; the file has a [{DAEMON_TABLE}] table and [[{BRAIN_TABLE}]] tables"
                )
            what = "table" if isinstance(value, dict) else "key"
            raise ConfigError(f"unknown top-level {what}{hint}", path=path, line=line, key=key)
    return build_config(daemon, brains, path=path, source=source, installed=installed)


def _read_text(path: str | pathlib.Path) -> str:
    try:
        return pathlib.Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text ({e.reason} at byte {e.start})",
                          path=str(path)) from None
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror or e}", path=str(path)) from None


def load_config(path: str | pathlib.Path, *, installed: Mapping[str, Any] | None = None) -> Config:
    """Load and check a TOML configuration file."""
    return loads(_read_text(path), path=str(path), installed=installed)


def load_script(path: str | pathlib.Path, *, installed: Mapping[str, Any] | None = None) -> Config:
    """Run a seed-style Python start script without starting the daemon."""
    from miltermonkey_core.script import load_script as _load  # late: cycle

    return _load(path, installed=installed)


def load_any(path: str | pathlib.Path, *, installed: Mapping[str, Any] | None = None) -> Config:
    """Load a ``.toml`` file or a ``.py`` start script, by suffix."""
    suffix = pathlib.Path(path).suffix.lower()
    if suffix == ".py":
        return load_script(path, installed=installed)
    if suffix == ".toml":
        return load_config(path, installed=installed)
    raise ConfigError(f"unknown configuration type {suffix or '(no suffix)'!r}: "
                      "use a .toml file or a .py start script", path=str(path))


def embedded_default(
    *, installed: Mapping[str, Any] | None = None, probe: bool = True
) -> Config:
    """The shipped ``default.toml``: a milter that works out of the box.

    Where the av or spam brain is installed and its engine answers on the
    Debian default address, it is added after the trivial brain, so a plain
    ``miltermonkey run`` on a mail host scans without writing a config.
    """
    res = resources.files("miltermonkey_core").joinpath("default.toml")
    text = res.read_text(encoding="utf-8")
    if probe:
        have = installed if installed is not None else _installed_names()
        text += "".join(_detected_brains(have))
    return loads(text, path=str(res), source="embedded", installed=installed)


def _installed_names() -> Mapping[str, Any]:
    from miltermonkey_core.plugins import installed_brains

    return installed_brains()


#: Debian's default engine addresses, tried by the embedded default.
CLAMD_DEFAULTS: Final = ("unix:/run/clamav/clamd.ctl", "unix:/var/run/clamav/clamd.ctl",
                         "tcp:127.0.0.1:3310")
SPAMD_DEFAULTS: Final = ("127.0.0.1:783",)


def _answers(address: str, request: bytes, expect: bytes) -> bool:
    import socket

    kind, _, rest = address.partition(":")
    try:
        if kind == "unix":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: Any = rest
        else:
            host, _, port = (rest if kind == "tcp" else address).rpartition(":")
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            target = (host, int(port))
    except (OSError, ValueError):
        return False
    try:
        s.settimeout(0.5)
        s.connect(target)
        s.sendall(request)
        return expect in s.recv(256)
    except OSError:
        return False
    finally:
        s.close()


def _detected_brains(installed: Mapping[str, Any]) -> list[str]:
    out = []
    if "av" in installed:
        for addr in CLAMD_DEFAULTS:
            if _answers(addr, b"zPING\0", b"PONG"):
                out.append(f'\n# detected: clamd at {addr}\n[[brain]]\nuse = "av"\n'
                           f'clamd = ["{addr}"]\n')
                break
    if "spam" in installed:
        for addr in SPAMD_DEFAULTS:
            if _answers(addr, b"PING SPAMC/1.5\r\n\r\n", b"PONG"):
                out.append(f'\n# detected: spamd at {addr}\n[[brain]]\nuse = "spam"\n'
                           f'servers = ["{addr}"]\n')
                break
    return out


# --------------------------------------------------------------------------------------
# Brain options.
# --------------------------------------------------------------------------------------


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # names only imported under TYPE_CHECKING: check nothing
        return {}


_TYPE_NAMES: Final[Mapping[Any, str]] = {
    bool: "true or false", int: "an integer", float: "a number", str: "a string",
    pathlib.Path: "a path", re.Pattern: "a regular expression",
}


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp in _TYPE_NAMES:
        return _TYPE_NAMES[tp]
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple, set, frozenset, Sequence):
        return "a list"
    if origin in (dict, Mapping):
        return "a table"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    return getattr(tp, "__name__", str(tp))


class _Unknown(Exception):
    """The annotation is not one this module knows how to check."""


def _conform(tp: Any, value: Any) -> Any:
    """Check ``value`` against an annotation, converting TOML types where natural.

    Only plain, common annotations are checked; anything else raises
    :class:`_Unknown` and is left to the brain's own validators.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if tp is bool:
        return _bool(value)
    if tp is int:
        return _int()(value)
    if tp is float:
        return _float()(value)
    if tp is str:
        return _str(empty=True)(value)
    if tp is pathlib.Path:
        return pathlib.Path(_str()(value)) if not isinstance(value, pathlib.Path) else value
    if tp is re.Pattern or origin is re.Pattern:
        if isinstance(value, re.Pattern):
            return value
        try:
            return re.compile(_str(empty=True)(value))
        except re.error as e:
            raise _Invalid(f"not a valid regular expression: {e}") from None
    if origin is typing.Literal:
        if value in args:
            return value
        raise _Invalid(f"expected {_describe(tp)}, got {_show(value)}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for member in (a for a in args if a is not type(None)):
            try:
                return _conform(member, value)
            except _Invalid as e:
                errors.append(_describe(member))
                last = e
        if len(errors) == 1:
            raise last
        raise _Invalid(f"expected {' or '.join(errors)}, got {_show(value)}")
    if origin in (list, tuple, set, frozenset, Sequence):
        if not isinstance(value, list | tuple | set | frozenset):
            raise _Invalid(f"expected a list, got {_show(value)}")
        if origin is tuple and args and (len(args) != 2 or args[1] is not Ellipsis):
            raise _Unknown  # a fixed-length tuple: leave it to the brain
        item_tp = args[0] if args else Any
        try:
            items = [_conform(item_tp, v) for v in value]
        except _Invalid as e:
            raise _Invalid(f"in the list: {e}") from None
        if origin in (set, frozenset):
            return origin(items)
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise _Invalid(f"expected a table, got {_show(value)}")
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if value in (member, member.value, member.name):
                return member
        raise _Invalid(f"expected {_describe(tp)}, got {_show(value)}")
    raise _Unknown


def _option_fields(options_cls: type) -> dict[str, attrs.Attribute[Any]]:
    """The options a brain takes: attrs init arguments by the name users write."""
    return {(a.alias or a.name): a for a in attrs.fields(options_cls) if a.init}


def _culprit(options_cls: type, kwargs: Mapping[str, Any], order: Sequence[str]) -> str | None:
    """Which supplied option makes the Options class refuse, tried one at a time.

    attrs validators raise without saying which field they guard, and custom
    ones raise plain ValueError; building with each option alone (plus the
    required ones) finds it as long as the defaults are valid.
    """
    fields = _option_fields(options_cls)
    required = {k: v for k, v in kwargs.items()
                if k in fields and fields[k].default is attrs.NOTHING}
    for key in order:
        try:
            options_cls(**{**required, key: kwargs[key]})
        except (TypeError, ValueError):
            return key
    return None


def build_brain_options(brain_cls: type, entry: BrainEntry, config: Config | None = None) -> Any:
    """Validate a brain's raw options against its ``Options`` attrs class.

    Unknown keys (with a "did you mean"), wrong types and values the class's
    own validators or converters refuse all become ConfigErrors at the key's
    line.  ``OPTION_ALIASES`` on the Options class maps seed spellings
    (``uvscanpath``) to field names (``scanner_path``).
    """
    path = config.path if config is not None and config.path else entry.path
    where = f"[[brain]] {entry.name!r}" + (f" ({entry.use})" if entry.name != entry.use else "")

    def fail(message: str, key: str | None) -> ConfigError:
        line = entry.option_lines.get(key, entry.line) if key else entry.line
        return ConfigError(message, path=path, line=line, key=key)

    options_cls: Any = getattr(brain_cls, "Options", None)
    if options_cls is None or not attrs.has(options_cls):
        if entry.options:
            key = next(iter(entry.options))
            raise fail(f"brain {entry.use!r} takes no options ({where})", key)
        return options_cls() if options_cls is not None else None
    fields = _option_fields(options_cls)
    clash = sorted(set(fields) & set(BRAIN_KEYS))
    if clash:
        raise fail(
            f"brain {entry.use!r} has option(s) {', '.join(clash)} that clash with keys every "
            "[[brain]] table reserves; the brain must rename them", None)
    aliases: Mapping[str, str] = getattr(options_cls, "OPTION_ALIASES", {}) or {}
    hints = _type_hints(options_cls)
    kwargs: dict[str, Any] = {}
    written: dict[str, str] = {}  # field name -> key as written
    for key, raw in entry.options.items():
        name = aliases.get(key, key)
        if name not in fields:
            valid = sorted(fields)
            hint = _did_you_mean(key, [*valid, *aliases]) or (
                f"; {entry.use!r} takes: {', '.join(valid)}" if valid else
                f"; {entry.use!r} takes no options"
            )
            raise fail(f"unknown option in {where}{hint}", key)
        if name in written:
            raise fail(f"given twice in {where} (also as {written[name]!r})", key)
        written[name] = key
        attr = fields[name]
        tp = hints.get(attr.name, attr.type)
        value = raw
        if attr.converter is None and tp is not None and not isinstance(tp, str):
            try:
                value = _conform(tp, value)
            except _Invalid as e:
                raise fail(f"{e} ({where})", key) from None
            except _Unknown:
                pass
        kwargs[name] = value
    missing = [n for n, a in fields.items() if a.default is attrs.NOTHING and n not in kwargs]
    if missing:
        raise fail(f"brain {entry.use!r} needs option {missing[0]!r} in {where}", missing[0])
    try:
        return options_cls(**kwargs)
    except (TypeError, ValueError) as e:
        culprit = _culprit(options_cls, kwargs, list(written))
        bad_key = written.get(culprit) if culprit else None
        raise fail(f"{_validator_message(e)} ({where})", bad_key) from None


def _validator_message(e: Exception) -> str:
    """attrs validators put the message first in ``args``, then the attribute."""
    if e.args and isinstance(e.args[0], str):
        return e.args[0]
    return str(e) or type(e).__name__


# --------------------------------------------------------------------------------------
# Writing TOML (show-config).
# --------------------------------------------------------------------------------------

_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_str(key)


def _toml_str(value: str) -> str:
    # JSON string escapes are a subset of TOML's; DEL is the one control JSON keeps.
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def to_toml_value(value: Any) -> str:
    """A TOML literal for a config value; raises TypeError if there is none.

    Options classes often convert what they read (a pattern string to a
    compiled regex, a list to a tuple); the literal is what reads back to
    the same value.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, enum.Enum):
        return to_toml_value(value.value)
    if isinstance(value, pathlib.PurePath):
        return _toml_str(str(value))
    if isinstance(value, re.Pattern):
        return to_toml_value(value.pattern)
    if isinstance(value, set | frozenset):
        return "[" + ", ".join(sorted(to_toml_value(v) for v in value)) + "]"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(to_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        inner = ", ".join(f"{_toml_key(str(k))} = {to_toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    if attrs.has(type(value)):
        return to_toml_value(attrs.asdict(value, recurse=False))
    raise TypeError(f"no TOML form for {type(value).__name__}")


def _line(key: str, value: Any) -> str:
    if value is None:
        return f'# {_toml_key(key)} = ""'
    try:
        return f"{_toml_key(key)} = {to_toml_value(value)}"
    except TypeError:
        return f"# {_toml_key(key)} = {value!r}  (no TOML form: the brain's default applies)"


def _effective_options(entry: BrainEntry, built: Any) -> dict[str, Any]:
    if built is None or not attrs.has(type(built)):
        return dict(entry.options)
    out: dict[str, Any] = {}
    for name, attr in _option_fields(type(built)).items():
        out[name] = getattr(built, attr.name)
    return out


def _render(config: Config, options: Mapping[str, Any]) -> str:
    src = f"{config.source}: {config.path}" if config.path else config.source
    out = [f"# Effective MilterMonkey configuration ({src}),",
           "# every default spelled out.  Commented keys are not set.", "",
           f"[{DAEMON_TABLE}]"]
    for field in attrs.fields(DaemonConfig):
        out.append(f"# {field.metadata['doc']}")
        out.append(_line(field.name, getattr(config.daemon, field.name)))
    for entry in config.brains:
        out += ["", f"[[{BRAIN_TABLE}]]"]
        for key in BRAIN_KEYS:
            out.append(_line(key, getattr(entry, key)))
        for key, value in _effective_options(entry, options.get(entry.name)).items():
            out.append(_line(key, value))
    return "\n".join(out) + "\n"
