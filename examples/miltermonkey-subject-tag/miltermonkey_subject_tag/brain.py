"""The subject_tag brain: ``[EXTERNAL]`` in front of the subject of mail from outside.

Mail counts as internal only when every address that says where it comes
from is in one of your domains: the envelope sender (MAIL FROM) and, with
``check_from_header`` (the default), each address of the From: header.  A
forged ``From: ceo@example.com`` on mail from outside is what users most
need warning about, so it is tagged.  A bounce (the null sender ``<>``) is
judged on its From: header alone.

The brain only computes (no network, no files), so it is declared
non-blocking and the daemon runs it on the connection's own thread.
"""

from __future__ import annotations

import re
from email.utils import getaddresses

import attrs
from miltermonkey_core import (
    Brain,
    Capability,
    Message,
    MilterContext,
    Monkey,
    Needs,
    hookimpl,
)

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DOMAIN = re.compile(rf"(?:\*\.)?{_LABEL}(?:\.{_LABEL})*")


# Converters raise ValueError or TypeError only: `miltermonkey check-config`
# reports those with the file, the line and the option's name.


def _tag(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected the tag as a string, got {value!r}")
    tag = value.strip()
    if not tag:
        raise ValueError("the tag must not be empty")
    if any(c in tag for c in "\r\n\x00"):
        raise ValueError(f"the tag must be one line: {value!r}")
    return tag


def _domains(value: object) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise TypeError(f"expected a list of domains, got {value!r}")
    domains = []
    for item in value:
        if not isinstance(item, str):
            raise TypeError(f"expected a domain as a string, got {item!r}")
        domain = item.strip().lower().rstrip(".")
        if not _DOMAIN.fullmatch(domain):
            raise ValueError(f"{item!r} is not a domain (write example.com, or *.example.com "
                             "for its subdomains)")
        domains.append(domain)
    return tuple(dict.fromkeys(domains))


def _bool(_instance: object, attribute: attrs.Attribute[bool], value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{attribute.name}: expected true or false, got {value!r}")


def domain_of(address: str) -> str | None:
    """The domain of ``local@domain``, lowercased; None for an address without one."""
    _local, at, domain = address.rpartition("@")
    domain = domain.strip().lower().rstrip(".")
    return domain if at and domain else None


@attrs.frozen(kw_only=True)
class SubjectTagOptions:
    """The options of a ``[[brain]] use = "subject_tag"`` table."""

    #: Put in front of the subject of mail from outside.
    tag: str = attrs.field(default="[EXTERNAL]", converter=_tag)
    #: Your domains: ``example.com`` is that domain, ``*.example.com`` its
    #: subdomains.  With none, every message is tagged.
    internal_domains: tuple[str, ...] = attrs.field(default=(), converter=_domains)
    #: Internal mail must also have only internal addresses in From:
    #: (false: the envelope sender alone decides).
    check_from_header: bool = attrs.field(default=True, validator=_bool)

    def is_internal(self, address: str) -> bool:
        domain = domain_of(address)
        if domain is None:
            return False
        for pattern in self.internal_domains:
            if pattern.startswith("*."):
                if domain.endswith(pattern[1:]):
                    return True
            elif domain == pattern:
                return True
        return False


class SubjectTagBrain(Brain):
    """Tags the subject of mail from outside your domains."""

    Options = SubjectTagOptions
    needs = Needs(envelope=True, headers=True, body=False, connection=False,
                  actions=frozenset({Capability.CHANGE_HEADERS, Capability.ADD_HEADERS}))
    description = "tags the subject of mail from outside your domains ([EXTERNAL])"
    blocking = False

    def __init__(self, options: SubjectTagOptions, monkey: Monkey,
                 name: str | None = None) -> None:
        super().__init__(options, monkey, name)
        self.tag_folded = options.tag.casefold()

    def outside_address(self, message: Message, ctx: MilterContext) -> str | None:
        """The first address that makes the message external; None for internal mail."""
        claims: list[str] = []
        sender = message.envelope.sender
        if sender is not None and sender.bare:
            claims.append(sender.bare)
        if self.options.check_from_header or not claims:
            from_addresses = [a for _name, a in getaddresses(ctx.headers.get_all("From")) if a]
            if not from_addresses:
                return "(no From: address)"
            claims += from_addresses
        for address in claims:
            if not self.options.is_internal(address):
                return address
        return None

    @hookimpl
    def eom_process(self, message: Message, ctx: MilterContext, monkey: Monkey) -> None:
        outside = self.outside_address(message, ctx)
        if outside is None:
            monkey.log(60, "internal mail: subject left alone")
            return
        subject = ctx.headers.get("Subject")
        if subject is None:
            ctx.add_header("Subject", self.options.tag)
        elif self.tag_folded in subject.casefold():
            monkey.log(60, "from %s, already tagged", outside)
            return
        else:
            ctx.change_header("Subject", f"{self.options.tag} {subject.lstrip()}".rstrip())
        monkey.log(50, "tagged: from %s", outside)
