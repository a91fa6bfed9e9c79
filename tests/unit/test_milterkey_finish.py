"""The milter key's work after the brain chain: stripping untrusted keys, signing ours.

In-process with a fixed clock, as ``test_milterkey.py``; Postfix's way of
counting header indexes is replayed by the test kit's cleanup model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
from test_milterkey import (
    DAY,
    NOW,
    RAN,
    RAW,
    SECRET2,
    edit_field,
    key_for,
    msg,
    reason_of,
    service,
    with_headers,
)

from miltermonkey_core import Brain, Message, MilterContext, Monkey, Needs, hookimpl
from miltermonkey_core.contract.edits import AddHeader, ChangeHeader
from miltermonkey_core.contract.verdict import Action
from miltermonkey_core.engine.build import chain_of
from miltermonkey_core.engine.chain import BrainResult
from miltermonkey_core.engine.offline import run_engine
from miltermonkey_core.engine.session import Engine
from miltermonkey_core.milterkey import KeyFields, KeyInspection, KeyService, Reason
from miltermonkey_core.testing import cleanup
from miltermonkey_core.testing.replies import Disposition, Reply

# --- finish(): stripping and signing --------------------------------------------------------


def _ran(*names: str, outcome: str = "ran") -> list[BrainResult]:
    return [BrainResult(n, outcome, Action.CONTINUE) for n in names]


def _postfix_apply(message: Message, ctx: MilterContext) -> list[tuple[str, str]]:
    """Replay the recorded header edits as Postfix's cleanup server would."""
    actions: list[Any] = []
    for e in ctx.edits:
        if isinstance(e, AddHeader):
            actions.append(cleanup.AddHeader(e.name, e.value))
        elif isinstance(e, ChangeHeader):
            actions.append(cleanup.ChangeHeader(e.index, e.name, e.value or ""))
        else:
            raise AssertionError(f"unexpected edit {e}")
    result = cleanup.EomResult(disposition=Disposition.CONTINUE, reply=None, actions=actions,
                           progress_count=0, quarantine_reason=None,
                           final=Reply("c"))
    headers = [(h.name, h.value) for h in message.headers]
    return result.apply(headers, b"", "<a@b>", ["<c@d>"]).headers


def _finish(svc: KeyService, raw: bytes, results: list[BrainResult]) -> tuple[Message,
                                                                             MilterContext]:
    m = msg(raw)
    insp = svc.inspect(m)
    ctx = MilterContext(m)
    ctx.begin("core")
    svc.finish(m, ctx, results, insp)
    ctx.end()
    return m, ctx


def test_finish_strips_two_forged_headers_and_adds_ours(caplog: pytest.LogCaptureFixture) -> None:
    svc = service()
    forged1 = key_for(service({"k1": SECRET2}))
    forged2 = edit_field(key_for(svc), "host", "evil.example")
    raw = with_headers(RAW, ("X-Milter-Key", forged1), ("X-Other", "keep"),
                       ("X-Milter-Key", forged2))
    caplog.set_level("INFO", logger="miltermonkey")
    m, ctx = _finish(svc, raw, _ran("av", "spam"))
    deletes = [e for e in ctx.edits if isinstance(e, ChangeHeader) and e.value is None]
    assert [(e.name, e.index) for e in deletes] == [("X-Milter-Key", 1), ("X-Milter-Key", 1)]
    out = _postfix_apply(m, ctx)
    keys = [v for n, v in out if n == "X-Milter-Key"]
    assert len(keys) == 1
    assert ("X-Other", "keep") in out
    assert reason_of(svc, RAW, keys[0]) is None
    assert KeyFields.parse(keys[0]).ran == RAN
    removed = [r.getMessage() for r in caplog.records if "removed untrusted" in r.getMessage()]
    assert len(removed) == 2
    assert all(line.startswith(f"{m.id}: ") for line in removed)
    assert "bad MAC" in removed[0] and "bad MAC" in removed[1]


