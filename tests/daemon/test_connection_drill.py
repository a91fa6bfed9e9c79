"""The connection drill (issue 13.3, ``nox -s long``): a flood of stalled clients while MTAs work.

The daemon runs with its open-file limit pinned at 1,024 (soft and hard, so
it cannot raise it).  At once, 1,100 connections open and say nothing and
1,000 send three bytes of a length prefix and stop; in the burst variant
they are opened once, in the sustained one every connection the daemon
closes is opened again until the drill ends.  Meanwhile legitimate MTA
sessions (a connection, a negotiation, one message each, 200 over the
drill, from a process of their own) must keep being served.  Measured:
their latency (p50/p99) and failures, the worker's threads, RSS and open
descriptors (sampled from /proc), the listener's log lines (evictions,
refusals, timeouts), and that once the flood stops every stalled connection
left is closed by its timeout.

Run with short timeouts (``negotiate_timeout`` 5 s) and with the defaults.
The figures are printed (``nox -s long`` runs pytest with ``-s``), written to
``MILTERMONKEY_DRILL_REPORT`` when set, and recorded in docs/operations.md
(connection limits).
The previous release (libmilter) ran one thread per stalled connection
(1,021 for 1,000), timed every legitimate session out with the limit at
1,024, and logged nothing.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import queue
import resource
import select
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from reliability_support import LONG, children_of, message

from miltermonkey_core.testing.client import run_session
from miltermonkey_core.testing.daemon import render_config
from miltermonkey_core.testing.process import free_port

pytestmark = pytest.mark.skipif(not LONG, reason="the connection drill runs in nox -s long")

OPEN_FILES = 1024
IDLE = 1100
PARTIAL = 1000
LEGIT = 200


def start_limited(cmd: Sequence[str], cwd: Path | str, workdir: Path,
                  daemon: Mapping[str, Any], brains: Sequence[Mapping[str, Any]]
                  ) -> tuple[subprocess.Popen[bytes], tuple[str, int], Path]:
    """A daemon (``cmd`` + ``-c CONFIG``) with RLIMIT_NOFILE at OPEN_FILES, on a free port."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = workdir / "monkey.log"
    config = workdir / "monkey.toml"
    config.write_text(render_config({"connection": f"inet:{port}@127.0.0.1",
                                     "log_target": str(log), "debug_level": 20,
                                     "milter_key": False, "pidfile": str(workdir / "m.pid"),
                                     **daemon}, brains))

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES, OPEN_FILES))

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with (workdir / "monkey.out").open("wb") as out:
        proc = subprocess.Popen([*cmd, "-c", str(config)], cwd=cwd, stdout=out,
                                stderr=subprocess.STDOUT, env=env, preexec_fn=limit)  # noqa: PLW1509 - only setrlimit, before exec
    address = ("127.0.0.1", port)
    end = time.monotonic() + 30
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError((workdir / "monkey.out").read_text(errors="replace"))
        try:
            socket.create_connection(address, timeout=0.5).close()
        except OSError:
            time.sleep(0.1)
            continue
        time.sleep(1.0)  # the worker builds its brains after binding
        return proc, address, log
    proc.kill()
    raise AssertionError(f"the daemon did not listen:\n{log.read_text(errors='replace')}")


def serving_pid(supervisor: int) -> int:
    """The process holding the connections: the supervisor's worker, if it has one."""
    end = time.monotonic() + 10
    while time.monotonic() < end:
        kids = children_of(supervisor)
        if kids:
            return kids[0]
        time.sleep(0.1)
    return supervisor


