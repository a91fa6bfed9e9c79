"""Per-brain circuit breakers: stop waiting on an engine that keeps failing.

After ``failures`` errors or timeouts within ``window`` seconds the breaker
opens, and for ``cooldown`` seconds the brain is not called at all: its
policy applies at once instead of every message waiting on a dead engine.
Then one message probes the brain; success closes the breaker, failure opens
it again.  The numbers come from the brain's ``[[brain]]`` table; the
defaults are there, in one place.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable


class CircuitBreaker:
    """Counts a brain's failures; open means "do not call it, apply the policy now".

    ``failures = 0`` disables it.  Thread-safe: all messages of the daemon
    share one breaker per configured brain.
    """

    def __init__(
        self,
        failures: int,
        window: float,
        cooldown: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failures = max(0, failures)
        self.window = window
        self.cooldown = cooldown
        self.clock = clock
        self.last_kind = "error"
        self.opened = 0  # how many times it opened, for logs and tests
        self._times: collections.deque[float] = collections.deque()
        self._opened_at: float | None = None
        self._probing = False
        self._lock = threading.Lock()

    @classmethod
    def disabled(cls) -> CircuitBreaker:
        """A breaker that never opens (brains run without a config, as in unit tests)."""
        return cls(0, 1.0, 0.0)

    @property
    def enabled(self) -> bool:
        return self.failures > 0

    @property
    def state(self) -> str:
        with self._lock:
            if self._opened_at is None:
                return "closed"
            if self.clock() - self._opened_at < self.cooldown:
                return "open"
            return "half-open"

    def allow(self) -> bool:
        """May the brain be called?  In half-open state only one caller probes."""
        if not self.enabled:
            return True
        with self._lock:
            if self._opened_at is None:
                return True
            if self.clock() - self._opened_at < self.cooldown or self._probing:
                return False
            self._probing = True
            return True

    def success(self) -> bool:
        """Record a good call; returns True when this closed an open breaker.

        Successes do not erase failures while closed: N failures within the
        window open it even if good calls came in between (a half-dead
        engine is still mostly dead for the mail that meets it).
        """
        if not self.enabled:
            return False
        with self._lock:
            if self._opened_at is None:
                return False
            self._times.clear()
            self._opened_at = None
            self._probing = False
            return True

    def failure(self, kind: str) -> bool:
        """Record an error or timeout; returns True when this opened the breaker."""
        if not self.enabled:
            return False
        now = self.clock()
        with self._lock:
            self.last_kind = kind
            if self._opened_at is not None:
                if self._probing:  # the probe failed: another cool-down
                    self._probing = False
                    self._opened_at = now
                    self.opened += 1
                    return True
                return False
            self._times.append(now)
            while self._times and now - self._times[0] > self.window:
                self._times.popleft()
            if len(self._times) >= self.failures:
                self._times.clear()
                self._opened_at = now
                self.opened += 1
                return True
            return False

    def abort_probe(self) -> None:
        """A probe that never ran (no time left): let another message probe."""
        with self._lock:
            self._probing = False
