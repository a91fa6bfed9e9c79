"""The milter key: signing, verifying, the secret file, finish() and the CLI.

Everything here runs in-process with a fixed clock; the real-socket hop 1 ->
hop 2 test is ``test_milterkey_daemon.py``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import re
import socket
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest

from miltermonkey_core import Brain, Message, MilterContext, Monkey, Needs, hookimpl
from miltermonkey_core.cli.key import add_key_commands
from miltermonkey_core.config import loads
from miltermonkey_core.contract.edits import AddHeader, ChangeHeader
from miltermonkey_core.contract.model import Header, Headers, message_from_bytes
from miltermonkey_core.contract.verdict import Action
from miltermonkey_core.engine.build import chain_of
from miltermonkey_core.engine.chain import BrainResult
from miltermonkey_core.engine.offline import run_engine
from miltermonkey_core.engine.session import Engine
from miltermonkey_core.errors import ConfigError, SecretError
from miltermonkey_core.milterkey import (
    KeyFields,
    KeyInspection,
    KeyService,
    MalformedKey,
    Reason,
    canonical_header_value,
    check_secret_file,
    generate_secret_file,
    load_secrets,
    mime_digest,
    normalize_message_id,
)
from miltermonkey_core.milterkey.fields import mid_tag
from miltermonkey_core.testing import cleanup
from miltermonkey_core.testing.replies import Disposition, Reply

SECRET1 = bytes(range(32))
SECRET2 = bytes(range(100, 132))
NOW = 1_750_000_000
DAY = 86400

RAW = (b"Message-ID: <m1@example.org>\nFrom: a@example.org\nTo: b@example.net\n"
       b"Subject: test\n\nHello\nworld\n")
OTHER = RAW.replace(b"<m1@example.org>", b"<m2@example.org>")
RAN = (("av", "continue"), ("spam", "continue"))


def service(secrets: dict[str, bytes] | None = None, now: float = NOW, **kw: Any) -> KeyService:
    kw.setdefault("hostname", "mx1.example.org")
    return KeyService(secrets or {"k1": SECRET1}, clock=lambda: now, **kw)


def with_headers(raw: bytes, *headers: tuple[str, str]) -> bytes:
    """``raw`` with headers appended to its header block (folded values kept)."""
    head, _, body = raw.partition(b"\n\n")
    extra = b"".join(f"{n}: {v}\n".encode() for n, v in headers)
    return head + b"\n" + extra + b"\n" + body


def msg(raw: bytes = RAW) -> Message:
    return message_from_bytes(raw)


def key_for(svc: KeyService, raw: bytes = RAW, ran: Sequence[tuple[str, str]] = RAN,
            **kw: Any) -> str:
    m = msg(raw)
    mid = normalize_message_id(m.headers)
    assert mid is not None
    return svc.format(svc.sign(ran, mid, m.body.sha256(), mime_digest(m.headers), **kw))


def inspect(svc: KeyService, raw: bytes, value: str, name: str = "X-Milter-Key") -> KeyInspection:
    return svc.inspect(msg(with_headers(raw, (name, value))))


def reason_of(svc: KeyService, raw: bytes, value: str) -> str | None:
    insp = inspect(svc, raw, value)
    assert len(insp.checks) == 1
    return insp.checks[0].reason


def edit_field(value: str, tag: str, new: str) -> str:
    fields = KeyFields.parse(value)
    return "; ".join(f"{t}={new if t == tag else v}" for t, v in fields.items())


# --- round trip and format -------------------------------------------------------------


def test_sign_then_verify_round_trip() -> None:
    svc = service()
    value = key_for(svc)
    insp = inspect(svc, RAW, value)
    assert insp.rejected == []
    assert insp.trusted is not None
    assert insp.trusted.ran == RAN
    assert insp.trusted.host == "mx1.example.org"
    assert insp.trusted.expiry == NOW + 432000
    assert insp.says_ran("av") and insp.says_ran("spam") and not insp.says_ran("other")
    assert KeyFields.parse(value) == insp.trusted


def test_header_is_folded_short_and_parses_back() -> None:
    svc = service()
    ran = tuple((f"brain-number-{i}", "continue") for i in range(60))
    value = key_for(svc, ran=ran)
    lines = value.split("\n")
    assert len(lines) > 3
    assert all(line.startswith("\t") for line in lines[1:])
    assert max(len(line) for line in lines) < 78
    assert reason_of(svc, RAW, value) is None


def test_format_matches_the_documented_shape() -> None:
    value = key_for(service())
    flat = re.sub(r"\s+", " ", value)
    assert re.fullmatch(
        r"v=2; id=k1; host=mx1\.example\.org; exp=\d+; bind=body; mid=[\w-]{8}; "
        r"body=[\w-]{8}; mime=[\w-]{8}; ran=av:continue,spam:continue; mac=[\w-]{43}",
        flat), flat


def test_canonical_encoding_is_length_prefixed() -> None:
    """Moving a character from one field to the next changes the signed bytes."""
    a = KeyFields("k1", "ab.example", 5, "none", "AAAAAAAA", None, None,
                  (("x", "continue"),))
    b = attrs.evolve(a, key_id="k1a", host="b.example")
    assert a.signed_bytes("<m>", None, None) != b.signed_bytes("<m>", None, None)
    c = attrs.evolve(a, ran=(("x", "continue"), ("y", "accept")))
    d = attrs.evolve(a, ran=(("y", "accept"), ("x", "continue")))
    assert c.signed_bytes("<m>", None, None) != d.signed_bytes("<m>", None, None)


# --- what is not trusted -------------------------------------------------------------------

FIELD_EDITS = [
    ("v", "3", Reason.MALFORMED),
    ("v", "1", Reason.OBSOLETE),
    ("id", "k2", Reason.UNKNOWN_KEY),
    ("host", "mx2.example.org", Reason.BAD_MAC),
    ("exp", str(NOW + 432001), Reason.BAD_MAC),
    ("exp", str(NOW + 60), Reason.BAD_MAC),
    ("bind", "none", Reason.MALFORMED),
    ("mid", "AAAAAAAA", Reason.WRONG_MESSAGE),
    ("body", "AAAAAAAA", Reason.WRONG_BODY),
    ("mime", "AAAAAAAA", Reason.WRONG_HEADERS),
    ("ran", "av:continue", Reason.BAD_MAC),
    ("ran", "av:continue,spam:continue,extra:continue", Reason.BAD_MAC),
    ("ran", "spam:continue,av:continue", Reason.BAD_MAC),
    ("ran", "av:accept,spam:continue", Reason.BAD_MAC),
    ("ran", "AV:continue,spam:continue", Reason.BAD_MAC),
    ("ran", "av:continue,av:continue", Reason.MALFORMED),
    ("mac", "A" * 43, Reason.BAD_MAC),
]


@pytest.mark.parametrize(("tag", "new", "reason"), FIELD_EDITS,
                         ids=[f"{t}={n[:20]}" for t, n, _ in FIELD_EDITS])
def test_each_tampered_field_is_refused(tag: str, new: str, reason: str) -> None:
    svc = service()
    value = key_for(svc)
    tampered = edit_field(value, tag, new)
    assert tampered != value
    got = reason_of(svc, RAW, tampered)
    assert got is not None and got.startswith(reason), got


def test_bind_none_with_the_body_field_removed_is_refused() -> None:
    svc = service()
    parts = [p for p in re.split(r"\s*;\s*", key_for(svc))
             if not p.startswith(("body=", "mime="))]
    tampered = "; ".join(p.replace("bind=body", "bind=none") for p in parts)
    for verifier in (svc, service(binding="none")):
        got = reason_of(verifier, RAW, tampered)
        assert got is not None and got.startswith(Reason.BAD_MAC), got


def test_non_canonical_mac_encoding_is_refused() -> None:
    """The last base64url character carries 2 spare bits: flipping them must not pass."""
    svc = service()
    value = key_for(svc)
    mac = KeyFields.parse(value).mac
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    i = alphabet.index(mac[-1])
    sibling = alphabet[i ^ 1]
    assert base64.urlsafe_b64decode(mac[:-1] + sibling + "=") == \
        base64.urlsafe_b64decode(mac + "=")
    got = reason_of(svc, RAW, value.replace(mac, mac[:-1] + sibling))
    assert got is not None and got.startswith(Reason.BAD_MAC)


def test_tampered_body_is_refused_with_binding_body() -> None:
    svc = service()
    value = key_for(svc)
    got = reason_of(svc, RAW + b"-- \nfooter\n", value)
    assert got is not None and got.startswith(Reason.WRONG_BODY), got


def test_tampered_body_passes_with_binding_none() -> None:
    svc = service(binding="none")
    value = key_for(svc)
    assert "bind=none" in value and "body=" not in value
    assert reason_of(svc, RAW + b"-- \nfooter\n", value) is None


def test_unbound_key_is_refused_where_body_binding_is_required() -> None:
    value = key_for(service(binding="none"))
    got = reason_of(service(binding="body"), RAW, value)
    assert got is not None and got.startswith(Reason.UNBOUND), got


def test_expired_key_is_refused() -> None:
    value = key_for(service())
    expiry = NOW + 432000
    got = reason_of(service(now=expiry + 301), RAW, value)
    assert got is not None and got.startswith(Reason.EXPIRED), got


def test_key_within_clock_skew_is_trusted() -> None:
    value = key_for(service())
    expiry = NOW + 432000
    assert reason_of(service(now=expiry + 300), RAW, value) is None
    got = reason_of(service(now=expiry + 60, clock_skew=0), RAW, value)
    assert got is not None and got.startswith(Reason.EXPIRED)


def test_expiry_too_far_in_the_future_is_refused() -> None:
    signer = service(default_expiration=400 * DAY)
    value = key_for(signer)
    got = reason_of(service(), RAW, value)
    assert got is not None and got.startswith(Reason.FUTURE), got
    # a brain override that long makes it acceptable
    assert reason_of(service(expirations={"av": 400 * DAY}), RAW, value) is None


def test_unknown_key_id_is_refused() -> None:
    value = key_for(service({"other": SECRET2}))
    got = reason_of(service(), RAW, value)
    assert got is not None and got.startswith(Reason.UNKNOWN_KEY), got


def test_wrong_secret_is_refused() -> None:
    value = key_for(service({"k1": SECRET2}))
    got = reason_of(service(), RAW, value)
    assert got is not None and got.startswith(Reason.BAD_MAC), got


def test_key_copied_onto_another_message_is_refused() -> None:
    svc = service()
    value = key_for(svc)
    got = reason_of(svc, OTHER, value)
    assert got is not None and got.startswith(Reason.WRONG_MESSAGE), got
    # even with the body not bound
    loose = service(binding="none")
    got = reason_of(loose, OTHER, key_for(loose))
    assert got is not None and got.startswith(Reason.WRONG_MESSAGE), got


def test_message_without_or_with_two_message_ids_cannot_be_trusted() -> None:
    svc = service()
    value = key_for(svc)
    no_mid = RAW.replace(b"Message-ID: <m1@example.org>\n", b"")
    two = with_headers(RAW, ("Message-ID", "<m1@example.org>"))
    for raw in (no_mid, two):
        got = reason_of(svc, raw, value)
        assert got is not None and got.startswith(Reason.WRONG_MESSAGE), got


def test_folded_message_id_binds_like_the_unfolded_one() -> None:
    svc = service()
    value = key_for(svc)
    folded = RAW.replace(b"Message-ID: <m1@example.org>", b"Message-ID:\n <m1@example.org>")
    assert reason_of(svc, folded, value) is None


def test_malformed_values_are_refused() -> None:
    svc = service()
    for bad in ("", "garbage", "v=2", "v=2; id=k1", "x" * 9000, "v=2;" * 20):
        got = reason_of(svc, RAW, bad)
        assert got is not None and got.startswith(Reason.MALFORMED), (bad[:30], got)


# --- rotation and the alternate header -----------------------------------------------------


def _config(secret_file: Path, **daemon: Any) -> Any:
    lines = ["[miltermonkey]", f'miltersecretfile = "{secret_file}"', "milter_key = true"]
    for k, v in daemon.items():
        lines.append(f"{k} = {v!r}".replace("'", '"'))
    return loads("\n".join(lines) + "\n")


def test_rotation(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    assert generate_secret_file(path, "old") == "old"
    old_svc = KeyService.from_config(_config(path))
    old_key = key_for(old_svc)

    assert generate_secret_file(path, "new") == "new"
    assert list(load_secrets(path)) == ["old", "new"]
    # appending does not change the signer: the first line still signs
    assert KeyService.from_config(_config(path)).signing_key == "old"
    # key_id points at the new one: new keys use it, old keys still verify
    svc = KeyService.from_config(_config(path, key_id="new"))
    assert svc.signing_key == "new"
    new_key = key_for(svc)
    assert KeyFields.parse(new_key).key_id == "new"
    assert reason_of(svc, RAW, old_key) is None
    assert reason_of(svc, RAW, new_key) is None
    # remove the old line: its keys are no longer trusted
    text = path.read_text()
    path.write_text("\n".join(x for x in text.splitlines() if not x.startswith("old:")) + "\n")
    svc = KeyService.from_config(_config(path, key_id="new"))
    got = reason_of(svc, RAW, old_key)
    assert got is not None and got.startswith(Reason.UNKNOWN_KEY)
    assert reason_of(svc, RAW, new_key) is None


def test_key_id_not_in_the_file_is_refused_at_start(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    generate_secret_file(path, "k1")
    with pytest.raises(SecretError, match="key_id 'k9' is not in the secret file"):
        KeyService.from_config(_config(path, key_id="k9"))


def test_alternate_header_is_accepted_with_the_shared_secret() -> None:
    relay = service(header_name="X-Relay-Key")
    value = key_for(relay)
    mx = service(alternate_headers=["X-Relay-Key"])
    assert mx.header_names == ("X-Milter-Key", "X-Relay-Key")
    insp = inspect(mx, RAW, value, name="X-Relay-Key")
    assert insp.trusted is not None and insp.says_ran("av")
    # an alternate header name that is not configured is not even looked at
    assert inspect(service(), RAW, value, name="X-Relay-Key").checks == []
    # a key under the alternate name made with another secret is refused
    forged = key_for(service({"k1": SECRET2}, header_name="X-Relay-Key"))
    insp = inspect(mx, RAW, forged, name="X-Relay-Key")
    assert insp.trusted is None and insp.rejected[0][0] == "X-Relay-Key"


def test_from_config_reads_every_setting(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    generate_secret_file(path, "k1")
    svc = KeyService.from_config(_config(
        path, milterkeyheader="X-Our-Key", alternate_key_header=["X-Their-Key", "x-our-key"],
        key_body_binding="none", key_clock_skew=7, defaultexpiration=1000, hostname="h.example"))
    assert svc.header_names == ("X-Our-Key", "X-Their-Key")
    assert (svc.binding, svc.clock_skew, svc.default_expiration, svc.hostname) == \
        ("none", 7, 1000, "h.example")


def test_hostname_that_cannot_go_in_a_key_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    generate_secret_file(path, "k1")
    with pytest.raises(ConfigError, match=r"hostname.*cannot go in a milter key"):
        KeyService.from_config(_config(path, hostname="mx 1;evil"))


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


# --- the CLI ---------------------------------------------------------------------------------


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="miltermonkey")
    add_key_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    status: int = args.func(args)
    return status


def test_cli_key_generate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "secret"
    assert _cli(["key", "generate", "--file", str(p), "--key-id", "k1"]) == 0
    assert "created with key k1" in capsys.readouterr().out
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert _cli(["key", "generate", str(p), "--key-id", "k2"]) == 0
    assert 'key_id = "k2"' in capsys.readouterr().out
    assert list(load_secrets(p)) == ["k1", "k2"]
    assert _cli(["key", "generate", "--file", str(p), "--key-id", "k3", "--force"]) == 0
    assert list(load_secrets(p)) == ["k3"]
    # the file of a configuration
    cfg = tmp_path / "mm.toml"
    other = tmp_path / "other-secret"
    cfg.write_text(f'[miltermonkey]\nmiltersecretfile = "{other}"\n')
    assert _cli(["key", "generate", "-c", str(cfg)]) == 0
    check_secret_file(other)


def test_cli_key_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    secret = tmp_path / "secret"
    generate_secret_file(secret, "k1")
    cfg = tmp_path / "mm.toml"
    cfg.write_text(f'[miltermonkey]\nmilter_key = true\nmiltersecretfile = "{secret}"\n')
    import time

    svc = KeyService(load_secrets(secret), hostname="mx1.example.org", clock=time.time)
    good = key_for(svc)
    eml = tmp_path / "m.eml"

    eml.write_bytes(with_headers(RAW, ("X-Milter-Key", good)))
    assert _cli(["key", "verify", str(eml), "-c", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "X-Milter-Key #1: TRUSTED: key k1 from mx1.example.org" in out
    assert "ran: av (continue), spam (continue)" in out

    eml.write_bytes(with_headers(OTHER, ("X-Milter-Key", "v=2; junk"), ("X-Milter-Key", good)))
    assert _cli(["key", "verify", str(eml), "-c", str(cfg)]) == 1
    out = capsys.readouterr().out
    assert "X-Milter-Key #1: NOT TRUSTED: malformed" in out
    assert "X-Milter-Key #2: NOT TRUSTED: wrong message" in out
    assert "result: no trusted key" in out

    eml.write_bytes(RAW)
    assert _cli(["key", "verify", str(eml), "-c", str(cfg)]) == 1
    assert "no key header" in capsys.readouterr().out

    secret.chmod(0o644)
    with pytest.raises(SecretError, match="chmod 600"):
        _cli(["key", "verify", str(eml), "-c", str(cfg)])


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


# --- the encodings, as docs/milter-key.md writes them down -----------------------------------


def _documented_bound_digest(headers: list[tuple[str, str]]) -> bytes:
    """The bound headers' digest computed from the docs, not from the code."""
    def lp(b: bytes) -> bytes:
        return len(b).to_bytes(4, "big") + b

    out = lp(b"MilterMonkey bound headers")
    for name in ("MIME-Version", "Content-Type", "Content-Transfer-Encoding",
                 "Content-Disposition"):
        values = [v.replace("\r", "").replace("\n", "").strip(" \t").encode()
                  for n, v in headers if n.lower() == name.lower()]
        out += lp(name.lower().encode()) + lp(str(len(values)).encode())
        out += b"".join(lp(v) for v in values)
    return hashlib.sha256(out).digest()


