"""CPU time and memory of process trees, read from /proc.

A milter is often more than one process: spamass-milter forks a ``spamc``
per message, MIMEDefang runs a multiplexor and Perl workers, a daemonized
peer re-parents itself.  :class:`Meter` follows every process below a set of
root pids and sums

* CPU: ``utime + stime`` of each live process plus ``cutime + cstime`` (the
  time of children it has already reaped).  When a child exits and its parent
  reaps it, the child's time moves into the parent's ``cutime``, so the sum
  over the live tree only ever grows and a delta between two readings is the
  CPU the tree used in between, short-lived children included.
* memory: ``VmHWM`` (peak RSS) of each process.  :meth:`Meter.reset_peak`
  writes ``5`` to ``/proc/PID/clear_refs``, which resets the peak to the
  current RSS (Linux >= 4.0, needs root or the same user), so a peak belongs
  to one measurement window.  Children that came and went between readings
  are caught by :class:`Sampler`, which sums ``VmRSS`` over the tree every
  few hundred milliseconds; the larger of the two is reported.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (field 3 = index 0)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def parent_map() -> dict[int, int]:
    """pid -> ppid for every process on the box."""
    out: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None and len(fields) > 1:
            out[int(entry.name)] = int(fields[1])
    return out


def descendants(roots: Iterable[int], parents: dict[int, int] | None = None) -> set[int]:
    """The roots that exist plus every process below them."""
    parents = parent_map() if parents is None else parents
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = [r for r in roots if r in parents]
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.add(pid)
        todo.extend(children.get(pid, ()))
    return found


def worker_pid(root: int, timeout: float = 10.0) -> int:
    """The process that does the work: ``root``'s child if it has one, else ``root``.

    ``miltermonkey run`` is a supervisor that runs the worker as its child: the
    process that speaks the milter protocol to the MTA and runs the brains
    (MILTERMONKEY_NO_SUPERVISOR=1 makes it one process); profilers and fd
    watchers want the child.  Waits up to ``timeout`` s for the child to appear.
    """
    end = time.monotonic() + timeout
    while True:
        children = sorted(p for p in descendants([root]) if p != root)
        if children:
            return children[0]
        if time.monotonic() > end:
            return root
        time.sleep(0.05)


def cpu_seconds(pid: int) -> float:
    """utime + stime + cutime + cstime of one process, in seconds (0 if gone)."""
    fields = _stat_fields(pid)
    if fields is None or len(fields) < 15:
        return 0.0
    # stat fields 14-17 (utime stime cutime cstime) are indexes 11-14 here.
    return sum(int(x) for x in fields[11:15]) / TICK


def _status_kib(pid: int, key: str) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text(encoding="ascii", errors="replace")
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0  # zombies and kernel threads have no Vm* lines


def rss_kib(pid: int) -> int:
    return _status_kib(pid, "VmRSS:")


def hwm_kib(pid: int) -> int:
    return _status_kib(pid, "VmHWM:")


def reset_hwm(pid: int) -> None:
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5", encoding="ascii")


def box_busy_seconds() -> tuple[float, float]:
    """(busy CPU seconds, total CPU seconds) of the whole machine since boot, from /proc/stat."""
    line = Path("/proc/stat").read_text(encoding="ascii").splitlines()[0].split()
    vals = [int(x) for x in line[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    # guest time is already included in user/nice
    total = sum(vals[:8])
    return (total - idle) / TICK, total / TICK


class Meter:
    """CPU and memory of the trees below ``roots()`` (re-evaluated on each reading).

    ``roots`` is a callable because some daemons only have a pid once they
    have started, and a restarted one gets a new pid.
    """

    def __init__(self, name: str, roots: Callable[[], Iterable[int]]) -> None:
        self.name = name
        self._roots = roots
        self._cpu0 = 0.0
        self.sampled_peak_kib = 0
        self.samples = 0

    def pids(self, parents: dict[int, int] | None = None) -> set[int]:
        roots = [p for p in self._roots() if p]
        return descendants(roots, parents) if roots else set()

    def cpu(self, parents: dict[int, int] | None = None) -> float:
        return sum(cpu_seconds(p) for p in self.pids(parents))

    def rss(self, parents: dict[int, int] | None = None) -> int:
        return sum(rss_kib(p) for p in self.pids(parents))

    def hwm(self) -> int:
        return sum(hwm_kib(p) for p in self.pids())

    def start(self) -> None:
        """Begin a window: remember the CPU so far and reset every peak RSS."""
        for p in self.pids():
            reset_hwm(p)
        self._cpu0 = self.cpu()
        self.sampled_peak_kib = self.rss()
        self.samples = 0

    def cpu_since_start(self) -> float:
        return max(0.0, self.cpu() - self._cpu0)

    def peak_kib(self) -> int:
        """Peak RSS in the window: the larger of sum(VmHWM) now and the sampled sum(VmRSS)."""
        return max(self.hwm(), self.sampled_peak_kib)

    def sample(self, parents: dict[int, int]) -> None:
        self.samples += 1
        self.sampled_peak_kib = max(self.sampled_peak_kib, self.rss(parents))


class Sampler:
    """A background thread that samples the RSS of some meters every ``interval`` seconds."""

    def __init__(self, meters: Iterable[Meter], interval: float = 0.25) -> None:
        self.meters = [m for m in meters if m is not None]
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            parents = parent_map()
            for m in self.meters:
                m.sample(parents)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
