"""The av brain and the core's scan cache: what the key is made of, and replays that match.

Key tests work out keys against the session clamd (its ``VERSION``) with its
signature directory given as ``database_directory``.  Replay tests count
what clamd really scanned: through a pass-through (:class:`CountingClamd`)
in-process, and in clamd's own log (``LogClean yes``) through the daemon.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
from av_helpers import (
    CountingClamd,
    LoggingClamd,
    make_brain,
    settle,
    unix,
)
from miltermonkey_av.brain import AntiVirusBrain
from miltermonkey_av.cachekey import (
    FORMAT,
    VERSION_EVERY,
    DatabaseFingerprint,
    EngineIdentity,
    answer_options,
    resolve_directory,
)
from miltermonkey_av.clamd import ClamdPool
from miltermonkey_av.options import AntiVirusOptions
from miltermonkey_av.testing import Clamd, FakeClamd
from miltermonkey_av.testing import samples as av_samples

from miltermonkey_core.contract.model import Connection, Message, message_from_bytes
from miltermonkey_core.engine.build import chain_of
from miltermonkey_core.engine.cache import MemoryCache
from miltermonkey_core.engine.offline import OfflineResult, run_engine
from miltermonkey_core.engine.session import Engine
from miltermonkey_core.testing.client import MessageSpec, SessionResult, run_session
from miltermonkey_core.testing.daemon import MonkeyProcess

pytestmark = pytest.mark.engines

TRACE = (b"Received: from mx1.example.net (mx1.example.net [192.0.2.1])\r\n"
         b"\tby mx.example.org (Postfix) with ESMTP id 4QAAA1\r\n"
         b"\tfor <bob@example.net>; Thu,  3 Dec 2026 10:00:00 +0000 (UTC)\r\n"
         b"Return-Path: <alice@example.org>\r\n")
RAW = TRACE + av_samples.sample("clean-multipart").raw
#: Another hop, another delivery: only trace and filter headers differ.
RELAYED = (b"Received: from mx2.example.net (mx2.example.net [192.0.2.2])\r\n"
           b"\tby mx.example.org (Postfix) with ESMTP id 4QBBB2; Thu,  3 Dec 2026 10:05:00\r\n"
           b"Received: from a.example (a.example [198.51.100.9]) by mx2.example.net\r\n"
           b"Return-Path: <other@example.org>\r\n"
           b"Delivered-To: carol@example.net\r\nX-Original-To: carol@example.net\r\n"
           b"X-Virus-Scanned: ClamAV on mx2\r\nX-Virus-Status: Clean\r\n"
           b"X-Spam-Status: No, score=0.1\r\nX-Spam-Checker-Version: SpamAssassin\r\n"
           b"X-Milter-Key: v=1; h=mx2\r\n" + av_samples.sample("clean-multipart").raw)


def message(raw: bytes = RAW) -> Message:
    return message_from_bytes(raw, recipients=["<bob@example.net>"], queue_id="4QAAA1")


@pytest.fixture
def keyed(clamd: Clamd) -> Callable[..., AntiVirusBrain]:
    """``keyed(**options)``: a brain on the session clamd whose database it can fingerprint."""
    settle(clamd.db_dir, 1.0)  # (once per run, right after the session clamd started)

    def build(**options: Any) -> AntiVirusBrain:
        options.setdefault("clamd", [unix(clamd)])
        options.setdefault("database_directory", str(clamd.db_dir))
        options.setdefault("cache_settle", 0)
        return make_brain(**options)

    return build


def key(brain: AntiVirusBrain, m: Message) -> Sequence[str | bytes]:
    k = brain.cache_key(m)
    assert k is not None
    return k


# --------------------------------------------------------------------------------------
# What the key is made of
# --------------------------------------------------------------------------------------


def test_trace_and_filter_headers_do_not_change_the_key(keyed: Callable[..., AntiVirusBrain]
                                                         ) -> None:
    b = keyed()
    k = key(b, message())
    assert k[0] == FORMAT and k[-1] == message().body.sha256()
    assert key(b, message(RELAYED)) == k
    assert key(b, message(av_samples.sample("clean-multipart").raw)) == k  # none at all


@pytest.mark.parametrize(("what", "raw"), [
    ("a header's value", RAW.replace(b"Subject: ", b"Subject: Re: ", 1)),
    ("an added header", RAW.replace(b"Subject: ", b"Reply-To: c@example.com\r\nSubject: ", 1)),
    ("a header like an ignored one", RAW.replace(b"Subject: ", b"X-Received: x\r\nSubject: ", 1)),
    ("the body", RAW + b"P.S.\r\n"),
])
def test_what_clamd_sees_changes_the_key(keyed: Callable[..., AntiVirusBrain], what: str,
                                         raw: bytes) -> None:
    b = keyed()
    assert key(b, message()) != key(b, message(raw)), what


def test_cache_ignore_headers_empty_keys_on_the_whole_message(
        keyed: Callable[..., AntiVirusBrain]) -> None:
    b = keyed(cache_ignore_headers=[])
    assert key(b, message()) != key(b, message(RELAYED))
    b = keyed(cache_ignore_headers=["received", "X-*"])  # any case, patterns
    assert key(b, message(RAW.replace(b"Return-Path: ", b"X-Return-Path: "))) != \
        key(b, message(RAW))  # Return-Path is not ignored any more
    assert key(b, message(RAW.replace(b"Subject: ", b"X-Whatever: 1\r\nSubject: ", 1))) == \
        key(b, message(RAW))


def test_a_long_ignored_header_makes_the_message_uncacheable(
        keyed: Callable[..., AntiVirusBrain]) -> None:
    """Its value is not in the key, so nothing may hide in it: at most 998 bytes."""
    b = keyed()

    def with_received(size: int) -> Message:
        value = b"from x " + b"y" * (size - 7)
        return message(b"Received: " + value + b"\r\n" + RAW)

    assert b.cache_key(with_received(998)) is not None
    assert b.cache_key(with_received(999)) is None
    long_subject = b"Subject: " + b"z" * 5000 + b"\r\n"  # not ignored: in the key, no bound
    assert b.cache_key(message(long_subject + RAW)) is not None


def test_a_mime_header_cannot_be_ignored() -> None:
    for pattern in ("Content-*", "content-type", "MIME-Version", "*"):
        with pytest.raises(ValueError, match="how the body is decoded"):
            AntiVirusOptions(cache_ignore_headers=[pattern])


@pytest.mark.parametrize("changed", [
    {"infected_action": "discard"}, {"infected_action": "quarantine"}, {"reject_code": 554},
    {"reject_xcode": "5.7.0"}, {"reject_text": "No: %v"}, {"minscansize": 10},
    {"max_scan_size": "10M"}, {"oversize_action": "reject"}, {"limits_action": "tempfail"},
    {"max_mime_depth": 5}, {"max_mime_parts": 100}, {"add_headers": False},
    {"discard_pattern": "Mydoom"},
])
def test_options_that_change_the_answer_change_the_key(
        keyed: Callable[..., AntiVirusBrain], changed: dict[str, Any]) -> None:
    assert key(keyed(), message()) != key(keyed(**changed), message())


@pytest.mark.parametrize("changed", [
    {"clamd_cooldown": 5}, {"connect_timeout": 1}, {"scan_timeout": 10}, {"cache_ttl": 60},
    {"cache_settle": 1}, {"stream_min_size": 0},
])
def test_options_that_do_not_change_the_answer_keep_the_key(
        keyed: Callable[..., AntiVirusBrain], changed: dict[str, Any]) -> None:
    assert key(keyed(), message()) == key(keyed(**changed), message())


def test_every_new_option_is_in_the_key_unless_named_out() -> None:
    text = answer_options(AntiVirusOptions())
    for name in ("relay_mode", "reject_text", "max_mime_depth", "who", "tempfile_template"):
        assert f'"{name}":' in text
    for name in ("clamd", "scan_timeout", "cache_ttl", "database_directory", "stream_min_size"):
        assert f'"{name}":' not in text


def test_the_signature_files_are_part_of_the_key(clamd: Clamd, tmp_path: Path,
                                                 keyed: Callable[..., AntiVirusBrain]) -> None:
    db = tmp_path / "db"
    shutil.copytree(clamd.db_dir, db)
    b = keyed(database_directory=str(db))
    before = key(b, message())
    (db / "local.ndb").write_text("Local.Test:0:*:6c6f63616c\n")
    b = keyed(database_directory=str(db))  # a new brain: no 1-second listing to wait out
    after = key(b, message())
    assert after != before
    (db / "freshclam.dat").write_bytes(b"state freshclam rewrites on every run")
    assert key(keyed(database_directory=str(db)), message()) == after


def test_notify_mode_and_command_scanners_are_not_cached(
        keyed: Callable[..., AntiVirusBrain]) -> None:
    assert keyed(relay_mode=False).cache_key(message()) is None
    assert keyed(infected_action="notify").cache_key(message()) is None
    clamscan = shutil.which("clamscan")
    assert clamscan is not None
    assert keyed(scanner_path=clamscan).cache_key(message()) is None


def test_cache_ttl_and_independence() -> None:
    assert AntiVirusBrain.cache_ttl == 0  # the class default: only an instance caches
    assert make_brain().cache_ttl == 3600
    assert make_brain(cache_ttl="5m").cache_ttl == 300
    assert make_brain(cache_ttl=0).cache_ttl == 0
    assert make_brain().independent and make_brain(infected_action="quarantine").independent
    # notify mode deletes the Content-* headers as earlier brains left them
    assert not make_brain(relay_mode=False).independent


def test_a_clamd_without_database_version_or_directory_is_not_cached_and_says_so_once(
        clamd: Clamd, caplog: pytest.LogCaptureFixture) -> None:
    b = make_brain(clamd=[unix(clamd)], database_directory="")
    with caplog.at_level(logging.INFO):
        assert [b.cache_key(message()) for _ in range(3)] == [None, None, None]
    lines = [r.getMessage() for r in caplog.records if "scan cache off" in r.getMessage()]
    assert len(lines) == 1
    assert unix(clamd) in lines[0] and "no database version" in lines[0]


# --- the engine's identity, with clamds that answer what a test needs ---------------------------


class VersionClamd(FakeClamd):
    """Answers VERSION with ``version`` (settable) and counts how often it was asked."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.asked = 0
        super().__init__(self._answer)

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        data = b""
        while b"\0" not in data:
            chunk = conn.recv(100)
            if not chunk:
                return
            data += chunk
        if data.startswith(b"zVERSION"):
            self.asked += 1
            conn.sendall(self.version.encode() + b"\0")