def test_finish_strips_many_forged_headers_and_caps_the_log_lines(
        caplog: pytest.LogCaptureFixture) -> None:
    svc = service()
    raw = with_headers(RAW, *[("X-Milter-Key", f"v=2; forged {i}") for i in range(25)])
    caplog.set_level("INFO", logger="miltermonkey")
    m, ctx = _finish(svc, raw, _ran("av"))
    out = _postfix_apply(m, ctx)
    assert len([v for n, v in out if n == "X-Milter-Key"]) == 1
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(lines) == 21
    assert lines[-1] == f"{m.id}: removed 5 more untrusted milter keys"


def test_finish_keeps_index_right_around_a_trusted_header() -> None:
    svc = service()
    good = key_for(svc, ran=(("av", "continue"),))
    forged = "v=2; forged"
    raw = with_headers(RAW, ("X-Milter-Key", forged), ("X-Milter-Key", good),
                       ("X-Milter-Key", forged + "2"))
    m = msg(raw)
    insp = svc.inspect(m)
    assert [(n, i) for n, i, _ in insp.rejected] == [("X-Milter-Key", 1), ("X-Milter-Key", 3)]
    slots = [attrs.make_class("S", {"name": attrs.field(), "skip_if_key": attrs.field()})(
        "av", True)]
    assert insp.skip_brains(slots) == {"av"}
    ctx = MilterContext(m)
    ctx.begin("core")
    svc.finish(m, ctx, [*_ran("av", outcome="skipped"), *_ran("spam")], insp)
    ctx.end()
    edits = [(e.name, e.index, e.value is None) for e in ctx.edits
             if isinstance(e, ChangeHeader)]
    assert edits == [("X-Milter-Key", 1, True), ("X-Milter-Key", 2, True),
                     ("X-Milter-Key", 1, False)]
    out = _postfix_apply(m, ctx)
    keys = [v for n, v in out if n == "X-Milter-Key"]
    assert len(keys) == 1
    fields = KeyFields.parse(keys[0])
    # spam ran here, av was carried forward from the trusted key
    assert fields.ran == (("av", "continue"), ("spam", "continue"))
    assert reason_of(svc, RAW, keys[0]) is None


def test_finish_leaves_a_trusted_alternate_header_and_strips_a_forged_one() -> None:
    relay = service(header_name="X-Relay-Key")
    mx = service(alternate_headers=["X-Relay-Key"])
    good = key_for(relay)
    bad = key_for(service({"k1": SECRET2}))
    raw = with_headers(RAW, ("X-Relay-Key", bad), ("X-Relay-Key", good))
    m, ctx = _finish(mx, raw, _ran("spam"))
    out = _postfix_apply(m, ctx)
    assert [v for n, v in out if n == "X-Relay-Key"] == [good]
    ours = [v for n, v in out if n == "X-Milter-Key"]
    assert len(ours) == 1 and KeyFields.parse(ours[0]).ran == (("spam", "continue"),)


def test_a_key_that_expires_between_inspection_and_finish_is_stripped() -> None:
    """finish() reuses inspect()'s MAC check for an unchanged message, never its clock."""
    relay = service(header_name="X-Relay-Key")
    good = key_for(relay)
    expiry = KeyFields.parse(good).expiry
    clock = [float(expiry)]
    mx = KeyService({"k1": relay.secrets["k1"]}, alternate_headers=["X-Relay-Key"],
                    clock=lambda: clock[0], clock_skew=0)
    m = msg(with_headers(RAW, ("X-Relay-Key", good)))
    insp = mx.inspect(m)
    assert insp.trusted is not None and insp.headers_digest is not None
    clock[0] = expiry + 1.0  # the key expires while the brains run
    ctx = MilterContext(m)
    ctx.begin("core")
    mx.finish(m, ctx, _ran("spam"), insp)
    ctx.end()
    out = _postfix_apply(m, ctx)
    assert [v for n, v in out if n == "X-Relay-Key"] == []
    # Unchanged clock: the same key stays, judged by the inspection's MAC check.
    clock[0] = float(expiry)
    m = msg(with_headers(RAW, ("X-Relay-Key", good)))
    m2, ctx2 = _finish(mx, bytes(m.as_bytes()), _ran("spam"))
    assert [v for n, v in _postfix_apply(m2, ctx2) if n == "X-Relay-Key"] == [good]


