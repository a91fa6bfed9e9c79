"""The only module that speaks libmilter (through pymilter's C extension).

It registers a C callback only for the stages some brain needs (libmilter
then tells the MTA not to send the others), negotiates actions and no-reply
steps from the brains' union of needs, feeds each callback to the
connection's :class:`~miltermonkey_core.engine.Session`, and at end of
message applies the recorded edits once, in brain order.

Speed over TCP: libmilter never sets TCP_NODELAY, and a step the milter does
not answer leaves the MTA's next packet waiting behind Nagle's algorithm for
the milter's delayed ACK (about 40 ms a message).  So the listening socket
gets TCP_NODELAY (Linux copies it to accepted sockets) and, over TCP, every
step that is sent at all is answered; no-reply steps are only negotiated on
UNIX sockets, where they are free.
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

from miltermonkey_core.brain import Needs
from miltermonkey_core.context import (
    AddHeader,
    AddRcpt,
    Capability,
    ChangeFrom,
    ChangeHeader,
    DelRcpt,
    InsertHeader,
    ReplaceBody,
)
from miltermonkey_core.engine import Decision, Engine, Session
from miltermonkey_core.logs import ROOT, queue_id
from miltermonkey_core.model import Connection
from miltermonkey_core.verdict import Action, Verdict

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


class Plan:
    """What to negotiate and which callbacks to register, fixed per configuration."""

    def __init__(self, needs: Needs, engine: Engine, use_noreply: bool) -> None:
        chain = engine.chain
        self.needs = needs
        self.hooks = {h: chain.implemented(h) for h in
                      ("connect", "helo", "envfrom", "envrcpt", "header", "eoh", "body")}
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
        self.read_macros = {
            stage: tuple(dict.fromkeys((*CORE_MACROS.get(stage, ()), *needs.macros.get(stage, ()))))
            for stage in CORE_MACROS
        }

    def protocol(self, offered: int) -> int:
        """The NO*/NR* bits to ask for, out of those the MTA offered."""
        want = Milter.P_SKIP
        # Over TCP, connect and DATA are always answered (see the module doc); on
        # a UNIX socket they are skipped unless a brain needs them.
        if self.use_noreply and not self.hooks["connect"]:
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


class Conn:
    """Per-MTA-connection state hung on the libmilter context (setpriv)."""

    __slots__ = ("actions", "allowed", "ctx", "noreply", "session")

    def __init__(self, ctx: Any, session: Session) -> None:
        self.ctx = ctx
        self.session = session
        self.actions = 0
        self.allowed: frozenset[str] = frozenset()
        self.noreply = 0


class MilterAdapter:
    """Wires libmilter to the engine; one per daemon (libmilter is process-global)."""

    def __init__(
        self,
        engine: Engine,
        *,
        use_noreply: bool,
        run_eom: Callable[[Session, frozenset[str], Any], Decision],
        registry: Any = None,
    ) -> None:
        self.engine = engine
        self.plan = Plan(engine.needs(), engine, use_noreply)
        self.run_eom = run_eom
        self.registry = registry
        self.negotiation_warned = False

    # --- installation -----------------------------------------------------------------

    def install(self, name: str, connection: str, timeout: int) -> None:
        """Register callbacks with libmilter; call before opening the socket."""
        p = self.plan
        milter.set_flags(Milter.CURR_ACTS)
        milter.set_exception_policy(Milter.TEMPFAIL)
        milter.set_connect_callback(self._connect)
        milter.set_helo_callback(self._helo if p.hooks["helo"] else None)
        milter.set_envfrom_callback(self._envfrom if p.envelope else None)
        milter.set_envrcpt_callback(self._envrcpt if p.envelope else None)
        milter.set_header_callback(self._header if p.headers else None)
        milter.set_eoh_callback(self._eoh if p.eoh else None)
        milter.set_body_callback(self._body if p.body else None)
        milter.set_eom_callback(self._eom)
        milter.set_abort_callback(self._abort)
        milter.set_close_callback(self._close)
        milter.setconn(connection)
        if timeout > 0:
            milter.settimeout(timeout)
        milter.register(name, data=self._data, unknown=None, negotiate=self._negotiate)

    # --- helpers ------------------------------------------------------------------------

    def _reply(self, conn: Conn, verdict: Verdict | None, nr_bit: int = 0) -> int:
        if verdict is None or not verdict.final:
            if nr_bit and conn.noreply & nr_bit:
                return int(Milter.NOREPLY)
            return int(Milter.CONTINUE)
        if verdict.reply is not None:
            r = verdict.reply
            try:
                conn.ctx.setreply(str(r.code), r.xcode, *[_ascii(x) for x in r.lines])
            except milter.error as e:
                log.error("%s: cannot set reply %s: %s", conn.session.qid, r, e)
        log.info("%s: %s by %s", conn.session.qid, verdict.describe(), verdict.brain)
        return int(_RESULT[verdict.action])

    def _read_macros(self, conn: Conn, stage: str) -> dict[str, str]:
        ctx = conn.ctx
        values = {}
        for name in self.plan.read_macros[stage]:
            v: str | None = ctx.getsymval(name)
            if v is not None:
                values[name] = v
        return values

    def _macros(self, conn: Conn, stage: str) -> None:
        conn.session.macros(self._read_macros(conn, stage))

    # --- callbacks (run in libmilter's per-connection thread) ----------------------------

    def _negotiate(self, ctx: Any, opts: list[int]) -> int:
        actions_offered, proto_offered = opts[0], opts[1]
        session = self.engine.session()
        conn = Conn(ctx, session)
        ctx.setpriv(conn)
        if self.registry is not None:
            self.registry.add(session)
        want = self.plan.actions
        missing = want & ~actions_offered
        if missing and not self.negotiation_warned:
            self.negotiation_warned = True
            names = [c for c, f in CAPABILITY_FLAGS.items() if f & missing]
            log.error("the MTA does not offer actions %s that configured brains need; "
                      "those edits will be refused", ", ".join(sorted(names)) or hex(missing))
        conn.actions = want & actions_offered
        conn.allowed = frozenset(c for c, f in CAPABILITY_FLAGS.items() if f & conn.actions)
        proto = self.plan.protocol(proto_offered)
        conn.noreply = proto
        opts[0] = conn.actions
        opts[1] = proto
        opts[2] = 0
        opts[3] = 0
        if self.plan.macros and conn.actions & Milter.SETSYMLIST:
            for stage, wanted in self.plan.macros.items():
                try:
                    ctx.setsymlist(SYMLIST_STAGES[stage], " ".join(wanted))
                except milter.error as e:
                    log.error("cannot request macros %s for %s: %s", wanted, stage, e)
        return int(Milter.CONTINUE)

    def _connect(self, ctx: Any, hostname: str, family: int, hostaddr: Any) -> int:
        conn: Conn = ctx.getpriv()
        s = conn.session
        c: Connection = s.connection
        c.hostname = hostname
        if family in (socket.AF_INET, socket.AF_INET6):
            c.family = "inet" if family == socket.AF_INET else "inet6"
            c.address, c.port = hostaddr[0], hostaddr[1]
        elif family == socket.AF_UNIX:
            c.family, c.address = "unix", hostaddr
        self._macros(conn, "connect")
        if not self.plan.hooks["connect"]:
            return self._reply(conn, None, Milter.P_NR_CONN)
        with queue_id(s.qid):
            return self._reply(conn, s.connect(), Milter.P_NR_CONN)

    def _helo(self, ctx: Any, name: str) -> int:
        conn: Conn = ctx.getpriv()
        self._macros(conn, "helo")
        with queue_id(conn.session.qid):
            return self._reply(conn, conn.session.helo(name), Milter.P_NR_HELO)

    def _envfrom(self, ctx: Any, sender: Any, *params: Any) -> int:
        conn: Conn = ctx.getpriv()
        s = conn.session
        macros = self._read_macros(conn, "envfrom")
        if not self.plan.hooks["envfrom"]:
            s.envfrom(_text(sender), tuple(_text(p) for p in params), macros)
            return self._reply(conn, None, Milter.P_NR_MAIL)
        with queue_id(macros.get("i") or s.qid):
            v = s.envfrom(_text(sender), tuple(_text(p) for p in params), macros)
            return self._reply(conn, v, Milter.P_NR_MAIL)

    def _envrcpt(self, ctx: Any, rcpt: Any, *params: Any) -> int:
        conn: Conn = ctx.getpriv()
        s = conn.session
        self._macros(conn, "envrcpt")
        with queue_id(s.qid):
            return self._reply(conn, s.envrcpt(_text(rcpt), tuple(_text(p) for p in params)),
                               Milter.P_NR_RCPT)

    def _data(self, ctx: Any) -> int:
        conn: Conn = ctx.getpriv()
        conn.session.data()
        self._macros(conn, "data")
        return self._reply(conn, None, Milter.P_NR_DATA)

    def _header(self, ctx: Any, name: str, value: bytes) -> int:
        conn: Conn = ctx.getpriv()
        s = conn.session
        if not self.plan.hooks["header"]:
            s.header(name, value)
            return int(Milter.NOREPLY) if conn.noreply & Milter.P_NR_HDR else int(Milter.CONTINUE)
        with queue_id(s.qid):
            return self._reply(conn, s.header(name, value), Milter.P_NR_HDR)

    def _eoh(self, ctx: Any) -> int:
        conn: Conn = ctx.getpriv()
        self._macros(conn, "eoh")
        with queue_id(conn.session.qid):
            return self._reply(conn, conn.session.eoh(), Milter.P_NR_EOH)

    def _body(self, ctx: Any, chunk: bytes) -> int:
        conn: Conn = ctx.getpriv()
        s = conn.session
        if not self.plan.hooks["body"]:
            s.body(chunk)
            return int(Milter.NOREPLY) if conn.noreply & Milter.P_NR_BODY else int(Milter.CONTINUE)
        with queue_id(s.qid):
            return self._reply(conn, s.body(chunk), Milter.P_NR_BODY)

    def _eom(self, ctx: Any) -> int:
        conn: Conn = ctx.getpriv()
        s = conn.session
        self._macros(conn, "eom")
        with queue_id(s.qid):
            try:
                decision = self.run_eom(s, conn.allowed, ctx)
                return self._apply(conn, decision)
            finally:
                s.reset_message()

    def _abort(self, ctx: Any) -> int:
        conn: Conn | None = ctx.getpriv()
        if conn is not None:
            conn.session.abort()
        return int(Milter.CONTINUE)

    def _close(self, ctx: Any) -> int:
        conn: Conn | None = ctx.getpriv()
        if conn is None:
            return int(Milter.CONTINUE)
        try:
            conn.session.close()
            if self.registry is not None:
                self.registry.remove(conn.session)
        finally:
            ctx.setpriv(None)
        return int(Milter.CONTINUE)

    # --- end of message -------------------------------------------------------------------

    def _apply(self, conn: Conn, decision: Decision) -> int:
        """Send the decision: edits in brain order, then quarantine, then the verdict."""
        s = conn.session
        v = decision.verdict
        brains = " ".join(f"{r.brain}={r.outcome}:{r.action.value}" for r in decision.results)
        if v is not None and v.final:
            log.info("%s: %s by %s in %.1f ms [%s]", s.qid, v.describe(), v.brain,
                     decision.seconds * 1000, brains)
            if v.action is Action.DISCARD and decision.ctx.after_accept_jobs:
                _after_accept(decision.ctx, s.qid)
            return self._reply(conn, v)
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
        log.info("%s: accept in %.1f ms, %d edit(s)%s [%s]", s.qid, decision.seconds * 1000,
                 len(decision.ctx.edits),
                 " quarantined" if decision.ctx.quarantine_request else "", brains)
        if decision.ctx.after_accept_jobs:
            _after_accept(decision.ctx, s.qid)
        return int(Milter.ACCEPT)


def _after_accept(ctx: Any, qid: str) -> None:
    """Run brains' after-accept jobs (notices) on their own thread: the MTA
    need not wait for a sendmail process to hear that the message is accepted."""
    from miltermonkey_core.runner import run_after_accept

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
