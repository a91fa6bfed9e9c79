"""Configuration generations: a reload changes the brains without dropping a session.

A reload activates a new generation for new MTA connections; sessions
already open finish on the generation they negotiated with, and the old
brains are closed when its last session ends.
"""

from __future__ import annotations

import itertools
import logging
import threading

from miltermonkey_core.config.schema import Config, DaemonConfig
from miltermonkey_core.engine.session import Engine
from miltermonkey_core.logs import ROOT
from miltermonkey_core.milter.negotiation import Plan

log = logging.getLogger(f"{ROOT}.daemon")

_numbers = itertools.count(1)


def new_generation(config: Config, engine: Engine, use_noreply: bool) -> Generation:
    """A generation numbered after the previous one, with its negotiation plan."""
    return Generation(next(_numbers), config, engine, Plan(engine.needs(), engine, use_noreply))


class Generation:
    """One configuration as built: its engine, its negotiation plan, and who uses it.

    A reload activates a new generation for new MTA connections; sessions
    already open finish on the generation they negotiated with, and the old
    brains are closed when its last session ends.
    """

    def __init__(self, number: int, config: Config, engine: Engine, plan: Plan) -> None:
        self.number = number
        self.config = config
        self.engine = engine
        self.plan = plan
        self.sessions = 0
        self.retired = False
        self.closed = False
        self._lock = threading.Lock()

    @property
    def daemon(self) -> DaemonConfig:
        """The ``[miltermonkey]`` options of this generation."""
        return self.config.daemon

    def acquire(self) -> None:
        with self._lock:
            self.sessions += 1

    def release(self) -> None:
        with self._lock:
            self.sessions -= 1
            done = self.retired and self.sessions <= 0 and not self.closed
            if done:
                self.closed = True
        if done:
            self._close()

    def retire(self) -> None:
        """No new sessions; close the brains once the last session ends."""
        with self._lock:
            self.retired = True
            done = self.sessions <= 0 and not self.closed
            if done:
                self.closed = True
        if done:
            self._close()

    def _close(self) -> None:
        log.info("configuration generation %d: last session ended, brains closed", self.number)
        try:
            self.engine.close()
        except Exception:
            log.exception("closing the brains of generation %d failed", self.number)
