"""The recording context: live header indexes, rollback, refusal of unnegotiated edits."""

from __future__ import annotations

import pytest

from miltermonkey_core.contract.context import MilterContext
from miltermonkey_core.contract.edits import (
    AddHeader,
    Capability,
    ChangeHeader,
    InsertHeader,
    safe_header_value,
)
from miltermonkey_core.contract.model import message_from_bytes
from miltermonkey_core.contract.verdict import Action

RAW = (b"Received: from a\r\nReceived: from b\r\nSubject: hi\r\n"
       b"X-Spam-Flag: YES\r\nX-Spam-Flag: YES\r\n\r\nbody\r\n")


def ctx_for(raw: bytes = RAW, allowed: frozenset[str] = Capability.ALL) -> MilterContext:
    return MilterContext(message_from_bytes(raw), allowed)


def names(ctx: MilterContext) -> list[tuple[str, str]]:
    return [(h.name, h.value) for h in ctx.headers]


def test_change_header_counts_headers_added_by_earlier_brains() -> None:
    ctx = ctx_for()
    ctx.begin("a")
    ctx.add_header("Received", "from c")
    ctx.end()
    ctx.begin("b")
    ctx.change_header("Received", "from C!", index=3)
    ctx.end()
    assert ctx.edits[-1] == ChangeHeader("Received", 3, "from C!", "b")
    assert names(ctx)[:2] == [("Received", "from a"), ("Received", "from b")]
    assert ("Received", "from C!") in names(ctx)


def test_delete_shifts_later_indexes_like_the_mta() -> None:
    ctx = ctx_for()
    ctx.begin("spam")
    assert ctx.delete_all("X-Spam-Flag") == 2
    ctx.end()
    # both deletions address index 1: after the first, the second copy is the first
    assert [e for e in ctx.edits if isinstance(e, ChangeHeader)] == [
        ChangeHeader("X-Spam-Flag", 1, None, "spam"),
        ChangeHeader("X-Spam-Flag", 1, None, "spam"),
    ]
    assert "X-Spam-Flag" not in ctx.headers


def test_replace_header_leaves_exactly_one() -> None:
    ctx = ctx_for()
    ctx.begin("spam")
    ctx.replace_header("X-Spam-Flag", "NO")
    ctx.end()
    assert ctx.headers.get_all("X-Spam-Flag") == ["NO"]
    assert ctx.edits == [ChangeHeader("X-Spam-Flag", 1, "NO", "spam"),
                         ChangeHeader("X-Spam-Flag", 2, None, "spam")]


def test_insert_header_top() -> None:
    ctx = ctx_for()
    ctx.begin("a")
    ctx.insert_header(0, "X-First", "1")
    ctx.end()
    assert names(ctx)[0] == ("X-First", "1")
    assert ctx.edits == [InsertHeader(0, "X-First", "1", "a")]


def test_rollback_restores_view_and_verdict() -> None:
    ctx = ctx_for()
    ctx.begin("good")
    ctx.add_header("X-Good", "1")
    ctx.end()
    before = names(ctx)
    ctx.begin("bad")
    ctx.add_header("X-Bad", "1")
    ctx.delete_header("Subject")
    ctx.reject(text="nope")
    undone = ctx.rollback()
    assert len(undone) == 2
    assert names(ctx) == before
    assert ctx.verdict is None
    assert ctx.edits == [AddHeader("X-Good", "1", "good")]


def test_unnegotiated_action_is_refused_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    ctx = ctx_for(allowed=frozenset({Capability.ADD_HEADERS}))
    ctx.begin("notify")
    ctx.replace_body(b"new body")
    ctx.change_header("Subject", "x")
    ctx.add_header("X-Ok", "1")
    ctx.end()
    assert [type(e).__name__ for e in ctx.edits] == ["AddHeader"]
    assert len(ctx.refused) == 2
    assert "change_body" in ctx.refused[0] and "'notify'" in ctx.refused[0]
    assert any("refused" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("evil", ["a\r\nBcc: victim@example.com", "a\nX-Injected: 1",
                                  "a\rX: 1", "a\x00b"])
def test_header_values_cannot_inject_headers(evil: str) -> None:
    v = safe_header_value(evil)
    for line in v.split("\n")[1:]:
        assert line[:1] in (" ", "\t")
    assert "\r" not in v and "\x00" not in v


def test_header_names_are_checked() -> None:
    ctx = ctx_for()
    with pytest.raises(ValueError):
        ctx.add_header("Bad Name", "x")
    with pytest.raises(ValueError):
        ctx.add_header("X-A:B", "x")


def test_verdict_methods_set_brain_and_finality() -> None:
    ctx = ctx_for()
    ctx.begin("av")
    ctx.tempfail(text="engine down")
    assert ctx.verdict is not None and ctx.verdict.brain == "av"
    assert ctx.final and ctx.action is Action.TEMPFAIL


def test_delete_where_records_live_indexes_in_one_pass() -> None:
    raw = b"".join(f"X-K: {i}\r\nOther: {i}\r\n".encode() for i in range(6)) + b"\r\nb\r\n"
    ctx = ctx_for(raw)
    ctx.begin("core")
    removed = ctx.delete_where("X-K", lambda h, n: n in (2, 3, 5))
    ctx.end()
    assert removed == 3
    assert ctx.headers.get_all("X-K") == ["0", "3", "5"]
    assert ctx.headers.get_all("Other") == [str(i) for i in range(6)]
    # live indexes: #2 (n=2), then n=3 has become #2, then n=5 is #3 after two removals
    assert [e.index for e in ctx.edits] == [2, 2, 3]


def test_delete_all_of_many_copies_always_deletes_the_first() -> None:
    raw = b"".join(b"X-Milter-Key: forged\r\n" for _ in range(10_000)) + b"\r\nbody\r\n"
    ctx = ctx_for(raw)
    ctx.begin("core")
    assert ctx.delete_all("X-Milter-Key") == 10_000
    assert len(ctx.edits) == 10_000 and all(e.index == 1 for e in ctx.edits)
    assert "X-Milter-Key" not in ctx.headers
