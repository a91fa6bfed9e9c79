"""Where the daemon listens: the one parser of ``connection`` strings.

libmilter's ``inet:PORT@HOST`` is the canonical spelling (the seed's); the
Postfix spelling ``inet:HOST:PORT`` that admins copy from ``main.cf`` is
accepted too, so a socket never fails at bind time over syntax that the
config check could have normalised.
"""

from __future__ import annotations

from typing import Any, Final

import attrs

from miltermonkey_core.config.values import HOST, Invalid, did_you_mean, port_number, show


@attrs.frozen
class Endpoint:
    """Where the daemon listens, parsed from a ``connection`` string."""

    family: str  # inet | inet6 | unix
    #: None for a unix socket, and for the seed's ``inet:PORT`` (every interface).
    host: str | None = None
    port: int | None = None
    path: str | None = None

    @property
    def unix_path(self) -> str:
        """The socket file of a unix endpoint ("" for the others)."""
        return self.path or ""

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
        raise Invalid(f'expected a socket like "inet:8890@127.0.0.1", got {show(value)}')
    text = value.strip()
    scheme, sep, rest = text.partition(":")
    scheme = scheme.lower()
    if not sep:
        if text.startswith("/"):
            raise Invalid(f"missing the socket type: write 'unix:{text}'")
        if text.isdigit():
            raise Invalid(f"missing the socket type: write 'inet:{text}@127.0.0.1'")
        raise Invalid(
            f"expected inet:PORT@HOST, inet6:PORT@HOST or unix:/path, got {show(value)}"
        )
    if scheme in ("unix", "local"):
        if not rest.startswith("/"):
            raise Invalid(f"the unix socket path must be absolute, got {rest!r}")
        return Endpoint("unix", path=rest)
    if scheme in ("tcp", "tcp4", "tcp6", "ip", "ipv4", "ipv6"):
        family = "inet6" if scheme.endswith("6") else "inet"
        try:
            suggestion = f" (write {parse_connection(f'{family}:{rest}').spec!r})"
        except Invalid:
            suggestion = " (write inet:PORT@HOST, inet6:PORT@HOST or unix:/path)"
        raise Invalid(f"{scheme!r} is not a milter socket type{suggestion}")
    if scheme not in ("inet", "inet4", "inet6"):
        raise Invalid(
            f"unknown socket type {scheme!r}; expected inet:PORT@HOST, inet6:PORT@HOST "
            f"or unix:/path{did_you_mean(scheme, _SCHEMES)}"
        )
    family = "inet6" if scheme == "inet6" else "inet"
    host: str | None
    if "@" in rest:  # libmilter: port@host
        port_text, host = rest.split("@", 1)
        host = host.removeprefix("[").removesuffix("]")
    elif rest.startswith("["):  # Postfix: [v6addr]:port
        host, sep, port_text = rest[1:].partition("]:")
        if not sep:
            raise Invalid(f"expected inet:[ADDRESS]:PORT, got {show(value)}")
    elif rest.count(":") == 1:  # Postfix: host:port
        host, port_text = rest.split(":")
    elif ":" in rest:
        raise Invalid(f"ambiguous IPv6 address: write inet6:PORT@ADDRESS, got {show(value)}")
    else:  # the seed's inet:6609: every interface
        port_text, host = rest, None
    if host is not None:
        if not host or not HOST.fullmatch(host):
            raise Invalid(f"bad host {host!r} in {show(value)}")
        if ":" in host:
            family = "inet6"
    return Endpoint(family, host=host, port=port_number(port_text.strip()))


def connection_spec(value: Any) -> str:
    return parse_connection(value).spec
