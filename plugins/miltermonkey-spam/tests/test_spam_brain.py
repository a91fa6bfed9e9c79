"""The spam brain in-process (the core's runner), against the real spamd.

These go through the same Session calls as the daemon (connect, MAIL FROM
with its macros, headers, body, end of message), without a socket.
"""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace
from typing import Any

import pytest
from miltermonkey_spam import SpamBrain, SpamOptions
from miltermonkey_spam import headers as hdr
from miltermonkey_spam.testing import FakeSpamd, ham, spam

from miltermonkey_core.config import BrainEntry, build_brain_options
from miltermonkey_core.contract.edits import Capability
from miltermonkey_core.contract.model import Connection, message_from_bytes
from miltermonkey_core.contract.monkey import Monkey
from miltermonkey_core.contract.verdict import Action
from miltermonkey_core.engine.build import chain_of
from miltermonkey_core.engine.offline import OfflineResult, run_engine
from miltermonkey_core.engine.session import Engine
from miltermonkey_core.errors import ConfigError
from miltermonkey_core.plugins import load_brain_class

pytestmark = pytest.mark.engines

def brain(**options: Any) -> SpamBrain:
    return SpamBrain(SpamOptions(**options), Monkey(debug_level=60), "spam")


def run(b: SpamBrain, raw: bytes, **kw: Any) -> OfflineResult:
    return run_engine(Engine(chain_of(b), Monkey()), raw, **kw)


def values(r: OfflineResult, name: str) -> list[str]:
    return r.ctx.headers.get_all(name)


def unfold(value: str) -> str:
    return " ".join(value.split())


@pytest.fixture
def spam_brain(spamd_address: str) -> SpamBrain:
    return brain(servers=[spamd_address])


# --------------------------------------------------------------------------------------
# What gets written
# --------------------------------------------------------------------------------------


def test_gtube_is_flagged_with_spamassassin_headers_and_rating(spam_brain: SpamBrain) -> None:
    r = run(spam_brain, spam())
    assert r.action is Action.ACCEPT and r.verdict is None
    assert values(r, "X-Spam-Flag") == ["YES"]
    [status] = values(r, "X-Spam-Status")
    flat = unfold(status).replace(", ", ",")
    assert flat.startswith("Yes, score=100") or flat.startswith("Yes,score=100")
    assert "required=5.0" in flat and "GTUBE" in flat and "version=" in flat
    assert "autolearn=" in flat
    assert flat.endswith("rating=SSSSS")
    assert values(r, "X-Spam-Level") == ["*" * 50]
    [checker] = values(r, "X-Spam-Checker-Version")
    assert checker.startswith("SpamAssassin ")
    assert all(len(line) < 100 for line in status.split("\n"))  # folded like SA's own
    notes = r.ctx.message.notes["spam"]
    assert notes["checked"] and notes["is_spam"] and notes["rating"] == "SSSSS"
    assert "GTUBE" in notes["tests"] and notes["action"] == "tagged"


def test_clean_message_is_marked_no_and_forged_flag_removed(spam_brain: SpamBrain) -> None:
    forged = ("X-Spam-Flag: YES\r\nX-Spam-Status: Yes, score=99.0 required=5.0 tests=FAKE\r\n"
              "X-Spam-Level: ****\r\nX-Spam-Report: forged\r\nX-Spam-Score: 99\r\n"
              "X-Spam: Yes\r\nX-Spam-Flag: YES\r\n")
    r = run(spam_brain, ham(extra_headers=forged))
    assert values(r, "X-Spam-Flag") == []  # SpamAssassin's convention: no flag on ham
    [status] = values(r, "X-Spam-Status")
    assert status.startswith("No, score=") and "FAKE" not in status
    assert unfold(status).endswith("rating=")
    assert values(r, "X-Spam-Report") == [] and values(r, "X-Spam-Score") == []
    assert values(r, "X-Spam") == []
    assert len(values(r, "X-Spam-Level")) == 1 and "****" not in values(r, "X-Spam-Level")
    assert r.ctx.message.notes["spam"]["action"] == "clean"


def test_forged_no_on_spam_is_replaced(spam_brain: SpamBrain) -> None:
    r = run(spam_brain, spam(extra_headers="X-Spam-Flag: NO\r\nX-Spam-Status: No\r\n"))
    assert values(r, "X-Spam-Flag") == ["YES"]
    assert [s[:4] for s in values(r, "X-Spam-Status")] == ["Yes,"]


