#!/usr/bin/env python3
"""Where does the MilterMonkey daemon spend its CPU?  py-spy under real Postfix load.

    python bench/profile.py [--brains trivial|avspam] [--duration 20] [--rate 200]

Starts a private Postfix relaying to smtp-sink (plus clamd and spamd for
``avspam``), one MilterMonkey daemon on TCP, sends mail through it with the
benchmark's SMTP client for the whole recording, and runs

    py-spy record --pid DAEMON --format raw --rate R --duration D --gil

Output (under bench-results/profile-STAMP/): the collapsed stacks
(``profile.txt``: one ``frame;frame;... count`` line per stack, the input of
flamegraph.pl, speedscope or inferno), an SVG flame graph if ``--svg``, and
``summary.txt``: the top functions by own time (the frame on top of the
stack when sampled), by total time (anywhere on the stack), own time per
area (the core's milter protocol, the rest of the core, brains, logging,
threading, sockets, other stdlib), and time per milter command handler.

``--gil`` (the default) samples only the thread that holds the GIL: the
Python work the daemon does, which is what the framework can make cheaper.
Without it py-spy samples every thread it thinks is running; under load on a
busy 2-core box it counted threads blocked in ``SimpleQueue.get``,
``Event.wait`` and ``accept`` as running, which buries the real work under
waits.  Native frames are off (py-spy's default): time spent in C without
the GIL (system calls, hashing) does not show up.

Needs root (Postfix; py-spy attaches with ptrace) and py-spy in the venv
(``pip install py-spy``).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import loadgen  # noqa: E402
import messages  # noqa: E402
import procstats  # noqa: E402
from miltermonkey_av.testing import Clamd  # noqa: E402
from miltermonkey_spam.testing import Spamd  # noqa: E402

from miltermonkey_core.testing.daemon import MonkeyProcess  # noqa: E402
from miltermonkey_core.testing.postfix import Postfix  # noqa: E402
from miltermonkey_core.testing.process import free_port  # noqa: E402
from miltermonkey_core.testing.sink import SmtpSink  # noqa: E402

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def area(path: str) -> str:
    # py-spy prints paths relative to sys.path when it can
    if "miltermonkey_core/brains/" in path or "miltermonkey_av/" in path \
            or "miltermonkey_spam/" in path:
        return "brains"
    if "miltermonkey_core/milter/" in path:
        return "milter protocol (core)"
    if "miltermonkey_core/" in path:
        return "miltermonkey core"
    if "logging/" in path:
        return "logging (stdlib)"
    if path.endswith(("threading.py", "queue.py")):
        return "threading/queue (stdlib)"
    if path.endswith(("socket.py", "selectors.py")):
        return "sockets (stdlib)"
    return "other stdlib/site-packages"


def entry_point(frames: list[str]) -> str:
    """The milter command handler a stack is in: the frame the connection's loop called.

    Work handed to the pool has no loop below it: its first core frame.
    """
    for i, f in enumerate(frames[:-1]):
        if f.startswith("_loop (") and "miltermonkey_core/milter/connection.py" in f:
            return short(frames[i + 1])
    return next((short(f) for f in frames if "miltermonkey_core" in f), short(frames[0]))


def short(frame: str) -> str:
    m = FRAME.match(frame)
    if not m:
        return frame
    f = m.group("file")
    for marker in ("site-packages/", "/lib/python3", "/work/main/"):
        if marker in f:
            f = f.split(marker, 1)[1]
            break
    return f"{m.group('func')} ({f})"


def summarize(raw: Path, top: int) -> str:
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    roots: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        n = int(count_text)
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        samples += n
        leaf = frames[-1]
        own[short(leaf)] += n
        m = FRAME.match(leaf)
        areas[area(m.group("file") if m else leaf)] += n
        for f in {short(f) for f in frames}:
            total[f] += n
        roots[entry_point(frames)] += n
    if not samples:
        return "no samples (was the daemon busy?)"

    def table(title: str, counter: collections.Counter[str], limit: int) -> list[str]:
        out = [f"\n{title}", f"{'samples':>8} {'share':>6}  function (file)"]
        for name, n in counter.most_common(limit):
            out.append(f"{n:>8} {n / samples:6.1%}  {name}")
        return out

    lines = [f"{samples} samples"]
    lines += table("own time by area", areas, 10)
    lines += table(f"top {top} functions by own time", own, top)
    lines += table(f"top {top} functions by total time (on the stack)", total, top)
    lines += table("own+children time by milter command handler (or first core frame)",
                   roots, 15)
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description="py-spy profile of the MilterMonkey daemon")
    ap.add_argument("--brains", choices=("trivial", "avspam"), default="trivial")
    ap.add_argument("--duration", type=int, default=20, help="seconds to record (20)")
    ap.add_argument("--rate", type=int, default=100, help="py-spy samples per second (100)")
    ap.add_argument("--pyspy-args", default="--gil",
                    help="extra py-spy record arguments (default '--gil': sample only the "
                    "thread holding the GIL, i.e. Python's own CPU; '' samples every thread "
                    "py-spy thinks is running)")
    ap.add_argument("--concurrency", type=int, default=5)
    ap.add_argument("--size", default="2k", choices=[*messages.SIZES, "mix"])
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--svg", action="store_true",
                    help="also record a flame graph SVG (a second recording)")
    ap.add_argument("--debug-level", type=int, default=10, help="daemon debug_level (10)")
    ap.add_argument("--out", default=None, help="output directory")
    args = ap.parse_args()

    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        print("py-spy not found: pip install py-spy", file=sys.stderr)
        return 2
    root = HERE.parent
    out = Path(args.out) if args.out else (
        root / "bench-results" / f"profile-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mm-profile-"))
    work.chmod(0o755)
    parts: list[object] = []
    monkey: MonkeyProcess | None = None
    try:
        sink = SmtpSink(work / "sink", free_port())
        sink.start()
        parts.append(sink)
        postfix = Postfix(work / "postfix", free_port(), sink.port, extra={
            "initial_destination_concurrency": "20", "in_flow_delay": "0s"})
        postfix.start()
        parts.append(postfix)
        brains: list[dict[str, object]] = [{"use": "trivial"}]
        if args.brains == "avspam":
            clamd = Clamd(work / "clamd", free_port())
            clamd.start()
            parts.append(clamd)
            spamd = Spamd(work / "spamd", free_port())
            spamd.start()
            parts.append(spamd)
            brains = [{"use": "av", "clamd": [f"tcp:127.0.0.1:{clamd.tcp_port}"]},
                      {"use": "spam", "servers": [f"127.0.0.1:{spamd.port}"]}]
        # the cache off: the load sends the same 200 messages over and over
        monkey = MonkeyProcess(work / "monkey", brains,
                               {"debug_level": args.debug_level, "milter_key": False,
                                "cache": "off"})
        monkey.start(timeout=60)
        postfix.set_milters(monkey.postfix_spec)
        pool = messages.build_set(args.size, 200)
        wires = [messages.wire_form(m) for m in pool.messages]
        loadgen.smtp_load(postfix.smtp_port, wires[:20], args.concurrency,
                          messages.SENDER, messages.RECIPIENT)

        stop = threading.Event()
        sent = [0, 0]

        def load() -> None:
            while not stop.is_set():
                r = loadgen.smtp_load(postfix.smtp_port, wires, args.concurrency,
                                      messages.SENDER, messages.RECIPIENT)
                sent[0] += len(r.outcomes)
                sent[1] += len(r.failures)
                with contextlib.suppress(Exception):
                    sink.clear()

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        time.sleep(1)
        # the supervisor's child is the worker, the process that does the work
        pid = procstats.worker_pid(monkey.proc.pid if monkey.proc else 0)
        raw = out / "profile.txt"
        cmd = [pyspy, "record", "--pid", str(pid), "--rate", str(args.rate),
               "--duration", str(args.duration), "--format", "raw", "--output", str(raw),
               *args.pyspy_args.split()]
        print("$ " + " ".join(cmd), flush=True)
        t0 = time.monotonic()
        subprocess.run(cmd, check=True)
        if args.svg:
            svg = out / "flamegraph.svg"
            subprocess.run([pyspy, "record", "--pid", str(pid), "--rate", str(args.rate),
                            "--duration", str(args.duration), "--format", "flamegraph",
                            "--output", str(svg)], check=True)
        elapsed = time.monotonic() - t0
        stop.set()
        loader.join(120)
        text = (f"MilterMonkey daemon profile: brains={args.brains}, size={args.size}, "
                f"{args.concurrency} sessions, py-spy --rate {args.rate} for {args.duration} s "
                f"(Python frames only)\nmessages sent during the run: {sent[0]} "
                f"({sent[0] / max(1e-9, elapsed + 1):.0f}/s), refused {sent[1]}\n")
        text += summarize(raw, args.top)
        (out / "summary.txt").write_text(text + "\n")
        print(text)
        print(f"\nwritten: {raw}, {out / 'summary.txt'}"
              + (f", {out / 'flamegraph.svg'}" if args.svg else ""))
        return 0
    finally:
        if monkey is not None:
            monkey.stop()
        for p in reversed(parts):
            with contextlib.suppress(Exception):
                p.stop()  # type: ignore[attr-defined]
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
