"""End of message on the worker pool: each brain bounded in time, the MTA kept waiting.

The connection's thread walks the brain chain, handing each blocking
brain's ``eom_process`` to the pool of ``threads`` workers (the seed's cap on
how much judging happens at once) and waiting for it, with SMFIR_PROGRESS
heartbeats every ``progress_interval`` seconds, for at most the brain's
``timeout`` and the message's ``eom_timeout`` in total.  A brain that
overruns cannot be killed (Python threads cannot be): its worker is written
off as stuck, a fresh worker takes its place and the brain's policy
applies; its circuit breaker soon stops calling it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

from miltermonkey_core.engine.chain import BrainSlot, BrainTimeout
from miltermonkey_core.engine.session import Decision, Session
from miltermonkey_core.logs import queue_id
from miltermonkey_core.milter.generation import Generation
from miltermonkey_core.server.pool import Job, WorkerPool


def run_eom(pool: WorkerPool, session: Session, allowed: frozenset[str],
            progress: Callable[[], None], gen: Generation,
            stop_deadline: Callable[[], float | None]) -> Decision:
    """Walk the chain for ``session``'s message; ``stop_deadline`` is set once the daemon stops."""
    d = gen.daemon
    start = time.monotonic()
    deadline = start + float(d.eom_timeout)
    if not gen.engine.chain.blocking:
        # every brain is pure computation and runs here: no pool, no progress
        return session.eom(allowed, deadline=deadline)
    interval = float(d.progress_interval)
    last_progress = [start]
    qid = session.qid

    def heartbeat() -> None:
        now = time.monotonic()
        if interval <= 0 or now - last_progress[0] < interval:
            return
        last_progress[0] = now
        with contextlib.suppress(Exception):
            progress()

    def invoke(slot: BrainSlot, call: Callable[[], None], timeout: float) -> None:
        if not slot.brain.blocking:
            # pure computation: a pool round trip would cost more than the call
            call()
            return

        def work() -> None:
            with queue_id(qid):
                call()

        job = pool.submit(work)
        reason = "eom"
        while True:
            now = time.monotonic()
            limit, reason = deadline, "eom"
            stop = stop_deadline()
            if stop is not None:
                margin = min(1.0, float(d.shutdown_timeout) / 4)
                if stop - margin < limit:
                    limit, reason = stop - margin, "shutdown"
            started = job.started
            if started is not None and timeout > 0 and started + timeout < limit:
                limit, reason = started + timeout, "brain"
            left = limit - now
            if left <= 0:
                break
            step = left
            if interval > 0:
                step = min(left, max(0.01, last_progress[0] + interval - now))
            if job.wait(step):
                break
            heartbeat()
        if job.done or not pool.abandon(job):
            _reraise(job)
            return
        started = job.started
        if started is None:
            why = ("the daemon is shutting down" if reason == "shutdown" else
                   f"no worker was free for it within eom_timeout ({d.eom_timeout:g} s)")
            raise BrainTimeout(why, counts=False)
        ran = time.monotonic() - started
        if reason == "shutdown":
            why = f"the daemon is shutting down (ran {ran:.1f} s)"
        elif reason == "brain":
            why = f"still running after its timeout of {timeout:g} s"
        else:
            why = f"eom_timeout of {d.eom_timeout:g} s spent (ran {ran:.1f} s)"
        raise BrainTimeout(why)

    try:
        return session.eom(allowed, invoke=invoke, deadline=deadline)
    finally:
        heartbeat()


def _reraise(job: Job) -> None:
    err = job.error
    if err is None:
        return
    if isinstance(err, Exception):
        raise err
    raise RuntimeError(f"brain raised {type(err).__name__}: {err}") from err
