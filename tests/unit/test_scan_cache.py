"""The scan cache and overlapping brains: config order holds, nothing unsafe is replayed."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest

from miltermonkey_core import Brain, Message, MilterContext, Monkey, NoOptions, hookimpl
from miltermonkey_core.contract.model import message_from_bytes
from miltermonkey_core.engine.breaker import CircuitBreaker
from miltermonkey_core.engine.build import chain_of
from miltermonkey_core.engine.cache import CachedResult, EntryCodec, MemoryCache, cache_key
from miltermonkey_core.engine.cache_redis import PREFIX, RedisCache
from miltermonkey_core.engine.chain import BrainSlot, BrainTimeout
from miltermonkey_core.engine.offline import run_engine
from miltermonkey_core.engine.replay import RecordingContext, dump_calls, load_calls
from miltermonkey_core.engine.session import Engine
from miltermonkey_core.testing.part import require_or_skip
from miltermonkey_core.testing.process import free_port
from miltermonkey_core.testing.redis import Redis

MESSAGE = (b"From: a@example.com\r\nTo: b@example.org\r\nSubject: %s\r\n"
           b"Message-ID: <m@example.com>\r\n\r\n%s\r\n")


def raw(subject: str = "hi", body: str = "hello") -> bytes:
    return MESSAGE % (subject.encode(), body.encode())


class Scanner(Brain):
    """A cacheable brain that counts its calls; "VIRUS" in the body is refused."""

    Options = NoOptions
    cache_ttl = 60.0
    independent = True
    delay = 0.0

    def __init__(self, name: str, **kw: Any) -> None:
        super().__init__(NoOptions(), Monkey(), name)
        self.calls = 0
        self.behaviour = kw

    def cache_key(self, message: Message) -> Sequence[str | bytes] | None:
        return (message.body.sha256(),)

    @hookimpl
    def eom_process(self, message: Message, ctx: MilterContext, monkey: Monkey) -> None:
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        b = self.behaviour
        if b.get("raise"):
            raise RuntimeError("engine down")
        if b.get("unchecked"):
            ctx.unchecked("too large")
        if b.get("after"):
            ctx.after_accept(lambda: None)
        if b"VIRUS" in message.body.read():
            ctx.reject(550, "5.7.1", f"found by {self.name}")
            return
        ctx.replace_header(f"X-{self.name}", "clean")


def engine(*brains: Brain, cache: Any = None) -> Engine:
    return Engine(chain_of(*brains), Monkey(), cache=cache if cache is not None else MemoryCache())


def outcomes(result: Any) -> dict[str, str]:
    return {r.brain: r.outcome for r in result.results}


# --------------------------------------------------------------------------------------
# Hits, misses and what is never cached
# --------------------------------------------------------------------------------------


def test_a_hit_replays_the_result_without_calling_the_brain() -> None:
    s = Scanner("av")
    e = engine(s)
    first = run_engine(e, raw(body="same"))
    again = run_engine(e, raw(subject="retry", body="same"))
    assert (outcomes(first), outcomes(again)) == ({"av": "ran"}, {"av": "cached"})
    assert s.calls == 1
    assert first.header("X-av") == again.header("X-av") == "clean"
    other = run_engine(e, raw(body="other"))
    assert outcomes(other) == {"av": "ran"} and s.calls == 2


def test_a_cached_refusal_is_replayed_and_stops_the_chain() -> None:
    av, after = Scanner("av"), Scanner("spam")
    e = engine(av, after)
    run_engine(e, raw(body="VIRUS"))
    again = run_engine(e, raw(body="VIRUS"))
    assert again.verdict is not None and again.verdict.describe().startswith("reject 550")
    assert again.verdict.brain == "av" and outcomes(again) == {"av": "cached"}
    assert (av.calls, after.calls) == (1, 0)


@pytest.mark.parametrize("behaviour", [{"raise": True}, {"unchecked": True}, {"after": True}])
def test_errors_unchecked_and_deferred_work_are_never_cached(behaviour: dict[str, Any]) -> None:
    s = Scanner("av", **behaviour)
    cache = MemoryCache()
    e = engine(s, cache=cache)
    run_engine(e, raw())
    run_engine(e, raw())
    assert s.calls == 2 and len(cache) == 0


def test_evaluation_mode_results_are_never_cached() -> None:
    s = Scanner("av")
    cache = MemoryCache()
    e = engine(s, cache=cache)
    e.chain.slots[0].evaluation = True
    run_engine(e, raw())
    run_engine(e, raw())
    assert s.calls == 2 and len(cache) == 0


def test_a_timeout_is_never_cached() -> None:
    s = Scanner("av")
    cache = MemoryCache()
    e = engine(s, cache=cache)

    def times_out(slot: BrainSlot, call: Callable[[], None], timeout: float) -> None:
        call()
        raise BrainTimeout("still running after its timeout")

    session = e.session()
    session.envfrom("<a@example.com>")
    session.envrcpt("<b@example.org>")
    session.body(b"hello\r\n")
    decision = session.eom(invoke=times_out)
    assert [r.outcome for r in decision.results] == ["timeout"] and len(cache) == 0


def test_entries_expire() -> None:
    now = [1000.0]
    cache = MemoryCache(clock=lambda: now[0])
    key = cache_key("av", "1", [b"x"])
    cache.put(key, CachedResult((), now[0], now[0] + 60))
    assert cache.get(key) is not None
    now[0] += 61
    assert cache.get(key) is None and len(cache) == 0


def test_memory_cache_is_bounded_in_entries_and_bytes() -> None:
    cache = MemoryCache(max_entries=3, max_bytes=10 * 1024)
    for i in range(5):
        cache.put(cache_key("av", "1", [str(i)]), CachedResult((), 0, 2e9))
    assert len(cache) == 3
    assert cache.get(cache_key("av", "1", ["0"])) is None  # the oldest went first
    big = (("replace_body", (b"x" * 3000,), {}),)
    for i in range(10):
        cache.put(cache_key("av", "1", [f"b{i}"]), CachedResult(big, 0, 2e9))
    assert cache.bytes <= 10 * 1024


def test_keys_depend_on_every_part_and_never_collide() -> None:
    assert cache_key("av", "1", ["ab", "c"]) != cache_key("av", "1", ["a", "bc"])
    assert cache_key("av", "1", ["x"]) != cache_key("av", "2", ["x"])
    assert cache_key("av", "1", ["x"]) != cache_key("spam", "1", ["x"])


def test_journal_round_trip_and_refusals() -> None:
    calls = [("replace_header", ("X-A", "1"), {}), ("replace_body", (b"\x00\xff",), {}),
             ("reject", (550, "5.7.1", "no"), {"reason": "r"})]
    assert load_calls(dump_calls(calls)) == calls
    for bad in (b'[["after_accept", [], {}]]', b'{"x": 1}', b'[["add_header"]]'):
        with pytest.raises(ValueError):
            load_calls(bad)


def test_the_recorder_marks_what_cannot_be_replayed() -> None:
    class Ctx:
        def add_header(self, name: str, value: str) -> None: ...
        def after_accept(self, job: Callable[[], None]) -> None: ...

    r = RecordingContext(Ctx())
    r.add_header("X-A", "1")
    assert r.replayable and r.calls == [("add_header", ("X-A", "1"), {})]
    r.after_accept(lambda: None)
    assert not r.replayable and len(r.everything) == 2


def test_signed_entries_refuse_tampering() -> None:
    codec = EntryCodec(b"k" * 32)
    key = cache_key("av", "1", [b"x"])
    entry = codec.encode(key, CachedResult((("replace_header", ("X", "clean"), {}),), 1.0, 2.0))
    assert codec.decode(key, entry) is not None
    forged = entry.replace(b"clean", b"CLEAN")
    assert codec.decode(key, forged) is None
    assert codec.decode(cache_key("av", "1", [b"y"]), entry) is None  # moved to another key
    assert EntryCodec(b"z" * 32).decode(key, entry) is None  # another secret


def test_a_secret_rotation_keeps_entries_from_hosts_already_rotated() -> None:
    """Host A signs with the new secret; host B, not yet switched, trusts both."""
    old, new = b"o" * 32, b"n" * 32
    key = cache_key("av", "1", [b"x"])
    result = CachedResult((("replace_header", ("X", "clean"), {}),), 1.0, 2.0)
    rotated, pending = EntryCodec(new, trusted=[old, new]), EntryCodec(old, trusted=[old, new])
    assert pending.decode(key, rotated.encode(key, result)) == result
    assert rotated.decode(key, pending.encode(key, result)) == result
    # A secret taken out of the trusted list is not trusted any more.
    assert EntryCodec(new).decode(key, pending.encode(key, result)) is None


# --------------------------------------------------------------------------------------
# Overlap: engine calls together, results in config order
# --------------------------------------------------------------------------------------


@attrs.define
class ThreadInvoker:
    """Starts each brain on its own thread, like the daemon's pool; records the timing."""

    handles: list[threading.Thread] = attrs.field(factory=list)
    errors: dict[int, BaseException] = attrs.field(factory=dict)
    #: (brain, started, finished) in monotonic seconds, in the order brains finished.
    spans: list[tuple[str, float, float]] = attrs.field(factory=list)

    def __call__(self, slot: BrainSlot, call: Callable[[], None], timeout: float) -> None:
        self.finish(slot, self.start(slot, call), timeout)

    def start(self, slot: BrainSlot, call: Callable[[], None]) -> object:
        def run() -> None:
            started = time.monotonic()
            try:
                call()
            except BaseException as e:
                self.errors[id(t)] = e
            self.spans.append((slot.name, started, time.monotonic()))

        t = threading.Thread(target=run)
        t.start()
        return t

    def finish(self, slot: BrainSlot, handle: object, timeout: float) -> None:
        assert isinstance(handle, threading.Thread)
        handle.join(timeout or None)
        if handle.is_alive():
            raise BrainTimeout(f"still running after its timeout of {timeout:g} s")
        if id(handle) in self.errors:
            raise self.errors.pop(id(handle))  # type: ignore[misc]

    def detach(self, handle: object) -> None:
        pass


