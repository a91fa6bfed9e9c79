"""End of message: the brains' ``eom_process`` in config order, with the scan cache
and overlapping engine calls.

Config order decides, always: the first final verdict wins, edits apply in
config order, and a later brain's result is dropped when an earlier one is
final.  Within that:

* **the scan cache**: a brain that declares its result cacheable is looked
  up first (:mod:`.cache`); a hit replays what it did as if it had run
  (outcome ``cached``), a miss runs it and stores the result when it may be
  replayed;
* **overlap**: brains that declare their end-of-message work independent of
  the brains before them (``Brain.independent``: they neither read nor need
  earlier edits) are started together when the first of them comes up, each
  on its own context, on the daemon's worker pool; each is then finished in
  its turn, its recorded calls replayed on the message in config order.
  Latency becomes the slowest engine instead of the sum.  Per-brain
  timeouts, breakers and policies are the same as for a brain run alone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

import attrs

from miltermonkey_core.contract.context import MilterContext
from miltermonkey_core.contract.model import Message
from miltermonkey_core.contract.verdict import Action, Verdict
from miltermonkey_core.engine.cache import CachedResult, ScanCache, cache_key
from miltermonkey_core.engine.chain import (
    BrainResult,
    BrainSlot,
    BrainTimeout,
    Chain,
    EomOutcome,
    Invoker,
    direct_invoke,
    log_opened,
    policy_verdict,
)
from miltermonkey_core.engine.guard import GuardedContext
from miltermonkey_core.engine.replay import RecordingContext, replay
from miltermonkey_core.logs import ROOT

log = logging.getLogger(f"{ROOT}.dispatch")

#: Stands in for the chain's lock when no brain runs off the caller's thread.
_NO_LOCK: AbstractContextManager[Any] = nullcontext()


class Overlapping(Protocol):
    """An invoker that can also start a call now and wait for it later."""

    def start(self, slot: BrainSlot, call: Callable[[], None]) -> object: ...

    def finish(self, slot: BrainSlot, handle: object, timeout: float) -> None: ...

    def detach(self, handle: object) -> None: ...


@attrs.define
class _Ahead:
    """A brain started before its turn, on a context of its own."""

    handle: object
    recorder: RecordingContext
    private: MilterContext
    started: float


class EomRun:
    """One message's walk through the chain at end of message."""

    def __init__(self, chain: Chain, message: Message, ctx: MilterContext,
                 skipped: Mapping[str, str] | None, invoke: Invoker | None,
                 deadline: float | None, cache: ScanCache | None, *,
                 overlap: bool = True) -> None:
        self.chain = chain
        self.message = message
        self.ctx = ctx
        self.skip = skipped or {}
        self.invoke = invoke or direct_invoke
        self.overlap: Overlapping | None = (
            invoke if overlap and hasattr(invoke, "start") else None)  # type: ignore[assignment]
        self.deadline = deadline
        self.cache = cache
        self.qid = message.id
        self.results: list[BrainResult] = []
        self.tagged: list[str] = []
        self.ahead: dict[str, _Ahead] = {}
        #: Cache keys worked out so far, and hits found while starting brains ahead.
        self.keys: dict[str, bytes | None] = {}
        self.hits: dict[str, CachedResult] = {}
        # The lock serialises a guarded brain's late writes against the
        # chain's rollback; brains that run inline cannot write late.
        self.lock: AbstractContextManager[Any] = (
            threading.RLock() if chain.blocking else _NO_LOCK)

    # --- the walk -----------------------------------------------------------------------

    def run(self) -> EomOutcome:
        try:
            return self._walk()
        finally:
            for slot in self.chain.slots:  # results an earlier verdict made moot
                ahead = self.ahead.get(slot.name)
                if ahead is None:
                    continue
                if self.overlap is not None:
                    self.overlap.detach(ahead.handle)
                # Never accounted: if it was a half-open breaker's probe, another
                # message probes instead of the breaker staying half-open for good.
                slot.breaker.abort_probe()

    def _walk(self) -> EomOutcome:
        slots = self.chain.slots
        for index, slot in enumerate(slots):
            why = self._not_called(slot)
            if why is not None:
                if why:
                    self.results.append(BrainResult(slot.name, "skipped", detail=why))
                continue
            key = self._key(slot)
            if key is not None and self.cache is not None:
                hit = self.hits.pop(slot.name, None)
                if hit is None and slot.name not in self.ahead:
                    hit = self.cache.get(key)
                if hit is not None:
                    verdict = self._replayed(slot, hit)
                    if verdict is not None and verdict.final:
                        return EomOutcome(verdict, self.results, self.tagged)
                    continue
            t0 = time.perf_counter()
            if self.deadline is not None and time.monotonic() >= self.deadline:
                kind, why_not = "timeout", "no time left for it within eom_timeout"
                recorder = None
            elif slot.name in self.ahead:
                kind, why_not, recorder = self._finish_ahead(slot)
            elif not slot.breaker.allow():
                kind, recorder = "open", None
                why_not = (f"circuit breaker open after {slot.breaker.failures} failures "
                           f"within {slot.breaker.window:g} s; not called for "
                           f"{slot.breaker.cooldown:g} s")
            elif self._overlappable(slot):
                self._start_ahead(index)
                kind, why_not, recorder = self._finish_ahead(slot)
            else:
                kind, why_not, recorder = self._call(slot, record=key is not None)
            seconds = time.perf_counter() - t0
            if kind == "ok":
                verdict = self._ran(slot, seconds)
                if key is not None and recorder is not None and not slot.evaluation:
                    self._store(slot, key, recorder)
                if verdict is not None and verdict.final:
                    return EomOutcome(verdict, self.results, self.tagged)
                continue
            verdict = self._failed(slot, kind, why_not, seconds)
            if verdict is not None:
                return EomOutcome(verdict, self.results, self.tagged)
        return EomOutcome(None, self.results, self.tagged)

    def _not_called(self, slot: BrainSlot) -> str | None:
        """Why ``slot`` is not called ("" when it has no eom_process); None to call it."""
        if slot.name in self.skip:
            return self.skip[slot.name]
        if not slot.implements("eom_process"):
            return ""
        if slot.conditions is not None:
            why = slot.conditions.failing("eom", self.message.connection, self.message)
            if why is not None:
                log.debug("%s: brain %s not called: %s", self.qid, slot.name, why)
                return why
        return None

    # --- results ------------------------------------------------------------------------

    def _verdict_of(self, slot: BrainSlot) -> Verdict | None:
        v = self.ctx.verdict
        return v if v is not None and v.brain == slot.name else None

    def _ran(self, slot: BrainSlot, seconds: float) -> Verdict | None:
        """The brain's calls are on the context (begun for it): keep or, evaluating, undo."""
        ctx = self.ctx
        verdict = self._verdict_of(slot)
        action = verdict.action if verdict else Action.CONTINUE
        if slot.evaluation:
            undone = ctx.rollback()
            ctx.end()
            log.info("%s: brain %s (evaluation) would %s with %d edit(s)", self.qid, slot.name,
                     verdict.describe() if verdict else "continue", len(undone))
            self.results.append(BrainResult(slot.name, "evaluation", action, seconds))
            return None
        ctx.end()
        self.results.append(BrainResult(slot.name, "ran", action, seconds))
        return verdict

    def _failed(self, slot: BrainSlot, kind: str, why: str, seconds: float) -> Verdict | None:
        """A brain that errored, timed out or whose breaker is open: its policy's verdict."""
        self.results.append(BrainResult(slot.name, kind, seconds=seconds, detail=why))
        if kind == "timeout":
            policy = slot.timeout_policy
        elif kind == "open":
            policy = slot.timeout_policy if slot.breaker.last_kind == "timeout" \
                else slot.on_error
        else:
            policy = slot.on_error
        if slot.evaluation:
            log.warning("%s: brain %s (evaluation) %s: %s; ignored", self.qid, slot.name,
                        "failed" if kind == "error" else kind, why)
            return None
        if kind == "timeout":
            log.error("%s: brain %s timed out in eom_process (%s); policy %s", self.qid,
                      slot.name, why, policy)
        elif kind == "open":
            log.warning("%s: brain %s skipped: %s; policy %s", self.qid, slot.name, why, policy)
        verdict = policy_verdict(policy, slot.name, why)
        if verdict is None and policy == "tag":
            self.tagged.append(slot.name)
        return verdict

    # --- the scan cache -----------------------------------------------------------------

    def _key(self, slot: BrainSlot) -> bytes | None:
        """The cache key of ``slot``'s result on this message, or None (not cached)."""
        if slot.name not in self.keys:
            self.keys[slot.name] = self._work_out_key(slot)
        return self.keys[slot.name]

    def _work_out_key(self, slot: BrainSlot) -> bytes | None:
        if self.cache is None or slot.evaluation or slot.brain.cache_ttl <= 0:
            return None
        try:
            parts = slot.brain.cache_key(self.message)
        except Exception as e:
            log.warning("%s: brain %s: cache key failed (%s: %s); not cached", self.qid,
                        slot.name, type(e).__name__, e)
            return None
        if parts is None:
            return None
        return cache_key(slot.use, slot.version, (slot.name, *parts))

    def _replayed(self, slot: BrainSlot, hit: CachedResult) -> Verdict | None:
        ctx = self.ctx
        ctx.begin(slot.name)
        try:
            replay(hit.calls, ctx)
        except Exception as e:  # a journal that no longer fits: run the brain instead
            ctx.rollback()
            ctx.end()
            log.warning("%s: brain %s: cached result does not replay (%s: %s)", self.qid,
                        slot.name, type(e).__name__, e)
            kind, why, _ = self._call(slot, record=False)
            if kind == "ok":
                return self._ran(slot, 0.0)
            return self._failed(slot, kind, why, 0.0)
        verdict = self._verdict_of(slot)
        ctx.end()
        age = time.time() - hit.created
        log.info("%s: brain %s: cached result replayed (%s, scanned %.0f s ago)", self.qid,
                 slot.name, verdict.describe() if verdict else "continue", age)
        self.results.append(BrainResult(slot.name, "cached",
                                        verdict.action if verdict else Action.CONTINUE,
                                        detail=f"age {age:.0f} s"))
        return verdict

    def _store(self, slot: BrainSlot, key: bytes, recorder: RecordingContext) -> None:
        if self.cache is None or not recorder.replayable:
            return
        now = time.time()
        self.cache.put(key, CachedResult(tuple(recorder.calls), now,
                                         now + slot.brain.cache_ttl))

    # --- one brain, now -----------------------------------------------------------------

    def _call(self, slot: BrainSlot, *, record: bool
              ) -> tuple[str, str, RecordingContext | None]:
        """One guarded ``eom_process`` call: ("ok", "", recorder) or (error|timeout, why, None)."""
        ctx, lock = self.ctx, self.lock
        ctx.begin(slot.name)
        recorder = RecordingContext(ctx) if record else None
        target: Any = recorder if recorder is not None else ctx
        # A non-blocking brain runs on the caller's thread and cannot outlive
        # the chain, so it needs no guard against writing after its deadline.
        guard = GuardedContext(target, slot.name, lock) if slot.brain.blocking else None
        brain_ctx: Any = guard if guard is not None else target

        def call() -> None:
            slot.call.eom_process(self.message, brain_ctx)

        try:
            self.invoke(slot, call, slot.timeout or 0.0)
        except Exception as e:
            with lock:
                if guard is not None:
                    guard.revoke()
                ctx.rollback()
                ctx.end()
            kind, why = self._account(slot, e)
            return kind, why, None
        if guard is not None:
            guard.revoke()
        self._account(slot, None)
        return "ok", "", recorder

    def _account(self, slot: BrainSlot, error: Exception | None) -> tuple[str, str]:
        """The breaker's view of one call, and the outcome's kind and reason."""
        breaker = slot.breaker
        if error is None:
            if breaker.success():
                log.warning("%s: brain %s answered again: circuit breaker closed", self.qid,
                            slot.name)
            return "ok", ""
        if isinstance(error, BrainTimeout):
            if error.counts:
                if breaker.failure("timeout"):
                    log_opened(slot, self.qid)
            else:
                breaker.abort_probe()
            return "timeout", error.why
        if not slot.evaluation:
            log.error("%s: brain %s failed in eom_process: %s: %s; policy %s", self.qid,
                      slot.name, type(error).__name__, error, slot.on_error,
                      exc_info=error)
        if breaker.failure("error"):
            log_opened(slot, self.qid)
        return "error", f"{type(error).__name__}: {error}"

    # --- overlapping brains -------------------------------------------------------------

    def _overlappable(self, slot: BrainSlot) -> bool:
        return (self.overlap is not None and slot.brain.independent and slot.brain.blocking)

    def _start_ahead(self, index: int) -> None:
        """Start ``slots[index]`` and every independent blocking brain right after it."""
        assert self.overlap is not None
        for slot in self.chain.slots[index:]:
            if not self._overlappable(slot):
                break
            if slot.name in self.ahead or self._not_called(slot) is not None:
                continue
            key = self._key(slot)
            if key is not None and self.cache is not None and slot is not \
                    self.chain.slots[index]:
                hit = self.cache.get(key)
                if hit is not None:  # replayed in its turn, not run
                    self.hits[slot.name] = hit
                    continue
            # The walk asked slots[index]'s breaker already: asking again would take
            # a half-open breaker's one probe twice, and refuse it the second time.
            if slot is not self.chain.slots[index] and not slot.breaker.allow():
                continue  # its turn reports the open breaker
            private = MilterContext(self.message, self.ctx.allowed)
            private.begin(slot.name)
            recorder = RecordingContext(private)

            def call(slot: BrainSlot = slot, brain_ctx: Any = recorder) -> None:
                slot.call.eom_process(self.message, brain_ctx)

            self.ahead[slot.name] = _Ahead(self.overlap.start(slot, call), recorder, private,
                                           time.perf_counter())

    def _finish_ahead(self, slot: BrainSlot) -> tuple[str, str, RecordingContext | None]:
        """Wait for a brain started ahead; replay its calls on the message in its turn."""
        assert self.overlap is not None
        ahead = self.ahead.pop(slot.name)
        try:
            self.overlap.finish(slot, ahead.handle, slot.timeout or 0.0)
        except Exception as e:
            kind, why = self._account(slot, e)
            return kind, why, None
        self._account(slot, None)
        ctx = self.ctx
        ctx.begin(slot.name)
        try:
            replay_all(ahead.recorder, ctx)
        except Exception as e:
            ctx.rollback()
            ctx.end()
            kind, why = self._account(slot, e)
            return kind, why, None
        return "ok", "", ahead.recorder


def replay_all(recorder: RecordingContext, ctx: MilterContext) -> None:
    """Every call the brain made on its own context, made again on the message's."""
    for name, args, kwargs in recorder.everything:
        getattr(ctx, name)(*args, **kwargs)