def test_forged_headers_are_not_shown_to_spamd(spam_brain: SpamBrain) -> None:
    msg = message_from_bytes(ham(extra_headers="X-Spam-Status: Yes, forged\r\n"
                                               "X-Spam-Flag: YES\r\nSubject2: x\r\n"))
    chunks, length = spam_brain.payload(msg)
    sent = b"".join(chunks())
    assert len(sent) == length
    assert b"X-Spam" not in sent and b"Subject2: x\r\n" in sent
    head, _, body = sent.partition(b"\r\n\r\n")
    assert head.startswith(b"Received: from ") and b"[127.0.0.1]" in head
    assert b"\r\n" in body and b"\n" not in body.replace(b"\r\n", b"")


def test_folded_headers_reach_spamd_with_crlf(spam_brain: SpamBrain) -> None:
    msg = message_from_bytes(ham(extra_headers="X-Long: first\r\n\tsecond\r\n"))
    sent = b"".join(spam_brain.payload(msg)[0]())
    assert b"X-Long: first\r\n\tsecond\r\n" in sent


def test_received_line_can_be_turned_off(spamd_address: str) -> None:
    b = brain(servers=[spamd_address], received_header=False)
    sent = b"".join(b.payload(message_from_bytes(ham()))[0]())
    assert sent.startswith(b"From: alice@example.com\r\n")


def test_symbols_mode_builds_the_status_itself(spamd_address: str) -> None:
    r = run(brain(servers=[spamd_address], command="symbols"), spam())
    [status] = values(r, "X-Spam-Status")
    flat = unfold(status).replace(", ", ",").replace(",", ", ", 1)
    assert flat.startswith("Yes, score=100") and "required=5.0" in flat
    assert "tests=" in flat and "GTUBE" in flat and flat.endswith("rating=SSSSS")
    assert values(r, "X-Spam-Flag") == ["YES"] and values(r, "X-Spam-Checker-Version") == []


def test_legacy_rating_can_be_dropped(spamd_address: str) -> None:
    r = run(brain(servers=[spamd_address], legacy_rating=False), spam())
    assert "rating=" not in values(r, "X-Spam-Status")[0]


def test_rating_ladder_is_configurable(spamd_address: str) -> None:
    r = run(brain(servers=[spamd_address], rating_ladder=[1, 2000]), spam())
    assert unfold(values(r, "X-Spam-Status")[0]).endswith("rating=S")


def test_subject_tag(spamd_address: str) -> None:
    b = brain(servers=[spamd_address], subject_tag="[SPAM]")
    assert values(run(b, spam(subject="cheap pills")), "Subject") == ["[SPAM] cheap pills"]
    assert values(run(b, spam(subject="[SPAM] again")), "Subject") == ["[SPAM] again"]
    assert values(run(b, ham(subject="lunch")), "Subject") == ["lunch"]


def test_subject_is_left_alone_by_default(spam_brain: SpamBrain) -> None:
    assert values(run(spam_brain, spam(subject="cheap pills")), "Subject") == ["cheap pills"]


# --------------------------------------------------------------------------------------
# Thresholds
# --------------------------------------------------------------------------------------


def test_reject_score(spamd_address: str) -> None:
    b = brain(servers=[spamd_address], reject_score=20)
    r = run(b, spam())
    assert r.action is Action.REJECT
    assert r.verdict is not None and r.verdict.reply is not None
    assert (r.verdict.reply.code, r.verdict.reply.xcode) == (550, "5.7.1")
    assert r.verdict.reply.text.startswith("Blocked by SpamAssassin (score 100")
    assert r.verdict.brain == "spam" and "reject_score 20" in r.verdict.reason
    assert run(b, ham()).action is Action.ACCEPT


def test_reject_reply_is_configurable(spamd_address: str) -> None:
    b = brain(servers=[spamd_address], reject_score=10, reject_code=554, reject_xcode="5.7.0",
              reject_text="Spam ({score}/{required}, limit {threshold}) 100% refused")
    r = run(b, spam())
    assert r.verdict is not None and r.verdict.reply is not None
    assert str(r.verdict.reply).startswith("554 5.7.0 Spam (100")
    assert "/5.0, limit 10) 100% refused" in r.verdict.reply.text


def test_quarantine_score(spamd_address: str) -> None:
    b = brain(servers=[spamd_address], quarantine_score=50)
    assert Capability.QUARANTINE in b.needs.actions
    r = run(b, spam())
    assert r.action is Action.ACCEPT
    assert r.ctx.quarantine_request is not None
    assert "quarantine_score 50" in r.ctx.quarantine_request.reason
    assert values(r, "X-Spam-Flag") == ["YES"]  # the held copy carries the verdict
    assert run(b, ham()).ctx.quarantine_request is None


