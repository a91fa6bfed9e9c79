"""The end-of-message worker pool: the seed's ``threads`` and ``jobsperthread``.

``threads`` caps how much judging happens at once; a worker retires after
``jobsperthread`` jobs and a fresh one takes its place, so what brains keep
per thread (``threading.local`` engine connections, caches) is rebuilt
regularly: the Python meaning of the seed's "sent home" threads.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from miltermonkey_core.logs import ROOT

log = logging.getLogger(f"{ROOT}.daemon")


QUEUED, RUNNING, DONE, CANCELLED = "queued", "running", "done", "cancelled"


class Job:
    """One call handed to the pool; the submitter waits on it or abandons it."""

    __slots__ = ("abandoned", "error", "event", "fn", "lock", "replaced", "result", "started",
                 "state")

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.event = threading.Event()
        self.lock = threading.Lock()
        self.result: Any = None
        self.error: BaseException | None = None
        self.state = QUEUED
        self.started: float | None = None
        self.abandoned = False
        self.replaced = False

    def wait(self, timeout: float) -> bool:
        return self.event.wait(timeout)

    @property
    def done(self) -> bool:
        return self.event.is_set()


class WorkerPool:
    """``size`` threads; each retires after ``jobs_per_thread`` jobs (0: never) and is replaced.

    :meth:`abandon` writes off a job whose submitter stopped waiting: a job
    not started yet is cancelled; a running one keeps its thread until it
    returns, while a fresh worker takes that thread's place, as long as no
    more than ``max_stuck`` threads (default: 4 x size, at least 16) are
    stuck at once.  Together with each brain's circuit breaker this keeps a
    hung engine from starving the pool, without letting threads pile up.
    """

    def __init__(self, size: int, jobs_per_thread: int, name: str = "mm-worker",
                 max_stuck: int | None = None) -> None:
        self.size = max(1, size)
        self.jobs_per_thread = max(0, jobs_per_thread)
        self.max_stuck = max(16, 4 * self.size) if max_stuck is None else max(0, max_stuck)
        self.name = name
        self._q: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._serial = 0
        self.retired = 0
        self.stuck = 0
        self.abandoned_total = 0
        self.running = True
        self._threads: set[threading.Thread] = set()
        for _ in range(self.size):
            self._spawn()

    def _spawn(self) -> None:
        with self._lock:
            if not self.running:
                return  # a worker retiring during shutdown() must not leave an orphan
            self._serial += 1
            t = threading.Thread(target=self._work, name=f"{self.name}-{self._serial}",
                                 daemon=True)
            self._threads.add(t)
            t.start()  # under the lock: shutdown() never sees an unstarted thread

    def _work(self) -> None:
        done = 0
        me = threading.current_thread()
        while True:
            job = self._q.get()
            if job is None:
                break
            with job.lock:
                if job.state == CANCELLED:
                    continue
                job.state = RUNNING
                job.started = time.monotonic()
            try:
                job.result = job.fn()
            except BaseException as e:
                job.error = e
            finally:
                with job.lock:
                    job.state = DONE
                    abandoned, replaced = job.abandoned, job.replaced
                job.event.set()
                job.fn = _nothing  # drop what the call held (message, context)
            if abandoned:
                with self._lock:
                    self.stuck -= 1
                if replaced:
                    break  # another worker took this one's place
            done += 1
            if self.jobs_per_thread and done >= self.jobs_per_thread and self.running:
                with self._lock:
                    self.retired += 1
                self._spawn()
                break
        with self._lock:
            self._threads.discard(me)

    def submit(self, fn: Callable[[], Any]) -> Job:
        job = Job(fn)
        self._q.put(job)
        return job

    def abandon(self, job: Job) -> bool:
        """Stop waiting for ``job``.  False means it finished after all: use its result."""
        with job.lock:
            if job.state == DONE:
                return False
            if job.state == QUEUED:
                job.state = CANCELLED
                job.fn = _nothing
                return True
            job.abandoned = True
            with self._lock:
                self.stuck += 1
                self.abandoned_total += 1
                job.replaced = self.running and self.stuck <= self.max_stuck
                stuck = self.stuck
        if job.replaced:
            self._spawn()
        else:
            log.warning("worker pool: %d threads stuck in brains that overran; no more "
                        "replacements until some return", stuck)
        return True

    def detach(self, job: Job) -> None:
        """Nobody needs ``job``'s result any more: drop it if not started, else let it end.

        Unlike :meth:`abandon`, a running job is not written off as stuck: it
        is a healthy brain whose answer came too late to matter (an earlier
        brain already refused the message).
        """
        with job.lock:
            if job.state == QUEUED:
                job.state = CANCELLED
                job.fn = _nothing

    def shutdown(self, timeout: float = 5.0) -> None:
        with self._lock:
            self.running = False
            threads = list(self._threads)
        for _ in threads:
            self._q.put(None)
        end = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, end - time.monotonic()))

    @property
    def alive(self) -> int:
        with self._lock:
            return len(self._threads)


def _nothing() -> None:
    return None
