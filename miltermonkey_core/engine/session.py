"""Per-session message handling, independent of the milter protocol.

The milter layer translates the MTA's commands into calls on a
:class:`Session`; the offline runner (``miltermonkey try``, the in-process
test runner) makes the same calls from a parsed .eml file.  Both therefore
run exactly the same code path from MAIL FROM to the final decision.
"""

from __future__ import annotations

import itertools
import logging
import time

import attrs

from miltermonkey_core.contract.brain import Needs
from miltermonkey_core.contract.context import MilterContext
from miltermonkey_core.contract.edits import Capability
from miltermonkey_core.contract.model import Address, Body, Connection, Header, Headers, Message
from miltermonkey_core.contract.monkey import Monkey
from miltermonkey_core.contract.verdict import Action, Verdict
from miltermonkey_core.engine.cache import ScanCache
from miltermonkey_core.engine.chain import UNCHECKED_HEADER, BrainResult, Chain, Invoker
from miltermonkey_core.engine.eom import EomRun
from miltermonkey_core.logs import ROOT, queue_id
from miltermonkey_core.milterkey.service import KeyInspection, KeyService

log = logging.getLogger(f"{ROOT}.engine")

_ids = itertools.count(1)


@attrs.define
class Decision:
    """The outcome of end of message, for the adapter to send."""

    verdict: Verdict | None
    ctx: MilterContext
    results: list[BrainResult]
    seconds: float = 0.0
    #: The keys found on the message and which was trusted (None: no milter key).
    key: KeyInspection | None = None

    @property
    def action(self) -> Action:
        return self.verdict.action if self.verdict else Action.ACCEPT


@attrs.define
class EngineSettings:
    spool_threshold: int = 1024 * 1024
    tmpdir: str | None = None
    max_message_size: int = 0
    #: Start independent brains' engine calls together (the daemon's ``overlap``).
    overlap: bool = True


class Engine:
    """The configured chain plus the core's own per-message duties."""

    def __init__(
        self,
        chain: Chain,
        monkey: Monkey,
        settings: EngineSettings | None = None,
        key: KeyService | None = None,
        cache: ScanCache | None = None,
    ) -> None:
        self.chain = chain
        self.monkey = monkey
        self.settings = settings or EngineSettings()
        self.key = key
        #: Where cacheable brains' results are kept (None: no scan cache).  Its
        #: owner (the daemon, across reloads) closes it, not the engine.
        self.cache = cache
        monkey.key = key
        for slot in chain.slots:
            slot.monkey.key = key

    def needs(self) -> Needs:
        """What to negotiate: the brains' union plus what the core itself needs."""
        n = self.chain.needs() | attrs.evolve(Needs.nothing(),
                                              actions=frozenset({Capability.ADD_HEADERS}))
        if self.key is not None:
            n = n | attrs.evolve(Needs.nothing(), headers=True, body=True,
                                 actions=frozenset({Capability.ADD_HEADERS,
                                                    Capability.CHANGE_HEADERS}))
        return n

    def session(self, connection: Connection | None = None) -> Session:
        conn = connection or Connection(id=f"S{next(_ids)}")
        return Session(self, conn)

    def close(self) -> None:
        """Release the brains' resources (idempotent)."""
        self.chain.close()


