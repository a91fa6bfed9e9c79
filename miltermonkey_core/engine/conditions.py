"""A brain's ``when`` conditions, checked before each call of the brain.

A condition is decided as soon as what it reads is known, and until then
the brain is called: the client address from the connect step, the sender
and authentication from MAIL FROM, the recipients once the message's
content starts, the size, the macros still missing and the milter key at
end of message.  A brain whose condition fails is not called again for the
message and is counted as skipped with the condition's name as the reason
(``condition:client_not_in``): a bounded set, fit for a metric label.

What a condition reads is asked of the MTA: the conditions' :meth:`needs`
joins the brains' own in negotiation (``{auth_authen}`` for
``authenticated``, the connect step for client networks, the envelope for
domains, the body for sizes, the named macros).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from typing import Final

import attrs

from miltermonkey_core.config.conditions import Network, When
from miltermonkey_core.contract.brain import Needs
from miltermonkey_core.contract.model import Address, Connection, Message

#: The order in which what conditions read becomes known.
STAGES: Final[Mapping[str, int]] = {
    "connect": 0, "helo": 1, "envfrom": 2, "envrcpt": 3, "header": 4, "eoh": 4, "body": 4,
    "eom": 5,
}
_MACRO_STAGES: Final = ("connect", "envfrom", "eom")

#: A condition: True holds, False fails, None not known yet (the brain is called).
Check = Callable[[Connection, Message | None], bool | None]


def _domain(address: Address | str | None) -> str:
    """The domain of an address ("" for the null sender, or none at all)."""
    if address is None:
        return ""
    bare = address.bare if isinstance(address, Address) else address
    return bare.rpartition("@")[2].lower().rstrip(".")


def domain_matches(domain: str, patterns: tuple[str, ...]) -> bool:
    """``example.com`` matches itself; ``*.example.com`` matches its subdomains."""
    for p in patterns:
        if p.startswith("*."):
            if domain.endswith(p[1:]):
                return True
        elif domain == p:
            return True
    return False


def _address_in(connection: Connection, networks: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(connection.address or "")
    except ValueError:  # a unix socket, or no connect step: in no network
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in n for n in networks)


def _macro(connection: Connection, message: Message | None, name: str) -> str | None:
    if message is not None and name in message.macros:
        return message.macros[name]
    return connection.macros.get(name)


@attrs.define
class Conditions:
    """The compiled ``when`` of one brain."""

    when: When
    checks: list[tuple[str, int, Check]] = attrs.field(factory=list)

    def __attrs_post_init__(self) -> None:
        w = self.when
        add = self.checks.append
        if w.authenticated is not None:
            want = w.authenticated
            add(("authenticated", STAGES["envfrom"],
                 lambda c, m: bool(_macro(c, m, "{auth_authen}")) == want))
        if w.client_in:
            nets_in = w.client_in
            add(("client_in", STAGES["connect"], lambda c, m: _address_in(c, nets_in)))
        if w.client_not_in:
            nets_out = w.client_not_in
            add(("client_not_in", STAGES["connect"], lambda c, m: not _address_in(c, nets_out)))
        if w.sender_domain:
            sd = w.sender_domain
            add(("sender_domain", STAGES["envfrom"],
                 lambda c, m: m is None or domain_matches(_domain(m.envelope.sender), sd)))
        if w.sender_domain_not:
            sdn = w.sender_domain_not
            add(("sender_domain_not", STAGES["envfrom"],
                 lambda c, m: m is None or not domain_matches(_domain(m.envelope.sender), sdn)))
        if w.recipient_domain:
            rd = w.recipient_domain
            add(("recipient_domain", STAGES["header"],
                 lambda c, m: m is None or any(domain_matches(_domain(r), rd)
                                               for r in m.envelope.recipients)))
        if w.recipient_domain_not:
            rdn = w.recipient_domain_not
            add(("recipient_domain_not", STAGES["header"],
                 lambda c, m: m is None or not any(domain_matches(_domain(r), rdn)
                                                   for r in m.envelope.recipients)))
        if w.size_min is not None:
            lo = w.size_min
            add(("size_min", STAGES["eom"], lambda c, m: m is None or m.size >= lo))
        if w.size_max is not None:
            hi = w.size_max
            add(("size_max", STAGES["eom"], lambda c, m: m is None or m.size <= hi))
        for name, pattern in w.macro:
            def check(c: Connection, m: Message | None, name: str = name,
                      pattern: re.Pattern[str] = pattern) -> bool | None:
                value = _macro(c, m, name)
                if value is None:
                    return None
                return bool(pattern.search(value))

            add(("macro", STAGES["connect"], check))
        if w.key_ran:
            ran = w.key_ran
            add(("key_ran", STAGES["eom"],
                 lambda c, m: m is None or all(_key_says(m, b) for b in ran)))
        if w.unless_key_ran:
            not_ran = w.unless_key_ran
            add(("unless_key_ran", STAGES["eom"],
                 lambda c, m: m is None or not any(_key_says(m, b) for b in not_ran)))

    def failing(self, stage: str, connection: Connection, message: Message | None
                ) -> str | None:
        """The reason the brain must not be called at ``stage``, or None.

        At end of message every condition is decided: one whose value never
        came (a macro the MTA did not send) fails.
        """
        now = STAGES[stage]
        final = stage == "eom"
        for kind, known_from, check in self.checks:
            if now < known_from:
                continue
            held = check(connection, message)
            if held is False or (held is None and final):
                return f"condition:{kind}"
        return None

    def needs(self) -> Needs:
        """What the MTA must send for these conditions to be decided."""
        w = self.when
        macros: dict[str, tuple[str, ...]] = {}
        if w.authenticated is not None:
            macros["envfrom"] = ("{auth_authen}",)
        names = tuple(name for name, _ in w.macro)
        for stage in _MACRO_STAGES if names else ():
            macros[stage] = (*macros.get(stage, ()), *names)
        return attrs.evolve(
            Needs.nothing(),
            connection=bool(w.client_in or w.client_not_in or names),
            envelope=bool(w.authenticated is not None or w.sender_domain
                          or w.sender_domain_not or w.recipient_domain
                          or w.recipient_domain_not),
            body=w.size_min is not None or w.size_max is not None,
            macros=macros,
        )


def _key_says(message: Message, brain: str) -> bool:
    inspection = message.notes.get("_mm_key")
    return bool(inspection is not None and inspection.says_ran(brain))


def compile_conditions(when: When) -> Conditions | None:
    """None for a brain without conditions, so it costs nothing per call."""
    return None if when.empty else Conditions(when)
