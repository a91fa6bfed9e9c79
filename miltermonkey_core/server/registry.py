"""Live sessions: freed when idle past ``cid_timeout``, counted when draining."""

from __future__ import annotations

import logging
import threading
import time

from miltermonkey_core.engine.session import Session
from miltermonkey_core.logs import ROOT, queue_id

log = logging.getLogger(f"{ROOT}.daemon")



class SessionRegistry:
    """Live sessions: freed when idle past cid_timeout, counted when draining at shutdown."""

    def __init__(self, cid_timeout: float) -> None:
        self.cid_timeout = cid_timeout
        self._sessions: dict[int, Session] = {}
        self._lock = threading.Lock()
        self.swept = 0

    def add(self, s: Session) -> None:
        with self._lock:
            self._sessions[id(s)] = s

    def remove(self, s: Session) -> None:
        with self._lock:
            self._sessions.pop(id(s), None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def snapshot(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())

    def in_flight(self) -> int:
        """Sessions with a message in progress (between MAIL FROM and EOM or ABORT)."""
        return sum(1 for s in self.snapshot() if s.in_message)

    def sweep(self, now: float | None = None) -> int:
        """Free sessions idle past cid_timeout (the connection's idle timeout closes its socket)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            stale = [s for s in self._sessions.values()
                     if now - s.last_activity > self.cid_timeout]
            for s in stale:
                self._sessions.pop(id(s), None)
        for s in stale:
            with queue_id(s.qid):
                log.warning("%s: freeing state of session %s idle for %.0f s (cid_timeout %g)",
                            s.qid, s.connection.id, now - s.last_activity, self.cid_timeout)
            try:
                s.close()
            except Exception:
                log.exception("error freeing session %s", s.connection.id)
        self.swept += len(stale)
        return len(stale)
