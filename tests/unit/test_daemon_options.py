"""The seed's threads / jobsperthread / cid_timeout options, as the daemon implements them."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import ClassVar

from miltermonkey_core import Brain, Connection, Message, Monkey, hookimpl
from miltermonkey_core.engine.build import chain_of
from miltermonkey_core.engine.session import Engine
from miltermonkey_core.server.pool import WorkerPool
from miltermonkey_core.server.registry import SessionRegistry


def test_threads_caps_concurrent_jobs() -> None:
    pool = WorkerPool(size=3, jobs_per_thread=100)
    running = 0
    peak = 0
    lock = threading.Lock()
    release = threading.Event()

    def job() -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        release.wait(5)
        with lock:
            running -= 1

    jobs = [pool.submit(job) for _ in range(10)]
    time.sleep(0.3)
    assert peak == 3  # the other seven wait their turn
    release.set()
    assert all(j.wait(5) for j in jobs)
    pool.shutdown()


def _until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.01)


def test_jobsperthread_retires_and_replaces_workers() -> None:
    pool = WorkerPool(size=2, jobs_per_thread=3)
    names: list[str] = []
    jobs = [pool.submit(lambda: names.append(threading.current_thread().name))
            for _ in range(12)]
    assert all(j.wait(5) for j in jobs)
    # 12 jobs, 3 per worker: exactly 4 workers served and retired; 2 replacements alive
    _until(lambda: pool.retired == 4 and pool.alive == 2)
    assert pool.retired == 4
    assert len(set(names)) == 4
    assert pool.alive == 2
    # thread-local state does not survive a retirement
    local = threading.local()
    seen: list[bool] = []

    def mark() -> None:
        seen.append(getattr(local, "x", False))
        local.x = True

    more = [pool.submit(mark) for _ in range(12)]
    assert all(j.wait(5) for j in more)
    assert seen.count(False) >= 4
    pool.shutdown()
    assert pool.alive == 0


def test_job_errors_are_returned_not_lost() -> None:
    pool = WorkerPool(size=1, jobs_per_thread=10)

    def boom() -> None:
        raise ValueError("x")

    job = pool.submit(boom)
    assert job.wait(5) and isinstance(job.error, ValueError)
    ok = pool.submit(lambda: 42)
    assert ok.wait(5) and ok.result == 42  # the worker survived
    pool.shutdown()


class Closer(Brain):
    closed: ClassVar[list[str]] = []
    aborted: ClassVar[list[str]] = []

    @hookimpl
    def abort(self, message: Message, monkey: Monkey) -> None:
        Closer.aborted.append(message.id)

    @hookimpl
    def close(self, connection: Connection, monkey: Monkey) -> None:
        Closer.closed.append(connection.id)


def test_cid_timeout_sweeps_idle_sessions_and_frees_message_state() -> None:
    Closer.closed, Closer.aborted = [], []
    engine = Engine(chain_of(Closer(None, Monkey(), "closer")), Monkey())
    reg = SessionRegistry(cid_timeout=600)
    idle = engine.session(Connection(id="idle"))
    busy = engine.session(Connection(id="busy"))
    for s in (idle, busy):
        reg.add(s)
        s.envfrom("<a@example.test>")
        s.body(b"x" * 10)
    idle.last_activity -= 601
    assert reg.sweep() == 1
    assert len(reg) == 1 and reg.swept == 1
    assert Closer.closed == ["idle"] and Closer.aborted == ["idle"]
    assert idle.message is None and idle.closed
    assert busy.message is not None and not busy.closed