OFFICIAL = "ClamAV 1.4.6/27474/Wed Dec  2 09:24:00 2026"


def flat(version: str) -> str:
    """A VERSION line as the identity keeps it (runs of blanks made one)."""
    return " ".join(version.split())


@pytest.fixture
def versions() -> Iterator[list[VersionClamd]]:
    fakes = [VersionClamd(OFFICIAL), VersionClamd(OFFICIAL)]
    yield fakes
    for f in fakes:
        f.close()


@attrs.define
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


def identity(pool: ClamdPool, directory: str | None = None, covered: Sequence[str] = (),
             settle_s: float = 0.0, clock: Clock | None = None,
             said: list[str] | None = None) -> EngineIdentity:
    out = said if said is not None else []
    return EngineIdentity(pool, directory, frozenset(covered), settle_s, out.append,
                          clock or Clock())


def test_version_is_asked_at_most_every_30_s_and_a_new_database_changes_the_identity(
        versions: list[VersionClamd]) -> None:
    one = versions[0]
    clock = Clock()
    ident = identity(ClamdPool([one.address]), clock=clock)
    assert [ident.current() for _ in range(20)] == [flat(OFFICIAL)] * 20
    assert one.asked == 1
    one.version = "ClamAV 1.4.6/27475/Thu Dec  3 09:24:00 2026"  # freshclam's next daily
    clock.now += VERSION_EVERY - 1
    assert ident.current() == flat(OFFICIAL) and one.asked == 1
    clock.now += 1
    assert ident.current() == flat(one.version) and one.asked == 2


