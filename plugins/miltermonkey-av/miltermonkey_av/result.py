"""The outcome of one scan, independent of which engine produced it."""

from __future__ import annotations

import enum

import attrs


class Status(enum.Enum):
    CLEAN = "clean"
    INFECTED = "infected"
    #: The engine refused the message as too large (clamd's "INSTREAM size
    #: limit exceeded").  Not clean: the brain applies ``oversize_action``.
    TOO_LARGE = "too-large"


@attrs.frozen
class ScanResult:
    """What an engine said about one message.

    ``engine`` names where the answer came from (``clamd unix:/run/...``,
    ``command /usr/bin/clamscan``) so log lines can be traced to one server.
    """

    status: Status
    viruses: tuple[str, ...] = ()
    engine: str = ""
    seconds: float = 0.0
    detail: str = ""

    @property
    def infected(self) -> bool:
        return self.status is Status.INFECTED

    @property
    def clean(self) -> bool:
        return self.status is Status.CLEAN

    @property
    def name(self) -> str:
        """The virus name(s) for replies and headers (``"unknown"`` if none was parsed)."""
        return ", ".join(self.viruses) if self.viruses else "unknown"
