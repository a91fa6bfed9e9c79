"""Every hook of the brain contract is called, in protocol order, with what its spec promises.

Run in-process (the ``run_brains`` fixture drives the same engine session
the daemon does, stage by stage): a brain that records each call shows what
a brain author gets, and when a verdict from one hook spares the later ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from miltermonkey_core import (
    Action,
    Address,
    Brain,
    Connection,
    Header,
    Message,
    MilterContext,
    Monkey,
    Verdict,
    hookimpl,
)

RAW = (b"Subject: hooks\r\nFrom: <a@elsewhere.test>\r\n\r\n"
       + b"x" * 70000 + b"\r\nend\r\n")


class Recorder(Brain):
    """Notes each call; ``answers`` maps a hook to the verdict it returns."""

    def __init__(self, answers: dict[str, Verdict] | None = None, name: str = "recorder") -> None:
        super().__init__(None, Monkey(brain=name), name)
        self.calls: list[tuple[str, Any]] = []
        self.answers = answers or {}

    def _seen(self, hook: str, detail: Any) -> Verdict | None:
        self.calls.append((hook, detail))
        return self.answers.get(hook)

    @hookimpl
    def connect(self, connection: Connection, monkey: Monkey) -> Verdict | None:
        return self._seen("connect", connection.address)

    @hookimpl
    def helo(self, connection: Connection, helo_name: str, monkey: Monkey) -> Verdict | None:
        return self._seen("helo", helo_name)

    @hookimpl
    def envfrom(self, message: Message, sender: Address, monkey: Monkey) -> Verdict | None:
        return self._seen("envfrom", sender.bare)

    @hookimpl
    def envrcpt(self, message: Message, recipient: Address, monkey: Monkey) -> Verdict | None:
        return self._seen("envrcpt", recipient.bare)

    @hookimpl
    def header(self, message: Message, header: Header, monkey: Monkey) -> Verdict | None:
        return self._seen("header", (header.name, header.value))

    @hookimpl
    def eoh(self, message: Message, monkey: Monkey) -> Verdict | None:
        return self._seen("eoh", len(message.headers))

    @hookimpl
    def body(self, message: Message, chunk: bytes, monkey: Monkey) -> Verdict | None:
        return self._seen("body", chunk)

    @hookimpl
    def eom_process(self, message: Message, ctx: MilterContext, monkey: Monkey) -> None:
        self._seen("eom_process", message.body.read())
        ctx.add_header("X-Recorder", "seen")

    @hookimpl
    def abort(self, message: Message, monkey: Monkey) -> None:
        self._seen("abort", message.envelope.sender.bare if message.envelope.sender else None)

    @hookimpl
    def close(self, connection: Connection, monkey: Monkey) -> None:
        self._seen("close", connection.address)


def hooks_called(brain: Recorder) -> list[str]:
    return list(dict.fromkeys(hook for hook, _ in brain.calls))


def test_a_whole_message_calls_every_stage_hook_in_protocol_order(
        run_brains: Callable[..., Any]) -> None:
    brain = Recorder()
    res = run_brains(brain, raw=RAW, sender="<a@elsewhere.test>",
                     recipients=["<b@example.com>", "<c@example.com>"])
    assert res.action is Action.ACCEPT
    assert res.header("X-Recorder") == "seen"
    called = hooks_called(brain)
    assert called[:8] == ["connect", "helo", "envfrom", "envrcpt", "header", "eoh", "body",
                          "eom_process"]
    assert called[-1] == "close"
    calls = brain.calls
    assert ("envfrom", "a@elsewhere.test") in calls
    assert [d for h, d in calls if h == "envrcpt"] == ["b@example.com", "c@example.com"]
    assert [d for h, d in calls if h == "header"] == [("Subject", "hooks"),
                                                      ("From", "<a@elsewhere.test>")]
    assert ("eoh", 2) in calls
    chunks = [d for h, d in calls if h == "body"]
    assert len(chunks) > 1 and all(len(c) <= 65536 for c in chunks)  # streamed in pieces
    body = b"x" * 70000 + b"\r\nend\r\n"
    assert b"".join(chunks) == body
    assert [d for h, d in calls if h == "eom_process"] == [body]


def test_a_message_refused_midway_is_aborted_then_the_session_closed(
        run_brains: Callable[..., Any]) -> None:
    brain = Recorder()
    gate = Recorder({"header": Verdict.reject(550, "5.7.1", "no headers like that")}, "gate")
    res = run_brains(brain, gate, raw=RAW, sender="<a@elsewhere.test>")
    assert res.action is Action.REJECT and res.stage == "header"
    assert hooks_called(brain) == ["connect", "helo", "envfrom", "envrcpt", "header", "abort",
                                   "close"]
    assert ("abort", "a@elsewhere.test") in brain.calls


def test_skip_from_eoh_spares_the_body_and_the_verdict(run_brains: Callable[..., Any]) -> None:
    brain = Recorder({"eoh": Verdict.skip("headers were enough")})
    res = run_brains(brain, raw=RAW)
    assert res.action is Action.ACCEPT and res.header("X-Recorder") is None
    assert "body" not in hooks_called(brain) and "eom_process" not in hooks_called(brain)


def test_a_final_verdict_from_body_refuses_the_message(run_brains: Callable[..., Any]) -> None:
    brain = Recorder({"body": Verdict.tempfail(451, "4.7.1", "scanner busy")})
    res = run_brains(brain, raw=RAW)
    assert res.action is Action.TEMPFAIL and res.stage == "body"
    assert res.verdict.reply.text == "scanner busy"
    assert len([h for h, _ in brain.calls if h == "body"]) == 1  # not called again


def test_skip_from_connect_sits_out_the_session(run_brains: Callable[..., Any]) -> None:
    brain = Recorder({"connect": Verdict.skip("trusted client")})
    run_brains(brain, raw=RAW)
    called = hooks_called(brain)
    assert called[0] == "connect" and called[-1] == "close"
    assert set(called) <= {"connect", "abort", "close"}  # only the clean-up hooks after it


def test_a_refused_recipient_leaves_the_others(run_brains: Callable[..., Any]) -> None:
    class Mailboxes(Recorder):
        @hookimpl
        def envrcpt(self, message: Message, recipient: Address,
                    monkey: Monkey) -> Verdict | None:
            self.calls.append(("envrcpt", recipient.bare))
            if recipient.bare == "closed@example.com":
                return Verdict.reject(550, "5.1.1", "Mailbox closed")
            return None

    brain = Mailboxes()
    res = run_brains(brain, raw=RAW, recipients=["<closed@example.com>", "<open@example.com>"])
    assert res.action is Action.ACCEPT
    assert [a.bare for a in res.ctx.message.envelope.recipients] == ["open@example.com"]