def test_reject_wins_over_quarantine(spamd_address: str) -> None:
    r = run(brain(servers=[spamd_address], quarantine_score=5, reject_score=10), spam())
    assert r.action is Action.REJECT and r.ctx.quarantine_request is None


def test_needs_are_precise(spamd_address: str) -> None:
    b = brain(servers=[spamd_address])
    assert b.needs.headers and b.needs.body and b.needs.envelope
    assert b.needs.actions == {Capability.ADD_HEADERS, Capability.CHANGE_HEADERS}
    assert b.needs.macros == {"envfrom": ("{auth_authen}",)}
    assert brain(servers=[spamd_address], skip_authenticated=False).needs.macros == {}


# --------------------------------------------------------------------------------------
# Skips
# --------------------------------------------------------------------------------------


def results(r: OfflineResult) -> dict[str, str]:
    return {x.brain: x.outcome for x in r.results}


def test_authenticated_sender_is_not_scanned(spam_brain: SpamBrain) -> None:
    r = run(spam_brain, spam(extra_headers="X-Spam-Flag: NO\r\n"),
            macros={"{auth_authen}": "alice", "{auth_type}": "PLAIN", "i": "4A1B2C"})
    assert results(r) == {"spam": "skipped"}
    assert values(r, "X-Spam-Status") == []
    assert any("authenticated as alice" in line for line in r.log)


def test_authenticated_sender_scanned_when_asked(spamd_address: str) -> None:
    b = brain(servers=[spamd_address], skip_authenticated=False)
    r = run(b, spam(), macros={"{auth_authen}": "alice"})
    assert values(r, "X-Spam-Flag") == ["YES"]


def conn(address: str) -> Connection:
    return Connection(id="t", hostname="client.example", family="inet", address=address,
                      port=4000)


@pytest.mark.parametrize(("address", "trusted"), [
    ("192.0.2.10", True), ("::ffff:192.0.2.10", True), ("2001:db8::5", True),
    ("198.51.100.1", False), ("127.0.0.1", False),
])
def test_trusted_networks(spamd_address: str, address: str, trusted: bool) -> None:
    b = brain(servers=[spamd_address], trusted_networks=["192.0.2.0/24", "2001:db8::/32"])
    r = run(b, spam(), connection=conn(address))
    assert (results(r) == {"spam": "skipped"}) is trusted
    assert bool(values(r, "X-Spam-Flag")) is not trusted


def test_loopback_is_scanned_by_default(spam_brain: SpamBrain) -> None:
    assert SpamOptions().trusted_networks == ()
    assert values(run(spam_brain, spam(), connection=conn("127.0.0.1")), "X-Spam-Flag") == ["YES"]


def test_oversize_is_not_sent_and_tagged() -> None:
    with FakeSpamd(FakeSpamd.hanging_up) as srv:
        b = brain(servers=[srv.address], max_size="2k")
        r = run(b, spam(body=b"x" * 3000, extra_headers="X-Spam-Flag: YES\r\n"))
        assert srv.connections == 0
    [status] = values(r, "X-Spam-Status")
    assert status.startswith("Unchecked (skipped: too large,") and "max_size 2048" in status
    assert values(r, "X-Spam-Flag") == [] and r.action is Action.ACCEPT
    assert r.ctx.message.notes["spam"] == {"checked": False, "skipped": "too large"}


def test_oversize_accept_writes_no_status() -> None:
    b = brain(servers=["127.0.0.1:9"], max_size=1000, on_too_large="accept")
    r = run(b, spam(body=b"x" * 3000))
    assert values(r, "X-Spam-Status") == []


def test_default_max_size_is_spamcs() -> None:
    assert SpamOptions().max_size == 500 * 1024


# --------------------------------------------------------------------------------------
# spamd down or slow
# --------------------------------------------------------------------------------------


def dead_address() -> str:
    with FakeSpamd(lambda c: None) as gone:
        port = gone.port
    return f"127.0.0.1:{port}"


def test_spamd_down_default_tags_and_logs_queue_id(caplog: pytest.LogCaptureFixture) -> None:
    b = brain(servers=[dead_address()])
    with caplog.at_level(logging.WARNING, logger="miltermonkey"):
        r = run(b, spam(extra_headers="X-Spam-Flag: YES\r\n"), macros={"i": "4QZ7XJ1"})
    assert r.action is Action.ACCEPT
    assert values(r, "X-Spam-Status") == ["Unchecked (spamd unavailable)"]
    assert values(r, "X-Spam-Flag") == []
    assert any("4QZ7XJ1: spam: message not scanned, spamd unavailable" in line
               and "on_engine_error=tag" in line for line in r.log)
    assert r.ctx.message.notes["spam"]["checked"] is False