def test_every_clamd_that_answers_is_in_the_identity(versions: list[VersionClamd]) -> None:
    """Whichever clamd scans, its database is named; identical farms give one line."""
    ident = identity(ClamdPool([v.address for v in versions]))
    assert ident.current() == flat(OFFICIAL)  # two clamds, the same database
    versions[1].version = "ClamAV 1.4.6/27473/Tue Dec  1 09:24:00 2026"  # one behind
    ident = identity(ClamdPool([v.address for v in versions]))
    assert ident.current() == f"{flat(versions[1].version)}\n{flat(OFFICIAL)}"


def test_a_clamd_known_to_be_down_is_not_asked_on_the_message_path(
        versions: list[VersionClamd]) -> None:
    pool = ClamdPool([versions[0].address])
    pool.mark_failed(pool.clients[0], "refused a scan")
    ident = identity(pool)
    assert ident.current() is None and versions[0].connections == 0


def test_a_clamd_that_does_not_answer_version_leaves_the_message_uncached() -> None:
    with FakeClamd(lambda conn: None) as silent:  # hangs up at once
        ident = identity(ClamdPool([silent.address]))
        assert ident.current() is None


def test_custom_databases_need_the_directory(versions: list[VersionClamd],
                                             tmp_path: Path) -> None:
    versions[0].version = "ClamAV 1.4.6"
    address = versions[0].address
    said: list[str] = []
    assert identity(ClamdPool([address]), said=said).current() is None
    assert len(said) == 1 and "no database version" in said[0]
    (tmp_path / "local.ndb").write_text("Local.Test:0:*:6c6f63616c\n")
    old = tmp_path.stat().st_mtime - 600
    os.utime(tmp_path / "local.ndb", (old, old))
    os.utime(tmp_path, (old, old))
    ident = identity(ClamdPool([address]), str(tmp_path), [address])
    text = ident.current()
    assert text is not None and text.startswith("ClamAV 1.4.6\ndb ")