def test_finish_lists_only_brains_that_ran() -> None:
    results = [BrainResult("a", "ran", Action.CONTINUE), BrainResult("b", "error"),
               BrainResult("c", "evaluation"), BrainResult("d", "timeout"),
               BrainResult("e", "skipped"), BrainResult("f", "ran", Action.ACCEPT)]
    m, ctx = _finish(service(), RAW, results)
    (value,) = [v for n, v in _postfix_apply(m, ctx) if n == "X-Milter-Key"]
    assert KeyFields.parse(value).ran == (("a", "continue"), ("f", "accept"))


def test_finish_adds_nothing_when_no_brain_ran_or_no_message_id() -> None:
    _, ctx = _finish(service(), RAW, _ran("x", outcome="error"))
    assert ctx.edits == []
    no_mid = RAW.replace(b"Message-ID: <m1@example.org>\n", b"")
    _, ctx = _finish(service(), no_mid, _ran("av"))
    assert ctx.edits == []


def test_expiry_is_the_shortest_brain_lifetime() -> None:
    svc = service(expirations={"av": 3600, "spam": None})
    m, ctx = _finish(svc, RAW, _ran("av", "spam"))
    (value,) = [v for n, v in _postfix_apply(m, ctx) if n == "X-Milter-Key"]
    assert KeyFields.parse(value).expiry == NOW + 3600
    m, ctx = _finish(svc, RAW, _ran("spam"))
    (value,) = [v for n, v in _postfix_apply(m, ctx) if n == "X-Milter-Key"]
    assert KeyFields.parse(value).expiry == NOW + 432000


def test_carried_claim_keeps_its_original_expiry() -> None:
    hop1 = service(now=NOW - DAY)
    inbound = key_for(hop1, ran=(("av", "continue"),))
    hop2 = service()
    m = msg(with_headers(RAW, ("X-Milter-Key", inbound)))
    insp = hop2.inspect(m)
    slots = [attrs.make_class("S", {"name": attrs.field(), "skip_if_key": attrs.field()})(
        "av", True)]
    insp.skip_brains(slots)
    ctx = MilterContext(m)
    hop2.finish(m, ctx, [*_ran("av", outcome="skipped"), *_ran("spam")], insp)
    (value,) = [v for n, v in _postfix_apply(m, ctx) if n == "X-Milter-Key"]
    assert KeyFields.parse(value).expiry == NOW - DAY + 432000


def test_replaced_body_is_what_gets_signed() -> None:
    svc = service()
    m = msg(RAW)
    insp = svc.inspect(m)
    ctx = MilterContext(m)
    ctx.begin("av")
    ctx.replace_body(b"notice\r\n")
    ctx.end()
    ctx.begin("core")
    svc.finish(m, ctx, _ran("av"), insp)
    (value,) = [e.value for e in ctx.edits if isinstance(e, AddHeader)]
    replaced = RAW.split(b"\n\n")[0] + b"\n\nnotice\n"
    assert reason_of(svc, replaced, value) is None
    assert reason_of(svc, RAW, value) is not None


def _hop(svc: KeyService, raw: bytes, *brains: tuple[str, Any],
         results: list[BrainResult] | None = None) -> tuple[Message, MilterContext]:
    """One hop: each ``(name, fn(ctx))`` brain edits in turn, then the core signs."""
    m = msg(raw)
    insp = svc.inspect(m)
    ctx = MilterContext(m)
    for name, edit in brains:
        ctx.begin(name)
        edit(ctx)
        ctx.end()
    ctx.begin("core")
    svc.finish(m, ctx, results if results is not None else _ran(*(n for n, _ in brains)), insp)
    ctx.end()
    return m, ctx


