#!/usr/bin/env python3
"""MilterMonkey against its peers, on a real Postfix, clamd and spamd, in one run.

    nox -s bench -- [--count N] [--concurrency C] [--sizes 2k,50k,1m,mix]
                    [--contenders LIST] [--repeat N] [--quick]
    (or, as root, in the dev venv:  python bench/run.py ...)

It starts on loopback a private Postfix relaying to smtp-sink, one clamd and
one spamd that every contender shares, starts and checks every contender,
then sends the same message set at the same concurrency through each one in
turn, size by size (--repeat N: N interleaved rounds per size):

    none             Postfix without milter: the ceiling
    bare             bare pymilter milter adding a header, pymilter defaults, TCP
    bare-tuned       the same, TCP_NODELAY + connect/DATA answered, TCP
    bare-unix        the same as bare, UNIX socket
    c-tuned          a C libmilter milter adding a header, tuned like bare-tuned, TCP
    mm-trivial       MilterMonkey, trivial brain, TCP
    mm-trivial-unix  MilterMonkey, trivial brain, UNIX socket
    peers            clamav-milter + spamass-milter chained (Debian)
    mm-avspam        MilterMonkey, av + spam brains (milter key signing when available)
    mm-keyed         MilterMonkey hop 2: av + spam with skip_if_key, fed mail keyed by hop 1
    mimedefang       MIMEDefang with clamd and embedded SpamAssassin
    clamd, spamd, engines   the engines alone (INSTREAM, CHECK, both per message)
    smtp-source      the ceiling again with Postfix's smtp-source as the client

and finally the memory checks (20 concurrent sessions; one 50 MB message).
Results are printed and written to bench-results/ as JSON and Markdown.
Needs root (Postfix, daemons dropping to their users).  See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import loadgen  # noqa: E402
import messages  # noqa: E402
import peers  # noqa: E402
import procstats  # noqa: E402
from miltermonkey_av.testing import Clamd  # noqa: E402
from miltermonkey_spam.testing import Spamd  # noqa: E402

from miltermonkey_core.testing.daemon import MonkeyProcess  # noqa: E402
from miltermonkey_core.testing.postfix import Postfix  # noqa: E402
from miltermonkey_core.testing.process import free_port  # noqa: E402
from miltermonkey_core.testing.sink import SmtpSink, parse_dump  # noqa: E402

ALL_CONTENDERS = ("none", "smtp-source", "bare", "bare-tuned", "bare-unix", "c-tuned",
                  "mm-trivial", "mm-trivial-unix", "clamav-milter", "mm-av", "spamass-milter",
                  "mm-spam", "peers", "mm-avspam", "mm-keyed", "mimedefang", "clamd", "spamd",
                  "engines")
ENGINE_KINDS = {"clamd": "clamd", "spamd": "spamd", "engines": "both"}
LABELS = {
    "none": "1  Postfix, no milter (ceiling)",
    "bare": "2a bare pymilter, defaults, TCP",
    "bare-tuned": "2b bare pymilter, tuned, TCP",
    "bare-unix": "2c bare pymilter, defaults, UNIX",
    "c-tuned": "2d C libmilter milter, tuned, TCP",
    "mm-trivial": "3a miltermonkey trivial, TCP",
    "mm-trivial-unix": "3b miltermonkey trivial, UNIX",
    "clamav-milter": "4a clamav-milter alone",
    "mm-av": "5a miltermonkey av alone",
    "spamass-milter": "4b spamass-milter alone",
    "mm-spam": "5b miltermonkey spam alone",
    "peers": "4  clamav-milter + spamass-milter",
    "mm-avspam": "5  miltermonkey av+spam",
    "mm-keyed": "6  miltermonkey hop 2, valid key",
    "mimedefang": "7  MIMEDefang clamd+SA",
    "clamd": "E1 clamd alone (INSTREAM)",
    "spamd": "E2 spamd alone (CHECK)",
    "engines": "E3 clamd+spamd alone",
    "smtp-source": "C  ceiling, smtp-source client",
}
AVSPAM = ("peers", "mm-avspam", "mm-keyed", "mimedefang")
#: Single-engine rows and the peer each is compared with.
SINGLE = {"mm-av": "clamav-milter", "mm-spam": "spamass-milter"}
#: Rows compared with the C milter (2d), the floor of any milter here.
VS_C = ("bare", "bare-tuned", "bare-unix", "mm-trivial", "mm-trivial-unix")
#: Not milters: measured without Postfix pointing at anything.
NOT_MILTERS = (*ENGINE_KINDS, "smtp-source")
SPAM_LIMIT = loadgen.SPAMC_MAX_SIZE


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def loud(msg: str) -> None:
    bar = "!" * 78
    print(f"\n{bar}\n!! {msg}\n{bar}\n", flush=True)


# --------------------------------------------------------------------------------------------
# what a running contender looks like
# --------------------------------------------------------------------------------------------


@attrs.define
class Running:
    """A started contender: what Postfix points at and how to meter and stop it."""

    spec: str
    roots: Callable[[], list[int]]
    stop: Callable[[], None]
    #: (header, applies to messages up to this many bytes; 0 = all) that every
    #: delivered message must carry.
    markers: list[tuple[str, int]] = attrs.field(factory=list)
    #: After a measurement of n messages: None if fine, else what is wrong.
    after: Callable[[int], str | None] | None = None
    spam: bool = False
    virus: bool = False
    notes: list[str] = attrs.field(factory=list)
    monkey: MonkeyProcess | None = None


class Skip(Exception):
    """A contender cannot run here; the text says why (printed, and kept in the results)."""


# --------------------------------------------------------------------------------------------
# the bench
# --------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.monkeys: list[MonkeyProcess] = []
        self.results: list[dict[str, Any]] = []
        self.skipped: dict[str, str] = {}
        self.checks: dict[str, list[str]] = {}
        self.memory: dict[str, Any] = {}
        self.keyed_sets: dict[str, messages.MessageSet] = {}
        self.secret_file: Path | None = None
        self.sets: dict[str, messages.MessageSet] = {}
        self.wires: dict[str, list[bytes]] = {}
        self._milters = "<unset>"
        #: The round being measured (1 to --repeat); every row records it.
        self.round = 1
        #: (contender, size) -> how often the set is sent, decided in round 1.
        self.passes_memo: dict[tuple[str, str], int] = {}

    # --- the shared stack ---------------------------------------------------------------------

    def start_stack(self) -> None:
        w = self.work
        self.sink = SmtpSink(w / "sink", free_port())
        self.sink.start()
        self.postfix = Postfix(
            w / "postfix", free_port(), self.sink.port, milters="",
            extra={
                # throughput: no slow start, no rate limits
                "default_destination_concurrency_limit": "20",
                "smtp_destination_concurrency_limit": "20",
                "initial_destination_concurrency": "20",
                "smtpd_client_connection_count_limit": "0",
                "smtpd_client_connection_rate_limit": "0",
                "smtpd_client_message_rate_limit": "0",
                "smtpd_client_recipient_rate_limit": "0",
                "in_flow_delay": "0s",
                # the 50 MB memory test, and slow engines on 1 MB mail
                "message_size_limit": str(120 * 1024 * 1024),
                "milter_command_timeout": "60s",
                "milter_content_timeout": "300s",
            })
        self.postfix.start()
        self._milters = ""
        log(f"postfix on 127.0.0.1:{self.postfix.smtp_port} -> smtp-sink :{self.sink.port}")
        needs_engines = any(c in self.args.contenders
                            for c in (*AVSPAM, *ENGINE_KINDS, *SINGLE, *SINGLE.values())) \
            or not self.args.no_memory
        self.clamd: Clamd | None = None
        self.spamd: Spamd | None = None
        if needs_engines:
            self.clamd = Clamd(w / "clamd", free_port())
            self.clamd.start()
            self.spamd = Spamd(w / "spamd", free_port(), max_children=self.args.spamd_children)
            self.spamd.start()
            log(f"clamd on :{self.clamd.tcp_port} and {self.clamd.unix_socket}; spamd on "
                f":{self.spamd.port} (--max-children {self.args.spamd_children}, -L)")
        self.meter_engines = procstats.Meter("engines", lambda: [
            p for p in ((self.clamd.pid if self.clamd else None),
                        (self.spamd.pid if self.spamd else None)) if p])
        self.meter_mta = procstats.Meter("postfix", lambda: [self.postfix.pid or 0])
        self.meter_sink = procstats.Meter("sink", lambda: [self.sink.pid or 0])

    def stop_everything(self) -> None:
        for m in self.monkeys:
            with contextlib.suppress(Exception):
                m.stop()
        peers.stop_all()
        for part in ("postfix", "sink", "clamd", "spamd"):
            obj = getattr(self, part, None)
            if obj is not None:
                with contextlib.suppress(Exception):
                    obj.stop()

    def set_milters(self, spec: str) -> None:
        if spec != self._milters:
            self.postfix.set_milters(spec)
            self._milters = spec

    # --- delivery bookkeeping -----------------------------------------------------------------

    def queue_count(self) -> int:
        n = 0
        for name in ("incoming", "active", "deferred", "hold", "maildrop"):
            for _dirpath, _dirs, files in os.walk(self.postfix.queue_dir / name):
                n += len(files)
        return n

    def wait_delivered(self, expected: int, timeout: float) -> tuple[float, int]:
        """Wait until the queue is empty and the sink holds ``expected`` messages."""
        end = time.monotonic() + timeout
        delivered = 0
        while True:
            queued = self.queue_count()
            if queued == 0:
                delivered = len(self.sink.messages())
                if delivered >= expected:
                    return time.perf_counter(), delivered
            if time.monotonic() > end:
                return time.perf_counter(), len(self.sink.messages())
            time.sleep(0.02)

    def send_and_settle(self, wires: Sequence[bytes], concurrency: int) -> loadgen.LoadResult:
        res = loadgen.smtp_load(self.postfix.smtp_port, wires, concurrency,
                                messages.SENDER, messages.RECIPIENT)
        self.wait_delivered(len(wires) - len(res.failures), 120)
        return res

    # --- message sets -------------------------------------------------------------------------

    def build_sets(self) -> None:
        for name in self.args.sizes:
            t0 = time.perf_counter()
            s = messages.build_set(name, self.args.count, self.args.seed)
            self.sets[name] = s
            self.wires[name] = [messages.wire_form(m) for m in s.messages]
            log(f"message set {name}: {len(s)} messages, mean {s.mean_bytes / 1024:.1f} KiB "
                f"({time.perf_counter() - t0:.1f} s to build)")

    # --- one measurement ----------------------------------------------------------------------

    def remembered_passes(self, key: str, size: str, first: Callable[[], dict[str, Any]],
                          again: Callable[[int, bool], dict[str, Any]],
                          msgset: messages.MessageSet) -> dict[str, Any]:
        """Measure once, and again with the set sent more often if --min-time asks for it.

        The number of passes is decided in the first round and reused in the
        later ones, so every round sends the same mail.  ``again(passes,
        right_after_warmup)``: the second argument is False when the short
        first measurement came in between.
        """
        memo = self.passes_memo.get((key, size))
        if memo is not None and memo > 1:
            return again(memo, True)
        row = first()
        passes = self.passes_for(row["e2e_s"], msgset) if not row["problems"] else 1
        if passes > 1:
            log(f"  {key:<16} {size:>4}: {row['e2e_s']:.2f} s is under --min-time "
                f"{self.args.min_time:g} s: again with the set sent {passes} times")
            row = again(passes, False)
        if not row["problems"]:
            self.passes_memo[(key, size)] = passes
        return row

    def passes_for(self, seconds: float, msgset: messages.MessageSet) -> int:
        """How often to send the set so a measurement lasts at least --min-time.

        A fast contender gets through the set in a fraction of a second, where
        one slow message or a neighbour's burst moves the rate a lot; sending
        the same set several times makes the window long enough.  Capped at
        50 passes and 1.5 GB of mail.
        """
        need = float(self.args.min_time)
        if not need or seconds >= need:
            return 1
        cap = max(1, min(50, int(1.5e9 // max(1, msgset.total_bytes))))
        return max(1, min(cap, math.ceil(need / max(seconds, 1e-3))))

    def measure(self, key: str, run: Running, size: str,
                msgset: messages.MessageSet | None = None) -> dict[str, Any]:
        msgset = msgset or self.sets[size]
        wires = [messages.wire_form(m) for m in msgset.messages] if msgset is not \
            self.sets.get(size) else self.wires[size]
        conc = self.args.concurrency
        self.set_milters(run.spec)
        # warm-up: the same kind of mail, not measured
        warm = wires[: self.args.warmup]
        if warm:
            wres = self.send_and_settle(warm, conc)
            if wres.failures:
                run.notes.append(f"warm-up {size}: {len(wres.failures)} failed, first: "
                                 f"{wres.failures[0].detail}")
        row = self.remembered_passes(
            key, size, lambda: self._measure_once(key, run, size, msgset, wires, len(warm)),
            lambda passes, fresh: self._measure_once(key, run, size, msgset, wires * passes,
                                                     len(warm) if fresh else 0, passes),
            msgset)
        for p in row["problems"]:
            loud(f"{key} / {size}: {p}")
        self.results.append(row)
        self._print_row(row)
        return row

    def _measure_once(self, key: str, run: Running, size: str, msgset: messages.MessageSet,
                      wires: list[bytes], warmed: int, passes: int = 1) -> dict[str, Any]:
        self.sink.clear()
        meter = procstats.Meter(key, run.roots) if run.spec else None
        meters = [meter, self.meter_engines, self.meter_mta, self.meter_sink]
        for m in meters:
            if m is not None:
                m.start()
        busy0, total0 = procstats.box_busy_seconds()
        with procstats.Sampler([m for m in (meter,) if m is not None]):
            res = loadgen.smtp_load(self.postfix.smtp_port, wires, self.args.concurrency,
                                    messages.SENDER, messages.RECIPIENT)
            accepted = len(wires) - len(res.failures)
            t_e2e, delivered = self.wait_delivered(accepted, 60 + 2 * len(wires))
        busy1, total1 = procstats.box_busy_seconds()
        row = self._row(key, size, msgset, res, t_e2e, delivered, meters,
                        (busy1 - busy0) / max(1e-9, total1 - total0), passes)
        problems = []
        if res.failures:
            problems.append(f"{len(res.failures)} of {len(wires)} refused; first: "
                            f"{res.failures[0].detail}")
        if delivered != len(wires):
            problems.append(f"DELIVERED {delivered} != SENT {len(wires)}")
        missing = self._check_markers(run.markers)
        if missing:
            problems.append(missing)
        if run.after is not None:
            bad = run.after(len(wires) + warmed)
            if bad:
                problems.append(bad)
        left = self.queue_count()
        if left:
            problems.append(f"{left} message(s) still queued after the wait: purged")
            self.postfix.purge_queue()
        row["problems"] = problems
        return row

    def _row(self, key: str, size: str, msgset: messages.MessageSet, res: loadgen.LoadResult,
             t_e2e: float | None, delivered: int, meters: Sequence[procstats.Meter | None],
             busy: float, passes: int = 1) -> dict[str, Any]:
        n = len(res.outcomes)
        e2e = (t_e2e - res.started) if t_e2e is not None else res.elapsed
        milter, engines, mta, sink = meters
        return {
            "contender": key,
            "label": LABELS.get(key, key),
            "size": size,
            "round": self.round,
            "count": n,
            "set_size": len(msgset),
            "passes": passes,
            "mean_kib": round(msgset.mean_bytes / 1024, 1),
            "concurrency": self.args.concurrency,
            "accepted": n - len(res.failures),
            "delivered": delivered,
            "inject_s": round(res.elapsed, 3),
            "inject_rate": round(n / res.elapsed, 2),
            "e2e_s": round(e2e, 3),
            "e2e_rate": round(n / e2e, 2),
            "p50_ms": round(res.percentile(50) * 1000, 1),
            "p90_ms": round(res.percentile(90) * 1000, 1),
            "p99_ms": round(res.percentile(99) * 1000, 1),
            "milter_cpu_ms": round(milter.cpu_since_start() / n * 1000, 2)
            if milter is not None else None,
            "engines_cpu_ms": round(engines.cpu_since_start() / n * 1000, 2) if engines else None,
            "mta_cpu_ms": round(mta.cpu_since_start() / n * 1000, 2) if mta else None,
            "sink_cpu_ms": round(sink.cpu_since_start() / n * 1000, 2) if sink else None,
            "client_cpu_ms": round(res.client_cpu / n * 1000, 2),
            "milter_peak_rss_mib": round(milter.peak_kib() / 1024, 1)
            if milter is not None else None,
            "engines_peak_rss_mib": round(engines.peak_kib() / 1024, 1) if engines else None,
            "box_busy_pct": round(busy * 100, 1),
            "first_failures": [o.detail for o in res.failures[:3]],
        }

    def _check_markers(self, markers: list[tuple[str, int]]) -> str | None:
        if not markers:
            return None
        missing: dict[str, int] = {}
        for path in self.sink.messages():
            size = path.stat().st_size
            with path.open("rb") as f:
                # smtp-sink's records, its Received: header, then the message's
                # header: all of it ends at the first empty line
                block = b"\n" + f.read(256 * 1024).split(b"\n\n", 1)[0].lower()
            for name, limit in markers:
                if limit and size > limit + 16 * 1024:
                    continue
                if b"\n" + name.lower().encode() + b":" not in block:
                    missing[name] = missing.get(name, 0) + 1
        if missing:
            return "MISSING HEADERS on delivered mail: " + ", ".join(
                f"{k} on {v}" for k, v in missing.items())
        return None

    def _print_row(self, r: dict[str, Any]) -> None:
        rnd = f" r{r['round']}" if self.args.repeat > 1 else ""
        log(f"  {r['contender']:<16} {r['size']:>4}{rnd}: e2e {r['e2e_rate']:7.1f} msg/s, inject "
            f"{r['inject_rate']:7.1f} msg/s, p50/p90/p99 {r['p50_ms']:.0f}/{r['p90_ms']:.0f}/"
            f"{r['p99_ms']:.0f} ms, milter CPU {_fmt(r['milter_cpu_ms'])} ms/msg, "
            f"peak RSS {_fmt(r['milter_peak_rss_mib'])} MiB, delivered {r['delivered']}/"
            f"{r['count']}, box busy {r['box_busy_pct']:.0f}%")

    # --- functional check of a contender ------------------------------------------------------

    def check(self, key: str, run: Running) -> list[str]:
        """Clean mail gets the marker headers; GTUBE is tagged; EICAR is refused."""
        self.set_milters(run.spec)
        samples = messages.sample_messages()
        found: list[str] = []
        port = self.postfix.smtp_port
        clean = loadgen.smtp_send("127.0.0.1", port, messages.wire_form(samples["clean"]),
                                  messages.SENDER, messages.RECIPIENT)
        if not clean.ok:
            raise Skip(f"a clean message was refused: {clean.detail}")
        dump = self._dump_of(samples["clean"])
        hdrs = dump.headers() if dump else []
        for name, _limit in run.markers:
            vals = [v for k, v in hdrs if k.lower() == name.lower()]
            found.append(f"clean: {name}: {vals[0][:60] if vals else 'MISSING'}")
            if not vals:
                raise Skip(f"clean message delivered without {name}")
        if run.spam:
            ok = loadgen.smtp_send("127.0.0.1", port, messages.wire_form(samples["gtube"]),
                                   messages.SENDER, messages.RECIPIENT)
            d = self._dump_of(samples["gtube"]) if ok.ok else None
            flag = d.header("X-Spam-Flag") if d else None
            found.append(f"GTUBE: {'X-Spam-Flag: ' + flag if flag else 'NOT TAGGED: ' + ok.detail}")
            if not flag or flag.strip().upper() != "YES":
                loud(f"{key}: GTUBE was not tagged as spam")
        if run.virus:
            bad = loadgen.smtp_send("127.0.0.1", port, messages.wire_form(samples["eicar"]),
                                    messages.SENDER, messages.RECIPIENT)
            found.append(f"EICAR: {'refused: ' + bad.detail if not bad.ok else 'ACCEPTED'}")
            if bad.ok:
                loud(f"{key}: EICAR was accepted")
        self.postfix.wait_queue_empty(30)
        self.sink.clear()
        for line in found:
            log(f"  check {key}: {line}")
        return found

    def _dump_of(self, message: bytes) -> Any:
        mid = next(line for line in message.split(b"\r\n") if line.startswith(b"Message-ID:"))
        try:
            return parse_dump(self.sink.wait_for_text(mid, timeout=30))
        except Exception:
            return None

    # --- contenders ---------------------------------------------------------------------------

    def monkey(self, name: str, brains: list[dict[str, Any]], unix: bool = False,
               **daemon: Any) -> MonkeyProcess:
        opts = {"debug_level": self.args.mm_debug_level, "milter_key": False,
                "tmpdir": str(self.work / "mm-tmp")}
        (self.work / "mm-tmp").mkdir(exist_ok=True)
        opts.update(daemon)
        m = MonkeyProcess(self.work / name, brains, opts, unix=unix, name=name)
        self.monkeys.append(m)
        m.start(timeout=60)
        return m

    def _monkey_running(self, m: MonkeyProcess, markers: list[tuple[str, int]],
                        **kw: Any) -> Running:
        def stop() -> None:
            m.stop()
            with contextlib.suppress(ValueError):
                self.monkeys.remove(m)

        def roots() -> list[int]:
            return [m.proc.pid] if m.proc is not None and m.alive() else []

        return Running(m.postfix_spec, roots, stop, markers, monkey=m, **kw)

    def start_contender(self, key: str) -> Running:
        w = self.work
        if key == "none":
            return Running("", lambda: [], lambda: None)
        if key in ("bare", "bare-tuned", "bare-unix"):
            if key == "bare-unix":
                sockdir = w / "bare-sock"
                sockdir.mkdir(exist_ok=True)
                sockdir.chmod(0o755)
                sock = sockdir / "bare.sock"
                lib, spec = f"unix:{sock}", f"unix:{sock}"
            else:
                port = free_port()
                lib, spec = f"inet:{port}@127.0.0.1", f"inet:127.0.0.1:{port}"
            (w / key).mkdir(exist_ok=True)
            cmd = [sys.executable, str(HERE / "bare_milter.py"), lib]
            if key == "bare-tuned":
                cmd.insert(2, "--tuned")
            child = peers.Child(key, cmd, w / key / "stdout.log")
            if key == "bare-unix":
                peers.wait_for(key, sock.exists, 20, child.alive, child.log)
            else:
                peers.wait_for(key, lambda: peers.port_listening(port), 20, child.alive,
                               child.log)
            return Running(spec, lambda: [child.pid] if child.alive() else [], child.stop,
                           [("X-Bench-Bare", 0)])
        if key == "c-tuned":
            (w / key).mkdir(exist_ok=True)
            binary = w / key / "c_milter"
            why = peers.build_c_milter(binary)
            if why:
                raise Skip(why)
            port = free_port()
            cchild = peers.Child(key, [str(binary), f"inet:{port}@127.0.0.1"],
                                 w / key / "stdout.log")
            peers.wait_for(key, lambda: peers.port_listening(port), 20, cchild.alive,
                           cchild.log)
            return Running(f"inet:127.0.0.1:{port}",
                           lambda: [cchild.pid] if cchild.alive() else [], cchild.stop,
                           [("X-Bench-C", 0)])
        if key in ("mm-trivial", "mm-trivial-unix"):
            m = self.monkey(key, [{"use": "trivial"}], unix=key.endswith("unix"))
            return self._monkey_running(m, [("X-MilterMonkey", 0)])
        if key == "clamav-milter":
            assert self.clamd is not None
            one = peers.ClamavMilter(w / key, free_port(), self.clamd.tcp_port)
            one.start()
            return Running(one.postfix_spec, one.roots,
                           lambda: peers.stop_many(one.children), [("X-Virus-Status", 0)],
                           virus=True)
        if key == "spamass-milter":
            assert self.spamd is not None
            sm1 = peers.SpamassMilter(w / key, free_port(), self.spamd.port)
            sm1.start()
            return Running(sm1.postfix_spec, sm1.roots,
                           lambda: peers.stop_many(sm1.children),
                           [("X-Spam-Status", SPAM_LIMIT)], spam=True)
        if key in SINGLE:
            self._need_brains()
            av, spam = self._avspam_brains(skip_if_key=False)
            brain = av if key == "mm-av" else spam
            m = self.monkey(key, [brain])
            marker = ("X-Virus-Status", 0) if key == "mm-av" else ("X-Spam-Status", SPAM_LIMIT)
            return self._monkey_running(m, [marker], spam=key == "mm-spam",
                                        virus=key == "mm-av")
        if key == "peers":
            assert self.clamd is not None and self.spamd is not None
            # own directories: 4a and 4b run at the same time, from theirs
            cm = peers.ClamavMilter(w / "peers" / "clamav-milter", free_port(),
                                    self.clamd.tcp_port)
            sm = peers.SpamassMilter(w / "peers" / "spamass-milter", free_port(),
                                     self.spamd.port)
            try:
                cm.start()
                sm.start()
            except Exception:
                cm.stop()
                sm.stop()
                raise

            def stop() -> None:
                peers.stop_many([*sm.children, *cm.children])
                sm.children, cm.children = [], []

            return Running(f"{cm.postfix_spec}, {sm.postfix_spec}",
                           lambda: cm.roots() + sm.roots(), stop,
                           [("X-Virus-Status", 0), ("X-Spam-Status", SPAM_LIMIT)],
                           spam=True, virus=True)
        if key == "mm-avspam":
            self._need_brains()
            keyed = self._milterkey_available() is None
            m = self.monkey(key, self._avspam_brains(skip_if_key=False),
                            **self._key_options(keyed))
            run = self._monkey_running(m, [("X-Virus-Status", 0), ("X-Spam-Status", SPAM_LIMIT)]
                                       + ([("X-Milter-Key", 0)] if keyed else []),
                                       spam=True, virus=True)
            run.notes.append("signs a milter key (milter_key = true)" if keyed
                             else "milter key module not available: no signing")
            return run
        if key == "mm-keyed":
            self._need_brains()
            why = self._milterkey_available()
            if why:
                raise Skip(why)
            m = self.monkey(key, self._avspam_brains(skip_if_key=True), **self._key_options(True))

            def after(n: int) -> str | None:
                # every message must have been recognised as already scanned
                deadline = time.monotonic() + 5
                while True:
                    skipped = m.log().count("trusted milter key: skipping")
                    if skipped >= n or time.monotonic() > deadline:
                        break
                    time.sleep(0.1)
                m.log_path.write_text("")
                if skipped < n:
                    return f"only {skipped} of {n} messages had their brains skipped by the key"
                return None

            run = self._monkey_running(m, [("X-Milter-Key", 0)], after=after)
            m.log_path.write_text("")
            return run
        if key == "mimedefang":
            why = peers.MimeDefang.unavailable_reason()
            if why:
                raise Skip(why)
            assert self.clamd is not None
            md = peers.MimeDefang(w / "mimedefang", free_port(), self.clamd.unix_socket,
                                  self.args.spamd_children)
            try:
                md.start()
            except Exception as e:
                md.stop()
                raise Skip(f"MIMEDefang did not start: {e}") from e
            return Running(md.postfix_spec, md.roots, md.stop,
                           [("X-Scanned-By", 0), ("X-Spam-Status", SPAM_LIMIT)],
                           spam=True, virus=True,
                           notes=[f"{self.args.spamd_children} pre-forked workers, clamd over "
                                  "its UNIX socket (SCAN), SpamAssassin embedded"])
        raise ValueError(key)

    def _need_brains(self) -> None:
        names = {ep.name for ep in importlib.metadata.entry_points(group="miltermonkey.brains")}
        missing = [b for b in ("av", "spam") if b not in names]
        if missing:
            raise Skip(f"brain package(s) not installed: {', '.join(missing)} (pip install -e "
                       "plugins/miltermonkey-av -e plugins/miltermonkey-spam)")

    def _milterkey_available(self) -> str | None:
        if importlib.util.find_spec("miltermonkey_core.milterkey") is None:
            return "miltermonkey_core.milterkey is not available yet"
        return None

    def _key_options(self, keyed: bool) -> dict[str, Any]:
        if not keyed:
            return {"milter_key": False}
        if self.secret_file is None:
            path = self.work / "miltersecret"
            out = subprocess.run([sys.executable, "-m", "miltermonkey_core", "key", "generate",
                                  "--file", str(path)], capture_output=True, text=True,
                                 timeout=60, check=False)
            if out.returncode != 0:
                raise Skip(f"miltermonkey key generate failed: {out.stdout}{out.stderr}")
            self.secret_file = path
        return {"milter_key": True, "miltersecretfile": str(self.secret_file)}

    def _avspam_brains(self, skip_if_key: bool) -> list[dict[str, Any]]:
        assert self.clamd is not None and self.spamd is not None
        av: dict[str, Any] = {"use": "av", "clamd": [f"tcp:127.0.0.1:{self.clamd.tcp_port}"],
                              "relay_mode": True}
        spam: dict[str, Any] = {"use": "spam", "servers": [f"127.0.0.1:{self.spamd.port}"]}
        if skip_if_key:
            av["skip_if_key"] = spam["skip_if_key"] = True
        return [av, spam]

    # --- the keyed message sets (hop 1's output) ----------------------------------------------

    def collect_keyed(self, size: str) -> None:
        """Keep what hop 1 delivered (now carrying its key) as hop 2's message set."""
        got: dict[bytes, bytes] = {}
        for path in self.sink.messages():
            raw = parse_dump(path).message
            head = raw.split(b"\n\n", 1)[0]
            if b"\nx-milter-key:" not in head.lower():
                continue
            # a set sent several times over (--min-time) arrives several times
            mid = re.search(rb"(?im)^message-id:\s*(\S+)", head)
            got.setdefault(mid.group(1) if mid else raw, messages.to_crlf(raw))
        self.keyed_sets[size] = messages.MessageSet(f"{size}-keyed",
                                                    tuple(got[k] for k in sorted(got)))

    def make_keyed(self, size: str, hop1: Running | None = None) -> messages.MessageSet:
        """Send the set through hop 1 (the running mm-avspam, or one of our own) and keep it."""
        if size in self.keyed_sets and len(self.keyed_sets[size]) == len(self.sets[size]):
            return self.keyed_sets[size]
        log(f"  hop 1 pass for the keyed {size} set (not measured)")
        run = hop1 or self.start_contender("mm-avspam")
        try:
            self.set_milters(run.spec)
            self.sink.clear()
            res = self.send_and_settle(self.wires[size], self.args.concurrency)
            if res.failures:
                loud(f"hop 1: {len(res.failures)} refused: {res.failures[0].detail}")
            self.collect_keyed(size)
            self.sink.clear()
        finally:
            if hop1 is None:
                run.stop()
        ks = self.keyed_sets[size]
        if len(ks) != len(self.sets[size]):
            loud(f"hop 1 produced {len(ks)} keyed messages of {len(self.sets[size])}")
        return ks

    # --- engines alone ------------------------------------------------------------------------

    def measure_engine(self, key: str, size: str) -> dict[str, Any] | None:
        assert self.clamd is not None and self.spamd is not None
        kind = ENGINE_KINDS[key]
        msgs = self.sets[size].messages
        if kind == "spamd" and all(len(m) > SPAM_LIMIT for m in msgs):
            log(f"  {key} {size}: skipped, every message is over spamc's 500 KiB limit")
            return None
        clamd, spamd = self.clamd.tcp_address, self.spamd.address
        work = loadgen.engine_work(kind, clamd, spamd, msgs)
        warm = min(self.args.warmup, len(msgs))
        loadgen.run_concurrent(warm, self.args.concurrency, work)

        def once(passes: int) -> dict[str, Any]:
            every = list(msgs) * passes
            job = loadgen.engine_work(kind, clamd, spamd, every) if passes > 1 else work
            self.meter_engines.start()
            busy0, total0 = procstats.box_busy_seconds()
            res = loadgen.run_concurrent(len(every), self.args.concurrency, job)
            busy1, total1 = procstats.box_busy_seconds()
            row = self._row(key, size, self.sets[size], res, None,
                            len(every) - len(res.failures), [None, self.meter_engines, None, None],
                            (busy1 - busy0) / max(1e-9, total1 - total0), passes)
            row["problems"] = [f"{len(res.failures)} failed: {res.failures[0].detail}"] \
                if res.failures else []
            return row

        row = self.remembered_passes(key, size, lambda: once(1),
                                     lambda passes, _fresh: once(passes), self.sets[size])
        for p in row["problems"]:
            loud(f"{key} / {size}: {p}")
        self.results.append(row)
        self._print_row(row)
        return row

    # --- smtp-source as the client ------------------------------------------------------------

    def measure_smtp_source(self, size: str) -> dict[str, Any] | None:
        if size == "mix":
            log("  smtp-source: skipped for the mix (it sends one file)")
            return None
        exe = shutil.which("smtp-source", path=os.environ.get("PATH", "") + ":/usr/sbin")
        if exe is None:
            log("  smtp-source not installed")
            return None
        self.set_milters("")
        msgset = self.sets[size]
        f = self.work / f"smtp-source-{size}.eml"
        # smtp-source appends CRLF to each line and dot-stuffs: give it LF lines
        f.write_bytes(msgset.messages[0].replace(b"\r\n", b"\n"))
        n, conc = len(msgset), self.args.concurrency

        def run(count: int) -> tuple[float, float, float]:
            cmd = [exe, "-s", str(conc), "-m", str(count), "-F", str(f),
                   "-f", messages.SENDER, "-t", messages.RECIPIENT,
                   f"127.0.0.1:{self.postfix.smtp_port}"]
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            _pid, status, ru = os.wait4(proc.pid, 0)
            t1 = time.perf_counter()
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode != 0:
                loud(f"smtp-source exited {proc.returncode}: "
                     f"{proc.stderr.read().decode(errors='replace') if proc.stderr else ''}")
            return t0, t1, ru.ru_utime + ru.ru_stime

        run(min(self.args.warmup, n) or 1)
        self.wait_delivered(0, 60)
        memo = self.passes_memo.get(("smtp-source", size))
        passes = memo or 1
        for attempt in range(2):
            self.sink.clear()
            for m in (self.meter_mta, self.meter_sink, self.meter_engines):
                m.start()
            busy0, total0 = procstats.box_busy_seconds()
            t0, t1, cpu = run(n * passes)
            t_e2e, delivered = self.wait_delivered(n * passes, 60 + 2 * n * passes)
            busy1, total1 = procstats.box_busy_seconds()
            more = self.passes_for(t_e2e - t0, msgset)
            if attempt or memo is not None or more == 1:
                break
            passes = more
        n *= passes
        if delivered == n:
            self.passes_memo[("smtp-source", size)] = passes
        row = {
            "contender": "smtp-source", "label": LABELS["smtp-source"], "size": size,
            "round": self.round,
            "count": n, "set_size": len(msgset), "passes": passes,
            "mean_kib": round(len(msgset.messages[0]) / 1024, 1),
            "concurrency": conc, "accepted": delivered, "delivered": delivered,
            "inject_s": round(t1 - t0, 3), "inject_rate": round(n / (t1 - t0), 2),
            "e2e_s": round(t_e2e - t0, 3), "e2e_rate": round(n / (t_e2e - t0), 2),
            "p50_ms": None, "p90_ms": None, "p99_ms": None,
            "milter_cpu_ms": None, "engines_cpu_ms": None,
            "mta_cpu_ms": round(self.meter_mta.cpu_since_start() / n * 1000, 2),
            "sink_cpu_ms": round(self.meter_sink.cpu_since_start() / n * 1000, 2),
            "client_cpu_ms": round(cpu / n * 1000, 2), "milter_peak_rss_mib": None,
            "engines_peak_rss_mib": None,
            "box_busy_pct": round((busy1 - busy0) / max(1e-9, total1 - total0) * 100, 1),
            "first_failures": [],
            "problems": [] if delivered == n else [f"DELIVERED {delivered} != SENT {n}"],
        }
        for p in row["problems"]:
            loud(f"smtp-source / {size}: {p}")
        self.sink.clear()
        self.results.append(row)
        rnd = f" r{self.round}" if self.args.repeat > 1 else ""
        log(f"  smtp-source      {size:>4}{rnd}: e2e {row['e2e_rate']:7.1f} msg/s, inject "
            f"{row['inject_rate']:7.1f} msg/s, client CPU {row['client_cpu_ms']} ms/msg")
        return row

    # --- memory -------------------------------------------------------------------------------

    def memory_tests(self) -> None:
        sessions = 20
        count = 40 if self.args.quick else 100
        s = messages.build_set("50k", count, self.args.seed + 7)
        for key in ("mm-trivial", "mm-avspam"):
            try:
                run = self.start_contender(key)
            except Skip as e:
                self.memory[f"{key}_20_sessions"] = {"skipped": str(e)}
                log(f"memory {key}: skipped: {e}")
                continue
            try:
                self.set_milters(run.spec)
                self.send_and_settle([messages.wire_form(m) for m in s.messages[:10]], sessions)
                self.sink.clear()
                meter = procstats.Meter(key, run.roots)
                assert run.monkey is not None and run.monkey.proc is not None
                wpid = procstats.worker_pid(run.monkey.proc.pid)
                worker = procstats.Meter("worker", functools.partial(list, [wpid]))
                idle = meter.rss()
                meter.start()
                worker.start()
                with procstats.Sampler([meter, worker], interval=0.1):
                    res = self.send_and_settle([messages.wire_form(m) for m in s.messages],
                                               sessions)
                entry = {"sessions": sessions, "messages": count, "size": "50k",
                         "idle_rss_mib": round(idle / 1024, 1),
                         "peak_rss_mib": round(meter.peak_kib() / 1024, 1),
                         "worker_peak_rss_mib": round(worker.peak_kib() / 1024, 1),
                         "processes": len(meter.pids()),
                         "refused": len(res.failures),
                         "first_refusal": res.failures[0].detail if res.failures else None,
                         "p99_ms": round(res.percentile(99) * 1000, 1)}
                if res.failures:
                    loud(f"memory {key}: {len(res.failures)} of {count} refused: "
                         f"{res.failures[0].detail}")
                self.memory[f"{key}_20_sessions"] = entry
                log(f"memory {key}, {sessions} concurrent sessions: idle {entry['idle_rss_mib']} "
                    f"MiB, peak {entry['peak_rss_mib']} MiB over {entry['processes']} process(es) "
                    f"(libmilter process {entry['worker_peak_rss_mib']} MiB), "
                    f"refused {entry['refused']}")
            finally:
                run.stop()
                self.sink.clear()
        self.big_message_test()

    def big_message_test(self) -> None:
        size = self.args.big_mb * 1024 * 1024
        try:
            run = self.start_contender("mm-avspam")
        except Skip as e:
            self.memory["big_message"] = {"skipped": str(e)}
            log(f"memory: {self.args.big_mb} MB message skipped: {e}")
            return
        try:
            self.set_milters(run.spec)
            self.sink.clear()
            big = messages.wire_form(messages.big_message(size, self.args.seed))
            assert run.monkey is not None and run.monkey.proc is not None
            pid = procstats.worker_pid(run.monkey.proc.pid)
            meter = procstats.Meter("big", run.roots)
            worker = procstats.Meter("worker", lambda: [pid])
            idle = meter.rss()
            worker_idle = procstats.rss_kib(pid)
            meter.start()
            worker.start()
            tmpdir = str(self.work / "mm-tmp")
            spooled = threading.Event()
            stop = threading.Event()

            def watch() -> None:
                # the body must go to a temporary file, not stay in memory
                while not stop.wait(0.05):
                    with contextlib.suppress(OSError):
                        for fd in os.listdir(f"/proc/{pid}/fd"):
                            with contextlib.suppress(OSError):
                                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(tmpdir):
                                    spooled.set()

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            with procstats.Sampler([meter, worker], interval=0.05):
                out = loadgen.smtp_send("127.0.0.1", self.postfix.smtp_port, big,
                                        messages.SENDER, messages.RECIPIENT, timeout=600)
                self.wait_delivered(1 if out.ok else 0, 300)
            stop.set()
            watcher.join()
            entry = {"size_mib": round(len(big) / 1024 / 1024, 1), "accepted": out.ok,
                     "reply": out.detail, "seconds": round(out.seconds, 2),
                     "idle_rss_mib": round(idle / 1024, 1),
                     "peak_rss_mib": round(meter.peak_kib() / 1024, 1),
                     "worker_idle_rss_mib": round(worker_idle / 1024, 1),
                     "worker_peak_rss_mib": round(worker.peak_kib() / 1024, 1),
                     "body_spooled_to_disk": spooled.is_set(),
                     "delivered": len(self.sink.messages())}
            self.memory["big_message"] = entry
            log(f"memory: one {entry['size_mib']} MiB message through mm-avspam: "
                f"{'accepted' if out.ok else 'REFUSED ' + out.detail} in {entry['seconds']} s, "
                f"RSS idle {entry['idle_rss_mib']} MiB -> peak {entry['peak_rss_mib']} MiB, "
                f"spooled to disk: {entry['body_spooled_to_disk']}")
            if not out.ok:
                loud(f"the {self.args.big_mb} MB message was refused: {out.detail}")
            if not spooled.is_set():
                loud("the large body was never seen in a temporary file")
        finally:
            run.stop()
            self.sink.clear()

    # --- the whole run ------------------------------------------------------------------------

    def run(self) -> None:
        """Start and check every milter, then measure size by size, round by round.

        The milters stay up, idle when it is not their turn, until the last
        round: each round Postfix is pointed at each one in turn.
        """
        a = self.args
        self.start_stack()
        self.build_sets()
        order = [c for c in ALL_CONTENDERS if c in a.contenders]
        running: dict[str, Running] = {}
        try:
            for key in order:
                if key not in NOT_MILTERS:
                    log(f"== {LABELS[key]}: start and check")
                    run = self.start_checked(key, running)
                    if run is not None:
                        running[key] = run
            for size in a.sizes:
                for rnd in range(1, a.repeat + 1):
                    self.round = rnd
                    log(f"== size {size}" + (f", round {rnd} of {a.repeat}"
                                             if a.repeat > 1 else ""))
                    for key in order:
                        if key in self.skipped or (key not in NOT_MILTERS
                                                   and key not in running):
                            continue
                        try:
                            self.measure_one(key, size, running.get(key))
                        except (KeyboardInterrupt, SystemExit):
                            raise
                        except Exception as e:
                            import traceback

                            traceback.print_exc()
                            self._skip(key, f"error in {size} round {rnd}: {e!r}"[:2000])
                            gone = running.pop(key, None)
                            if gone is not None:
                                gone.stop()
        finally:
            stop_in_parallel(list(running.values()))
        if not a.no_memory:
            log("== memory")
            self.memory_tests()

    def start_checked(self, key: str, running: dict[str, Running]) -> Running | None:
        """Start a milter contender and run its functional check; None if it is skipped."""
        a = self.args
        run: Running | None = None
        try:
            if key == "mm-keyed":
                self._need_brains()
                why = self._milterkey_available()
                if why:
                    raise Skip(why)
                for size in a.sizes:
                    self.make_keyed(size, running.get("mm-avspam"))
            try:
                run = self.start_contender(key)
            except Skip:
                raise
            except Exception as e:
                raise Skip(f"could not start: {e}") from e
            try:
                self.checks[key] = self.check(key, run)
                if key == "mm-keyed":
                    self._check_keyed(run, self.keyed_sets[a.sizes[0]])
            except Skip as e:
                raise Skip(f"functional check failed: {e}") from e
        except (KeyboardInterrupt, SystemExit):
            if run is not None:
                run.stop()
            raise
        except Exception as e:
            if run is not None:
                run.stop()
            if isinstance(e, Skip):
                self._skip(key, str(e))
            else:
                import traceback

                traceback.print_exc()
                self._skip(key, f"error: {e!r}"[:2000])
            return None
        return run

    def measure_one(self, key: str, size: str, run: Running | None) -> None:
        """One row: the key's measurement at this size, in the current round."""
        if key in ENGINE_KINDS:
            self.measure_engine(key, size)
            return
        if key == "smtp-source":
            self.measure_smtp_source(size)
            return
        assert run is not None
        msgset = self.keyed_sets[size] if key == "mm-keyed" else None
        row = self.measure(key, run, size, msgset)
        row["notes"] = list(run.notes)
        self.sink.clear()

    def _check_keyed(self, run: Running, ks: messages.MessageSet) -> None:
        assert run.monkey is not None
        out = loadgen.smtp_send("127.0.0.1", self.postfix.smtp_port,
                                messages.wire_form(ks.messages[0]), messages.SENDER,
                                messages.RECIPIENT)
        if not out.ok:
            raise Skip(f"a keyed message was refused: {out.detail}")
        text = ""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text = run.monkey.log()
            if "trusted milter key: skipping" in text:
                break
            time.sleep(0.1)
        line = next((ln for ln in text.splitlines() if "trusted milter key" in ln), None)
        self.checks["mm-keyed"].append(f"keyed message: {line or 'NO SKIP LOGGED'}")
        log(f"  check mm-keyed: {line or 'NO SKIP LOGGED'}")
        if line is None:
            raise Skip("hop 2 did not trust hop 1's key")
        self.postfix.wait_queue_empty(30)
        self.sink.clear()
        run.monkey.log_path.write_text("")

    def _skip(self, key: str, why: str) -> None:
        self.skipped[key] = why
        loud(f"{LABELS[key]}: SKIPPED: {why}")


