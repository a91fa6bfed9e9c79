"""A bounded look at a message's structure before the virus engine sees it.

Why the brain looks at all: clamd stops descending after ``MaxRecursion``
nested containers and ``MaxFiles`` files, and unless it runs with
``AlertExceedsMax yes`` it then answers ``OK`` for what it never looked at.
EICAR forwarded as an attachment 20 times, or placed after 50,000 MIME parts,
came back "clean".  This walk counts what an engine has to descend through,
so a message past the brain's own limits is refused (or handled by
``limits_action``) whatever the engine's configuration says.

How it counts, close to the way clamd does:

* **depth**: the message is at depth 0 and each part of a multipart is one
  deeper than the multipart.  The message inside a ``message/rfc822`` part
  sits at the part's depth (one forwarded message is one level), a message
  whose whole body is another message adds one, and mail found inside a
  decoded attachment sits at the attachment's depth.  The members of an
  archive are one deeper than the archive.
* **parts**: every body part of every multipart, at every level.
* **member size**: what a zip or tar member says it unpacks to, read from
  its header (a member that lies is clamd's to catch).

Bounded: one pass over the bytes, each line looked at once.  Memory is one
line (at most :data:`MAX_LINE`) per stream plus small fixed buffers, and
streams nest only as deep as the depth limit allows.  Archives are never
unpacked: zip and tar headers are read as they stream past, and of a
compressed member at most the first 16 KiB are inflated (16 MiB per
message in all, and 10,000 members; :mod:`miltermonkey_av.walk`), only to
see whether it holds another archive or a message
(:mod:`miltermonkey_av.archives`).

What it cannot see: uuencoded, BinHex or yEnc content, archive formats
other than zip, tar and gzip past their first level, nested archives that
start after the first 16 KiB of a member, and
archive member counts (clamd's ``MaxFiles`` counts those).  That is what
clamd's ``AlertExceedsMax`` is for; the brain needs both.
"""

from __future__ import annotations

import binascii
import contextlib
import functools
import re
from collections.abc import Iterable
from typing import Final

import attrs

from miltermonkey_av.archives import GZIP, OPAQUE_ARCHIVES, ZIP, Inflate, TarWalk, ZipWalk
from miltermonkey_av.walk import (
    DISCARD,
    Exceeded,
    LimitReached,
    Sink,
    Sniff,
    Structure,
    Walk,
)

__all__ = [
    "DEFAULT_MAX_DEPTH",
    "DEFAULT_MAX_PARTS",
    "Exceeded",
    "Structure",
    "inspect",
]

#: Below clamd's default MaxRecursion (17; Debian ships 16), leaving room
#: for containers only clamd can see (documents, uuencode, formats the walk
#: does not read).  Twelve forwarded-as-attachment levels is far past mail
#: people send.
DEFAULT_MAX_DEPTH: Final = 12
#: Half of clamd's default MaxFiles (10000), which also counts archive
#: members and every file clamd extracts from a part.
DEFAULT_MAX_PARTS: Final = 5000

#: Longest line kept whole; the rest of a longer line is never a boundary
#: or a header the walk needs.
MAX_LINE: Final = 64 * 1024
#: Longest ``Content-Type`` (or transfer encoding) value read.  A longer one
#: would hide a boundary, so it is reported as a limit, not cut short.
MAX_FIELD: Final = 16 * 1024
#: Content-Type and Content-Transfer-Encoding headers one part may carry
#: (more than one is already odd; millions would make the walk slow).
MAX_CONTENT_FIELDS: Final = 16


def inspect(chunks: Iterable[bytes], *, max_depth: int = DEFAULT_MAX_DEPTH,
            max_parts: int = DEFAULT_MAX_PARTS, max_member_size: int = 0) -> Structure:
    """Walk a whole message (header block, then body) and stop at the first limit passed.

    ``max_member_size`` (0: none) is the largest an archive member may
    declare it unpacks to: an engine stops at its own file size limit and,
    unless told to alert, says nothing about the rest.
    """
    walk = Walk(max_depth, max_parts, max_member_size, content_sink)
    top = _MimeStream(walk, depth=0, is_part=False)
    try:
        for chunk in chunks:
            top.feed(chunk)
        top.close()
    except LimitReached as stop:
        return walk.structure(stop.exceeded)
    return walk.structure(None)


# --- what a piece of content is -----------------------------------------------------------