def _signed(ctx: MilterContext) -> str:
    (value,) = [e.value for e in ctx.edits
                if isinstance(e, AddHeader | ChangeHeader) and e.name == "X-Milter-Key"
                and e.value is not None]
    return value


def test_the_key_is_bound_to_the_last_of_two_replacements() -> None:
    svc = service()
    _, ctx = _hop(svc, RAW, ("av", lambda c: c.replace_body(b"first\r\n")),
                  ("notice", lambda c: c.replace_body(b"second\r\n")))
    head = RAW.split(b"\n\n")[0]
    assert reason_of(svc, head + b"\n\nsecond\n", _signed(ctx)) is None
    got = reason_of(svc, head + b"\n\nfirst\n", _signed(ctx))
    assert got is not None and got.startswith(Reason.WRONG_BODY)


def test_a_replacement_body_over_64_kib_is_signed_whole(tmp_path: Path) -> None:
    big = b"".join(b"line %06d of a long notice\r\n" % i for i in range(9000))
    assert len(big) > 3 * 65536
    spooled = tmp_path / "notice"
    spooled.write_bytes(big)
    svc = service()
    head = RAW.split(b"\n\n")[0] + b"\n\n"
    for source in (big, spooled):
        _, ctx = _hop(svc, RAW, ("av", lambda c, s=source: c.replace_body(s)))
        assert reason_of(svc, head + big, _signed(ctx)) is None
        got = reason_of(svc, head + big[:65535], _signed(ctx))
        assert got is not None and got.startswith(Reason.WRONG_BODY)


def test_the_key_binds_the_mime_headers_as_they_leave() -> None:
    """A brain that replaces the body with a notice also sets its Content-Type."""
    svc = service()

    def notice(ctx: MilterContext) -> None:
        ctx.replace_body(b"the attachment was removed\r\n")
        ctx.replace_header("Content-Type", "text/plain; charset=utf-8")

    raw = with_headers(RAW, ("Content-Type", "application/zip"))
    _, ctx = _hop(svc, raw, ("av", notice))
    key = _signed(ctx)
    left = RAW.split(b"\n\n")[0] + (b"\nContent-Type: text/plain; charset=utf-8\n\n"
                                     b"the attachment was removed\n")
    assert reason_of(svc, left, key) is None
    got = reason_of(svc, left.replace(b"text/plain; charset=utf-8", b"application/zip"), key)
    assert got is not None and got.startswith(Reason.WRONG_HEADERS), got


def test_a_key_header_a_brain_adds_is_judged_as_the_message_leaves(
        caplog: pytest.LogCaptureFixture) -> None:
    relay = service(header_name="X-Relay-Key")
    mx = service(alternate_headers=["X-Relay-Key"])
    good = key_for(relay)
    forged = key_for(service({"k1": SECRET2}, header_name="X-Relay-Key"))
    caplog.set_level("INFO", logger="miltermonkey")
    m, ctx = _hop(mx, RAW, ("copier", lambda c: c.add_header("X-Relay-Key", good)),
                  ("forger", lambda c: c.add_header("X-Relay-Key", forged)),
                  ("forger2", lambda c: c.add_header("X-Milter-Key", "v=2; made up")))
    out = _postfix_apply(m, ctx)
    assert [v for n, v in out if n == "X-Relay-Key"] == [good]
    ours = [v for n, v in out if n == "X-Milter-Key"]
    assert len(ours) == 1 and reason_of(mx, RAW, ours[0]) is None
    removed = [r.getMessage() for r in caplog.records if "removed untrusted" in r.getMessage()]
    assert removed == [
        f"{m.id}: removed untrusted milter key X-Milter-Key #1: malformed: expected "
        "tag=value, got 'made up'",
        f"{m.id}: removed untrusted milter key X-Relay-Key #2: bad MAC: forged, altered, or "
        "made with another secret for key id 'k1'"]
    # the same good key, added by a brain that also replaced the body, no longer holds
    m, ctx = _hop(mx, RAW, ("copier", lambda c: (c.add_header("X-Relay-Key", good),
                                                 c.replace_body(b"other\r\n"))))
    assert ctx.headers.get_all("X-Relay-Key") == []