def test_nothing_is_cached_while_new_signature_files_settle(versions: list[VersionClamd],
                                                            tmp_path: Path) -> None:
    """freshclam writes first and clamd loads later: wait cache_settle after the newest file."""
    address = versions[0].address
    (tmp_path / "daily.cld").write_bytes(b"ClamAV-VDB:27474".ljust(512, b" ") + b"x" * 1000)
    said: list[str] = []
    clock = Clock()
    ident = identity(ClamdPool([address]), str(tmp_path), [address], settle_s=60, clock=clock,
                     said=said)
    assert ident.current() is None and ident.current() is None
    assert len(said) == 1 and "nothing cached or replayed for cache_settle 60 s" in said[0]
    old = tmp_path.stat().st_mtime - 61
    for p in (tmp_path / "daily.cld", tmp_path):
        os.utime(p, (old, old))
    clock.now += 1  # the directory is listed again at most once a second
    assert ident.current() is not None


def test_the_fingerprint_is_the_content_not_the_file_times(tmp_path: Path) -> None:
    """Two hosts with the same databases share entries; a changed file changes it."""
    a, b = tmp_path / "a", tmp_path / "b"
    for d, when in ((a, 1_000_000_000), (b, 1_500_000_000)):
        d.mkdir()
        (d / "main.cvd").write_bytes(b"ClamAV-VDB:62".ljust(512, b" ") + os.urandom(2000))
        (d / "local.ndb").write_text("Local.Test:0:*:6c6f63616c\n")
        (d / "freshclam.dat").write_bytes(os.urandom(64))  # not a signature file
        for p in d.iterdir():
            os.utime(p, (when, when))
    fa, _ = DatabaseFingerprint(str(a)).current()
    fb, _ = DatabaseFingerprint(str(b)).current()
    assert fa is not None and fb is not None
    assert fa.digest == fb.digest and fa.files == 2 and fa.newest != fb.newest
    (b / "local.ndb").write_text("Local.Test:0:*:6c6f63616d\n")  # same size, new signature
    fc, _ = DatabaseFingerprint(str(b)).current()
    assert fc is not None and fc.digest != fa.digest
    none, why = DatabaseFingerprint(str(tmp_path / "missing")).current()
    assert none is None and "cannot read database_directory" in why


