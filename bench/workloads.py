"""Workloads a real MX sees, where the scan cache can save work: retries, bulk, two hosts.

On unique mail the av+spam daemon runs at the engines' own limit (spamd is
the wall), and so does every peer.  Real mail repeats itself, and these
workloads send the repeats an MX actually gets, each with the daemon's scan
cache off and then on (two fresh daemons, same brains, same mail):

``retries`` (a)
    The client sends to a *front* Postfix (no milter) that relays to the
    milter'ed Postfix.  One message in five carries ``X-Bench-Retry``, and
    the ``tempfail-once`` brain (``bench/brains``), last in the chain after
    av and spam, answers 451 to its first attempt; the front queues it and
    retries 1 to 2 s later (``minimal_backoff_time`` and
    ``maximal_backoff_time`` 2 s, ``queue_run_delay`` 1 s; see
    :data:`FRONT_RETRY`).  The rate is messages delivered at the sink over
    the time until the last one is.
``bulk`` (b)
    The mix set, each body to 5 recipients in 5 transactions (one SMTP
    session each), byte for byte the same message: a list server whose
    To: is the list.  The set goes out 5 times, recipient by recipient, so
    the copies of one body are never in flight together (the cache does not
    merge lookups that arrive at the same moment: such copies would all be
    scanned).  The rate is transactions per second.
``hosts`` (c)
    Two daemons (two hosts, each with its own Postfix) sharing one Redis as
    ``cache`` and one ``cache_secret_file``.  Host 1 gets the mix set;
    host 2 is fed what host 1 delivered, as the sink received it.  Neither
    host uses the milter key (``milter_key = false``), so nothing is
    skipped by a key: only the cache can save host 2 work.  With the cache
    off both hosts scan everything.

Every row has the rate, the milter's and the engines' CPU per message
(transaction), the client's p50 (connect to the reply to the final dot, at
the MTA it talks to) and the p50 from sending to arriving at the sink, the
cache's hits and lookups and the replays per brain (from the daemon's
``/metrics``), and the rate against the engines alone on the same unique
mail (E3, measured again right before each workload, so the box's drifting
load stays out of the ratio).  Warm-ups use mail of their own (another
seed), never the measured set, so a hit is always a repeat the workload
sent.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import re
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import cachestats
import checks
import loadgen
import messages
import procstats
from console import log, loud
from contenders import SPAM, VIRUS, Resources
from measure import Measurer, Row, per_msg_ms
from miltermonkey_av.options import AntiVirusOptions
from mtas import Mta, PostfixMta

from miltermonkey_core.plugins import installed_brains
from miltermonkey_core.testing.daemon import MonkeyProcess
from miltermonkey_core.testing.process import free_port
from miltermonkey_core.testing.redis import Redis
from miltermonkey_core.testing.sink import SmtpSink, parse_dump

#: The workloads, in the order they run (``--workloads``).
WORKLOADS = ("retries", "bulk", "hosts")
LABELS = {"engines": "E3 clamd+spamd alone", "retries": "(a) retries, 20% 4xx once",
          "bulk": "(b) bulk, 5 transactions a body", "hosts": "(c) two hosts, shared Redis"}
RETRY_HEADER = b"X-Bench-Retry: once\r\n"
RETRY_SHARE = 5  # one message in five
BULK_COPIES = 5
#: When the front Postfix retries a deferred message: 1 to 2 s after the 4xx.  Postfix
#: stamps the next attempt in whole seconds, so a 1 s backoff can come due at once,
#: while the delivery agent that deferred it still holds the file locked; the queue
#: manager then sets it aside for 60 s ("skipped, still being delivered").  2 s does not.
FRONT_RETRY = {"minimal_backoff_time": "2s", "maximal_backoff_time": "2s",
               "queue_run_delay": "1s"}
#: Seconds every queue must stay empty before mail that never reached the sink is given up.
SETTLED = 3.0
_MID = re.compile(rb"(?im)^message-id:[ \t]*(\S+)")


def message_id(raw: bytes) -> bytes:
    head = raw.split(b"\n\n", 1)[0].split(b"\r\n\r\n", 1)[0]
    m = _MID.search(head)
    return m.group(1) if m else b""


def unavailable(name: str) -> str | None:
    """Why workload ``name`` cannot run here, or None."""
    if name == "retries" and "tempfail-once" not in installed_brains():
        return ("the tempfail-once brain is not installed (pip install -e bench/brains; "
                "nox -s bench does)")
    if name == "hosts":
        why = Redis.unavailable_reason()
        if why:
            return why
        if importlib.util.find_spec("redis") is None:
            return "redis-py is not installed (pip install redis): the daemon needs it"
    return None


class Workloads:
    """Runs the chosen workloads after the rounds; ``rows`` is what they measured."""

    def __init__(self, args: argparse.Namespace, work: Path, res: Resources,
                 measurer: Measurer, sink: SmtpSink, mta: Mta) -> None:
        self.args = args
        self.work = work
        self.res = res
        self.measurer = measurer
        self.sink = sink
        self.mta = mta  # the milter'ed Postfix (host 1 in "hosts")
        self.rows: list[Row] = []
        self.skipped: dict[str, str] = {}
        self.engines_rate: float | None = None
        self.set = messages.build_set("mix", args.count, args.seed)
        # warm-up mail of its own: a hit must be a repeat the workload sent
        self.warm = [messages.wire_form(m) for m in
                     messages.build_set("mix", args.warmup, args.seed + 1000).messages]
        self.warm2 = [messages.wire_form(m) for m in
                      messages.build_set("mix", args.warmup, args.seed + 2000).messages]

    def run(self, names: Sequence[str]) -> None:
        log(f"== workloads: {', '.join(names)} (the mix set, {len(self.set)} messages, "
            f"mean {self.set.mean_bytes / 1024:.1f} KiB)")
        for name in names:
            why = unavailable(name)
            if why:
                self._skip(name, why)
                continue
            try:
                self.engines_alone(name)
                getattr(self, name)()
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:
                traceback.print_exc()
                self._skip(name, f"error: {e!r}"[:2000])

    def _skip(self, name: str, why: str) -> None:
        self.skipped[f"workload {name}"] = why
        loud(f"workload {name}: SKIPPED: {why}")

    # --- the reference: the engines alone on the same unique mail -----------------------------

    def engines_alone(self, before: str) -> None:
        """E3 on the set, right before workload ``before``: its rows are compared with this.

        The box is shared and its load drifts over minutes; a reference taken
        next to the rows it divides keeps that drift out of the ratio.
        """
        clamd, spamd = self.res.engines()
        msgs = self.set.messages
        conc = self.args.concurrency
        loadgen.run_concurrent(len(self.warm), conc, loadgen.engine_work(
            "both", clamd.tcp_address, spamd.address, self.warm))
        meter = self.measurer.meter_engines
        meter.start()
        busy0, total0 = procstats.box_busy_seconds()
        res = loadgen.run_concurrent(len(msgs), conc, loadgen.engine_work(
            "both", clamd.tcp_address, spamd.address, msgs))
        busy = _busy_since(busy0, total0)
        n = len(msgs)
        self.engines_rate = n / res.elapsed
        row = self._base("engines", f"before {LABELS[before][:3]}", "-", n,
                         n - len(res.failures), res.elapsed)
        row.update({"p50_ms": round(res.percentile(50) * 1000, 1),
                    "engines_cpu_ms": per_msg_ms(meter.cpu_since_start(), n),
                    "total_cpu_ms": per_msg_ms(meter.cpu_since_start(), n),
                    "vs_engines": 1.0, "box_busy_pct": round(busy * 100, 1),
                    "problems": [f"{len(res.failures)} failed: {res.failures[0].detail}"]
                    if res.failures else []})
        self._keep(row)

    # --- (a) retries --------------------------------------------------------------------------

    def retries(self) -> None:
        conc = str(self.args.concurrency)
        # the front delivers at the benchmark's concurrency, as the client does elsewhere
        front = PostfixMta(self.work / "front", self.mta.smtp_port, extra={
            "myhostname": "front.bench.test", **FRONT_RETRY,
            "default_destination_concurrency_limit": conc,
            "smtp_destination_concurrency_limit": conc,
            "initial_destination_concurrency": conc})
        front.start()
        try:
            wires = [messages.wire_form(RETRY_HEADER + m if i % RETRY_SHARE == 0 else m)
                     for i, m in enumerate(self.set.messages)]
            marked = sum(1 for i in range(len(wires)) if i % RETRY_SHARE == 0)
            for cache in ("off", "memory"):
                brains = [*self._brains(), {"use": "tempfail-once"}]
                m = self._daemon(f"wl-retries-{cache}", brains, cache=cache)
                try:
                    self.mta.set_milters(m.postfix_spec)
                    self._warm(self.mta, self.warm)
                    row = self._measure("retries", "", m, front, [front, self.mta], wires,
                                        None, len(wires))
                    got = row.get("verdicts", {}).get("tempfail", 0)
                    if got != marked:
                        row["problems"].append(f"{got} first attempts answered 4xx, "
                                               f"{marked} marked")
                    self._keep(row)
                finally:
                    self._stop(m)
        finally:
            front.stop()

    # --- (b) bulk -----------------------------------------------------------------------------

    def bulk(self) -> None:
        one = [messages.wire_form(m) for m in self.set.messages]
        wires = one * BULK_COPIES
        rcpts = [f"list{k + 1}@sink.bench.test" for k in range(BULK_COPIES) for _ in one]
        for cache in ("off", "memory"):
            m = self._daemon(f"wl-bulk-{cache}", self._brains(), cache=cache)
            try:
                self.mta.set_milters(m.postfix_spec)
                self._warm(self.mta, self.warm)
                self._keep(self._measure("bulk", "", m, self.mta, [self.mta], wires, rcpts,
                                         len(wires)))
            finally:
                self._stop(m)

    # --- (c) two hosts sharing Redis ----------------------------------------------------------

    def hosts(self) -> None:
        secret = self.res.key_options(True)["miltersecretfile"]  # the shared cache secret
        mx2 = PostfixMta(self.work / "mx2", self.sink.port,
                         extra={"myhostname": "mx2.bench.test"})
        mx2.start()
        redis = Redis(self.work / "redis", free_port())
        try:
            original = [messages.wire_form(m) for m in self.set.messages]
            for on in (False, True):
                if on:
                    redis.start()
                    log(f"  redis on :{redis.port}")
                cache = redis.url if on else "off"
                brains = self._brains()
                h1 = self._daemon(f"wl-host1-{'redis' if on else 'off'}", brains, cache=cache,
                                  cache_secret_file=secret)
                h2 = self._daemon(f"wl-host2-{'redis' if on else 'off'}", brains, cache=cache,
                                  cache_secret_file=secret)
                try:
                    self.mta.set_milters(h1.postfix_spec)
                    mx2.set_milters(h2.postfix_spec)
                    self._warm(self.mta, self.warm)
                    self._warm(mx2, self.warm2)
                    self._keep(self._measure("hosts", "host 1", h1, self.mta, [self.mta],
                                             original, None, len(original), keep_sink=True))
                    fed = self._delivered_as_sent(original)
                    self.sink.clear()
                    self._keep(self._measure("hosts", "host 2", h2, mx2, [mx2], fed, None,
                                             len(fed)))
                finally:
                    self._stop(h1)
                    self._stop(h2)
        finally:
            with contextlib.suppress(Exception):
                redis.stop()
            mx2.stop()

    def _delivered_as_sent(self, original: Sequence[bytes]) -> list[bytes]:
        """What host 1 delivered, in the order of the set, ready to send again."""
        got: dict[bytes, bytes] = {}
        for path in self.sink.messages():
            raw = parse_dump(path).message
            got.setdefault(message_id(raw), messages.wire_form(messages.to_crlf(raw)))
        order = [message_id(w) for w in original]
        missing = [mid for mid in order if mid not in got]
        if missing:
            loud(f"host 1 delivered {len(got)} of {len(order)}: host 2 gets those")
        return [got[mid] for mid in order if mid in got]

    # --- the parts ----------------------------------------------------------------------------

    def _brains(self) -> list[dict[str, Any]]:
        """av and spam as the contenders run them, with av's cache able to tell its database.

        The bench's clamd loads a private database (EICAR only) that gives no
        version in ``VERSION``: the av brain caches only when it can
        fingerprint the signature files, so it is told where they are.  They
        are written once, before clamd answered its first scan, and never
        change during a run: no settle window is needed (``cache_settle``
        is for a live freshclam update).  An av brain without these options
        (before its cache) gets neither.
        """
        av, spam = self.res.avspam_brains(skip_if_key=False)
        clamd, _spamd = self.res.engines()
        known = attrs.fields_dict(AntiVirusOptions)
        if "database_directory" in known:
            av["database_directory"] = str(clamd.db_dir)
        if "cache_settle" in known:
            av["cache_settle"] = 0
        return [av, spam]

    def _daemon(self, name: str, brains: list[dict[str, Any]], **opts: Any) -> MonkeyProcess:
        """A fresh av+spam daemon (empty cache) with a metrics endpoint for the hits."""
        return self.res.monkey(name, brains, metrics=f"127.0.0.1:{free_port()}", **opts)

    def _stop(self, m: MonkeyProcess) -> None:
        m.stop()
        with contextlib.suppress(ValueError):
            self.res.monkeys.remove(m)

    def _warm(self, mta: Mta, wires: Sequence[bytes]) -> None:
        """Unmeasured mail of its own: engines warm, spamd's version known to the spam brain."""
        res = loadgen.smtp_load(mta.smtp_port, wires, self.args.concurrency, messages.SENDER,
                                messages.RECIPIENT)
        self._wait([mta], len(wires) - len(res.failures), 120)
        self.sink.clear()

    def _wait(self, mtas: Sequence[Mta], expected: int, timeout: float) -> float:
        """When every queue is empty (front first) and the sink holds ``expected`` messages.

        A message refused behind the front MTA is no failure at the client,
        and the sink never gets it: once every queue has stayed empty for
        :data:`SETTLED` seconds nothing more can arrive, and the time the
        queues emptied is the end.  The caller counts what did arrive.
        """
        end = time.monotonic() + timeout
        empty_since: float | None = None
        while True:
            if all(m.queue_count() == 0 for m in mtas):
                now = time.perf_counter()
                if len(self.sink.messages()) >= expected:
                    return now
                empty_since = empty_since or now
                if now - empty_since >= SETTLED:
                    return empty_since
            else:
                empty_since = None
            if time.monotonic() > end:
                return time.perf_counter()
            time.sleep(0.02)

    # --- one measurement ----------------------------------------------------------------------

    def _measure(self, workload: str, host: str, monkey: MonkeyProcess, entry: Mta,
                 drain: Sequence[Mta], wires: Sequence[bytes], rcpts: Sequence[str] | None,
                 expected: int, keep_sink: bool = False) -> Row:
        """Send ``wires`` to ``entry``; metered until every one is at the sink."""
        self.sink.clear()

        def tree(m: Mta) -> Callable[[], list[int]]:
            return lambda: [m.pid or 0]

        milter = procstats.Meter(monkey.name, lambda: [monkey.proc.pid]
                                 if monkey.proc is not None and monkey.alive() else [])
        mta_meters = [procstats.Meter(f"mta{i}", tree(m)) for i, m in enumerate(drain)]
        engines = self.measurer.meter_engines
        for meter in (milter, engines, *mta_meters):
            meter.start()
        cache0 = cachestats.snapshot(monkey)
        busy0, total0 = procstats.box_busy_seconds()
        clock = time.time() - time.perf_counter()  # perf_counter -> wall clock (sink mtimes)
        res = loadgen.smtp_load(entry.smtp_port, wires, self.args.concurrency, messages.SENDER,
                                messages.RECIPIENT, recipients=rcpts)
        t_end = self._wait(drain, expected - len(res.failures), 120 + 3 * len(wires))
        busy = _busy_since(busy0, total0)
        delivered, p50_delivery = self._arrivals(wires, rcpts, res, clock)
        n = len(wires)
        mode = cachestats.cache_setting(monkey)
        row = self._base(workload, host, "redis" if mode.startswith("redis") else mode, n,
                         delivered, t_end - res.started)
        milter_ms = per_msg_ms(milter.cpu_since_start(), max(1, delivered))
        engines_ms = per_msg_ms(engines.cpu_since_start(), max(1, delivered))
        row.update({
            "inject_rate": round(n / res.elapsed, 2),
            "p50_ms": round(res.percentile(50) * 1000, 1),
            "p50_delivery_ms": p50_delivery,
            "milter_cpu_ms": milter_ms,
            "engines_cpu_ms": engines_ms,
            "total_cpu_ms": round(milter_ms + engines_ms, 2),
            "mta_cpu_ms": per_msg_ms(sum(m.cpu_since_start() for m in mta_meters),
                                     max(1, delivered)),
            "box_busy_pct": round(busy * 100, 1),
            "vs_engines": round(row["e2e_rate"] / self.engines_rate, 2)
            if self.engines_rate else None,
        })
        fields = cachestats.row_fields(monkey, cache0)
        row["hits"] = fields.pop("cache")  # "off" or hits/lookups; "cache" stays the mode
        row.update(fields)
        replays = row.get("cache_replays") or {}
        row["av_hits"], row["spam_hits"] = replays.get("av", 0), replays.get("spam", 0)
        problems = checks.delivery_problems(res, expected, delivered)
        missing = checks.missing_markers(self.sink, [*VIRUS, *SPAM])
        if missing:
            problems.append(missing)
        for m in drain:
            self.measurer.settle_queue(m, problems)
        row["problems"] = problems
        if not keep_sink:
            self.sink.clear()
        return row

    def _arrivals(self, wires: Sequence[bytes], rcpts: Sequence[str] | None,
                  res: loadgen.LoadResult, clock: float) -> tuple[int, float | None]:
        """How many of ``wires`` reached the sink, and the median ms from connect() to there.

        Only the mail sent counts: a bounce the front MTA wrote is not a delivery.
        """
        sent: dict[tuple[bytes, str], float] = {}
        for i, (w, o) in enumerate(zip(wires, res.outcomes, strict=True)):
            rcpt = rcpts[i] if rcpts is not None else messages.RECIPIENT
            sent[(message_id(w), rcpt)] = o.start + clock
        took: list[float] = []
        for path in self.sink.messages():
            dump = parse_dump(path)
            key = (message_id(dump.message), dump.recipients[0] if dump.recipients else "")
            started = sent.pop(key, None)
            if started is not None:
                took.append((path.stat().st_mtime - started) * 1000)
        if not took:
            return 0, None
        took.sort()
        return len(took), round(took[(len(took) - 1) // 2], 1)

    def _base(self, workload: str, host: str, cache: str, n: int, delivered: int,
              seconds: float) -> Row:
        label = LABELS[workload] + (f", {host}" if host else "")
        return {"workload": workload, "label": label, "host": host, "cache": cache,
                "count": n, "set_size": len(self.set), "mean_kib":
                round(self.set.mean_bytes / 1024, 1), "concurrency": self.args.concurrency,
                "delivered": delivered, "e2e_s": round(seconds, 3),
                "e2e_rate": round(delivered / seconds, 2) if seconds > 0 else None}

    def _keep(self, row: Row) -> None:
        for p in row.get("problems") or []:
            loud(f"workload {row['label']} (cache {row['cache']}): {p}")
        self.rows.append(row)
        log(f"  {row['label']:<44} cache {_cache_text(row):<14} {row['e2e_rate']:7.1f} msg/s "
            f"({_fmt(row.get('vs_engines'), 2)}x E3), p50 {_fmt(row.get('p50_ms'))} ms, "
            f"to sink {_fmt(row.get('p50_delivery_ms'))} ms, milter+engine CPU "
            f"{_fmt(row.get('milter_cpu_ms'), 2)}+{_fmt(row.get('engines_cpu_ms'), 2)} ms/msg, "
            f"delivered {row['delivered']}/{row['count']}, box busy "
            f"{row.get('box_busy_pct', 0):.0f}%")


def _cache_text(row: Row) -> str:
    hits = row.get("hits")
    return f"{row['cache']} {hits}" if hits and hits != row["cache"] else str(row["cache"])


def _fmt(v: Any, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _busy_since(busy0: float, total0: float) -> float:
    busy1, total1 = procstats.box_busy_seconds()
    return (busy1 - busy0) / max(1e-9, total1 - total0)