def test_bound_headers_digest_is_the_documented_encoding() -> None:
    cases = [
        [],
        [("Subject", "x")],
        [("MIME-Version", "1.0"), ("Content-Type", "text/plain")],
        [("content-type", 'multipart/mixed;\n\tboundary="a  b" '), ("CONTENT-TYPE", ""),
         ("Content-Disposition", "attachment; filename=x.exe"),
         ("Content-Transfer-Encoding", " base64\t")],
    ]
    for headers in cases:
        expected = _documented_bound_digest(headers)
        assert mime_digest(Headers(Header.from_str(n, v) for n, v in headers)) == expected


def test_canonical_header_value() -> None:
    assert canonical_header_value("text/plain") == b"text/plain"
    assert canonical_header_value(' \tmultipart/mixed;\r\n\tboundary="a  b" \t') == \
        b'multipart/mixed;\tboundary="a  b"'
    assert canonical_header_value("a\n b") == b"a b"
    # only spaces and tabs are trimmed: other control characters are part of the value
    assert canonical_header_value("text/plain\x0c") == b"text/plain\x0c"
    assert canonical_header_value("\x0btext/plain") == b"\x0btext/plain"
    assert canonical_header_value("XtypeX") == b"XtypeX"
    assert canonical_header_value("caf\udce9") == b"caf\xe9"  # 8-bit bytes as they came


