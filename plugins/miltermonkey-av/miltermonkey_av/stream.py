"""Streaming a large message to clamd while the MTA is still sending it.

Without it, a 20 MB message reaches clamd only after the end of data: the
MTA's transfer to the milter and the milter's INSTREAM to clamd happen one
after the other.  With it, once the message passes ``stream_min_size`` the
``body`` hook opens an INSTREAM connection and sends the header block, the
body so far, and then each chunk as it arrives; at end of message only the
terminator is left to send, and the reply is read after the MIME walk that
runs meanwhile.  clamd scans once it has the whole stream, as before.

Nothing about the outcome changes.  A stream is only used when what clamd got
is exactly the message at end of data (the same header block, the same
number of bytes); otherwise, and after any failure while streaming, it is
dropped and the message is scanned at end of data as it always was, with
failover and the failure policy.  The ``body`` hook never raises: a raise
there would apply the failure policy to the whole message.

A stream the end of message never takes (the scan cache replayed a result,
a trusted milter key or an earlier brain's verdict made the scan moot) is
closed by the ``abort`` or ``close`` hook, or by the next message's first
body chunk on the same connection: the core calls no hook between the end of
one message and the start of the next.
"""

from __future__ import annotations

import hashlib
import select
import socket
import time
from typing import NoReturn, Protocol

import attrs

from miltermonkey_av.clamd import ClamdClient, ClamdPool, parse_reply, rechunk
from miltermonkey_av.errors import EngineProtocolError, ScanError, ScanTimeout
from miltermonkey_av.options import AntiVirusOptions
from miltermonkey_av.result import ScanResult
from miltermonkey_core import Connection, Message

__all__ = ["BodyStream", "StreamNote", "StreamStopped", "Streamer"]

_END = b"\0\0\0\0"


class Log(Protocol):
    """The brain's logger (``monkey.log``): numbered debug levels and warnings."""

    def __call__(self, level: int, msg: str, *args: object) -> None: ...

    def warning(self, msg: str, *args: object) -> None: ...


class StreamStopped(Exception):
    """clamd answered before the end of the stream (its size limit, an error)."""


@attrs.define(eq=False)
class BodyStream:
    """One INSTREAM connection fed as the body arrives."""

    client: ClamdClient
    sock: socket.socket | None
    #: Seconds one write (and the reply at the end) may take.
    timeout: float
    #: SHA-256 of the header block clamd got.
    head: bytes
    #: Message bytes sent so far (header block included).
    sent: int = 0
    #: When the terminator went out (monotonic); 0 before.
    ended: float = 0.0

    @property
    def address(self) -> str:
        return str(self.client.address)

    def _sock(self) -> socket.socket:
        if self.sock is None:
            raise EngineProtocolError(f"clamd {self.address}: stream already closed")
        return self.sock

    def _write(self, data: bytes) -> None:
        sock = self._sock()
        try:
            sock.settimeout(self.timeout)
            sock.sendall(data)
        except TimeoutError as e:
            raise ScanTimeout(f"clamd {self.address}: stream not accepted within "
                              f"{self.timeout:g} s") from e
        except OSError as e:
            # clamd stopped reading; its reason may still be in our buffer.
            self._early(sock, f"connection lost while streaming: {e.strerror or e}")
        readable, _, _ = select.select([sock], [], [], 0)
        if readable:  # clamd answers early only to refuse (size limit, error), then closes
            self._early(sock, "")

    def _early(self, sock: socket.socket, lost: str) -> NoReturn:
        """clamd's reply before the end of the stream, raised as :class:`StreamStopped`;
        :class:`EngineProtocolError` when there is none (``lost`` says what happened)."""
        try:
            text = self.client.read_reply(sock, time.monotonic() + 1.0)
        except ScanError as e:
            raise EngineProtocolError(f"clamd {self.address}: {lost}" if lost else str(e)) from e
        raise StreamStopped(f"clamd {self.address} answered before the end: {text}")

    def send(self, data: bytes) -> None:
        """Send message bytes as INSTREAM frames (at most CHUNK_SIZE each)."""
        for piece in rechunk((data,)):
            self._write(len(piece).to_bytes(4, "big") + piece)
            self.sent += len(piece)

    def matches(self, message: Message) -> bool:
        """True when clamd got exactly ``message``: its header block now, every byte."""
        return (self.sent == message.size
                and self.head == hashlib.sha256(message.header_bytes()).digest())

    def end(self) -> None:
        """Send the terminator: clamd starts scanning now."""
        self._write(_END)
        self.ended = time.monotonic()

    def result(self) -> ScanResult:
        """clamd's answer to the stream, within ``timeout`` of :meth:`end`."""
        text = self.client.read_reply(self._sock(), self.ended + self.timeout)
        status, name = parse_reply(text)
        return ScanResult(status, (name,) if name else (), f"clamd {self.address} (streamed)",
                          time.monotonic() - self.ended, text)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