def run_overlapped(e: Engine, message: bytes,
                   invoker: ThreadInvoker | None = None) -> tuple[Any, float]:
    session = e.session()
    session.envfrom("<a@example.com>")
    session.envrcpt("<b@example.org>")
    for line in message.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        name, _, value = line.partition(b":")
        session.header(name.decode(), value.strip())
    session.eoh()
    session.body(message.split(b"\r\n\r\n", 1)[1])
    t0 = time.perf_counter()
    decision = session.eom(invoke=invoker or ThreadInvoker())
    return decision, time.perf_counter() - t0


def test_overlapped_brains_apply_in_config_order_when_the_later_finishes_first() -> None:
    slow, fast = Scanner("first"), Scanner("second")
    slow.delay, fast.delay = 0.4, 0.3
    e = engine(slow, fast, cache=MemoryCache(max_entries=1, max_bytes=1024))
    e.cache = None
    decision, seconds = run_overlapped(e, raw())
    assert [edit.brain for edit in decision.ctx.edits] == ["first", "second"]
    assert [h.name for h in decision.ctx.headers][-2:] == ["X-first", "X-second"]
    assert seconds < 0.65  # overlapped: about 0.4 s; one after the other: 0.7 s and more


def test_overlap_false_runs_independent_brains_one_after_the_other() -> None:
    first, second = Scanner("first"), Scanner("second")
    first.delay = second.delay = 0.1
    e = engine(first, second)
    e.cache = None
    e.settings.overlap = False
    invoker = ThreadInvoker()
    decision, _ = run_overlapped(e, raw(), invoker)
    assert [edit.brain for edit in decision.ctx.edits] == ["first", "second"]
    (name1, _, end1), (name2, start2, _) = invoker.spans
    assert (name1, name2) == ("first", "second") and start2 >= end1
    e.settings.overlap = True
    invoker = ThreadInvoker()
    run_overlapped(e, raw(), invoker)
    (_, _, end1), (_, start2, _) = sorted(invoker.spans, key=lambda s: s[0])
    assert start2 < end1  # the second started while the first still ran


