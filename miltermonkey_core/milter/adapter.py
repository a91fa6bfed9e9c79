"""The only module that speaks libmilter (through pymilter's C extension).

It registers every callback once and, per MTA connection, negotiates the
steps, actions and no-reply bits the active configuration's brains need
(the MTA then does not even send the others), feeds each callback to the
connection's :class:`~miltermonkey_core.engine.Session`, and at end of
message applies the recorded edits once, in brain order.

Speed over TCP: libmilter never sets TCP_NODELAY, and a step the milter does
not answer leaves the MTA's next packet waiting behind Nagle's algorithm for
the milter's delayed ACK (about 40 ms a message).  So the listening socket
gets TCP_NODELAY (Linux copies it to accepted sockets) and, over TCP, every
step that is sent at all is answered; no-reply steps are only negotiated on
UNIX sockets, where they are free.  (Negotiating connect and DATA away on
TCP brings the stall back: measured, 100 instead of 325-375 msg/s.)
Steps that must be answered but that no brain needs are answered by
libmilter alone, without taking the GIL: DATA always, connect when no brain
reads the connection.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import Milter
import milter

from miltermonkey_core.contract.brain import Needs
from miltermonkey_core.contract.edits import (
    AddHeader,
    AddRcpt,
    Capability,
    ChangeFrom,
    ChangeHeader,
    DelRcpt,
    InsertHeader,
    ReplaceBody,
)
from miltermonkey_core.contract.model import Connection
from miltermonkey_core.contract.verdict import Action, Verdict
from miltermonkey_core.engine.chain import MtaDecides, policy_verdict
from miltermonkey_core.engine.session import Decision, Engine, Session, run_after_accept
from miltermonkey_core.logs import ROOT, SUMMARY_LEVEL, queue_id

log = logging.getLogger(f"{ROOT}.adapter")

CAPABILITY_FLAGS = {
    Capability.ADD_HEADERS: Milter.ADDHDRS,
    Capability.CHANGE_HEADERS: Milter.CHGHDRS,
    Capability.CHANGE_BODY: Milter.CHGBODY,
    Capability.ADD_RCPT: Milter.ADDRCPT,
    Capability.ADD_RCPT_PAR: Milter.ADDRCPT_PAR,
    Capability.DEL_RCPT: Milter.DELRCPT,
    Capability.QUARANTINE: Milter.QUARANTINE,
    Capability.CHANGE_FROM: Milter.CHGFROM,
}

#: Macros the core reads at each stage (plus whatever brains declare).
CORE_MACROS: dict[str, tuple[str, ...]] = {
    "connect": ("j", "_", "{daemon_name}", "{daemon_addr}", "{daemon_port}",
                "{client_addr}", "{client_name}", "{if_addr}"),
    "helo": ("{tls_version}", "{cipher}"),
    "envfrom": ("i", "{auth_type}", "{auth_authen}", "{mail_addr}"),
    "envrcpt": ("{rcpt_addr}", "{rcpt_mailer}"),
    "data": ("i",),
    "eoh": ("i",),
    "eom": ("i", "{msg_id}"),
}
SYMLIST_STAGES = {
    "connect": Milter.M_CONNECT, "helo": Milter.M_HELO, "envfrom": Milter.M_ENVFROM,
    "envrcpt": Milter.M_ENVRCPT, "data": Milter.M_DATA, "eoh": Milter.M_EOH,
    "eom": Milter.M_EOM,
}
_RESULT = {
    Action.REJECT: Milter.REJECT,
    Action.TEMPFAIL: Milter.TEMPFAIL,
    Action.DISCARD: Milter.DISCARD,
    Action.ACCEPT: Milter.ACCEPT,
    Action.CONTINUE: Milter.CONTINUE,
}


def _ascii(value: str) -> str:
    """libmilter takes C strings: keep UTF-8, but no lone surrogates or NULs."""
    return value.encode("utf-8", "replace").decode("utf-8").replace("\x00", "")


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return str(value)


def _raw(value: Any) -> bytes:
    """Header value bytes, whether pymilter handed over bytes or text."""
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8", "surrogateescape")


class Plan:
    """What to negotiate with the MTA, fixed per configuration generation."""

    def __init__(self, needs: Needs, engine: Engine, use_noreply: bool) -> None:
        chain = engine.chain
        self.needs = needs
        self.hooks = {h: chain.implemented(h) for h in
                      ("connect", "helo", "envfrom", "envrcpt", "header", "eoh", "body")}
        #: Python must see the connect step (brains read the connection, or
        #: hook it, or asked for connect-stage macros).
        self.connect = bool(needs.connection or self.hooks["connect"]
                            or needs.macros.get("connect"))
        self.envelope = needs.envelope or self.hooks["envfrom"] or self.hooks["envrcpt"]
        self.headers = needs.headers or self.hooks["header"]
        self.body = needs.body or self.hooks["body"]
        self.eoh = self.hooks["eoh"]
        self.use_noreply = use_noreply
        actions = 0
        for cap in needs.actions:
            actions |= CAPABILITY_FLAGS[cap]
        self.macros: dict[str, tuple[str, ...]] = {}
        for stage, names in needs.macros.items():
            merged = tuple(dict.fromkeys((*CORE_MACROS.get(stage, ()), *names)))
            self.macros[stage] = merged
        if self.macros:
            actions |= Milter.SETSYMLIST
        self.actions = actions
        self._allowed: dict[int, frozenset[str]] = {}
        self.read_macros = {
            stage: tuple(dict.fromkeys((*CORE_MACROS.get(stage, ()), *needs.macros.get(stage, ()))))
            for stage in CORE_MACROS
        }
        # No Python callback runs at DATA (libmilter answers it alone): the
        # DATA-stage macros are read at end of message, where libmilter still
        # holds every macro of the message (smfi_getsymval searches them all).
        self.read_macros["eom"] = tuple(dict.fromkeys(
            (*self.read_macros["eom"], *self.read_macros["data"])))

    def allowed(self, actions: int) -> frozenset[str]:
        """The capabilities that negotiated ``actions`` grant, as the context checks them."""
        found = self._allowed.get(actions)
        if found is None:
            found = frozenset(c for c, f in CAPABILITY_FLAGS.items() if f & actions)
            self._allowed[actions] = found
        return found

    def protocol(self, offered: int) -> int:
        """The NO*/NR* bits to ask for, out of those the MTA offered."""
        want = Milter.P_SKIP
        # Over TCP, connect and DATA are always answered (see the module doc); on
        # a UNIX socket they are skipped unless a brain needs them.
        if self.use_noreply and not self.connect:
            want |= Milter.P_NOCONNECT
        if not self.hooks["helo"]:
            want |= Milter.P_NOHELO
        if not self.envelope:
            want |= Milter.P_NOMAIL | Milter.P_NORCPT
        if not self.headers:
            want |= Milter.P_NOHDRS
        if not self.eoh:
            want |= Milter.P_NOEOH
        if not self.body:
            want |= Milter.P_NOBODY
        want |= Milter.P_NOUNKNOWN
        if self.use_noreply:
            want |= Milter.P_NODATA
            for hook, bit in (("connect", Milter.P_NR_CONN), ("helo", Milter.P_NR_HELO),
                              ("envfrom", Milter.P_NR_MAIL), ("envrcpt", Milter.P_NR_RCPT),
                              ("header", Milter.P_NR_HDR), ("eoh", Milter.P_NR_EOH),
                              ("body", Milter.P_NR_BODY)):
                if not self.hooks[hook]:
                    want |= bit
            want |= Milter.P_NR_DATA | Milter.P_NR_UNKN
        if self.needs.rejected_recipients:
            want |= Milter.P_RCPT_REJ
        return int(offered & want)


#: What libmilter takes as "drop the connection without a reply" (engine.c
#: ``_SMFIS_ABORT``).  pymilter passes a callback's integer through
#: unchanged; Postfix then applies ``milter_default_action`` and Sendmail
#: its ``F=`` flags for the rest of the SMTP session.
MTA_DECIDES = 21


class Generation:
    """One configuration as built: its engine, its negotiation plan, and who uses it.

    A reload activates a new generation for new MTA connections; sessions
    already open finish on the generation they negotiated with, and the old
    brains are closed when its last session ends.
    """

    def __init__(self, number: int, config: Any, engine: Engine, plan: Plan) -> None:
        self.number = number
        self.config = config
        self.engine = engine
        self.plan = plan
        self.sessions = 0
        self.retired = False
        self.closed = False
        self._lock = threading.Lock()

    @property
    def daemon(self) -> Any:
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


class Conn:
    """Per-MTA-connection state hung on the libmilter context (setpriv)."""

    __slots__ = ("actions", "allowed", "closed", "ctx", "gen", "noreply", "pending_error",
                 "session")

    def __init__(self, ctx: Any, session: Session, gen: Generation) -> None:
        self.ctx = ctx
        self.session = session
        self.gen = gen
        self.actions = 0
        self.allowed: frozenset[str] = frozenset()
        self.noreply = 0
        #: An internal error in a step the MTA does not wait for: the message's
        #: verdict at EOM is the daemon's failure policy.
        self.pending_error: str | None = None
        self.closed = False

    @property
    def plan(self) -> Plan:
        return self.gen.plan


RunEom = Callable[[Session, frozenset[str], Any, Generation], Decision]


class MilterAdapter:
    """Wires libmilter to the engine; one per process (libmilter is process-global).

    Every callback is registered once, whatever the configuration: what the
    MTA actually sends is decided per connection at negotiation, from the
    generation active at that moment, so a reload can change the brains'
    needs without re-registering anything.  No exception escapes a callback:
    it is logged with the queue id and turned into the daemon's ``on_error``
    policy (pymilter's own fallback would be a silent tempfail).
    """

    def __init__(
        self,
        engine: Engine | None = None,
        *,
        use_noreply: bool = False,
        run_eom: RunEom,
        registry: Any = None,
        config: Any = None,
    ) -> None:
        self.run_eom = run_eom
        self.registry = registry
        self.negotiation_warned = False
        #: Whether libmilter's connect step calls into Python (see activate).
        self.connect_callback = False
        self.generation: Generation | None = None
        self._generations = 0
        self._lock = threading.Lock()
        if engine is not None:
            self.activate(self.new_generation(config, engine, use_noreply))

    # --- generations ------------------------------------------------------------------

    def new_generation(self, config: Any, engine: Engine, use_noreply: bool) -> Generation:
        with self._lock:
            self._generations += 1
            number = self._generations
        return Generation(number, config, engine, Plan(engine.needs(), engine, use_noreply))

    def activate(self, gen: Generation) -> Generation | None:
        """Make ``gen`` the configuration of new connections; retire the previous one.

        The connect callback is registered only once a configuration needs
        it.  pymilter reads the callback pointer before taking the GIL, so
        it may go from unset to set while serving, never back: a reload to
        a configuration that needs it less keeps it.
        """
        if gen.plan.connect and not self.connect_callback:
            milter.set_connect_callback(self._connect)
            self.connect_callback = True
        with self._lock:
            old, self.generation = self.generation, gen
        if old is not None:
            old.retire()
        return old

    @property
    def engine(self) -> Engine:
        if self.generation is None:
            raise RuntimeError("no configuration is active")
        return self.generation.engine

    @property
    def plan(self) -> Plan:
        if self.generation is None:
            raise RuntimeError("no configuration is active")
        return self.generation.plan

    # --- installation -----------------------------------------------------------------

    def install(self, name: str, connection: str, timeout: int) -> None:
        """Register every callback with libmilter; call before opening the socket."""
        milter.set_flags(Milter.CURR_ACTS)
        milter.set_exception_policy(Milter.TEMPFAIL)
        # connect: set by activate() when a configuration needs it
        milter.set_connect_callback(self._connect if self.connect_callback else None)
        milter.set_helo_callback(self._helo)
        milter.set_envfrom_callback(self._envfrom)
        milter.set_envrcpt_callback(self._envrcpt)
        milter.set_header_callback(self._header)
        milter.set_eoh_callback(self._eoh)
        milter.set_body_callback(self._body)
        milter.set_eom_callback(self._eom)
        milter.set_abort_callback(self._abort)
        milter.set_close_callback(self._close)
        milter.setconn(connection)
        if timeout > 0:
            milter.settimeout(timeout)
        # No DATA callback: libmilter answers the step itself (no GIL, no
        # Python); its macros are read at end of message.
        milter.register(name, data=None, unknown=None, negotiate=self._negotiate)

    # --- helpers ------------------------------------------------------------------------

    def _reply(self, conn: Conn, verdict: Verdict | None, nr_bit: int = 0,
               logged: bool = False) -> int:
        if verdict is None or not verdict.final:
            if nr_bit and conn.noreply & nr_bit:
                return int(Milter.NOREPLY)
            return int(Milter.CONTINUE)
        if isinstance(verdict, MtaDecides):
            log.warning("%s: %s: dropping the milter connection so the MTA applies its "
                        "default action", conn.session.qid, verdict.reason)
            return MTA_DECIDES
        if verdict.reply is not None:
            r = verdict.reply
            try:
                conn.ctx.setreply(str(r.code), r.xcode, *[_ascii(x) for x in r.lines])
            except milter.error as e:
                log.error("%s: cannot set reply %s: %s", conn.session.qid, r, e)
        if not logged:
            log.info("%s: %s by %s", conn.session.qid, verdict.describe(), verdict.brain)
        return int(_RESULT[verdict.action])

    def _policy(self, conn: Conn | None) -> str:
        gen = conn.gen if conn is not None else self.generation
        return str(gen.daemon.on_error) if gen is not None else "tempfail"

    def _failed(self, conn: Conn | None, stage: str, error: BaseException,
                nr_bit: int = 0) -> int:
        """An exception in the core or the adapter: log it, apply the daemon's policy."""
        qid = conn.session.qid if conn is not None else "-"
        policy = self._policy(conn)
        log.error("%s: internal error at %s: %s: %s; policy %s", qid, stage,
                  type(error).__name__, error, policy, exc_info=error)
        if conn is None or stage in ("abort", "close"):
            return int(Milter.CONTINUE)
        if nr_bit and conn.noreply & nr_bit:
            # the MTA does not wait for this step: decide at end of message
            conn.pending_error = f"internal error at {stage}"
            return int(Milter.NOREPLY)
        return self._reply(conn, policy_verdict(policy, "core", f"internal error at {stage}"))

    def _conn(self, ctx: Any) -> Conn:
        conn: Conn | None = ctx.getpriv()
        if conn is None:
            conn = self._late_conn(ctx)
        s = conn.session
        if s.closed and not conn.closed:
            # freed by cid_timeout while the MTA kept the connection: start afresh
            log.info("%s: the MTA spoke again after cid_timeout freed the session; resuming",
                     s.connection.id)
            s.reopen()
            if self.registry is not None:
                self.registry.add(s)
        return conn

    def _late_conn(self, ctx: Any) -> Conn:
        """A session for a connection that skipped negotiation, or went on after
        SMFIC_QUIT_NC (libmilter closed the previous session but not the socket).

        What was negotiated is unknown here: every step is answered, and edits
        the MTA did not agree to make the message tempfail at end of message.
        """
        gen = self.generation
        if gen is None:
            raise RuntimeError("no configuration is active")
        gen.acquire()
        try:
            session = gen.engine.session()
            conn = Conn(ctx, session, gen)
            conn.actions = gen.plan.actions
            conn.allowed = gen.plan.allowed(conn.actions)
            ctx.setpriv(conn)
        except BaseException:
            gen.release()
            raise
        if self.registry is not None:
            self.registry.add(session)
        log.info("%s: the MTA went on without negotiating (or after QUIT_NC): new session",
                 session.connection.id)
        return conn

    def _read_macros(self, conn: Conn, stage: str) -> dict[str, str]:
        ctx = conn.ctx
        values = {}
        for name in conn.plan.read_macros[stage]:
            try:
                v: str | None = ctx.getsymval(name)
            except UnicodeDecodeError:  # pymilter decodes macros as strict UTF-8
                log.warning("%s: macro %s is not UTF-8; ignored", conn.session.qid, name)
                continue
            if v is not None:
                values[name] = v
        return values

    def _macros(self, conn: Conn, stage: str) -> None:
        conn.session.macros(self._read_macros(conn, stage))

    # --- callbacks (run in libmilter's per-connection thread) ----------------------------

    def _negotiate(self, ctx: Any, opts: list[int]) -> int:
        gen = self.generation
        if gen is None:
            log.error("an MTA connected before any configuration was active; refused")
            return int(Milter.TEMPFAIL)  # libmilter drops the connection
        gen.acquire()
        try:
            return self._negotiate_with(gen, ctx, opts)
        except Exception as e:
            gen.release()
            log.error("negotiation failed: %s: %s", type(e).__name__, e, exc_info=e)
            with contextlib.suppress(Exception):
                ctx.setpriv(None)
            return int(Milter.TEMPFAIL)

    def _negotiate_with(self, gen: Generation, ctx: Any, opts: list[int]) -> int:
        actions_offered, proto_offered = opts[0], opts[1]
        session = gen.engine.session()
        conn = Conn(ctx, session, gen)
        plan = gen.plan
        want = plan.actions
        missing = want & ~actions_offered
        if missing and not self.negotiation_warned:
            self.negotiation_warned = True
            names = [c for c, f in CAPABILITY_FLAGS.items() if f & missing]
            log.error("the MTA does not offer actions %s that configured brains need; "
                      "those edits will be refused", ", ".join(sorted(names)) or hex(missing))
        conn.actions = want & actions_offered
        conn.allowed = plan.allowed(conn.actions)
        proto = plan.protocol(proto_offered)
        conn.noreply = proto
        opts[0] = conn.actions
        opts[1] = proto
        opts[2] = 0
        opts[3] = 0
        if plan.macros and conn.actions & Milter.SETSYMLIST:
            for stage, wanted in plan.macros.items():
                try:
                    ctx.setsymlist(SYMLIST_STAGES[stage], " ".join(wanted))
                except milter.error as e:
                    log.error("cannot request macros %s for %s: %s", wanted, stage, e)
        ctx.setpriv(conn)
        if self.registry is not None:
            self.registry.add(session)
        return int(Milter.CONTINUE)

    def _connect(self, ctx: Any, hostname: str, family: int, hostaddr: Any) -> int:
        conn: Conn | None = None
        try:
            conn = self._conn(ctx)
            s = conn.session
            c: Connection = s.connection
            c.hostname = _text(hostname)
            if family in (socket.AF_INET, socket.AF_INET6) and hostaddr:
                c.family = "inet" if family == socket.AF_INET else "inet6"
                c.address, c.port = hostaddr[0], hostaddr[1]
            elif family == socket.AF_UNIX:
                c.family, c.address = "unix", _text(hostaddr)
            self._macros(conn, "connect")
            if not conn.plan.hooks["connect"]:
                return self._reply(conn, None, Milter.P_NR_CONN)
            with queue_id(s.qid):
                return self._reply(conn, s.connect(), Milter.P_NR_CONN)
        except Exception as e:
            return self._failed(conn, "connect", e, Milter.P_NR_CONN)

    def _helo(self, ctx: Any, name: str) -> int:
        conn: Conn | None = None
        try:
            conn = self._conn(ctx)
            self._macros(conn, "helo")
            with queue_id(conn.session.qid):
                return self._reply(conn, conn.session.helo(_text(name)), Milter.P_NR_HELO)
        except Exception as e:
            return self._failed(conn, "helo", e, Milter.P_NR_HELO)

    def _envfrom(self, ctx: Any, sender: Any, *params: Any) -> int:
        conn: Conn | None = None
        try:
            conn = self._conn(ctx)
            conn.pending_error = None  # a new message starts
            s = conn.session
            macros = self._read_macros(conn, "envfrom")
            args = (_text(sender), tuple(_text(p) for p in params), macros)
            if not conn.plan.hooks["envfrom"]:
                s.envfrom(*args)
                return self._reply(conn, None, Milter.P_NR_MAIL)
            with queue_id(macros.get("i") or s.qid):
                return self._reply(conn, s.envfrom(*args), Milter.P_NR_MAIL)
        except Exception as e:
            return self._failed(conn, "envfrom", e, Milter.P_NR_MAIL)

    def _envrcpt(self, ctx: Any, rcpt: Any, *params: Any) -> int:
        conn: Conn | None = None
        try:
            conn = self._conn(ctx)
            s = conn.session
            self._macros(conn, "envrcpt")
            with queue_id(s.qid):
                return self._reply(conn, s.envrcpt(_text(rcpt), tuple(_text(p) for p in params)),
                                   Milter.P_NR_RCPT)
        except Exception as e:
            return self._failed(conn, "envrcpt", e, Milter.P_NR_RCPT)

    def _header(self, ctx: Any, name: Any, value: Any) -> int:
        conn: Conn | None = None
        try:
            conn = self._conn(ctx)
            s = conn.session
            raw = value if isinstance(value, bytes) else _raw(value)
            if not conn.plan.hooks["header"]:
                s.header(_text(name), raw)
                return self._reply(conn, None, Milter.P_NR_HDR)
            with queue_id(s.qid):
                return self._reply(conn, s.header(_text(name), raw), Milter.P_NR_HDR)
        except Exception as e:
            return self._failed(conn, "header", e, Milter.P_NR_HDR)

    def _eoh(self, ctx: Any) -> int:
        conn: Conn | None = None
        try:
            conn = self._conn(ctx)
            self._macros(conn, "eoh")
            with queue_id(conn.session.qid):
                return self._reply(conn, conn.session.eoh(), Milter.P_NR_EOH)
        except Exception as e:
            return self._failed(conn, "eoh", e, Milter.P_NR_EOH)

    def _body(self, ctx: Any, chunk: bytes) -> int:
        conn: Conn | None = None
        try:
            conn = self._conn(ctx)
            s = conn.session
            if not conn.plan.hooks["body"]:
                s.body(chunk)
                return self._reply(conn, None, Milter.P_NR_BODY)
            with queue_id(s.qid):
                return self._reply(conn, s.body(chunk), Milter.P_NR_BODY)
        except Exception as e:
            return self._failed(conn, "body", e, Milter.P_NR_BODY)

    def _eom(self, ctx: Any) -> int:
        conn: Conn | None = None
        try:
            conn = self._conn(ctx)
            s = conn.session
            self._macros(conn, "eom")
            with queue_id(s.qid):
                try:
                    if conn.pending_error is not None:
                        policy = self._policy(conn)
                        log.error("%s: %s while the message was received; policy %s",
                                  s.qid, conn.pending_error, policy)
                        v = policy_verdict(policy, "core", conn.pending_error)
                        if v is not None:
                            return self._reply(conn, v)
                    decision = self.run_eom(s, conn.allowed, ctx, conn.gen)
                    return self._apply(conn, decision)
                finally:
                    conn.pending_error = None
                    s.reset_message()
        except Exception as e:
            return self._failed(conn, "eom", e)

    def _abort(self, ctx: Any) -> int:
        # Postfix may send ABORT twice after EOM; the second finds no message.
        conn: Conn | None = None
        try:
            conn = ctx.getpriv()
            if conn is not None:
                conn.pending_error = None
                conn.session.abort()
        except Exception as e:
            return self._failed(conn, "abort", e)
        return int(Milter.CONTINUE)

    def _close(self, ctx: Any) -> int:
        conn: Conn | None = None
        try:
            conn = ctx.getpriv()
            if conn is None or conn.closed:
                return int(Milter.CONTINUE)
            conn.closed = True
            try:
                conn.session.close()
            finally:
                if self.registry is not None:
                    self.registry.remove(conn.session)
                conn.gen.release()
        except Exception as e:
            return self._failed(conn, "close", e)
        finally:
            with contextlib.suppress(Exception):
                ctx.setpriv(None)
        return int(Milter.CONTINUE)

    # --- end of message -------------------------------------------------------------------

    def _apply(self, conn: Conn, decision: Decision) -> int:
        """Send the decision: edits in brain order, then quarantine, then the verdict."""
        s = conn.session
        v = decision.verdict
        def brains() -> str:
            return " ".join(f"{r.brain}={r.outcome}:{r.action.value}" for r in decision.results)

        if isinstance(v, MtaDecides):
            log.warning("%s: no verdict: %s, in %.1f ms [%s]; dropping the milter connection so "
                        "the MTA applies its default action", s.qid, v.reason,
                        decision.seconds * 1000, brains())
            return MTA_DECIDES
        if v is not None and v.final:
            log.info("%s: %s by %s in %.1f ms [%s]", s.qid, v.describe(), v.brain,
                     decision.seconds * 1000, brains())
            if v.action is Action.DISCARD and decision.ctx.after_accept_jobs:
                _after_accept(decision.ctx, s.qid)
            return self._reply(conn, v, logged=True)
        ctx = conn.ctx
        try:
            for e in decision.ctx.edits:
                if isinstance(e, AddHeader):
                    ctx.addheader(e.name, _ascii(e.value), -1)
                elif isinstance(e, InsertHeader):
                    ctx.addheader(e.name, _ascii(e.value), e.index)
                elif isinstance(e, ChangeHeader):
                    ctx.chgheader(e.name, e.index, None if e.value is None else _ascii(e.value))
                elif isinstance(e, ReplaceBody):
                    for chunk in e.chunks():
                        ctx.replacebody(chunk)
                elif isinstance(e, AddRcpt):
                    ctx.addrcpt(e.address, e.params)
                elif isinstance(e, DelRcpt):
                    ctx.delrcpt(e.address)
                elif isinstance(e, ChangeFrom):
                    ctx.chgfrom(e.address, e.params)
            q = decision.ctx.quarantine_request
            if q is not None:
                ctx.quarantine(_ascii(q.reason))
        except milter.error as err:
            log.error("%s: the MTA refused an edit (%s); tempfail so nothing is half-applied",
                      s.qid, err)
            return self._reply(conn, Verdict.tempfail(451, "4.3.0",
                                                      "Temporary failure in mail filter"))
        # one line per message, the queue id's trail, unless debug_level is under 5
        if conn.gen.daemon.debug_level >= SUMMARY_LEVEL:
            log.info("%s: accept in %.1f ms, %d edit(s)%s [%s]", s.qid,
                     decision.seconds * 1000, len(decision.ctx.edits),
                     " quarantined" if decision.ctx.quarantine_request else "", brains())
        if decision.ctx.after_accept_jobs:
            _after_accept(decision.ctx, s.qid)
        return int(Milter.ACCEPT)


def _after_accept(ctx: Any, qid: str) -> None:
    """Run brains' after-accept jobs (notices) on their own thread: the MTA
    need not wait for a sendmail process to hear that the message is accepted."""
    threading.Thread(target=run_after_accept, args=(ctx, qid), name="mm-after-accept",
                     daemon=True).start()


def set_nodelay_on_listeners() -> int:
    """Set TCP_NODELAY on every listening TCP socket of this process.

    libmilter opens its socket in C, so the socket is found through
    /proc/self/fd; Linux copies the option to each accepted connection.
    """
    count = 0
    for fd_name in os.listdir("/proc/self/fd"):
        fd = int(fd_name)
        try:
            s = socket.socket(fileno=fd)
        except OSError:
            continue
        try:
            if (s.family in (socket.AF_INET, socket.AF_INET6)
                    and s.type == socket.SOCK_STREAM
                    and s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                count += 1
        except OSError:
            pass
        finally:
            s.detach()
    return count


def wait_with_progress(
    done: Callable[[float], bool],
    ctx: Any,
    interval: float,
    deadline: float,
) -> bool:
    """Wait for ``done`` while sending SMFIR_PROGRESS every ``interval`` seconds.

    Returns False when ``deadline`` (a monotonic time) passed first.
    """
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if done(min(interval, left)):
            return True
        with contextlib.suppress(milter.error):
            ctx.progress()