def test_mid_fingerprint_is_the_documented_one() -> None:
    for mid in ("<m1@example.org>", "<caf\udce9@example.org>"):
        raw = mid.encode("utf-8", "surrogateescape")
        expected = base64.urlsafe_b64encode(hashlib.sha256(b"mid\x00" + raw).digest()[:6])
        assert mid_tag(mid) == expected.decode()


def test_an_eight_bit_message_id_signs_and_verifies() -> None:
    raw = RAW.replace(b"<m1@example.org>", b"<caf\xe9@example.org>")
    svc = service()
    value = key_for(svc, raw)
    assert reason_of(svc, raw, value) is None
    got = reason_of(svc, RAW, value)
    assert got is not None and got.startswith(Reason.WRONG_MESSAGE)


@pytest.mark.parametrize("name", ["X-Milter-Key", "X-K", "X-A-Much-Longer-Key-Header-Name"])
@pytest.mark.parametrize("brains", [2, 7, 23])
def test_folding_fills_each_line_up_to_76_columns(name: str, brains: int) -> None:
    ran = tuple((f"brain-{i:02d}", "continue" if i % 3 else "accept") for i in range(brains))
    fields = service().sign(ran, "<m1@example.org>", bytes(32), bytes(32))
    lines = fields.format(name).split("\n\t")
    prefixes = [len(name) + 2] + [1] * (len(lines) - 1)  # "Name: ", then the tab
    for i, (line, prefix) in enumerate(zip(lines, prefixes, strict=True)):
        assert prefix + len(line) <= 76, (i, line)
        if i + 1 < len(lines):
            following = re.split(r"(?<=,)|(?<=;) ", lines[i + 1])[0]
            sep = "" if line.endswith(",") else " "
            assert prefix + len(line) + len(sep) + len(following) > 76, (line, following)
    assert "".join(lines).replace(" ", "") == \
        "".join(f"{t}={v};" for t, v in fields.items()).rstrip(";").replace(" ", "")
    assert fields.format() == fields.format("X-Milter-Key")