def test_a_v1_key_is_stripped_with_its_reason(caplog: pytest.LogCaptureFixture) -> None:
    """Keys of the old format did not bind the MIME headers: never trusted again."""
    old = ("v=1; id=k1; host=relay.example.org; exp=1750432000; bind=body; mid=Ccvkale4; "
           "body=Ba3gj8-x; ran=av:continue; mac=D-vl8C_GT16zWsOPfpInvY-sjUrCfPnkigvbtpXu_5I")
    svc = service()
    got = reason_of(svc, RAW, old)
    assert got == (f"{Reason.OBSOLETE}: v=1 does not bind the headers that say how the body is "
                   "read (MIME-Version, Content-Type, Content-Transfer-Encoding, "
                   "Content-Disposition); every host that shares the secret must sign v=2")
    caplog.set_level("INFO", logger="miltermonkey")
    m, ctx = _finish(svc, with_headers(RAW, ("X-Milter-Key", old)), _ran("av"))
    out = _postfix_apply(m, ctx)
    assert [KeyFields.parse(v).version for n, v in out if n == "X-Milter-Key"] == ["2"]
    assert any(r.getMessage() == f"{m.id}: removed untrusted milter key X-Milter-Key #1: {got}"
               for r in caplog.records)


# --- through the engine: hop 1 signs, hop 2 skips ------------------------------------------


class _Stamp(Brain):
    needs = Needs(envelope=False, headers=True, body=True)

    @hookimpl
    def eom_process(self, message: Message, ctx: MilterContext, monkey: Monkey) -> None:
        said = monkey.key_says_ran(message)
        ctx.add_header(f"X-Stamp-{self.name}", f"{monkey.hostname} key-says-ran={said}")


def _engine(svc: KeyService, host: str, skip: Sequence[str] = ()) -> Engine:
    base = Monkey(hostname=host)
    brains = [_Stamp(None, base.for_brain(n), n) for n in ("av", "spam")]
    chain = chain_of(*brains)
    for slot in chain.slots:
        slot.skip_if_key = slot.name in skip
    return Engine(chain, base, key=svc)


def test_engine_hop1_signs_and_hop2_skips_the_brain_the_key_lists() -> None:
    hop1 = _engine(service(hostname="hop1.example"), "hop1", skip=("av",))
    out1 = run_engine(hop1, RAW)
    assert [r.outcome for r in out1.results] == ["ran", "ran"]
    key1 = out1.header("X-Milter-Key")
    assert key1 is not None and KeyFields.parse(key1).ran == RAN

    hop2 = _engine(service(hostname="hop2.example"), "hop2", skip=("av",))
    out2 = run_engine(hop2, out1.message_bytes)
    assert [(r.brain, r.outcome) for r in out2.results] == [("av", "skipped"), ("spam", "ran")]
    headers = out2.headers
    assert headers.count(("X-Stamp-av", "hop1 key-says-ran=False")) == 1
    assert ("X-Stamp-av", "hop2 key-says-ran=True") not in headers
    assert ("X-Stamp-spam", "hop2 key-says-ran=True") in headers
    keys = [v for n, v in headers if n == "X-Milter-Key"]
    assert len(keys) == 1
    fields = KeyFields.parse(keys[0])
    assert fields.host == "hop2.example" and fields.ran == RAN
    assert any("trusted milter key: skipping av" in line for line in out2.log)


