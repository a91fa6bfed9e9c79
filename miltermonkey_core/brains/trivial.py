"""The trivial brain: adds one header to every message and nothing else.

The seed's "milter that doesn't actually do very much".  It proves the
pipeline end to end and is the floor of the framework's overhead in
benchmarks: it needs neither the connection, the envelope, the headers nor
the body, so the daemon negotiates all of those away and the MTA does not
send them.
"""

from __future__ import annotations

import attrs

from miltermonkey_core import (
    Brain,
    Capability,
    Message,
    MilterContext,
    Monkey,
    Needs,
    check_header_name,
    hookimpl,
)


def _header_name(_inst: object, _attr: attrs.Attribute[str], value: str) -> None:
    check_header_name(value)


@attrs.frozen(kw_only=True)
class TrivialOptions:
    #: Name of the header added to every message.
    header_name: str = attrs.field(default="X-MilterMonkey", validator=_header_name)
    #: Its value; ``{brain}`` and ``{host}`` are replaced.
    header_value: str = attrs.field(default="{brain} on {host}",
                                    validator=attrs.validators.instance_of(str))


class TrivialBrain(Brain):
    """Adds one header to every message."""

    Options = TrivialOptions
    needs = Needs(envelope=False, headers=False, body=False, connection=False,
                  actions=frozenset({Capability.ADD_HEADERS}))
    description = "adds one header to every message (pipeline check, benchmark floor)"
    blocking = False

    def __init__(self, options: TrivialOptions, monkey: Monkey, name: str | None = None) -> None:
        super().__init__(options, monkey, name)
        self.value = options.header_value.replace("{brain}", self.name).replace(
            "{host}", monkey.hostname)

    @hookimpl
    def eom_process(self, message: Message, ctx: MilterContext, monkey: Monkey) -> None:
        ctx.add_header(self.options.header_name, self.value)