def _bad(value: str) -> str:
    with pytest.raises(MalformedKey) as e:
        KeyFields.parse(value)
    return str(e.value)


def test_parse_says_what_is_wrong() -> None:
    value = key_for(service()).replace("\n\t", " ")
    assert _bad("") == "empty"
    assert _bad(" \t\r\n ") == "empty"
    assert _bad("x" * 8193) == "longer than 8192 characters"
    assert _bad("v=2" + " " * 8189) == \
        "fields v; expected v,id,host,exp,bind,mid,ran,mac"
    assert _bad("\x0b" + value) == "expected tag=value, got '\\x0bv=2'"
    assert _bad("id=k1; " + value) == "does not start with the format version v="
    assert _bad("v=9; id=k1") == "unsupported format version v='9'"
    assert _bad("v=" + "9" * 41) == f"unsupported format version v='{'9' * 40}...'"
    assert _bad("v=" + "9" * 40) == f"unsupported format version v='{'9' * 40}'"
    assert _bad("v=2; id=k1") == "fields v,id; expected v,id,host,exp,bind,mid,ran,mac"
    assert _bad(value.replace("bind=body", "bind=none")) == (
        "fields v,id,host,exp,bind,mid,body,mime,ran,mac; expected "
        "v,id,host,exp,bind,mid,ran,mac")
    assert _bad(edit_field(value, "host", "h" * 41 + "!")) == f"bad host='{'h' * 40}...'"
    assert _bad(edit_field(value, "ran", "av-continue")) == \
        "bad ran entry 'av-continue': expected brain:verdict"
    assert _bad(edit_field(value, "ran", "av:continue,av:accept")) == "brain av listed twice"


