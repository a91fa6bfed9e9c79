"""Calling brains in configured order, each in isolation, with its failure policy.

pluggy's own call loop stops at the first exception and re-raises, which
would let one broken brain take the others (and the message) down with it.
The chain here calls each brain's implementation itself, in the order of the
config, catches what it raises, logs the brain and the queue id, and turns
the failure into that brain's policy:

``tempfail``  answer 4xx; the MTA keeps the message and retries (default).
``reject``    answer 5xx.
``accept``    carry on as if the brain had not been configured.
``tag``       carry on, and mark the message with ``X-MilterMonkey-Unchecked``.
``mta``       give up on the milter protocol for this connection, so the MTA
              applies its own ``milter_default_action`` (Postfix) or ``F=``
              flags (Sendmail): the admin of the MTA decides.

At end of message each brain's ``eom_process`` is handed to an *invoker*.
Offline (``miltermonkey try``) it is a plain call; in the daemon it runs on
the worker pool and the chain stops waiting after the brain's ``timeout``
(or when the message's total ``eom_timeout`` is spent).  A Python thread
cannot be killed, so a brain that overran keeps running to completion on its
thread, but what it writes afterwards is refused (:class:`GuardedContext`)
and its result is thrown away; the brain's ``on_timeout`` policy applies.

Each brain has a circuit breaker (:mod:`.breaker`); a guarded brain call
sees its context through :mod:`.guard`; brains are called through the typed
facade of :mod:`.hooks`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import attrs
import pluggy

from miltermonkey_core.config.schema import ON_ERROR_POLICIES
from miltermonkey_core.contract import hookspecs
from miltermonkey_core.contract.brain import Brain, Needs
from miltermonkey_core.contract.model import Address, Connection, Header, Message
from miltermonkey_core.contract.monkey import Monkey
from miltermonkey_core.contract.verdict import Action, Reply, Verdict
from miltermonkey_core.engine.breaker import CircuitBreaker
from miltermonkey_core.engine.conditions import Conditions
from miltermonkey_core.engine.hooks import BrainHooks, HookImpl
from miltermonkey_core.logs import ROOT

#: Stands in for the chain's lock when no brain runs off the caller's thread.
_NO_LOCK: AbstractContextManager[Any] = nullcontext()

log = logging.getLogger(f"{ROOT}.dispatch")

#: The failure policies, as the configuration names them.
POLICIES = ON_ERROR_POLICIES
UNCHECKED_HEADER = "X-MilterMonkey-Unchecked"


@attrs.frozen
class MtaDecides(Verdict):
    """A failure left to the MTA's own default action (policy ``mta``).

    The adapter answers it by dropping the milter connection without a
    reply, which is what makes Postfix apply ``milter_default_action`` and
    Sendmail its ``F=`` flags.  Everywhere else (offline runs, logs) it reads
    as the tempfail that both MTAs use by default.
    """


def policy_verdict(policy: str, brain: str, why: str) -> Verdict | None:
    """The verdict a failure policy gives; ``None`` means carry on."""
    if policy == "tempfail":
        return Verdict.tempfail(451, "4.3.0", "Temporary failure in mail filter, try again later",
                                reason=f"{brain}: {why}").by(brain)
    if policy == "reject":
        return Verdict.reject(554, "5.7.1", "Message could not be checked",
                              reason=f"{brain}: {why}").by(brain)
    if policy == "mta":
        return MtaDecides(Action.TEMPFAIL,
                          Reply.build(451, "4.3.0", "Mail filter failed, MTA default action"),
                          reason=f"{brain}: {why}; the MTA's default action decides",
                          brain=brain)
    return None


@attrs.define
class BrainResult:
    """What one brain did with one message, for logs and the milter key."""

    brain: str
    outcome: str  # ran | error | timeout | open | skipped | evaluation
    #: The verdict's action (for ``evaluation``: what it would have been).
    action: Action = Action.CONTINUE
    seconds: float = 0.0
    #: Why it did not run (skipped: ``declined``, ``error``, ``key``, ``condition:...``),
    #: or what went wrong.
    detail: str = ""


@attrs.define
class BrainSlot:
    """One configured brain: its instance, options and policies."""

    name: str
    use: str
    brain: Brain
    monkey: Monkey
    on_error: str = "tempfail"
    timeout: float | None = None
    evaluation: bool = False
    skip_if_key: bool = False
    expiration: int | None = None
    #: Policy when ``eom_process`` overruns ``timeout``; None: ``on_error``.
    on_timeout: str | None = None
    breaker: CircuitBreaker = attrs.field(factory=CircuitBreaker.disabled)
    #: The brain's hooks, bound by the :class:`Chain` that holds this slot.
    hooks: BrainHooks | None = None
    #: The ``when`` conditions under which it is called (None: always).
    conditions: Conditions | None = None
    #: The brain's distribution version, part of its scan cache keys.
    version: str = "0"

    @property
    def timeout_policy(self) -> str:
        return self.on_timeout or self.on_error

    @property
    def call(self) -> BrainHooks:
        """The brain's hooks, one typed method each."""
        assert self.hooks is not None, "a slot is bound to its hooks by its Chain"
        return self.hooks

    def implements(self, hook: str) -> bool:
        return self.hooks is not None and hook in self.hooks.implemented


