"""The spam brain and the core's scan cache: what the key is made of, and replays that match.

The key tests need no spamd (the brain never connects while working out a
key).  The replay tests put a pass-through spamd in front of the real one
(``FakeSpamd.forwarding``), so "spamd was not asked" is a count of
connections, not a guess from timings.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
from miltermonkey_spam import SpamBrain, SpamOptions, SpamResult
from miltermonkey_spam.cachekey import engine_identity
from miltermonkey_spam.testing import FakeSpamd, Spamd, ham, spam

from miltermonkey_core.contract.model import Connection, Message, message_from_bytes
from miltermonkey_core.contract.monkey import Monkey
from miltermonkey_core.engine.build import chain_of
from miltermonkey_core.engine.cache import MemoryCache
from miltermonkey_core.engine.offline import OfflineResult, run_engine
from miltermonkey_core.engine.session import Engine
from miltermonkey_core.testing.client import ConnectInfo, MessageSpec, SessionResult, run_session
from miltermonkey_core.testing.daemon import MonkeyProcess

#: Never contacted: a key is worked out without asking spamd.
DEAD = "127.0.0.1:9"
#: One message, built once (``ham()`` stamps the current time into Date:).
RAW = ham("cache key", extra_headers="X-Mailer: test\r\n")


def answer(checker: str = "SpamAssassin 4.0.1 (2024-03-25) on mx1", required: str = "5.0",
           *extra: tuple[str, str]) -> SpamResult:
    """A HEADERS answer as the brain's client returns it (only what the key reads matters)."""
    headers = (("X-Spam-Checker-Version", checker),
               ("X-Spam-Status", f"No, score=0.3 required={required} tests=NONE"), *extra)
    return SpamResult("HEADERS", False, 0.3, float(required), "0.3", required,
                      headers=headers, protocol="1.1")


def brain(**options: Any) -> SpamBrain:
    """A spam brain that has already had one answer from spamd (its version is known)."""
    b = SpamBrain(SpamOptions(**{"servers": [DEAD], **options}), Monkey(), "spam")
    b.spamd_identity = engine_identity(answer())
    return b


def message(raw: bytes = RAW, *, address: str = "198.51.100.7", helo: str = "mail.example.com",
            hostname: str = "mail.example.com", sender: str = "<alice@example.com>",
            queue_id: str = "4QAAA1", port: int = 40000, auth: str | None = None,
            recipients: Sequence[str] = ("<bob@example.org>",), session: str = "s1") -> Message:
    macros = {"{auth_authen}": auth} if auth else {}
    conn = Connection(id=session, hostname=hostname, family="inet", address=address, port=port,
                      helo=helo, macros=macros)
    return message_from_bytes(raw, sender=sender, recipients=list(recipients), connection=conn,
                              macros={"i": queue_id}, queue_id=queue_id)


def key(b: SpamBrain, m: Message) -> Sequence[str | bytes]:
    k = b.cache_key(m)
    assert k is not None
    return k


# --------------------------------------------------------------------------------------
# What the key is made of
# --------------------------------------------------------------------------------------


def test_a_retry_from_the_same_client_has_the_same_key() -> None:
    """Postfix retrying after a 4xx: new queue id, new session, new port, other recipients."""
    b = brain()
    first = message(queue_id="4QAAA1", session="s1", port=40000)
    retry = message(queue_id="4QBBB2", session="s9", port=51234,
                    recipients=["<carol@example.org>", "<dave@example.org>"])
    assert key(b, first) == key(b, retry)
    # what spamd gets does differ (queue id and date in the Received line); the key does not
    sent = [b"".join(b.payload(m)[0]()) for m in (first, retry)]
    assert sent[0] != sent[1] and b"4QAAA1" in sent[0] and b"4QBBB2" in sent[1]


@pytest.mark.parametrize(("what", "changed"), [
    ("client address", {"address": "198.51.100.8"}),
    ("HELO name", {"helo": "other.example.com"}),
    ("reverse DNS name", {"hostname": "unknown"}),
    ("envelope sender", {"sender": "<mallory@example.com>"}),
    ("SASL login", {"auth": "alice"}),
    ("a header's value", {"raw": RAW.replace(b"X-Mailer: test", b"X-Mailer: test2")}),
    ("an added header",
     {"raw": RAW.replace(b"X-Mailer:", b"Reply-To: c@example.com\r\nX-Mailer:")}),
    ("the body", {"raw": RAW + b"P.S.\r\n"}),
    ("a forged X-Spam-Report (deleted by name)",
     {"raw": RAW.replace(b"X-Mailer:", b"X-Spam-Report: forged\r\nX-Mailer:")}),
])
def test_what_spamd_sees_changes_the_key(what: str, changed: dict[str, Any]) -> None:
    b = brain(skip_authenticated=False)
    assert key(b, message()) != key(b, message(**changed)), what