def test_characters_around_a_key_are_not_ignored() -> None:
    svc = service()
    value = key_for(svc)
    for changed in (value + "X", "X" + value, value + "\x0b", "\x0c" + value):
        assert reason_of(svc, RAW, changed) is not None, changed
    for ignored in (value + " \t", "\r\n " + value):
        assert reason_of(svc, RAW, ignored) is None


# --- KeyService's own checks and messages -----------------------------------------------------


def test_service_refuses_bad_settings_with_reasons() -> None:
    with pytest.raises(SecretError, match=r"^no milter key secret given$"):
        KeyService({})
    with pytest.raises(SecretError, match=r"^key_id 'k9' is not in the secret file \(it has: "
                       r"a, b\); add it with `miltermonkey key generate --key-id k9` or fix "
                       r"key_id$"):
        KeyService({"a": SECRET1, "b": SECRET2}, signing_key="k9")
    with pytest.raises(ValueError, match=r"^key_body_binding must be one of \('body', 'none'\), "
                       r"not 'headers'$"):
        KeyService({"a": SECRET1}, binding="headers")
    with pytest.raises(ValueError, match=r"^hostname 'a b' cannot go in a milter key$"):
        KeyService({"a": SECRET1}, hostname="a b")
    with pytest.raises(ValueError, match=r"^content-type cannot hold a milter key: the key binds "
                       r"that header$"):
        KeyService({"a": SECRET1}, alternate_headers=["X-Relay-Key", "Content-Type"])
    assert KeyService({"a": SECRET1}).hostname == "localhost"
    svc = KeyService({"a": SECRET1}, alternate_headers=["X-A", "X-B", "x-a", "x-milter-KEY"])
    assert svc.header_names == ("X-Milter-Key", "X-A", "X-B")


