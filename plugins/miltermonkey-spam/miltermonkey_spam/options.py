"""The spam brain's options: one frozen attrs class, checked when the config loads.

Every option is documented in the package README (name, default, meaning);
keep the two in step.  Converters accept what TOML gives (ints for floats,
lists for tuples) and raise ``ValueError`` with a message that the core's
config loader shows at the offending line.  Sizes and durations use the
core's parsers, so ``"25MiB"`` or ``"90s"`` mean here what they mean in
``[miltermonkey]`` and in every other brain's table.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping
from typing import Any, ClassVar, Final, Literal

import attrs

from miltermonkey_core import Reply, check_header_name, duration_converter, size_converter
from miltermonkey_spam.spamc import SpamdAddress, check_user

#: spamc's default ``-s`` limit (500 KiB): larger messages are not sent to spamd.
DEFAULT_MAX_SIZE: Final = 500 * 1024
DEFAULT_LADDER: Final = (5.0, 10.0, 15.0, 20.0, 30.0)
#: How long a spamd verdict is replayed for the same message: long enough for
#: Postfix's first retries and a bulk sender's run of transactions, short
#: enough that network tests, Bayes and rule updates catch up soon.
DEFAULT_CACHE_TTL: Final = 300.0
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(value: Any, what: str) -> float:
    if not _is_number(value) or not math.isfinite(value):
        raise ValueError(f"expected {what}, got {value!r}")
    return float(value)


_ABOVE_ZERO_SECONDS = duration_converter(minimum=0.0, exclusive=True)
_ANY_SECONDS = duration_converter(minimum=0.0)
_BYTES = size_converter(minimum=1)


def _positive_seconds(value: Any) -> float:
    """Seconds above 0: ``30``, ``2.5``, ``"30s"``, ``"2m"`` (the core's durations)."""
    seconds: float = _ABOVE_ZERO_SECONDS(value)
    return seconds


def _seconds(value: Any) -> float:
    """Seconds, 0 allowed."""
    seconds: float = _ANY_SECONDS(value)
    return seconds


def _size(value: Any) -> int:
    """Bytes above 0: ``512000``, ``"500k"``, ``"2M"``, ``"25MiB"`` (the core's sizes).

    Powers of 1024, as spamc's ``-s`` counts.
    """
    n: int = _BYTES(value)
    return n


def _optional_score(value: Any) -> float | None:
    """A score, or unset (``None``, or ``""`` as ``show-config`` writes an unset key)."""
    return None if value is None or value == "" else _number(value, what="a score")


def _str_list(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of {what}, got {value!r}")
    return tuple(v.strip() for v in value)


def _servers(value: Any) -> tuple[str, ...]:
    items = _str_list(value, "spamd addresses")
    if not items:
        raise ValueError("at least one spamd address is needed")
    return tuple(str(SpamdAddress.parse(v)) for v in items)


def _networks(value: Any) -> tuple[str, ...]:
    out = []
    for item in _str_list(value, "networks (CIDR)"):
        try:
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ValueError(f"not an IP network: {item!r} (write e.g. 192.0.2.0/24)") from None
    return tuple(out)


def _ladder(value: Any) -> tuple[float, ...]:
    if not isinstance(value, list | tuple) or not all(_is_number(v) for v in value):
        raise ValueError(f"expected a list of scores, e.g. [5, 10, 15, 20, 30], got {value!r}")
    rungs = tuple(float(v) for v in value)
    if list(rungs) != sorted(set(rungs)):
        raise ValueError(f"rating_ladder must rise strictly, got {list(value)!r}")
    return rungs


def _header_patterns(value: Any) -> tuple[str, ...]:
    items = _str_list(value, "header names or patterns")
    for p in items:
        check_header_name(p.replace("*", "x").replace("?", "x").replace("[", "x")
                          .replace("]", "x"))
    return items


def _user(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return check_user(value)


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"expected true or false, got {value!r}")


def _one_of(*choices: str) -> Any:
    def check(_inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
        if value not in choices:
            raise ValueError(f"{attr.name} must be one of {', '.join(choices)}; got {value!r}")

    return check


def _reply_text(_inst: object, _attr: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("reject_text must be a non-empty string")


def _tag(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"subject_tag must be a string, got {value!r}")
    if any(c in value for c in "\r\n\x00"):
        raise ValueError("subject_tag must be one line")
    return value.strip()


@attrs.frozen(kw_only=True)
class SpamOptions:
    """Options of one ``[[brain]] use = "spam"`` table (see the README for each)."""

    #: Seed-like and spamass-milter-like spellings accepted in the config.
    OPTION_ALIASES: ClassVar[Mapping[str, str]] = {
        "spamd": "servers",
        "spamd_address": "servers",
        "spamd_addresses": "servers",
        "spamdaddress": "servers",
        "spamd_host": "servers",
        "spamdhost": "servers",
        "address": "servers",
        "maxsize": "max_size",
        "max_scan_size": "max_size",
        "maxscansize": "max_size",
        "rejectscore": "reject_score",
        "reject_threshold": "reject_score",
        "quarantinescore": "quarantine_score",
        "quarantine_threshold": "quarantine_score",
        "subjecttag": "subject_tag",
        "rating": "legacy_rating",
        "legacyrating": "legacy_rating",
        "ratings": "rating_ladder",
        "ratingladder": "rating_ladder",
        "spamd_user": "user",
        "trusted_nets": "trusted_networks",
        "trustednetworks": "trusted_networks",
        "skip_auth": "skip_authenticated",
        "skipauthenticated": "skip_authenticated",
        "on_spamd_error": "on_engine_error",
        "spamd_timeout": "scan_timeout",
        "read_timeout": "scan_timeout",
    }

    # --- where spamd is ---------------------------------------------------------------
    servers: tuple[str, ...] = attrs.field(
        default=("127.0.0.1:783",), converter=_servers,
        metadata={"doc": "spamd addresses in preference order (host:port, unix:/path)"})
    balance: Literal["failover", "round_robin"] = attrs.field(
        default="failover", validator=_one_of("failover", "round_robin"),
        metadata={"doc": "failover: first healthy server; round_robin: spread over all"})
    connect_timeout: float = attrs.field(
        default=2.0, converter=_positive_seconds,
        metadata={"doc": "seconds to wait for a connection to one spamd"})
    scan_timeout: float = attrs.field(
        default=30.0, converter=_positive_seconds,
        metadata={"doc": "seconds for sending the message and reading spamd's answer"})
    cooldown: float = attrs.field(
        default=30.0, converter=_seconds,
        metadata={"doc": "seconds a failed spamd is skipped"})
    user: str | None = attrs.field(
        default=None, converter=_user,
        metadata={"doc": "User: sent to spamd (whose preferences); unset: none"})
    command: Literal["headers", "symbols"] = attrs.field(
        default="headers", validator=_one_of("headers", "symbols"),
        metadata={"doc": "headers: SpamAssassin's own X-Spam-Status; symbols: build it"})
    received_header: bool = attrs.field(
        default=True, converter=_bool,
        metadata={"doc": "show spamd a Received line for this hop (client IP, HELO)"})

    # --- what is scanned ----------------------------------------------------------------
    max_size: int = attrs.field(
        default=DEFAULT_MAX_SIZE, converter=_size,
        metadata={"doc": "larger messages are not sent to spamd (see on_too_large)"})
    skip_authenticated: bool = attrs.field(
        default=True, converter=_bool,
        metadata={"doc": "do not scan mail from SMTP-authenticated senders"})
    trusted_networks: tuple[str, ...] = attrs.field(
        default=(), converter=_networks,
        metadata={"doc": "client networks (CIDR) whose mail is not scanned"})

    # --- headers written ----------------------------------------------------------------
    legacy_rating: bool = attrs.field(
        default=True, converter=_bool,
        metadata={"doc": "append the seed's rating=SSSS to X-Spam-Status"})
    rating_ladder: tuple[float, ...] = attrs.field(
        default=DEFAULT_LADDER, converter=_ladder,
        metadata={"doc": "scores at which another S is earned"})
    subject_tag: str = attrs.field(
        default="", converter=_tag,
        metadata={"doc": "prefix for the Subject of spam; empty: leave it"})
    remove_headers: tuple[str, ...] = attrs.field(
        default=("X-Spam", "X-Spam-*"), converter=_header_patterns,
        metadata={"doc": "incoming headers removed and hidden from spamd (patterns)"})

    # --- the scan cache -----------------------------------------------------------------
    cache_ttl: float = attrs.field(
        default=DEFAULT_CACHE_TTL, converter=_seconds,
        metadata={"doc": "seconds spamd's verdict on a message is replayed for the same "
                         "message from the same client; 0: never cached"})

    # --- what happens to spam -------------------------------------------------------------
    reject_score: float | None = attrs.field(
        default=None, converter=_optional_score,
        metadata={"doc": "refuse in SMTP at this score; unset: never"})
    reject_code: int = attrs.field(
        default=550, metadata={"doc": "SMTP code of that refusal (5xx)"})
    reject_xcode: str = attrs.field(
        default="5.7.1", metadata={"doc": "enhanced status code of that refusal"})
    reject_text: str = attrs.field(
        default="Blocked by SpamAssassin (score {score})", validator=_reply_text,
        metadata={"doc": "reply text; {score}, {required}, {threshold} are filled in"})
    quarantine_score: float | None = attrs.field(
        default=None, converter=_optional_score,
        metadata={"doc": "hold in the MTA's quarantine at this score; unset: never"})

    # --- when it cannot scan ---------------------------------------------------------------
    on_engine_error: Literal["tag", "accept", "tempfail", "reject"] = attrs.field(
        default="tag", validator=_one_of("tag", "accept", "tempfail", "reject"),
        metadata={"doc": "spamd down or slow: tag, accept, tempfail or reject"})
    on_too_large: Literal["tag", "accept"] = attrs.field(
        default="tag", validator=_one_of("tag", "accept"),
        metadata={"doc": "above max_size: tag (X-Spam-Status: Unchecked) or accept"})

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.reject_code, int) or isinstance(self.reject_code, bool) or \
                self.reject_code // 100 != 5:
            raise ValueError(f"reject_code must be a 5xx SMTP code, got {self.reject_code!r}")
        if not isinstance(self.reject_xcode, str):
            raise ValueError(f"reject_xcode must be a string like 5.7.1, got {self.reject_xcode!r}")
        # Reply.build refuses what libmilter or the MTA would mangle; find out now.
        Reply.build(self.reject_code, self.reject_xcode, self.reject_text)

    def networks(self) -> tuple[Network, ...]:
        return tuple(ipaddress.ip_network(n) for n in self.trusted_networks)
