"""Fuzzing the daemon over its socket: malformed messages and milter command sequences.

Every example is one MTA connection to a real daemon (supervisor + libmilter
worker, the gate and stamp brains), sent in one go and half-closed, so the
daemon must answer what it answers and close the connection by itself:

* a **crash** is the worker dying (the supervisor would restart it under a
  new pid, and log it) or an exception escaping MilterMonkey's own code (an
  "internal error" log line);
* a **hang** is a connection the daemon does not finish within
  :data:`HANG_SECONDS` after the MTA side is done, or a daemon that no
  longer answers a well-formed message afterwards.

Both must be zero.  The default run sends a few hundred examples of each
kind; ``MILTERMONKEY_LONG=1`` (or ``MILTERMONKEY_FUZZ_EXAMPLES=N`` per kind)
sends thousands; the counts go to ``MILTERMONKEY_FUZZ_REPORT`` when set.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_support import (
    LONG,
    OPTNEG,
    alive_and_serving,
    connect_packet,
    worker_pid,
)

from miltermonkey_core.testing.daemon import MonkeyProcess

EXAMPLES = int(os.environ.get("MILTERMONKEY_FUZZ_EXAMPLES", "6000" if LONG else "250"))
HANG_SECONDS = 10.0
PROBE_EVERY = 100

BRAINS = [{"use": "gate"}, {"use": "stamp"}, {"use": "trivial"}]


class Fuzzed:
    """A daemon under fuzz, and what happened to it."""

    def __init__(self, m: MonkeyProcess) -> None:
        self.m = m
        self.worker = worker_pid(m)
        self.examples = 0
        self.hangs: list[str] = []
        self.finals: dict[str, int] = {}
        self.closed_early = 0

    def exchange(self, payload: bytes, what: str) -> None:
        """Send ``payload``, half-close, read until the daemon closes."""
        self.examples += 1
        if isinstance(self.m.address, tuple):
            s = socket.create_connection(self.m.address, timeout=HANG_SECONDS)
        else:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(HANG_SECONDS)
            s.connect(str(self.m.address))
        start = time.monotonic()
        data = bytearray()
        try:
            try:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
            except OSError:
                self.closed_early += 1  # the daemon hung up on garbage: fine
            while True:
                try:
                    chunk = s.recv(65536)
                except TimeoutError:
                    self.hangs.append(f"{what}: no end after {HANG_SECONDS} s")
                    return
                except OSError:
                    break
                if not chunk:
                    break
                data += chunk
                if time.monotonic() - start > HANG_SECONDS:
                    self.hangs.append(f"{what}: still talking after {HANG_SECONDS} s")
                    return
        finally:
            s.close()
        for cmd, text in _replies(bytes(data)):
            if cmd in "artd":
                self.finals[cmd] = self.finals.get(cmd, 0) + 1
            elif cmd == "y":
                key = "y " + text[:3]
                self.finals[key] = self.finals.get(key, 0) + 1
        if self.examples % PROBE_EVERY == 0:
            self.check()

    def check(self) -> None:
        assert alive_and_serving(self.m.address), f"no answer after {self.examples} examples"
        assert worker_pid(self.m) == self.worker, "the worker was restarted: it crashed"


def _replies(data: bytes) -> Iterator[tuple[str, str]]:
    pos = 0
    while pos + 5 <= len(data):
        (n,) = struct.unpack("!I", data[pos:pos + 4])
        if n == 0:
            return
        yield chr(data[pos + 4]), data[pos + 5:pos + 4 + n].decode("latin-1")
        pos += 4 + n


def packet(cmd: bytes | str, data: bytes = b"") -> bytes:
    c = cmd.encode("latin-1") if isinstance(cmd, str) else cmd
    return struct.pack("!I", len(c) + len(data)) + c + data


@pytest.fixture(scope="module", params=["unix", "tcp"])
def fuzzed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Fuzzed]:
    unix = request.param == "unix"
    m = MonkeyProcess(tmp_path_factory.mktemp(f"fuzz-{request.param}"), BRAINS,
                      {"debug_level": 0, "milter_timeout": 20}, unix=unix)
    with m:
        m.wait_for_log("is serving")
        f = Fuzzed(m)
        yield f
        f.check()
        log = m.log()
        report = {"socket": request.param, "examples": f.examples, "hangs": len(f.hangs),
                  "crashes": log.count("died unexpectedly") + log.count("internal error"),
                  "finals": f.finals, "closed_early": f.closed_early,
                  "malformed": log.count("malformed message from")}
        print(f"\nfuzz report: {json.dumps(report)}")
        path = os.environ.get("MILTERMONKEY_FUZZ_REPORT")
        if path:
            with open(path, "a") as fh:
                fh.write(json.dumps(report) + "\n")
    assert not f.hangs, f.hangs[:5]
    assert "died unexpectedly" not in log
    internal = [ln for ln in log.splitlines() if "internal error" in ln]
    assert not internal, internal[:5]


# ==========================================================================
# Malformed messages in a well-formed session
# ==========================================================================

HEADER_NAMES = [b"Subject", b"From", b"To", b"Message-ID", b"Content-Type", b"MIME-Version",
                b"Content-Transfer-Encoding", b"X-Spam-Status", b"X-Spam-Flag", b"X-Milter-Key",
                b"X-Gate-Skip", b"Received", b"Date"]

nul_free = st.binary(max_size=300).map(lambda b: b.replace(b"\0", b"?"))
ascii_token = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126),
                      min_size=1, max_size=40).map(str.encode)
# Mostly names an MTA would pass (printable ASCII), sometimes anything at all:
# a name that is not UTF-8 is mail no MTA sends and gets the daemon's on_error
# policy at once (a tempfail), which would otherwise stop most examples before
# the body and end of message.
header_name = st.one_of(st.sampled_from(HEADER_NAMES), ascii_token, ascii_token, ascii_token,
                        st.binary(min_size=0, max_size=40))
header_value = st.one_of(
    nul_free,
    st.binary(max_size=300),  # NULs: Postfix cuts a value there; the daemon keeps what it gets
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"", b" ", b"=?utf-8?B?////?=", b"=?x?Q?=FF=00?=", b"\xff\xfe\xfd",
                     b"multipart/mixed; boundary=", b"multipart/mixed; boundary=\"\"",
                     b"text/plain; charset=\"\xff\"", b"a\nb", b"\r\n\r\n", b"x" * 5000]),
)


@st.composite
def mime_body(draw: Any) -> bytes:
    boundary = draw(st.sampled_from([b"b1", b"", b"=_x", b"\xff", b"-" * 70]))
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        head = draw(st.sampled_from([b"Content-Type: text/plain\r\n",
                                     b"Content-Type: application/octet-stream\r\n"
                                     b"Content-Transfer-Encoding: base64\r\n",
                                     b"Content-Type: multipart/alternative; boundary=inner\r\n",
                                     b"", b"Content-Type: message/rfc822\r\n"]))
        content = draw(st.one_of(st.binary(max_size=500),
                                 st.sampled_from([b"QUJD!!!===", b"--inner\r\n", b"\0" * 50])))
        parts.append(b"--" + boundary + b"\r\n" + head + b"\r\n" + content + b"\r\n")
    closing = draw(st.sampled_from([b"--" + boundary + b"--\r\n", b"", b"--" + boundary]))
    return b"".join(parts) + closing


@st.composite
def malformed_message(draw: Any) -> bytes:
    out = [packet("O", OPTNEG)]
    for stage, macros in ((b"C", [b"j", b"mx.test", b"{daemon_name}", b"fuzz"]),):
        out.append(packet("D", stage + b"\0".join(macros) + b"\0"))
    out.append(packet("C", connect_packet()))
    helo = [b"client.test\0"] * 6 + [b"\xff\0", b"\0"]
    out.append(packet("H", draw(st.sampled_from(helo))))
    qids = [b"QID1", b"4XyZ1a", b"NOQUEUE", b"4XyZ1b", b"\xff", b""]
    out.append(packet("D", b"Mi\0" + draw(st.sampled_from(qids)) + b"\0"))
    sender = draw(st.one_of(st.just(b"<a@example.test>"), st.just(b"<>"), ascii_token,
                            nul_free))
    out.append(packet("M", sender + b"\0" + draw(st.sampled_from([b"", b"SIZE=1\0",
                                                                 b"BODY=8BITMIME\0"]))))
    for _ in range(draw(st.integers(1, 3))):
        rcpt = draw(st.one_of(st.just(b"<b@example.test>"), st.just(b"<refused@x>"), nul_free))
        out.append(packet("R", rcpt + b"\0"))
    out.append(packet("T"))
    for _ in range(draw(st.integers(0, 25))):
        out.append(packet("L", draw(header_name) + b"\0" + draw(header_value) + b"\0"))
    out.append(packet("N"))
    body = draw(st.one_of(st.binary(max_size=3000), mime_body(),
                          st.just(b""), st.just(b"REJECT-ME\r\n")))
    pos = 0
    while pos < len(body):
        n = draw(st.integers(1, 4096))
        out.append(packet("B", body[pos:pos + n]))
        pos += n
    out.append(packet("E"))
    ending = draw(st.sampled_from(["Q", "AQ", "AAQ", "K", "", "AA"]))
    out += [packet(c) for c in ending]
    return b"".join(out)


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(payload=malformed_message())
def test_malformed_messages(fuzzed: Fuzzed, payload: bytes) -> None:
    fuzzed.exchange(payload, "message")


# ==========================================================================
# Milter command sequences no MTA would send
# ==========================================================================

COMMANDS = [*"ABCDEHKLMNOQRTU", "\x00", "Z", "\xff", "p"]


@st.composite
def command_sequence(draw: Any) -> bytes:
    out = []
    if draw(st.integers(0, 9)) < 8:
        optnegs = [OPTNEG, struct.pack("!III", 2, 0, 0), struct.pack("!III", 6, 0, 0),
                   struct.pack("!III", 1, 0xFFFFFFFF, 0xFFFFFFFF), b"\0" * 11, b"",
                   struct.pack("!III", 6, 0x1FF, 0x1FFFFF) + b"trailing"]
        out.append(packet("O", draw(st.sampled_from(optnegs))))
    for _ in range(draw(st.integers(0, 30))):
        kind = draw(st.integers(0, 19))
        if kind == 0:  # a length field that lies
            out.append(struct.pack("!I", draw(st.sampled_from([0, 1, 0xFFFFFFFF, 2**20])))
                       + draw(st.binary(max_size=20)))
        elif kind == 1:  # macros for a random stage
            out.append(packet("D", draw(st.binary(max_size=1)) + draw(st.binary(max_size=80))))
        elif kind == 2:  # a well-formed message body step
            out.append(packet("B", draw(st.binary(max_size=2000))))
        else:
            out.append(packet(draw(st.sampled_from(COMMANDS)), draw(st.binary(max_size=120))))
    if draw(st.booleans()):  # cut off in the middle of a packet
        out.append(struct.pack("!I", 100) + b"L")
    return b"".join(out)


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(payload=command_sequence())
def test_command_sequences(fuzzed: Fuzzed, payload: bytes) -> None:
    fuzzed.exchange(payload, "sequence")


def test_worker_never_restarted(fuzzed: Fuzzed) -> None:
    fuzzed.check()
    assert Path(f"/proc/{fuzzed.worker}").exists()