@pytest.mark.parametrize("changed", [
    {"user": "alice"}, {"command": "symbols"}, {"received_header": False},
    {"remove_headers": ["X-Spam-*"]}, {"legacy_rating": False}, {"rating_ladder": [6, 12]},
    {"subject_tag": "[SPAM]"}, {"reject_score": 15}, {"reject_code": 554},
    {"reject_xcode": "5.7.0"}, {"reject_text": "No thanks (score {score})"},
    {"quarantine_score": 8},
])
def test_options_that_change_the_answer_change_the_key(changed: dict[str, Any]) -> None:
    assert key(brain(), message()) != key(brain(**changed), message())


@pytest.mark.parametrize("changed", [
    {"servers": ["127.0.0.1:10", DEAD]}, {"balance": "round_robin"}, {"scan_timeout": 5},
    {"connect_timeout": 1}, {"cooldown": 0}, {"max_size": "2M"}, {"on_engine_error": "tempfail"},
    {"on_too_large": "accept"}, {"cache_ttl": 60}, {"trusted_networks": ["10.0.0.0/8"]},
])
def test_options_that_do_not_change_the_answer_keep_the_key(changed: dict[str, Any]) -> None:
    assert key(brain(), message()) == key(brain(**changed), message())


def test_the_spamd_that_answers_is_part_of_the_key() -> None:
    b = brain()
    m = message()
    before = key(b, m)
    b.spamd_identity = engine_identity(answer("SpamAssassin 4.0.1 (2024-03-25) on mx2"))
    assert key(b, m) == before  # another host of the same farm
    for other in (answer("SpamAssassin 4.0.2 (2025-01-01) on mx1"),  # an upgrade
                  answer(required="6.0"),  # required_score changed
                  answer("SpamAssassin 4.0.1 (2024-03-25) on mx1", "5.0",
                         ("X-Spam-Rules-Version", "1916391"))):  # rules version, if shown
        b.spamd_identity = engine_identity(other)
        assert key(b, m) != before


def test_engine_identity_reads_version_rules_and_required() -> None:
    text = engine_identity(answer("SpamAssassin 4.0.1 (2024-03-25) on mx1.example.net", "5.0",
                                  ("X-Spam-Rules-Version", "1916391"),
                                  ("X-Spam-Report", "per message, not the engine")))
    assert text.split("\n") == ["SPAMD/1.1", "required=5.0",
                                "SpamAssassin 4.0.1 (2024-03-25)",
                                "x-spam-rules-version: 1916391"]


def test_nothing_is_cached_before_spamd_has_answered_once() -> None:
    b = SpamBrain(SpamOptions(servers=[DEAD]), Monkey(), "spam")
    assert b.spamd_identity is None and b.cache_key(message()) is None


def test_messages_the_brain_will_not_scan_have_no_key() -> None:
    assert brain().cache_key(message(auth="alice")) is None  # skipped: authenticated
    assert brain(max_size=len(RAW)).cache_key(message()) is None  # too large with the Received
    assert brain(skip_authenticated=False).cache_key(message(auth="alice")) is not None


def test_cache_ttl_and_independence() -> None:
    assert SpamBrain(SpamOptions(), Monkey()).cache_ttl == 300
    assert SpamBrain(SpamOptions(cache_ttl="5m"), Monkey()).cache_ttl == 300
    assert SpamBrain(SpamOptions(cache_ttl=0), Monkey()).cache_ttl == 0
    assert SpamBrain(SpamOptions(), Monkey()).independent
    # the tag goes on the Subject as earlier brains left it: not started ahead of them
    assert not SpamBrain(SpamOptions(subject_tag="[SPAM]"), Monkey()).independent
    assert SpamBrain.independent


# --------------------------------------------------------------------------------------
# Replays: in-process, then through a real daemon
# --------------------------------------------------------------------------------------


@pytest.fixture
def counting_spamd(spamd: Spamd) -> Iterator[FakeSpamd]:
    """The session spamd behind a pass-through that counts the requests it gets."""
    with FakeSpamd(FakeSpamd.forwarding(spamd.address)) as proxy:
        yield proxy


def outcomes(r: OfflineResult) -> list[str]:
    return [b.outcome for b in r.results]


CLIENT = Connection(id="c", hostname="mail.example.com", family="inet", address="198.51.100.7",
                    port=40000, helo="mail.example.com")


