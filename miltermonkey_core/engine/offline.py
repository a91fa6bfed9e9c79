"""Running the configured brains over one message, with no MTA and no socket.

``miltermonkey try`` and brain authors' unit tests use this; it goes through
the same :class:`~miltermonkey_core.engine.session.Session` calls as the daemon, so
what it prints is what the daemon would do (minus the MTA's own behaviour).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import attrs

from miltermonkey_core.config.schema import Config
from miltermonkey_core.contract.context import MilterContext
from miltermonkey_core.contract.edits import Capability, ReplaceBody
from miltermonkey_core.contract.model import Connection, message_from_bytes
from miltermonkey_core.contract.verdict import Action, Verdict
from miltermonkey_core.engine.build import build_engine
from miltermonkey_core.engine.chain import BrainResult
from miltermonkey_core.engine.session import Decision, Engine, run_after_accept
from miltermonkey_core.logs import ROOT, queue_id


@attrs.define
class OfflineResult:
    """What the chain decided for one message, and the message as it would leave."""

    verdict: Verdict | None
    ctx: MilterContext
    results: list[BrainResult]
    log: list[str]
    message_bytes: bytes
    stage: str = "eom"

    @property
    def action(self) -> Action:
        return self.verdict.action if self.verdict else Action.ACCEPT

    @property
    def headers(self) -> list[tuple[str, str]]:
        """The headers after every edit, in order."""
        return [(h.name, h.value) for h in self.ctx.headers]

    def header(self, name: str) -> str | None:
        return self.ctx.headers.get(name)


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.name}: {record.getMessage()}")


@contextmanager
def _capture() -> Iterator[list[str]]:
    h = _ListHandler()
    root = logging.getLogger(ROOT)
    old_level = root.level
    root.addHandler(h)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    try:
        yield h.lines
    finally:
        root.removeHandler(h)
        root.setLevel(old_level)


def _rebuild(ctx: MilterContext) -> bytes:
    out = bytearray()
    for h in ctx.headers:
        out += h.name.encode("ascii", "surrogateescape") + b": "
        out += h.value.encode("utf-8", "surrogateescape").replace(b"\n", b"\r\n") + b"\r\n"
    out += b"\r\n"
    body = [e for e in ctx.edits if isinstance(e, ReplaceBody)]
    if body:
        out += b"".join(body[-1].chunks())
    else:
        out += ctx.message.body.read()
    return bytes(out)


def run_engine(
    engine: Engine,
    raw: bytes,
    sender: str = "<sender@example.test>",
    recipients: Sequence[str] = ("<rcpt@example.test>",),
    macros: Mapping[str, str] | None = None,
    connection: Connection | None = None,
    allowed: frozenset[str] = Capability.ALL,
) -> OfflineResult:
    """Feed one message through every stage of a session, as the MTA would."""
    qid = (macros or {}).get("i") or "offline"
    with _capture() as lines, queue_id(qid):
        conn = connection or Connection(id="offline", hostname="localhost", family="inet",
                                        address="127.0.0.1", port=0)
        conn.macros.update(macros or {})
        session = engine.session(conn)
        parsed = message_from_bytes(raw, sender=sender, recipients=list(recipients),
                                    macros=macros, queue_id=(macros or {}).get("i"))

        def early(v: Verdict | None, stage: str) -> OfflineResult | None:
            if v is None or not v.final:
                return None
            ctx = MilterContext(session.ensure_message(), allowed)
            session.close()
            return OfflineResult(v, ctx, [], list(lines), b"", stage)

        try:
            for stage, call in (("connect", session.connect),
                                ("helo", lambda: session.helo("localhost"))):
                if (r := early(call(), stage)) is not None:
                    return r
            v = session.envfrom(sender, (), dict(macros or {}))
            if (r := early(v, "envfrom")) is not None:
                return r
            for rcpt in recipients:
                session.envrcpt(rcpt)
            if not session.ensure_message().envelope.recipients:
                return OfflineResult(Verdict.reject(550, "5.1.1", "all recipients refused"),
                                     MilterContext(session.ensure_message(), allowed), [],
                                     list(lines), b"", "envrcpt")
            session.data()
            for h in parsed.headers:
                if (r := early(session.header(h.name, h.raw), "header")) is not None:
                    return r
            if (r := early(session.eoh(), "eoh")) is not None:
                return r
            for chunk in parsed.body.chunks(65535):
                if (r := early(session.body(chunk), "body")) is not None:
                    return r
            decision: Decision = session.eom(allowed)
            body = b"" if decision.action.final else _rebuild(decision.ctx)
            if decision.action in (Action.ACCEPT, Action.CONTINUE, Action.DISCARD):
                run_after_accept(decision.ctx, qid)
            session.reset_message()  # the message is done: no abort at close, as in the daemon
            return OfflineResult(decision.verdict, decision.ctx, decision.results,
                                 list(lines), body)
        finally:
            parsed.close()
            session.close()


def run_offline(
    config: Config,
    raw: bytes,
    sender: str = "<sender@example.test>",
    recipients: Sequence[str] = ("<rcpt@example.test>",),
    macros: Mapping[str, str] | None = None,
    client: str = "127.0.0.1",
) -> OfflineResult:
    """Run the brains ``config`` lists over one message (``miltermonkey try``).

    ``client`` is the address the message seems to come from, for brains and
    ``when`` conditions that look at it.
    """
    engine = build_engine(config)
    family = "inet6" if ":" in client else "inet"
    connection = Connection(id="offline", hostname="localhost", family=family,
                            address=client, port=0)
    try:
        return run_engine(engine, raw, sender, recipients, macros, connection=connection)
    finally:
        engine.chain.close()