@attrs.define
class EomOutcome:
    verdict: Verdict | None
    results: list[BrainResult]
    tagged: list[str] = attrs.field(factory=list)


class BrainTimeout(Exception):
    """Raised by an invoker when it stopped waiting for a brain.

    ``counts`` is False when the brain itself was not to blame (it never got
    a worker before the message's time ran out), so the breaker ignores it.
    """

    def __init__(self, why: str, counts: bool = True) -> None:
        super().__init__(why)
        self.why = why
        self.counts = counts


#: Runs one brain's ``eom_process`` (``call``) with a time limit in seconds (0: none).
Invoker = Callable[[BrainSlot, Callable[[], None], float], None]


def direct_invoke(slot: BrainSlot, call: Callable[[], None], timeout: float) -> None:
    """The offline invoker: call the brain here and now, no time limit."""
    call()


class Chain:
    """The configured brains, in order, with the pluggy manager that validated them."""

    def __init__(self, slots: Sequence[BrainSlot], pm: pluggy.PluginManager | None = None) -> None:
        self.slots = list(slots)
        self.pm = pm
        self.closed = False
        for slot in self.slots:
            if slot.hooks is None:
                impls = _impls_of(pm, slot) if pm else _direct_impls(slot.brain)
                slot.hooks = BrainHooks(impls, slot.monkey)
        # Worked out once: every MTA callback asks, and brains are fixed per chain.
        self._by_hook = {hook: [s for s in self.slots if s.implements(hook)]
                         for hook in hookspecs.HOOKS}
        #: True when some brain's eom_process blocks and so must run on the
        #: worker pool under a guard; False lets the daemon call them inline.
        self.blocking = any(getattr(s.brain, "blocking", True)
                            for s in self._by_hook["eom_process"])

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.slots]

    def needs(self) -> Needs:
        """The union of what the brains need; the adapter adds its own."""
        total = Needs.nothing()
        for s in self.slots:
            total = total | s.brain.needs
            if s.conditions is not None:
                total = total | s.conditions.needs()
            # a brain that implements a streaming hook needs that stage's data
            if s.implements("header") or s.implements("eoh"):
                total = total | attrs.evolve(Needs.nothing(), headers=True)
            if s.implements("body"):
                total = total | attrs.evolve(Needs.nothing(), body=True)
            if s.implements("envfrom") or s.implements("envrcpt"):
                total = total | attrs.evolve(Needs.nothing(), envelope=True)
        return total

    def implemented(self, hook: str) -> bool:
        return bool(self._by_hook[hook])

    # --- per-stage hooks --------------------------------------------------------
    #
    # One typed method per hook; each walks the brains implementing it.

    def connect(self, skipped: dict[str, str], qid: str, connection: Connection) -> Verdict | None:
        return self._stage("connect", skipped, qid, lambda h: h.connect(connection),
                           connection, None)

    def helo(self, skipped: dict[str, str], qid: str, connection: Connection,
             helo_name: str) -> Verdict | None:
        return self._stage("helo", skipped, qid, lambda h: h.helo(connection, helo_name),
                           connection, None)

    def envfrom(self, skipped: dict[str, str], qid: str, message: Message,
                sender: Address) -> Verdict | None:
        return self._stage("envfrom", skipped, qid, lambda h: h.envfrom(message, sender),
                           message.connection, message)

    def envrcpt(self, skipped: dict[str, str], qid: str, message: Message,
                recipient: Address) -> Verdict | None:
        return self._stage("envrcpt", skipped, qid, lambda h: h.envrcpt(message, recipient),
                           message.connection, message)

    def header(self, skipped: dict[str, str], qid: str, message: Message,
               header: Header) -> Verdict | None:
        return self._stage("header", skipped, qid, lambda h: h.header(message, header),
                           message.connection, message)

    def eoh(self, skipped: dict[str, str], qid: str, message: Message) -> Verdict | None:
        return self._stage("eoh", skipped, qid, lambda h: h.eoh(message),
                           message.connection, message)

    def body(self, skipped: dict[str, str], qid: str, message: Message,
             chunk: bytes) -> Verdict | None:
        return self._stage("body", skipped, qid, lambda h: h.body(message, chunk),
                           message.connection, message)

    def abort(self, qid: str, message: Message) -> None:
        self._notify("abort", qid, lambda h: h.abort(message))

    def close_session(self, qid: str, connection: Connection) -> None:
        self._notify("close", qid, lambda h: h.close(connection))

    def _stage(
        self, hook: str, skipped: dict[str, str], qid: str, call: Callable[[BrainHooks], object],
        connection: Connection, message: Message | None,
    ) -> Verdict | None:
        """Call ``hook`` on every brain not in ``skipped``; return the first final verdict.

        A brain answering ``Verdict.skip()`` joins ``skipped`` (reason ``declined``),
        as does one that raised (reason ``error``).
        """
        for slot in self._by_hook[hook]:
            if slot.name in skipped:
                continue
            if slot.conditions is not None and (
                    why := slot.conditions.failing(hook, connection, message)) is not None:
                skipped[slot.name] = why
                continue
            try:
                v = call(slot.call)
            except Exception as e:
                skipped[slot.name] = "error"
                if slot.evaluation:
                    log.exception("%s: brain %s (evaluation) raised in %s: %s; ignored",
                                  qid, slot.name, hook, e)
                    continue
                log.exception("%s: brain %s raised in %s: %s; policy %s", qid, slot.name, hook,
                              e, slot.on_error)
                verdict = policy_verdict(slot.on_error, slot.name, f"error in {hook}")
                if verdict is not None:
                    return verdict
                continue
            if v is None:
                continue
            if not isinstance(v, Verdict):
                log.error("%s: brain %s returned %r from %s; expected a Verdict or None",
                          qid, slot.name, v, hook)
                continue
            if v.action is Action.SKIP:
                skipped[slot.name] = "declined"
            elif v.final:
                if slot.evaluation:
                    log.info("%s: brain %s (evaluation) would %s at %s", qid, slot.name,
                             v.describe(), hook)
                    continue
                return v.by(slot.name)
        return None

    def _notify(self, hook: str, qid: str, call: Callable[[BrainHooks], None]) -> None:
        """Call a clean-up hook (abort, close) on every brain; errors are only logged."""
        for slot in self._by_hook[hook]:
            try:
                call(slot.call)
            except Exception as e:
                log.exception("%s: brain %s raised in %s: %s", qid, slot.name, hook, e)

    def close(self) -> None:
        """Release every brain's resources (shutdown, or the last session of a reload)."""
        if self.closed:
            return
        self.closed = True
        for slot in self.slots:
            try:
                slot.brain.close_brain()
            except Exception:
                log.exception("brain %s failed to close", slot.name)


def log_opened(slot: BrainSlot, qid: str) -> None:
    b = slot.breaker
    log.error("%s: brain %s: circuit breaker OPEN (%d failures within %g s, last a %s): "
              "for %g s its policy applies at once without calling it", qid, slot.name,
              b.failures, b.window, b.last_kind, b.cooldown)


def _impls_of(pm: pluggy.PluginManager, slot: BrainSlot) -> dict[str, HookImpl]:
    out: dict[str, HookImpl] = {}
    for hook in hookspecs.HOOKS:
        caller = getattr(pm.hook, hook)
        for impl in caller.get_hookimpls():
            if impl.plugin_name == slot.name:
                out[hook] = (impl.function, tuple(impl.argnames))
    return out


def _direct_impls(brain: Brain) -> dict[str, HookImpl]:
    """Hook implementations without a plugin manager (unit tests of one brain)."""
    out: dict[str, HookImpl] = {}
    for hook in hookspecs.HOOKS:
        fn = getattr(brain, hook, None)
        if fn is None or getattr(fn, f"{hookspecs.PROJECT}_impl", None) is None:
            continue
        names = tuple(p for p in inspect.signature(fn).parameters if p != "self")
        out[hook] = (fn, names)
    return out
