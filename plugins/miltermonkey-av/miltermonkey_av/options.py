"""The AV brain's options: one ``[[brain]]`` table with ``use = "av"``.

Names follow the seed (``relay_mode``, ``minscansize``, ``domainname``...)
and its spellings are accepted as aliases (:data:`AntiVirusOptions.OPTION_ALIASES`:
``uvscanpath`` -> ``scanner_path``, ``sendmailpath`` -> ``sendmail_path``).
Every check runs at load time, so a bad table stops the daemon with the
file, line and key instead of tempfailing mail later.

Two seed defaults are changed on purpose (see the README):

* ``minscansize`` 50000 -> 0: a 50 kB floor let every small virus through
  (EICAR is 68 bytes; mass-mailer worms of the time were 20-30 kB).
* ``who``/``domainname``/``helpaddr`` named the seed author's company; they
  now default to this host's names.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import attrs

from miltermonkey_av.clamd import ClamdAddress
from miltermonkey_av.command import check_template, preset_for
from miltermonkey_av.mime_limits import DEFAULT_MAX_DEPTH, DEFAULT_MAX_PARTS
from miltermonkey_core import Verdict, duration_converter, parse_size, size_converter

#: The seed's pattern plus the mass-mailer families that forge the sender
#: (notifying that "sender" is backscatter to an innocent third party).
#: Matched case-insensitively against the virus name (ClamAV, McAfee or
#: other vendor spellings: Worm.Mydoom-1, W32/Mydoom@MM, Win.Worm.Netsky...).
DEFAULT_DISCARD_PATTERN = (
    r"(?i)(Klez|SirCam|Exploit-MIME"
    r"|Mydoom|Netsky|SomeFool|Bagle|Beagle|Bagz|Sober|Sobig|Mimail|Lovgate|Zafi|Mytob"
    r"|Bugbear|Dumaru|Swen|Nyxem|Blackmal|Warezov|Stration)"
)

#: clamd's default StreamMaxLength (and clamav-milter's MaxFileSize).
DEFAULT_MAX_SCAN_SIZE = 25 * 1024 * 1024

ENGINES = ("auto", "clamd", "command")
INFECTED_ACTIONS = ("reject", "notify", "discard", "quarantine")
OVERSIZE_ACTIONS = ("accept-tag", "tempfail", "reject")
LIMITS_ACTIONS = ("reject", "tempfail", "accept-tag")

#: Per-hop trace and filter headers: another host relaying the same message, or
#: delivering it again, adds or changes these and nothing else.
DEFAULT_CACHE_IGNORE_HEADERS = ("Received", "Return-Path", "Delivered-To", "X-Original-To",
                                "X-Virus-Scanned", "X-Virus-Status", "X-Milter-Key",
                                "X-Spam-*")
#: Headers that say how the body is to be decoded: a cache key without them
#: would let another MIME structure hit an entry scanned as something else.
MIME_HEADERS = ("Content-Type", "Content-Transfer-Encoding", "Content-Disposition",
                "MIME-Version")
#: Start streaming to clamd once this much of the message has arrived.
DEFAULT_STREAM_MIN_SIZE = 1024 * 1024

def _count(value: Any) -> int:
    """A limit counted in levels or parts: a whole number, at least 1 (a bool is refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a whole number, got {value!r}")
    if value < 1:
        raise ValueError(f"must be at least 1, got {value}")
    return value


def _limits_action(value: Any) -> Any:
    """``accept`` is accepted for ``accept-tag``: both deliver the mail tagged Unscanned."""
    return "accept-tag" if value == "accept" else value


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected seconds as a number, got {value!r}")
    if value <= 0:
        raise ValueError(f"expected a positive number of seconds, got {value!r}")
    return float(value)


def _addresses(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items:
        raise ValueError("clamd must be an address or a non-empty list of addresses "
                         "(unix:/path, tcp:host:port, host:port)")
    out = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"clamd address must be a string, got {item!r}")
        out.append(str(ClamdAddress.parse(item)))
    return tuple(out)


def _pattern(value: Any) -> re.Pattern[str]:
    if isinstance(value, re.Pattern):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a regular expression, got {value!r}")
    try:
        return re.compile(value)
    except re.error as e:
        raise ValueError(f"not a valid regular expression {value!r}: {e}") from None


def _optional_pattern(value: Any) -> re.Pattern[str] | None:
    if value is None:
        return None
    p = _pattern(value)
    if isinstance(value, str):  # scanner output is matched line by line
        p = re.compile(value, re.MULTILINE)
    if "name" not in p.groupindex:
        raise ValueError("scanner_virus_regex needs a (?P<name>...) group for the virus name")
    return p


def _optional_str_tuple(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of strings, got {value!r}")
    return tuple(value)


def _optional_int_tuple(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list | tuple) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"expected a list of exit codes, got {value!r}")
    return tuple(value)


def _one_of(*choices: str) -> Any:
    def check(_inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
        if value not in choices:
            raise ValueError(f"{attr.name} must be one of {', '.join(map(repr, choices))}, "
                             f"got {value!r}")
    return check


def _no_alternate_key_header(_inst: object, _attr: attrs.Attribute[Any], value: Any) -> None:
    if value is not None:
        raise ValueError(
            "alternate_key_header is a daemon-wide milter key setting: move it to the "
            "[miltermonkey] table, and set skip_if_key = true on this [[brain]] so mail a "
            "trusted hop already scanned is not scanned again")


_to_duration = duration_converter()
_to_size = size_converter()


def _duration(value: Any) -> float:
    """Seconds, written as for the daemon (3600, "1h", "2m"); at least 0."""
    seconds: float = _to_duration(value)
    return seconds


def _size(value: Any) -> int:
    """Bytes, written as for the daemon (1048576, "1M"); at least 0."""
    size: int = _to_size(value)
    return size


def _header_patterns(value: Any) -> tuple[str, ...]:
    """Header names or fnmatch patterns (``X-Spam-*``); none may cover a MIME header."""
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of header names, got {value!r}")
    out = []
    for item in value:
        pattern = item.strip()
        if not pattern or any(c.isspace() or c == ":" for c in pattern):
            raise ValueError(f"{item!r} is not a header name or pattern (like X-Spam-*)")
        covered = [h for h in MIME_HEADERS if fnmatch.fnmatchcase(h.lower(), pattern.lower())]
        if covered:
            raise ValueError(f"{item!r} covers {', '.join(covered)}, which says how the body "
                             "is decoded: it must stay in the cache key")
        out.append(pattern)
    return tuple(out)


_str = attrs.validators.instance_of(str)
_bool = attrs.validators.instance_of(bool)
_opt_str = attrs.validators.optional(_str)


@attrs.frozen(kw_only=True)
class AntiVirusOptions:
    """Options of the ``av`` brain; see the README for each one's why."""

    #: Seed spellings and readable forms accepted for the canonical names.
    OPTION_ALIASES: ClassVar[Mapping[str, str]] = {
        "uvscanpath": "scanner_path",
        "sendmailpath": "sendmail_path",
        "clamd_socket": "clamd",
        "clamd_sockets": "clamd",
        "min_scan_size": "minscansize",
        "domain_name": "domainname",
        "help_addr": "helpaddr",
        "templates": "templates_dir",
    }

    # --- engine ---------------------------------------------------------------------------
    #: "clamd", "command", or "auto": command when scanner_path is set, else clamd.
    engine: str = attrs.field(default="auto", validator=_one_of(*ENGINES))
    #: clamd addresses, tried round-robin with failover.
    clamd: tuple[str, ...] = attrs.field(default=("unix:/var/run/clamav/clamd.ctl",),
                                         converter=_addresses)
    #: Seconds a failed clamd is skipped before it is probed with PING again.
    clamd_cooldown: float = attrs.field(default=30.0, converter=_seconds)
    #: Seconds to wait for a connection to clamd before trying the next one.
    connect_timeout: float = attrs.field(default=5.0, converter=_seconds)
    #: Seconds one scan may take in total (all failover attempts included).
    #: Below the framework's per-brain ``timeout`` (60 s; that name is the
    #: framework's ``[[brain]]`` key), so a slow engine is reported as this
    #: brain's ScanTimeout, naming the clamd, rather than as a generic timeout.
    scan_timeout: float = attrs.field(default=45.0, converter=_seconds)
    #: Command-line scanner (seed: uvscanpath, default /usr/av/bin/uvscan).
    scanner_path: str | None = attrs.field(default=None, validator=_opt_str)
    #: Its arguments; "{file}" is the message file (appended if absent).
    scanner_args: tuple[str, ...] | None = attrs.field(default=None,
                                                       converter=_optional_str_tuple)
    scanner_clean_codes: tuple[int, ...] | None = attrs.field(default=None,
                                                              converter=_optional_int_tuple)
    scanner_infected_codes: tuple[int, ...] | None = attrs.field(
        default=None, converter=_optional_int_tuple)
    #: Regex with a (?P<name>...) group, matched per output line.
    scanner_virus_regex: re.Pattern[str] | None = attrs.field(default=None,
                                                              converter=_optional_pattern)
    #: Where the command engine writes the message; %s = a unique id.
    #: (the seed's default; safe because the file is created O_EXCL, mode 0600)
    tempfile_template: str = attrs.field(default="/var/tmp/av_%s",  # noqa: S108
                                         validator=_str)

    # --- what happens to infected mail ------------------------------------------------------
    #: True: refuse infected mail at SMTP time (5xx).  False: the seed's notify mode.
    relay_mode: bool = attrs.field(default=True, validator=_bool)
    #: Overrides relay_mode: reject | notify | discard | quarantine.
    infected_action: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(_one_of(*INFECTED_ACTIONS)))
    reject_code: int = attrs.field(default=550, validator=attrs.validators.instance_of(int))
    reject_xcode: str = attrs.field(default="5.7.1", validator=_str)
    #: %v is replaced by the virus name.
    reject_text: str = attrs.field(default="Virus found: %v", validator=_str)
    #: Viruses that forge senders: discarded without any notice (notify mode).
    discard_pattern: re.Pattern[str] = attrs.field(default=DEFAULT_DISCARD_PATTERN,
                                                   converter=_pattern)

    # --- sizes ------------------------------------------------------------------------------
    #: Messages smaller than this are not scanned (seed default 50000; now 0).
    #: A size: bytes, or "50k", "25M", "25MiB" (binary units, as clamd counts).
    minscansize: int = attrs.field(default=0, converter=parse_size)
    #: Larger messages are not sent to the engine; oversize_action applies.
    #: A size, like minscansize; 0 sends every message, whatever its size.
    #: Also the largest an archive member may say it unpacks to (limits_action
    #: applies above it): clamd skips files over its MaxFileSize.
    max_scan_size: int = attrs.field(default=DEFAULT_MAX_SCAN_SIZE, converter=parse_size)
    #: accept-tag | tempfail | reject, for mail above max_scan_size or clamd's limit.
    oversize_action: str = attrs.field(default="accept-tag",
                                       validator=_one_of(*OVERSIZE_ACTIONS))

    # --- structure limits -------------------------------------------------------------------
    #: What happens to mail the scan could not look at to the end: past max_mime_depth
    #: or max_mime_parts, an archive member over max_scan_size, or reported by the
    #: engine as past its own limits (clamd's Heuristics.Limits.Exceeded, with
    #: AlertExceedsMax yes in clamd.conf).  reject (554 5.7.0),
    #: tempfail (451 4.7.0), or accept-tag (also written accept): delivered with
    #: X-Virus-Status: Unscanned (limits), and the milter key does not claim av ran.
    limits_action: str = attrs.field(default="reject", converter=_limits_action,
                                     validator=_one_of(*LIMITS_ACTIONS))
    #: Deepest nesting looked at before the engine: multipart parts, message/rfc822
    #: and mail inside attachments, and archives inside those (zip, tar, gzip).
    #: Below clamd's MaxRecursion (Debian: 16), so mail clamd would stop inside is
    #: caught here first, whatever clamd is configured to say.
    max_mime_depth: int = attrs.field(default=DEFAULT_MAX_DEPTH, converter=_count)
    #: Most MIME parts, at all levels together, looked at before the engine.
    #: Below clamd's MaxFiles (10000), for the same reason.
    max_mime_parts: int = attrs.field(default=DEFAULT_MAX_PARTS, converter=_count)

    # --- notices ----------------------------------------------------------------------------
    #: Organisation named in notices (seed default "Membrain Technologies").
    who: str | None = attrs.field(default=None, validator=_opt_str)
    #: Domain named in notices (seed default membrain.com).
    domainname: str | None = attrs.field(default=None, validator=_opt_str)
    #: Help address in notices (seed default postmaster@membrain.com).
    helpaddr: str | None = attrs.field(default=None, validator=_opt_str)
    #: sendmail binary for notices; unset: the daemon's sendmail_path / notify_smtp.
    sendmail_path: str | None = attrs.field(default=None, validator=_opt_str)
    notify_sender: bool = attrs.field(default=False, validator=_bool)
    notify_recipients: bool = attrs.field(default=True, validator=_bool)
    #: Envelope sender of notices; "" is the null sender <> (notices never bounce).
    notice_sender: str = attrs.field(default="", validator=_str)
    #: Directory with recipient_notice.txt / sender_notice.txt overriding the shipped ones.
    templates_dir: str | None = attrs.field(default=None, validator=_opt_str)

    # --- headers ----------------------------------------------------------------------------
    #: Add X-Virus-Scanned and X-Virus-Status (replacing any from outside).
    add_headers: bool = attrs.field(default=True, validator=_bool)

    # --- the scan cache and streaming -------------------------------------------------------
    #: Seconds a clean or infected verdict is replayed from the daemon's scan cache
    #: for the same message (a duration: 3600, "1h"); 0: never cached.
    cache_ttl: float = attrs.field(default=3600.0, converter=_duration)
    #: Headers left out of the cache key (fnmatch patterns, any case): per-hop trace
    #: and filter headers, so the same message relayed or delivered again hits.
    cache_ignore_headers: tuple[str, ...] = attrs.field(default=DEFAULT_CACHE_IGNORE_HEADERS,
                                                        converter=_header_patterns)
    #: clamd's signature directory, fingerprinted into the cache key: "auto" (the
    #: DatabaseDirectory of /etc/clamav/clamd.conf, for the clamd that file
    #: describes), "" (none), or a path.
    database_directory: str = attrs.field(default="auto", validator=_str)
    #: While the newest signature file is younger than this, nothing is cached or
    #: looked up: clamd may still be scanning with the database before it.
    cache_settle: float = attrs.field(default=120.0, converter=_duration)
    #: Stream the message to clamd while it arrives once it is this large (a
    #: size: "1M"); 0: never, the message is sent after the end of data.
    stream_min_size: int = attrs.field(default=DEFAULT_STREAM_MIN_SIZE,
                                       converter=_size)

    #: Not a brain option: refused with a pointer to the daemon table.
    alternate_key_header: Any = attrs.field(default=None, validator=_no_alternate_key_header)

    def __attrs_post_init__(self) -> None:
        check_template(self.tempfile_template)
        if self.resolved_engine == "command":
            if not self.scanner_path:
                raise ValueError("engine 'command' needs scanner_path (seed: uvscanpath)")
            if preset_for(self.scanner_path) is None and (
                    self.scanner_clean_codes is None or self.scanner_infected_codes is None):
                raise ValueError(
                    f"scanner_path {self.scanner_path!r} is not clamscan, clamdscan or "
                    "uvscan: set scanner_clean_codes and scanner_infected_codes")
        if self.max_scan_size and self.minscansize > self.max_scan_size:
            raise ValueError(f"minscansize {self.minscansize} is above max_scan_size "
                             f"{self.max_scan_size}: nothing would be scanned")
        if self.scan_timeout <= self.connect_timeout and len(self.clamd) > 1:
            raise ValueError("scan_timeout must be longer than connect_timeout, or failover "
                             "to a second clamd never gets a chance")
        # Build the reply once: a bad code or enhanced code fails here, at load time.
        Verdict.reject(self.reject_code, self.reject_xcode,
                       self.reject_text.replace("%v", "X"))

    @property
    def resolved_engine(self) -> Literal["clamd", "command"]:
        if self.engine == "command" or (self.engine == "auto" and self.scanner_path):
            return "command"
        return "clamd"

    @property
    def action(self) -> str:
        """What happens to infected mail: infected_action, else what relay_mode says."""
        if self.infected_action is not None:
            return self.infected_action
        return "reject" if self.relay_mode else "notify"
