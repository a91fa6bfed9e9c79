"""Ordered, isolated dispatch: config order wins, failures become the brain's policy."""

from __future__ import annotations

import logging
from typing import ClassVar

import pytest

from miltermonkey_core import Brain, Message, MilterContext, Monkey, Needs, Verdict, hookimpl
from miltermonkey_core.contract.verdict import Action
from miltermonkey_core.engine.build import chain_of
from miltermonkey_core.engine.chain import UNCHECKED_HEADER, BrainSlot, Chain
from miltermonkey_core.engine.offline import run_engine
from miltermonkey_core.engine.session import Engine
from miltermonkey_core.errors import BrainLoadError
from miltermonkey_core.plugins import new_plugin_manager, register

RAW = b"Subject: test\r\nMessage-ID: <1@x>\r\n\r\nhello\r\n"


class Stamp(Brain):
    @hookimpl
    def eom_process(self, message: Message, ctx: MilterContext, monkey: Monkey) -> None:
        ctx.add_header("X-Order", self.name)


class Boom(Brain):
    @hookimpl
    def eom_process(self, message: Message, ctx: MilterContext, monkey: Monkey) -> None:
        ctx.add_header("X-Boom", "partial")
        raise RuntimeError("kaboom")


class Rejecter(Brain):
    @hookimpl
    def eom_process(self, message: Message, ctx: MilterContext, monkey: Monkey) -> None:
        ctx.reject(550, "5.7.1", "no thanks")


class HeaderSkipper(Brain):
    calls = 0

    @hookimpl
    def header(self, message: Message, header: object, monkey: Monkey) -> Verdict | None:
        return Verdict.skip()

    @hookimpl
    def eom_process(self, message: Message, ctx: MilterContext, monkey: Monkey) -> None:
        ctx.add_header("X-Should-Not", "run")


def mk(cls: type[Brain], name: str) -> Brain:
    return cls(None, Monkey(brain=name), name)


def run(*brains: Brain, policies: dict[str, str] | None = None, **slot_kw: object) -> object:
    chain = chain_of(*brains)
    for s in chain.slots:
        s.on_error = (policies or {}).get(s.name, "tempfail")
        for k, v in slot_kw.get(s.name, {}).items():  # type: ignore[attr-defined]
            setattr(s, k, v)
    return run_engine(Engine(chain, Monkey()), RAW)


def test_config_order_wins_over_registration_order() -> None:
    # pluggy would call the last registered first; the chain must not
    res = run(mk(Stamp, "first"), mk(Stamp, "second"), mk(Stamp, "third"))
    assert res.ctx.headers.get_all("X-Order") == ["first", "second", "third"]
    res = run(mk(Stamp, "third"), mk(Stamp, "first"))
    assert res.ctx.headers.get_all("X-Order") == ["third", "first"]


def test_raising_brain_gets_tempfail_and_is_rolled_back(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="miltermonkey")
    res = run(mk(Stamp, "a"), mk(Boom, "boom"), mk(Stamp, "b"))
    assert res.action is Action.TEMPFAIL
    assert res.verdict.reply.code == 451
    assert res.verdict.brain == "boom"
    assert "X-Boom" not in res.ctx.headers
    assert [r.outcome for r in res.results] == ["ran", "error"]
    assert any("brain boom failed" in line and "kaboom" in line for line in res.log)


@pytest.mark.parametrize(("policy", "action"), [("accept", Action.ACCEPT),
                                                ("reject", Action.REJECT),
                                                ("tag", Action.ACCEPT)])
def test_other_failure_policies(policy: str, action: Action) -> None:
    res = run(mk(Boom, "boom"), mk(Stamp, "after"), policies={"boom": policy})
    assert res.action is action
    if action is Action.ACCEPT:
        assert res.ctx.headers.get_all("X-Order") == ["after"]
        assert "X-Boom" not in res.ctx.headers
    tagged = res.ctx.headers.get(UNCHECKED_HEADER)
    assert (tagged == "boom") == (policy == "tag")


def test_first_final_verdict_stops_chain() -> None:
    res = run(mk(Stamp, "a"), mk(Rejecter, "gate"), mk(Stamp, "never"))
    assert res.action is Action.REJECT
    assert [r.brain for r in res.results] == ["a", "gate"]
    assert res.verdict.brain == "gate"


def test_evaluation_mode_logs_but_enforces_nothing() -> None:
    res = run(mk(Rejecter, "gate"), mk(Stamp, "a"), gate={"evaluation": True})
    assert res.action is Action.ACCEPT
    assert res.ctx.headers.get_all("X-Order") == ["a"]
    assert any("(evaluation) would reject" in line for line in res.log)


def test_skip_from_header_spares_eom() -> None:
    res = run(mk(HeaderSkipper, "skipper"), mk(Stamp, "a"))
    assert "X-Should-Not" not in res.ctx.headers
    assert [(r.brain, r.outcome) for r in res.results] == [("skipper", "skipped"), ("a", "ran")]


def test_tryfirst_is_refused() -> None:
    class Pushy(Brain):
        @hookimpl(tryfirst=True)
        def eom_process(self, message: Message, ctx: MilterContext, monkey: Monkey) -> None:
            pass

    with pytest.raises(BrainLoadError, match="tryfirst"):
        register(new_plugin_manager(), mk(Pushy, "p"), "p")


def test_bad_hook_signature_is_refused() -> None:
    class Wrong(Brain):
        @hookimpl
        def eom_process(self, message: Message, context: MilterContext) -> None:
            pass

    with pytest.raises(BrainLoadError, match="does not fit"):
        register(new_plugin_manager(), mk(Wrong, "w"), "w")


def test_needs_union_follows_hooks() -> None:
    class OnlyHeaders(Brain):
        needs = Needs.nothing()

        @hookimpl
        def header(self, message: Message, header: object, monkey: Monkey) -> None:
            return None

    chain = Chain([BrainSlot("h", "h", mk(OnlyHeaders, "h"), Monkey())])
    n = chain.needs()
    assert n.headers and not n.body and not n.envelope


class Notifier(Brain):
    sent: ClassVar[list[str]] = []

    @hookimpl
    def eom_process(self, message: Message, ctx: MilterContext, monkey: Monkey) -> None:
        ctx.after_accept(lambda: Notifier.sent.append(self.name))


def test_after_accept_jobs_run_only_when_accepted() -> None:
    Notifier.sent = []
    run(mk(Notifier, "n1"), mk(Stamp, "a"))
    assert Notifier.sent == ["n1"]
    Notifier.sent = []
    res = run(mk(Notifier, "n1"), mk(Rejecter, "gate"))
    assert res.action is Action.REJECT and Notifier.sent == []
    res = run(mk(Notifier, "n1"), mk(Boom, "boom"))
    assert res.action is Action.TEMPFAIL and Notifier.sent == []


def test_after_accept_job_of_failing_brain_is_rolled_back() -> None:
    class NotifyThenFail(Brain):
        @hookimpl
        def eom_process(self, message: Message, ctx: MilterContext, monkey: Monkey) -> None:
            ctx.after_accept(lambda: Notifier.sent.append("doomed"))
            raise RuntimeError("after recording")

    Notifier.sent = []
    res = run(mk(NotifyThenFail, "nf"), mk(Notifier, "n2"), policies={"nf": "accept"})
    assert res.action is Action.ACCEPT and Notifier.sent == ["n2"]
