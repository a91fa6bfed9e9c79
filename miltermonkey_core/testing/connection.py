"""The MTA end of one milter connection, one method per protocol step.

:class:`MilterConnection` sends exactly one step per call (``connect``,
``helo``, ``mail`` ...), honouring the negotiated ``SMFIP_NO*`` (skip the
step) and ``SMFIP_NR_*`` (do not wait for a reply) bits, and returns the
milter's :class:`~miltermonkey_core.testing.replies.Reply` (or ``None``).
:meth:`MilterConnection.eom` collects every modification request into an
:class:`~miltermonkey_core.testing.cleanup.EomResult`.  Whole SMTP
transactions, with the macros Postfix sends, are
:class:`~miltermonkey_core.testing.client.MilterClient`'s job.

The body is sent with CRLF line endings in chunks of at most 65535 bytes
(``MILTER_CHUNK_SIZE``).
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Mapping
from typing import Final, Self, TypeAlias

from miltermonkey_core.milter.protocol import (
    ALL_V6_ACTIONS,
    ALL_V6_PROTOCOL_BITS,
    MACRO_STAGE_COMMANDS,
    MILTER_CHUNK_SIZE,
    SMFI_PROT_VERSION,
    SMFI_V1_ACTS,
    SMFI_V1_PROT,
    SMFIA_INET,
    SMFIA_UNIX,
    SMFIA_UNKNOWN,
    SMFIC_ABORT,
    SMFIC_BODY,
    SMFIC_BODYEOB,
    SMFIC_CONNECT,
    SMFIC_DATA,
    SMFIC_EOH,
    SMFIC_HEADER,
    SMFIC_HELO,
    SMFIC_MACRO,
    SMFIC_MAIL,
    SMFIC_OPTNEG,
    SMFIC_QUIT,
    SMFIC_QUIT_NC,
    SMFIC_RCPT,
    SMFIC_UNKNOWN,
    SMFIF_ADDHDRS,
    SMFIF_ADDRCPT,
    SMFIF_ADDRCPT_PAR,
    SMFIF_CHGBODY,
    SMFIF_CHGFROM,
    SMFIF_CHGHDRS,
    SMFIF_DELRCPT,
    SMFIF_QUARANTINE,
    SMFIP_SKIP,
    SMFIR_ACCEPT,
    SMFIR_ADDHEADER,
    SMFIR_ADDRCPT,
    SMFIR_ADDRCPT_PAR,
    SMFIR_CHGFROM,
    SMFIR_CHGHEADER,
    SMFIR_CONTINUE,
    SMFIR_DELRCPT,
    SMFIR_DISCARD,
    SMFIR_INSHEADER,
    SMFIR_PROGRESS,
    SMFIR_QUARANTINE,
    SMFIR_REJECT,
    SMFIR_REPLBODY,
    SMFIR_REPLYCODE,
    SMFIR_SKIP,
    SMFIR_TEMPFAIL,
    STEP_FLAGS,
    MilterProtocolError,
    describe_actions,
    describe_protocol,
    encode_macros,
    encode_strings,
    read_packet,
    send_packet,
    split_nul_strings,
)
from miltermonkey_core.testing.cleanup import (
    AddHeader,
    AddRecipient,
    AddRecipientPar,
    ChangeFrom,
    ChangeHeader,
    DeleteRecipient,
    EomAction,
    EomResult,
    InsertHeader,
    Quarantine,
    ReplaceBody,
    decode_wire,
)
from miltermonkey_core.testing.replies import (
    COMMAND_NAMES,
    DISPOSITION_OF_CODE,
    REPLY_NAMES,
    Negotiated,
    NegotiationError,
    PostfixIncompatibleError,
    Reply,
    SmtpReply,
    UnnegotiatedActionError,
)

__all__ = ["DEFAULT_MTA_HOSTNAME", "DEFAULT_TIMEOUT", "MilterAddress", "MilterConnection"]

#: Where to reach a milter: ``("127.0.0.1", port)``, a UNIX socket path, or a
#: libmilter/Postfix style spec string (``"inet:PORT@HOST"``, ``"inet6:PORT@HOST"``,
#: ``"unix:/path"``, ``"local:/path"``).
MilterAddress: TypeAlias = "tuple[str, int] | str | os.PathLike[str]"

DEFAULT_TIMEOUT: Final = 10.0
DEFAULT_MTA_HOSTNAME: Final = "mx.example.test"


_EOM_ACTION_FLAGS: Final[Mapping[str, int]] = {
    SMFIR_ADDHEADER: SMFIF_ADDHDRS,
    SMFIR_INSHEADER: SMFIF_ADDHDRS,
    SMFIR_CHGHEADER: SMFIF_CHGHDRS,
    SMFIR_REPLBODY: SMFIF_CHGBODY,
    SMFIR_ADDRCPT: SMFIF_ADDRCPT,
    SMFIR_ADDRCPT_PAR: SMFIF_ADDRCPT_PAR,
    SMFIR_DELRCPT: SMFIF_DELRCPT,
    SMFIR_CHGFROM: SMFIF_CHGFROM,
    SMFIR_QUARANTINE: SMFIF_QUARANTINE,
}

_INDEX = struct.Struct("!I")
_PORT = struct.Struct("!H")



def _open_socket(address: MilterAddress, timeout: float) -> socket.socket:
    """Connect to ``address``; why a helper: it accepts the libmilter spec strings too."""
    if isinstance(address, tuple):
        host, port = address
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    spec = os.fspath(address)
    for prefix in ("inet:", "inet6:"):
        if spec.startswith(prefix):
            port_text, _, host = spec[len(prefix) :].partition("@")
            return _open_socket((host or "127.0.0.1", int(port_text)), timeout)
    for prefix in ("unix:", "local:"):
        if spec.startswith(prefix):
            spec = spec[len(prefix) :]
            break
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(spec)
    except BaseException:
        sock.close()
        raise
    return sock


class MilterConnection:
    """The MTA end of one milter connection: negotiation and the single protocol steps.

    Every blocking read uses ``timeout`` (seconds), so a milter that does not
    answer fails the test with :class:`TimeoutError` instead of hanging it.

    ``transcript`` records ``(">" | "<", command, data length)`` for every packet
    (``>`` = sent by us), which is the quickest way to see what happened.
    ``progress_count`` counts every SMFIR_PROGRESS seen on this connection.
    """

    def __init__(
        self,
        address: MilterAddress | None,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        postfix_strict: bool = True,
        mta_hostname: str = DEFAULT_MTA_HOSTNAME,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.postfix_strict = postfix_strict
        self.mta_hostname = mta_hostname
        self.negotiated: Negotiated | None = None
        self.transcript: list[tuple[str, str, int]] = []
        self.progress_count = 0
        self._sock: socket.socket | None = (
            _open_socket(address, timeout) if address is not None else None
        )
        self._new_smtp_connection()

    def _new_smtp_connection(self) -> None:
        """A new SMTP connection starts on this milter connection: forget the last one's state.

        Called when the socket opens and after SMFIC_QUIT_NC; a subclass that
        keeps per-connection state (what was sent, what was decided) resets it here.
        """

    # ------------------------------------------------------------------ plumbing

    @classmethod
    def from_socket(
        cls,
        sock: socket.socket,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        postfix_strict: bool = True,
        mta_hostname: str = DEFAULT_MTA_HOSTNAME,
    ) -> Self:
        """Wrap an already connected socket (e.g. one end of ``socket.socketpair()``).

        For in-process milters and for testing this client against scripted
        peers; the client takes ownership and closes it.
        """
        client = cls(None, timeout, postfix_strict=postfix_strict, mta_hostname=mta_hostname)
        sock.settimeout(timeout)
        client._sock = sock
        return client

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket without saying goodbye (as Postfix does after errors)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    @property
    def closed(self) -> bool:
        return self._sock is None

    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise MilterProtocolError("the milter connection is closed")
        return self._sock

    def _send(self, cmd: str, data: bytes = b"") -> None:
        send_packet(self._socket(), cmd, data)
        self.transcript.append((">", cmd, len(data)))

    def _recv(self) -> tuple[str, bytes]:
        cmd, data = read_packet(self._socket())
        self.transcript.append(("<", cmd, len(data)))
        return cmd, data

    def _require_negotiated(self) -> Negotiated:
        if self.negotiated is None:
            raise MilterProtocolError("call negotiate() before any other protocol step")
        return self.negotiated

    # ------------------------------------------------------------------ negotiation

    def negotiate(
        self,
        actions: int = ALL_V6_ACTIONS,
        protocol: int = ALL_V6_PROTOCOL_BITS,
        version: int = SMFI_PROT_VERSION,
    ) -> Negotiated:
        """Send SMFIC_OPTNEG offering ``actions``/``protocol`` and parse the reply.

        The defaults offer everything protocol version 6 defines, which is what
        Postfix (``milter_protocol = 6``) offers too.  An offer of 0 means the
        version 1 defaults (SMFI_V1_ACTS / SMFI_V1_PROT), as libmilter reads it.
        The milter's reply must be a subset of the offer: otherwise
        :class:`NegotiationError`, because an MTA could not honour it.  The
        optional tail of the reply (setsymlist) is parsed into
        :attr:`Negotiated.macro_lists`.
        """
        if self.negotiated is not None:
            raise MilterProtocolError("negotiate() may only be called once per connection")
        self._send(
            SMFIC_OPTNEG, _INDEX.pack(version) + _INDEX.pack(actions) + _INDEX.pack(protocol)
        )
        cmd, data = self._recv()
        if cmd != SMFIC_OPTNEG:
            raise NegotiationError(f"expected an SMFIC_OPTNEG reply, got {cmd!r}")
        if len(data) < 12:
            raise NegotiationError(f"SMFIC_OPTNEG reply too short ({len(data)} bytes)")
        m_version, m_actions, m_protocol = struct.unpack("!III", data[:12])
        # libmilter reads an offer of 0 as "protocol version 1 defaults"
        # (st_optionneg), so that is what the milter may legitimately pick from.
        effective_actions = actions or SMFI_V1_ACTS
        effective_protocol = protocol or SMFI_V1_PROT
        if m_version > version or m_version < 2:
            raise NegotiationError(
                f"milter answered protocol version {m_version}, we offered {version}"
            )
        extra_actions = m_actions & ~effective_actions
        if extra_actions:
            raise NegotiationError(
                "milter requested actions that were not offered: "
                + ", ".join(describe_actions(extra_actions))
            )
        extra_protocol = m_protocol & ~effective_protocol
        if extra_protocol:
            raise NegotiationError(
                "milter requested protocol bits that were not offered: "
                + ", ".join(describe_protocol(extra_protocol))
            )
        self.negotiated = Negotiated(
            version=m_version,
            actions=m_actions,
            protocol=m_protocol,
            offered_version=version,
            offered_actions=actions,
            offered_protocol=protocol,
            macro_lists=self._parse_symlists(data[12:]),
        )
        return self.negotiated

    @staticmethod
    def _parse_symlists(tail: bytes) -> dict[int, tuple[str, ...]]:
        lists: dict[int, tuple[str, ...]] = {}
        offset = 0
        while offset < len(tail):
            if offset + 4 > len(tail):
                raise NegotiationError("truncated macro list in SMFIC_OPTNEG reply")
            (stage,) = _INDEX.unpack_from(tail, offset)
            offset += 4
            end = tail.find(b"\0", offset)
            if end < 0:
                raise NegotiationError("unterminated macro list in SMFIC_OPTNEG reply")
            if stage not in MACRO_STAGE_COMMANDS:
                raise NegotiationError(f"unknown macro stage {stage} in SMFIC_OPTNEG reply")
            names = decode_wire(tail[offset:end]).replace(",", " ").split()
            lists[stage] = tuple(names)
            offset = end + 1
        return lists

    # ------------------------------------------------------------------ reply reading

    def _read_reply(self, cmd: str) -> Reply:
        """Read the answer to a non-EOM step; SMFIR_PROGRESS is counted and skipped."""
        while True:
            rcmd, data = self._recv()
            if rcmd == SMFIR_PROGRESS:
                self._expect_empty(rcmd, data)
                self.progress_count += 1
                continue
            if rcmd == SMFIR_REPLYCODE:
                return Reply(rcmd, SmtpReply.parse(decode_wire(data.rstrip(b"\0"))))
            if rcmd in DISPOSITION_OF_CODE:
                self._expect_empty(rcmd, data)
                return Reply(rcmd)
            if rcmd == SMFIR_SKIP:
                self._expect_empty(rcmd, data)
                if not self._require_negotiated().has_protocol(SMFIP_SKIP):
                    raise MilterProtocolError(
                        f"milter sent SMFIR_SKIP after {COMMAND_NAMES[cmd]} "
                        "but SMFIP_SKIP was not negotiated"
                    )
                return Reply(rcmd)
            raise MilterProtocolError(
                f"unexpected {REPLY_NAMES.get(rcmd, repr(rcmd))} in reply to "
                f"{COMMAND_NAMES.get(cmd, repr(cmd))}"
                + (
                    " (modifications are only allowed at end of message)"
                    if rcmd in _EOM_ACTION_FLAGS
                    else ""
                )
            )

    @staticmethod
    def _expect_empty(rcmd: str, data: bytes) -> None:
        if data:
            raise MilterProtocolError(
                f"{REPLY_NAMES.get(rcmd, repr(rcmd))} carried {len(data)} unexpected bytes"
            )

    def _step(self, cmd: str, data: bytes = b"") -> Reply | None:
        """Send one step unless SMFIP_NO* says skip; wait for a reply unless SMFIP_NR_*."""
        negotiated = self._require_negotiated()
        no_bit, nr_bit = STEP_FLAGS[cmd]
        if negotiated.protocol & no_bit:
            return None
        self._send(cmd, data)
        if negotiated.protocol & nr_bit:
            return None
        return self._read_reply(cmd)

    def step_skipped(self, cmd: str) -> bool:
        """True if the negotiated SMFIP_NO* bit makes the MTA skip step ``cmd``."""
        return bool(self._require_negotiated().protocol & STEP_FLAGS[cmd][0])

    def step_unanswered(self, cmd: str) -> bool:
        """True if the negotiated SMFIP_NR_* bit means no reply is read for ``cmd``."""
        return bool(self._require_negotiated().protocol & STEP_FLAGS[cmd][1])

    # ------------------------------------------------------------------ steps

    def macros(
        self,
        stage_cmd: str,
        mapping: Mapping[str, str] | None = None,
        /,
        **macros: str,
    ) -> None:
        """SMFIC_MACRO: define macros for the step ``stage_cmd`` (e.g. SMFIC_CONNECT).

        Names with braces do not fit in keyword arguments, hence the optional
        positional mapping: ``client.macros(SMFIC_CONNECT, {"{daemon_name}": "mx"})``.
        Never answered; sent even when the step itself is skipped (like Postfix).
        """
        self._require_negotiated()
        merged = dict(mapping or {})
        merged.update(macros)
        self._send(SMFIC_MACRO, encode_macros(stage_cmd, merged))

    def connect(
        self, hostname: str, family: str = SMFIA_INET, port: int = 0, address: str = ""
    ) -> Reply | None:
        """SMFIC_CONNECT: client ``hostname``, SMFIA_* ``family``, ``port``, ``address``."""
        data = encode_strings(hostname) + family.encode("ascii")
        if family != SMFIA_UNKNOWN:
            if family == SMFIA_UNIX:
                port = 0
            data += _PORT.pack(port) + encode_strings(address)
        return self._step(SMFIC_CONNECT, data)

    def helo(self, name: str) -> Reply | None:
        """SMFIC_HELO with the HELO/EHLO argument."""
        return self._step(SMFIC_HELO, encode_strings(name))

    def mail(self, sender: str, *esmtp_args: str) -> Reply | None:
        """SMFIC_MAIL: sender as in ``MAIL FROM:`` (with ``<>``), then ESMTP args."""
        return self._step(SMFIC_MAIL, encode_strings(sender, *esmtp_args))

    def rcpt(self, recipient: str, *esmtp_args: str) -> Reply | None:
        """SMFIC_RCPT: recipient as in ``RCPT TO:`` (with ``<>``), then ESMTP args."""
        return self._step(SMFIC_RCPT, encode_strings(recipient, *esmtp_args))

    def data(self) -> Reply | None:
        """SMFIC_DATA (the SMTP DATA command, before any content)."""
        return self._step(SMFIC_DATA)

    def header(self, name: str, value: str) -> Reply | None:
        """SMFIC_HEADER.  ``value`` is the text after the colon as in the message.

        Like Postfix: unless SMFIP_HDR_LEADSPC was negotiated, one leading space
        is removed; with it, the value goes out as-is.  So ``header("Subject",
        " hi")`` and ``header("Subject", "hi")`` both send ``hi`` by default.
        """
        if not self._require_negotiated().header_leading_space:
            value = value.removeprefix(" ")
        return self._step(SMFIC_HEADER, encode_strings(name, value))

    def eoh(self) -> Reply | None:
        """SMFIC_EOH (end of headers)."""
        return self._step(SMFIC_EOH)

    def body(self, chunk: bytes) -> Reply | None:
        """SMFIC_BODY with one chunk of at most MILTER_CHUNK_SIZE (65535) bytes."""
        if len(chunk) > MILTER_CHUNK_SIZE:
            raise ValueError(
                f"body chunk of {len(chunk)} bytes exceeds MILTER_CHUNK_SIZE ({MILTER_CHUNK_SIZE})"
            )
        return self._step(SMFIC_BODY, chunk)

    def unknown(self, cmd: str) -> Reply | None:
        """SMFIC_UNKNOWN with the SMTP command line the MTA did not recognise."""
        return self._step(SMFIC_UNKNOWN, encode_strings(cmd))

    def abort(self) -> None:
        """SMFIC_ABORT: end the current transaction (never answered)."""
        self._require_negotiated()
        self._send(SMFIC_ABORT)

    def quit(self) -> None:
        """SMFIC_QUIT, then close the socket (never answered)."""
        if self._sock is not None:
            try:
                self._send(SMFIC_QUIT)
            finally:
                self.close()

    def quit_nc(self) -> None:
        """SMFIC_QUIT_NC: end this SMTP connection, a new one follows on this socket.

        The next step must be ``connect`` again (libmilter calls the close
        callback and then waits for SMFIC_CONNECT); negotiation is *not* repeated.
        """
        self._require_negotiated()
        self._send(SMFIC_QUIT_NC)
        self._new_smtp_connection()

    def eom(self) -> EomResult:
        """SMFIC_BODYEOB, then collect modifications until the final reply.

        Each modification is checked against the negotiated SMFIF_* flags
        (:class:`UnnegotiatedActionError` otherwise).  SMFIR_PROGRESS is counted.
        SMFIR_SKIP and setsymlist are invalid here and raise.
        """
        negotiated = self._require_negotiated()
        self._send(SMFIC_BODYEOB)
        actions: list[EomAction] = []
        progress = 0
        quarantine: str | None = None
        body_done = False  # a REPLBODY run ended; Postfix refuses another one
        in_body = False
        while True:
            rcmd, data = self._recv()
            if rcmd == SMFIR_PROGRESS:
                self._expect_empty(rcmd, data)
                progress += 1
                self.progress_count += 1
                continue
            if rcmd in _EOM_ACTION_FLAGS:
                flag = _EOM_ACTION_FLAGS[rcmd]
                if not negotiated.actions & flag:
                    raise UnnegotiatedActionError(
                        f"milter sent {REPLY_NAMES[rcmd]} but {describe_actions(flag)[0]} "
                        f"was not negotiated (negotiated: {negotiated.action_names})"
                    )
                if rcmd == SMFIR_REPLBODY:
                    if body_done and self.postfix_strict:
                        raise PostfixIncompatibleError(
                            "SMFIR_REPLBODY chunks interleaved with other modification "
                            "requests: Postfix cannot resume a body replacement"
                        )
                    in_body = True
                elif in_body:
                    in_body = False
                    body_done = True
                action = self._parse_action(rcmd, data)
                if isinstance(action, Quarantine):
                    quarantine = action.reason
                actions.append(action)
                continue
            if rcmd == SMFIR_REPLYCODE:
                final = Reply(rcmd, SmtpReply.parse(decode_wire(data.rstrip(b"\0"))))
            elif rcmd in (
                SMFIR_ACCEPT,
                SMFIR_CONTINUE,
                SMFIR_REJECT,
                SMFIR_TEMPFAIL,
                SMFIR_DISCARD,
            ):
                self._expect_empty(rcmd, data)
                final = Reply(rcmd)
            else:
                raise MilterProtocolError(
                    f"unexpected {REPLY_NAMES.get(rcmd, repr(rcmd))} in reply to SMFIC_BODYEOB"
                )
            disposition = final.disposition
            assert disposition is not None
            return EomResult(
                disposition=disposition,
                reply=final.smtp,
                actions=actions,
                progress_count=progress,
                quarantine_reason=quarantine,
                final=final,
                header_leading_space=negotiated.header_leading_space,
            )

    @staticmethod
    def _parse_action(rcmd: str, data: bytes) -> EomAction:
        """Decode one modification request (layouts from libmilter smfi.c)."""
        try:
            if rcmd in (SMFIR_INSHEADER, SMFIR_CHGHEADER):
                (index,) = _INDEX.unpack_from(data)
                name, value = split_nul_strings(data[4:])
                cls = InsertHeader if rcmd == SMFIR_INSHEADER else ChangeHeader
                return cls(index=index, name=decode_wire(name), value=decode_wire(value))
            if rcmd == SMFIR_REPLBODY:
                return ReplaceBody(data)
            strings = [decode_wire(s) for s in split_nul_strings(data)]
            if rcmd == SMFIR_ADDHEADER:
                name_s, value_s = strings
                return AddHeader(name=name_s, value=value_s)
            if rcmd == SMFIR_ADDRCPT:
                (rcpt,) = strings
                return AddRecipient(rcpt)
            if rcmd == SMFIR_DELRCPT:
                (rcpt,) = strings
                return DeleteRecipient(rcpt)
            if rcmd == SMFIR_ADDRCPT_PAR:
                rcpt, *rest = strings
                return AddRecipientPar(rcpt, " ".join(rest))
            if rcmd == SMFIR_CHGFROM:
                sender, *rest = strings
                return ChangeFrom(sender, " ".join(rest))
            (reason,) = strings
            return Quarantine(reason)
        except (ValueError, struct.error) as exc:
            raise MilterProtocolError(
                f"malformed {REPLY_NAMES.get(rcmd, repr(rcmd))} data {data[:80]!r}"
            ) from exc

