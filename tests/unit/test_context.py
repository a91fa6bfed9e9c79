"""The recording context: live header indexes, rollback, refusal of unnegotiated edits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from miltermonkey_core.contract.context import MilterContext
from miltermonkey_core.contract.edits import (
    AddHeader,
    AddRcpt,
    Capability,
    ChangeFrom,
    ChangeHeader,
    DelRcpt,
    InsertHeader,
    Quarantine,
    ReplaceBody,
    safe_header_value,
)
from miltermonkey_core.contract.model import message_from_bytes
from miltermonkey_core.contract.verdict import Action, Verdict

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


# --- every header edit checks the name and cleans the value ------------------------------

EVIL_VALUES = ["a\r\nBcc: victim@example.com", "a\nX-Injected: 1", "a\rX: 1", "a\x00b",
               "ok\r\n\r\nbody: injected"]
BAD_NAMES = ["Bad Name", "X-A:B", "", "X\r\nBcc", "Caf\xe9", "X-Tab\t"]


def _edit_with(ctx: MilterContext, how: str, name: str, value: str) -> None:
    if how == "add":
        ctx.add_header(name, value)
    elif how == "insert":
        ctx.insert_header(1, name, value)
    elif how == "change":
        ctx.change_header(name, value)
    else:
        ctx.replace_header(name, value)


@pytest.mark.parametrize("how", ["add", "insert", "change", "replace"])
@pytest.mark.parametrize("evil", EVIL_VALUES)
def test_no_header_edit_lets_a_value_start_a_new_header(how: str, evil: str) -> None:
    ctx = ctx_for()
    ctx.begin("b")
    _edit_with(ctx, how, "X-Evil", evil)
    ctx.end()
    recorded = [e.value for e in ctx.edits if isinstance(e, AddHeader | InsertHeader |
                                                         ChangeHeader)]
    seen = ctx.headers.get_all("X-Evil")
    assert len(recorded) == len(seen) == 1
    for value in [*recorded, *seen]:
        assert value is not None and value == safe_header_value(evil)
        assert "\r" not in value and "\x00" not in value
        assert all(line[:1] in (" ", "\t") for line in value.split("\n")[1:]), value


@pytest.mark.parametrize("how", ["add", "insert", "change", "replace", "delete"])
@pytest.mark.parametrize("name", BAD_NAMES)
def test_no_header_edit_takes_an_invalid_name(how: str, name: str) -> None:
    ctx = ctx_for()
    ctx.begin("b")
    with pytest.raises(ValueError, match="invalid header name"):
        if how == "delete":
            ctx.delete_header(name)
        else:
            _edit_with(ctx, how, name, "x")
    assert ctx.edits == []
    assert names(ctx) == names(ctx_for())


def test_safe_header_value_keeps_folding_and_trims() -> None:
    assert safe_header_value("plain  ") == "plain"
    assert safe_header_value("a\r\n\tb") == "a\n\tb"
    assert safe_header_value("a\n b\n") == "a\n b"
    assert safe_header_value("a\nb\rc") == "a\n\tb\n\tc"
    assert safe_header_value("\x00") == ""


# --- which copy an index means ---------------------------------------------------------------

THREE = (b"X-Tag: one\r\nSubject: s\r\nX-Tag: two\r\nX-Other: o\r\nX-Tag: three\r\n"
         b"\r\nbody\r\n")


def tags(ctx: MilterContext) -> list[str]:
    return ctx.headers.get_all("X-Tag")


def test_change_header_index_picks_that_copy() -> None:
    for index, expected in ((1, ["new", "two", "three"]), (2, ["one", "new", "three"]),
                            (3, ["one", "two", "new"])):
        ctx = ctx_for(THREE)
        ctx.begin("b")
        ctx.change_header("x-tag", "new", index=index)
        assert tags(ctx) == expected
        # the name keeps the spelling the message had
        assert [h.name for h in ctx.headers if h.matches("X-Tag")] == ["X-Tag"] * 3
        assert ctx.edits == [ChangeHeader("x-tag", index, "new", "b")]


def test_change_header_default_is_the_first_copy() -> None:
    ctx = ctx_for(THREE)
    ctx.change_header("X-Tag", "new")
    assert tags(ctx) == ["new", "two", "three"]
    assert ctx.edits == [ChangeHeader("X-Tag", 1, "new", "core")]


def test_change_header_past_the_last_copy_appends() -> None:
    ctx = ctx_for(THREE)
    ctx.change_header("X-Tag", "four", index=7)
    assert tags(ctx) == ["one", "two", "three", "four"]
    assert names(ctx)[-1] == ("X-Tag", "four")
    assert ctx.edits == [ChangeHeader("X-Tag", 7, "four", "core")]
    ctx.change_header("X-New", "v")
    assert names(ctx)[-1] == ("X-New", "v")


def test_change_header_index_below_one_is_an_error() -> None:
    ctx = ctx_for(THREE)
    for index in (0, -1):
        with pytest.raises(ValueError, match=r"^header index is 1-based$"):
            ctx.change_header("X-Tag", "x", index=index)
    assert ctx.edits == [] and tags(ctx) == ["one", "two", "three"]


def test_delete_header_removes_that_copy_only() -> None:
    for index, left in ((1, ["two", "three"]), (2, ["one", "three"]), (3, ["one", "two"])):
        ctx = ctx_for(THREE)
        ctx.begin("b")
        ctx.delete_header("X-TAG", index)
        assert tags(ctx) == left
        assert ctx.edits == [ChangeHeader("X-TAG", index, None, "b")]
    ctx = ctx_for(THREE)
    ctx.delete_header("X-Tag")
    assert tags(ctx) == ["two", "three"]


def test_delete_header_out_of_range_is_a_no_op() -> None:
    ctx = ctx_for(THREE)
    for index in (0, -1, 4, 100):
        ctx.delete_header("X-Tag", index)
    ctx.delete_header("X-Absent")
    assert ctx.edits == [] and tags(ctx) == ["one", "two", "three"]


def test_insert_header_positions() -> None:
    ctx = ctx_for(THREE)
    ctx.insert_header(2, "X-Mid", "m")
    ctx.insert_header(-5, "X-Top", "t")
    ctx.insert_header(999, "X-End", "e")
    assert names(ctx)[0] == ("X-Top", "t")
    assert names(ctx)[3] == ("X-Mid", "m")
    assert names(ctx)[-1] == ("X-End", "e")
    assert ctx.edits == [InsertHeader(2, "X-Mid", "m", "core"),
                         InsertHeader(0, "X-Top", "t", "core"),
                         InsertHeader(7, "X-End", "e", "core")]


def test_replace_header_removes_every_other_copy() -> None:
    ctx = ctx_for(THREE)
    ctx.replace_header("X-Tag", "only")
    assert tags(ctx) == ["only"]
    assert ctx.edits == [ChangeHeader("X-Tag", 1, "only", "core"),
                         ChangeHeader("X-Tag", 2, None, "core"),
                         ChangeHeader("X-Tag", 2, None, "core")]
    ctx = ctx_for(THREE)
    ctx.replace_header("X-Absent", "new")
    assert ctx.edits == [AddHeader("X-Absent", "new", "core")]
    assert names(ctx)[-1] == ("X-Absent", "new")


# --- refusal of what the MTA did not negotiate ----------------------------------------------


def _refused(ctx: MilterContext) -> list[str]:
    return list(ctx.refused)


@pytest.mark.parametrize(("capability", "call", "what"), [
    (Capability.ADD_RCPT, lambda c: c.add_rcpt("<x@example.org>"), "add_rcpt(<x@example.org>)"),
    (Capability.ADD_RCPT_PAR, lambda c: c.add_rcpt("<x@example.org>", "NOTIFY=NEVER"),
     "add_rcpt(<x@example.org>)"),
    (Capability.DEL_RCPT, lambda c: c.del_rcpt("<b@example.net>"), "del_rcpt(<b@example.net>)"),
    (Capability.CHANGE_FROM, lambda c: c.change_from("<new@example.org>"),
     "change_from(<new@example.org>)"),
    (Capability.QUARANTINE, lambda c: c.quarantine("held"), "quarantine"),
    (Capability.CHANGE_BODY, lambda c: c.replace_body(b"new"), "replace_body"),
    (Capability.ADD_HEADERS, lambda c: c.add_header("X-A", "1"), "add_header(X-A)"),
    (Capability.ADD_HEADERS, lambda c: c.insert_header(0, "X-A", "1"), "insert_header(X-A)"),
    (Capability.CHANGE_HEADERS, lambda c: c.change_header("Subject", "1"),
     "change_header(Subject)"),
    (Capability.CHANGE_HEADERS, lambda c: c.delete_header("Subject"), "delete_header(Subject)"),
    (Capability.CHANGE_HEADERS, lambda c: c.delete_all("Received"), "delete_header(Received)"),
])
def test_each_unnegotiated_action_is_refused_and_the_rest_allowed(
    capability: str, call: Any, what: str, caplog: pytest.LogCaptureFixture
) -> None:
    raw = RAW.replace(b"\r\n\r\n", b"\r\nMessage-ID: <c@example.org>\r\n\r\n")
    message = message_from_bytes(raw, recipients=["<a@example.net>", "<b@example.net>"],
                                 queue_id="Q123")
    refused = MilterContext(message, Capability.ALL - {capability})
    refused.begin("notify")
    before = (names(refused), refused.recipients)
    call(refused)
    refused.end()
    assert refused.edits == [] and refused.quarantine_request is None
    assert (names(refused), refused.recipients) == before
    message_text = (f"brain 'notify': {what} refused: the MTA did not negotiate "
                    f"{capability!r} (declare it in the brain's needs, or the MTA is too old)")
    assert _refused(refused) == [message_text]
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        f"Q123: {message_text}"]
    # with the capability (and only it, besides what the call itself needs) it is recorded
    allowed = MilterContext(message, frozenset({capability}))
    allowed.begin("notify")
    call(allowed)
    allowed.end()
    assert allowed.refused == []
    assert allowed.edits or allowed.quarantine_request is not None


def test_recipient_edits_are_recorded_and_seen() -> None:
    message = message_from_bytes(RAW, recipients=["<a@example.net>", "<B@Example.NET>"])
    ctx = MilterContext(message)
    ctx.begin("route")
    ctx.add_rcpt("<c@example.net>")
    ctx.add_rcpt("<d@example.net>", "NOTIFY=NEVER")
    ctx.del_rcpt("b@example.net")
    ctx.change_from("<bounce@example.org>", "SIZE=10")
    ctx.end()
    assert ctx.recipients == ["<a@example.net>", "<c@example.net>", "<d@example.net>"]
    assert ctx.edits == [AddRcpt("<c@example.net>", None, "route"),
                         AddRcpt("<d@example.net>", "NOTIFY=NEVER", "route"),
                         DelRcpt("b@example.net", "route"),
                         ChangeFrom("<bounce@example.org>", "SIZE=10", "route")]
    assert ctx.edits[0].capability == Capability.ADD_RCPT
    assert ctx.edits[1].capability == Capability.ADD_RCPT_PAR


def test_quarantine_reason_is_one_clean_line() -> None:
    ctx = ctx_for()
    ctx.begin("av")
    ctx.quarantine("  virus\r\n  found\tin  part 2 ")
    assert ctx.quarantine_request == Quarantine("virus found in part 2", "av")
    ctx.quarantine(" \r\n ")
    assert ctx.quarantine_request == Quarantine("quarantined", "av")
    assert ctx.summary() == ["Quarantine 'quarantined'"]


def test_unchecked_reason_is_one_clean_line() -> None:
    ctx = ctx_for()
    ctx.begin("spam")
    ctx.unchecked(" spamd\n down ")
    ctx.end()
    ctx.begin("av")
    ctx.unchecked("")
    assert ctx.unchecked_brains == {"spam": "spamd down", "av": "unchecked"}


# --- who is speaking, and rolling a brain back ------------------------------------------------


def test_edits_outside_a_brain_belong_to_the_core() -> None:
    ctx = ctx_for()
    assert ctx.brain == "core"
    ctx.add_header("X-A", "1")
    ctx.begin("b")
    assert ctx.brain == "b"
    ctx.add_header("X-B", "1")
    ctx.end()
    assert ctx.brain == "core"
    ctx.after_accept(lambda: None)
    ctx.accept()
    assert [e.brain for e in ctx.edits] == ["core", "b"]
    assert ctx.after_accept_jobs[0][0] == "core"
    assert ctx.verdict is not None and ctx.verdict.brain == "core"
    assert ctx.rollback() == []  # nothing begun


def test_rollback_restores_everything_a_brain_touched() -> None:
    message = message_from_bytes(RAW, recipients=["<a@example.net>"])
    ctx = MilterContext(message)
    ctx.begin("good")
    ctx.add_rcpt("<g@example.net>")
    ctx.quarantine("kept")
    ctx.accept("fine")
    ctx.unchecked("half")
    ctx.after_accept(lambda: None)
    ctx.end()
    kept = (ctx.recipients, ctx.quarantine_request, ctx.verdict, list(ctx.after_accept_jobs),
            dict(ctx.unchecked_brains), list(ctx.edits), names(ctx))
    ctx.begin("bad")
    ctx.add_rcpt("<x@example.net>")
    ctx.del_rcpt("<a@example.net>")
    ctx.quarantine("bad")
    ctx.discard("drop")
    ctx.unchecked("bad")
    ctx.after_accept(lambda: None)
    ctx.add_header("X-Bad", "1")
    undone = ctx.rollback()
    assert [type(e).__name__ for e in undone] == ["AddRcpt", "DelRcpt", "AddHeader"]
    assert (ctx.recipients, ctx.quarantine_request, ctx.verdict, ctx.after_accept_jobs,
            ctx.unchecked_brains, ctx.edits, names(ctx)) == kept


# --- verdicts ---------------------------------------------------------------------------------


def test_verdict_defaults_and_arguments() -> None:
    ctx = ctx_for()
    ctx.begin("x")
    ctx.reject()
    v = ctx.verdict
    assert v is not None and v.action is Action.REJECT and v.reason == ""
    assert v.reply is not None and str(v.reply) == "550 5.7.1 Message refused"
    ctx.reject(554, "5.7.0", "No thanks", reason="policy")
    v = ctx.verdict
    assert v is not None and str(v.reply) == "554 5.7.0 No thanks" and v.reason == "policy"
    ctx.tempfail()
    v = ctx.verdict
    assert v is not None and v.action is Action.TEMPFAIL and v.reason == ""
    assert v.reply is not None and str(v.reply) == "451 4.7.1 Try again later"
    ctx.tempfail(421, "4.3.0", ["Engine", "down"], reason="clamd")
    v = ctx.verdict
    assert v is not None and str(v.reply) == "421 4.3.0 Engine / down" and v.reason == "clamd"
    ctx.discard()
    assert ctx.verdict == Verdict.discard().by("x")
    ctx.discard("dup")
    assert ctx.verdict == Verdict.discard("dup").by("x")
    ctx.accept()
    assert ctx.verdict == Verdict.accept().by("x") and not ctx.final
    assert ctx.action is Action.ACCEPT
    ctx.accept("ok")
    assert ctx.verdict == Verdict.accept("ok").by("x")


def test_no_verdict_means_continue() -> None:
    ctx = ctx_for()
    assert ctx.verdict is None and not ctx.final and ctx.action is Action.CONTINUE


def test_summary_lists_edits_then_quarantine() -> None:
    ctx = ctx_for()
    ctx.begin("b")
    ctx.add_header("X-A", "1")
    ctx.quarantine("why")
    assert ctx.summary() == [
        "AddHeader {'name': 'X-A', 'value': '1', 'brain': 'b'}", "Quarantine 'why'"]


def test_delete_where_refused_without_change_headers() -> None:
    ctx = ctx_for(allowed=frozenset({Capability.ADD_HEADERS}))
    assert ctx.delete_where("X-Spam-Flag", lambda _h, _n: True) == 0
    assert ctx.delete_all("X-Spam-Flag") == 0
    assert ctx.edits == [] and ctx.headers.get_all("X-Spam-Flag") == ["YES", "YES"]


# --- replacement bodies -----------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 65534, 65535, 65536, 65535 * 3 + 7, 300_000])
def test_replacement_body_chunks_cover_it_whole(size: int, tmp_path: Path) -> None:
    data = bytes(i % 251 for i in range(size))
    for source in (data, tmp_path / "body"):
        if isinstance(source, Path):
            source.write_bytes(data)
        chunks = list(ReplaceBody(source, "b").chunks())
        assert b"".join(chunks) == data
        assert all(0 < len(c) <= 65535 for c in chunks)
        assert len(chunks) == -(-size // 65535)
    assert [len(c) for c in ReplaceBody(data, "b").chunks(1000)][:1] == ([1000] if size >= 1000
                                                                          else [size] if size
                                                                          else [])


def test_rollback_before_any_brain_undoes_nothing() -> None:
    ctx = ctx_for()
    ctx.add_header("X-Core", "1")
    assert ctx.rollback() == []
    assert ctx.edits == [AddHeader("X-Core", "1", "core")]


def test_change_header_keeps_the_spelling_of_the_copy_it_changes() -> None:
    raw = b"X-Tag: one\r\nx-tag: two\r\nX-TAG: three\r\n\r\nbody\r\n"
    for index, spelled in ((1, "X-Tag"), (2, "x-tag"), (3, "X-TAG")):
        ctx = ctx_for(raw)
        ctx.change_header("X-Tag", "new", index)
        assert [(h.name, h.value) for h in ctx.headers][index - 1] == (spelled, "new")


def test_replace_body_is_recorded_for_its_brain() -> None:
    ctx = ctx_for()
    ctx.begin("av")
    ctx.replace_body(b"notice\r\n")
    ctx.end()
    assert ctx.edits == [ReplaceBody(b"notice\r\n", "av")]
