"""Whole SMTP transactions through a milter, as Postfix sends them; for tests.

Why this exists: a brain (or the whole MilterMonkey milter) is only really
tested when it is driven over a real socket by something that behaves like
Postfix: same packet order, same macros, same handling of the negotiated
"no reply"/"no step" bits, same interpretation of the end-of-message edits.
Spinning up Postfix in every unit test is too slow and too fragile, and the
GPL'd ``miltertest`` package cannot be a dependency, so this is our own,
small, strict implementation.

Strictness is the point.  Where a real MTA would log a milter bug and fall
back to its default action, the client raises
(:class:`~miltermonkey_core.milter.protocol.MilterProtocolError` and
subclasses) so that the bug fails the test that provoked it.

Layers, from low to high:

* :class:`~miltermonkey_core.testing.connection.MilterConnection`: one method
  per protocol step;
* :meth:`MilterClient.send_message` runs one whole SMTP transaction the way
  Postfix's smtpd + cleanup do (macros included) and returns a
  :class:`SessionResult`, with the edits applied by
  :mod:`miltermonkey_core.testing.cleanup`;
* :func:`run_session` wraps connect, negotiate, several messages and quit.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

import attrs

from miltermonkey_core.milter.protocol import (
    ALL_V6_ACTIONS,
    ALL_V6_PROTOCOL_BITS,
    MILTER_CHUNK_SIZE,
    SMFI_PROT_VERSION,
    SMFIA_INET,
    SMFIA_INET6,
    SMFIC_BODY,
    SMFIC_BODYEOB,
    SMFIC_CONNECT,
    SMFIC_DATA,
    SMFIC_EOH,
    SMFIC_HEADER,
    SMFIC_HELO,
    SMFIC_MAIL,
    SMFIC_RCPT,
    SMFIC_UNKNOWN,
    SMFIM_CONNECT,
    SMFIM_DATA,
    SMFIM_ENVFROM,
    SMFIM_ENVRCPT,
    SMFIM_EOH,
    SMFIM_EOM,
    SMFIM_HELO,
    SMFIR_DISCARD,
    encode_strings,
)
from miltermonkey_core.testing.cleanup import (
    AppliedMessage,
    EomResult,
    bare_address,
    parse_message,
)
from miltermonkey_core.testing.connection import (
    DEFAULT_TIMEOUT,
    MilterAddress,
    MilterConnection,
)
from miltermonkey_core.testing.replies import Disposition, Negotiated, Reply, SmtpReply, Stage

__all__ = [
    "DEFAULT_HELO",
    "DEFAULT_MTA_VERSION",
    "ConnectInfo",
    "MessageSpec",
    "MilterClient",
    "SessionResult",
    "run_session",
]

DEFAULT_HELO: Final = "client.example.test"
#: What Postfix puts in the ``v`` macro (``$mail_name $mail_version``).
DEFAULT_MTA_VERSION: Final = "Postfix 3.7.0"


@attrs.frozen
class ConnectInfo:
    """What the MTA knows about the SMTP client (SMFIC_CONNECT + connect macros).

    ``family`` defaults from ``address``: SMFIA_INET6 if it contains ``:``,
    otherwise SMFIA_INET.  A ``hostname`` of ``"unknown"`` is sent as
    ``"[address]"``, as Postfix does for clients without a verified PTR name.
    """

    hostname: str = "client.example.test"
    address: str = "192.0.2.10"
    port: int = 40000
    family: str | None = None

    @property
    def smfia_family(self) -> str:
        if self.family is not None:
            return self.family
        return SMFIA_INET6 if ":" in self.address else SMFIA_INET

    @property
    def milter_hostname(self) -> str:
        if self.hostname == "unknown" and self.address != "unknown":
            return f"[{self.address}]"
        return self.hostname


@attrs.frozen
class MessageSpec:
    """One message for :func:`run_session`."""

    raw: bytes | str
    sender: str
    recipients: Sequence[str]
    macros: Mapping[str, Mapping[str, str]] | None = None
    mail_args: Sequence[str] = ()
    rcpt_args: Sequence[str] = ()
    #: Postfix's queue id for the message (macro ``i``); random when None.
    queue_id: str | None = None


@attrs.define
class SessionResult:
    """What happened to one message sent with :meth:`MilterClient.send_message`.

    ``disposition``/``reply``/``decided_at`` give the overall outcome; the
    per-step replies and the full ordered ``replies`` log are there for tests
    that care about the details.  ``applied`` is the message as it would be
    queued (edits applied) when the outcome is ACCEPT or CONTINUE, else None.

    Recipient rejection is per recipient (as in SMTP): a rejected RCPT drops
    that recipient only.  If no recipient survives, the message fails with
    REJECT (TEMPFAIL if any of them was tempfailed) at stage RCPT.
    """

    sender: str
    recipients: list[str]
    headers: list[tuple[str, str]]
    body: bytes
    negotiated: Negotiated
    queue_id: str
    disposition: Disposition = Disposition.CONTINUE
    decided_at: Stage | None = None
    reply: SmtpReply | None = None
    replies: list[tuple[Stage, Reply]] = attrs.field(factory=list)
    connect_reply: Reply | None = None
    helo_reply: Reply | None = None
    mail_reply: Reply | None = None
    rcpt_replies: dict[str, Reply | None] = attrs.field(factory=dict)
    accepted_recipients: list[str] = attrs.field(factory=list)
    rejected_recipients: dict[str, Reply] = attrs.field(factory=dict)
    data_reply: Reply | None = None
    eoh_reply: Reply | None = None
    eom: EomResult | None = None
    applied: AppliedMessage | None = None

    @property
    def accepted(self) -> bool:
        """True if the message would be queued (possibly edited or quarantined)."""
        return self.disposition in (Disposition.ACCEPT, Disposition.CONTINUE)

    @property
    def rejected(self) -> bool:
        return self.disposition is Disposition.REJECT

    @property
    def tempfailed(self) -> bool:
        return self.disposition is Disposition.TEMPFAIL

    @property
    def discarded(self) -> bool:
        return self.disposition is Disposition.DISCARD


_STAGE_MACRO_INDEX: Final[Mapping[str, int]] = {
    SMFIC_CONNECT: SMFIM_CONNECT,
    SMFIC_HELO: SMFIM_HELO,
    SMFIC_MAIL: SMFIM_ENVFROM,
    SMFIC_RCPT: SMFIM_ENVRCPT,
    SMFIC_DATA: SMFIM_DATA,
    SMFIC_HEADER: SMFIM_EOH,  # Postfix sends the end-of-header macros with each header
    SMFIC_EOH: SMFIM_EOH,
    SMFIC_BODY: SMFIM_EOM,  # ... and the end-of-data macros with each body chunk
    SMFIC_BODYEOB: SMFIM_EOM,
}

_STAGE_NAMES: Final[Mapping[str, str]] = {
    "connect": SMFIC_CONNECT,
    "helo": SMFIC_HELO,
    "mail": SMFIC_MAIL,
    "envfrom": SMFIC_MAIL,
    "rcpt": SMFIC_RCPT,
    "envrcpt": SMFIC_RCPT,
    "data": SMFIC_DATA,
    "eoh": SMFIC_EOH,
    "eom": SMFIC_BODYEOB,
    "unknown": SMFIC_UNKNOWN,
}


def _macro_name_variants(name: str) -> tuple[str, ...]:
    """``i`` and ``{i}`` name the same macro (Postfix canonicalises both ways)."""
    if name.startswith("{") and name.endswith("}"):
        return (name, name[1:-1])
    return (name, "{" + name + "}")



class MilterClient(MilterConnection):
    """The MTA end of one milter connection, sending whole messages as Postfix does.

    Usage::

        with MilterClient(("127.0.0.1", port)) as client:
            client.negotiate()
            result = client.send_message(raw, "<a@example.org>", ["<b@example.net>"])
            client.quit()

    The single steps (``connect``, ``helo``, ``eom`` ...) are those of
    :class:`~miltermonkey_core.testing.connection.MilterConnection`.
    """

    def _new_smtp_connection(self) -> None:
        # CONNECT and HELO go to the milter once per SMTP connection, and a
        # final reply there decides every later message of it.
        self._connect_sent = False
        self._helo_sent = False
        self._connection_decision: tuple[Stage, Reply] | None = None
        self._connection_macros: dict[str, str] = {}
    # ------------------------------------------------------------------ whole messages

    def _send_stage_macros(
        self, cmd: str, stage_values: Mapping[str, str], known: Mapping[str, str]
    ) -> None:
        """Send the macros for step ``cmd`` the way Postfix chooses them.

        Without a setsymlist for the stage: the stage's own list (``stage_values``).
        With one: exactly the requested names, looked up in everything known so
        far, because Postfix resolves a milter's list against all its macros.
        """
        negotiated = self._require_negotiated()
        wanted = negotiated.macro_lists.get(_STAGE_MACRO_INDEX.get(cmd, -1))
        if wanted is None:
            values = dict(stage_values)
        else:
            values = {}
            for name in wanted:
                for variant in _macro_name_variants(name):
                    if variant in known:
                        values[name] = known[variant]
                        break
        if values:
            self.macros(cmd, values)

    def send_message(
        self,
        raw: bytes | str,
        sender: str,
        recipients: Sequence[str],
        *,
        macros: Mapping[str, Mapping[str, str]] | None = None,
        connect_info: ConnectInfo | None = None,
        helo: str | None = DEFAULT_HELO,
        mail_args: Sequence[str] = (),
        rcpt_args: Sequence[str] = (),
        queue_id: str | None = None,
    ) -> SessionResult:
        """Run one SMTP transaction through the milter, as Postfix would.

        On the first call of a connection this also sends CONNECT (with
        ``connect_info``) and HELO (if ``helo`` is not None); later calls reuse
        them, so several calls make several messages on one connection.

        Order and macros (Postfix defaults, overridable per stage through
        ``macros={"connect": {...}, "helo": {...}, "mail": {...}, "rcpt": {...},
        "data": {...}, "eoh": {...}, "eom": {...}}``): connect gets ``j``,
        ``{daemon_name}``, ``{daemon_addr}``, ``v``, ``_``, ``{client_addr}``,
        ``{client_name}``, ``{client_port}``; mail ``i``, ``{mail_addr}``; each rcpt
        ``i``, ``{rcpt_addr}``; data/eoh/eom ``i``.  Header packets carry the eoh
        macros and body packets the eom macros, as Postfix sends them.

        Early final replies are honoured like Postfix: REJECT/TEMPFAIL at RCPT
        drops that recipient only; ACCEPT before EOM stops talking to the milter
        about this message (it is accepted unchanged); at CONNECT/HELO a final
        reply decides every later message of this connection.  After the
        transaction SMFIC_ABORT is sent, as Postfix's smtpd does after every
        message (libmilter ignores it after a completed EOM).
        """
        negotiated = self._require_negotiated()
        parsed = parse_message(raw)
        headers = parsed.milter_headers(negotiated.header_leading_space)
        qid = queue_id if queue_id is not None else secrets.token_hex(5).upper()
        user = {
            _STAGE_NAMES.get(stage, stage): dict(values) for stage, values in (macros or {}).items()
        }
        result = SessionResult(
            sender=sender,
            recipients=list(recipients),
            headers=headers,
            body=parsed.body,
            negotiated=negotiated,
            queue_id=qid,
        )

        def decide(stage: Stage, reply: Reply, disposition: Disposition | None = None) -> None:
            result.decided_at = stage
            result.disposition = disposition or reply.disposition or Disposition.CONTINUE
            result.reply = reply.smtp

        def record(stage: Stage, reply: Reply | None) -> Reply | None:
            if reply is not None:
                result.replies.append((stage, reply))
            return reply

        def finish_unchanged() -> SessionResult:
            if result.accepted:
                result.applied = AppliedMessage(
                    headers=list(headers),
                    body=parsed.body,
                    sender=sender,
                    sender_esmtp_args="",
                    recipients=list(result.accepted_recipients),
                    quarantine_reason=None,
                    header_leading_space=negotiated.header_leading_space,
                )
            return result

        # ---- connection level (once per connection) -------------------------
        if self._connection_decision is None and not self._connect_sent:
            info = connect_info or ConnectInfo()
            conn_macros = {
                "j": self.mta_hostname,
                "{daemon_name}": self.mta_hostname,
                "{daemon_addr}": "127.0.0.1",
                "v": DEFAULT_MTA_VERSION,
                "_": f"{info.hostname} [{info.address}]",
                "{client_addr}": info.address,
                "{client_name}": info.hostname,
                "{client_port}": str(info.port),
            }
            conn_macros.update(user.get(SMFIC_CONNECT, {}))
            self._connection_macros.update(conn_macros)
            self._send_stage_macros(SMFIC_CONNECT, conn_macros, self._connection_macros)
            reply = record(
                Stage.CONNECT,
                self.connect(info.milter_hostname, info.smfia_family, info.port, info.address),
            )
            result.connect_reply = reply
            self._connect_sent = True
            if reply is not None and reply.is_final and reply.code != SMFIR_DISCARD:
                self._connection_decision = (Stage.CONNECT, reply)
        if self._connection_decision is None and not self._helo_sent and helo is not None:
            helo_macros = dict(user.get(SMFIC_HELO, {}))
            self._connection_macros.update(helo_macros)
            self._send_stage_macros(SMFIC_HELO, helo_macros, self._connection_macros)
            reply = record(Stage.HELO, self.helo(helo))
            result.helo_reply = reply
            self._helo_sent = True
            if reply is not None and reply.is_final and reply.code != SMFIR_DISCARD:
                self._connection_decision = (Stage.HELO, reply)
        if self._connection_decision is not None:
            # Postfix stops talking to this milter for the rest of the SMTP
            # connection and applies its decision to every message.
            stage, reply = self._connection_decision
            decide(stage, reply)
            result.accepted_recipients = list(recipients)
            return finish_unchanged()

        # ---- envelope ------------------------------------------------------
        known: dict[str, str] = dict(self._connection_macros)

        def stage_macros(cmd: str, defaults: Mapping[str, str]) -> dict[str, str]:
            values = dict(defaults)
            values.update(user.get(cmd, {}))
            known.update(values)
            return values

        def transaction() -> SessionResult:
            mail_macros = stage_macros(SMFIC_MAIL, {"i": qid, "{mail_addr}": bare_address(sender)})
            self._send_stage_macros(SMFIC_MAIL, mail_macros, known)
            reply = record(Stage.MAIL, self.mail(sender, *mail_args))
            result.mail_reply = reply
            if reply is not None and reply.is_final:
                decide(Stage.MAIL, reply)
                if result.accepted or result.discarded:
                    # The MTA goes on with the transaction without this milter.
                    result.accepted_recipients = list(recipients)
                return finish_unchanged()

            message_accepted = False  # SMFIR_ACCEPT: no more events for this message
            discard = False
            failures: list[Reply] = []
            for rcpt in recipients:
                if message_accepted or discard:
                    result.rcpt_replies[rcpt] = None
                    result.accepted_recipients.append(rcpt)
                    continue
                rcpt_macros = stage_macros(
                    SMFIC_RCPT, {"i": qid, "{rcpt_addr}": bare_address(rcpt)}
                )
                self._send_stage_macros(SMFIC_RCPT, rcpt_macros, known)
                reply = record(Stage.RCPT, self.rcpt(rcpt, *rcpt_args))
                result.rcpt_replies[rcpt] = reply
                disposition = None if reply is None else reply.disposition
                if disposition in (Disposition.REJECT, Disposition.TEMPFAIL):
                    assert reply is not None
                    result.rejected_recipients[rcpt] = reply
                    failures.append(reply)
                    continue
                result.accepted_recipients.append(rcpt)
                if disposition is Disposition.ACCEPT:
                    assert reply is not None
                    message_accepted = True
                    decide(Stage.RCPT, reply)
                elif disposition is Disposition.DISCARD:
                    assert reply is not None
                    discard = True
                    decide(Stage.RCPT, reply)

            if not result.accepted_recipients:
                last = failures[-1]
                tempfail = any(r.disposition is Disposition.TEMPFAIL for r in failures)
                decide(
                    Stage.RCPT,
                    last,
                    Disposition.TEMPFAIL if tempfail else Disposition.REJECT,
                )
                return finish_unchanged()
            if message_accepted or discard:
                return finish_unchanged()

            # ---- content -------------------------------------------------------
            data_macros = stage_macros(SMFIC_DATA, {"i": qid})
            self._send_stage_macros(SMFIC_DATA, data_macros, known)
            reply = record(Stage.DATA, self.data())
            result.data_reply = reply
            if reply is not None and reply.is_final:
                decide(Stage.DATA, reply)
                return finish_unchanged()

            eoh_macros = stage_macros(SMFIC_EOH, {"i": qid})
            eom_macros = stage_macros(SMFIC_BODYEOB, {"i": qid})

            for name, value in headers:
                self._send_stage_macros(SMFIC_HEADER, eoh_macros, known)
                # ``headers`` are already in wire form; bypass header()'s space rule.
                reply = record(Stage.HEADER, self._step(SMFIC_HEADER, encode_strings(name, value)))
                if reply is not None and reply.is_final:
                    decide(Stage.HEADER, reply)
                    return finish_unchanged()
                if reply is not None and reply.is_skip:
                    break

            self._send_stage_macros(SMFIC_EOH, eoh_macros, known)
            reply = record(Stage.EOH, self.eoh())
            result.eoh_reply = reply
            if reply is not None and reply.is_final:
                decide(Stage.EOH, reply)
                return finish_unchanged()

            for start in range(0, len(parsed.body), MILTER_CHUNK_SIZE):
                self._send_stage_macros(SMFIC_BODY, eom_macros, known)
                reply = record(
                    Stage.BODY, self.body(parsed.body[start : start + MILTER_CHUNK_SIZE])
                )
                if reply is not None and reply.is_final:
                    decide(Stage.BODY, reply)
                    return finish_unchanged()
                if reply is not None and reply.is_skip:
                    break

            self._send_stage_macros(SMFIC_BODYEOB, eom_macros, known)
            eom = self.eom()
            result.eom = eom
            result.replies.append((Stage.EOM, eom.final))
            decide(Stage.EOM, eom.final)
            if result.accepted:
                result.applied = eom.apply(headers, parsed.body, sender, result.accepted_recipients)
            return result

        outcome = transaction()
        # Postfix's smtpd calls milter_abort() from mail_reset() after every
        # transaction, whatever its outcome.
        self.abort()
        return outcome


def _coerce_spec(message: MessageSpec | tuple[bytes | str, str, Sequence[str]]) -> MessageSpec:
    if isinstance(message, MessageSpec):
        return message
    raw, sender, recipients = message
    return MessageSpec(raw=raw, sender=sender, recipients=recipients)


def _merge_macros(
    base: Mapping[str, Mapping[str, str]] | None,
    extra: Mapping[str, Mapping[str, str]] | None,
) -> dict[str, dict[str, str]]:
    merged: dict[str, dict[str, str]] = {k: dict(v) for k, v in (base or {}).items()}
    for stage, values in (extra or {}).items():
        merged.setdefault(stage, {}).update(values)
    return merged


def run_session(
    address: MilterAddress,
    messages: Iterable[MessageSpec | tuple[bytes | str, str, Sequence[str]]],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    actions: int = ALL_V6_ACTIONS,
    protocol: int = ALL_V6_PROTOCOL_BITS,
    version: int = SMFI_PROT_VERSION,
    connect_info: ConnectInfo | None = None,
    helo: str | None = DEFAULT_HELO,
    macros: Mapping[str, Mapping[str, str]] | None = None,
    postfix_strict: bool = True,
) -> list[SessionResult]:
    """Connect, negotiate, send every message on one connection, quit.

    ``messages`` are :class:`MessageSpec` or ``(raw, sender, recipients)``
    tuples.  Per-message macros are merged over the session-wide ``macros``.
    Returns one :class:`SessionResult` per message, in order.
    """
    results: list[SessionResult] = []
    with MilterClient(address, timeout, postfix_strict=postfix_strict) as client:
        client.negotiate(actions=actions, protocol=protocol, version=version)
        for message in messages:
            spec = _coerce_spec(message)
            results.append(
                client.send_message(
                    spec.raw,
                    spec.sender,
                    spec.recipients,
                    macros=_merge_macros(macros, spec.macros),
                    connect_info=connect_info,
                    helo=helo,
                    mail_args=spec.mail_args,
                    rcpt_args=spec.rcpt_args,
                    queue_id=spec.queue_id,
                )
            )
        client.quit()
    return results