def test_spamd_down_accept(spamd_address: str) -> None:
    r = run(brain(servers=[dead_address()], on_engine_error="accept"),
            ham(extra_headers="X-Spam-Flag: YES\r\n"))
    assert r.action is Action.ACCEPT
    assert values(r, "X-Spam-Status") == [] and values(r, "X-Spam-Flag") == []


def test_spamd_down_tempfail() -> None:
    r = run(brain(servers=[dead_address()], on_engine_error="tempfail"), spam())
    assert r.action is Action.TEMPFAIL
    assert r.verdict is not None and r.verdict.reply is not None
    assert (r.verdict.reply.code, r.verdict.reply.xcode) == (451, "4.7.1")


def test_spamd_down_reject() -> None:
    r = run(brain(servers=[dead_address()], on_engine_error="reject"), spam())
    assert r.action is Action.REJECT
    assert r.verdict is not None and r.verdict.reply is not None
    assert r.verdict.reply.code == 554


def test_slow_spamd_is_bounded_by_timeout() -> None:
    with FakeSpamd(FakeSpamd.hanging()) as slow:
        b = brain(servers=[slow.address], scan_timeout=0.5)
        t0 = time.monotonic()
        r = run(b, spam())
        assert time.monotonic() - t0 < 2.0
    assert values(r, "X-Spam-Status") == ["Unchecked (spamd timed out)"]


def test_failover_to_second_address(spamd_address: str) -> None:
    b = brain(servers=[dead_address(), spamd_address])
    r = run(b, spam())
    assert values(r, "X-Spam-Flag") == ["YES"]
    assert r.ctx.message.notes["spam"]["server"] == spamd_address


# --------------------------------------------------------------------------------------
# Options through the core's config loader
# --------------------------------------------------------------------------------------


def options(**raw: Any) -> SpamOptions:
    entry = BrainEntry(use="spam", name="spam", options=dict(raw))
    opts = build_brain_options(SpamBrain, entry)
    assert isinstance(opts, SpamOptions)
    return opts


def test_entry_point_is_registered() -> None:
    assert load_brain_class("spam") is SpamBrain


def test_defaults() -> None:
    o = options()
    assert o.servers == ("127.0.0.1:783",) and o.on_engine_error == "tag"
    assert o.legacy_rating and o.rating_ladder == (5, 10, 15, 20, 30)
    assert o.reject_score is None and o.quarantine_score is None and o.subject_tag == ""
    assert o.skip_authenticated and o.command == "headers"


def test_seed_like_aliases() -> None:
    o = options(spamd="127.0.0.1:7830", rejectscore=12, quarantinescore=8, maxsize="1M",
                subjecttag="*** SPAM ***", rating=False, ratingladder=[6, 12])
    assert o.servers == ("127.0.0.1:7830",) and o.reject_score == 12.0
    assert o.quarantine_score == 8.0 and o.max_size == 1024 * 1024
    assert o.subject_tag == "*** SPAM ***" and not o.legacy_rating
    assert o.rating_ladder == (6.0, 12.0)


