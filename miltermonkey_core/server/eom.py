"""End of message on the worker pool: each brain bounded in time, the MTA kept waiting.

The connection's thread walks the brain chain, handing each blocking
brain's ``eom_process`` to the pool of ``threads`` workers (the seed's cap on
how much judging happens at once) and waiting for it, with SMFIR_PROGRESS
heartbeats every ``progress_interval`` seconds, for at most the brain's
``timeout`` and the message's ``eom_timeout`` in total.  A brain that
overruns cannot be killed (Python threads cannot be): its worker is written
off as stuck, a fresh worker takes its place and the brain's policy
applies; its circuit breaker soon stops calling it.

Independent brains are started together (:meth:`PoolInvoker.start`) and
waited for one by one in config order (:meth:`PoolInvoker.finish`).
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


class PoolInvoker:
    """Runs one message's brains on the pool, within its deadlines, with progress replies."""

    def __init__(self, pool: WorkerPool, qid: str, deadline: float, eom_timeout: float,
                 shutdown_timeout: float, progress: Callable[[], None], interval: float,
                 stop_deadline: Callable[[], float | None]) -> None:
        self.pool = pool
        self.qid = qid
        self.deadline = deadline
        self.eom_timeout = eom_timeout
        self.shutdown_timeout = shutdown_timeout
        self.progress = progress
        self.interval = interval
        self.stop_deadline = stop_deadline
        self.last_progress = time.monotonic()

    def heartbeat(self) -> None:
        now = time.monotonic()
        if self.interval <= 0 or now - self.last_progress < self.interval:
            return
        self.last_progress = now
        with contextlib.suppress(Exception):
            self.progress()

    def __call__(self, slot: BrainSlot, call: Callable[[], None], timeout: float) -> None:
        self.finish(slot, self.start(slot, call), timeout)

    def start(self, slot: BrainSlot, call: Callable[[], None]) -> Job | None:
        """Hand the call to the pool (a non-blocking brain runs here and now: None)."""
        if not slot.brain.blocking:
            # pure computation: a pool round trip would cost more than the call
            call()
            return None
        qid = self.qid

        def work() -> None:
            with queue_id(qid):
                call()

        return self.pool.submit(work)

    def finish(self, slot: BrainSlot, handle: object, timeout: float) -> None:
        """Wait for the call: its result, its error, or BrainTimeout with the reason."""
        if handle is None:
            return
        assert isinstance(handle, Job)
        job = handle
        reason = "eom"
        while True:
            now = time.monotonic()
            limit, reason = self.deadline, "eom"
            stop = self.stop_deadline()
            if stop is not None:
                margin = min(1.0, self.shutdown_timeout / 4)
                if stop - margin < limit:
                    limit, reason = stop - margin, "shutdown"
            started = job.started
            if started is not None and timeout > 0 and started + timeout < limit:
                limit, reason = started + timeout, "brain"
            left = limit - now
            if left <= 0:
                break
            step = left
            if self.interval > 0:
                step = min(left, max(0.01, self.last_progress + self.interval - now))
            if job.wait(step):
                break
            self.heartbeat()
        if job.done or not self.pool.abandon(job):
            _reraise(job)
            return
        started = job.started
        if started is None:
            why = ("the daemon is shutting down" if reason == "shutdown" else
                   f"no worker was free for it within eom_timeout ({self.eom_timeout:g} s)")
            raise BrainTimeout(why, counts=False)
        ran = time.monotonic() - started
        if reason == "shutdown":
            why = f"the daemon is shutting down (ran {ran:.1f} s)"
        elif reason == "brain":
            why = f"still running after its timeout of {timeout:g} s"
        else:
            why = f"eom_timeout of {self.eom_timeout:g} s spent (ran {ran:.1f} s)"
        raise BrainTimeout(why)

    def detach(self, handle: object) -> None:
        if isinstance(handle, Job):
            self.pool.detach(handle)


def run_eom(pool: WorkerPool, session: Session, allowed: frozenset[str],
            progress: Callable[[], None], gen: Generation,
            stop_deadline: Callable[[], float | None]) -> Decision:
    """Walk the chain for ``session``'s message; ``stop_deadline`` is set once the daemon stops."""
    d = gen.daemon
    deadline = time.monotonic() + float(d.eom_timeout)
    if not gen.engine.chain.blocking:
        # every brain is pure computation and runs here: no pool, no progress
        return session.eom(allowed, deadline=deadline)
    invoker = PoolInvoker(pool, session.qid, deadline, float(d.eom_timeout),
                          float(d.shutdown_timeout), progress, float(d.progress_interval),
                          stop_deadline)
    try:
        return session.eom(allowed, invoke=invoker, deadline=deadline)
    finally:
        invoker.heartbeat()


def _reraise(job: Job) -> None:
    err = job.error
    if err is None:
        return
    if isinstance(err, Exception):
        raise err
    raise RuntimeError(f"brain raised {type(err).__name__}: {err}") from err