def stop_in_parallel(runs: Sequence[Running]) -> None:
    """Stop contenders side by side: a libmilter program takes seconds to notice SIGTERM."""
    def stop(run: Running) -> None:
        try:
            run.stop()
        except Exception as e:
            log(f"stopping {run.spec}: {e!r}")

    threads = [threading.Thread(target=stop, args=(r,), daemon=True) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


COLUMNS = [
    ("contender", "label", 34, 0),
    ("sent", "count", 5, 0),
    ("deliv", "delivered", 5, 0),
    ("e2e/s", "e2e_rate", 7, 1),
    ("inj/s", "inject_rate", 7, 1),
    ("p50ms", "p50_ms", 7, 1),
    ("p90ms", "p90_ms", 7, 1),
    ("p99ms", "p99_ms", 7, 1),
    ("milterCPU", "milter_cpu_ms", 9, 2),
    ("engCPU", "engines_cpu_ms", 7, 2),
    ("mtaCPU", "mta_cpu_ms", 7, 2),
    ("cliCPU", "client_cpu_ms", 6, 2),
    ("RSS MiB", "milter_peak_rss_mib", 8, 1),
    ("engRSS", "engines_peak_rss_mib", 7, 0),
    ("busy%", "box_busy_pct", 5, 0),
]
#: With --repeat N > 1: the min and max over the rounds, after the column named.
RANGE_COLUMNS = {
    "e2e/s": ("e2e/s range", "e2e_range", 15, 1),
    "milterCPU": ("milterCPU range", "milter_cpu_range", 15, 2),
}
SIZE_ORDER = (*messages.SIZES, "mix")
EN_DASH = "\u2013"  # ranges in the Markdown report (".." in the printed one)


def columns(repeat: int) -> list[tuple[str, str, int, int]]:
    out = []
    for col in COLUMNS:
        out.append(col)
        if repeat > 1 and col[0] in RANGE_COLUMNS:
            out.append(RANGE_COLUMNS[col[0]])
    return out


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per contender (rows of one size): its median round by e2e/s, and the ranges.

    For an even number of rounds the lower of the two middle rounds is shown.
    Problems of every round are kept, each marked with its round.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["contender"], []).append(r)
    out = []
    for group in groups.values():
        ranked = sorted(group, key=lambda r: r["e2e_rate"])
        line = dict(ranked[(len(ranked) - 1) // 2])
        line["rounds"] = len(group)
        rates = [r["e2e_rate"] for r in group]
        cpus = [r["milter_cpu_ms"] for r in group if r.get("milter_cpu_ms") is not None]
        line["e2e_range"] = (min(rates), max(rates))
        line["milter_cpu_range"] = (min(cpus), max(cpus)) if cpus else None
        if len(group) > 1:
            line["problems"] = [f"round {r.get('round', '?')}: {p}" for r in group
                                for p in r.get("problems") or []]
        out.append(line)
    return out


def _cell(v: Any, digits: int, sep: str) -> str:
    if isinstance(v, tuple | list):
        return sep.join(_fmt(float(x), digits) for x in v)
    return _fmt(v, digits) if isinstance(v, float) else _fmt(v)


def _ratios_one_round(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per size: each contender against the ceiling, the engines alone, the peers, 2b, 2d."""
    out: dict[str, dict[str, float]] = {}
    by = {(r["contender"], r["size"]): r for r in rows}
    for r in rows:
        key, size = r["contender"], r["size"]
        if key in ENGINE_KINDS or key == "smtp-source":
            continue
        entry: dict[str, float] = {}
        base = by.get(("none", size))
        if base and key != "none":
            entry["vs_ceiling"] = r["e2e_rate"] / base["e2e_rate"]
        c_floor = by.get(("c-tuned", size))
        if c_floor and key in VS_C:
            entry["vs_c_rate"] = r["e2e_rate"] / c_floor["e2e_rate"]
            if r.get("milter_cpu_ms") and c_floor.get("milter_cpu_ms"):
                entry["vs_c_cpu"] = r["milter_cpu_ms"] / c_floor["milter_cpu_ms"]
        eng = by.get(("engines", size))
        if eng and key in AVSPAM:
            entry["vs_engines_alone"] = r["e2e_rate"] / eng["e2e_rate"]
        peer = by.get((SINGLE[key], size)) if key in SINGLE else by.get(("peers", size))
        if peer and (key in AVSPAM or key in SINGLE) and key != "peers":
            entry["vs_peers_rate"] = r["e2e_rate"] / peer["e2e_rate"]
            if r.get("milter_cpu_ms") and peer.get("milter_cpu_ms"):
                entry["vs_peers_milter_cpu"] = r["milter_cpu_ms"] / peer["milter_cpu_ms"]
            if r.get("p50_ms") and peer.get("p50_ms"):
                entry["vs_peers_p50"] = r["p50_ms"] / peer["p50_ms"]
        tuned = by.get(("bare-tuned", size))
        if tuned and key.startswith("mm-trivial"):
            entry["vs_bare_tuned_rate"] = r["e2e_rate"] / tuned["e2e_rate"]
            if r.get("milter_cpu_ms") and tuned.get("milter_cpu_ms"):
                entry["vs_bare_tuned_cpu"] = r["milter_cpu_ms"] / tuned["milter_cpu_ms"]
                entry["mm_overhead_cpu_ms"] = r["milter_cpu_ms"] - tuned["milter_cpu_ms"]
        if entry:
            out[f"{key}/{size}"] = entry
    # the client check: our client vs smtp-source on the ceiling
    for size in {r["size"] for r in rows}:
        ours, theirs = by.get(("none", size)), by.get(("smtp-source", size))
        if ours and theirs:
            out[f"client/{size}"] = {
                "python_client_e2e_rate": ours["e2e_rate"],
                "smtp_source_e2e_rate": theirs["e2e_rate"],
                "python_vs_smtp_source": ours["e2e_rate"] / theirs["e2e_rate"],
                "python_client_cpu_ms": ours["client_cpu_ms"],
                "smtp_source_cpu_ms": theirs["client_cpu_ms"]}
    return out


def _ratio_order(name: str) -> tuple[int, int]:
    key, _, size = name.rpartition("/")
    k = ALL_CONTENDERS.index(key) if key in ALL_CONTENDERS else len(ALL_CONTENDERS)
    return k, SIZE_ORDER.index(size) if size in SIZE_ORDER else len(SIZE_ORDER)


def ratios(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The ratios of each round (each row against its reference in the same round).

    With one round each entry holds the ratios.  With several, each holds the
    median over the rounds, plus ``range`` (min, max) and ``rounds`` (every
    round's value, in round order).
    """
    by_round: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        by_round.setdefault(r.get("round", 1), []).append(r)
    values: dict[str, dict[str, list[float]]] = {}
    for rnd in sorted(by_round):
        for name, one in _ratios_one_round(by_round[rnd]).items():
            slot = values.setdefault(name, {})
            for k, v in one.items():
                slot.setdefault(k, []).append(v)
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(values, key=_ratio_order):
        got = values[name]
        entry: dict[str, Any] = {k: statistics.median(vs) for k, vs in got.items()}
        if len(by_round) > 1:
            entry["range"] = {k: [min(vs), max(vs)] for k, vs in got.items()}
            entry["rounds"] = got
        out[name] = entry
    return out


RATIO_NAMES = {
    "vs_ceiling": "rate vs ceiling (1)",
    "vs_c_rate": "rate vs C floor (2d)",
    "vs_c_cpu": "milter CPU vs C (2d)",
    "vs_engines_alone": "rate vs engines alone (E3)",
    "vs_peers_rate": "rate vs the peer (4; 4a, 4b for 5a, 5b)",
    "vs_peers_milter_cpu": "milter CPU vs the peer",
    "vs_peers_p50": "p50 latency vs the peer",
    "vs_bare_tuned_rate": "rate vs bare tuned (2b)",
    "vs_bare_tuned_cpu": "milter CPU vs bare tuned (2b)",
    "mm_overhead_cpu_ms": "extra milter CPU ms/msg vs 2b",
    "python_vs_smtp_source": "python client rate / smtp-source rate",
}


def _ratio_text(entry: dict[str, Any], k: str, sep: str) -> str:
    """The (median) ratio, and with several rounds its range: ``0.84 (0.75..0.90)``."""
    text = f"{entry[k]:.2f}"
    rng = entry.get("range", {}).get(k)
    if rng is not None and len(entry["rounds"][k]) > 1:
        text += f" ({rng[0]:.2f}{sep}{rng[1]:.2f})"
    return text


def _size_heading(sub: list[dict[str, Any]], repeat: int) -> str:
    text = (f"a set of {sub[0].get('set_size')} messages, {sub[0]['concurrency']} sessions")
    if repeat > 1:
        text += f"; the median of {repeat} rounds by e2e/s, with the range over the rounds"
    return text


def text_report(data: dict[str, Any]) -> str:
    lines = []
    rows = data["results"]
    repeat = int(data["args"].get("repeat", 1))
    cols = columns(repeat)
    for size in data["args"]["sizes"]:
        sub = [r for r in rows if r["size"] == size]
        if not sub:
            continue
        mean = sub[0]["mean_kib"]
        lines.append(f"\n--- size {size} (mean {mean} KiB): {_size_heading(sub, repeat)}; "
                     f"the set sent more than once where --min-time asked for it; "
                     f"CPU in ms per message ---")
        lines.append(" ".join(f"{h:>{w}}" if i else f"{h:<{w}}"
                              for i, (h, _k, w, _d) in enumerate(cols)))
        for r in summarise(sub):
            cells = []
            for i, (_h, k, w, d) in enumerate(cols):
                s = _cell(r.get(k), d, "..")
                cells.append(f"{s:<{w}}" if i == 0 else f"{s:>{w}}")
            flag = "  <-- " + "; ".join(r["problems"]) if r.get("problems") else ""
            lines.append(" ".join(cells) + flag)
    if data["ratios"]:
        lines.append("\n--- ratios (e2e msg/s unless stated)"
                     + (f"; median of {repeat} rounds (min..max)" if repeat > 1 else "")
                     + " ---")
        for name, entry in data["ratios"].items():
            parts = [f"{RATIO_NAMES[k]} {_ratio_text(entry, k, '..')}" for k in RATIO_NAMES
                     if k in entry]
            lines.append(f"{name:<26} " + ", ".join(parts))
    if data["skipped"]:
        lines.append("\n--- skipped ---")
        lines += [f"{k}: {v}" for k, v in data["skipped"].items()]
    if data["memory"]:
        lines.append("\n--- memory ---")
        lines += [f"{k}: {json.dumps(v)}" for k, v in data["memory"].items()]
    return "\n".join(lines)


def markdown_report(data: dict[str, Any]) -> str:
    repeat = int(data["args"].get("repeat", 1))
    cols = columns(repeat)
    out = [f"# MilterMonkey benchmark, {data['started']}", "",
           f"Command: `{data['command']}`", "",
           f"Machine: {data['machine']['cpu']} x {data['machine']['cores']}, "
           f"{data['machine']['mem_gib']} GiB, {data['machine']['os']}, kernel "
           f"{data['machine']['kernel']}; load average at start {data['machine']['loadavg']}", "",
           "Versions: " + ", ".join(f"{k} {v}" for k, v in data["versions"].items()), "",
           "CPU columns are milliseconds of CPU per message (milter processes incl. children; "
           "clamd+spamd; Postfix; the load client). RSS is the milter's peak, summed over its "
           "processes. busy% is the whole machine (other load included).", ""]
    if repeat > 1:
        out += [f"Each size was measured in {repeat} interleaved rounds. A row is the "
                "contender's median round by e2e/s; the ranges are the min and max over the "
                "rounds. Ratios are taken within each round; the table shows their median and, "
                "in brackets, their min and max.", ""]
    rows = data["results"]
    for size in data["args"]["sizes"]:
        sub = [r for r in rows if r["size"] == size]
        if not sub:
            continue
        out += [f"## {size} (mean {sub[0]['mean_kib']} KiB, {_size_heading(sub, repeat)})", ""]
        out.append("| " + " | ".join(h for h, *_ in cols) + " | problems |")
        out.append("|" + "---|" * (len(cols) + 1))
        for r in summarise(sub):
            cells = [_cell(r.get(k), d, EN_DASH) for _h, k, _w, d in cols]
            out.append("| " + " | ".join(cells) + " | " + ("; ".join(r.get("problems") or [])
                                                        or "") + " |")
        out.append("")
    if data["ratios"]:
        # only the columns this run has values for
        used = [k for k in RATIO_NAMES if any(k in e for e in data["ratios"].values())]
        out += ["## Ratios", "", "| what | " + " | ".join(RATIO_NAMES[k] for k in used) + " |",
                "|" + "---|" * (len(used) + 1)]
        for name, entry in data["ratios"].items():
            out.append(f"| {name} | " + " | ".join(
                _ratio_text(entry, k, EN_DASH) if k in entry else "" for k in used) + " |")
        out.append("")
    if data["checks"]:
        out += ["## Functional checks", ""]
        for k, v in data["checks"].items():
            out.append(f"- **{k}**: " + "; ".join(v))
        out.append("")
    if data["skipped"]:
        out += ["## Skipped", ""] + [f"- **{k}**: {v}" for k, v in data["skipped"].items()] + [""]
    if data["memory"]:
        out += ["## Memory", ""] + [f"- **{k}**: `{json.dumps(v)}`"
                                    for k, v in data["memory"].items()] + [""]
    return "\n".join(out)


def machine_info() -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError):
        mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 // 1024
    osname = platform.platform()
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                osname = line.split("=", 1)[1].strip('"')
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": mem, "os": osname,
            "kernel": platform.release(), "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "hostname": socket.gethostname()}


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("postfix", "clamav-daemon", "clamav-milter", "spamd", "spamass-milter",
                "mimedefang"):
        with contextlib.suppress(Exception):
            v = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", pkg],
                               capture_output=True, text=True, timeout=10, check=False).stdout
            if v:
                out[pkg] = v
    for dist in ("pymilter", "miltermonkey-core", "miltermonkey-av", "miltermonkey-spam"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    return out


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="MilterMonkey vs peers on a private Postfix, clamd and spamd (root).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="contenders: " + ", ".join(ALL_CONTENDERS))
    ap.add_argument("--count", type=int, default=None,
                    help="messages per size and contender (default 200; --quick 30)")
    ap.add_argument("--concurrency", type=int, default=5, help="concurrent SMTP sessions (5)")
    ap.add_argument("--sizes", default=None,
                    help="comma list of 2k, 50k, 1m, mix (default all; --quick 2k)")
    ap.add_argument("--contenders", default=None,
                    help="comma list (default all); prefix a name with - to leave it out")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds per size: the contenders are measured in turn, N times over "
                    "(1); the tables show each one's median round and the range")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 30 messages of 2k, short memory tests, 10 MB big message")
    ap.add_argument("--warmup", type=int, default=None,
                    help="warm-up messages before each measurement (default 2 x concurrency, "
                    "at least 10)")
    ap.add_argument("--min-time", type=float, default=None,
                    help="a measurement shorter than this many seconds is repeated with the "
                    "set sent several times over (default 5; --quick 0 = off)")
    ap.add_argument("--spamd-children", type=int, default=5,
                    help="spamd --max-children, also MIMEDefang's workers (5)")
    ap.add_argument("--mm-debug-level", type=int, default=10,
                    help="MilterMonkey debug_level for every daemon (10, the default config)")
    ap.add_argument("--big-mb", type=int, default=None, help="size of the big message (50)")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory tests")
    ap.add_argument("--seed", type=int, default=1, help="message set seed")
    ap.add_argument("--workdir", default=None,
                    help="state directory (default: a new /tmp/mm-bench-*; removed afterwards "
                    "unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the state directory (logs)")
    ap.add_argument("--results-dir", default=str(ROOT / "bench-results"),
                    help="where the JSON and Markdown go (default bench-results/)")
    a = ap.parse_args(argv)
    a.count = a.count or (30 if a.quick else 200)
    if a.repeat < 1:
        ap.error("--repeat must be at least 1")
    a.sizes = [s.strip() for s in (a.sizes or ("2k" if a.quick else "2k,50k,1m,mix"))
               .split(",") if s.strip()]
    for s in a.sizes:
        if s not in (*messages.SIZES, "mix"):
            ap.error(f"unknown size {s!r}")
    chosen = list(ALL_CONTENDERS)
    if a.contenders:
        items = [c.strip() for c in a.contenders.split(",") if c.strip()]
        if all(i.startswith("-") for i in items):
            chosen = [c for c in ALL_CONTENDERS if f"-{c}" not in items]
        else:
            chosen = items
        for c in chosen:
            if c not in ALL_CONTENDERS:
                ap.error(f"unknown contender {c!r}; choose from {', '.join(ALL_CONTENDERS)}")
    a.contenders = chosen
    a.warmup = a.warmup if a.warmup is not None else max(10, 2 * a.concurrency)
    a.big_mb = a.big_mb or (10 if a.quick else 50)
    a.min_time = a.min_time if a.min_time is not None else (0.0 if a.quick else 5.0)
    return a


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench/run.py needs root: it runs a private Postfix and daemons that drop to "
              "their own users", file=sys.stderr)
        return 2
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="mm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o755)  # the daemons' users must reach their own directories below it

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGINT too: a shell starting us in the background (cmd &) leaves it ignored
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, on_signal)
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    bench = Bench(args, work)
    log(f"state in {work}; {args.count} messages per size, {args.concurrency} sessions, "
        f"sizes {','.join(args.sizes)}; contenders {','.join(args.contenders)}")
    status = 0
    try:
        bench.run()
    except KeyboardInterrupt as e:
        loud(f"interrupted ({e or 'Ctrl-C'}): stopping everything")
        status = 130
    except Exception:
        import traceback

        traceback.print_exc()
        status = 1
    finally:
        bench.stop_everything()
        for child in list(peers.STARTED):
            with contextlib.suppress(Exception):
                child.stop()
    data = {
        "started": started,
        "command": " ".join(["python bench/run.py", *(argv if argv is not None
                                                       else sys.argv[1:])]),
        "args": {k: v for k, v in vars(args).items()},
        "machine": machine_info(),
        "versions": versions(),
        "results": bench.results,
        "ratios": ratios(bench.results),
        "checks": bench.checks,
        "skipped": bench.skipped,
        "memory": bench.memory,
        "status": status,
    }
    report = text_report(data)
    print(report)
    if bench.results or bench.memory:
        outdir = Path(args.results_dir)
        outdir.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        (outdir / f"bench-{stamp}.json").write_text(json.dumps(data, indent=2) + "\n",
                                                    encoding="utf-8")
        (outdir / f"bench-{stamp}.md").write_text(markdown_report(data) + "\n",
                                                  encoding="utf-8")
        log(f"results: {outdir}/bench-{stamp}.json and .md")
    problems = [p for r in bench.results for p in r.get("problems", [])]
    if problems:
        loud(f"{len(problems)} problem(s) in this run; see the table")
        status = status or 1
    if args.keep or status:
        log(f"state kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
