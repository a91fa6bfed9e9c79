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
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
import pluggy

from miltermonkey_core import hookspecs
from miltermonkey_core.brain import Brain, Needs
from miltermonkey_core.context import Capability, MilterContext
from miltermonkey_core.logs import ROOT
from miltermonkey_core.model import Message
from miltermonkey_core.monkey import Monkey
from miltermonkey_core.verdict import Action, Verdict

log = logging.getLogger(f"{ROOT}.dispatch")

POLICIES = ("tempfail", "reject", "accept", "tag")
UNCHECKED_HEADER = "X-MilterMonkey-Unchecked"


def policy_verdict(policy: str, brain: str, why: str) -> Verdict | None:
    """The verdict a failure policy gives; ``None`` means carry on."""
    if policy == "tempfail":
        return Verdict.tempfail(451, "4.3.0", "Temporary failure in mail filter, try again later",
                                reason=f"{brain}: {why}").by(brain)
    if policy == "reject":
        return Verdict.reject(554, "5.7.1", "Message could not be checked",
                              reason=f"{brain}: {why}").by(brain)
    return None


@attrs.define
class BrainResult:
    """What one brain did with one message, for logs and the milter key."""

    brain: str
    outcome: str  # ran | error | timeout | skipped | evaluation
    action: Action = Action.CONTINUE
    seconds: float = 0.0
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
    impls: dict[str, tuple[Callable[..., Any], tuple[str, ...]]] = attrs.field(factory=dict)

    def implements(self, hook: str) -> bool:
        return hook in self.impls

    def call(self, hook: str, **kwargs: Any) -> Any:
        fn, argnames = self.impls[hook]
        return fn(*[kwargs[a] for a in argnames])


@attrs.define
class EomOutcome:
    verdict: Verdict | None
    results: list[BrainResult]
    tagged: list[str] = attrs.field(factory=list)