class Sampler(threading.Thread):
    """Threads, RSS and open descriptors of one process, every 0.2 s."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[tuple[int, int, int]] = []
        self.stop = threading.Event()

    def sample(self) -> tuple[int, int, int] | None:
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
            fds = len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            return None
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        return int(fields["Threads"]), int(fields["VmRSS"].split()[0]), fds

    def run(self) -> None:
        while not self.stop.wait(0.2):
            got = self.sample()
            if got:
                self.samples.append(got)

    def peak(self) -> dict[str, int]:
        if not self.samples:
            return {}
        return {"threads": max(s[0] for s in self.samples),
                "rss_kib": max(s[1] for s in self.samples),
                "fds": max(s[2] for s in self.samples)}


class Flood:
    """IDLE + PARTIAL stalled connections opened at once; with ``sustain``, each one the
    daemon closes is opened again until the legitimate sessions are done."""

    def __init__(self, address: tuple[str, int], sustain: bool, openers: int = 8) -> None:
        self.address = address
        self.reopen = sustain
        self.poll = select.epoll()
        self.lock = threading.Lock()
        self.open: dict[int, tuple[socket.socket, str, float]] = {}
        self.todo: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.sustain = threading.Event()
        self.sustain.set()
        self.done = threading.Event()
        self.opened = 0
        self.connect_failures = 0
        self.closed_ages: dict[str, list[float]] = {"idle": [], "partial": []}
        self.last_closed: list[tuple[str, float]] = []
        self.threads = [threading.Thread(target=self._opener, daemon=True)
                        for _ in range(openers)]
        self.threads.append(threading.Thread(target=self._watch, daemon=True))

    def start(self) -> None:
        for _ in range(IDLE):
            self.todo.put("idle")
        for _ in range(PARTIAL):
            self.todo.put("partial")
        for t in self.threads:
            t.start()

    def _opener(self) -> None:
        while not self.done.is_set():
            try:
                kind = self.todo.get(timeout=0.1)
            except queue.Empty:
                continue
            if not self.sustain.is_set():
                continue
            try:
                s = socket.create_connection(self.address, timeout=5)
                if kind == "partial":
                    s.sendall(b"\0\0\0")
            except OSError:
                with self.lock:
                    self.connect_failures += 1
                self.todo.put(kind)
                time.sleep(0.05)
                continue
            s.setblocking(False)
            with self.lock:
                self.opened += 1
                self.open[s.fileno()] = (s, kind, time.monotonic())
                self.poll.register(s.fileno(), select.EPOLLIN | select.EPOLLRDHUP)

    def _watch(self) -> None:
        while not self.done.is_set():
            for fd, _ in self.poll.poll(0.1):
                with self.lock:
                    entry = self.open.pop(fd, None)
                    if entry is None:
                        continue
                    self.poll.unregister(fd)
                s, kind, opened = entry
                with contextlib.suppress(OSError):
                    s.recv(64)
                s.close()
                now = time.monotonic()
                self.closed_ages[kind].append(now - opened)
                if not self.sustain.is_set():
                    self.last_closed.append((kind, now - opened))
                if self.reopen:
                    self.todo.put(kind)

    def still_open(self) -> int:
        with self.lock:
            return len(self.open)

    def stop(self) -> None:
        self.done.set()
        for t in self.threads:
            t.join(5)
        with self.lock:
            for s, _, _ in self.open.values():
                s.close()
            self.open.clear()
        self.poll.close()


def legit_sessions(address: tuple[str, int], count: int, seconds: float,
                   timeout: float = 10.0) -> tuple[list[float], list[str]]:
    """``count`` MTA sessions spread over ``seconds``; their latencies and failures."""
    latencies: list[float] = []
    failures: list[str] = []
    start = time.monotonic()

    def one(i: int) -> None:
        delay = start + i * seconds / count - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        t = time.monotonic()
        try:
            result = run_session(address, [(message(f"legit {i}"), "<a@example.test>",
                                             ["<b@example.test>"])], timeout=timeout)[0]
        except Exception as e:
            failures.append(f"{type(e).__name__}: {e}"[:120])
            return
        if result.accepted:
            latencies.append(time.monotonic() - t)
        else:
            failures.append(f"not accepted: {result.disposition}")

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(count)))
    return latencies, failures


def legit_elsewhere(address: tuple[str, int], count: int, seconds: float
                    ) -> tuple[list[float], list[str]]:
    """:func:`legit_sessions` in a process of its own, as MTAs are: the flood's client
    threads must not delay an MTA's OPTNEG by holding this process's GIL."""
    code = ("import json, sys; from test_connection_drill import legit_sessions; "
            f"print(json.dumps(legit_sessions({address!r}, {count}, {seconds})))")
    here = Path(__file__).parent
    path = os.pathsep.join([str(here), str(here.parent / "support"),
                            os.environ.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", code], cwd=here,
                         env={**os.environ, "PYTHONPATH": path},
                         capture_output=True, text=True, timeout=seconds + count * 12,
                         check=True).stdout
    latencies, failures = json.loads(out.splitlines()[-1])
    return latencies, failures


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


LOG_KINDS = {
    "evicted (rate-limited lines)": "have not negotiated; closing the oldest",
    "refused over the cap (rate-limited lines)": "refused:",
    "out of file descriptors (rate-limited lines)": "out of file descriptors",
    "closed silent before negotiating": "between commands (before negotiating)",
    "closed inside a packet before negotiating": "still incomplete after",
}


def drill(address: tuple[str, int], pid: int, log: Path, *, sustain: bool,
          seconds: float = 20.0, close_within: float = 40.0) -> dict[str, Any]:
    """Flood for ``seconds`` with LEGIT sessions spread over it, then let the stalled go."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < IDLE + PARTIAL + 500:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    log_start = log.stat().st_size if log.exists() else 0
    sampler = Sampler(pid)
    sampler.start()
    flood = Flood(address, sustain)
    started = time.monotonic()
    flood.start()
    latencies, failures = legit_elsewhere(address, LEGIT, seconds)
    flood.sustain.clear()
    flood_seconds = time.monotonic() - started
    open_at_stop = flood.still_open()
    end = time.monotonic() + close_within
    while flood.still_open() and time.monotonic() < end:
        time.sleep(0.2)
    left_open = flood.still_open()
    flood.stop()
    sampler.stop.set()
    sampler.join()
    text = log.read_text(errors="replace")[log_start:] if log.exists() else ""
    lines = text.splitlines()
    ages = [a for _, a in flood.last_closed]
    return {
        "flood": "sustained (reopened when closed)" if sustain else "burst (opened once)",
        "flood_seconds": round(flood_seconds, 1),
        "stalled_connections_opened": flood.opened,
        "connect_failures": flood.connect_failures,
        "legit_sessions": LEGIT,
        "legit_served": len(latencies),
        "legit_failures": len(failures),
        "legit_failure_kinds": sorted(set(failures))[:5],
        "legit_p50_ms": round(percentile(latencies, 0.50) * 1000, 1),
        "legit_p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
        "legit_max_ms": round(max(latencies, default=float("nan")) * 1000, 1),
        "peak": sampler.peak(),
        "after": dict(zip(("threads", "rss_kib", "fds"), sampler.sample() or (), strict=False)),
        "stalled_open_when_flood_stopped": open_at_stop,
        "stalled_left_open_after_wait": left_open,
        "closed_after_stop_age_s": ({"min": round(min(ages), 1), "median": round(
            statistics.median(ages), 1), "max": round(max(ages), 1)} if ages else {}),
        "log_lines": {k: sum(needle in line for line in lines) for k, needle in LOG_KINDS.items()},
        "log_samples": {k: next((line[24:200] for line in lines if needle in line), "")
                        for k, needle in LOG_KINDS.items()},
        "log_lines_total": len(lines),
    }


