"""When a brain runs: the ``when`` table of a ``[[brain]]``, checked as the file is read.

An admin says "spam only for mail from outside, and not for authenticated
users" in the brain's table instead of inside the brain::

    [[brain]]
    use = "spam"
    when.authenticated = false
    when.client_not_in = ["127.0.0.0/8", "10.0.0.0/8"]

Every condition given must hold for the brain to be called.  A network that
does not parse, a regular expression that does not compile, an unknown key
or a size that makes no sense is a configuration error at its line, like
any other; what each condition means at run time is the engine's business
(:mod:`miltermonkey_core.engine.conditions`).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any, Final

import attrs

from miltermonkey_core.config.values import (
    BRAIN_NAME,
    Invalid,
    boolean,
    byte_size,
    did_you_mean,
    show,
)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Each key of a ``when`` table and what it takes, for errors and the docs.
WHEN_KEYS: Final[Mapping[str, str]] = {
    "authenticated": "true: only SMTP-authenticated senders ({auth_authen} set); "
                     "false: only the others",
    "client_in": "networks (CIDR, IPv4 or IPv6) the client address must be in",
    "client_not_in": "networks the client address must not be in",
    "sender_domain": 'domains the envelope sender must be in ("*.example.org": its subdomains)',
    "sender_domain_not": "domains the envelope sender must not be in",
    "recipient_domain": "domains at least one recipient must be in",
    "recipient_domain_not": "domains no recipient may be in",
    "size_min": "smallest message the brain is called for (bytes, or like \"10k\")",
    "size_max": "largest message the brain is called for",
    "macro": 'macros and the regular expression each value must match, e.g. '
             '{ "{daemon_name}" = "^ORIGINATING$" }',
    "key_ran": "brains a trusted milter key must say already ran",
    "unless_key_ran": "brains a trusted milter key must not say already ran",
}

_DOMAIN: Final = re.compile(r"(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
                            r"(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*\.?")


@attrs.frozen(kw_only=True)
class When:
    """The conditions of one brain; ``None``/empty means "not a condition"."""

    authenticated: bool | None = None
    client_in: tuple[Network, ...] = ()
    client_not_in: tuple[Network, ...] = ()
    sender_domain: tuple[str, ...] = ()
    sender_domain_not: tuple[str, ...] = ()
    recipient_domain: tuple[str, ...] = ()
    recipient_domain_not: tuple[str, ...] = ()
    size_min: int | None = None
    size_max: int | None = None
    macro: tuple[tuple[str, re.Pattern[str]], ...] = ()
    key_ran: tuple[str, ...] = ()
    unless_key_ran: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return self == When()

    def as_table(self) -> dict[str, Any]:
        """The conditions as the admin writes them (for ``show-config``)."""
        out: dict[str, Any] = {}
        for field in attrs.fields(When):
            value = getattr(self, field.name)
            if value is None or value == ():
                continue
            if field.name in ("client_in", "client_not_in"):
                value = [str(n) for n in value]
            elif field.name == "macro":
                value = {name: pattern.pattern for name, pattern in value}
            elif isinstance(value, tuple):
                value = list(value)
            out[field.name] = value
        return out


def _strings(value: Any, what: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(v, str) for v in items):
        raise Invalid(f"expected a list of {what}, got {show(value)}")
    return [v.strip() for v in items]


def _networks(value: Any) -> tuple[Network, ...]:
    out = []
    for text in _strings(value, "networks like \"10.0.0.0/8\""):
        try:
            out.append(ipaddress.ip_network(text, strict=False))
        except ValueError as e:
            raise Invalid(f"{text!r} is not a network (CIDR, IPv4 or IPv6): {e}") from None
    return tuple(out)


def _domains(value: Any) -> tuple[str, ...]:
    out = []
    for text in _strings(value, 'domains like "example.com" or "*.example.com"'):
        if not _DOMAIN.fullmatch(text):
            raise Invalid(f"{text!r} is not a domain (write example.com, or *.example.com "
                          "for its subdomains)")
        out.append(text.lower().rstrip("."))
    return tuple(out)


def _brains(value: Any) -> tuple[str, ...]:
    out = []
    for text in _strings(value, "brain names"):
        if not BRAIN_NAME.fullmatch(text):
            raise Invalid(f"{text!r} is not a brain name")
        out.append(text)
    return tuple(out)


def _macros(value: Any) -> tuple[tuple[str, re.Pattern[str]], ...]:
    if not isinstance(value, Mapping) or not value:
        raise Invalid('expected a table of macro = "regular expression", e.g. '
                      '{ "{daemon_name}" = "^ORIGINATING$" }, got ' + show(value))
    out = []
    for written, pattern in value.items():
        if not isinstance(pattern, str):
            raise Invalid(f"macro {written!r}: expected a regular expression, "
                          f"got {show(pattern)}")
        name = "{" + written + "}" if len(written) > 1 and not written.startswith("{") \
            else written
        try:
            out.append((name, re.compile(pattern)))
        except re.error as e:
            raise Invalid(f"macro {name!r}: {pattern!r} is not a regular expression: {e}") \
                from None
    return tuple(out)


def _size(value: Any) -> int:
    return byte_size(value)


_PARSERS: Final = {
    "authenticated": boolean, "client_in": _networks, "client_not_in": _networks,
    "sender_domain": _domains, "sender_domain_not": _domains,
    "recipient_domain": _domains, "recipient_domain_not": _domains,
    "size_min": _size, "size_max": _size, "macro": _macros,
    "key_ran": _brains, "unless_key_ran": _brains,
}


class WhenError(Invalid):
    """A bad ``when`` key; ``key`` names it (``when.client_in``) for the error's location."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


def parse_when(value: Any) -> When:
    """A ``when`` table as written; raises :class:`WhenError` naming the bad key."""
    if isinstance(value, When):
        return value
    if not isinstance(value, Mapping):
        raise WhenError(f"expected a table of conditions ({', '.join(WHEN_KEYS)}), "
                        f"got {show(value)}", "when")
    kwargs: dict[str, Any] = {}
    for key, raw in value.items():
        parse = _PARSERS.get(key)
        if parse is None:
            raise WhenError(f"unknown condition{did_you_mean(key, WHEN_KEYS)}; conditions are: "
                            f"{', '.join(WHEN_KEYS)}", f"when.{key}")
        try:
            kwargs[key] = parse(raw)
        except Invalid as e:
            raise WhenError(str(e), f"when.{key}") from None
    when = When(**kwargs)
    if when.size_min is not None and when.size_max is not None and \
            when.size_min > when.size_max:
        raise WhenError(f"size_min ({when.size_min}) is larger than size_max "
                        f"({when.size_max}): the brain would never run", "when.size_min")
    return when