def test_a_bound_header_cannot_be_the_key_header_in_the_config(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    generate_secret_file(path, "k1")
    with pytest.raises(ConfigError) as e:
        KeyService.from_config(_config(path, milterkeyheader="MIME-Version"))
    assert e.value.key == "milterkeyheader"
    assert "MIME-Version cannot hold a milter key: the key binds that header" in str(e.value)
    with pytest.raises(ConfigError) as e:
        KeyService.from_config(_config(path, alternate_key_header=["X-Ok", "content-disposition"]))
    assert e.value.key == "alternate_key_header"
    assert "content-disposition cannot hold a milter key" in str(e.value)


def test_from_config_takes_each_brains_expiration(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    generate_secret_file(path, "k1")
    config = loads(f'[miltermonkey]\nmilter_key = true\nmiltersecretfile = "{path}"\n'
                   '[[brain]]\nuse = "av"\nexpiration = "1d"\n[[brain]]\nuse = "spam"\n')
    svc = KeyService.from_config(config)
    assert svc.expirations == {"av": DAY}
    assert svc.lifetime(["av", "spam"]) == DAY


@pytest.mark.parametrize(("fqdn", "name"), [
    ("Mx1.Example.ORG", "Mx1.Example.ORG"),
    ("._-mx 1!.example.", "mx-1-.example."),
    ("\xc4\xd6", "localhost"),
    ("", "localhost"),
    ("h" * 300, "h" * 253),
])
def test_hostname_from_the_fqdn_is_made_fit_for_a_key(
        fqdn: str, name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "secret"
    generate_secret_file(path, "k1")
    monkeypatch.setattr(socket, "getfqdn", lambda: fqdn)
    assert KeyService.from_config(_config(path)).hostname == name


def test_a_configured_hostname_that_cannot_go_in_a_key_names_the_setting(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    generate_secret_file(path, "k1")
    with pytest.raises(ConfigError) as e:
        KeyService.from_config(_config(path, hostname="mx1;evil"))
    assert e.value.key == "hostname"
    assert "'mx1;evil' cannot go in a milter key: use letters, digits, '.', '_' and '-' only" \
        in str(e.value)


def test_check_judges_at_the_instant_it_is_given() -> None:
    svc = service()  # its clock says NOW
    m = msg(RAW)
    value = key_for(svc)
    args = (value, normalize_message_id(m.headers), m.body.sha256(), mime_digest(m.headers))
    expiry = NOW + 432000
    assert svc.check(*args, NOW)[1] is None
    assert svc.check(*args, expiry + 300)[1] is None
    assert svc.check(*args, expiry + 301)[1] == "expired 301 s ago"
    # a key may be made at most max_lifetime (+ skew) ahead
    assert svc.check(*args, expiry - 432000 - 300)[1] is None
    assert svc.check(*args, expiry - 432000 - 301)[1] == (
        "expiry too far in the future: 432301 s from now, more than the longest lifetime "
        "here (432000 s)")


def test_refusal_reasons_read_in_full() -> None:
    svc = service()
    value = key_for(svc)
    unbound = key_for(service(binding="none"))
    assert reason_of(svc, RAW, unbound) == \
        "not bound to the body (bind=none) while key_body_binding = body here"
    assert reason_of(svc, with_headers(RAW, ("Content-Type", "text/html")), value) == (
        "wrong MIME headers: MIME-Version, Content-Type, Content-Transfer-Encoding, "
        "Content-Disposition changed since the key was made, so the body reads differently")
    assert reason_of(svc, RAW + b"x", value) == \
        "wrong body: the body changed since the key was made"


def test_skip_brains_adds_up_over_calls() -> None:
    svc = service()
    insp = inspect(svc, RAW, key_for(svc))
    slot = attrs.make_class("S", {"name": attrs.field(), "skip_if_key": attrs.field()})
    assert insp.skip_brains([slot("av", True), slot("spam", False)]) == {"av"}
    assert insp.skip_brains([slot("spam", True), slot("other", True)]) == {"spam"}
    assert insp.spared == {"av", "spam"}


def test_inspect_records_each_header_and_logs_the_trusted_one(
        caplog: pytest.LogCaptureFixture) -> None:
    svc = service()
    good = key_for(svc)
    caplog.set_level("DEBUG", logger="miltermonkey")
    m = msg(with_headers(RAW, ("X-Milter-Key", "v=2; bad"), ("x-milter-key", good)))
    insp = svc.inspect(m)
    assert [(c.header, c.index, c.value, c.trusted) for c in insp.checks] == [
        ("X-Milter-Key", 1, "v=2; bad", False), ("x-milter-key", 2, good, True)]
    assert m.notes["_mm_key"] is insp
    assert [r.getMessage() for r in caplog.records] == [
        f"{m.id}: trusted milter key in x-milter-key #2: key k1 from mx1.example.org, "
        "ran av,spam"]


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