class Chain:
    """The configured brains, in order, with the pluggy manager that validated them."""

    def __init__(self, slots: Sequence[BrainSlot], pm: pluggy.PluginManager | None = None) -> None:
        self.slots = list(slots)
        self.pm = pm
        for slot in self.slots:
            if not slot.impls:
                slot.impls = _impls_of(pm, slot) if pm else _direct_impls(slot.brain)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.slots]

    def needs(self) -> Needs:
        """The union of what the brains need; the adapter adds its own."""
        total = Needs.nothing()
        for s in self.slots:
            total = total | s.brain.needs
            # a brain that implements a streaming hook needs that stage's data
            if s.implements("header") or s.implements("eoh"):
                total = total | Needs(envelope=False, headers=True, body=False)
            if s.implements("body"):
                total = total | Needs(envelope=False, headers=False, body=True)
            if s.implements("envfrom") or s.implements("envrcpt"):
                total = total | Needs(envelope=True, headers=False, body=False)
        return total

    def implemented(self, hook: str) -> bool:
        return any(s.implements(hook) for s in self.slots)

    # --- per-stage hooks --------------------------------------------------------

    def call_stage(
        self, hook: str, skipped: set[str], qid: str, **kwargs: Any
    ) -> Verdict | None:
        """Call ``hook`` on every brain not in ``skipped``; return the first final verdict.

        A brain answering ``Verdict.skip()`` joins ``skipped``.  The monkey
        argument is filled per brain.
        """
        for slot in self.slots:
            if slot.name in skipped or not slot.implements(hook):
                continue
            try:
                v = slot.call(hook, monkey=slot.monkey, **kwargs)
            except Exception as e:
                log.exception("%s: brain %s raised in %s: %s", qid, slot.name, hook, e)
                skipped.add(slot.name)
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
                skipped.add(slot.name)
            elif v.final:
                if slot.evaluation:
                    log.info("%s: brain %s (evaluation) would %s at %s", qid, slot.name,
                             v.describe(), hook)
                    continue
                return v.by(slot.name)
        return None

    def notify(self, hook: str, qid: str, **kwargs: Any) -> None:
        """Call a clean-up hook (abort, close) on every brain; errors are only logged."""
        for slot in self.slots:
            if not slot.implements(hook):
                continue
            try:
                slot.call(hook, monkey=slot.monkey, **kwargs)
            except Exception as e:
                log.exception("%s: brain %s raised in %s: %s", qid, slot.name, hook, e)

    # --- end of message ---------------------------------------------------------

    def run_eom(
        self,
        message: Message,
        ctx: MilterContext,
        skipped: Iterable[str] = (),
        on_brain: Callable[[str], None] | None = None,
    ) -> EomOutcome:
        """Run ``eom_process`` brain by brain until one gives a final verdict."""
        skip = set(skipped)
        results: list[BrainResult] = []
        tagged: list[str] = []
        qid = message.id
        for slot in self.slots:
            if slot.name in skip:
                results.append(BrainResult(slot.name, "skipped"))
                continue
            if not slot.implements("eom_process"):
                continue
            if on_brain is not None:
                on_brain(slot.name)
            t0 = time.perf_counter()
            ctx.begin(slot.name)
            try:
                slot.call("eom_process", message=message, ctx=ctx, monkey=slot.monkey)
            except Exception as e:
                ctx.rollback()
                ctx.end()
                dt = time.perf_counter() - t0
                log.exception("%s: brain %s failed in eom_process: %s: %s; policy %s",
                              qid, slot.name, type(e).__name__, e, slot.on_error)
                results.append(BrainResult(slot.name, "error", seconds=dt,
                                           detail=f"{type(e).__name__}: {e}"))
                verdict = policy_verdict(slot.on_error, slot.name, type(e).__name__)
                if verdict is not None:
                    return EomOutcome(verdict, results, tagged)
                if slot.on_error == "tag":
                    tagged.append(slot.name)
                continue
            dt = time.perf_counter() - t0
            verdict = ctx.verdict if ctx.verdict and ctx.verdict.brain == slot.name else None
            if slot.evaluation:
                undone = ctx.rollback()
                ctx.end()
                log.info("%s: brain %s (evaluation) would %s with %d edit(s)", qid, slot.name,
                         verdict.describe() if verdict else "continue", len(undone))
                results.append(BrainResult(slot.name, "evaluation",
                                           verdict.action if verdict else Action.CONTINUE, dt))
                continue
            ctx.end()
            results.append(BrainResult(slot.name, "ran",
                                       verdict.action if verdict else Action.CONTINUE, dt))
            if verdict is not None and verdict.final:
                return EomOutcome(verdict, results, tagged)
        return EomOutcome(None, results, tagged)

    def close(self) -> None:
        for slot in self.slots:
            try:
                slot.brain.close_brain()
            except Exception:
                log.exception("brain %s failed to close", slot.name)


def _impls_of(
    pm: pluggy.PluginManager, slot: BrainSlot
) -> dict[str, tuple[Callable[..., Any], tuple[str, ...]]]:
    out: dict[str, tuple[Callable[..., Any], tuple[str, ...]]] = {}
    for hook in hookspecs.HOOKS:
        caller = getattr(pm.hook, hook)
        for impl in caller.get_hookimpls():
            if impl.plugin_name == slot.name:
                out[hook] = (impl.function, tuple(impl.argnames))
    return out


def _direct_impls(brain: Brain) -> dict[str, tuple[Callable[..., Any], tuple[str, ...]]]:
    """Hook implementations without a plugin manager (unit tests of one brain)."""
    import inspect

    out: dict[str, tuple[Callable[..., Any], tuple[str, ...]]] = {}
    for hook in hookspecs.HOOKS:
        fn = getattr(brain, hook, None)
        if fn is None or getattr(fn, f"{hookspecs.PROJECT}_impl", None) is None:
            continue
        names = tuple(p for p in inspect.signature(fn).parameters if p != "self")
        out[hook] = (fn, names)
    return out


#: Capabilities the core itself needs for its own edits.
def core_actions(milter_key: bool) -> frozenset[str]:
    acts = {Capability.ADD_HEADERS}
    if milter_key:
        acts.add(Capability.CHANGE_HEADERS)
    return frozenset(acts)
