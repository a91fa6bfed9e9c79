"""The data brains see: the SMTP session, the envelope, the headers and the body.

These are plain attrs models with no protocol type in them, so a brain can be
unit-tested without an MTA and ``milter/`` stays the only package that knows
the wire.  Header values keep their raw bytes because mail headers are not
always UTF-8 and a signature (DKIM, the milter key) must see what was sent.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import attrs

#: Bodies larger than this go to a temporary file instead of memory.
DEFAULT_SPOOL_THRESHOLD = 1024 * 1024


def decode_header_bytes(raw: bytes) -> str:
    """Decode header bytes losslessly: UTF-8 where valid, surrogates elsewhere.

    ``surrogateescape`` lets 8-bit junk round-trip back to the same bytes with
    :func:`encode_header_str`, so a brain never crashes on a Latin-1 subject.
    """
    return raw.decode("utf-8", "surrogateescape")


def encode_header_str(value: str) -> bytes:
    return value.encode("utf-8", "surrogateescape")


@attrs.frozen
class Header:
    """One header field in arrival order.

    ``value`` is what follows the colon, without the single separating space
    (the MTA strips it unless SMFIP_HDR_LEADSPC is negotiated); folding inside
    the value is kept as received.  ``raw`` is the undecoded value bytes.
    """

    name: str
    value: str
    raw: bytes = attrs.field(default=b"")

    @classmethod
    def from_bytes(cls, name: bytes | str, raw: bytes) -> Header:
        n = name if isinstance(name, str) else decode_header_bytes(name)
        return cls(name=n, value=decode_header_bytes(raw), raw=raw)

    @classmethod
    def from_str(cls, name: str, value: str) -> Header:
        return cls(name=name, value=value, raw=encode_header_str(value))

    def matches(self, name: str) -> bool:
        return self.name.lower() == name.lower()


class Headers(tuple[Header, ...]):
    """An ordered, immutable header list with case-insensitive look-ups."""

    __slots__ = ()

    # The name is lowered once per look-up, not once per header: every message
    # goes through these several times.

    def get(self, name: str, default: str | None = None) -> str | None:
        low = name.lower()
        for h in self:
            if h.name.lower() == low:
                return h.value
        return default

    def get_all(self, name: str) -> list[str]:
        low = name.lower()
        return [h.value for h in self if h.name.lower() == low]

    def count(self, name: str) -> int:  # type: ignore[override,unused-ignore]
        low = name.lower()
        return sum(1 for h in self if h.name.lower() == low)

    def __contains__(self, name: object) -> bool:
        if isinstance(name, str):
            low = name.lower()
            return any(h.name.lower() == low for h in self)
        return super().__contains__(name)


@attrs.frozen
class Address:
    """An envelope address with its ESMTP parameters (``SIZE=``, ``NOTIFY=``...)."""

    address: str
    params: tuple[str, ...] = ()

    @property
    def bare(self) -> str:
        """The address without angle brackets, as most policies want it."""
        return self.address.strip().removeprefix("<").removesuffix(">")


@attrs.define
class Connection:
    """One SMTP session between a client and the MTA.

    Lives from connect to close; the MTA may carry several messages on it.
    ``macros`` accumulates every macro the MTA sent (``j``, ``{client_addr}``,
    ``{auth_authen}``...), the newest value winning.
    """

    id: str
    hostname: str = ""
    family: str = "unknown"
    address: str | None = None
    port: int | None = None
    helo: str | None = None
    macros: dict[str, str] = attrs.field(factory=dict)
    #: Per-session scratch space for brains, keyed by brain name.
    notes: dict[str, Any] = attrs.field(factory=dict)

    @property
    def authenticated(self) -> str | None:
        """The SASL login name, if the client authenticated (``{auth_authen}``)."""
        return self.macros.get("{auth_authen}") or None


@attrs.define
class Envelope:
    sender: Address | None = None
    recipients: list[Address] = attrs.field(factory=list)


class Body:
    """The message body, in memory while small and spooled to disk when large.

    Scanners want either bytes or a file; keeping one spooled file avoids a
    second copy of a 50 MB message in memory.
    """

    def __init__(
        self,
        threshold: int = DEFAULT_SPOOL_THRESHOLD,
        tmpdir: str | os.PathLike[str] | None = None,
    ) -> None:
        self._threshold = threshold
        self._tmpdir = os.fspath(tmpdir) if tmpdir is not None else None
        # Both made on the first write: a configuration that negotiates the
        # body away creates a Body per message and never writes to it.
        self._mem: io.BytesIO | None = None
        self._file: BinaryIO | None = None
        self._size = 0
        self._sha256: Any = None

    @classmethod
    def from_bytes(cls, data: bytes, threshold: int = DEFAULT_SPOOL_THRESHOLD) -> Body:
        b = cls(threshold=threshold)
        b.write(data)
        return b

    def write(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._sha256 is None:
            self._sha256 = hashlib.sha256()
        self._sha256.update(chunk)
        if self._file is not None:
            self._file.write(chunk)
            return
        mem = self._mem
        if mem is None:
            mem = self._mem = io.BytesIO()
        mem.write(chunk)
        if mem.tell() > self._threshold:
            # tempfile brings shutil, bz2 and lzma: imported by the first large body only.
            import tempfile  # noqa: PLC0415 - memory

            f = tempfile.TemporaryFile(prefix="mm-body-", dir=self._tmpdir)  # noqa: SIM115
            f.write(mem.getbuffer())
            self._file = f
            self._mem = None

    @property
    def size(self) -> int:
        return self._size

    @property
    def spooled(self) -> bool:
        """True once the body lives in a temporary file rather than memory."""
        return self._file is not None

    def sha256(self) -> bytes:
        if self._sha256 is None:
            return hashlib.sha256().digest()
        digest: bytes = self._sha256.copy().digest()
        return digest

    def chunks(self, size: int = 65536) -> Iterator[bytes]:
        """Yield the body in pieces without loading a spooled body whole."""
        if self._file is None:
            if self._mem is None:
                return
            view = self._mem.getbuffer()
            try:
                for i in range(0, len(view), size):
                    yield bytes(view[i : i + size])
            finally:
                view.release()
            return
        f = self._file
        f.flush()
        pos = 0
        while True:
            f.seek(pos)
            piece = f.read(size)
            if not piece:
                return
            pos += len(piece)
            yield piece

    def read(self) -> bytes:
        """The whole body as bytes; fine for small bodies, costly for spooled ones."""
        return b"".join(self.chunks())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._mem = None


@attrs.define
class Message:
    """Everything known about one message at end of message.

    Handed to ``eom_process``; earlier hooks see it partly filled.
    ``headers`` is what the MTA sent, in order; edits brains make go through
    the context and are not reflected here, so every brain judges the
    message as received.
    """

    connection: Connection
    envelope: Envelope = attrs.field(factory=Envelope)
    headers: Headers = attrs.field(factory=Headers)
    body: Body = attrs.field(factory=Body)
    macros: dict[str, str] = attrs.field(factory=dict)
    queue_id: str | None = None
    #: Per-message scratch space for brains, keyed by brain name: state
    #: gathered in ``header``/``body`` for ``eom_process``.
    notes: dict[str, Any] = attrs.field(factory=dict)

    @property
    def id(self) -> str:
        """The queue id when the MTA sent one, else the session id: for log lines."""
        return self.queue_id or self.connection.id

    @property
    def message_id(self) -> str | None:
        return self.headers.get("Message-ID")

    @property
    def size(self) -> int:
        """Approximate RFC 5322 size: header lines plus body."""
        return sum(len(h.name) + len(h.raw) + 4 for h in self.headers) + 2 + self.body.size

    def header_bytes(self) -> bytes:
        """The header block as ``Name: value\\r\\n`` lines and the blank line.

        Rebuilt the way clamav-milter does, which is what scanners expect.
        """
        out = bytearray()
        for h in self.headers:
            out += h.name.encode("ascii", "surrogateescape") + b": " + h.raw + b"\r\n"
        out += b"\r\n"
        return bytes(out)

    def iter_bytes(self, chunk_size: int = 65536) -> Iterator[bytes]:
        """Stream the whole message (headers then body) for a scanner."""
        yield self.header_bytes()
        yield from self.body.chunks(chunk_size)

    def as_bytes(self) -> bytes:
        return b"".join(self.iter_bytes())

    def write_to(self, path: str | os.PathLike[str]) -> Path:
        """Write the message to a file, for command-line scanners that need one."""
        p = Path(path)
        with p.open("wb") as f:
            for piece in self.iter_bytes():
                f.write(piece)
        return p

    def close(self) -> None:
        self.body.close()


def message_from_bytes(
    raw: bytes,
    *,
    sender: str = "<sender@example.test>",
    recipients: list[str] | None = None,
    connection: Connection | None = None,
    macros: Mapping[str, str] | None = None,
    queue_id: str | None = None,
) -> Message:
    """Build a :class:`Message` from an RFC 5322 byte string, as an MTA would send it.

    Used by ``miltermonkey try`` and the in-process test runner.  Folded header
    lines keep their line breaks; the body gets CRLF line endings as MTAs send it.
    """
    data = raw.replace(b"\r\n", b"\n")
    head, sep, body = data.partition(b"\n\n")
    if not sep and not head.startswith((b" ", b"\t")) and b":" not in head.split(b"\n", 1)[0]:
        head, body = b"", data
    headers: list[Header] = []
    for line in head.split(b"\n") if head else []:
        if line[:1] in (b" ", b"\t") and headers:
            last = headers.pop()
            headers.append(Header.from_bytes(last.name, last.raw + b"\n" + line))
            continue
        name, colon, value = line.partition(b":")
        if not colon:
            continue
        headers.append(Header.from_bytes(name.strip(), value.removeprefix(b" ")))
    conn = connection or Connection(id="offline", hostname="localhost", family="inet",
                                    address="127.0.0.1", port=0)
    msg = Message(
        connection=conn,
        envelope=Envelope(
            sender=Address(sender),
            recipients=[Address(r) for r in (recipients or ["<rcpt@example.test>"])],
        ),
        headers=Headers(headers),
        macros=dict(macros or {}),
        queue_id=queue_id,
    )
    msg.body.write(body.replace(b"\n", b"\r\n"))
    return msg