def test_an_earlier_final_verdict_drops_the_later_brains_result() -> None:
    slow, fast = Scanner("av"), Scanner("spam")
    slow.delay = 0.2
    e = engine(slow, fast)
    e.cache = None
    decision, _ = run_overlapped(e, raw(body="VIRUS"))
    assert decision.verdict is not None and decision.verdict.brain == "av"
    assert [r.brain for r in decision.results] == ["av"]
    assert decision.ctx.edits == [] and fast.calls == 1  # it ran; its result was dropped


def test_a_half_open_breaker_on_an_overlapped_brain_is_probed_once_and_closes() -> None:
    """The walk takes the half-open breaker's one probe; starting the brain ahead must
    not ask again (it would be refused, and the probe never settled)."""
    flaky, other = Scanner("av", **{"raise": True}), Scanner("spam")
    e = engine(flaky, other)
    e.cache = None
    now = [1000.0]
    breaker = CircuitBreaker(failures=1, window=60, cooldown=30, clock=lambda: now[0])
    e.chain.slots[0].breaker = breaker
    decision, _ = run_overlapped(e, raw())
    assert [r.outcome for r in decision.results] == ["error"] and breaker.state == "open"
    decision, _ = run_overlapped(e, raw())
    assert [r.outcome for r in decision.results] == ["open"]
    now[0] += 31  # cool-down over: half-open, the next message probes
    flaky.behaviour = {}
    calls = flaky.calls
    decision, _ = run_overlapped(e, raw())
    assert flaky.calls == calls + 1 and breaker.state == "closed"
    assert [r.outcome for r in decision.results] == ["ran", "ran"]


