"""One MTA connection: the milter protocol's commands turned into engine calls.

Each connection runs on its own thread.  It negotiates with the active
configuration generation, feeds every command to the engine session, and
answers every step the MTA waits for, including the ones that arrive in an
order no MTA should send: a repeated negotiation closes the connection with
a log line, a header after the body is answered and ignored with a log line,
a CONNECT inside a session starts a new one.  Nothing is ever left
unanswered while the MTA waits, and nothing waits on a silent MTA for ever:
every read is bounded by the timeout of the stage the connection is in.

After SMFIC_QUIT_NC the socket stays open for the MTA's next SMTP session
(libmilter's connection reuse): whatever the last message's outcome, the
next CONNECT, or a new negotiation, starts a fresh session.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Callable
from typing import Protocol

import attrs

from miltermonkey_core.contract.model import Connection
from miltermonkey_core.contract.verdict import Verdict
from miltermonkey_core.engine.chain import MtaDecides, policy_verdict
from miltermonkey_core.engine.session import Decision, Session
from miltermonkey_core.logs import ROOT, queue_id
from miltermonkey_core.milter import protocol as p
from miltermonkey_core.milter.generation import Generation
from miltermonkey_core.milter.outcome import answer
from miltermonkey_core.milter.replies import PROGRESS, verdict_packet

log = logging.getLogger(f"{ROOT}.milter")

#: The reply bit of each step the MTA may send without waiting for an answer.
_NR_BITS = {
    p.SMFIC_CONNECT: p.SMFIP_NR_CONN, p.SMFIC_HELO: p.SMFIP_NR_HELO,
    p.SMFIC_MAIL: p.SMFIP_NR_MAIL, p.SMFIC_RCPT: p.SMFIP_NR_RCPT,
    p.SMFIC_DATA: p.SMFIP_NR_DATA, p.SMFIC_HEADER: p.SMFIP_NR_HDR,
    p.SMFIC_EOH: p.SMFIP_NR_EOH, p.SMFIC_BODY: p.SMFIP_NR_BODY,
    p.SMFIC_UNKNOWN: p.SMFIP_NR_UNKN,
}
_FAMILIES = {p.SMFIA_INET: "inet", p.SMFIA_INET6: "inet6", p.SMFIA_UNIX: "unix"}

#: The largest packet taken from an MTA: a body chunk is at most 64 KiB and a
#: header at most Postfix's ``header_size_limit`` (100 KiB by default); past
#: this the peer is broken or hostile, and the connection is closed.
MAX_PACKET = 2 * 1024 * 1024


@attrs.frozen
class Timeouts:
    """How long a silent MTA is waited for, by stage (seconds)."""

    #: From accept until the negotiation is complete (the MTA speaks first, at once).
    negotiate: float = 30.0
    #: Between commands, inside a message or not: the MTA's SMTP client may pause.
    idle: float = 600.0
    #: Inside one packet, once its length prefix arrived.
    partial: float = 30.0


class ConnectionHost(Protocol):
    """What a connection needs from the server running it."""

    def generation(self) -> Generation | None:
        """The configuration new sessions negotiate with."""

    def run_eom(self, session: Session, allowed: frozenset[str], progress: Callable[[], None],
                gen: Generation) -> Decision:
        """Run the chain at end of message, keeping the MTA informed with ``progress``."""

    def session_opened(self, session: Session) -> None: ...

    def session_closed(self, session: Session) -> None: ...

    def negotiated(self, conn: MilterConnection) -> None:
        """The connection sent its OPTNEG (it is an MTA, not a stalled client)."""


class ProtocolViolation(Exception):
    """The MTA sent something that ends the connection; the text says what."""


class MilterConnection:
    """The conversation with one MTA connection; :meth:`serve` runs it to the end."""

    def __init__(self, sock: socket.socket, peer: str, host: ConnectionHost,
                 timeouts: Timeouts, *, tcp: bool, max_packet: int = MAX_PACKET) -> None:
        self.sock = sock
        self.peer = peer
        self.host = host
        self.timeouts = timeouts
        self.reader = p.PacketReader(sock, max_packet, quickack=tcp)
        self.started = time.monotonic()
        self.gen: Generation | None = None
        self.session: Session | None = None
        self.actions = 0
        self.allowed: frozenset[str] = frozenset()
        self.noreply = 0
        #: The MTA sent QUIT_NC: the next command starts a new SMTP session.
        self.reuse = False
        #: Macros of the current stage commands, by the command they go with.
        self.macros: dict[str, dict[str, str]] = {}
        #: An error in a step the MTA did not wait for: the message's verdict
        #: at end of message is the daemon's failure policy.
        self.pending_error: str | None = None
        #: The body has started: a header or end of headers now is out of order.
        self.in_body = False
        #: MAIL opened the message (a step before it is logged once per message).
        self.mail_seen = self.order_warned = False
        #: The current session saw its CONNECT.
        self.connected = False
        self.closed = False
        #: Closed by the server (evicted, or at shutdown), which logged it already.
        self.aborted = False

    @property
    def qid(self) -> str:
        return self.session.qid if self.session is not None else self.peer

    # --- the loop -----------------------------------------------------------------------

    def serve(self) -> None:
        """Read and answer commands until the MTA quits, goes silent or breaks the protocol."""
        try:
            self._loop()
        except p.PacketTimeout as e:
            stage = "before negotiating" if self.gen is None else (
                "inside a message" if self.session is not None and self.session.in_message
                else "between messages")
            log.warning("%s: closing the connection from %s: %s (%s)", self.qid, self.peer,
                        e, stage)
        except (p.FramingError, ProtocolViolation) as e:
            if not self.aborted:
                log.warning("%s: closing the connection from %s: %s", self.qid, self.peer, e)
        except OSError as e:
            if not self.closed and not self.aborted:
                log.info("%s: connection from %s lost: %s", self.qid, self.peer, e)
        except Exception as e:
            log.error("%s: internal error on the connection from %s: %s: %s", self.qid,
                      self.peer, type(e).__name__, e, exc_info=e)
        finally:
            self.close()

    def _loop(self) -> None:
        t = self.timeouts
        read = self.reader.read
        cmd_data = read(t.negotiate, t.negotiate)
        if cmd_data is None:
            return
        cmd, data = cmd_data
        if cmd != p.SMFIC_OPTNEG:
            raise ProtocolViolation(f"the first command must be OPTNEG, got {cmd!r}")
        self.host.negotiated(self)  # it speaks: no stalled client to evict in a flood
        self._send(self._optneg(data))
        handlers = _HANDLERS
        while True:
            cmd_data = read(t.idle, t.partial)
            if cmd_data is None:
                return
            cmd, data = cmd_data
            if cmd == p.SMFIC_QUIT:
                return
            handler = handlers.get(cmd)
            if handler is None:
                if cmd == p.SMFIC_OPTNEG and self.reuse:
                    self._renegotiate(data)
                    continue
                if cmd == p.SMFIC_OPTNEG:
                    raise ProtocolViolation("a second OPTNEG inside a session")
                raise ProtocolViolation(f"unknown command {cmd!r}")
            answer = handler(self, data)
            if answer is not None:
                self._send(answer)

    def _send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def progress(self) -> None:
        """SMFIR_PROGRESS: the MTA restarts its timeout while the brains work."""
        with contextlib.suppress(OSError):
            self._send(PROGRESS)

    # --- negotiation and sessions -------------------------------------------------------

    def _optneg(self, data: bytes) -> bytes:
        gen = self.host.generation()
        if gen is None:
            raise ProtocolViolation("no configuration is active yet")
        try:
            version, actions, proto = gen.plan.parse_offer(data)
        except ValueError as e:
            raise ProtocolViolation(f"bad OPTNEG: {e}") from None
        gen.acquire()
        self.gen = gen
        reply, self.actions, self.noreply = gen.plan.reply(version, actions, proto)
        missing = gen.plan.actions & ~actions & ~p.SMFIF_SETSYMLIST
        if missing:
            log.warning("%s: the MTA does not offer actions %s that configured brains need; "
                        "those edits will be refused", self.peer,
                        ", ".join(p.describe_actions(missing)))
        self.allowed = gen.plan.allowed(self.actions)
        self._new_session()
        return p.encode_packet(p.SMFIC_OPTNEG, reply)

    def _renegotiate(self, data: bytes) -> None:
        """OPTNEG after QUIT_NC: the MTA starts over on this socket, maybe on a new generation."""
        self._end_session()
        if self.gen is not None:
            self.gen.release()
            self.gen = None
        self.reuse = False
        self._send(self._optneg(data))

    def _new_session(self) -> Session:
        assert self.gen is not None
        session = self.gen.engine.session()
        self.session = session
        self.macros = {}
        self.pending_error = None
        self.in_body = False
        self.mail_seen = self.order_warned = False
        self.connected = False
        self.host.session_opened(session)
        return session

    def _end_session(self) -> None:
        session, self.session = self.session, None
        if session is None:
            return
        try:
            with queue_id(session.qid):
                session.close()
        finally:
            self.host.session_closed(session)

    def _live(self) -> Session:
        """The session a command belongs to, started afresh where the last one ended."""
        session = self.session
        if session is None or self.reuse:
            self.reuse = False
            self._end_session()
            return self._new_session()
        if session.closed:
            # freed by cid_timeout while the MTA kept the connection: start afresh
            log.info("%s: the MTA spoke again after cid_timeout freed the session; resuming",
                     session.connection.id)
            session.reopen()
            self.host.session_opened(session)
        return session

    def close(self) -> None:
        """End the session and the connection (idempotent; from any thread)."""
        if self.closed:
            return
        self.closed = True
        try:
            self._end_session()
        finally:
            if self.gen is not None:
                self.gen.release()
                self.gen = None
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                self.sock.close()

    def abort_connection(self) -> None:
        """Wake the connection's thread from another thread: its next read fails."""
        self.aborted = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    # --- replies ------------------------------------------------------------------------

    def _answer(self, cmd: str, verdict: Verdict | None) -> bytes | None:
        if isinstance(verdict, MtaDecides):
            log.warning("%s: %s: dropping the milter connection so the MTA applies its "
                        "default action", self.qid, verdict.reason)
            raise ConnectionAbortedError(verdict.reason)
        if verdict is not None and verdict.final:
            log.info("%s: %s by %s", self.qid, verdict.describe(), verdict.brain)
            if self.noreply & _NR_BITS.get(cmd, 0):
                # the MTA does not wait for this step: the message's verdict at EOM
                self.pending_error = self.pending_error or verdict.describe()
                return None
            return verdict_packet(verdict)
        if self.noreply & _NR_BITS.get(cmd, 0):
            return None
        return verdict_packet(None)

    def _policy(self) -> str:
        gen = self.gen or self.host.generation()
        return str(gen.daemon.on_error) if gen is not None else "tempfail"

    def _failed(self, cmd: str, stage: str, error: Exception) -> bytes | None:
        """An exception in the core at ``stage``: log it, apply the daemon's policy."""
        policy = self._policy()
        log.error("%s: internal error at %s: %s: %s; policy %s", self.qid, stage,
                  type(error).__name__, error, policy, exc_info=error)
        if self.noreply & _NR_BITS.get(cmd, 0):
            self.pending_error = f"internal error at {stage}"
            return None
        return self._answer(cmd, policy_verdict(policy, "core", f"internal error at {stage}"))

    def _malformed(self, cmd: str, why: str) -> bytes | None:
        """Mail no MTA would send: the daemon's failure policy, as for an internal error."""
        policy = self._policy()
        log.error("%s: malformed message from %s: %s; policy %s", self.qid, self.peer, why,
                  policy)
        if self.noreply & _NR_BITS.get(cmd, 0):
            self.pending_error = why
            return None
        return self._answer(cmd, policy_verdict(policy, "core", why))

    def _stage(self, cmd: str, stage: str, call: Callable[[Session], Verdict | None]
               ) -> bytes | None:
        session = self._live()
        try:
            with queue_id(session.qid):
                verdict = call(session)
        except Exception as e:
            return self._failed(cmd, stage, e)
        return self._answer(cmd, verdict)

    # --- commands -----------------------------------------------------------------------

    def _macro(self, data: bytes) -> None:
        if not data:
            raise ProtocolViolation("empty macro packet")
        stage = chr(data[0])
        if stage not in _HANDLERS:
            # bounds what a peer can park here to one packet per command
            log.warning("%s: macros for an unknown stage %r from %s; ignored", self.qid, stage,
                        self.peer)
            return
        body = data[1:-1] if data.endswith(b"\0") else data[1:]
        try:
            items = body.decode("utf-8").split("\0") if body else []
        except UnicodeDecodeError:
            items = self._text_macros(stage, data[1:])
        if len(items) % 2:
            self._odd_macros(stage, items[-1])
        # each stage's packet replaces the last
        self.macros[stage] = dict(zip(items[0::2], items[1::2], strict=False))

    def _odd_macros(self, stage: str, name: str | bytes) -> None:
        log.warning("%s: macro packet for stage %r from %s has an odd number of strings; "
                    "%r has no value, ignored", self.qid, stage, self.peer, name)

    def _text_macros(self, stage: str, data: bytes) -> list[str]:
        """Name/value strings, leaving out pairs that are not UTF-8 (with a log line)."""
        raw = p.split_nul_strings(data)
        if len(raw) % 2:
            self._odd_macros(stage, raw[-1])
        items: list[str] = []
        for name, value in zip(raw[0::2], raw[1::2], strict=False):
            try:
                items += (name.decode("utf-8"), value.decode("utf-8"))
            except UnicodeDecodeError:
                log.warning("%s: macro %r is not UTF-8; ignored", self.qid, name)
        return items

    def _stage_macros(self, session: Session, cmd: str) -> None:
        values = self.macros.pop(cmd, None)
        if values:
            session.macros(values)

    def _connect(self, data: bytes) -> bytes | None:
        if self.connected and not self.reuse:
            log.warning("%s: CONNECT inside a session from %s: starting a new session",
                        self.qid, self.peer)
            self._end_session()
            self._new_session()

        def call(session: Session) -> Verdict | None:
            self.connected = True
            c: Connection = session.connection
            host, _, rest = data.partition(b"\0")
            c.hostname = host.decode("utf-8", "surrogateescape")
            family = chr(rest[0]) if rest else p.SMFIA_UNKNOWN
            c.family = _FAMILIES.get(family, "unknown")
            if family in (p.SMFIA_INET, p.SMFIA_INET6) and len(rest) >= 3:
                c.port = int.from_bytes(rest[1:3], "big")
                c.address = rest[3:].rstrip(b"\0").decode("ascii", "replace")
            elif family == p.SMFIA_UNIX:
                c.address = rest[3:].rstrip(b"\0").decode("utf-8", "surrogateescape")
            self._stage_macros(session, p.SMFIC_CONNECT)
            if not session.engine.chain.implemented("connect"):
                return None
            return session.connect()

        return self._stage(p.SMFIC_CONNECT, "connect", call)

    def _helo(self, data: bytes) -> bytes | None:
        name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")

        def call(session: Session) -> Verdict | None:
            self._stage_macros(session, p.SMFIC_HELO)
            return session.helo(name)

        return self._stage(p.SMFIC_HELO, "helo", call)

    def _before_mail(self, what: str) -> None:
        """Log a step of a message that came before its MAIL (answered all the same)."""
        if self.mail_seen or self.order_warned or self.noreply & p.SMFIP_NOMAIL:
            return
        self.order_warned = True
        log.warning("%s: %s before MAIL, from %s: out of order, answered as it comes",
                    self.qid, what, self.peer)

    def _mail(self, data: bytes) -> bytes | None:
        args = [a.decode("utf-8", "surrogateescape") for a in p.split_nul_strings(data)]
        self.pending_error = None  # a new message starts
        self.in_body = False
        self.mail_seen, self.order_warned = True, False

        def call(session: Session) -> Verdict | None:
            return session.envfrom(args[0] if args else "", tuple(args[1:]),
                                   self.macros.pop(p.SMFIC_MAIL, None))

        return self._stage(p.SMFIC_MAIL, "envfrom", call)

    def _rcpt(self, data: bytes) -> bytes | None:
        self._before_mail("RCPT")
        args = [a.decode("utf-8", "surrogateescape") for a in p.split_nul_strings(data)]

        def call(session: Session) -> Verdict | None:
            self._stage_macros(session, p.SMFIC_RCPT)
            return session.envrcpt(args[0] if args else "", tuple(args[1:]))

        return self._stage(p.SMFIC_RCPT, "envrcpt", call)

    def _data(self, data: bytes) -> bytes | None:
        self._before_mail("DATA")

        def call(session: Session) -> Verdict | None:
            self._stage_macros(session, p.SMFIC_DATA)
            return session.data()

        return self._stage(p.SMFIC_DATA, "data", call)

    def _late(self, cmd: str, what: str) -> bytes | None:
        log.warning("%s: %s after the body started, from %s: out of order, ignored",
                    self.qid, what, self.peer)
        return self._answer(cmd, None)

    def _header(self, data: bytes) -> bytes | None:
        if self.in_body:
            return self._late(p.SMFIC_HEADER, "a header")
        self._before_mail("a header")
        raw_name, _, rest = data.partition(b"\0")
        value = rest[:-1] if rest.endswith(b"\0") else rest
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            # Neither Postfix nor Sendmail sends such a name (to them a line whose
            # name is not text is no header): the message is not what it claims.
            return self._malformed(p.SMFIC_HEADER, f"header name {raw_name!r} is not UTF-8")
        return self._stage(p.SMFIC_HEADER, "header", lambda s: s.header(name, value))

    def _eoh(self, data: bytes) -> bytes | None:
        if self.in_body:
            return self._late(p.SMFIC_EOH, "end of headers")
        self._before_mail("end of headers")

        def call(session: Session) -> Verdict | None:
            self._stage_macros(session, p.SMFIC_EOH)
            return session.eoh()

        return self._stage(p.SMFIC_EOH, "eoh", call)

    def _body(self, data: bytes) -> bytes | None:
        self._before_mail("a body chunk")
        self.in_body = True
        return self._stage(p.SMFIC_BODY, "body", lambda s: s.body(data))

    def _unknown(self, data: bytes) -> bytes | None:
        return self._answer(p.SMFIC_UNKNOWN, None)

    def _abort(self, data: bytes) -> None:
        # Postfix may send ABORT twice after EOM; the second finds no message.
        self.pending_error = None
        self.in_body = False
        self.mail_seen = self.order_warned = False
        session = self.session
        if session is not None and not self.reuse:
            try:
                with queue_id(session.qid):
                    session.abort()
            except Exception as e:
                log.error("%s: internal error at abort: %s: %s", session.qid,
                          type(e).__name__, e, exc_info=e)

    def _quit_nc(self, data: bytes) -> None:
        """The SMTP session ended; the MTA keeps this socket for its next one."""
        self._end_session()
        self.reuse = True

    # --- end of message -----------------------------------------------------------------

    def _eom(self, data: bytes) -> bytes | None:
        self._before_mail("end of message")
        session = self._live()
        gen = self.gen
        assert gen is not None
        self.in_body = False
        self.mail_seen = self.order_warned = False
        try:
            session.ensure_message()  # so the EOM macros (the queue id) land on it
            # Macros of steps negotiated away (DATA, say) arrive all the same;
            # they are the message's too, with end of message's last.
            eom_macros = self.macros.pop(p.SMFIC_BODYEOB, None)
            for values in self.macros.values():
                session.macros(values)
            self.macros.clear()
            if eom_macros:
                session.macros(eom_macros)
            if data:
                session.body(data)  # libmilter's last chunk, if the MTA sent one here
            with queue_id(session.qid):
                try:
                    if self.pending_error is not None:
                        policy = self._policy()
                        log.error("%s: %s while the message was received; policy %s",
                                  session.qid, self.pending_error, policy)
                        v = policy_verdict(policy, "core", self.pending_error)
                        if v is not None:
                            return self._answer(p.SMFIC_BODYEOB, v)
                    decision = self.host.run_eom(session, self.allowed, self.progress, gen)
                    return answer(session, decision, self.allowed, self.gen)
                finally:
                    self.pending_error = None
                    session.reset_message()
        except ConnectionAbortedError:
            raise
        except Exception as e:
            return self._failed(p.SMFIC_BODYEOB, "eom", e)

#: The method that answers each command (one table for every connection).
_HANDLERS: dict[str, Callable[[MilterConnection, bytes], bytes | None]] = {
    p.SMFIC_MACRO: MilterConnection._macro, p.SMFIC_CONNECT: MilterConnection._connect,
    p.SMFIC_HELO: MilterConnection._helo, p.SMFIC_MAIL: MilterConnection._mail,
    p.SMFIC_RCPT: MilterConnection._rcpt, p.SMFIC_DATA: MilterConnection._data,
    p.SMFIC_HEADER: MilterConnection._header, p.SMFIC_EOH: MilterConnection._eoh,
    p.SMFIC_BODY: MilterConnection._body, p.SMFIC_BODYEOB: MilterConnection._eom,
    p.SMFIC_ABORT: MilterConnection._abort, p.SMFIC_UNKNOWN: MilterConnection._unknown,
    p.SMFIC_QUIT_NC: MilterConnection._quit_nc,
}
