"""One measurement: a load run through an MTA, metered, checked, turned into a row.

A row of the results is one contender, one MTA, one size, one round:
rates, latency percentiles, CPU milliseconds per message of the milter, the
engines, the MTA and the load client (:mod:`procstats` reads them from
/proc), the milter's peak RSS, how busy the machine was, and the problems
found (:mod:`checks`).  Besides the concurrent load there are the engines
alone (no MTA, no milter), Postfix's smtp-source as the client, and
:meth:`Measurer.session`: many messages in ONE SMTP session, timed one by
one, where an MTA's writes to the milter meet Nagle's algorithm if they do.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cachestats
import checks
import loadgen
import messages
import procstats
from console import log, loud
from contenders import REGISTRY, Running
from miltermonkey_av.testing import Clamd
from miltermonkey_spam.testing import Spamd
from mtas import Mta

from miltermonkey_core.testing.sink import SmtpSink

SPAM_LIMIT = loadgen.SPAMC_MAX_SIZE
Row = dict[str, Any]


def fmt(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def per_msg_ms(seconds: float, n: int) -> float:
    return round(seconds / n * 1000, 2)


class Measurer:
    """Runs measurements and keeps their rows; one per benchmark run."""

    def __init__(self, args: argparse.Namespace, work: Path, sink: SmtpSink,
                 clamd: Clamd | None, spamd: Spamd | None) -> None:
        self.args = args
        self.work = work
        self.sink = sink
        self.clamd = clamd
        self.spamd = spamd
        self.results: list[Row] = []
        self.sessions: list[Row] = []
        #: The round being measured (1 to --repeat); every row records it.
        self.round = 1
        #: (contender, MTA, size) -> how often the set is sent, decided in round 1.
        self.passes_memo: dict[tuple[str, str, str], int] = {}
        self.meter_engines = procstats.Meter("engines", lambda: [
            p for p in ((clamd.pid if clamd else None), (spamd.pid if spamd else None)) if p])
        self.meter_sink = procstats.Meter("sink", lambda: [sink.pid or 0])
        self._mta_meters: dict[str, procstats.Meter] = {}

    def mta_meter(self, mta: Mta) -> procstats.Meter:
        if mta.name not in self._mta_meters:
            self._mta_meters[mta.name] = procstats.Meter(mta.name, lambda: [mta.pid or 0])
        return self._mta_meters[mta.name]

    # --- delivery bookkeeping -----------------------------------------------------------------

    def wait_delivered(self, mta: Mta, expected: int, timeout: float) -> tuple[float, int]:
        """Wait until the queue is empty and the sink holds ``expected`` messages."""
        end = time.monotonic() + timeout
        while True:
            if mta.queue_count() == 0:
                delivered = len(self.sink.messages())
                if delivered >= expected:
                    return time.perf_counter(), delivered
            if time.monotonic() > end:
                return time.perf_counter(), len(self.sink.messages())
            time.sleep(0.02)

    def send_and_settle(self, mta: Mta, wires: Sequence[bytes],
                        concurrency: int) -> loadgen.LoadResult:
        res = loadgen.smtp_load(mta.smtp_port, wires, concurrency, messages.SENDER,
                                messages.RECIPIENT)
        self.wait_delivered(mta, len(wires) - len(res.failures), 120)
        return res

    def settle_queue(self, mta: Mta, problems: list[str]) -> None:
        left = mta.queue_count()
        if left:
            problems.append(f"{left} message(s) still queued after the wait: purged")
            mta.purge_queue()

    # --- how long a measurement runs ----------------------------------------------------------

    def remembered_passes(self, memo_key: tuple[str, str, str], first: Callable[[], Row],
                          again: Callable[[int, bool], Row],
                          msgset: messages.MessageSet) -> Row:
        """Measure once, and again with the set sent more often if --min-time asks for it.

        The number of passes is decided in the first round and reused in the
        later ones, so every round sends the same mail.  ``again(passes,
        right_after_warmup)``: the second argument is False when the short
        first measurement came in between.
        """
        memo = self.passes_memo.get(memo_key)
        if memo is not None and memo > 1:
            return again(memo, True)
        row = first()
        passes = self.passes_for(row["e2e_s"], msgset) if not row["problems"] else 1
        if passes > 1:
            key, _mta, size = memo_key
            log(f"  {key:<16} {size:>4}: {row['e2e_s']:.2f} s is under --min-time "
                f"{self.args.min_time:g} s: again with the set sent {passes} times")
            row = again(passes, False)
        if not row["problems"]:
            self.passes_memo[memo_key] = passes
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

    # --- a milter under concurrent load -------------------------------------------------------

    def measure(self, run: Running, mta: Mta, size: str, msgset: messages.MessageSet,
                wires: list[bytes]) -> Row:
        """The contender's row at this size through this MTA, in the current round."""
        key = run.contender.key
        mta.set_milters(run.spec)
        # warm-up: the same kind of mail, not measured
        warm = wires[: self.args.warmup]
        if warm:
            wres = self.send_and_settle(mta, warm, self.args.concurrency)
            if wres.failures:
                run.notes.append(f"warm-up {size}: {len(wres.failures)} failed, first: "
                                 f"{wres.failures[0].detail}")
        row = self.remembered_passes(
            (key, mta.name, size),
            lambda: self._measure_once(run, mta, size, msgset, wires, len(warm)),
            lambda passes, fresh: self._measure_once(run, mta, size, msgset, wires * passes,
                                                     len(warm) if fresh else 0, passes),
            msgset)
        return self._keep(row)

    def _measure_once(self, run: Running, mta: Mta, size: str, msgset: messages.MessageSet,
                      wires: list[bytes], warmed: int, passes: int = 1) -> Row:
        key = run.contender.key
        self.sink.clear()
        meter = procstats.Meter(key, run.roots) if run.spec else None
        meters = [meter, self.meter_engines, self.mta_meter(mta), self.meter_sink]
        for m in meters:
            if m is not None:
                m.start()
        cache0 = cachestats.snapshot(run.monkey)
        busy0, total0 = procstats.box_busy_seconds()
        with procstats.Sampler([m for m in (meter,) if m is not None]):
            res = loadgen.smtp_load(mta.smtp_port, wires, self.args.concurrency,
                                    messages.SENDER, messages.RECIPIENT)
            accepted = len(wires) - len(res.failures)
            t_e2e, delivered = self.wait_delivered(mta, accepted, 60 + 2 * len(wires))
        busy1, total1 = procstats.box_busy_seconds()
        row = self.row(key, mta, size, msgset, res, t_e2e, delivered, meters,
                       (busy1 - busy0) / max(1e-9, total1 - total0), passes)
        row.update(cachestats.row_fields(run.monkey, cache0))
        problems = checks.delivery_problems(res, len(wires), delivered)
        missing = checks.missing_markers(self.sink, run.markers)
        if missing:
            problems.append(missing)
        if run.after is not None:
            bad = run.after(len(wires) + warmed)
            if bad:
                problems.append(bad)
        self.settle_queue(mta, problems)
        row["problems"] = problems
        return row

    def row(self, key: str, mta: Mta | None, size: str, msgset: messages.MessageSet,
            res: loadgen.LoadResult, t_e2e: float | None, delivered: int,
            meters: Sequence[procstats.Meter | None], busy: float, passes: int = 1) -> Row:
        n = len(res.outcomes)
        e2e = (t_e2e - res.started) if t_e2e is not None else res.elapsed
        milter, engines, mta_meter, sink = meters
        return {
            "contender": key,
            "label": REGISTRY[key].label_for(mta.title if mta else ""),
            "mta": mta.name if mta else None,
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
            "milter_cpu_ms": per_msg_ms(milter.cpu_since_start(), n) if milter else None,
            "engines_cpu_ms": per_msg_ms(engines.cpu_since_start(), n) if engines else None,
            "mta_cpu_ms": per_msg_ms(mta_meter.cpu_since_start(), n) if mta_meter else None,
            "sink_cpu_ms": per_msg_ms(sink.cpu_since_start(), n) if sink else None,
            "client_cpu_ms": per_msg_ms(res.client_cpu, n),
            "milter_peak_rss_mib": round(milter.peak_kib() / 1024, 1) if milter else None,
            "engines_peak_rss_mib": round(engines.peak_kib() / 1024, 1) if engines else None,
            "box_busy_pct": round(busy * 100, 1),
            "first_failures": [o.detail for o in res.failures[:3]],
        }

    def _keep(self, row: Row) -> Row:
        where = f" via {row['mta']}" if row.get("mta") not in (None, "postfix") else ""
        for p in row["problems"]:
            loud(f"{row['contender']}{where} / {row['size']}: {p}")
        self.results.append(row)
        self.print_row(row)
        return row

    def print_row(self, r: Row) -> None:
        rnd = f" r{r['round']}" if self.args.repeat > 1 else ""
        via = f" {r['mta']}" if r.get("mta") not in (None, "postfix") else ""
        log(f"  {r['contender']:<16} {r['size']:>4}{rnd}{via}: e2e {r['e2e_rate']:7.1f} msg/s, "
            f"inject {r['inject_rate']:7.1f} msg/s, p50/p90/p99 {r['p50_ms']:.0f}/"
            f"{r['p90_ms']:.0f}/{r['p99_ms']:.0f} ms, milter CPU {fmt(r['milter_cpu_ms'])} "
            f"ms/msg, peak RSS {fmt(r['milter_peak_rss_mib'])} MiB, delivered "
            f"{r['delivered']}/{r['count']}, box busy {r['box_busy_pct']:.0f}%"
            + (f", cache {r['cache']}" if r.get("cache") else ""))

    # --- engines alone ------------------------------------------------------------------------

    def measure_engine(self, key: str, size: str, msgset: messages.MessageSet) -> Row | None:
        assert self.clamd is not None and self.spamd is not None
        kind = REGISTRY[key].engine
        assert kind is not None
        msgs = msgset.messages
        if kind == "spamd" and all(len(m) > SPAM_LIMIT for m in msgs):
            log(f"  {key} {size}: skipped, every message is over spamc's 500 KiB limit")
            return None
        clamd, spamd = self.clamd.tcp_address, self.spamd.address
        work = loadgen.engine_work(kind, clamd, spamd, msgs)
        warm = min(self.args.warmup, len(msgs))
        loadgen.run_concurrent(warm, self.args.concurrency, work)

        def once(passes: int) -> Row:
            every = list(msgs) * passes
            job = loadgen.engine_work(kind, clamd, spamd, every) if passes > 1 else work
            self.meter_engines.start()
            busy0, total0 = procstats.box_busy_seconds()
            res = loadgen.run_concurrent(len(every), self.args.concurrency, job)
            busy1, total1 = procstats.box_busy_seconds()
            row = self.row(key, None, size, msgset, res, None, len(every) - len(res.failures),
                           [None, self.meter_engines, None, None],
                           (busy1 - busy0) / max(1e-9, total1 - total0), passes)
            row["problems"] = [f"{len(res.failures)} failed: {res.failures[0].detail}"] \
                if res.failures else []
            return row

        row = self.remembered_passes((key, "", size), lambda: once(1),
                                     lambda passes, _fresh: once(passes), msgset)
        return self._keep(row)

    # --- smtp-source as the client ------------------------------------------------------------

    def measure_smtp_source(self, mta: Mta, size: str, msgset: messages.MessageSet) -> Row | None:
        """The ceiling again, with Postfix's smtp-source instead of the Python client."""
        if size == "mix":
            log("  smtp-source: skipped for the mix (it sends one file)")
            return None
        exe = shutil.which("smtp-source", path=os.environ.get("PATH", "") + ":/usr/sbin")
        if exe is None:
            log("  smtp-source not installed")
            return None
        mta.set_milters("")
        f = self.work / f"smtp-source-{size}.eml"
        # smtp-source appends CRLF to each line and dot-stuffs: give it LF lines
        f.write_bytes(msgset.messages[0].replace(b"\r\n", b"\n"))
        n, conc = len(msgset), self.args.concurrency

        def run(count: int) -> tuple[float, float, float]:
            cmd = [exe, "-s", str(conc), "-m", str(count), "-F", str(f),
                   "-f", messages.SENDER, "-t", messages.RECIPIENT,
                   f"127.0.0.1:{mta.smtp_port}"]
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
        self.wait_delivered(mta, 0, 60)
        memo_key = ("smtp-source", mta.name, size)
        memo = self.passes_memo.get(memo_key)
        passes = memo or 1
        meter_mta = self.mta_meter(mta)
        for attempt in range(2):
            self.sink.clear()
            for m in (meter_mta, self.meter_sink, self.meter_engines):
                m.start()
            busy0, total0 = procstats.box_busy_seconds()
            t0, t1, cpu = run(n * passes)
            t_e2e, delivered = self.wait_delivered(mta, n * passes, 60 + 2 * n * passes)
            busy1, total1 = procstats.box_busy_seconds()
            more = self.passes_for(t_e2e - t0, msgset)
            if attempt or memo is not None or more == 1:
                break
            passes = more
        n *= passes
        if delivered == n:
            self.passes_memo[memo_key] = passes
        row = {
            "contender": "smtp-source", "label": REGISTRY["smtp-source"].label,
            "mta": mta.name, "size": size, "round": self.round,
            "count": n, "set_size": len(msgset), "passes": passes,
            "mean_kib": round(len(msgset.messages[0]) / 1024, 1),
            "concurrency": conc, "accepted": delivered, "delivered": delivered,
            "inject_s": round(t1 - t0, 3), "inject_rate": round(n / (t1 - t0), 2),
            "e2e_s": round(t_e2e - t0, 3), "e2e_rate": round(n / (t_e2e - t0), 2),
            "p50_ms": None, "p90_ms": None, "p99_ms": None,
            "milter_cpu_ms": None, "engines_cpu_ms": None,
            "mta_cpu_ms": per_msg_ms(meter_mta.cpu_since_start(), n),
            "sink_cpu_ms": per_msg_ms(self.meter_sink.cpu_since_start(), n),
            "client_cpu_ms": per_msg_ms(cpu, n), "milter_peak_rss_mib": None,
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

    # --- many messages in one SMTP session ----------------------------------------------------

    def session(self, run: Running, mta: Mta, wires: list[bytes]) -> Row:
        """Send ``wires`` one after another in ONE SMTP session; time each message.

        A concurrent load hides a per-message stall behind the other
        sessions; one session shows it whole, message after message.  A
        short session first warms the milter up (unmeasured).
        """
        key = run.contender.key
        mta.set_milters(run.spec)
        warm = loadgen.smtp_session("127.0.0.1", mta.smtp_port, wires[:5], messages.SENDER,
                                    messages.RECIPIENT)
        self.wait_delivered(mta, len(warm.outcomes) - len(warm.failures), 60)
        self.sink.clear()
        meter = procstats.Meter(key, run.roots) if run.spec else None
        meter_mta = self.mta_meter(mta)
        for m in (meter, meter_mta):
            if m is not None:
                m.start()
        cache0 = cachestats.snapshot(run.monkey)
        res = loadgen.smtp_session("127.0.0.1", mta.smtp_port, wires, messages.SENDER,
                                   messages.RECIPIENT)
        _t, delivered = self.wait_delivered(mta, len(wires) - len(res.failures),
                                            60 + 2 * len(wires))
        n = len(wires)
        times = [o.seconds * 1000 for o in res.outcomes if o.ok] or [float("nan")]
        problems = checks.delivery_problems(res, n, delivered)
        missing = checks.missing_markers(self.sink, run.markers)
        if missing:
            problems.append(missing)
        self.settle_queue(mta, problems)
        self.sink.clear()
        row = {
            "contender": key, "label": run.contender.label_for(mta.title), "mta": mta.name,
            "round": self.round, "count": n, "delivered": delivered,
            "mean_kib": round(sum(len(w) for w in wires) / n / 1024, 1),
            "session_s": round(res.elapsed, 3),
            "msg_p50_ms": round(statistics.median(times), 1),
            "msg_mean_ms": round(statistics.fmean(times), 1),
            "msg_p90_ms": round(sorted(times)[max(0, math.ceil(0.9 * len(times)) - 1)], 1),
            "msg_max_ms": round(max(times), 1),
            "milter_cpu_ms": per_msg_ms(meter.cpu_since_start(), n) if meter else None,
            "mta_cpu_ms": per_msg_ms(meter_mta.cpu_since_start(), n),
            **cachestats.row_fields(run.monkey, cache0),
            "problems": problems,
        }
        for p in problems:
            loud(f"{key} via {mta.name}, one session: {p}")
        self.sessions.append(row)
        rnd = f" r{self.round}" if self.args.repeat > 1 else ""
        log(f"  {key:<16} {mta.name:>8}{rnd}: one session of {n}: per message p50 "
            f"{row['msg_p50_ms']:.1f} ms, mean {row['msg_mean_ms']:.1f} ms, max "
            f"{row['msg_max_ms']:.1f} ms, milter CPU {fmt(row['milter_cpu_ms'])} ms/msg, "
            f"delivered {delivered}/{n}")
        return row
