"""Streaming to clamd while the body arrives: used when it fits, dropped when not, never leaked.

In-process tests drive the core's real session (the calls the milter layer
makes for each MTA command) against real clamds, one chunk at a time, so a
test can look at clamd's side between two chunks: a pass-through
(:class:`CountingClamd`) records each INSTREAM connection, how many bytes it
got and whether it was finished or hung up.  The last tests go through a
real Postfix and the daemon.
"""

from __future__ import annotations

import hashlib
import random
import re
import socket
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from typing import Any

import attrs
import pytest
from av_helpers import (
    CountingClamd,
    SmallStreamClamd,
    maillog_ids,
    make_brain,
    settle,
    smtp_data,
    tcp,
    unix,
)
from miltermonkey_av.brain import AntiVirusBrain, ClamdEngine
from miltermonkey_av.stream import BodyStream, StreamNote
from miltermonkey_av.testing import EICAR, Clamd
from miltermonkey_av.testing import samples as av_samples

from miltermonkey_core.contract.context import MilterContext
from miltermonkey_core.contract.edits import Capability
from miltermonkey_core.contract.model import Connection, Header, Headers, message_from_bytes
from miltermonkey_core.contract.verdict import Action
from miltermonkey_core.engine.build import chain_of
from miltermonkey_core.engine.cache import MemoryCache
from miltermonkey_core.engine.session import Decision, Engine, Session
from miltermonkey_core.testing.daemon import MonkeyProcess
from miltermonkey_core.testing.part import require_or_skip
from miltermonkey_core.testing.postfix import Postfix
from miltermonkey_core.testing.process import free_port
from miltermonkey_core.testing.sink import SmtpSink, parse_dump

pytestmark = pytest.mark.engines

MIB = 1024 * 1024