def test_a_moot_probe_started_ahead_lets_another_message_probe() -> None:
    """A later brain started ahead as a half-open probe, then made moot by an earlier
    brain's final verdict, gives the probe back."""
    first, flaky = Scanner("av"), Scanner("spam", **{"raise": True})
    e = engine(first, flaky)
    e.cache = None
    now = [1000.0]
    breaker = CircuitBreaker(failures=1, window=60, cooldown=30, clock=lambda: now[0])
    e.chain.slots[1].breaker = breaker
    run_overlapped(e, raw())
    assert breaker.state == "open"
    now[0] += 31
    first.delay = 0.1
    decision, _ = run_overlapped(e, raw(body="VIRUS"))  # av refuses: spam's result is moot
    assert decision.verdict is not None and decision.verdict.brain == "av"
    assert breaker.allow()  # the probe is free again


def test_an_overlapped_failure_gets_its_own_policy() -> None:
    broken, fine = Scanner("av", **{"raise": True}), Scanner("spam")
    e = engine(broken, fine)
    e.cache = None
    decision, _ = run_overlapped(e, raw())
    assert decision.verdict is not None and decision.verdict.action.value == "tempfail"
    assert [r.outcome for r in decision.results] == ["error"]


# --------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Redis]:
    require_or_skip(Redis)
    r = Redis(tmp_path_factory.mktemp("redis"), free_port())
    r.start()
    yield r
    r.stop()


def test_redis_cache_hits_across_engines_and_refuses_planted_entries(
        redis_server: Redis) -> None:
    secret = b"s" * 32
    one, two = Scanner("av"), Scanner("av")
    host1 = engine(one, cache=RedisCache(redis_server.url, secret))
    host2 = engine(two, cache=RedisCache(redis_server.url, secret))
    assert outcomes(run_engine(host1, raw(body="shared"))) == {"av": "ran"}
    assert outcomes(run_engine(host2, raw(body="shared"))) == {"av": "cached"}
    assert (one.calls, two.calls) == (1, 0)
    # someone who can write to Redis but has no secret plants a "clean" entry
    planter = RedisCache(redis_server.url, b"x" * 32)
    e3 = engine(Scanner("av"), cache=RedisCache(redis_server.url, secret))
    slot = e3.chain.slots[0]
    real_key = cache_key(slot.use, slot.version,
                         (slot.name, *slot.brain.cache_key(_message(b"VIRUS"))))  # type: ignore[misc]
    planter.put(real_key, CachedResult((("replace_header", ("X-av", "clean"), {}),),
                                       time.time(), time.time() + 60))
    result = run_engine(e3, raw(body="VIRUS"))
    assert result.verdict is not None and result.verdict.describe().startswith("reject 550")
    assert e3.cache is not None and e3.cache.stats.forged == 1


def _message(body: bytes) -> Message:
    return message_from_bytes(raw(body=body.decode()))


def test_redis_down_is_a_miss_not_an_error(redis_server: Redis, tmp_path: Path) -> None:
    dead = RedisCache(f"redis://127.0.0.1:{free_port()}/0", b"s" * 32, retry_after=60)
    s = Scanner("av")
    e = engine(s, cache=dead)
    t0 = time.perf_counter()
    for _ in range(20):
        assert outcomes(run_engine(e, raw(body="x"))) == {"av": "ran"}
    assert s.calls == 20 and dead.stats.errors == 1  # one failure, then not asked for a while
    assert time.perf_counter() - t0 < 5
    assert PREFIX == b"mm:scan:"