@pytest.mark.parametrize(("raw", "message"), [
    ({"servers": ["nonsense:port"]}, "spamd address"),
    ({"servers": []}, "at least one"),
    ({"rating_ladder": [10, 5]}, "rise strictly"),
    ({"reject_code": 450}, "5xx"),
    ({"reject_xcode": "4.7.1"}, "does not match"),
    ({"on_engine_error": "explode"}, "explode"),
    ({"max_size": "lots"}, "size"),
    ({"scan_timeout": 0}, "more than 0"),
    ({"spamd_timeout": -1}, "more than 0"),
    ({"trusted_networks": ["10.0.0.0/33"]}, "not an IP network"),
    ({"user": "two words"}, "one word"),
    ({"subject_tag": "a\nb"}, "one line"),
    ({"rejectscore": "high"}, "score"),
    ({"servres": ["x"]}, "servers"),
])
def test_bad_options_are_config_errors(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        options(**raw)


@pytest.mark.parametrize(("written", "size"), [
    (4096, 4096), ("500k", 500 * 1024), ("500kb", 500 * 1024), ("2M", 2 * 1024**2),
    ("25MiB", 25 * 1024**2), ("1G", 1024**3),
])
def test_sizes_are_written_as_everywhere_else(written: object, size: int) -> None:
    from miltermonkey_core import parse_size

    assert options(max_size=written).max_size == size == parse_size(written)


def test_durations_are_written_as_everywhere_else() -> None:
    o = options(connect_timeout="1.5", scan_timeout="90s", cooldown="2m", cache_ttl="1h")
    assert (o.connect_timeout, o.scan_timeout, o.cooldown, o.cache_ttl) == (1.5, 90, 120, 3600)
    o = options(connect_timeout=2, scan_timeout=2.5, cooldown=0, cache_ttl=0)  # plain numbers
    assert (o.connect_timeout, o.scan_timeout, o.cooldown, o.cache_ttl) == (2, 2.5, 0, 0)


@pytest.mark.parametrize(("raw", "message"), [
    ({"max_size": 0}, "at least 1"),
    ({"max_size": "1.5M"}, "25MiB"),
    ({"scan_timeout": "soon"}, "duration"),
    ({"connect_timeout": "0s"}, "more than 0"),
    ({"cooldown": "-1s"}, "duration"),
    ({"cache_ttl": -1}, "at least 0"),
    ({"cache_ttl": True}, "duration"),
])
def test_bad_sizes_and_durations_are_config_errors(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        options(**raw)


def test_stars_and_rating_helpers() -> None:
    assert hdr.stars(-3) == "" and hdr.stars(0.9) == "" and hdr.stars(4.99) == "****"
    assert hdr.stars(1000) == "*" * 50
    assert hdr.rating(4.9, (5, 10)) == "" and hdr.rating(10, (5, 10)) == "SS"
    assert hdr.unchecked_status("x") == "Unchecked (x)"
    assert hdr.matches_any("x-spam-FLAG", ["X-Spam-*"]) and not hdr.matches_any("X-Spamd", [
        "X-Spam-*", "X-Spam"])


def test_fold_and_append_keep_lines_short() -> None:
    tests = ",".join(f"RULE_NUMBER_{i}" for i in range(20))
    value = hdr.build_status(is_spam=True, score_text="15.3", required_text="5.0", tests=[tests])
    lines = value.split("\n")
    assert len(lines) > 3 and all(len(line) <= 78 for line in lines[1:])
    assert "".join(line.strip() for line in lines).startswith("Yes,score=15.3")
    appended = hdr.append_field(value, "rating=SSS", len("X-Spam-Status: "))
    assert appended.split("\n")[-1].strip().endswith("rating=SSS")
    assert hdr.append_field("No, score=1.0", "rating=", 15) == "No, score=1.0 rating="


def test_warns_when_spamd_may_outlast_the_daemons_limits(caplog: pytest.LogCaptureFixture,
                                                         spamd_address: str) -> None:
    config = SimpleNamespace(daemon=SimpleNamespace(eom_timeout=20.0),
                             brain=lambda name: SimpleNamespace(timeout=10.0))
    with caplog.at_level(logging.WARNING, logger="miltermonkey"):
        SpamBrain(SpamOptions(servers=[spamd_address], scan_timeout=15), Monkey(config=config),
                  "spam")
    text = caplog.text
    assert "this brain's timeout is 10 s" in text
    assert "eom_timeout" not in text  # 17 s < 20 s
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="miltermonkey"):
        SpamBrain(SpamOptions(servers=[spamd_address]), Monkey(config=SimpleNamespace(
            daemon=SimpleNamespace(eom_timeout=240.0), brain=lambda n: SimpleNamespace(
                timeout=60.0))), "spam")
    assert caplog.text == ""  # the defaults fit the core's defaults


def test_no_option_clashes_with_the_keys_every_brain_table_has() -> None:
    import attrs

    from miltermonkey_core.config import BRAIN_KEYS

    names = {a.name for a in attrs.fields(SpamOptions)} | set(SpamOptions.OPTION_ALIASES)
    assert not names & set(BRAIN_KEYS)
    assert set(SpamOptions.OPTION_ALIASES.values()) <= {a.name for a in attrs.fields(SpamOptions)}


def test_every_option_is_documented_in_the_readme() -> None:
    import re
    from pathlib import Path

    import attrs

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| [^|]+ \| [^|]+ \|(.*)\|$", readme, re.M))
    fields = attrs.fields(SpamOptions)
    assert set(rows) == {f.name for f in fields}
    for f in fields:
        assert f.metadata.get("doc"), f.name
    for alias, target in SpamOptions.OPTION_ALIASES.items():
        assert f"`{alias}`" in rows[target], alias