#: The first-line magics clamd's file typing (``daily.ftm``) takes for mail,
#: matched without regard to case: content starting so is parsed as a message.
_MAIL_FIELDS: Final = frozenset({
    b"date", b"delivered-to", b"delivery-date", b"envelope-to", b"for", b"from",
    b"message-id", b"received", b"received-spf", b"return-path", b"subject", b"to",
    b"x-apparently-to", b"x-envelope-from", b"x-original-to", b"x-real-to", b"x-sieve",
    b"x-uidl", b"mime-version", b"content-type",
})
_FIELD_NAME: Final = re.compile(rb"([!-9;-~]{1,76})[ \t]*:")


def looks_like_mail(first_line: bytes) -> bool:
    """True when content starting with this line is a message to clamd (and so to us)."""
    if first_line.startswith((b"From ", b">From ")):
        return True
    m = _FIELD_NAME.match(first_line)
    if not m:
        return False
    name = m.group(1).lower()
    return name in _MAIL_FIELDS or name.startswith((b"x-evs", b"x-symantec-"))


_ARCHIVE_FIRST_BYTES: Final = frozenset(m[:1] for m, _ in (*OPAQUE_ARCHIVES, (ZIP, ""),
                                                            (GZIP, "")))


def content_sink(walk: Walk, depth: int, is_part: bool, head: bytes) -> Sink:
    """Where the content of a part (or archive member) at ``depth`` goes, by its first bytes."""
    if head[:1] in _ARCHIVE_FIRST_BYTES:
        if head.startswith(ZIP):
            return ZipWalk(walk, depth + 1)
        if head.startswith(GZIP):
            walk.archive(depth + 1, "gzip")
            return Inflate(walk, 31, Sniff(walk, depth + 1, is_part=True))
        for magic, kind in OPAQUE_ARCHIVES:
            if head.startswith(magic):
                walk.archive(depth + 1, kind)
                return DISCARD
    if head[257:262] == b"ustar":
        return TarWalk(walk, depth + 1)
    if looks_like_mail(head.split(b"\n", 1)[0]):
        return _MimeStream(walk, depth if is_part else depth + 1, is_part=False)
    return DISCARD


# --- MIME ---------------------------------------------------------------------------------

_BOUNDARY: Final = re.compile(
    rb"""(?i)(?:^|;)\s*boundary\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]+))""")
