"""The outcome of one scan, independent of which engine produced it."""

from __future__ import annotations

import enum

import attrs

#: How ClamAV names content it stopped looking at (``AlertExceedsMax``):
#: ``Heuristics.Limits.Exceeded.MaxRecursion``, ``.MaxFiles``, ``.MaxScanSize``...
LIMITS_PREFIX = "Heuristics.Limits.Exceeded"


def is_limits_name(name: str) -> bool:
    """True for a "virus" name that only says the engine gave up before the end."""
    return name.startswith(LIMITS_PREFIX)


class Status(enum.Enum):
    CLEAN = "clean"
    INFECTED = "infected"
    #: The engine refused the message as too large (clamd's "INSTREAM size
    #: limit exceeded").  Not clean: the brain applies ``oversize_action``.
    TOO_LARGE = "too-large"
    #: The engine stopped before the end of the message, at one of its limits
    #: (``Heuristics.Limits.Exceeded.*``).  Not clean: ``limits_action`` applies.
    LIMITS = "limits"


def classify_found(names: tuple[str, ...]) -> tuple[Status, tuple[str, ...]]:
    """The status of a scan that reported ``names``, and the names that matter.

    A real detection wins over a limits alert (with clamd's AllMatchScan
    both can come back); limits alerts alone mean "not looked at", never
    "infected" and never "clean".
    """
    real = tuple(n for n in names if not is_limits_name(n))
    if real or not names:
        return Status.INFECTED, real
    return Status.LIMITS, names


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
    def limits(self) -> bool:
        return self.status is Status.LIMITS

    @property
    def name(self) -> str:
        """The virus name(s) for replies and headers (``"unknown"`` if none was parsed)."""
        return ", ".join(self.viruses) if self.viruses else "unknown"