def report(name: str, figures: Mapping[str, Any]) -> None:
    print(f"\n== connection drill: {name}\n{json.dumps(figures, indent=1)}")
    target = os.environ.get("MILTERMONKEY_DRILL_REPORT")
    if target:
        path = Path(target)
        old = json.loads(path.read_text()) if path.exists() else {}
        old[name] = figures
        path.write_text(json.dumps(old, indent=1))


BRAINS = [{"use": "trivial"}]
DAEMON = [sys.executable, "-m", "miltermonkey_core", "run"]


def check(figures: Mapping[str, Any], timeout: float, p99_ms: float) -> None:
    # An MTA connection that has not sent its OPTNEG yet looks like the flood;
    # with thousands of connections a second it may be the oldest silent one
    # when room is made (about 1 in 800 in the recorded runs): the MTA's
    # default action (tempfail) applies and the SMTP client retries.
    assert figures["legit_failures"] <= LEGIT // 100, figures
    assert figures["legit_p99_ms"] < p99_ms, figures
    assert figures["peak"]["threads"] < 500, figures  # never one per stalled connection
    assert figures["peak"]["rss_kib"] < 300 * 1024, figures
    assert figures["peak"]["fds"] < OPEN_FILES, figures
    evictions = figures["log_lines"]["evicted (rate-limited lines)"]
    assert 1 <= evictions <= figures["flood_seconds"] / 10 + 2, figures
    assert figures["stalled_left_open_after_wait"] == 0, figures
    if figures["closed_after_stop_age_s"]:
        assert figures["closed_after_stop_age_s"]["max"] < timeout + 3, figures


@pytest.mark.parametrize("sustain", [False, True], ids=["burst", "sustained"])
@pytest.mark.parametrize("timeout", [5, 30], ids=["negotiate_timeout 5 s", "defaults"])
def test_connection_drill(tmp_path: Path, sustain: bool, timeout: int) -> None:
    options = {"negotiate_timeout": timeout, "command_timeout": timeout} if timeout != 30 else {}
    proc, address, log = start_limited(DAEMON, tmp_path, tmp_path / "m", options, BRAINS)
    try:
        assert f"max_connections={OPEN_FILES - 64 - 4 * 20}" in log.read_text()
        figures = drill(address, serving_pid(proc.pid), log, sustain=sustain,
                        close_within=timeout + 10)
    finally:
        proc.terminate()
        proc.wait(30)
    report(f"{figures['flood']}, negotiate_timeout {timeout} s", figures)
    # a sustained flood overflows the listen queue now and then: a dropped SYN is
    # retried by the kernel after 1 s (3 s the second time)
    check(figures, timeout, 3500 if sustain else 2000)
