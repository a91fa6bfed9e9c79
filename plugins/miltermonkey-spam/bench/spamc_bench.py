"""Measure spamd through our SPAMC client: connect cost, latency, throughput.

Usage (from the repository root, as root so spamd can drop privileges)::

    .venv/bin/python plugins/miltermonkey-spam/bench/spamc_bench.py [-n 200] [-c 5]
        [--size 5000] [--spamd HOST:PORT] [--no-milter]

Without ``--spamd`` a private spamd (Debian's rules, ``-L``, 5 children) is
started for the run.  It reports:

* the connect cost SPAMC pays per request (spamd has no keep-alive), as the
  client measured it on real requests, and a PING round trip;
* serial latency of CHECK, SYMBOLS and HEADERS for one message;
* throughput at concurrency ``-c`` with our client (CHECK and HEADERS),
  against forking one ``spamc`` process per message as spamass-milter does;
* throughput of the whole path: the MTA-side client -> MilterMonkey daemon ->
  spam brain -> spamd (unless ``--no-milter``).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from miltermonkey_spam.spamc import SpamcClient
from miltermonkey_spam.testing import Spamd

from miltermonkey_core.testing.client import MessageSpec, run_session
from miltermonkey_core.testing.daemon import MonkeyProcess
from miltermonkey_core.testing.process import free_port

WORDS = (
    "the", "meeting", "notes", "from", "tuesday", "are", "attached", "below", "please",
    "review", "the", "budget", "figures", "and", "let", "me", "know", "whether", "the",
    "quarterly", "plan", "still", "works", "for", "your", "team", "we", "can", "discuss",
    "the", "remaining", "items", "on", "thursday", "afternoon",
)


def message(size: int) -> bytes:
    head = (b"From: Alice Example <alice@example.com>\r\nTo: Bob <bob@example.org>\r\n"
            b"Subject: quarterly planning notes\r\nDate: Mon, 24 Nov 2025 10:00:00 +0000\r\n"
            b"Message-ID: <bench.1@example.com>\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=us-ascii\r\n\r\n")
    body = bytearray()
    i = 0
    while len(head) + len(body) < size:
        line = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(11))
        body += line.encode() + b"\r\n"
        i += 7
    return head + bytes(body)


def rate(n: int, workers: int, job: Callable[[int], object]) -> tuple[float, float]:
    """Messages per second, and client-side CPU ms per message (ours plus child processes).

    The CPU figure does not depend on how busy the machine is, unlike the rate.
    """
    def cpu() -> float:
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + kids.ru_utime + kids.ru_stime

    c0, t0 = cpu(), time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(job, range(n)))
    return n / (time.perf_counter() - t0), (cpu() - c0) / n * 1000


def ms(values: list[float]) -> str:
    v = sorted(values)
    return (f"median {statistics.median(v) * 1000:.3f} ms, "
            f"p90 {v[int(len(v) * 0.9)] * 1000:.3f} ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=200, help="messages per throughput run")
    ap.add_argument("-c", type=int, default=5, help="concurrency")
    ap.add_argument("--size", type=int, default=5000, help="message size in bytes")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved throughput rounds")
    ap.add_argument("--spamd", help="use this spamd (HOST:PORT) instead of starting one")
    ap.add_argument("--no-milter", action="store_true", help="skip the whole-daemon run")
    args = ap.parse_args()
    raw = message(args.size)
    work = Path(tempfile.mkdtemp(prefix="spam-bench-"))
    work.chmod(0o755)
    own: Spamd | None = None
    try:
        if args.spamd:
            address = args.spamd
        else:
            own = Spamd(work / "spamd", free_port())
            t0 = time.perf_counter()
            own.start()
            print(f"spamd started in {time.perf_counter() - t0:.2f} s "
                  f"(--max-children {own.max_children}, -L)")
            address = f"127.0.0.1:{own.port}"
        client = SpamcClient([address])
        host, _, port = address.rpartition(":")
        print(f"message: {len(raw)} bytes, clean text; spamd {address}")
        for _ in range(10):  # warm up every child
            client.check(raw)

        pings = [client.ping() for _ in range(200)]
        print(f"PING round trip (connect+PING+PONG+close): {ms([p.seconds for p in pings])}")
        print(f"  of which connect: {ms([p.connect_seconds for p in pings])}")
        for cmd in ("CHECK", "SYMBOLS", "HEADERS"):
            rs = [client.request(cmd, raw) for _ in range(30)]
            print(f"serial {cmd:8s}: {ms([r.seconds for r in rs])}; "
                  f"connect {ms([r.connect_seconds for r in rs])}; score {rs[0].score_text}")

        spamc = shutil.which("spamc")

        def fork(_i: int) -> None:
            assert spamc is not None
            subprocess.run([spamc, "-d", host, "-p", port, "-c"], input=raw,
                           capture_output=True, check=False)

        runs: dict[str, list[tuple[float, float]]] = {}
        jobs: list[tuple[str, Callable[[int], object]]] = [
            ("our client, CHECK", lambda _i: client.request("CHECK", raw)),
            ("our client, HEADERS (the brain's default)",
             lambda _i: client.request("HEADERS", raw)),
        ]
        if spamc:
            jobs.append(("one spamc process per message (spamass-milter's way)", fork))
        for _round in range(args.rounds):  # interleaved: the machine's load drifts
            for label, job in jobs:
                runs.setdefault(label, []).append(rate(args.n, args.c, job))
        for label, rates in runs.items():
            print(f"{label}, concurrency {args.c}: "
                  + ", ".join(f"{r:.1f}" for r, _ in rates) + " msg/s; client CPU "
                  + ", ".join(f"{c:.2f}" for _, c in rates) + " ms/msg")
        if spamc:
            t0 = time.perf_counter()
            for _ in range(20):
                subprocess.run([spamc, "-d", host, "-p", port, "-K"], capture_output=True,
                               check=False)
            print(f"  spamc -K (fork+exec+PING): {(time.perf_counter() - t0) / 20 * 1000:.1f} ms"
                  " per call")

        if not args.no_milter:
            brains = [{"use": "spam", "servers": [address]}]
            with MonkeyProcess(work / "monkey", brains, {"debug_level": 5}) as m:
                per = max(1, args.n // args.c)

                def session(_i: int) -> None:
                    res = run_session(m.address, [MessageSpec(raw, "<a@example.com>",
                                                              ["<b@example.org>"])] * per,
                                      timeout=60)
                    bad = [f"{x.disposition.name} {x.reply}" for x in res if not x.accepted]
                    if bad:
                        print(f"  not accepted: {bad[:3]} ...; log tail:\n{m.log()[-1500:]}")

                t0 = time.perf_counter()
                with ThreadPoolExecutor(args.c) as pool:
                    list(pool.map(session, range(args.c)))
                dt = time.perf_counter() - t0
                print(f"whole path (MTA client -> daemon -> spam brain -> spamd), "
                      f"{args.c} sessions: {per * args.c / dt:.1f} msg/s")
    finally:
        if own is not None:
            own.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