def big_message(size: int, *, virus: bool = False, subject: str = "big") -> bytes:
    """About ``size`` bytes: a text part and a random attachment; EICAR as the last part."""
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = "alice@example.org", "bob@example.net", subject
    m["Message-ID"] = f"<{subject.replace(' ', '-')}-{size}@example.org>"
    m.set_content("The data is attached.\n")
    m.add_attachment(random.Random(size).randbytes(size * 3 // 4), maintype="application",
                     subtype="octet-stream", filename="data.bin")
    if virus:
        m.add_attachment(EICAR, maintype="application", subtype="octet-stream",
                         filename="eicar.com")
    return m.as_bytes().replace(b"\n", b"\r\n")


@attrs.define
class Feed:
    """One message fed to a session chunk by chunk, as the milter layer does."""

    session: Session
    chunks: list[bytes]

    def body(self, upto: int | None = None) -> None:
        """Send the next chunks (all, or until ``upto`` body bytes have been sent)."""
        while self.chunks:
            if upto is not None and self.session.ensure_message().body.size >= upto:
                return
            self.session.body(self.chunks.pop(0))

    def eom(self) -> Decision:
        self.body()
        decision = self.session.eom()
        self.session.reset_message()
        return decision

    def note(self, brain: AntiVirusBrain) -> StreamNote:
        note = self.session.ensure_message().notes[brain.name]
        assert isinstance(note, StreamNote)
        return note


def start(session: Session, raw: bytes, qid: str) -> Feed:
    parsed = message_from_bytes(raw)
    session.envfrom("<alice@example.org>", (), {"i": qid})
    session.envrcpt("<bob@example.net>")
    session.data()
    for h in parsed.headers:
        session.header(h.name, h.raw)
    session.eoh()
    chunks = list(parsed.body.chunks(65535))
    parsed.close()
    return Feed(session, chunks)


def message_size(raw: bytes) -> int:
    """The bytes clamd gets for ``raw``: the header block as rebuilt, and the body."""
    m = message_from_bytes(raw)
    try:
        return m.size
    finally:
        m.close()


def engine_for(brain: AntiVirusBrain, cache: MemoryCache | None = None) -> Engine:
    return Engine(chain_of(brain), brain.monkey, cache=cache)


def new_session(engine: Engine) -> Session:
    return engine.session(Connection(id="S1", hostname="mx1.example.net", family="inet",
                                     address="192.0.2.1", port=25000))


@pytest.fixture
def counting(clamd: Clamd) -> Iterator[CountingClamd]:
    with CountingClamd(clamd) as proxy:
        yield proxy


def header(decision: Decision, name: str) -> str | None:
    return decision.ctx.headers.get(name)


def log_lines(caplog: pytest.LogCaptureFixture, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if needle in r.getMessage()]


# --------------------------------------------------------------------------------------
# In-process, the core's session against real clamds
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("virus", [False, True], ids=["clean", "eicar-last"])
def test_a_large_message_is_streamed_while_it_arrives(
        counting: CountingClamd, caplog: pytest.LogCaptureFixture, virus: bool) -> None:
    brain = make_brain(clamd=[counting.address], cache_ttl=0)
    raw = big_message(3 * MIB, virus=virus)
    feed = start(new_session(engine_for(brain)), raw, "Q1")
    feed.body(upto=MIB // 2)
    assert counting.streams() == []  # below stream_min_size (1 MiB): nothing yet
    feed.body(upto=2 * MIB)
    # clamd has it while the body still arrives
    [open_] = counting.wait(lambda s: len(s) == 1 and s[0].size > MIB)
    assert open_.end == ""
    with caplog.at_level(5):
        decision = feed.eom()
    [done] = counting.streams()  # the same connection, finished: no second scan
    assert done.end == "scanned" and done.size == message_size(raw)
    if virus:
        assert decision.action is Action.REJECT
        assert done.reply.endswith(f"{av_samples.NAME_EICAR} FOUND")
        [line] = log_lines(caplog, "infected:")
    else:
        assert decision.action is Action.ACCEPT and header(decision, "X-Virus-Status") == "Clean"
        [line] = log_lines(caplog, "clean (")
    assert f"(clamd {counting.address} (streamed)" in line


def test_a_small_message_is_scanned_at_end_of_data(counting: CountingClamd) -> None:
    brain = make_brain(clamd=[counting.address], cache_ttl=0)
    feed = start(new_session(engine_for(brain)), big_message(200_000), "Q1")
    feed.body()
    assert counting.streams() == [] and feed.note(brain).stream is None
    assert feed.eom().action is Action.ACCEPT
    assert [s.end for s in counting.streams()] == ["scanned"]


def test_stream_min_size_0_never_streams(counting: CountingClamd) -> None:
    brain = make_brain(clamd=[counting.address], cache_ttl=0, stream_min_size=0)
    assert brain.streamer is None
    # no body hook at all: the daemon can ask the MTA for no reply to body chunks
    assert not any(chain_of(brain).implemented(h) for h in ("body", "abort", "close"))
    assert chain_of(make_brain(clamd=[counting.address])).implemented("body")
    feed = start(new_session(engine_for(brain)), big_message(2 * MIB), "Q1")
    feed.body()
    assert counting.streams() == []
    assert feed.eom().action is Action.ACCEPT and len(counting.streams()) == 1


@pytest.mark.parametrize("virus", [False, True], ids=["clean", "eicar-last"])
def test_a_clamd_killed_mid_stream_fails_over_at_end_of_data(
        make_clamd: Callable[..., Clamd], caplog: pytest.LogCaptureFixture,
        virus: bool) -> None:
    first, second = make_clamd(), make_clamd()
    brain = make_brain(clamd=[tcp(first), tcp(second)], cache_ttl=0)
    feed = start(new_session(engine_for(brain)), big_message(3 * MIB, virus=virus), "Q1")
    feed.body(upto=MIB + MIB // 2)
    stream = feed.note(brain).stream
    assert stream is not None and stream.address == tcp(first)
    note = feed.note(brain)
    first.kill()
    with caplog.at_level(5):
        decision = feed.eom()
    # a reset while writing, or the end of the connection seen between two chunks
    assert note.stream is None and note.stopped.startswith(f"clamd {tcp(first)}: ")
    assert re.search("connection lost|closed the connection", note.stopped)
    assert log_lines(caplog, "stream to clamd stopped: clamd " + tcp(first))
    if virus:
        assert decision.action is Action.REJECT
        [line] = log_lines(caplog, "infected:")
    else:
        assert decision.action is Action.ACCEPT and header(decision, "X-Virus-Status") == "Clean"
        [line] = log_lines(caplog, "clean (")
    assert f"(clamd {tcp(second)}," in line  # scanned at end of data, on the other clamd


def test_a_clamd_killed_mid_stream_alone_is_the_failure_policy(
        make_clamd: Callable[..., Clamd]) -> None:
    only = make_clamd()
    brain = make_brain(clamd=[tcp(only)], cache_ttl=0)
    feed = start(new_session(engine_for(brain)), big_message(3 * MIB), "Q1")
    feed.body(upto=MIB + MIB // 2)
    assert feed.note(brain).stream is not None
    only.kill()
    decision = feed.eom()
    assert decision.action is Action.TEMPFAIL  # on_error, as for any scan clamd cannot do
    assert [(r.brain, r.outcome) for r in decision.results] == [("av", "error")]


def test_an_aborted_transaction_closes_the_stream(counting: CountingClamd) -> None:
    brain = make_brain(clamd=[counting.address], cache_ttl=0)
    session = new_session(engine_for(brain))
    feed = start(session, big_message(3 * MIB), "Q1")
    feed.body(upto=2 * MIB)
    stream = feed.note(brain).stream
    assert stream is not None and stream.sock is not None
    session.abort()
    assert stream.sock is None
    [seen] = counting.wait_until("hung up")
    assert seen.size > MIB
    assert session.connection.notes.get(brain.name) is None
    session.close()


def test_a_session_that_ends_mid_message_closes_the_stream(counting: CountingClamd) -> None:
    brain = make_brain(clamd=[counting.address], cache_ttl=0)
    session = new_session(engine_for(brain))
    feed = start(session, big_message(3 * MIB), "Q1")
    feed.body(upto=2 * MIB)
    session.close()  # the MTA hung up: abort, then close
    counting.wait_until("hung up")


def test_a_stream_a_cache_hit_left_open_is_closed_by_the_next_message_or_the_end(
        clamd: Clamd, counting: CountingClamd) -> None:
    """The core calls no hook after a replayed result: the next message's first body
    chunk, or the end of the session, closes what the brain streamed for nothing."""
    settle(clamd.db_dir, 0.2)
    brain = make_brain(clamd=[counting.address], database_directory=str(clamd.db_dir),
                       cache_settle=0.2)
    session = new_session(engine_for(brain, MemoryCache()))
    raw = big_message(2 * MIB, subject="cache hit")
    assert start(session, raw, "Q1").eom().results[0].outcome == "ran"
    again = start(session, raw, "Q2")
    again.body()
    leftover = again.note(brain).stream
    assert leftover is not None
    assert again.eom().results[0].outcome == "cached"
    assert leftover.sock is not None  # eom_process was not called: nobody closed it yet
    assert [s.end for s in counting.wait(lambda s: len(s) == 2)] == ["scanned", ""]
    start(session, big_message(10_000), "Q3").body()  # the next message's first chunk
    assert leftover.sock is None
    assert [s.end for s in counting.wait_until("hung up")] == ["hung up"]
    start(session, raw, "Q4").body()  # the same again, left open by a hit...
    assert session.connection.notes[brain.name].sock is not None
    session.close()  # ...and closed when the session ends
    assert len(counting.wait_until("hung up", 2)) == 2


def test_the_stream_stops_at_max_scan_size(counting: CountingClamd) -> None:
    brain = make_brain(clamd=[counting.address], cache_ttl=0, max_scan_size="2M")
    feed = start(new_session(engine_for(brain)), big_message(3 * MIB), "Q1")
    feed.body()
    note = feed.note(brain)
    assert note.stream is None and note.stopped == f"past max_scan_size {2 * MIB}"
    [seen] = counting.wait_until("hung up")
    assert seen.size <= 2 * MIB
    decision = feed.eom()
    assert header(decision, "X-Virus-Status") == "Unscanned (too large)"  # oversize_action
    assert len(counting.streams()) == 1  # and no second try


def test_clamds_stream_limit_stops_the_stream_and_the_usual_path_decides(
        make_clamd: Callable[..., Clamd]) -> None:
    small = make_clamd(SmallStreamClamd)  # StreamMaxLength 1M
    brain = make_brain(clamd=[unix(small)], cache_ttl=0, stream_min_size="256k")
    feed = start(new_session(engine_for(brain)), big_message(3 * MIB), "Q1")
    feed.body()
    note = feed.note(brain)
    assert note.stream is None and "size limit exceeded" in note.stopped
    decision = feed.eom()
    assert decision.action is Action.ACCEPT
    assert header(decision, "X-Virus-Status") == "Unscanned (too large)"


def test_clamds_stream_limit_seen_only_at_the_terminator_goes_the_usual_path_too(
        make_clamd: Callable[..., Clamd], caplog: pytest.LogCaptureFixture) -> None:
    """clamd's refusal can land after the last body chunk's check: the terminator meets
    it.  The oversize policy decides then too, never the failure policy."""
    small = make_clamd(SmallStreamClamd)  # StreamMaxLength 1M: the scan at eom is refused
    brain = make_brain(clamd=[unix(small)], cache_ttl=0, oversize_action="reject")
    assert isinstance(brain.engine, ClamdEngine)
    m = message_from_bytes(big_message(2 * MIB), queue_id="Q1")
    ours, clamds = socket.socketpair()
    clamds.sendall(b"INSTREAM size limit exceeded. ERROR\0")
    clamds.close()  # clamd answers early only to refuse, then hangs up
    stream = BodyStream(brain.engine.pool.slots[0].client, ours, 5.0,
                        hashlib.sha256(m.header_bytes()).digest(), sent=m.size)
    m.notes[brain.name] = StreamNote(stream=stream)
    ctx = MilterContext(m, Capability.ALL)
    with caplog.at_level(5):
        brain.eom_process(m, ctx, brain.monkey)
    assert stream.sock is None  # closed
    assert log_lines(caplog, "answered before the end: INSTREAM size limit exceeded")
    assert ctx.verdict is not None and ctx.verdict.action is Action.REJECT
    assert ctx.verdict.reply is not None and ctx.verdict.reply.code == 552
    assert log_lines(caplog, "StreamMaxLength")
    m.close()


def test_a_stream_that_is_not_exactly_the_message_is_dropped(
        counting: CountingClamd, caplog: pytest.LogCaptureFixture) -> None:
    """What clamd got must be the message at end of data, header block and every byte."""
    brain = make_brain(clamd=[counting.address], cache_ttl=0)
    m = message_from_bytes(big_message(2 * MIB, virus=True), queue_id="Q1")
    body = m.body.read()
    m.body.close()
    m.body = message_from_bytes(b"\r\n").body  # an empty body the chunks go to, as the core
    for i in range(0, len(body), 65535):
        m.body.write(body[i:i + 65535])
        brain.body(m, body[i:i + 65535], brain.monkey)
    assert [s.end for s in counting.wait(lambda s: len(s) == 1)] == [""]
    m.headers = Headers((*m.headers, Header.from_str("X-Late", "1")))
    ctx = MilterContext(m, Capability.ALL)
    with caplog.at_level(5):
        brain.eom_process(m, ctx, brain.monkey)
    assert ctx.verdict is not None and ctx.verdict.action is Action.REJECT
    assert log_lines(caplog, "dropped: it got")
    [line] = log_lines(caplog, "infected:")
    assert "(streamed)" not in line
    assert [s.end for s in counting.wait_until("scanned")] == ["scanned"]
    assert [s.end for s in counting.streams()] == ["hung up", "scanned"]
    m.close()


# --------------------------------------------------------------------------------------
# Through a real Postfix and the daemon
# --------------------------------------------------------------------------------------


@attrs.define
class Stack:
    postfix: Postfix
    sink: SmtpSink
    monkey: MonkeyProcess

    def send(self, raw: bytes) -> tuple[int, str]:
        return smtp_data(self.postfix, raw, timeout=120)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, clamd: Clamd) -> Iterator[Stack]:
    require_or_skip(Postfix)
    require_or_skip(SmtpSink)
    base = tmp_path_factory.mktemp("stream-e2e")
    sink = SmtpSink(base / "sink", free_port())
    brain: dict[str, Any] = {"use": "av", "clamd": [unix(clamd)], "stream_min_size": "1M",
                             "cache_ttl": 0}
    monkey = MonkeyProcess(base / "monkey", [brain], {"hostname": "mx.example.org"})
    postfix = Postfix(base / "postfix", free_port(), sink.port, milters=monkey.postfix_spec)
    try:
        sink.start()
        monkey.start()
        postfix.start()
        yield Stack(postfix, sink, monkey)
    finally:
        postfix.stop()
        monkey.stop()
        sink.stop()


@pytest.mark.e2e
def test_a_5_mb_message_through_postfix_is_streamed(stack: Stack, clamd: Clamd) -> None:
    stack.sink.clear()
    clean = big_message(5 * MIB, subject="five clean")
    assert len(clean) > 5 * MIB
    assert stack.send(clean)[0] == 250
    [path] = stack.sink.wait_for(1, timeout=60)
    delivered = parse_dump(path)
    assert delivered.header_values("X-Virus-Status") == ["Clean"]
    sent = maillog_ids(stack.postfix, r"(\w+): to=<bob@example.net>.*status=sent")
    log = stack.monkey.wait_for_log(f"{sent[-1]}: clean (clamd {unix(clamd)} (streamed)")

    code, text = stack.send(big_message(5 * MIB, virus=True, subject="five eicar"))
    assert (code, text) == (550, f"5.7.1 Virus found: {av_samples.NAME_EICAR}")
    [qid] = maillog_ids(stack.postfix, r"(\w+): milter-reject: END-OF-MESSAGE .*Virus found")
    log = stack.monkey.wait_for_log(
        f"{qid}: infected: {av_samples.NAME_EICAR} (clamd {unix(clamd)} (streamed)")
    assert "stream to clamd stopped" not in log
    stack.postfix.wait_queue_empty()
    assert stack.sink.messages() == [path]


def test_big_message_helper_puts_eicar_in_the_last_chunk() -> None:
    raw = big_message(5 * MIB, virus=True)
    body = raw.split(b"\r\n\r\n", 1)[1]
    assert EICAR not in raw  # base64, as mail carries it
    assert b"eicar.com" in body[-65535:] and b"eicar.com" not in body[:-65535]
