"""Logging set-up: syslog or stderr, every line tagged with the queue id.

The queue id lives in a context variable set by whoever is working on a
message, so a brain's ``monkey.log.info(...)`` lines carry it without the
brain passing it around.  ``debug_level`` keeps the seed's meaning: a
message of level N (0-99) is logged when N <= debug_level; less is more.

``log_format = "json"`` writes every line as one JSON object, for log
pipelines that index fields instead of grepping text.  The line that ends a
message (accepted, refused, or left to the MTA) then carries the message's
whole outcome as fields (:class:`MessageOutcome`): queue id, client, sender,
recipient count, size, each brain's result and time, the verdict, the edit
count and what became of a milter key.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import logging.handlers
import os
import stat
import sys
import time
from types import TracebackType
from typing import Any

_queue_id: contextvars.ContextVar[str] = contextvars.ContextVar("mm_queue_id", default="-")

ROOT = "miltermonkey"

#: ``debug_level`` from which the daemon writes one line per accepted
#: message (the default, 10, does).  Under it only refusals, warnings and
#: errors are written: for very busy hosts that keep the MTA's own log.
SUMMARY_LEVEL = 5


class queue_id:
    """Tag every log line written inside the block with ``qid``.

    A class rather than a ``@contextmanager`` generator: it wraps every
    milter callback, and a generator costs several times more per use.
    """

    __slots__ = ("_qid", "_token")

    def __init__(self, qid: str) -> None:
        self._qid = qid

    def __enter__(self) -> None:
        self._token = _queue_id.set(self._qid)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        _queue_id.reset(self._token)


def current_queue_id() -> str:
    return _queue_id.get()


class _QueueIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "queue_id"):
            record.queue_id = _queue_id.get()
        return True


class _Formatter(logging.Formatter):
    """The daemon's line format, with the date formatted once per second.

    The daemon writes a line per message; ``time.strftime`` on every line
    was a visible part of the per-message cost under load.
    """

    _second = -1
    _stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            self._second = second
        return f"{self._stamp},{int(record.msecs):03d}"


LINE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_pid = os.getpid()


def _refresh_pid() -> None:
    global _pid  # noqa: PLW0603 - one value per process, renewed in a forked child
    _pid = os.getpid()


os.register_at_fork(after_in_child=_refresh_pid)


class _SyslogFormatter(logging.Formatter):
    """``ident[pid]: message``, with the pid kept per process.

    The logging module would otherwise ask the kernel for the pid on every
    record (``os.getpid`` is a system call), once per message at least.
    """

    def __init__(self, ident: str) -> None:
        super().__init__("%(message)s")
        self._ident = ident

    def format(self, record: logging.LogRecord) -> str:
        return f"{self._ident}[{_pid}]: {super().format(record)}"


def _lean_records() -> None:
    """Stop the logging module collecting what no daemon format prints.

    The logging HOWTO's "Optimization" section names these switches: the
    caller's file and line (a stack walk per record), the thread and the
    multiprocessing names, and the process id (the syslog format keeps its
    own, see :class:`_SyslogFormatter`).
    """
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging.logProcesses = False


#: ``LogRecord`` attribute carrying a :class:`MessageOutcome` (``extra=`` of the line).
OUTCOME_ATTR = "mm_outcome"


class MessageOutcome:
    """One message's outcome as log fields, worked out only when a JSON line is written.

    Built by the milter connection for the line that ends a message; in
    the default text format nothing reads it, so a busy daemon pays for one
    small object per message and no more.  It reads the engine's session
    and decision by their attributes (this module sits below the engine).
    """

    __slots__ = ("_decision", "_session", "_verdict")

    def __init__(self, session: Any, decision: Any, verdict: str) -> None:
        self._session = session
        self._decision = decision
        self._verdict = verdict

    def extra(self) -> dict[str, Any]:
        """What to pass as a log call's ``extra=``."""
        return {OUTCOME_ATTR: self}

    def fields(self) -> dict[str, Any]:
        decision, session = self._decision, self._session
        message = session.message
        connection = session.connection
        verdict = decision.verdict
        out: dict[str, Any] = {
            "event": "message",
            "queue_id": session.qid,
            "client_address": connection.address or None,
            "client_name": connection.hostname or None,
            "sender": None, "recipients": 0, "size": 0,
            "verdict": self._verdict,
            "by": None if self._verdict == "accept" else getattr(verdict, "brain", None),
            "reply": str(verdict.reply) if verdict is not None and verdict.reply else None,
            "reason": None if self._verdict == "accept" else getattr(verdict, "reason", None)
            or None,
            "ms": round(decision.seconds * 1000, 3),
            "edits": len(decision.ctx.edits),
            "quarantined": decision.ctx.quarantine_request is not None,
            "brains": [{"brain": r.brain, "outcome": r.outcome, "action": r.action.value,
                        "ms": round(r.seconds * 1000, 3), **({"detail": r.detail}
                                                               if r.detail else {})}
                       for r in decision.results],
            "key": key_outcome(decision.key),
        }
        if message is not None:
            sender = message.envelope.sender
            out["sender"] = sender.bare if sender is not None else None
            out["recipients"] = len(message.envelope.recipients)
            out["size"] = message.body.size
        return out


def key_outcome(inspection: Any) -> dict[str, Any]:
    """What the milter key check found: ``none``, ``trusted`` and/or ``stripped`` keys."""
    if inspection is None or not inspection.checks:
        return {"result": "none"}
    trusted = inspection.trusted
    stripped = [{"header": h, "index": i, "reason": reason}
                for h, i, reason in inspection.rejected]
    out: dict[str, Any] = {"result": "trusted" if trusted is not None else "untrusted"}
    if trusted is not None:
        out["issuer"] = trusted.host
        out["key_id"] = trusted.key_id
        out["spared"] = sorted(inspection.spared)
    if stripped:
        out["stripped"] = stripped
    return out


class _JsonFormatter(logging.Formatter):
    """One JSON object a line; ``ident`` prefixes ``ident[pid]: `` for syslog."""

    def __init__(self, ident: str | None = None) -> None:
        super().__init__()
        self._ident = ident

    def format(self, record: logging.LogRecord) -> str:
        qid = getattr(record, "queue_id", "-")
        obj: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created).astimezone().isoformat(
                timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if qid != "-":
            obj["queue_id"] = qid
        outcome = getattr(record, OUTCOME_ATTR, None)
        if isinstance(outcome, MessageOutcome):
            try:
                obj.update(outcome.fields())
            except Exception as e:  # never lose the line over its fields
                obj["fields_error"] = f"{type(e).__name__}: {e}"
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        line = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), default=str)
        return f"{self._ident}[{_pid}]: {line}" if self._ident else line


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
    log_format: str = "text",
) -> None:
    """Configure the ``miltermonkey`` logger tree for the daemon."""
    json_lines = log_format == "json"
    _lean_records()
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
        sh.setFormatter(_JsonFormatter(ident) if json_lines else _SyslogFormatter(ident))
        handlers.append(sh)
    elif target not in ("auto", "stderr", "syslog"):
        fh = logging.FileHandler(target)
        fh.setFormatter(_JsonFormatter() if json_lines else _Formatter(LINE_FORMAT))
        handlers.append(fh)
    if debug_mode or target == "stderr" or (target == "auto" and not handlers):
        eh = logging.StreamHandler(sys.stderr)
        eh.setFormatter(_JsonFormatter() if json_lines else _Formatter(LINE_FORMAT))
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
