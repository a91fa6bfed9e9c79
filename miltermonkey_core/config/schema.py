"""The configuration's shape: every daemon option and ``[[brain]]`` key with its
default, its check and a one-line doc; and the effective configuration as TOML.

The seed configured the daemon through Perl ``use`` arguments; its option
names stay the canonical names here and readable spellings are accepted as
aliases (:data:`ALIASES`), so a 2005 config translates word for word.  The
docs site's option tables are generated from these classes, so what is
documented is what is checked.
"""

from __future__ import annotations

import enum
import json
import math
import pathlib
import re
from collections.abc import Mapping
from typing import Any, Final

import attrs

from miltermonkey_core.config.conditions import When
from miltermonkey_core.config.endpoint import Endpoint, connection_spec, parse_connection
from miltermonkey_core.config.values import (
    Coerce,
    boolean,
    byte_size,
    cache_target,
    choice,
    duration,
    file_mode,
    header_list,
    header_name,
    host_port,
    integer,
    log_target,
    optional,
    string,
)
from miltermonkey_core.errors import ConfigError

#: The table holding the daemon's own options.
DAEMON_TABLE: Final = "miltermonkey"
#: The array of tables listing the brains, in the order they run.
BRAIN_TABLE: Final = "brain"
#: What may happen to a message when a brain fails; the engine gives each its verdict.
ON_ERROR_POLICIES: Final = ("tempfail", "accept", "tag", "reject", "mta")


# --------------------------------------------------------------------------------------
# The daemon's options.
# --------------------------------------------------------------------------------------


def _opt(default: Any, coerce: Coerce, doc: str) -> Any:
    """An option with its check (also run on direct construction) and a one-line doc."""
    return attrs.field(default=default, converter=coerce, metadata={"doc": doc})


@attrs.frozen(kw_only=True)
class DaemonConfig:
    """The ``[miltermonkey]`` table.  Seed names are canonical; see :data:`ALIASES`."""

    connection: str = _opt("inet:8890@127.0.0.1", connection_spec,
                           "socket to listen on: inet:PORT@HOST, inet6:PORT@HOST or unix:/path")
    socket_mode: str = _opt("0660", file_mode, "permissions of a unix socket")
    socket_group: str | None = _opt(None, optional(string()), "group of a unix socket")
    cid_timeout: int = _opt(600, duration(1), "seconds a silent session is kept in memory")
    debug_level: int = _opt(10, integer(0, 99),
                            "log messages of level <= this (0-99; ~50 is useful; less is more)")
    debug_mode: bool = _opt(False, boolean, "also log to stderr")
    log_target: str = _opt("auto", log_target,
                           "auto (syslog if /dev/log is there, else stderr), syslog, stderr, path")
    defaultexpiration: int = _opt(432000, duration(1),
                                  "seconds a milter key stays valid (5d = Postfix queue lifetime)")
    milter_key: bool = _opt(True, boolean, "sign which brains ran, and trust such signatures")
    milterkeyheader: str = _opt("X-Milter-Key", header_name, "header holding the milter key")
    miltersecretfile: str = _opt("/etc/mail/miltersecret", string(),
                                 "file with the milter key secrets (not world readable)")
    key_id: str | None = _opt(None, optional(string()),
                              "secret that signs new keys (unset: the first in the file)")
    key_body_binding: str = _opt("body", choice("body", "none"),
                                 "bind keys to the body digest (none: survive list footers)")
    key_clock_skew: int = _opt(300, duration(0), "seconds of clock skew tolerated on keys")
    alternate_key_header: tuple[str, ...] = _opt((), header_list,
                                                 "other headers whose keys are trusted too")
    pidfile: str | None = _opt(None, optional(string()), "pid file to write (unset: none)")
    miltername: str = _opt("MilterMonkey", string(), "name in log lines (the syslog tag)")
    threads: int = _opt(20, integer(1, 10000), "messages judged at once (worker threads)")
    jobsperthread: int = _opt(200, integer(0),
                              "messages a worker thread handles before retiring (0: never)")
    on_error: str = _opt("tempfail", choice(*ON_ERROR_POLICIES),
                         "what a brain failure does to the message (a [[brain]] may override)")
    shutdown_timeout: float = _opt(30.0, duration(0, whole=False),
                                   "seconds messages in progress get to finish on SIGTERM")
    eom_timeout: float = _opt(240.0, duration(0.001, whole=False),
                              "seconds all brains together may take at end of message")
    progress_interval: float = _opt(10.0, duration(0, whole=False),
                                    "seconds between progress replies to the MTA (0: none)")
    milter_timeout: int = _opt(600, duration(1),
                               "seconds an MTA connection may stay silent between commands")
    negotiate_timeout: float = _opt(30.0, duration(0.001, whole=False),
                                    "seconds a new connection has to complete its negotiation")
    command_timeout: float = _opt(30.0, duration(0.001, whole=False),
                                  "seconds the rest of a packet may take once it has started")
    max_connections: int = _opt(0, integer(0, 1_000_000),
                                "MTA connections served at once (0: from the open-file limit)")
    overlap: bool = _opt(True, boolean,
                         "start independent brains' engine calls together (false: one by one)")
    cache: str = _opt("memory", cache_target,
                      "scan cache: memory (in-process), redis://host:port/db, or off")
    cache_max_entries: int = _opt(10000, integer(1),
                                  "entries the in-process scan cache keeps at most")
    cache_max_bytes: int = _opt(32 * 1024 * 1024, byte_size,
                                "bytes the in-process scan cache keeps at most")
    cache_secret_file: str | None = _opt(None, optional(string()),
                                         "secret signing shared cache entries (unset: the "
                                         "milter key's miltersecretfile)")
    spool_threshold: int = _opt(1048576, byte_size, "bodies larger than this go to a temp file")
    tmpdir: str | None = _opt(None, optional(string()),
                              "directory for spooled bodies and temp files (unset: system)")
    max_message_size: int = _opt(0, byte_size, "refuse larger messages (0: no limit)")
    noreply: str = _opt("auto", choice("auto", "always", "never"),
                        "negotiate no-reply for stages no brain answers")
    user: str | None = _opt(None, optional(string()), "user to switch to after binding")
    group: str | None = _opt(None, optional(string()), "group to switch to after binding")
    hostname: str | None = _opt(None, optional(string()),
                                "this host's name in keys and notices (unset: FQDN)")
    sendmail_path: str = _opt("/usr/sbin/sendmail", string(), "sendmail binary for notices")
    notify_smtp: str | None = _opt(None, optional(host_port),
                                   "host:port to send notices to by SMTP instead of sendmail")
    log_format: str = _opt("text", choice("text", "json"),
                           "log lines as text, or one JSON object a line (json)")
    metrics: str | None = _opt(None, optional(host_port),
                               "HOST:PORT serving /metrics, /healthz and /readyz (unset: off)")
    drain_period: float = _opt(0.0, duration(0, whole=False),
                               "seconds /readyz fails on SIGTERM before the listener closes")
    restart_attempts: int = _opt(5, integer(0, 10000),
                                 "failed worker starts in a row before the supervisor gives "
                                 "up (0: never)")

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