@pytest.mark.engines
@pytest.mark.parametrize("options", [{}, {"reject_score": 15}, {"quarantine_score": 15}])
def test_a_replayed_gtube_verdict_is_the_scanned_one(counting_spamd: FakeSpamd,
                                                     options: dict[str, Any]) -> None:
    b = SpamBrain(SpamOptions(servers=[counting_spamd.address], **options), Monkey(), "spam")
    engine = Engine(chain_of(b), Monkey(), cache=MemoryCache())
    gtube = spam("cached gtube", extra_headers="X-Spam-Flag: NO\r\nX-Spam-Report: forged\r\n")

    def run(raw: bytes, qid: str) -> OfflineResult:
        conn = attrs.evolve(CLIENT, id=qid, macros={}, notes={})
        return run_engine(engine, raw, connection=conn, macros={"i": qid})

    assert outcomes(run(ham("warm-up"), "Q0")) == ["ran"]  # spamd's version is learnt here
    scanned, replayed = run(gtube, "Q1"), run(gtube, "Q2")
    assert (outcomes(scanned), outcomes(replayed)) == (["ran"], ["cached"])
    assert counting_spamd.connections == 2
    assert replayed.headers == scanned.headers
    assert replayed.header("X-Spam-Flag") == "YES" and replayed.header("X-Spam-Report") is None
    assert (replayed.verdict and replayed.verdict.describe()) == \
        (scanned.verdict and scanned.verdict.describe())
    assert replayed.ctx.quarantine_request == scanned.ctx.quarantine_request
    if "reject_score" in options:
        assert replayed.verdict is not None and replayed.verdict.describe().startswith("reject 550")
    if "quarantine_score" in options:
        assert replayed.ctx.quarantine_request is not None


def test_unchecked_results_are_not_cached() -> None:
    """spamd hanging up and a message above max_size: marked unchecked, scanned again next time."""
    with FakeSpamd(FakeSpamd.hanging_up) as down:
        for options in ({"servers": [down.address], "cooldown": 0},
                        {"servers": [down.address], "max_size": 100}):
            b = SpamBrain(SpamOptions(**options), Monkey(), "spam")
            b.spamd_identity = engine_identity(answer())
            cache = MemoryCache()
            engine = Engine(chain_of(b), Monkey(), cache=cache)
            for qid in ("Q1", "Q2"):
                r = run_engine(engine, RAW,
                               connection=attrs.evolve(CLIENT, id=qid, macros={}, notes={}))
                assert outcomes(r) == ["ran"]
                assert (r.header("X-Spam-Status") or "").startswith("Unchecked (")
            assert len(cache) == 0


SENDER = "<sender@example.com>"
RCPTS = ["<rcpt@example.org>"]
HERE = ConnectInfo(hostname="mail.example.com", address="198.51.100.7")


def send(m: MonkeyProcess, *raws: bytes, where: ConnectInfo = HERE) -> list[SessionResult]:
    return run_session(m.address, [MessageSpec(r, SENDER, RCPTS) for r in raws],
                       connect_info=where, timeout=30)


@pytest.mark.engines
def test_daemon_replays_a_flag_and_asks_spamd_again_for_another_client(
        counting_spamd: FakeSpamd, tmp_path: Path) -> None:
    gtube = spam("daemon gtube", extra_headers="X-Spam-Flag: NO\r\n")
    brains = [{"use": "spam", "servers": [counting_spamd.address]}]
    with MonkeyProcess(tmp_path / "m", brains) as m:
        warm, scanned, replayed = send(m, ham("warm-up"), gtube, gtube)
        asked = counting_spamd.connections
        log = m.wait_for_log("cached result replayed")
        [elsewhere] = send(m, gtube, where=ConnectInfo(hostname="mail.example.com",
                                                        address="198.51.100.8"))
    assert warm.accepted and scanned.accepted and replayed.accepted
    assert asked == 2 and counting_spamd.connections == 3
    lines = [ln for ln in log.splitlines() if "cached result replayed" in ln]
    assert len(lines) == 1 and replayed.queue_id in lines[0] and "brain spam" in lines[0]
    assert log.count("spam: tagged score=") == 1  # the brain itself ran once for the GTUBE
    assert scanned.applied is not None and replayed.applied is not None
    assert replayed.applied.headers == scanned.applied.headers
    assert replayed.applied.header_values("X-Spam-Flag") == ["YES"]
    assert elsewhere.applied is not None
    assert elsewhere.applied.header_values("X-Spam-Flag") == ["YES"]


@pytest.mark.engines
def test_daemon_replays_a_reject(counting_spamd: FakeSpamd, tmp_path: Path) -> None:
    gtube = spam("daemon reject")
    brains = [{"use": "spam", "servers": [counting_spamd.address], "reject_score": 15}]
    with MonkeyProcess(tmp_path / "m", brains) as m:
        warm, scanned, replayed = send(m, ham("warm-up reject"), gtube, gtube)
        log = m.wait_for_log("cached result replayed")
    assert warm.accepted and scanned.rejected and replayed.rejected
    assert counting_spamd.connections == 2
    assert scanned.reply is not None and replayed.reply is not None
    assert str(replayed.reply) == str(scanned.reply)
    assert replayed.reply.code == 550 and "Blocked by SpamAssassin" in str(replayed.reply)
    assert f"{replayed.queue_id}: brain spam: cached result replayed (reject 550" in log
