"""The milter context as one guarded brain call sees it.

A Python thread cannot be killed, so a brain that overran its timeout keeps
running on its worker thread.  What it writes after the chain stopped
waiting for it must not reach a message that has moved on: the guard
refuses it (:class:`BrainAbandoned`), under the chain's lock so the refusal
and the chain's rollback never interleave.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

from miltermonkey_core.contract.context import MilterContext


class BrainAbandoned(RuntimeError):
    """A brain wrote to its context after the chain stopped waiting for it."""


class GuardedContext:
    """The context as one brain call sees it, until the chain stops waiting for it.

    Every method call goes to the message's :class:`MilterContext` under the
    chain's lock; once :meth:`revoke` ran (the brain returned, raised or
    timed out) any further use raises :class:`BrainAbandoned`, so a brain
    still running on an abandoned thread cannot edit a message that moved on.
    """

    __slots__ = ("_brain", "_ctx", "_live", "_lock")

    def __init__(self, ctx: MilterContext, brain: str, lock: AbstractContextManager[Any]) -> None:
        object.__setattr__(self, "_ctx", ctx)
        object.__setattr__(self, "_brain", brain)
        object.__setattr__(self, "_lock", lock)
        object.__setattr__(self, "_live", True)

    def revoke(self) -> None:
        with self._lock:
            object.__setattr__(self, "_live", False)

    def _refuse(self, name: str) -> BrainAbandoned:
        return BrainAbandoned(f"brain {self._brain!r} used ctx.{name} after the chain stopped "
                              "waiting for it (timeout); the call is refused")

    def __getattr__(self, name: str) -> Any:
        if not self._live:
            raise self._refuse(name)
        value = getattr(self._ctx, name)
        if not callable(value):
            return value
        lock = self._lock

        def guarded(*args: Any, **kwargs: Any) -> Any:
            with lock:
                if not self._live:
                    raise self._refuse(name)
                return value(*args, **kwargs)

        return guarded

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"the milter context has no settable attribute {name!r}")

    def __repr__(self) -> str:
        return f"<GuardedContext of {self._brain} {'live' if self._live else 'revoked'}>"