def test_engine_hop2_runs_everything_on_a_forged_key_and_strips_it() -> None:
    hop1 = _engine(service({"k1": SECRET2}), "evil")
    out1 = run_engine(hop1, RAW)
    hop2 = _engine(service(hostname="hop2.example"), "hop2", skip=("av",))
    out2 = run_engine(hop2, out1.message_bytes)
    assert [(r.brain, r.outcome) for r in out2.results] == [("av", "ran"), ("spam", "ran")]
    keys = [v for n, v in out2.headers if n == "X-Milter-Key"]
    assert len(keys) == 1 and KeyFields.parse(keys[0]).host == "hop2.example"
    assert any("removed untrusted milter key" in line for line in out2.log)


class _Unchecked(Brain):
    needs = Needs(envelope=False, headers=True, body=True)

    @hookimpl
    def eom_process(self, message: Message, ctx: MilterContext, monkey: Monkey) -> None:
        ctx.add_header("X-Spam-Status", "Unchecked (spamd unavailable)")
        ctx.unchecked("spamd unavailable")


def test_a_brain_that_could_not_judge_is_never_signed_as_ran() -> None:
    base = Monkey(hostname="hop1")
    chain = chain_of(_Stamp(None, base.for_brain("av"), "av"),
                     _Unchecked(None, base.for_brain("spam"), "spam"))
    out = run_engine(Engine(chain, base, key=service(hostname="hop1.example")), RAW)
    assert out.header("X-Spam-Status") == "Unchecked (spamd unavailable)"
    key = out.header("X-Milter-Key")
    assert key is not None
    assert KeyFields.parse(key).ran == (("av", "continue"),)
    assert any("brain spam not listed in the milter key: spamd unavailable" in line
               for line in out.log)


def test_unchecked_is_rolled_back_with_a_failing_brain() -> None:
    ctx = MilterContext(msg(RAW))
    ctx.begin("spam")
    ctx.unchecked("spamd down")
    ctx.rollback()
    assert ctx.unchecked_brains == {}


# --- finish(): what it lists, what it logs ----------------------------------------------------


def test_finish_inspects_by_itself_when_not_given_an_inspection() -> None:
    svc = service()
    m = msg(with_headers(RAW, ("X-Milter-Key", "v=2; forged")))
    ctx = MilterContext(m)
    svc.finish(m, ctx, _ran("av"), None)
    out = _postfix_apply(m, ctx)
    (value,) = [v for n, v in out if n == "X-Milter-Key"]
    assert reason_of(svc, RAW, value) is None
    assert isinstance(m.notes["_mm_key"], KeyInspection)


