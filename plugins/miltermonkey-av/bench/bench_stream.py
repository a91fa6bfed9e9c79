"""Does streaming to clamd while the body arrives shorten the wait after end of DATA?

Starts a private clamd (limits raised to take 50 MB streams), two daemons
with the av brain (``stream_min_size = 0``: sent to clamd after end of data;
``stream_min_size = "1M"``: streamed while the body arrives), and one
Postfix that hands mail from 127.0.0.1 to the first and from 127.0.0.2 to
the second (``smtpd_milter_maps``).  For each size it sends messages of a
text part and a random attachment, the two modes alternating, and times
each from the client's final ``.`` to Postfix's reply: the part of the
transaction the milter and clamd add (Postfix hands the message to its
milters after the end of data).  It also prints the daemon's own end of
message time (its ``accept in`` log line).

Run (as root, like the tests): ``python bench/bench_stream.py [rounds] [MB ...]``;
defaults: 5 rounds of 20 and 50 MB.
"""

from __future__ import annotations

import random
import re
import socket
import statistics
import sys
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path

from miltermonkey_av.testing import Clamd, signature_files

from miltermonkey_core.testing.daemon import MonkeyProcess
from miltermonkey_core.testing.postfix import Postfix
from miltermonkey_core.testing.process import free_port
from miltermonkey_core.testing.sink import SmtpSink

MB = 1024 * 1024
#: The daemon's line for each message: "<qid>: accept in 44.4 ms, ..."
ACCEPT = re.compile(r": accept in ([0-9.]+) ms")
MODES = {"after end of data": ("127.0.0.1", 0), "streamed from 1M": ("127.0.0.2", MB)}


class BigClamd(Clamd):
    """The test clamd, taking streams up to 100 MB."""

    def _write_config(self) -> None:
        super()._write_config()
        text = self.config_path.read_text()
        for key, value in (("StreamMaxLength", "100M"), ("MaxFileSize", "100M"),
                           ("MaxScanSize", "200M")):
            text = "\n".join(f"{key} {value}" if ln.startswith(key + " ") else ln
                             for ln in text.splitlines()) + "\n"
        self.config_path.write_text(text)


def message(size: int, seed: int) -> bytes:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = "alice@example.org", "bob@example.net", f"bench {seed}"
    m.set_content("The data is attached.\n")
    m.add_attachment(random.Random(seed).randbytes(size * 3 // 4), maintype="application",
                     subtype="octet-stream", filename="data.bin")
    return m.as_bytes().replace(b"\n", b"\r\n")


def reply(sock: socket.socket) -> str:
    """The last line of one SMTP reply."""
    buf = b""
    while True:
        data = sock.recv(4096)
        if not data:
            raise RuntimeError(f"connection closed after {buf!r}")
        buf += data
        lines = buf.split(b"\r\n")
        for line in lines[:-1]:
            if len(line) >= 4 and line[3:4] == b" ":
                return line.decode()


def send(port: int, source: str, raw: bytes) -> tuple[str, float]:
    """One SMTP transaction; the seconds from the final '.' to the reply."""
    with socket.create_connection(("127.0.0.1", port), source_address=(source, 0)) as s:
        for command in (None, b"EHLO client.test", b"MAIL FROM:<alice@example.org>",
                        b"RCPT TO:<bob@example.net>", b"DATA"):
            if command is not None:
                s.sendall(command + b"\r\n")
            answer = reply(s)
            assert answer[0] in "23", answer
        body = raw.replace(b"\r\n.", b"\r\n..")
        s.sendall(body if body.endswith(b"\r\n") else body + b"\r\n")
        t0 = time.perf_counter()
        s.sendall(b".\r\n")
        answer = reply(s)
        seconds = time.perf_counter() - t0
        s.sendall(b"QUIT\r\n")
    return answer, seconds


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    sizes = [int(a) for a in sys.argv[2:]] or [20, 50]
    base = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    clamd = BigClamd(base / "clamd", free_port(), db_files=signature_files())
    sink = SmtpSink(base / "sink", free_port())
    monkeys = {}
    for mode, (_, threshold) in MODES.items():
        brain = {"use": "av", "clamd": [f"unix:{clamd.unix_socket}"], "max_scan_size": "100M",
                 "stream_min_size": threshold, "cache_ttl": 0}
        name = "stream" if threshold else "eod"
        monkeys[mode] = MonkeyProcess(base / name, [brain], {"debug_level": 50}, name=name)
    cidr = base / "milters.cidr"
    cidr.write_text(f"127.0.0.2/32 {monkeys['streamed from 1M'].postfix_spec}\n")
    postfix = Postfix(base / "postfix", free_port(), sink.port,
                      milters=monkeys["after end of data"].postfix_spec,
                      extra={"smtpd_milter_maps": f"cidr:{cidr}",
                             "message_size_limit": str(200 * MB)})
    try:
        clamd.start()
        sink.start()
        for m in monkeys.values():
            m.start()
        postfix.start()
        print(f"{rounds} rounds per size and mode; seconds from the final '.' to the reply")
        for size in sizes:
            times: dict[str, list[float]] = {mode: [] for mode in MODES}
            send(postfix.smtp_port, "127.0.0.1", message(MB, 0))  # warm up
            postfix.wait_queue_empty(120)
            sink.wait_for(1, timeout=120)
            sink.clear()
            seen = {mode: len(m.log()) for mode, m in monkeys.items()}
            for r in range(rounds):
                for mode, (source, _) in MODES.items():
                    raw = message(size * MB, size * 1000 + r * 2 + (source == "127.0.0.2"))
                    answer, seconds = send(postfix.smtp_port, source, raw)
                    assert answer.startswith("250"), answer
                    times[mode].append(seconds)
                    # delivered and gone before the next one: no delivery runs during it
                    postfix.wait_queue_empty(120)
                    sink.wait_for(1, timeout=120)
                    sink.clear()
            for mode, values in times.items():
                eom = [float(x) for x in ACCEPT.findall(monkeys[mode].log()[seen[mode]:])]
                print(f"{size:3d} MB  {mode:18s}  p50 {statistics.median(values) * 1000:7.1f} ms"
                      f"   ({', '.join(f'{v * 1000:.0f}' for v in values)});"
                      f"  the daemon's end of message p50 {statistics.median(eom):7.1f} ms")
        streamed = monkeys["streamed from 1M"].log().count("(streamed)")
        print(f"streamed scans logged by the streaming daemon: {streamed}")
    finally:
        postfix.stop()
        for m in monkeys.values():
            m.stop()
        sink.stop()
        clamd.stop()


if __name__ == "__main__":
    main()