def test_auto_takes_the_directory_of_the_clamd_clamd_conf_describes(tmp_path: Path) -> None:
    conf = tmp_path / "clamd.conf"
    conf.write_text("# Debian\nLocalSocket /var/run/clamav/clamd.ctl\nTCPSocket 3310\n"
                    "DatabaseDirectory /srv/clamav\n")
    system = "unix:/var/run/clamav/clamd.ctl"
    assert resolve_directory("auto", [system], str(conf)) == ("/srv/clamav",
                                                              frozenset({system}))
    assert resolve_directory("auto", ["tcp:127.0.0.1:3310", "tcp:av2.example.org:3310"],
                             str(conf)) == ("/srv/clamav", frozenset({"tcp:127.0.0.1:3310"}))
    # a private clamd on this host has its own database
    assert resolve_directory("auto", ["unix:/tmp/test/clamd.ctl", "tcp:127.0.0.1:3311"],
                             str(conf)) == (None, frozenset())
    assert resolve_directory("auto", [system], str(tmp_path / "none")) == (None, frozenset())
    assert resolve_directory("", [system], str(conf)) == (None, frozenset())
    assert resolve_directory("/db", [system, "tcp:av2:3310"], str(conf)) == \
        ("/db", frozenset({system, "tcp:av2:3310"}))


# --------------------------------------------------------------------------------------
# Replays in-process: the core's engine with a memory cache, a real clamd behind a counter
# --------------------------------------------------------------------------------------


@pytest.fixture
def counting(clamd: Clamd) -> Iterator[CountingClamd]:
    with CountingClamd(clamd) as proxy:
        yield proxy


def outcomes(r: OfflineResult) -> list[str]:
    return [b.outcome for b in r.results]


def replaying(clamd: Clamd, proxy: CountingClamd, **options: Any
              ) -> Callable[[bytes, str], OfflineResult]:
    brain = make_brain(clamd=[proxy.address], database_directory=str(clamd.db_dir),
                       cache_settle=0, stream_min_size=0, **options)
    engine = Engine(chain_of(brain), brain.monkey, cache=MemoryCache())

    def run(raw: bytes, qid: str) -> OfflineResult:
        conn = Connection(id=qid, hostname="mx1.example.net", family="inet",
                          address="192.0.2.1", port=25000)
        return run_engine(engine, raw, "<alice@example.org>", ["<bob@example.net>"],
                          {"i": qid}, connection=conn)

    return run


def test_a_clean_message_relayed_again_is_scanned_once(clamd: Clamd,
                                                       counting: CountingClamd) -> None:
    run = replaying(clamd, counting)
    scanned, replayed = run(RAW, "Q1"), run(RELAYED, "Q2")
    assert (outcomes(scanned), outcomes(replayed)) == (["ran"], ["cached"])
    assert [s.end for s in counting.streams()] == ["scanned"]
    assert replayed.header("X-Virus-Status") == "Clean"
    assert replayed.header("X-Virus-Scanned") == scanned.header("X-Virus-Scanned")
    # the copies that came with the relayed message were replaced, as a scan replaces them
    assert replayed.ctx.headers.get_all("X-Virus-Status") == ["Clean"]
    assert any("brain av: cached result replayed (continue" in ln for ln in replayed.log)
    other = run(RAW + b"P.S.\r\n", "Q3")
    assert outcomes(other) == ["ran"] and len(counting.streams()) == 2


@pytest.mark.parametrize("action", ["reject", "quarantine", "discard"])
def test_a_cached_infected_verdict_is_replayed(clamd: Clamd, counting: CountingClamd,
                                               action: str) -> None:
    run = replaying(clamd, counting, infected_action=action)
    raw = TRACE + av_samples.sample("eicar-zip").raw
    scanned, replayed = run(raw, "Q1"), run(RELAYED.split(b"Return-Path", 1)[0] + raw, "Q2")
    assert (outcomes(scanned), outcomes(replayed)) == (["ran"], ["cached"])
    assert len(counting.streams()) == 1
    assert replayed.action is scanned.action
    assert (replayed.verdict and replayed.verdict.describe()) == \
        (scanned.verdict and scanned.verdict.describe())
    if action == "reject":
        assert replayed.verdict is not None and replayed.verdict.reply is not None
        assert str(replayed.verdict.reply) == f"550 5.7.1 Virus found: {av_samples.NAME_EICAR}"
    if action == "quarantine":
        assert replayed.ctx.quarantine_request == scanned.ctx.quarantine_request is not None
        assert replayed.header("X-Virus-Status") == f"Infected ({av_samples.NAME_EICAR})"


