"""What a brain did to a message, recorded as calls on its context and replayed later.

The scan cache and overlapping brains both need a brain's result as a value:
the cache to replay it on the same content later (a retry, a second
recipient, another host), overlap to apply, in config order, what brains
that ran at the same time decided.  Recording the calls a brain makes on its
context (``replace_header("X-Virus-Status", "Clean")``, ``reject(550, ...)``)
rather than the edits they produced keeps the replay right against whatever
the message looks like when it is replayed: header positions are worked out
again by the context, as if the brain had just run.

Only calls whose arguments are plain values replay; a brain that defers work
(``after_accept``), says it did not judge the message (``unchecked``), hands
over a file, or uses anything else makes its result not replayable, and it is
simply not cached.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterable
from typing import Any, Final

from miltermonkey_core.contract.context import MilterContext

#: Context calls a cached or overlapped result may contain.
REPLAYABLE: Final = frozenset({
    "add_header", "insert_header", "change_header", "delete_header", "delete_all",
    "replace_header", "replace_body", "add_rcpt", "del_rcpt", "change_from", "quarantine",
    "accept", "reject", "tempfail", "discard",
})
#: Context attributes that only read.
_READERS: Final = frozenset({"headers", "recipients", "verdict", "message", "allowed", "final",
                             "action", "brain", "edits", "refused", "quarantine_request",
                             "unchecked_brains", "after_accept_jobs", "summary"})

Call = tuple[str, tuple[Any, ...], dict[str, Any]]


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, bool | int | float | str | bytes):
        return True
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    return False


class RecordingContext:
    """The context as one brain call sees it, keeping a journal of what it did.

    Every call goes through to the real context; the replayable ones are
    journalled, and anything else (or arguments that are not plain values)
    marks the journal as not replayable.
    """

    __slots__ = ("_ctx", "calls", "everything", "replayable")

    def __init__(self, ctx: Any) -> None:
        object.__setattr__(self, "_ctx", ctx)
        #: The replayable calls (what the scan cache keeps).
        object.__setattr__(self, "calls", [])
        #: Every call that changes the context, replayable or not (what overlap replays).
        object.__setattr__(self, "everything", [])
        object.__setattr__(self, "replayable", True)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._ctx, name)
        if name in _READERS or not callable(value):
            return value
        calls: list[Call] = self.calls
        everything: list[Call] = self.everything

        def recorded(*args: Any, **kwargs: Any) -> Any:
            everything.append((name, args, dict(kwargs)))
            if name in REPLAYABLE and _plain(args) and _plain(list(kwargs.values())):
                calls.append((name, args, dict(kwargs)))
            else:
                object.__setattr__(self, "replayable", False)
            return value(*args, **kwargs)

        return recorded

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"the milter context has no settable attribute {name!r}")


def replay(calls: Iterable[Call], ctx: MilterContext) -> None:
    """Make the same calls on ``ctx`` (the brain speaking must already be begun)."""
    for name, args, kwargs in calls:
        if name not in REPLAYABLE:
            raise ValueError(f"{name!r} cannot be replayed")
        method: Callable[..., Any] = getattr(ctx, name)
        method(*args, **kwargs)


def _encode(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"b64"}:
        return base64.b64decode(value["b64"])
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def dump_calls(calls: Iterable[Call]) -> bytes:
    """The journal as compact JSON (bytes arguments base64-encoded)."""
    return json.dumps([[n, _encode(list(a)), {k: _encode(v) for k, v in kw.items()}]
                       for n, a, kw in calls], separators=(",", ":")).encode()


def load_calls(data: bytes) -> list[Call]:
    """A journal from :func:`dump_calls`; raises ValueError on anything else."""
    raw = json.loads(data)
    if not isinstance(raw, list):
        raise ValueError("a cached journal is a list")
    out: list[Call] = []
    for item in raw:
        if (not isinstance(item, list) or len(item) != 3 or item[0] not in REPLAYABLE
                or not isinstance(item[1], list) or not isinstance(item[2], dict)):
            raise ValueError(f"not a replayable call: {item!r:.80}")
        out.append((item[0], tuple(_decode(a) for a in item[1]),
                    {str(k): _decode(v) for k, v in item[2].items()}))
    return out
