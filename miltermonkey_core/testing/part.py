"""The base of every part of the test mail stack, and the skip-or-fail rule for tests.

A milter is only proven when a real MTA talks to it and real engines answer
it, so the end-to-end and engine tests start the genuine Debian binaries
instead of fakes.  Every part (:class:`~miltermonkey_core.testing.postfix.Postfix`,
:class:`~miltermonkey_core.testing.sink.SmtpSink`, and the engines the brain
packages ship in their own ``testing`` modules):

* lives entirely under a state directory the caller owns (give each part its
  own), listens on loopback only and never touches the system's instances;
* is stopped by the pid it wrote (never by process name), so parallel runs and
  a developer's own daemons are safe;
* waits until its port is free again after ``stop()``, so the next test can
  bind it at once;
* raises :class:`StackError` with the tail of its log when it cannot start,
  because "timed out" alone tells nobody what went wrong.

The daemons drop root for their own users (``nobody``, ``postfix``,
``clamav``, ``debian-spamd``).  They can only do that if those users can walk
into the state directory, and pytest's temporary base directory is private
(mode 0700), so when run as root the parts add the search bit (``o+x``, never
read) to the ancestors that lack it.

Tests decide whether a missing part is a skip or a failure with
:func:`require_or_skip`: CI sets ``MILTERMONKEY_REQUIRE_STACK=1`` so that a
broken installation cannot pass as "all skipped".
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

from miltermonkey_core.testing.process import (
    POLL_INTERVAL,
    StackError,
    grant_traverse,
    is_root,
    port_in_use,
    stop_popen,
    tail,
    which,
)

__all__ = ["REQUIRE_ENV", "ChildProcessPart", "StackPart", "require_or_skip"]

REQUIRE_ENV = "MILTERMONKEY_REQUIRE_STACK"

# Strong references: a part that is still running must not be garbage
# collected (a running Popen would warn, and nobody could stop the daemon).
_RUNNING: set[StackPart] = set()


@atexit.register
def _stop_leftovers() -> None:
    # A test run that crashes between start() and stop() must not leave
    # daemons behind on the CI machine.
    for part in list(_RUNNING):
        with contextlib.suppress(Exception):
            part.stop()


class StackPart:
    """Behaviour shared by every part: availability, context manager, errors.

    Subclasses name the executables they need in :attr:`binaries`; that is
    what :meth:`available` checks, so tests can skip (or, in CI, fail) with a
    reason that names the missing package.
    """

    #: Human-readable name used in messages.
    name: ClassVar[str] = "part"
    #: Executables that must be installed.
    binaries: ClassVar[tuple[str, ...]] = ()
    #: Debian package that provides them (named in skip reasons).
    package: ClassVar[str] = ""
    #: System user the daemon switches to when started as root.
    run_as: ClassVar[str | None] = None
    #: Whether the part only works when the tests run as root.
    needs_root: ClassVar[bool] = False

    state_dir: Path
    start_timeout: float
    stop_timeout: float

    def __init__(self, state_dir: Path | str) -> None:
        self.state_dir = Path(state_dir).absolute()
        self.start_timeout = 60.0
        self.stop_timeout = 10.0

    # -- availability ------------------------------------------------------

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this part cannot run on this machine, or None if it can."""
        missing = [name for name in cls.binaries if which(name) is None]
        if missing:
            return (
                f"{cls.name}: {', '.join(missing)} not installed"
                f" (Debian package {cls.package}; see .ci/install-system.sh)"
            )
        if cls.needs_root and not is_root():
            return f"{cls.name}: needs root (tests run as uid {os.geteuid()})"
        if cls.run_as is not None and is_root():
            try:
                pwd.getpwnam(cls.run_as)
            except KeyError:
                return f"{cls.name}: system user {cls.run_as!r} does not exist"
        return None

    @classmethod
    def available(cls) -> bool:
        """True when the executables are installed and the part can run here."""
        return cls.unavailable_reason() is None

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Start the part and return once it serves requests."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop the part; safe to call when it is not running."""
        raise NotImplementedError

    def is_running(self) -> bool:
        """True while the part's main process is alive (zombies count as dead)."""
        raise NotImplementedError

    @property
    def log_path(self) -> Path:
        """The file the part logs to; its tail ends up in :class:`StackError`."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.state_dir} running={self.is_running()}>"

    # -- helpers for subclasses --------------------------------------------

    def _error(self, message: str, log: Path | None = None) -> StackError:
        log = log or self.log_path
        return StackError(
            f"{self.name} ({self.state_dir}): {message}\n--- last lines of {log} ---\n{tail(log)}"
        )

    def _prepare_state_dir(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self.run_as is not None:
            grant_traverse(self.state_dir, self.run_as)

    def _check_port_free(self, port: int) -> None:
        if port_in_use(port):
            raise StackError(f"{self.name}: 127.0.0.1:{port} is already in use")

    def _track(self) -> None:
        """Hold on to a part whose daemon now runs, so that exit stops it (see above)."""
        _RUNNING.add(self)

    def _untrack(self) -> None:
        """Forget a part whose daemon is gone."""
        _RUNNING.discard(self)


class ChildProcessPart(StackPart):
    """A part that runs in the foreground as our own child process.

    Being its parent means we reap it ourselves: no pid file races and no
    zombies waiting for init.
    """

    _proc: subprocess.Popen[bytes] | None

    def __init__(self, state_dir: Path | str) -> None:
        super().__init__(state_dir)
        self._proc = None

    @property
    def pid(self) -> int | None:
        """Pid of the running process, or None."""
        return self._proc.pid if self._proc is not None and self.is_running() else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _spawn(self, cmd: Sequence[str], output: Path, cwd: Path | None = None) -> None:
        with output.open("ab") as out:
            self._proc = subprocess.Popen(
                list(cmd),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                close_fds=True,
                # Its own session: a Ctrl-C meant for pytest must not kill the
                # daemon before the fixtures' stop() runs.
                start_new_session=True,
            )
        self._track()

    def _reap(self, sig: signal.Signals = signal.SIGTERM) -> None:
        proc = self._proc
        if proc is None:
            return
        stop_popen(proc, self.stop_timeout, sig, kill_timeout=None)
        self._proc = None
        self._untrack()

    def _wait_ready(self, ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.start_timeout
        while not ready():
            proc = self._proc
            if proc is None or proc.poll() is not None:
                status = None if proc is None else proc.returncode
                self._reap()
                raise self._error(f"exited during startup (status {status})")
            if time.monotonic() > deadline:
                self._reap()
                raise self._error(f"not ready after {self.start_timeout:g}s")
            time.sleep(POLL_INTERVAL)


def require_or_skip(part_cls: type[StackPart]) -> None:
    """Skip the calling test when *part_cls* cannot run here, or fail it in CI.

    With ``MILTERMONKEY_REQUIRE_STACK=1`` a missing part is an error: CI
    installs everything, so a skip there would hide a broken installation.
    """
    reason = part_cls.unavailable_reason()
    if reason is None:
        return
    import pytest  # noqa: PLC0415 - optional: benchmarks run without pytest

    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1 requires it)", pytrace=False)
    pytest.skip(reason)
