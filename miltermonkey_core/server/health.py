"""What the supervisor knows about the daemon's health, as plain values.

``/readyz`` and ``miltermonkey status`` read these; the Prometheus rendering
of them lives in :mod:`.exposition`, which is imported only when the
``metrics`` endpoint is configured (prometheus_client and http.server cost
about 11 MiB in the supervisor process).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

REFUSING_POLICIES = frozenset({"tempfail", "reject", "mta"})
#: The circuit breaker's states, in the order of ``miltermonkey_brain_breaker``'s value.
BREAKER_STATES = ("closed", "half-open", "open")



@attrs.define
class SupervisorFacts:
    """What the supervisor knows that no worker does."""

    started: float
    worker_pid: int | None = None
    worker_serving: bool = False
    worker_started: float | None = None
    restarts: int = 0
    start_failures: int = 0
    reloads_ok: int = 0
    reloads_refused: int = 0
    last_reload: float | None = None
    last_reload_ok: bool | None = None
    stopping: bool = False
    draining: bool = False


def not_ready_reasons(facts: SupervisorFacts, snapshot: Mapping[str, Any] | None) -> list[str]:
    """Why the host is not ready (empty: ready); the rule is in the module doc."""
    if facts.stopping:
        return ["stopping (SIGTERM): draining"]
    if not facts.worker_serving:
        return ["no worker is serving yet"]
    if snapshot is None:
        return ["the worker did not answer"]
    reasons = []
    if snapshot.get("stopping"):
        reasons.append("the worker is stopping")
    for b in snapshot.get("brains", ()):
        if b.get("breaker") == "open" and b.get("on_error") in REFUSING_POLICIES:
            reasons.append(f"brain {b['name']}: circuit breaker open and on_error "
                           f"{b['on_error']} would refuse mail")
    return reasons