@attrs.define
class StreamNote:
    """The brain's per-message note: the open stream, or why there is none."""

    stream: BodyStream | None = None
    #: Why streaming stopped or never started for this message ("" while it may still).
    stopped: str = ""


class Streamer:
    """The ``body``, ``abort`` and ``close`` hooks' side of streaming, for one brain."""

    def __init__(self, pool: ClamdPool, options: AntiVirusOptions, name: str,
                 log: Log) -> None:
        self.pool = pool
        self.name = name
        self.log = log
        self.start_at = max(options.stream_min_size, options.minscansize, 1)
        self.max_size = options.max_scan_size
        self.connect_timeout = options.connect_timeout
        self.timeout = options.scan_timeout

    # --- the hooks --------------------------------------------------------------------------

    def body(self, message: Message, chunk: bytes) -> None:
        """Start or continue the stream; never raises."""
        note = message.notes.get(self.name)
        if not isinstance(note, StreamNote):
            note = message.notes[self.name] = StreamNote()
            self._close_leftover(message.connection)
        if note.stopped:
            return
        try:
            if note.stream is None:
                self._maybe_open(message, note)
            elif self.max_size and note.stream.sent + len(chunk) > self.max_size:
                self._stop(message, note, f"past max_scan_size {self.max_size}")
            else:
                note.stream.send(chunk)
        except StreamStopped as e:
            self._stop(message, note, str(e))
        except ScanTimeout as e:
            if note.stream is not None:
                self.pool.mark_failed(note.stream.client, str(e))
            self._stop(message, note, str(e), warn=True)
        except (ScanError, OSError) as e:
            self._stop(message, note, str(e), warn=True)
        except Exception as e:  # a bug here must not fail the message: it is scanned at eom
            self._stop(message, note, f"{type(e).__name__}: {e}", warn=True)

    def _maybe_open(self, message: Message, note: StreamNote) -> None:
        size = message.size
        if size < self.start_at:
            return
        if self.max_size and size > self.max_size:
            note.stopped = f"above max_scan_size {self.max_size}"
            return
        client = self.pool.next_healthy()
        if client is None:
            note.stopped = "no clamd is healthy"
            return
        try:
            sock = client.open_instream(time.monotonic() + self.connect_timeout)
        except ScanError as e:
            self.pool.mark_failed(client, str(e))
            raise
        head = message.header_bytes()
        stream = note.stream = BodyStream(client, sock, self.timeout,
                                          hashlib.sha256(head).digest())
        message.connection.notes[self.name] = stream
        stream.send(head)
        pieces = message.body.chunks()
        try:
            for piece in pieces:
                stream.send(piece)
        finally:
            # An unfinished walk holds a view of the in-memory body, which the
            # core could then no longer append the next chunk to.
            close = getattr(pieces, "close", None)
            if close is not None:
                close()
        self.log(50, "streaming to clamd %s from byte %d on", stream.address, stream.sent)

    def _stop(self, message: Message, note: StreamNote, why: str, *, warn: bool = False) -> None:
        note.stopped = why
        stream, note.stream = note.stream, None
        if stream is None:
            return
        stream.close()
        message.connection.notes.pop(self.name, None)
        if warn:
            self.log.warning("stream to clamd stopped: %s; scanning at end of data", why)
        else:
            self.log(50, "stream to clamd stopped: %s; scanning at end of data", why)

    def take(self, message: Message) -> BodyStream | None:
        """The message's open stream, now the end of message's to finish and close."""
        note = message.notes.get(self.name)
        if not isinstance(note, StreamNote) or note.stream is None:
            return None
        stream, note.stream = note.stream, None
        note.stopped = "taken at end of message"
        if message.connection.notes.get(self.name) is stream:
            del message.connection.notes[self.name]
        return stream

    def abort(self, message: Message) -> None:
        stream = self.take(message)
        if stream is not None:
            stream.close()
        self._close_leftover(message.connection)

    def close_connection(self, connection: Connection) -> None:
        self._close_leftover(connection)

    def _close_leftover(self, connection: Connection) -> None:
        """Close a stream an earlier message on this connection left open."""
        stream = connection.notes.pop(self.name, None)
        if isinstance(stream, BodyStream):
            stream.close()