class Session:
    """One SMTP session: what the brains said so far and the message in progress."""

    def __init__(self, engine: Engine, connection: Connection) -> None:
        self.engine = engine
        self.connection = connection
        #: Brains out for the session, and why (``declined``, ``error``).
        self.session_skips: dict[str, str] = {}
        self.message: Message | None = None
        #: Brains out for the message, and why.
        self.message_skips: dict[str, str] = {}
        self.last_activity = time.monotonic()
        self.closed = False
        self._oversize = False
        #: Headers received so far, appended in O(1); ``message.headers`` is
        #: rebuilt from it only when someone is about to read it.
        self._headers: list[Header] = []
        self._headers_synced = True

    @property
    def qid(self) -> str:
        return self.message.id if self.message else self.connection.id

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    # --- session stage ----------------------------------------------------------

    def connect(self) -> Verdict | None:
        self.touch()
        return self.engine.chain.connect(self.session_skips, self.qid, self.connection)

    def helo(self, name: str) -> Verdict | None:
        self.touch()
        self.connection.helo = name
        return self.engine.chain.helo(self.session_skips, self.qid, self.connection, name)

    # --- envelope -----------------------------------------------------------------

    def _new_message(self) -> Message:
        s = self.engine.settings
        self.reset_message()
        self.message = Message(connection=self.connection,
                               body=Body(threshold=s.spool_threshold, tmpdir=s.tmpdir))
        self.message_skips = dict(self.session_skips)
        self._oversize = False
        self._headers = []
        self._headers_synced = True
        return self.message

    def ensure_message(self) -> Message:
        """The message in progress; started here when MAIL FROM was not negotiated."""
        return self.message if self.message is not None else self._new_message()

    def envfrom(
        self, sender: str, params: tuple[str, ...] = (), macros: dict[str, str] | None = None
    ) -> Verdict | None:
        self.touch()
        msg = self._new_message()
        addr = Address(sender, params)
        msg.envelope.sender = addr
        if macros:
            self.macros(macros)
        return self.engine.chain.envfrom(self.message_skips, self.qid, msg, addr)

    def envrcpt(self, recipient: str, params: tuple[str, ...] = ()) -> Verdict | None:
        self.touch()
        msg = self.ensure_message()
        addr = Address(recipient, params)
        msg.envelope.recipients.append(addr)
        v = self.engine.chain.envrcpt(dict(self.message_skips), self.qid, msg, addr)
        if v is not None and v.final:
            msg.envelope.recipients.pop()
        return v

    def macros(self, values: dict[str, str]) -> None:
        """Record macros the MTA sent for the current stage."""
        if not values:
            return
        self.connection.macros.update(values)
        if self.message is not None:
            self.message.macros.update(values)
            qid = values.get("i")
            if qid and qid != "NOQUEUE":
                self.message.queue_id = qid

    # --- content ------------------------------------------------------------------

    def data(self) -> Verdict | None:
        self.touch()
        self.ensure_message()
        return None

    def _sync_headers(self, msg: Message) -> Message:
        if not self._headers_synced:
            msg.headers = Headers(self._headers)
            self._headers_synced = True
        return msg

    def header(self, name: str | bytes, raw: bytes) -> Verdict | None:
        self.touch()
        msg = self.ensure_message()
        h = Header.from_bytes(name, raw)
        self._headers.append(h)
        self._headers_synced = False
        if not self.engine.chain.implemented("header"):
            return None
        # a header hook may read message.headers: it sees every header so far
        return self.engine.chain.header(self.message_skips, self.qid,
                                        self._sync_headers(msg), h)

    def eoh(self) -> Verdict | None:
        self.touch()
        msg = self._sync_headers(self.ensure_message())
        return self.engine.chain.eoh(self.message_skips, self.qid, msg)

    def body(self, chunk: bytes) -> Verdict | None:
        self.touch()
        msg = self._sync_headers(self.ensure_message())
        limit = self.engine.settings.max_message_size
        if limit and msg.body.size + len(chunk) > limit:
            self._oversize = True
            return None
        msg.body.write(chunk)
        if not self.engine.chain.implemented("body"):
            return None
        return self.engine.chain.body(self.message_skips, self.qid, msg, chunk)

    # --- end of message -------------------------------------------------------------

    def eom(
        self,
        allowed: frozenset[str] = Capability.ALL,
        invoke: Invoker | None = None,
        deadline: float | None = None,
    ) -> Decision:
        """Run the chain and the core's duties; nothing is sent from here.

        ``invoke`` and ``deadline`` bound each brain and the whole chain in
        time (see :meth:`~miltermonkey_core.engine.chain.Chain.run_eom`).
        """
        self.touch()
        t0 = time.perf_counter()
        msg = self._sync_headers(self.ensure_message())
        ctx = MilterContext(msg, allowed)
        if self._oversize:
            limit = self.engine.settings.max_message_size
            log.warning("%s: message larger than max_message_size %d: refused", msg.id, limit)
            v = Verdict.reject(552, "5.3.4", "Message size exceeds fixed limit",
                               reason="max_message_size").by("core")
            return Decision(v, ctx, [], time.perf_counter() - t0)
        key = self.engine.key
        skips = dict(self.message_skips)
        inspected = None
        if key is not None:
            inspected = key.inspect(msg)
            spared = inspected.skip_brains(self.engine.chain.slots)
            if spared:
                log.info("%s: trusted milter key: skipping %s", msg.id, ", ".join(sorted(spared)))
            for name in spared:
                skips.setdefault(name, "key")
        outcome = EomRun(self.engine.chain, msg, ctx, skips, invoke, deadline,
                         self.engine.cache, overlap=self.engine.settings.overlap).run()
        if outcome.tagged and outcome.verdict is None:
            ctx.begin("core")
            ctx.add_header(UNCHECKED_HEADER, ", ".join(outcome.tagged))
            ctx.end()
        if key is not None and (outcome.verdict is None or not outcome.verdict.final):
            ctx.begin("core")
            key.finish(msg, ctx, outcome.results, inspected)
            ctx.end()
        return Decision(outcome.verdict, ctx, outcome.results, time.perf_counter() - t0,
                        key=inspected)

    def reset_message(self) -> None:
        """Forget the message in progress (after EOM or ABORT); the session goes on."""
        if self.message is not None:
            self.message.close()
        self.message = None
        self.message_skips = dict(self.session_skips)
        self._headers = []
        self._headers_synced = True

    @property
    def in_message(self) -> bool:
        """True between the start of a message and its end (EOM or ABORT)."""
        return self.message is not None

    def abort(self) -> None:
        """SMFIC_ABORT: the message ends without EOM; a second ABORT is a no-op."""
        self.touch()
        if self.message is not None:
            self.engine.chain.abort(self.qid, self._sync_headers(self.message))
        self.reset_message()

    def reopen(self) -> None:
        """The MTA spoke again on a session freed by cid_timeout: start it afresh."""
        self.closed = False
        self.touch()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.message is not None:
            self.engine.chain.abort(self.qid, self._sync_headers(self.message))
        self.reset_message()
        self.engine.chain.close_session(self.connection.id, self.connection)


def run_after_accept(ctx: MilterContext, qid: str) -> None:
    """Run the brains' after-accept jobs; a failing job is logged, never raised."""
    after = logging.getLogger(f"{ROOT}.after_accept")
    for brain, job in ctx.after_accept_jobs:
        try:
            with queue_id(qid):
                job()
        except Exception as e:
            after.exception("%s: after-accept job of brain %s failed: %s", qid, brain, e)