def test_unchecked_results_are_never_cached(clamd: Clamd, counting: CountingClamd) -> None:
    """Too large, past the limits with accept-tag: the next hop must scan, so must we."""
    run = replaying(clamd, counting, max_scan_size=100, oversize_action="accept-tag")
    assert [outcomes(run(RAW, q)) for q in ("Q1", "Q2")] == [["ran"], ["ran"]]
    run = replaying(clamd, counting, limits_action="accept-tag", max_mime_depth=1)
    assert [outcomes(run(RAW, q)) for q in ("Q3", "Q4")] == [["ran"], ["ran"]]
    assert len(counting.streams()) == 2  # accept-tag still lets clamd look


# --------------------------------------------------------------------------------------
# Through the daemon: clamd's own log counts the scans
# --------------------------------------------------------------------------------------


def send(m: MonkeyProcess, *raws: bytes) -> list[SessionResult]:
    return run_session(m.address, [MessageSpec(r, "<alice@example.org>", ["<bob@example.net>"])
                                   for r in raws], timeout=30)


@pytest.fixture
def logging_clamd(make_clamd: Callable[..., Clamd]) -> LoggingClamd:
    c = make_clamd(LoggingClamd)
    assert isinstance(c, LoggingClamd)
    return c


def test_daemon_scans_a_clean_message_once_and_replays_its_headers(
        logging_clamd: LoggingClamd, tmp_path: Path) -> None:
    c = logging_clamd
    brains = [{"use": "av", "clamd": [unix(c)], "database_directory": str(c.db_dir),
               "cache_settle": 0.5}]
    settle(c.db_dir, 0.5)
    with MonkeyProcess(tmp_path / "m", brains) as m:
        scanned, replayed = send(m, RAW, RELAYED)
        log = m.wait_for_log("cached result replayed")
    assert scanned.accepted and replayed.accepted
    assert len(c.scans()) == 1 and c.scans()[0].endswith("): OK")
    assert f"{replayed.queue_id}: brain av: cached result replayed (continue" in log
    assert log.count("clean (clamd") == 1
    assert scanned.applied is not None and replayed.applied is not None
    assert replayed.applied.header_values("X-Virus-Status") == ["Clean"]
    assert replayed.applied.header_values("X-Virus-Scanned") == \
        scanned.applied.header_values("X-Virus-Scanned")


def test_daemon_replays_a_cached_virus_as_a_reject(logging_clamd: LoggingClamd,
                                                   tmp_path: Path) -> None:
    c = logging_clamd
    brains = [{"use": "av", "clamd": [unix(c)], "database_directory": str(c.db_dir),
               "cache_settle": 0.5}]
    settle(c.db_dir, 0.5)
    raw = av_samples.sample("alpha-zip").raw
    with MonkeyProcess(tmp_path / "m", brains) as m:
        scanned, replayed = send(m, TRACE + raw, raw)
        log = m.wait_for_log("cached result replayed")
    assert scanned.rejected and replayed.rejected
    assert [ln.split(": ", 1)[1] for ln in c.scans()] == \
        [f"{av_samples.NAME_ALPHA} FOUND"]
    assert str(replayed.reply) == str(scanned.reply) == \
        f"550 5.7.1 Virus found: {av_samples.NAME_ALPHA}"
    assert f"{replayed.queue_id}: brain av: cached result replayed (reject 550" in log


def test_a_brain_without_database_directory_on_a_private_clamd_scans_every_time(
        logging_clamd: LoggingClamd, tmp_path: Path) -> None:
    """The default ("auto") reads /etc/clamav/clamd.conf only for the clamd it describes; a
    test clamd answers VERSION without a database version, so nothing is cached."""
    c = logging_clamd
    with MonkeyProcess(tmp_path / "m", [{"use": "av", "clamd": [unix(c)]}]) as m:
        results = send(m, RAW, RAW)
        log = m.wait_for_log("scan cache off")
    assert all(r.accepted for r in results) and len(c.scans()) == 2
    assert "cached result replayed" not in log
