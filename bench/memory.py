"""The memory checks, after the rates: many sessions at once, and one very large message.

* 20 concurrent sessions of 50 KiB mail through MilterMonkey (trivial brain,
  then av + spam): idle and peak RSS of the daemon (supervisor and worker
  together) and of the worker alone, the process that speaks the milter
  protocol and runs the brains.
* One large message (50 MB; ``--big-mb``) through MilterMonkey with av +
  spam: the peak must stay near idle, because a body over
  ``spool_threshold`` goes to a temporary file under the daemon's
  ``tmpdir``; a thread watches the worker's open files to see it there.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import threading
from typing import Any

import contenders
import loadgen
import messages
import procstats
from console import log, loud
from contenders import Resources, Skip
from measure import Measurer
from mtas import Mta

SESSIONS = 20


def memory_tests(args: argparse.Namespace, res: Resources, measurer: Measurer,
                 mta: Mta) -> dict[str, Any]:
    """Both checks; what each found, by name (``mm-trivial_20_sessions``, ``big_message``)."""
    memory: dict[str, Any] = {}
    count = 40 if args.quick else 100
    s = messages.build_set("50k", count, args.seed + 7)
    for key in ("mm-trivial", "mm-avspam"):
        try:
            run = contenders.start(res, key)
        except Skip as e:
            memory[f"{key}_20_sessions"] = {"skipped": str(e)}
            log(f"memory {key}: skipped: {e}")
            continue
        try:
            mta.set_milters(run.spec)
            measurer.send_and_settle(mta, [messages.wire_form(m) for m in s.messages[:10]],
                                     SESSIONS)
            measurer.sink.clear()
            meter = procstats.Meter(key, run.roots)
            assert run.monkey is not None and run.monkey.proc is not None
            wpid = procstats.worker_pid(run.monkey.proc.pid)
            worker = procstats.Meter("worker", functools.partial(list, [wpid]))
            idle = meter.rss()
            meter.start()
            worker.start()
            with procstats.Sampler([meter, worker], interval=0.1):
                out = measurer.send_and_settle(mta, [messages.wire_form(m) for m in s.messages],
                                               SESSIONS)
            entry = {"sessions": SESSIONS, "messages": count, "size": "50k",
                     "idle_rss_mib": round(idle / 1024, 1),
                     "peak_rss_mib": round(meter.peak_kib() / 1024, 1),
                     "worker_peak_rss_mib": round(worker.peak_kib() / 1024, 1),
                     "processes": len(meter.pids()),
                     "refused": len(out.failures),
                     "first_refusal": out.failures[0].detail if out.failures else None,
                     "p99_ms": round(out.percentile(99) * 1000, 1)}
            if out.failures:
                loud(f"memory {key}: {len(out.failures)} of {count} refused: "
                     f"{out.failures[0].detail}")
            memory[f"{key}_20_sessions"] = entry
            log(f"memory {key}, {SESSIONS} concurrent sessions: idle {entry['idle_rss_mib']} "
                f"MiB, peak {entry['peak_rss_mib']} MiB over {entry['processes']} process(es) "
                f"(worker process {entry['worker_peak_rss_mib']} MiB), "
                f"refused {entry['refused']}")
        finally:
            run.stop()
            measurer.sink.clear()
    memory["big_message"] = big_message_test(args, res, measurer, mta)
    return memory


def big_message_test(args: argparse.Namespace, res: Resources, measurer: Measurer,
                     mta: Mta) -> dict[str, Any]:
    size = args.big_mb * 1024 * 1024
    try:
        run = contenders.start(res, "mm-avspam")
    except Skip as e:
        log(f"memory: {args.big_mb} MB message skipped: {e}")
        return {"skipped": str(e)}
    try:
        mta.set_milters(run.spec)
        measurer.sink.clear()
        big = messages.wire_form(messages.big_message(size, args.seed))
        assert run.monkey is not None and run.monkey.proc is not None
        pid = procstats.worker_pid(run.monkey.proc.pid)
        meter = procstats.Meter("big", run.roots)
        worker = procstats.Meter("worker", lambda: [pid])
        idle = meter.rss()
        worker_idle = procstats.rss_kib(pid)
        meter.start()
        worker.start()
        tmpdir = str(res.work / "mm-tmp")
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
            out = loadgen.smtp_send("127.0.0.1", mta.smtp_port, big, messages.SENDER,
                                    messages.RECIPIENT, timeout=600)
            measurer.wait_delivered(mta, 1 if out.ok else 0, 300)
        stop.set()
        watcher.join()
        entry = {"size_mib": round(len(big) / 1024 / 1024, 1), "accepted": out.ok,
                 "reply": out.detail, "seconds": round(out.seconds, 2),
                 "idle_rss_mib": round(idle / 1024, 1),
                 "peak_rss_mib": round(meter.peak_kib() / 1024, 1),
                 "worker_idle_rss_mib": round(worker_idle / 1024, 1),
                 "worker_peak_rss_mib": round(worker.peak_kib() / 1024, 1),
                 "body_spooled_to_disk": spooled.is_set(),
                 "delivered": len(measurer.sink.messages())}
        log(f"memory: one {entry['size_mib']} MiB message through mm-avspam: "
            f"{'accepted' if out.ok else 'REFUSED ' + out.detail} in {entry['seconds']} s, "
            f"RSS idle {entry['idle_rss_mib']} MiB -> peak {entry['peak_rss_mib']} MiB, "
            f"spooled to disk: {entry['body_spooled_to_disk']}")
        if not out.ok:
            loud(f"the {args.big_mb} MB message was refused: {out.detail}")
        if not spooled.is_set():
            loud("the large body was never seen in a temporary file")
        return entry
    finally:
        run.stop()
        measurer.sink.clear()
