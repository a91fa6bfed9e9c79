"""The SPAMC/1.5 client: parsing, then a real spamd, then the failure modes."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from miltermonkey_spam.spamc import (
    DEFAULT_PORT,
    PayloadLengthError,
    SpamcClient,
    SpamdAddress,
    SpamdProtocolError,
    SpamdReplyError,
    SpamdTimeout,
    SpamdUnavailable,
    parse_header_block,
    parse_response,
    parse_spam_header,
)
from miltermonkey_spam.testing import GTUBE, FakeSpamd, ham, spam

from miltermonkey_core.testing.fakeserver import blackhole, unix_relay

CHECK_SPAM = b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 15.3 / 5.0\r\n\r\n"
CHECK_HAM = b"SPAMD/1.1 0 EX_OK\r\nSpam: False ; 1.2 / 5.0\r\n\r\n"


# --------------------------------------------------------------------------------------
# Parsing (no sockets)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "want"), [
    ("127.0.0.1", "127.0.0.1:783"),
    ("127.0.0.1:7830", "127.0.0.1:7830"),
    ("spamd.example.org:10783", "spamd.example.org:10783"),
    ("[::1]:7830", "[::1]:7830"),
    ("[::1]", "[::1]:783"),
    ("::1", "[::1]:783"),
    ("inet:7830@127.0.0.1", "127.0.0.1:7830"),
    ("tcp:localhost:7830", "localhost:7830"),
    ("unix:/run/spamd.sock", "unix:/run/spamd.sock"),
    ("/run/spamd.sock", "unix:/run/spamd.sock"),
    ("  local:/tmp/s  ", "unix:/tmp/s"),
])
def test_address_spellings(spec: str, want: str) -> None:
    assert str(SpamdAddress.parse(spec)) == want


@pytest.mark.parametrize("spec", ["", "host:0", "host:99999", "host:abc", "unix:relative",
                                  "[::1", "a b:783", "[::1]x"])
def test_bad_addresses_are_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="spamd address"):
        SpamdAddress.parse(spec)


def test_default_port_is_spamds() -> None:
    assert DEFAULT_PORT == 783
    assert SpamdAddress.parse("h").port == 783


@pytest.mark.parametrize(("value", "want"), [
    ("True ; 15.3 / 5.0", (True, 15.3, 5.0, "15.3", "5.0")),
    ("False ; -0.0 / 5.0", (False, -0.0, 5.0, "-0.0", "5.0")),
    ("Yes ; 1000 / 5", (True, 1000.0, 5.0, "1000", "5")),  # protocol 1.0 servers
    ("  false;2.5/ 7.0 ", (False, 2.5, 7.0, "2.5", "7.0")),
])
def test_spam_header(value: str, want: tuple[object, ...]) -> None:
    assert parse_spam_header(value) == want


@pytest.mark.parametrize("value", ["", "True", "True ; x / 5.0", "Maybe ; 1 / 2"])
def test_bad_spam_header(value: str) -> None:
    with pytest.raises(SpamdProtocolError):
        parse_spam_header(value)


def test_header_block_keeps_folding() -> None:
    block = ("X-Spam-Checker-Version: SpamAssassin 4.0.1 (2024-03-25) on vm\r\n"
             "X-Spam-Level: \r\n"
             "X-Spam-Status: No, score=-0.0 required=5.0 tests=A,\r\n"
             "\tB autolearn=ham\r\n"
             "\r\n"
             "Body: not a header\r\n")
    assert parse_header_block(block) == (
        ("X-Spam-Checker-Version", "SpamAssassin 4.0.1 (2024-03-25) on vm"),
        ("X-Spam-Level", ""),
        ("X-Spam-Status", "No, score=-0.0 required=5.0 tests=A,\n\tB autolearn=ham"),
    )


def test_response_with_body_is_cut_at_content_length() -> None:
    r = parse_response(b"SPAMD/1.1 0 EX_OK\r\nContent-length: 5\r\nSpam: True ; 1 / 5\r\n"
                       b"\r\nGTUBEjunk")
    assert (r.protocol, r.code, r.text, r.body) == ("1.1", 0, "EX_OK", b"GTUBE")
    assert r.headers["spam"] == "True ; 1 / 5"


def test_error_reply_without_headers() -> None:
    r = parse_response(b"SPAMD/1.0 76 Bad header line: FOO SPAMC/1.5\r\n")
    assert (r.code, r.text) == (76, "Bad header line: FOO SPAMC/1.5")


@pytest.mark.parametrize("raw", [b"", b"HTTP/1.1 200 OK\r\n\r\n",
                                 b"SPAMD/1.1 0 EX_OK\r\nContent-length: 10\r\n\r\nshort",
                                 b"SPAMD/1.1 0 EX_OK\r\nno colon here\r\n\r\n"])
def test_malformed_responses(raw: bytes) -> None:
    with pytest.raises(SpamdProtocolError):
        parse_response(raw)


def test_client_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="at least one"):
        SpamcClient([])
    with pytest.raises(ValueError, match="balance"):
        SpamcClient(["h"], balance="random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="user"):
        SpamcClient(["h"], user="bad user\r\nX: y")
    c = SpamcClient(["h"])
    with pytest.raises(ValueError, match="unsupported"):
        c.request("PROCESS", b"x")
    with pytest.raises(ValueError, match="length"):
        c.request("CHECK", lambda: [b"x"])
    with pytest.raises(ValueError, match="PING"):
        c.request("PING", b"x")


# --------------------------------------------------------------------------------------
# A real spamd
# --------------------------------------------------------------------------------------


@pytest.mark.engines
def test_ping(spamd_address: str) -> None:
    r = SpamcClient([spamd_address]).ping()
    assert r.command == "PING" and r.server == spamd_address and r.protocol == "1.5"


@pytest.mark.engines
@pytest.mark.parametrize("command", ["CHECK", "SYMBOLS", "REPORT", "HEADERS"])
def test_gtube_is_spam_with_every_command(spamd_address: str, command: str) -> None:
    r = SpamcClient([spamd_address]).request(command, spam())
    assert r.is_spam and r.score >= 1000 and r.required == 5.0
    assert r.required_text == "5.0"
    assert r.server == spamd_address and 0 < r.connect_seconds < r.seconds
    if command == "SYMBOLS":
        assert "GTUBE" in r.symbols
    if command == "REPORT":
        assert "GTUBE" in r.report
    if command == "HEADERS":
        status = r.header("X-Spam-Status")
        assert status is not None and status.startswith("Yes, score=")
        assert "GTUBE" in status.replace("\n\t", "")
        assert (r.header("X-Spam-Flag") or "").upper() == "YES"
        assert (r.header("X-Spam-Checker-Version") or "").startswith("SpamAssassin")


@pytest.mark.engines
def test_ham_is_not_spam(spamd_address: str) -> None:
    c = SpamcClient([spamd_address])
    r = c.symbols(ham())
    assert not r.is_spam and r.score < 5 and "GTUBE" not in r.symbols
    h = c.headers(ham())
    assert (h.header("X-Spam-Status") or "").startswith("No, score=")
    assert h.header("X-Spam-Flag") is None


@pytest.mark.engines
def test_large_message_is_streamed_in_chunks(spamd_address: str) -> None:
    """A 2 MB message goes out chunk by chunk from the source, never joined."""
    head = spam()
    filler = b"".join(b"line %06d of filler text for a large message\r\n" % i
                      for i in range(40000))
    pieces = [head] + [filler[i:i + 65536] for i in range(0, len(filler), 65536)]
    length = sum(map(len, pieces))
    assert length > 1_500_000
    handed_out: list[int] = []

    def source() -> list[bytes] | object:
        def gen():  # type: ignore[no-untyped-def]
            for p in pieces:
                handed_out.append(len(p))
                yield p
        return gen()

    r = SpamcClient([spamd_address]).symbols(source, length)  # type: ignore[arg-type]
    assert r.is_spam and "GTUBE" in r.symbols
    assert len(handed_out) == len(pieces) and max(handed_out) <= 65536 + len(head)


@pytest.mark.engines
def test_wrong_length_is_a_programming_error(spamd_address: str) -> None:
    c = SpamcClient([spamd_address])
    with pytest.raises(PayloadLengthError):
        c.check(lambda: [b"abc"], 10)
    with pytest.raises(PayloadLengthError):
        c.check(lambda: [b"x" * 70000, b"y" * 70000], 100000)


@pytest.mark.engines
def test_user_header_is_accepted(spamd_address: str) -> None:
    r = SpamcClient([spamd_address], user="nobody").check(spam())
    assert r.is_spam


@pytest.mark.engines
def test_unix_socket(spamd: object, spamd_address: str, tmp_path: Path) -> None:
    host, _, port = spamd_address.rpartition(":")
    with unix_relay(tmp_path / "spamd.sock", (host, int(port))) as addr:
        c = SpamcClient([addr])
        r = c.symbols(spam())
        assert r.is_spam and r.server == addr and addr.startswith("unix:")
        assert c.ping().server == addr


@pytest.mark.engines
def test_concurrent_requests_from_many_threads(spamd_address: str) -> None:
    c = SpamcClient([spamd_address])
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda i: c.check(spam() if i % 2 else ham()), range(24)))
    assert [r.is_spam for r in results] == [bool(i % 2) for i in range(24)]


# --------------------------------------------------------------------------------------
# Failover, cool-down and time bounds
# --------------------------------------------------------------------------------------


@pytest.mark.engines
def test_failover_to_second_address_and_cooldown(spamd_address: str) -> None:
    with FakeSpamd(FakeSpamd.hanging_up) as dead:
        c = SpamcClient([dead.address, spamd_address], cooldown=0.5)
        assert c.check(spam()).server == spamd_address
        assert dead.connections == 1
        first, second = c.status()
        assert not first.up and "connection" in first.last_error and second.up
        # inside the cool-down the dead server is not tried at all
        assert c.check(ham()).server == spamd_address
        assert dead.connections == 1
        time.sleep(0.6)
        assert c.check(ham()).server == spamd_address
        assert dead.connections == 2  # tried again once the cool-down was over


def test_refused_connection_fails_over_at_once() -> None:
    with FakeSpamd(FakeSpamd.answering(CHECK_SPAM)) as good, FakeSpamd(lambda c: None) as gone:
        port = gone.port
        gone.close()  # nothing listens there any more
        c = SpamcClient([f"127.0.0.1:{port}", good.address])
        t0 = time.monotonic()
        r = c.check(b"x")
        assert r.server == good.address and time.monotonic() - t0 < 1.0


def test_all_down_raises_unavailable_with_every_reason() -> None:
    with FakeSpamd(FakeSpamd.hanging_up) as a, FakeSpamd(FakeSpamd.hanging_up) as b:
        c = SpamcClient([a.address, b.address])
        with pytest.raises(SpamdUnavailable) as e:
            c.check(b"message")
        assert [s for s, _ in e.value.errors] == [a.address, b.address]
        # both in cool-down now: one probe per request, the one cooling longest
        with pytest.raises(SpamdUnavailable) as e:
            c.check(b"message")
        assert [s for s, _ in e.value.errors] == [a.address]


def test_temporary_error_code_fails_over_permanent_does_not() -> None:
    tempfail = FakeSpamd.answering(b"SPAMD/1.1 75 EX_TEMPFAIL busy\r\n")
    protocol = FakeSpamd.answering(b"SPAMD/1.0 76 Bad header line: x\r\n")
    with FakeSpamd(tempfail) as busy, FakeSpamd(FakeSpamd.answering(CHECK_HAM)) as good:
        r = SpamcClient([busy.address, good.address]).check(b"x")
        assert r.server == good.address and not r.is_spam and r.score == 1.2
    with FakeSpamd(protocol) as confused, FakeSpamd(FakeSpamd.answering(CHECK_HAM)) as good:
        with pytest.raises(SpamdReplyError) as e:
            SpamcClient([confused.address, good.address]).check(b"x")
        assert e.value.code == 76 and good.connections == 0


def test_garbage_is_a_protocol_error() -> None:
    with FakeSpamd(FakeSpamd.answering(b"220 smtp.example ESMTP\r\n")) as smtp, \
            pytest.raises(SpamdProtocolError, match="not a spamd answer"):
        SpamcClient([smtp.address]).check(b"x")
    with FakeSpamd(FakeSpamd.answering(b"SPAMD/1.1 0 EX_OK\r\n\r\n")) as nospam, \
            pytest.raises(SpamdProtocolError, match="no Spam header"):
        SpamcClient([nospam.address]).check(b"x")


def test_oversized_answer_is_refused() -> None:
    big = b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 1 / 5\r\n\r\n" + b"x" * 200_000
    with FakeSpamd(FakeSpamd.answering(big)) as chatty, \
            pytest.raises(SpamdProtocolError, match="larger than"):
        SpamcClient([chatty.address], max_response=100_000).check(b"x")


def test_slow_spamd_times_out_within_the_bound_and_is_not_retried_elsewhere() -> None:
    with FakeSpamd(FakeSpamd.hanging()) as slow, \
            FakeSpamd(FakeSpamd.answering(CHECK_SPAM)) as good:
        c = SpamcClient([slow.address, good.address], timeout=0.5)
        t0 = time.monotonic()
        with pytest.raises(SpamdTimeout, match=r"did not answer within 0\.5 s"):
            c.check(b"x")
        assert 0.45 < time.monotonic() - t0 < 1.5
        assert good.connections == 0  # the same message is not sent twice
        # the slow server is now cooling down: the next message goes to the good one
        assert c.check(b"x").server == good.address
        assert slow.connections == 1


def test_spamd_that_never_reads_times_out_while_sending() -> None:
    with blackhole() as addr:
        c = SpamcClient([addr], timeout=0.5)
        t0 = time.monotonic()
        with pytest.raises(SpamdTimeout):
            c.check(lambda: (b"x" * 65536 for _ in range(200)), 65536 * 200)
        assert time.monotonic() - t0 < 1.5


def test_round_robin_spreads_requests() -> None:
    with FakeSpamd(FakeSpamd.answering(CHECK_HAM)) as a, \
            FakeSpamd(FakeSpamd.answering(CHECK_HAM)) as b:
        c = SpamcClient([a.address, b.address], balance="round_robin")
        servers = [c.check(b"x").server for _ in range(6)]
        assert servers.count(a.address) == 3 and servers.count(b.address) == 3
        f = SpamcClient([a.address, b.address])
        assert {f.check(b"x").server for _ in range(4)} == {a.address}


def test_one_connection_per_request() -> None:
    """SPAMC has no keep-alive: every request opens (and spamd closes) a connection."""
    with FakeSpamd(FakeSpamd.answering(CHECK_HAM)) as a:
        c = SpamcClient([a.address])
        for _ in range(5):
            c.check(b"x")
        assert a.connections == 5


def test_small_message_goes_out_in_one_write() -> None:
    """Request header and a small message share one segment (no Nagle stall)."""
    seen: list[bytes] = []
    ready = threading.Event()

    def handler(conn):  # type: ignore[no-untyped-def]
        seen.append(conn.recv(65536))  # the first read gets everything at once
        ready.set()
        FakeSpamd.read_request(conn)
        conn.sendall(CHECK_HAM)

    with FakeSpamd(handler) as srv:
        SpamcClient([srv.address]).check(lambda: [b"Subject: x\r\n", b"\r\n", b"body"], 18)
        assert ready.wait(2)
    assert seen[0] == (b"CHECK SPAMC/1.5\r\nContent-length: 18\r\n\r\n"
                       b"Subject: x\r\n\r\nbody")


def test_gtube_constant_is_the_real_one() -> None:
    assert GTUBE.startswith(b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL")
