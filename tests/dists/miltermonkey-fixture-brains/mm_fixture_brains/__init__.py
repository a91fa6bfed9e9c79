"""Brains for MilterMonkey's tests: one that fails on demand, one that stamps, one that judges.

They are installed as a real distribution with entry points, so tests go
through discovery, config validation and the daemon exactly like a
third-party brain would.
"""

from __future__ import annotations

import time

import attrs

from miltermonkey_core import (
    Brain,
    Capability,
    Header,
    Message,
    MilterContext,
    Monkey,
    Needs,
    Verdict,
)
from miltermonkey_core.contract.hookspecs import hookimpl


@attrs.frozen(kw_only=True)
class FaultOptions:
    #: "raise" or "hang"
    fault: str = attrs.field(default="raise", validator=attrs.validators.in_(("raise", "hang")))
    #: Fail only when the Subject contains this (empty: always).
    when_subject: str = ""
    hang_seconds: float = 3600.0


class FaultBrain(Brain):
    """Raises (or hangs) in eom_process: failure policies are tested with it."""

    Options = FaultOptions
    needs = Needs(envelope=False, headers=True, body=False,
                  actions=frozenset({Capability.ADD_HEADERS}))

    @hookimpl
    def eom_process(self, message: Message, ctx: MilterContext, monkey: Monkey) -> None:
        subject = message.headers.get("Subject") or ""
        if self.options.when_subject and self.options.when_subject not in subject:
            ctx.add_header("X-Fault", "passed")
            return
        ctx.add_header("X-Fault", "half-done")  # must be rolled back
        if self.options.fault == "hang":
            monkey.log.warning("fault brain: hanging for %g s", self.options.hang_seconds)
            time.sleep(self.options.hang_seconds)
            return
        raise RuntimeError("fault brain failing on purpose")


@attrs.frozen(kw_only=True)
class StampOptions:
    header: str = "X-Stamp"
    value: str = "stamped"
    #: Also add ``X-Stamp-Client: <client address>`` (read at end of message).
    show_client: bool = False
    #: Ask for this macro at the DATA stage and add ``X-Stamp-Macro: <value>``.
    data_macro: str = ""


class StampBrain(Brain):
    """Adds a header with the brain's name: order and skipping are observed with it."""

    Options = StampOptions
    needs = Needs(envelope=True, headers=True, body=True,
                  actions=frozenset({Capability.ADD_HEADERS}))

    def __init__(self, options: StampOptions, monkey: Monkey, name: str | None = None) -> None:
        super().__init__(options, monkey, name)
        if options.data_macro:
            self.needs = attrs.evolve(self.needs, macros={"data": (options.data_macro,)})

    @hookimpl
    def eom_process(self, message: Message, ctx: MilterContext, monkey: Monkey) -> None:
        ctx.add_header(self.options.header, f"{self.name}:{self.options.value}")
        if self.options.show_client:
            ctx.add_header("X-Stamp-Client", message.connection.address or "-")
        if self.options.data_macro:
            ctx.add_header("X-Stamp-Macro", message.macros.get(self.options.data_macro, "-"))


@attrs.frozen(kw_only=True)
class GateOptions:
    #: Reject at EOM when the body contains this.
    reject_body: str = "REJECT-ME"
    #: Refuse recipients containing this at RCPT time.
    reject_rcpt: str = "refused"
    #: Skip the rest of the message when a header has this name.
    skip_header: str = "X-Gate-Skip"


class GateBrain(Brain):
    """Gives verdicts at RCPT, per header and at EOM."""

    Options = GateOptions

    @hookimpl
    def envrcpt(self, message: Message, recipient: object, monkey: Monkey) -> Verdict | None:
        addr = getattr(recipient, "address", "")
        if self.options.reject_rcpt and self.options.reject_rcpt in addr:
            return Verdict.reject(550, "5.1.1", f"recipient {addr} refused by gate")
        return None

    @hookimpl
    def header(self, message: Message, header: Header, monkey: Monkey) -> Verdict | None:
        if header.matches(self.options.skip_header):
            return Verdict.skip("gate told to skip")
        return None

    @hookimpl
    def eom_process(self, message: Message, ctx: MilterContext, monkey: Monkey) -> None:
        if self.options.reject_body.encode() in message.body.read():
            ctx.reject(550, "5.7.1", "gate: body matched")