def test_finish_logs_what_it_did(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG", logger="miltermonkey")
    m, ctx = _finish(service(), RAW, _ran("av", "spam"))
    (value,) = [e.value for e in ctx.edits if isinstance(e, AddHeader)]
    assert [r.getMessage() for r in caplog.records if "added" in r.getMessage()] == [
        f"{m.id}: milter key k1 added: ran av:continue,spam:continue, expires {NOW + 432000}"]
    assert KeyFields.parse(value).expiry == NOW + 432000
    caplog.clear()
    m, _ = _finish(service(), RAW, _ran("x", outcome="error"))
    assert [r.getMessage() for r in caplog.records] == [
        f"{m.id}: no brain ran: no milter key added"]
    caplog.clear()
    m, _ = _finish(service(), RAW.replace(b"Message-ID: <m1@example.org>\n", b""), _ran("av"))
    assert [r.getMessage() for r in caplog.records] == [
        f"{m.id}: no milter key added: the message has no single Message-ID"]


def test_twenty_removals_are_all_logged_one_by_one(caplog: pytest.LogCaptureFixture) -> None:
    raw = with_headers(RAW, *[("X-Milter-Key", f"v=2; forged {i}") for i in range(20)])
    caplog.set_level("INFO", logger="miltermonkey")
    _finish(service(), raw, _ran("av"))
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(lines) == 20 and all("removed untrusted milter key X-Milter-Key #" in x
                                    for x in lines)


def test_which_brains_a_key_lists(caplog: pytest.LogCaptureFixture) -> None:
    svc = service()
    inbound = key_for(svc, ran=(("av", "accept"), ("spam", "continue")))
    m = msg(with_headers(RAW, ("X-Milter-Key", inbound)))
    insp = svc.inspect(m)
    slot = attrs.make_class("S", {"name": attrs.field(), "skip_if_key": attrs.field()})
    insp.skip_brains([slot("av", True)])
    ctx = MilterContext(m)
    ctx.begin("early")
    ctx.unchecked("engine down")
    ctx.end()
    results = [
        BrainResult("early", "ran", Action.CONTINUE),       # could not judge: not listed
        BrainResult("av", "skipped", Action.CONTINUE),      # spared: carried with its verdict
        BrainResult("other", "skipped", Action.CONTINUE),   # skipped for another reason
        BrainResult("named", "ran", "accept"),              # type: ignore[arg-type]
        BrainResult("bad name", "ran", Action.CONTINUE),    # cannot go in a key
        BrainResult("late", "ran", Action.CONTINUE),
    ]
    caplog.set_level("INFO", logger="miltermonkey")
    ctx.begin("core")
    svc.finish(m, ctx, results, insp)
    ctx.end()
    (value,) = [v for n, v in _postfix_apply(m, ctx) if n == "X-Milter-Key"]
    assert KeyFields.parse(value).ran == (("av", "accept"), ("named", "accept"),
                                          ("late", "continue"))
    messages = [r.getMessage() for r in caplog.records]
    assert f"{m.id}: brain early not listed in the milter key: engine down" in messages
    assert [x for x in messages if "cannot be listed" in x] == [
        f"{m.id}: brain 'bad name' cannot be listed in a milter key (name of 1-64 letters, "
        "digits, '.', '_', '-')"]


def test_a_brain_that_ran_again_gets_a_fresh_lifetime() -> None:
    """Only a claim carried forward keeps the inbound key's expiry."""
    hop1 = service(now=NOW - DAY)
    inbound = key_for(hop1, ran=(("av", "continue"), ("spam", "continue")))
    hop2 = service()
    m = msg(with_headers(RAW, ("X-Milter-Key", inbound)))
    insp = hop2.inspect(m)  # trusted, but no brain has skip_if_key here
    ctx = MilterContext(m)
    hop2.finish(m, ctx, _ran("av", "spam"), insp)
    (value,) = [v for n, v in _postfix_apply(m, ctx) if n == "X-Milter-Key"]
    assert KeyFields.parse(value).expiry == NOW + 432000


@pytest.mark.parametrize("change", ["body", "content-type", "message-id", "nothing"])
def test_an_arriving_key_is_judged_again_when_the_message_changed(change: str) -> None:
    """finish() may reuse inspect()'s answer only for a message that leaves as it came."""
    relay = service(header_name="X-Relay-Key")
    mx = service(alternate_headers=["X-Relay-Key"])
    good = key_for(relay)
    forged = key_for(service({"k1": SECRET2}))  # gets as far as its MAC on arrival

    def edit(ctx: MilterContext) -> None:
        if change == "body":
            ctx.replace_body(b"other\r\n")
        elif change == "content-type":
            ctx.add_header("Content-Type", "application/octet-stream")
        elif change == "message-id":
            ctx.change_header("Message-ID", "<m9@example.org>")
        ctx.add_header("X-Relay-Key", good)  # a brain's copy of the arriving key

    m = msg(with_headers(RAW, ("X-Relay-Key", good), ("X-Milter-Key", forged)))
    insp = mx.inspect(m)
    assert insp.headers_digest is not None
    ctx = MilterContext(m)
    ctx.begin("editor")
    edit(ctx)
    ctx.end()
    ctx.begin("core")
    mx.finish(m, ctx, _ran("editor"), insp)
    ctx.end()
    kept = ctx.headers.get_all("X-Relay-Key")
    assert kept == ([good, good] if change == "nothing" else []), change
