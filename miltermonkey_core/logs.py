"""Logging set-up: syslog or stderr, every line tagged with the queue id.

The queue id lives in a context variable set by whoever is working on a
message, so a brain's ``monkey.log.info(...)`` lines carry it without the
brain passing it around.  ``debug_level`` keeps the seed's meaning: a
message of level N (0-99) is logged when N <= debug_level; less is more.
"""

from __future__ import annotations

import contextvars
import logging
import logging.handlers
import os
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager

_queue_id: contextvars.ContextVar[str] = contextvars.ContextVar("mm_queue_id", default="-")

ROOT = "miltermonkey"


@contextmanager
def queue_id(qid: str) -> Iterator[None]:
    """Tag every log line written inside the block with ``qid``."""
    token = _queue_id.set(qid)
    try:
        yield
    finally:
        _queue_id.reset(token)


def current_queue_id() -> str:
    return _queue_id.get()


class _QueueIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "queue_id"):
            record.queue_id = _queue_id.get()
        return True


def _has_syslog() -> bool:
    try:
        return stat.S_ISSOCK(os.stat("/dev/log").st_mode)
    except OSError:
        return False


def setup_logging(
    *,
    target: str = "auto",
    debug_level: int = 10,
    debug_mode: bool = False,
    name: str = "MilterMonkey",
) -> None:
    """Configure the ``miltermonkey`` logger tree for the daemon."""
    root = logging.getLogger(ROOT)
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    root.setLevel(logging.DEBUG if debug_level >= 50 else logging.INFO)
    root.propagate = False
    handlers: list[logging.Handler] = []
    ident = name.replace(" ", "")
    if target == "syslog" or (target == "auto" and _has_syslog()):
        sh = logging.handlers.SysLogHandler(
            address="/dev/log", facility=logging.handlers.SysLogHandler.LOG_MAIL
        )
        sh.setFormatter(logging.Formatter(f"{ident}[%(process)d]: %(message)s"))
        handlers.append(sh)
    elif target not in ("auto", "stderr", "syslog"):
        fh = logging.FileHandler(target)
        fh.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
        handlers.append(fh)
    if debug_mode or target == "stderr" or (target == "auto" and not handlers):
        eh = logging.StreamHandler(sys.stderr)
        eh.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
        handlers.append(eh)
    for h in handlers:
        h.addFilter(_QueueIdFilter())
        root.addHandler(h)


class LevelLogger:
    """A logger that also speaks the seed's numbered debug levels."""

    def __init__(self, name: str, debug_level: int) -> None:
        self.logger = logging.getLogger(name)
        self.debug_level = debug_level

    @staticmethod
    def _tag(msg: str) -> str:
        """Prefix the queue id of the message being worked on, as every core line has."""
        qid = _queue_id.get()
        return msg if qid == "-" else f"{qid}: {msg}"

    def __call__(self, level: int, msg: str, *args: object) -> None:
        """Log ``msg`` if ``level`` (0-99) is at or under the configured debug_level."""
        if level <= self.debug_level:
            self.logger.log(logging.DEBUG if level >= 50 else logging.INFO, self._tag(msg), *args)

    def enabled(self, level: int) -> bool:
        return level <= self.debug_level

    def info(self, msg: str, *args: object) -> None:
        self.logger.info(self._tag(msg), *args)

    def warning(self, msg: str, *args: object) -> None:
        self.logger.warning(self._tag(msg), *args)

    def error(self, msg: str, *args: object) -> None:
        self.logger.error(self._tag(msg), *args)

    def exception(self, msg: str, *args: object) -> None:
        self.logger.exception(self._tag(msg), *args)
