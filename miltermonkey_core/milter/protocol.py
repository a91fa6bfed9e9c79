"""Constants and packet framing of the Sendmail milter protocol (version 6).

Everything here uses libmilter's own names (``mfdef.h``/``mfapi.h``) so that a
reader can cross-check a packet trace, the libmilter docs and Postfix's
``milter8.c`` without a translation table.  This module is deliberately free of
policy: it only knows how bytes look on the wire.  The daemon's side of the
conversation is :mod:`.connection`; the test kit's MTA side
(:mod:`miltermonkey_core.testing`) speaks through the same constants.

Wire format (both directions)::

    uint32 length (big endian, counts the command byte + data)
    char   command
    bytes  data        (strings are NUL-terminated)

Command and reply codes are single characters, kept here as one-character
``str`` values (as in C, where they are ``char``); bit masks are ``int``.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterable, Mapping
from typing import Final

__all__ = [
    "ALL_V6_ACTIONS",
    "ALL_V6_PROTOCOL_BITS",
    "MACRO_STAGE_COMMANDS",
    "MILTER_CHUNK_SIZE",
    "MILTER_LEN_BYTES",
    "MILTER_MAX_DATA",
    "SMFIA_INET",
    "SMFIA_INET6",
    "SMFIA_UNIX",
    "SMFIA_UNKNOWN",
    "SMFIC_ABORT",
    "SMFIC_BODY",
    "SMFIC_BODYEOB",
    "SMFIC_CONNECT",
    "SMFIC_DATA",
    "SMFIC_EOH",
    "SMFIC_HEADER",
    "SMFIC_HELO",
    "SMFIC_MACRO",
    "SMFIC_MAIL",
    "SMFIC_OPTNEG",
    "SMFIC_QUIT",
    "SMFIC_QUIT_NC",
    "SMFIC_RCPT",
    "SMFIC_UNKNOWN",
    "SMFIF_ADDHDRS",
    "SMFIF_ADDRCPT",
    "SMFIF_ADDRCPT_PAR",
    "SMFIF_CHGBODY",
    "SMFIF_CHGFROM",
    "SMFIF_CHGHDRS",
    "SMFIF_DELRCPT",
    "SMFIF_NONE",
    "SMFIF_QUARANTINE",
    "SMFIF_SETSYMLIST",
    "SMFIM_CONNECT",
    "SMFIM_DATA",
    "SMFIM_ENVFROM",
    "SMFIM_ENVRCPT",
    "SMFIM_EOH",
    "SMFIM_EOM",
    "SMFIM_HELO",
    "SMFIP_HDR_LEADSPC",
    "SMFIP_MDS_1M",
    "SMFIP_MDS_256K",
    "SMFIP_NOBODY",
    "SMFIP_NOCONNECT",
    "SMFIP_NODATA",
    "SMFIP_NOEOH",
    "SMFIP_NOHDRS",
    "SMFIP_NOHELO",
    "SMFIP_NOHREPL",
    "SMFIP_NOMAIL",
    "SMFIP_NORCPT",
    "SMFIP_NOREPLY_MASK",
    "SMFIP_NOSEND_MASK",
    "SMFIP_NOUNKNOWN",
    "SMFIP_NR_BODY",
    "SMFIP_NR_CONN",
    "SMFIP_NR_DATA",
    "SMFIP_NR_EOH",
    "SMFIP_NR_HDR",
    "SMFIP_NR_HELO",
    "SMFIP_NR_MAIL",
    "SMFIP_NR_RCPT",
    "SMFIP_NR_UNKN",
    "SMFIP_RCPT_REJ",
    "SMFIP_SKIP",
    "SMFIR_ACCEPT",
    "SMFIR_ADDHEADER",
    "SMFIR_ADDRCPT",
    "SMFIR_ADDRCPT_PAR",
    "SMFIR_CHGFROM",
    "SMFIR_CHGHEADER",
    "SMFIR_CONN_FAIL",
    "SMFIR_CONTINUE",
    "SMFIR_DELRCPT",
    "SMFIR_DISCARD",
    "SMFIR_INSHEADER",
    "SMFIR_PROGRESS",
    "SMFIR_QUARANTINE",
    "SMFIR_REJECT",
    "SMFIR_REPLBODY",
    "SMFIR_REPLYCODE",
    "SMFIR_SETSYMLIST",
    "SMFIR_SHUTDOWN",
    "SMFIR_SKIP",
    "SMFIR_TEMPFAIL",
    "SMFI_PROT_VERSION",
    "SMFI_V1_ACTS",
    "SMFI_V1_PROT",
    "SMFI_V2_ACTS",
    "SMFI_V2_PROT",
    "STEP_FLAGS",
    "FramingError",
    "MilterProtocolError",
    "describe_actions",
    "describe_protocol",
    "encode_macros",
    "encode_packet",
    "encode_strings",
    "read_packet",
    "recv_exact",
    "send_packet",
    "split_nul_strings",
]

# --------------------------------------------------------------------------
# Protocol version
# --------------------------------------------------------------------------

#: The protocol version this implementation speaks (sendmail 8.14+, Postfix >= 2.6).
SMFI_PROT_VERSION: Final = 6

# --------------------------------------------------------------------------
# Commands: MTA -> milter (SMFIC_*)
# --------------------------------------------------------------------------

SMFIC_ABORT: Final = "A"  # abort the current message transaction
SMFIC_BODY: Final = "B"  # body chunk (<= MILTER_CHUNK_SIZE bytes)
SMFIC_CONNECT: Final = "C"  # connection info
SMFIC_MACRO: Final = "D"  # define macros for the stage named by the first data byte
SMFIC_BODYEOB: Final = "E"  # end of body (EOM); modifications are only allowed now
SMFIC_HELO: Final = "H"  # HELO/EHLO
SMFIC_QUIT_NC: Final = "K"  # quit, but a new connection follows on this socket
SMFIC_HEADER: Final = "L"  # one header: name NUL value NUL
SMFIC_MAIL: Final = "M"  # MAIL FROM: sender NUL esmtp-args...
SMFIC_EOH: Final = "N"  # end of headers
SMFIC_OPTNEG: Final = "O"  # option negotiation
SMFIC_QUIT: Final = "Q"  # close the milter connection
SMFIC_RCPT: Final = "R"  # RCPT TO: recipient NUL esmtp-args...
SMFIC_DATA: Final = "T"  # DATA command
SMFIC_UNKNOWN: Final = "U"  # unknown SMTP command

# --------------------------------------------------------------------------
# Replies / actions: milter -> MTA (SMFIR_*)
# --------------------------------------------------------------------------

SMFIR_ADDRCPT: Final = "+"  # add recipient (EOM only)
SMFIR_DELRCPT: Final = "-"  # delete recipient (EOM only)
SMFIR_ADDRCPT_PAR: Final = "2"  # add recipient with ESMTP args (EOM only)
SMFIR_SHUTDOWN: Final = "4"  # 421: shutdown (internal to MTA)
SMFIR_ACCEPT: Final = "a"  # accept
SMFIR_REPLBODY: Final = "b"  # replace body chunk (EOM only)
SMFIR_CONTINUE: Final = "c"  # continue
SMFIR_DISCARD: Final = "d"  # discard
SMFIR_CHGFROM: Final = "e"  # change envelope sender (EOM only)
SMFIR_CONN_FAIL: Final = "f"  # cause a connection failure
SMFIR_ADDHEADER: Final = "h"  # append header (EOM only)
SMFIR_INSHEADER: Final = "i"  # insert header at index (EOM only)
SMFIR_SETSYMLIST: Final = "l"  # set macro list (only inside the OPTNEG reply data)
SMFIR_CHGHEADER: Final = "m"  # change/delete header (EOM only)
SMFIR_PROGRESS: Final = "p"  # still working, reset the MTA's timeout
SMFIR_QUARANTINE: Final = "q"  # quarantine the message (EOM only)
SMFIR_REJECT: Final = "r"  # reject
SMFIR_SKIP: Final = "s"  # skip further events of this type (needs SMFIP_SKIP)
SMFIR_TEMPFAIL: Final = "t"  # tempfail
SMFIR_REPLYCODE: Final = "y"  # reply code etc. ("550 5.7.1 text")

# --------------------------------------------------------------------------
# Actions the milter may request (SMFIF_*), negotiated in OPTNEG
# --------------------------------------------------------------------------

SMFIF_NONE: Final = 0x000
SMFIF_ADDHDRS: Final = 0x001  # add or insert headers
SMFIF_CHGBODY: Final = 0x002  # replace the body (libmilter also calls it SMFIF_MODBODY)
SMFIF_ADDRCPT: Final = 0x004  # add recipients
SMFIF_DELRCPT: Final = 0x008  # delete recipients
SMFIF_CHGHDRS: Final = 0x010  # change or delete headers
SMFIF_QUARANTINE: Final = 0x020  # quarantine the envelope
SMFIF_CHGFROM: Final = 0x040  # change envelope sender
SMFIF_ADDRCPT_PAR: Final = 0x080  # add recipients with ESMTP args
SMFIF_SETSYMLIST: Final = 0x100  # request a set of macros per stage

#: Every action defined by protocol version 6 (libmilter's ``SMFI_CURR_ACTS``).
ALL_V6_ACTIONS: Final = 0x1FF
#: What libmilter assumes when an MTA offers actions == 0 (protocol version 1).
SMFI_V1_ACTS: Final = 0x00F
#: Actions of protocol version 2 (adds CHGHDRS and QUARANTINE).
SMFI_V2_ACTS: Final = 0x03F

# --------------------------------------------------------------------------
# Protocol bits (SMFIP_*), negotiated in OPTNEG
# --------------------------------------------------------------------------

SMFIP_NOCONNECT: Final = 0x00000001  # MTA should not send connect info
SMFIP_NOHELO: Final = 0x00000002  # MTA should not send HELO info
SMFIP_NOMAIL: Final = 0x00000004  # MTA should not send MAIL info
SMFIP_NORCPT: Final = 0x00000008  # MTA should not send RCPT info
SMFIP_NOBODY: Final = 0x00000010  # MTA should not send the body
SMFIP_NOHDRS: Final = 0x00000020  # MTA should not send headers
SMFIP_NOEOH: Final = 0x00000040  # MTA should not send EOH
SMFIP_NR_HDR: Final = 0x00000080  # no reply for headers
SMFIP_NOHREPL: Final = SMFIP_NR_HDR  # old name of SMFIP_NR_HDR
SMFIP_NOUNKNOWN: Final = 0x00000100  # MTA should not send unknown commands
SMFIP_NODATA: Final = 0x00000200  # MTA should not send DATA
SMFIP_SKIP: Final = 0x00000400  # MTA understands SMFIS_SKIP
SMFIP_RCPT_REJ: Final = 0x00000800  # MTA should also send rejected RCPTs
SMFIP_NR_CONN: Final = 0x00001000  # no reply for connect
SMFIP_NR_HELO: Final = 0x00002000  # no reply for HELO
SMFIP_NR_MAIL: Final = 0x00004000  # no reply for MAIL
SMFIP_NR_RCPT: Final = 0x00008000  # no reply for RCPT
SMFIP_NR_DATA: Final = 0x00010000  # no reply for DATA
SMFIP_NR_UNKN: Final = 0x00020000  # no reply for UNKNOWN
SMFIP_NR_EOH: Final = 0x00040000  # no reply for eoh
SMFIP_NR_BODY: Final = 0x00080000  # no reply for body chunks
SMFIP_HDR_LEADSPC: Final = 0x00100000  # header value keeps its leading space
SMFIP_MDS_256K: Final = 0x10000000  # MILTER_MAX_DATA_SIZE=256K (libmilter internal)
SMFIP_MDS_1M: Final = 0x20000000  # MILTER_MAX_DATA_SIZE=1M (libmilter internal)

#: What libmilter assumes when an MTA offers protocol == 0 (NOCONNECT..NOHDRS).
SMFI_V1_PROT: Final = 0x0000003F
#: Protocol bits of version 2 (adds NOEOH).
SMFI_V2_PROT: Final = 0x0000007F
#: All the SMFIP_NR_* ("no reply") bits together (Postfix's SMFIP_NOREPLY_MASK).
SMFIP_NOREPLY_MASK: Final = 0x000FF080
#: All the SMFIP_NO* ("do not send this step") bits together.
SMFIP_NOSEND_MASK: Final = 0x0000037F

#: Every protocol bit defined by protocol version 6 (libmilter's ``SMFI_CURR_PROT``).
#: This is also exactly what Postfix offers with ``milter_protocol = 6``.
ALL_V6_PROTOCOL_BITS: Final = 0x001FFFFF

# --------------------------------------------------------------------------
# Macro stages (SMFIM_*), used by setsymlist in the OPTNEG reply
# --------------------------------------------------------------------------

SMFIM_CONNECT: Final = 0
SMFIM_HELO: Final = 1
SMFIM_ENVFROM: Final = 2
SMFIM_ENVRCPT: Final = 3
SMFIM_DATA: Final = 4
SMFIM_EOM: Final = 5
SMFIM_EOH: Final = 6

#: Which command's SMFIC_MACRO packet carries the macros of each SMFIM_* stage.
MACRO_STAGE_COMMANDS: Final[Mapping[int, str]] = {
    SMFIM_CONNECT: SMFIC_CONNECT,
    SMFIM_HELO: SMFIC_HELO,
    SMFIM_ENVFROM: SMFIC_MAIL,
    SMFIM_ENVRCPT: SMFIC_RCPT,
    SMFIM_DATA: SMFIC_DATA,
    SMFIM_EOM: SMFIC_BODYEOB,
    SMFIM_EOH: SMFIC_EOH,
}

# --------------------------------------------------------------------------
# Address families in SMFIC_CONNECT (SMFIA_*)
# --------------------------------------------------------------------------

SMFIA_UNKNOWN: Final = "U"
SMFIA_UNIX: Final = "L"
SMFIA_INET: Final = "4"
SMFIA_INET6: Final = "6"

# --------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------

#: Largest body chunk an MTA sends in one SMFIC_BODY (libmilter and Postfix agree).
MILTER_CHUNK_SIZE: Final = 65535
#: Size of the length prefix.
MILTER_LEN_BYTES: Final = 4
#: Refuse packets larger than this; libmilter's own limit is 64 KiB by default and 1 MiB
#: at most, Postfix accepts up to INT_MAX/2.  A sane bound stops a confused peer from
#: making us allocate gigabytes.
MILTER_MAX_DATA: Final = 64 * 1024 * 1024

#: For each protocol step: (command, SMFIP_NO* bit that skips it, SMFIP_NR_* bit that
#: suppresses its reply).  ``0`` means "no such bit" (EOM can never be skipped or left
#: unanswered).  This is the single table the client consults, so the mapping lives in
#: one reviewable place.
STEP_FLAGS: Final[Mapping[str, tuple[int, int]]] = {
    SMFIC_CONNECT: (SMFIP_NOCONNECT, SMFIP_NR_CONN),
    SMFIC_HELO: (SMFIP_NOHELO, SMFIP_NR_HELO),
    SMFIC_MAIL: (SMFIP_NOMAIL, SMFIP_NR_MAIL),
    SMFIC_RCPT: (SMFIP_NORCPT, SMFIP_NR_RCPT),
    SMFIC_DATA: (SMFIP_NODATA, SMFIP_NR_DATA),
    SMFIC_HEADER: (SMFIP_NOHDRS, SMFIP_NR_HDR),
    SMFIC_EOH: (SMFIP_NOEOH, SMFIP_NR_EOH),
    SMFIC_BODY: (SMFIP_NOBODY, SMFIP_NR_BODY),
    SMFIC_UNKNOWN: (SMFIP_NOUNKNOWN, SMFIP_NR_UNKN),
    SMFIC_BODYEOB: (0, 0),
}

_ACTION_NAMES: Final[tuple[tuple[str, int], ...]] = (
    ("SMFIF_ADDHDRS", SMFIF_ADDHDRS),
    ("SMFIF_CHGBODY", SMFIF_CHGBODY),
    ("SMFIF_ADDRCPT", SMFIF_ADDRCPT),
    ("SMFIF_DELRCPT", SMFIF_DELRCPT),
    ("SMFIF_CHGHDRS", SMFIF_CHGHDRS),
    ("SMFIF_QUARANTINE", SMFIF_QUARANTINE),
    ("SMFIF_CHGFROM", SMFIF_CHGFROM),
    ("SMFIF_ADDRCPT_PAR", SMFIF_ADDRCPT_PAR),
    ("SMFIF_SETSYMLIST", SMFIF_SETSYMLIST),
)

_PROTOCOL_NAMES: Final[tuple[tuple[str, int], ...]] = (
    ("SMFIP_NOCONNECT", SMFIP_NOCONNECT),
    ("SMFIP_NOHELO", SMFIP_NOHELO),
    ("SMFIP_NOMAIL", SMFIP_NOMAIL),
    ("SMFIP_NORCPT", SMFIP_NORCPT),
    ("SMFIP_NOBODY", SMFIP_NOBODY),
    ("SMFIP_NOHDRS", SMFIP_NOHDRS),
    ("SMFIP_NOEOH", SMFIP_NOEOH),
    ("SMFIP_NR_HDR", SMFIP_NR_HDR),
    ("SMFIP_NOUNKNOWN", SMFIP_NOUNKNOWN),
    ("SMFIP_NODATA", SMFIP_NODATA),
    ("SMFIP_SKIP", SMFIP_SKIP),
    ("SMFIP_RCPT_REJ", SMFIP_RCPT_REJ),
    ("SMFIP_NR_CONN", SMFIP_NR_CONN),
    ("SMFIP_NR_HELO", SMFIP_NR_HELO),
    ("SMFIP_NR_MAIL", SMFIP_NR_MAIL),
    ("SMFIP_NR_RCPT", SMFIP_NR_RCPT),
    ("SMFIP_NR_DATA", SMFIP_NR_DATA),
    ("SMFIP_NR_UNKN", SMFIP_NR_UNKN),
    ("SMFIP_NR_EOH", SMFIP_NR_EOH),
    ("SMFIP_NR_BODY", SMFIP_NR_BODY),
    ("SMFIP_HDR_LEADSPC", SMFIP_HDR_LEADSPC),
    ("SMFIP_MDS_256K", SMFIP_MDS_256K),
    ("SMFIP_MDS_1M", SMFIP_MDS_1M),
)


def _describe(bits: int, names: tuple[tuple[str, int], ...]) -> list[str]:
    out = [name for name, bit in names if bits & bit]
    rest = bits
    for _, bit in names:
        rest &= ~bit
    if rest:
        out.append(hex(rest))
    return out


def describe_actions(bits: int) -> list[str]:
    """Name the SMFIF_* bits in ``bits`` (unknown bits as hex), for error messages."""
    return _describe(bits, _ACTION_NAMES)


def describe_protocol(bits: int) -> list[str]:
    """Name the SMFIP_* bits in ``bits`` (unknown bits as hex), for error messages."""
    return _describe(bits, _PROTOCOL_NAMES)


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


class MilterProtocolError(Exception):
    """The milter said something an MTA would refuse (or we could not parse it).

    A real MTA would log the problem and fall back to its ``milter_default_action``;
    a test harness should fail loudly instead, so every such case raises this.
    """


class FramingError(MilterProtocolError):
    """The byte stream is not valid milter packets (short read, absurd length, EOF)."""


# --------------------------------------------------------------------------
# Framing
# --------------------------------------------------------------------------

_LEN = struct.Struct("!I")


def _cmd_byte(cmd: str) -> bytes:
    if len(cmd) != 1:
        raise ValueError(f"milter command must be one character, got {cmd!r}")
    return cmd.encode("latin-1")


def encode_packet(cmd: str, data: bytes = b"") -> bytes:
    """Frame one packet: 4-byte big-endian length (command + data), command, data."""
    return _LEN.pack(len(data) + 1) + _cmd_byte(cmd) + data


def encode_strings(*values: str | bytes) -> bytes:
    """NUL-terminate and concatenate ``values`` (str as UTF-8, surrogateescape).

    surrogateescape lets callers pass through arbitrary 8-bit header bytes that
    were decoded the same way, so a message round-trips byte for byte.
    """
    out = bytearray()
    for value in values:
        raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
        if b"\0" in raw:
            raise ValueError(f"milter strings cannot contain NUL: {value!r}")
        out += raw
        out += b"\0"
    return bytes(out)


def encode_macros(stage_cmd: str, macros: Mapping[str, str] | Iterable[tuple[str, str]]) -> bytes:
    """Build the data of an SMFIC_MACRO packet: stage command byte, then name/value pairs."""
    items = macros.items() if isinstance(macros, Mapping) else macros
    flat: list[str] = []
    for name, value in items:
        flat.append(name)
        flat.append(value)
    return _cmd_byte(stage_cmd) + encode_strings(*flat)


def split_nul_strings(data: bytes) -> list[bytes]:
    """Split NUL-terminated strings; a missing final terminator is tolerated.

    libmilter always terminates, but being lenient here costs nothing and keeps
    the error (if any) at the caller, which knows how many strings it expects.
    """
    if not data:
        return []
    parts = data.split(b"\0")
    if parts[-1] == b"":
        parts.pop()
    return parts


def recv_exact(sock: socket.socket, size: int) -> bytes:
    """Read exactly ``size`` bytes or raise :class:`FramingError` on EOF."""
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            raise FramingError(
                f"milter closed the connection after {len(buf)} of {size} expected bytes"
            )
        buf += chunk
    return bytes(buf)


def read_packet(sock: socket.socket) -> tuple[str, bytes]:
    """Read one packet and return ``(command, data)``."""
    (length,) = _LEN.unpack(recv_exact(sock, MILTER_LEN_BYTES))
    if length < 1:
        raise FramingError(f"bad milter packet length {length}")
    if length - 1 > MILTER_MAX_DATA:
        raise FramingError(f"unreasonable milter packet length {length}")
    payload = recv_exact(sock, length)
    return payload[:1].decode("latin-1"), payload[1:]


def send_packet(sock: socket.socket, cmd: str, data: bytes = b"") -> None:
    """Send one framed packet (one ``sendall``, so a packet is never interleaved)."""
    sock.sendall(encode_packet(cmd, data))


# --------------------------------------------------------------------------
# The milter's side: reading packets from the MTA
# --------------------------------------------------------------------------


class PacketTimeout(MilterProtocolError):
    """The MTA stayed silent too long; ``partial`` when it stopped inside a packet."""

    def __init__(self, seconds: float, partial: bool) -> None:
        super().__init__(f"a packet from the MTA still incomplete after {seconds:g} s" if partial
                         else f"no data from the MTA for {seconds:g} s between commands")
        self.seconds = seconds
        self.partial = partial


class PacketReader:
    """Packets from one MTA connection, in as few system calls as the MTA allows.

    The MTA often writes a macro packet and its command back to back, and a
    body chunk may arrive in pieces: one ``recv`` fills a buffer from which
    every complete packet is taken before the next ``recv``.  Two timeouts
    bound a silent peer: ``idle`` while waiting for the next command, and
    ``partial`` once a packet has started (a length prefix with nothing after
    it is an attack or a dead MTA, never a slow one).  ``quickack`` re-arms
    TCP_QUICKACK after every read on TCP, so the MTA's small writes are
    acknowledged at once instead of waiting on Linux's delayed ACK.
    ``partial`` bounds the whole packet, not each read: a peer trickling a
    byte at a time gets no longer than one that stops.
    """

    __slots__ = ("_buf", "_quickack", "_sock", "_timeout", "max_data")

    def __init__(self, sock: socket.socket, max_data: int = MILTER_MAX_DATA,
                 quickack: bool = False) -> None:
        self._sock = sock
        self._buf = bytearray()
        self._timeout: float | None = None
        self._quickack = quickack and hasattr(socket, "TCP_QUICKACK")
        self.max_data = max_data

    def no_quickack(self) -> None:
        """The MTA writes each command with its macros in one segment: ACK as Linux likes."""
        self._quickack = False

    @property
    def pending(self) -> bool:
        """Bytes of an unfinished packet are buffered."""
        return bool(self._buf)

    def _fill(self, timeout: float, limit: float) -> bool:
        """One ``recv`` into the buffer, waiting ``timeout`` of the stage's ``limit``;
        False at end of stream."""
        if timeout <= 0:
            raise PacketTimeout(limit, bool(self._buf))
        if timeout != self._timeout:
            self._sock.settimeout(timeout)
            self._timeout = timeout
        try:
            chunk = self._sock.recv(262144)
        except TimeoutError:
            raise PacketTimeout(limit, bool(self._buf)) from None
        if not chunk:
            return False
        if self._quickack:
            try:
                self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            except OSError:
                self._quickack = False
        self._buf += chunk
        return True

    def read(self, idle: float, partial: float) -> tuple[str, bytes] | None:
        """The next ``(command, data)``; ``None`` when the MTA closed between packets."""
        buf = self._buf
        deadline = 0.0  # for the packet under way, set once its first bytes are here
        while True:
            if len(buf) >= MILTER_LEN_BYTES:
                length = int.from_bytes(buf[:MILTER_LEN_BYTES], "big")
                if length < 1 or length - 1 > self.max_data:
                    raise FramingError(f"packet length {length} is out of bounds "
                                       f"(1 to {self.max_data + 1})")
                end = MILTER_LEN_BYTES + length
                if len(buf) >= end:
                    cmd = chr(buf[MILTER_LEN_BYTES])
                    data = bytes(buf[MILTER_LEN_BYTES + 1:end])
                    del buf[:end]
                    return cmd, data
            if not buf:
                filled = self._fill(idle, idle)
            else:
                if not deadline:
                    deadline = time.monotonic() + partial
                filled = self._fill(deadline - time.monotonic(), partial)
            if not filled:
                if buf:
                    raise FramingError(f"the MTA closed the connection inside a packet "
                                       f"({len(buf)} bytes of it received)")
                return None
