"""The clamd client and pool, against a real clamd and against misbehaving fakes."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from av_helpers import SmallStreamClamd, tcp, unix
from miltermonkey_av.clamd import ClamdAddress, ClamdClient, ClamdPool, parse_reply, rechunk
from miltermonkey_av.errors import (
    EngineProtocolError,
    EngineReportedError,
    EngineUnavailable,
    ScanTimeout,
)
from miltermonkey_av.result import Status
from miltermonkey_av.testing import Clamd, FakeClamd, read_instream
from miltermonkey_av.testing import samples as av_samples

from miltermonkey_core.testing.process import free_port

# --- addresses and replies (no clamd needed) -----------------------------------------------


@pytest.mark.parametrize(("spec", "expect"), [
    ("unix:/run/clamav/clamd.ctl", "unix:/run/clamav/clamd.ctl"),
    ("local:/run/clamd.sock", "unix:/run/clamd.sock"),
    ("/var/run/clamav/clamd.ctl", "unix:/var/run/clamav/clamd.ctl"),
    ("tcp:127.0.0.1:3310", "tcp:127.0.0.1:3310"),
    ("tcp:av.example.org", "tcp:av.example.org:3310"),
    ("127.0.0.1:3311", "tcp:127.0.0.1:3311"),
    ("TCP:[::1]:3310", "tcp:[::1]:3310"),
    ("[2001:db8::5]", "tcp:[2001:db8::5]:3310"),
    ("inet:clamd.local:3310", "tcp:clamd.local:3310"),
])
def test_address_forms(spec: str, expect: str) -> None:
    assert str(ClamdAddress.parse(spec)) == expect


@pytest.mark.parametrize(("spec", "hint"), [
    ("", "empty"),
    ("unix:relative/path", "absolute"),
    ("inet:3310@127.0.0.1", "tcp:HOST:PORT"),
    ("tcp:host:99999", "out of range"),
    ("tcp:a:b:c", "expected"),
])
def test_bad_addresses_say_why(spec: str, hint: str) -> None:
    with pytest.raises(ValueError, match=hint):
        ClamdAddress.parse(spec)


@pytest.mark.parametrize(("reply", "status", "name"), [
    ("stream: OK", Status.CLEAN, ""),
    ("stream: Win.Test.EICAR_HDB-1 FOUND", Status.INFECTED, "Win.Test.EICAR_HDB-1"),
    ("1: stream: Eicar-Signature FOUND", Status.INFECTED, "Eicar-Signature"),
    ("stream: Eicar(44d88612fea8a8f36de82e1278abb02f:68) FOUND", Status.INFECTED,
     "Eicar(44d88612fea8a8f36de82e1278abb02f:68)"),
    ("INSTREAM size limit exceeded. ERROR", Status.TOO_LARGE, ""),
])
def test_parse_reply(reply: str, status: Status, name: str) -> None:
    assert parse_reply(reply) == (status, name)


def test_error_and_garbage_replies_are_never_clean() -> None:
    with pytest.raises(EngineReportedError):
        parse_reply("stream: Can't allocate memory ERROR")
    for junk in ("", "PONG", "stream: okay", "HTTP/1.1 400 Bad Request"):
        with pytest.raises(EngineProtocolError):
            parse_reply(junk)


def test_rechunk_keeps_bytes_and_bounds_frames() -> None:
    pieces = [b"a" * 10, b"", b"b" * 100_000, b"c" * 5]
    out = list(rechunk(pieces, 65536))
    assert b"".join(out) == b"".join(pieces)
    assert [len(c) for c in out] == [65536, 100_015 - 65536]


# --- a real clamd -------------------------------------------------------------------------


@pytest.mark.engines
@pytest.mark.parametrize("via", ["tcp", "unix"])
def test_ping_and_version(clamd: Clamd, via: str) -> None:
    client = ClamdClient(tcp(clamd) if via == "tcp" else unix(clamd))
    assert client.ping()
    assert client.version().startswith("ClamAV ")


@pytest.mark.engines
@pytest.mark.parametrize("via", ["tcp", "unix"])
@pytest.mark.parametrize("sample", av_samples.SAMPLES, ids=lambda s: s.name)
def test_every_sample_over_instream(clamd: Clamd, via: str, sample: av_samples.Sample) -> None:
    if sample.hidden is not None:  # the engine had to decode to find it
        assert sample.hidden not in sample.raw
    client = ClamdClient(tcp(clamd) if via == "tcp" else unix(clamd))
    result = client.instream([sample.raw])
    if sample.expect is None:
        assert result.status is Status.CLEAN
    else:
        assert result.status is Status.INFECTED
        assert result.viruses == (sample.expect,)


@pytest.mark.engines
def test_large_clean_stream_in_many_chunks(clamd: Clamd) -> None:
    data = bytes(range(256)) * 8192  # 2 MiB, 32 chunks
    assert ClamdClient(tcp(clamd)).instream(iter([data[:1000], data[1000:]])).clean


@pytest.mark.engines
@pytest.mark.parametrize("via", ["tcp", "unix"])
def test_size_limit_is_a_result_never_clean(make_clamd: Callable[..., Clamd], via: str) -> None:
    c = make_clamd(SmallStreamClamd)
    client = ClamdClient(tcp(c) if via == "tcp" else unix(c))
    assert client.instream([b"x" * 900_000]).status is Status.CLEAN
    for size in (1_100_000, 8_000_000):
        result = client.instream([b"x" * size])
        assert result.status is Status.TOO_LARGE
        assert "size limit exceeded" in result.detail
    # clamd is still fine afterwards
    assert client.ping()


@pytest.mark.engines
def test_concurrent_scans(clamd: Clamd) -> None:
    pool = ClamdPool([tcp(clamd), unix(clamd)])
    jobs = list(av_samples.SAMPLES) * 4
    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(lambda s: pool.scan(lambda: [s.raw]), jobs))
    for s, r in zip(jobs, results, strict=True):
        assert (r.viruses[0] if r.viruses else None) == s.expect


# --- failover and health ------------------------------------------------------------------


def _closed_port() -> str:
    return f"tcp:127.0.0.1:{free_port()}"


@pytest.mark.engines
def test_failover_skips_dead_address_and_cools_down(clamd: Clamd) -> None:
    now = [1000.0]
    events: list[tuple[str, str]] = []
    dead = _closed_port()
    pool = ClamdPool([dead, tcp(clamd)], cooldown=30, clock=lambda: now[0],
                     on_event=lambda level, msg: events.append((level, msg)))
    eicar = av_samples.sample("eicar-zip").raw
    for _ in range(4):
        r = pool.scan(lambda: [eicar])
        assert r.viruses == (av_samples.NAME_EICAR,)
        assert r.engine == f"clamd {tcp(clamd)}"
    assert pool.healthy() == [tcp(clamd)]
    assert [lvl for lvl, _ in events] == ["warning"]  # logged once, not per message
    assert dead in events[0][1]
    now[0] += 31  # cool-down over: it is probed (PING) again, still dead
    pool.scan(lambda: [eicar])
    pool.scan(lambda: [eicar])
    assert pool.healthy() == [tcp(clamd)]


@pytest.mark.engines
def test_dead_address_comes_back_after_ping(make_clamd: Callable[..., Clamd]) -> None:
    now = [0.0]
    events: list[str] = []
    c1 = make_clamd()
    c2 = make_clamd()
    pool = ClamdPool([tcp(c1), tcp(c2)], cooldown=10, clock=lambda: now[0],
                     on_event=lambda level, msg: events.append(f"{level}: {msg}"))
    port = c1.tcp_port
    c1.stop()
    used = {pool.scan(lambda: [b"hello"]).engine for _ in range(4)}
    assert used == {f"clamd {tcp(c2)}"}
    c1.tcp_port = port
    c1.start()
    now[0] += 11
    used = {pool.scan(lambda: [b"hello"]).engine for _ in range(4)}
    assert used == {f"clamd {tcp(c1)}", f"clamd {tcp(c2)}"}  # round-robin again
    assert any("answers PING again" in e for e in events)


def test_all_dead_raises_unavailable_naming_each() -> None:
    a, b = _closed_port(), "unix:/nonexistent/clamd.ctl"
    pool = ClamdPool([a, b], connect_timeout=1)
    with pytest.raises(EngineUnavailable) as e:
        pool.scan(lambda: [b"x"])
    assert a in str(e.value) and b in str(e.value)
    # everything is cooling down: a later scan still tries (probes) rather than give up
    with pytest.raises(EngineUnavailable, match="no PONG"):
        pool.scan(lambda: [b"x"])


# --- engines that misbehave ---------------------------------------------------------------


@pytest.fixture
def fake() -> Iterator[Callable[[Callable[[socket.socket], None]], FakeClamd]]:
    made: list[FakeClamd] = []

    def make(behave: Callable[[socket.socket], None]) -> FakeClamd:
        f = FakeClamd(behave)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


def test_hung_clamd_times_out_within_the_budget(fake: Callable[..., FakeClamd]) -> None:
    def hang(conn: socket.socket) -> None:
        read_instream(conn)
        time.sleep(3)

    f = fake(hang)
    pool = ClamdPool([f.address], timeout=0.5, connect_timeout=0.2)
    t0 = time.monotonic()
    with pytest.raises(ScanTimeout):
        pool.scan(lambda: [b"data"])
    assert time.monotonic() - t0 < 1.5
    assert pool.healthy() == []  # a hung clamd is taken out for the cool-down


def test_clamd_closing_without_reply_fails_over(fake: Callable[..., FakeClamd],
                                                clamd: Clamd) -> None:
    f = fake(lambda conn: (read_instream(conn), None)[1])
    pool = ClamdPool([f.address, tcp(clamd)])
    assert pool.scan(lambda: [b"hello"]).clean
    with pytest.raises(EngineProtocolError, match="without a reply"):
        ClamdClient(f.address).instream([b"hello"])


def test_garbage_reply_is_an_error_not_clean(fake: Callable[..., FakeClamd]) -> None:
    def garbage(conn: socket.socket) -> None:
        read_instream(conn)
        conn.sendall(b"220 smtp.example.org ESMTP\r\n")

    f = fake(garbage)
    with pytest.raises(EngineProtocolError, match="unexpected"):
        ClamdClient(f.address).instream([b"hello"])


def test_error_reply_tries_next_clamd_without_marking_it_dead(
        fake: Callable[..., FakeClamd], clamd: Clamd) -> None:
    def error(conn: socket.socket) -> None:
        read_instream(conn)
        conn.sendall(b"stream: Can't allocate memory ERROR\0")

    f = fake(error)
    pool = ClamdPool([f.address, tcp(clamd)])
    assert pool.scan(lambda: [b"hello"]).clean
    assert f.address in pool.healthy()
    only_bad = ClamdPool([f.address])
    with pytest.raises(EngineUnavailable, match="allocate memory"):
        only_bad.scan(lambda: [b"hello"])


def test_blackholed_connect_is_bounded_by_connect_timeout() -> None:
    # 192.0.2.0/24 is TEST-NET-1: nothing answers (or the route is refused at once).
    pool = ClamdPool(["tcp:192.0.2.1:3310"], connect_timeout=0.3, timeout=5)
    t0 = time.monotonic()
    with pytest.raises(EngineUnavailable):
        pool.scan(lambda: [b"x"])
    assert time.monotonic() - t0 < 2
