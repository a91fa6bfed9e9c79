"""The state one structure walk shares across streams, and the piece that tells content apart.

:mod:`miltermonkey_av.mime_limits` explains the walk; this module holds what
every stream of it uses: the limits and counters (:class:`Walk`), the sink
interface content is fed through, and :class:`Sniff`, which holds the first
bytes of some content until it is known what they are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Literal, Protocol

import attrs

__all__ = ["DISCARD", "Classifier", "Exceeded", "LimitReached", "Sink", "Sniff", "Structure",
           "Walk"]

#: Decoded bytes looked at to tell a message, an archive or neither.
SNIFF_BYTES: Final = 2048
#: Bytes inflated of one compressed member, only to see what it starts with.
INFLATE_PREFIX: Final = 16 * 1024
#: Bytes inflated for one message in all; past it members are not looked into.
INFLATE_BUDGET: Final = 16 * 1024 * 1024
#: Archive members read for one message in all (clamd's default MaxFiles);
#: past it the walk stops reading archives, so a zip of a million empty
#: files costs no more than this many headers.
MEMBER_BUDGET: Final = 10_000

Limit = Literal["depth", "parts", "header", "size"]


@attrs.frozen
class Exceeded:
    """Which limit a message passed, and a line for the log and the reply."""

    limit: Limit
    detail: str


@attrs.frozen
class Structure:
    """What the walk saw: the deepest level, the part count, archives, and a limit passed."""

    depth: int
    parts: int
    archives: int
    #: Archive members read (at most :data:`MEMBER_BUDGET`).
    members: int
    exceeded: Exceeded | None

    @property
    def within_limits(self) -> bool:
        return self.exceeded is None


class Sink(Protocol):
    """Where content is fed, piece by piece, then closed."""

    def feed(self, data: bytes) -> None: ...

    def close(self) -> None: ...


#: Decides where content goes from its first bytes: ``(walk, depth, is_part, head)``.
Classifier = Callable[["Walk", int, bool, bytes], Sink]


class LimitReached(Exception):
    """Raised from deep inside the walk to stop it at once; :func:`inspect` catches it."""

    def __init__(self, exceeded: Exceeded) -> None:
        super().__init__(exceeded.detail)
        self.exceeded = exceeded


class Walk:
    """Counters and limits shared by every stream of one message."""

    def __init__(self, max_depth: int, max_parts: int, max_member_size: int,
                 classify: Classifier) -> None:
        self.classify = classify
        self.max_depth = max_depth
        self.max_parts = max_parts
        self.max_member_size = max_member_size
        self.depth = 0
        self.parts = 0
        self.archives = 0
        self.inflate_left = INFLATE_BUDGET
        self.members_left = MEMBER_BUDGET

    def structure(self, exceeded: Exceeded | None) -> Structure:
        return Structure(self.depth, self.parts, self.archives,
                         MEMBER_BUDGET - self.members_left, exceeded)

    def reach(self, depth: int, what: str) -> None:
        if depth <= self.depth:
            return
        self.depth = depth
        if depth > self.max_depth:
            raise LimitReached(Exceeded(
                "depth", f"{what} at nesting depth {depth}, deeper than max_mime_depth "
                         f"{self.max_depth}"))

    def part(self, depth: int) -> None:
        self.parts += 1
        if self.parts > self.max_parts:
            raise LimitReached(Exceeded(
                "parts", f"more than max_mime_parts {self.max_parts} MIME parts"))
        self.reach(depth, "a MIME part")

    def member(self, depth: int, kind: str) -> bool:
        """One more archive member at ``depth``; False once the member budget is spent."""
        if self.members_left <= 0:
            return False
        self.members_left -= 1
        self.reach(depth, f"a {kind} member")
        return True

    def unpacked(self, size: int, what: str) -> None:
        """An archive member that unpacks to ``size`` bytes, by its archive's own word."""
        if self.max_member_size and size > self.max_member_size:
            raise LimitReached(Exceeded(
                "size", f"{what} of {size} bytes unpacked, over max_scan_size "
                        f"{self.max_member_size}"))

    def archive(self, depth: int, kind: str) -> None:
        """An archive whose members sit at ``depth``."""
        self.archives += 1
        self.reach(depth, f"a {kind} member")


class Discard:
    """Content nobody needs to look at further."""

    def feed(self, data: bytes) -> None:
        """Dropped."""

    def close(self) -> None:
        """Nothing held."""


DISCARD: Final = Discard()


class Sniff:
    """Holds the first :data:`SNIFF_BYTES` of some content, then hands it all on."""

    def __init__(self, walk: Walk, depth: int, *, is_part: bool) -> None:
        self.walk = walk
        self.depth = depth
        self.is_part = is_part
        self.head = bytearray()
        self.target: Sink | None = None

    @property
    def discarding(self) -> bool:
        return self.target is DISCARD

    def feed(self, data: bytes) -> None:
        if self.target is not None:
            self.target.feed(data)
            return
        self.head += data
        if len(self.head) >= SNIFF_BYTES:
            self._decide()

    def close(self) -> None:
        if self.target is None:
            self._decide()
        assert self.target is not None
        self.target.close()

    def _decide(self) -> None:
        head = bytes(self.head)
        self.head = bytearray()
        self.target = self.walk.classify(self.walk, self.depth, self.is_part, head)
        self.target.feed(head)
