"""Two brains for the milter key tests: each stamps the message with where it ran.

``keytest-a`` adds ``X-Keytest-A: NAME@HOST`` and ``keytest-b`` adds
``X-Keytest-B: NAME@HOST``, where HOST is the daemon's ``hostname``; each also
says whether a trusted milter key claimed it had already run
(``key-says-ran=yes|no``).  Which hop ran which brain is then read off the
delivered message.  They are installed as a real distribution so the daemon
finds them through entry points like any third-party brain.
"""

from __future__ import annotations

from typing import ClassVar

from miltermonkey_core import Brain, Capability, Message, MilterContext, Monkey, Needs
from miltermonkey_core.contract.hookspecs import hookimpl


class _Stamp(Brain):
    header: ClassVar[str] = "X-Keytest"
    needs = Needs(envelope=False, headers=True, body=True,
                  actions=frozenset({Capability.ADD_HEADERS}))

    @hookimpl
    def eom_process(self, message: Message, ctx: MilterContext, monkey: Monkey) -> None:
        said = "yes" if monkey.key_says_ran(message) else "no"
        ctx.add_header(self.header, f"{self.name}@{monkey.hostname} key-says-ran={said}")


class KeyTestA(_Stamp):
    """Adds X-Keytest-A naming the brain and the host it ran on."""

    header = "X-Keytest-A"


class KeyTestB(_Stamp):
    """Adds X-Keytest-B naming the brain and the host it ran on."""

    header = "X-Keytest-B"