DAEMON_FIELDS: Final = {f.name: f for f in attrs.fields(DaemonConfig)}


# --------------------------------------------------------------------------------------
# Brains and the whole configuration.
# --------------------------------------------------------------------------------------

#: Keys of a ``[[brain]]`` table that the framework reads; the rest are options.
BRAIN_KEYS: Final = ("use", "name", "on_error", "on_timeout", "timeout", "mode", "when",
                     "skip_if_key", "expiration", "breaker_failures", "breaker_window",
                     "breaker_cooldown")
#: ``evaluation = true`` (the seed's evaluation mode flag) is ``mode = "evaluate"``.
BRAIN_ALIASES: Final[Mapping[str, str]] = {"evaluation": "mode", "evaluation_mode": "mode"}
#: How a brain's verdicts are used: ``enforce`` applies them; ``evaluate`` runs the
#: brain on live mail, logs and counts what it would have done, and applies nothing.
BRAIN_MODES: Final = ("enforce", "evaluate")


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
    mode: str = "enforce"
    #: The conditions under which the brain is called (all must hold).
    when: When = attrs.field(factory=When)
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

    @property
    def evaluation(self) -> bool:
        """The brain runs in evaluation mode: logged and counted, never applied."""
        return self.mode == "evaluate"

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
        return render_config(self, options or {})


def effective_on_error(entry: BrainEntry, cls: type | None, daemon: DaemonConfig) -> str:
    """The config's policy, else the brain class's own default, else the daemon's."""
    return entry.on_error or getattr(cls, "default_on_error", None) or daemon.on_error


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


def option_fields(options_cls: type) -> dict[str, attrs.Attribute[Any]]:
    """The options a brain takes: attrs init arguments by the name users write."""
    return {(a.alias or a.name): a for a in attrs.fields(options_cls) if a.init}


def _effective_options(entry: BrainEntry, built: Any) -> dict[str, Any]:
    if built is None or not attrs.has(type(built)):
        return dict(entry.options)
    out: dict[str, Any] = {}
    for name, attr in option_fields(type(built)).items():
        out[name] = getattr(built, attr.name)
    return out


def render_config(config: Config, options: Mapping[str, Any]) -> str:
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
            if key == "when":
                if not entry.when.empty:
                    out.append(_line(key, entry.when.as_table()))
                continue
            out.append(_line(key, getattr(entry, key)))
        for key, value in _effective_options(entry, options.get(entry.name)).items():
            out.append(_line(key, value))
    return "\n".join(out) + "\n"