_HEADER_FIELD: Final = re.compile(rb"[!-9;-~]+[ \t]*:")
_IDENTITY: Final = frozenset({b"", b"7bit", b"8bit", b"binary"})
_B64_ALPHABET: Final = (b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
_B64_JUNK: Final = bytes(c for c in range(256) if c not in _B64_ALPHABET)
_HEADERS, _SKIP, _LEAF = 0, 1, 2
#: In a header block, the lines that matter: Content-Type, Content-Transfer-Encoding,
#: and any line that is neither a header field nor a continuation (the blank line
#: that ends the block, a boundary, a body with no blank line before it).
_HEADER_OF_NOTE: Final = re.compile(
    rb"(?i)\n(?:content-(?:type|transfer-encoding)[ \t]*:|(?![!-9;-~]+[ \t]*:|[ \t]))")
#: Inside a Content-Type that may go on: every line matters.
_EVERY_LINE: Final = re.compile(rb"\n")


@functools.lru_cache(maxsize=256)
def _delimiter_lines(delimiters: tuple[bytes, ...]) -> re.Pattern[bytes]:
    """A delimiter line of any of these multiparts, as RFC 2046 writes it (then checked again)."""
    alternatives = b"|".join(re.escape(d[2:]) for d in delimiters)
    return re.compile(rb"\n--(?:" + alternatives + rb")(?:--)?[ \t]*\r?\n")


@attrs.define
class _Entity:
    depth: int
    is_part: bool
    in_digest: bool
    content_types: list[bytearray] = attrs.field(factory=list)
    encoding: bytearray | None = None
    collecting: bytearray | None = None
    content_fields: int = 0


@attrs.define
class _Frame:
    """An open multipart: its delimiter line and the depth of the multipart itself."""

    delimiter: bytes
    depth: int
    digest: bool


class _Leaf:
    """The body of a part that is no multipart: decoded as far as it takes to tell what it is.

    Fed whole runs of lines at once (base64 ignores line breaks, and
    quoted-printable soft breaks decode across them), so a large attachment
    costs a few C calls per 64 KiB, not a Python call per line.
    """

    def __init__(self, sink: Sink, encoding: bytes) -> None:
        self.sink = sink
        self.base64 = encoding == b"base64"
        self.qp = encoding == b"quoted-printable"
        self.carry = b""
        self.done = False

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        if self.base64:
            data = self.carry + data.translate(None, _B64_JUNK)
            usable = len(data) - len(data) % 4
            self.carry = data[usable:]
            if usable:
                self.sink.feed(binascii.a2b_base64(data[:usable]))
        elif self.qp:
            self.sink.feed(binascii.a2b_qp(data))
        else:
            self.sink.feed(data)
        if isinstance(self.sink, Sniff) and self.sink.discarding:
            self.done = True  # nothing left to learn: the rest is not decoded

    def close(self) -> None:
        if self.base64 and len(self.carry) > 1 and not self.done:
            padded = self.carry + b"=" * (-len(self.carry) % 4)
            with contextlib.suppress(binascii.Error):  # a stray character: nothing to learn
                self.sink.feed(binascii.a2b_base64(padded))
        self.sink.close()


class _MimeStream:
    """One byte stream of MIME: the message itself, or mail found inside a decoded part."""

    def __init__(self, walk: Walk, depth: int, is_part: bool) -> None:
        self.walk = walk
        self.frames: list[_Frame] = []
        self.pending = bytearray()
        self.overflow = False
        self.leaf: _Leaf | None = None
        self.state = _HEADERS
        self.entity = _Entity(depth, is_part, in_digest=False)
        #: The first line of mail found by its ``From `` magic is the mbox envelope
        #: line ("From sender date"), not a header and not the body: mail parsers,
        #: clamd's included, skip it.  Taken for the body it would be sniffed as
        #: mail again, and again: "From the desk of..." nested to the depth limit.
        self.envelope_line_possible = True
        #: Set when that line was skipped: "From " magic and then no header
        #: field is text that merely starts with "From", not a message.
        self.envelope_only = False
        walk.reach(depth, "a message inside a message")

    # --- bytes to lines

    def feed(self, data: bytes) -> None:
        start = 0
        if self.overflow:
            nl = data.find(b"\n")
            if nl < 0:
                self._overflow(data)
                return
            self._overflow(data[:nl + 1])
            self.overflow = False
            start = nl + 1
        pending = self.pending
        size = len(data)
        while start < size:
            if start and not pending:
                # Between the lines that matter, only C code runs: a pattern finds
                # the next one (a delimiter in a body, a Content-Type or the end in a
                # header block), and what lies before goes to the leaf in one piece.
                pattern = self._next_line_that_matters()
                if pattern is not _EVERY_LINE:
                    m = pattern.search(data, start - 1) if pattern is not None else None
                    end = m.start() + 1 if m else data.rfind(b"\n", start) + 1
                    if end > start:
                        if self.state == _LEAF and self.leaf is not None:
                            self.leaf.feed(data[start:end])
                        start = end
                    if m is None:
                        break
            nl = data.find(b"\n", start)
            if nl < 0:
                break
            if pending:
                pending += data[start:nl + 1]
                line = bytes(pending)
                pending.clear()
            else:
                line = data[start:nl + 1]
            self._line(line, line.rstrip(b"\r\n"))
            start = nl + 1
        if start < size:
            pending += data[start:]
            if len(pending) > MAX_LINE:
                head, rest = bytes(pending[:MAX_LINE]), bytes(pending[MAX_LINE:])
                pending.clear()
                self.overflow = True
                self._line(head, head)
                self._overflow(rest)

    def _next_line_that_matters(self) -> re.Pattern[bytes] | None:
        """What finds the next line to look at: None when no later line matters."""
        if self.state == _HEADERS:
            if self.entity.collecting is not None or self.envelope_only:
                return _EVERY_LINE
            return _HEADER_OF_NOTE
        if not self.frames:
            return None  # a single body to its end: only the leaf wants it
        return _delimiter_lines(tuple(f.delimiter for f in self.frames))

    def _overflow(self, data: bytes) -> None:
        """More of a line longer than :data:`MAX_LINE`: content only a leaf wants."""
        if self.state == _LEAF and self.leaf is not None:
            self.leaf.feed(data)

    def close(self) -> None:
        if self.pending:
            line = bytes(self.pending)
            self.pending.clear()
            self._line(line, line.rstrip(b"\r\n"))
        self._end_leaf()

    # --- lines

    def _line(self, raw: bytes, text: bytes) -> None:
        if self.frames and text[:2] == b"--" and self._delimiter(text):
            return
        if self.state == _LEAF:
            assert self.leaf is not None
            self.leaf.feed(raw)
        elif self.state == _HEADERS:
            self._header(raw, text)
        # _SKIP: a preamble or an epilogue, never looked at

    def _delimiter(self, text: bytes) -> bool:
        """Handle a boundary line of any open multipart, innermost first."""
        for index in range(len(self.frames) - 1, -1, -1):
            frame = self.frames[index]
            if not text.startswith(frame.delimiter):
                continue
            rest = text[len(frame.delimiter):]
            closing = rest.startswith(b"--")
            if (rest[2:] if closing else rest).strip(b" \t"):
                continue
            self._end_leaf()
            del self.frames[index + 1:]
            if closing:
                del self.frames[index]
                self.state = _SKIP
            else:
                self.entity = _Entity(frame.depth + 1, True, frame.digest)
                self.state = _HEADERS
                self.walk.part(frame.depth + 1)
            return True
        return False

    def _header(self, raw: bytes, text: bytes) -> None:
        entity = self.entity
        if self.envelope_line_possible:
            self.envelope_line_possible = False
            if text.startswith((b"From ", b">From ")):
                self.envelope_only = True
                return
        elif self.envelope_only and _HEADER_FIELD.match(text):
            self.envelope_only = False  # a header field: it is a message after all
        if not text:
            self._begin_body()
            return
        if text[:1] in (b" ", b"\t"):
            if entity.collecting is not None:
                self._collect(entity.collecting, text)
            return
        if not _HEADER_FIELD.match(text):
            # Not a header field: the body starts here, as mail parsers read it.
            self._begin_body()
            self._line(raw, text)
            return
        name, _, value = text.partition(b":")
        key = name.strip().lower()
        if key == b"content-type":
            field = bytearray()
            entity.content_types.append(field)
        elif key == b"content-transfer-encoding":
            field = entity.encoding = bytearray()
        else:
            entity.collecting = None
            return
        entity.content_fields += 1
        if entity.content_fields > MAX_CONTENT_FIELDS:
            raise LimitReached(Exceeded(
                "header", f"more than {MAX_CONTENT_FIELDS} Content-Type and "
                          "Content-Transfer-Encoding headers in one part"))
        entity.collecting = field
        self._collect(field, value)

    def _collect(self, field: bytearray, value: bytes) -> None:
        field += value
        if len(field) > MAX_FIELD:
            raise LimitReached(Exceeded(
                "header", f"a Content-Type or Content-Transfer-Encoding header over "
                          f"{MAX_FIELD} bytes"))

    def _begin_body(self) -> None:
        entity = self.entity
        if self.envelope_only:
            # No header after the "From " line: plain text, looked at no further
            # (else each line starting "From" would be one more level of mail).
            self.envelope_only = False
            self.leaf = _Leaf(DISCARD, b"")
            self.state = _LEAF
            return
        mime_type, boundary = _content_type(entity)
        encoding = bytes(entity.encoding or b"").strip().lower()
        if mime_type.startswith(b"multipart/") and boundary:
            self.frames.append(_Frame(b"--" + boundary, entity.depth,
                                      mime_type == b"multipart/digest"))
            self.state = _SKIP
            return
        is_message = mime_type in (b"message/rfc822", b"message/global", b"message/news") or (
            not mime_type and entity.in_digest)
        inner_depth = entity.depth if entity.is_part else entity.depth + 1
        if is_message and encoding in _IDENTITY:
            self._nested_message(inner_depth)
            return
        if is_message:
            sink: Sink = _MimeStream(self.walk, inner_depth, is_part=False)
        else:
            sink = Sniff(self.walk, entity.depth, is_part=entity.is_part)
        self.leaf = _Leaf(sink, encoding)
        self.state = _LEAF

    def _nested_message(self, depth: int) -> None:
        self.walk.reach(depth, "a message inside a message")
        self.entity = _Entity(depth, False, False)
        self.state = _HEADERS

    def _end_leaf(self) -> None:
        if self.leaf is not None:
            leaf, self.leaf = self.leaf, None
            leaf.close()


def _content_type(entity: _Entity) -> tuple[bytes, bytes]:
    """The type that decides the structure, and its boundary.

    With several Content-Type headers a parser may take any of them, so the
    most structural one counts: a multipart with a boundary, else a message.
    """
    parsed = []
    for field in entity.content_types:
        value = bytes(field)
        mime_type = value.split(b";", 1)[0].strip().lower()
        m = _BOUNDARY.search(value)
        boundary = b""
        if m:
            boundary = m.group(1) if m.group(1) is not None else m.group(2)
            boundary = boundary.replace(b"\\", b"") if m.group(1) is not None else boundary
        parsed.append((mime_type, boundary))
    for mime_type, boundary in parsed:
        if mime_type.startswith(b"multipart/") and boundary:
            return mime_type, boundary
    for mime_type, boundary in parsed:
        if mime_type.startswith(b"message/"):
            return mime_type, boundary
    return parsed[0] if parsed else (b"", b"")
