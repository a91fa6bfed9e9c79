"""One benchmark run: the shared parts, every contender started and checked, then the rounds.

The shared parts start once: smtp-sink, each MTA of ``--mta`` relaying to
it, and (when a contender or the memory checks need them) one clamd and one
spamd.  Every milter contender is then started and checked through each
MTA, and stays up, idle when it is not its turn, until the last round: for
each size and round, each MTA is pointed at each contender in turn and the
same mail is sent at the same concurrency.  Then the one-session rows, then
the workloads (``--workloads``: retries, bulk, two hosts; :mod:`workloads`),
then the memory checks.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import checks
import contenders
import memory
import messages
import peers
import workloads
from console import log, loud
from contenders import ALL_CONTENDERS, REGISTRY, Resources, Running, Skip
from measure import Measurer
from miltermonkey_av.testing import Clamd
from miltermonkey_spam.testing import Spamd
from mtas import MTAS, Mta

from miltermonkey_core.testing.process import free_port
from miltermonkey_core.testing.sink import SmtpSink, parse_dump


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.res = Resources(work, args)
        self.mtas: list[Mta] = []
        self.skipped: dict[str, str] = {}
        self.checks: dict[str, list[str]] = {}
        self.memory: dict[str, Any] = {}
        self.keyed_sets: dict[str, messages.MessageSet] = {}
        self.sets: dict[str, messages.MessageSet] = {}
        self.wires: dict[str, list[bytes]] = {}
        self.session_wires: list[bytes] = []
        self.sink: SmtpSink | None = None
        self.measurer: Measurer | None = None
        self.workload_rows: list[dict[str, Any]] = []

    @property
    def results(self) -> list[dict[str, Any]]:
        return self.measurer.results if self.measurer else []

    @property
    def sessions(self) -> list[dict[str, Any]]:
        return self.measurer.sessions if self.measurer else []

    # --- the shared parts ---------------------------------------------------------------------

    def start_stack(self) -> None:
        w, a = self.work, self.args
        self.sink = sink = SmtpSink(w / "sink", free_port())
        sink.start()
        for name in a.mta:
            cls = MTAS[name]
            why = cls.unavailable_reason()
            if why:
                self._skip(name, why, cls.title)
                continue
            mta = cls(w / name, sink.port)
            mta.start()
            self.mtas.append(mta)
        if not self.mtas:
            raise RuntimeError(f"no MTA can run here: {self.skipped}")
        needs_engines = (any(REGISTRY[c].needs_engines for c in a.contenders)
                         or not a.no_memory or bool(a.workloads))
        if needs_engines:
            clamd = self.res.clamd = Clamd(w / "clamd", free_port())
            clamd.start()
            spamd = self.res.spamd = Spamd(w / "spamd", free_port(),
                                           max_children=a.spamd_children)
            spamd.start()
            log(f"clamd on :{clamd.tcp_port} and {clamd.unix_socket}; spamd on "
                f":{spamd.port} (--max-children {a.spamd_children}, -L)")
        self.measurer = Measurer(a, w, sink, self.res.clamd, self.res.spamd)

    def stop_everything(self) -> None:
        for m in self.res.monkeys:
            with contextlib.suppress(Exception):
                m.stop()
        peers.stop_all()
        for part in (*self.mtas, self.sink, self.res.clamd, self.res.spamd):
            if part is not None:
                with contextlib.suppress(Exception):
                    part.stop()

    # --- message sets -------------------------------------------------------------------------

    def build_sets(self) -> None:
        for name in self.args.sizes:
            t0 = time.perf_counter()
            s = messages.build_set(name, self.args.count, self.args.seed)
            self.sets[name] = s
            self.wires[name] = [messages.wire_form(m) for m in s.messages]
            log(f"message set {name}: {len(s)} messages, mean {s.mean_bytes / 1024:.1f} KiB "
                f"({time.perf_counter() - t0:.1f} s to build)")
        if self.args.one_session:
            s = messages.build_set("2k", self.args.one_session, self.args.seed + 3)
            self.session_wires = [messages.wire_form(m) for m in s.messages]

    def collect_keyed(self, size: str) -> None:
        """Keep what hop 1 delivered (now carrying its key) as hop 2's message set."""
        assert self.sink is not None
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

    def make_keyed(self, size: str, hop1_key: str, hop1: Running | None) -> None:
        """Send the set through hop 1 (running, or one of our own) and keep what it delivered."""
        assert self.sink is not None and self.measurer is not None
        if size in self.keyed_sets and len(self.keyed_sets[size]) == len(self.sets[size]):
            return
        log(f"  hop 1 pass for the keyed {size} set (not measured)")
        mta = self.mtas[0]
        run = hop1 or contenders.start(self.res, hop1_key)
        try:
            mta.set_milters(run.spec)
            self.sink.clear()
            res = self.measurer.send_and_settle(mta, self.wires[size], self.args.concurrency)
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

    # --- the whole run ------------------------------------------------------------------------

    def run(self) -> None:
        """Start and check every milter, then measure size by size, round by round, MTA by MTA.

        The milters stay up, idle when it is not their turn, until the last
        round: each round every MTA is pointed at each one in turn.
        """
        a = self.args
        self.start_stack()
        self.build_sets()
        order = [c for c in ALL_CONTENDERS if c in a.contenders]
        running: dict[str, Running] = {}
        here = {m.name for m in self.mtas}
        for key in order:
            c = REGISTRY[key]
            if c.kind != "engine" and not here.intersection(c.mtas):
                self._skip(key, f"measured only through {', '.join(c.mtas)}, not in --mta")
        try:
            for key in order:
                if key in self.skipped:
                    continue
                if REGISTRY[key].kind == "milter":
                    log(f"== {REGISTRY[key].label_for(self.mtas[0].title)}: start and check")
                    run = self.start_checked(key, running)
                    if run is not None:
                        running[key] = run
            for size in a.sizes:
                for rnd in range(1, a.repeat + 1):
                    self._measure_round(size, rnd, order, running)
            if a.one_session:
                self._session_rounds(order, running)
        finally:
            stop_in_parallel(list(running.values()))
        if a.workloads:
            self.run_workloads()
        if not a.no_memory:
            log("== memory")
            assert self.measurer is not None
            self.memory = memory.memory_tests(a, self.res, self.measurer, self.mtas[0])

    def run_workloads(self) -> None:
        """The workloads where the cache saves work, each with it off and on (after the rounds)."""
        assert self.measurer is not None and self.sink is not None
        wl = workloads.Workloads(self.args, self.work, self.res, self.measurer, self.sink,
                                 self.mtas[0])
        try:
            wl.run(self.args.workloads)
        finally:
            self.workload_rows = wl.rows
            self.skipped.update(wl.skipped)

    def _measure_round(self, size: str, rnd: int, order: Sequence[str],
                       running: dict[str, Running]) -> None:
        assert self.measurer is not None
        a = self.args
        self.measurer.round = rnd
        log(f"== size {size}" + (f", round {rnd} of {a.repeat}" if a.repeat > 1 else ""))
        for n, mta in enumerate(self.mtas):
            if n:
                log(f"== size {size} through {mta.title}")
            for key in order:
                c = REGISTRY[key]
                if key in self.skipped or not self._measured_here(key, mta, n, running):
                    continue
                try:
                    if c.kind == "engine":
                        self.measurer.measure_engine(key, size, self.sets[size])
                    elif c.kind == "client":
                        self.measurer.measure_smtp_source(mta, size, self.sets[size])
                    else:
                        self._measure_milter(running[key], mta, size)
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as e:
                    traceback.print_exc()
                    self._skip(key, f"error in {size} round {rnd}: {e!r}"[:2000])
                    gone = running.pop(key, None)
                    if gone is not None:
                        gone.stop()

    def _measured_here(self, key: str, mta: Mta, n: int, running: dict[str, Running]) -> bool:
        """Is ``key`` measured in the pass through ``mta`` (the n-th MTA)?"""
        c = REGISTRY[key]
        if c.kind == "engine":
            return n == 0  # no MTA: once per round
        if mta.name not in c.mtas or f"{key}@{mta.name}" in self.skipped:
            return False
        return c.kind == "client" or key in running

    def _measure_milter(self, run: Running, mta: Mta, size: str) -> None:
        assert self.measurer is not None and self.sink is not None
        fed_by = run.contender.fed_by
        msgset = self.keyed_sets[size] if fed_by else self.sets[size]
        wires = [messages.wire_form(m) for m in msgset.messages] if fed_by else self.wires[size]
        row = self.measurer.measure(run, mta, size, msgset, wires)
        row["notes"] = list(run.notes)
        self.sink.clear()

    def _session_rounds(self, order: Sequence[str], running: dict[str, Running]) -> None:
        """Every milter (and none) through every MTA: messages one after another, one session."""
        assert self.measurer is not None
        a = self.args
        for rnd in range(1, a.repeat + 1):
            self.measurer.round = rnd
            log(f"== one SMTP session of {a.one_session} messages"
                + (f", round {rnd} of {a.repeat}" if a.repeat > 1 else ""))
            for n, mta in enumerate(self.mtas):
                for key in order:
                    c = REGISTRY[key]
                    if c.kind != "milter" or c.fed_by or key in self.skipped \
                            or not self._measured_here(key, mta, n, running):
                        continue
                    try:
                        self.measurer.session(running[key], mta, self.session_wires)
                    except (KeyboardInterrupt, SystemExit):
                        raise
                    except Exception as e:
                        traceback.print_exc()
                        self._skip(f"{key}@{mta.name}",
                                   f"error in the one-session round {rnd}: {e!r}"[:2000])

    def start_checked(self, key: str, running: dict[str, Running]) -> Running | None:
        """Start a milter contender and check it through every MTA; None if it is skipped.

        It must pass through the first MTA; through another one a failed
        check leaves out only that MTA's rows (``key@mta`` in the skipped list).
        """
        assert self.sink is not None
        a, c = self.args, REGISTRY[key]
        run: Running | None = None
        try:
            why = c.unavailable(self.res) if c.unavailable is not None else None
            if why:
                raise Skip(why)
            if c.fed_by:
                for size in a.sizes:
                    self.make_keyed(size, c.fed_by, running.get(c.fed_by))
            try:
                run = contenders.start(self.res, key)
            except Skip:
                raise
            except Exception as e:
                raise Skip(f"could not start: {e}") from e
            for n, mta in enumerate(m for m in self.mtas if m.name in c.mtas):
                try:
                    self._check_through(key, run, mta)
                except Skip as e:
                    if n == 0:
                        raise Skip(f"functional check failed: {e}") from e
                    self._skip(f"{key}@{mta.name}", f"functional check failed: {e}",
                               f"{c.label_for(mta.title)} through {mta.title}")
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
                traceback.print_exc()
                self._skip(key, f"error: {e!r}"[:2000])
            return None
        return run

    def _check_through(self, key: str, run: Running, mta: Mta) -> None:
        assert self.sink is not None
        name = key if mta is self.mtas[0] else f"{key}@{mta.name}"
        if mta is not self.mtas[0]:
            log(f"  check {key} through {mta.title}")
        self.checks[name] = checks.functional_check(key, run, mta, self.sink)
        if run.contender.fed_by:
            ks = self.keyed_sets[self.args.sizes[0]]
            self.checks[name].append(checks.keyed_check(run, mta, self.sink, ks))

    def _skip(self, key: str, why: str, label: str | None = None) -> None:
        self.skipped[key] = why
        if label is None:
            label = REGISTRY[key].label_for(self.mtas[0].title if self.mtas else "Postfix")
        loud(f"{label}: SKIPPED: {why}")


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
