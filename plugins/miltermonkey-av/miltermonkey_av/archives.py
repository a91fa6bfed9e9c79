"""Archives in the structure walk: read as they stream past, never unpacked.

Zip and tar headers give each member's place and size, so the walk can
count members and hand each one's start to a :class:`~miltermonkey_av.walk.Sniff`
without extracting anything.  A compressed member is inflated only as far
as :data:`~miltermonkey_av.walk.INFLATE_PREFIX`, enough to see whether it
holds another archive or a message; that is how a zip in a zip in a zip is
counted level by level at a few kilobytes per level.
"""

from __future__ import annotations

import re
import struct
import zlib
from typing import Final

from miltermonkey_av.walk import DISCARD, INFLATE_PREFIX, Sink, Sniff, Walk

__all__ = ["GZIP", "OPAQUE_ARCHIVES", "ZIP", "Inflate", "TarWalk", "ZipWalk"]

ZIP: Final = b"PK\x03\x04"
GZIP: Final = b"\x1f\x8b"
#: Archives the walk counts as one level and does not read into.
OPAQUE_ARCHIVES: Final = (
    (b"Rar!\x1a\x07", "rar"), (b"7z\xbc\xaf\x27\x1c", "7z"), (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"), (b"MSCF\0\0\0\0", "cab"), (b"\x60\xea", "arj"),
)
_ZIP_HEADER: Final = struct.Struct("<4sHHHHHIIIHH")
_ZIP64_EXTRA: Final = 0x0001
_FLAG_ENCRYPTED: Final = 0x0001
_FLAG_DESCRIPTOR: Final = 0x0008
_STORED, _DEFLATED = 0, 8
_ARCHIVE_NAMES: Final = re.compile(
    rb"(?i)\.(zip|jar|rar|7z|gz|tgz|bz2|tbz2?|xz|txz|tar|cab|arj|lzh|lha|ace|iso|z)$")


class Inflate:
    """Inflates the first :data:`INFLATE_PREFIX` bytes of a stream into a sink, then stops."""

    def __init__(self, walk: Walk, wbits: int, sink: Sink) -> None:
        self.walk = walk
        self.inflater = zlib.decompressobj(wbits)
        self.sink = sink
        self.produced = 0
        self.done = False

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        want = min(INFLATE_PREFIX - self.produced, self.walk.inflate_left)
        if want <= 0:
            self.close()
            return
        try:
            out = self.inflater.decompress(data, want)
        except zlib.error:
            self.close()  # corrupt: the engine will say what it makes of it
            return
        self.produced += len(out)
        self.walk.inflate_left -= len(out)
        if out:
            self.sink.feed(out)
        if self.produced >= INFLATE_PREFIX or self.inflater.eof or self.walk.inflate_left <= 0:
            self.close()

    def close(self) -> None:
        if not self.done:
            self.done = True
            self.sink.close()


class ZipWalk:
    """Reads a zip's local headers as they stream past; members at ``depth``.

    Each member's content goes to a :class:`Sniff` (stored members whole,
    deflated ones through :class:`Inflate`'s prefix), so an archive or a
    message inside it is seen without unpacking the member.  A member whose
    size the local header does not give (a data descriptor follows it) ends
    the walk: only its own start is looked at.
    """

    def __init__(self, walk: Walk, depth: int) -> None:
        self.walk = walk
        self.depth = depth
        self.buf = bytearray()
        self.need = _ZIP_HEADER.size
        self.left = 0
        self.member: Sink = DISCARD
        self.state = "header"
        walk.archive(depth, "zip")

    def feed(self, data: bytes) -> None:
        pos, size = 0, len(data)
        while pos < size and self.state != "done":
            if self.state == "rest":
                self.member.feed(data[pos:] if pos else data)
                return
            if self.state == "data":
                take = min(self.left, size - pos)
                self.member.feed(data[pos:pos + take])
                pos += take
                self.left -= take
                if not self.left:
                    self._end_member()
                continue
            take = min(self.need - len(self.buf), size - pos)
            self.buf += data[pos:pos + take]
            pos += take
            if len(self.buf) == self.need:
                self._header()

    def _header(self) -> None:
        head = self.buf
        (magic, _version, flags, method, _time, _date, _crc, csize, usize, name_len,
         extra_len) = _ZIP_HEADER.unpack_from(head)
        if magic != ZIP:
            self.state = "done"  # the central directory, or something else: no more members
            return
        full = _ZIP_HEADER.size + name_len + extra_len
        if len(head) < full:
            self.need = full
            return
        name = bytes(head[_ZIP_HEADER.size:_ZIP_HEADER.size + name_len])
        extra = bytes(head[_ZIP_HEADER.size + name_len:full])
        if 0xFFFFFFFF in (csize, usize):
            usize, csize = zip64_sizes(extra) or (usize, csize)
        self.buf = bytearray()
        self.need = _ZIP_HEADER.size
        if not self.walk.member(self.depth, "zip"):
            self.state = "done"
            return
        self.walk.unpacked(usize, f"zip member {name[-60:].decode('latin-1')!r}")
        if _ARCHIVE_NAMES.search(name):
            self.walk.reach(self.depth + 1, f"a member of {name[-60:].decode('latin-1')!r}")
        sniff = Sniff(self.walk, self.depth, is_part=True)
        if flags & _FLAG_ENCRYPTED or name.endswith(b"/"):
            self.member = DISCARD
        elif method == _STORED:
            self.member = sniff
        elif method == _DEFLATED:
            self.member = Inflate(self.walk, -15, sniff)
        else:
            self.member = DISCARD
        if flags & _FLAG_DESCRIPTOR and not csize:
            self.state = "rest"
        elif csize:
            self.left = csize
            self.state = "data"
        else:
            self._end_member()

    def _end_member(self) -> None:
        member, self.member = self.member, DISCARD
        member.close()
        self.state = "header"

    def close(self) -> None:
        if self.state in ("data", "rest"):
            self._end_member()
        self.state = "done"


def zip64_sizes(extra: bytes) -> tuple[int, int] | None:
    """(unpacked, packed) sizes from a local header's zip64 extra field, if it has one."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        if tag == _ZIP64_EXTRA and length >= 16:
            unpacked, packed = struct.unpack_from("<QQ", extra, pos + 4)
            return int(unpacked), int(packed)
        pos += 4 + length
    return None


class TarWalk:
    """Reads tar headers as they stream past; regular files' content is sniffed."""

    def __init__(self, walk: Walk, depth: int) -> None:
        self.walk = walk
        self.depth = depth
        self.buf = bytearray()
        self.left = 0
        self.pad = 0
        self.member: Sink = DISCARD
        self.done = False
        walk.archive(depth, "tar")

    def feed(self, data: bytes) -> None:
        pos, size = 0, len(data)
        while pos < size and not self.done:
            if self.left:
                take = min(self.left, size - pos)
                self.member.feed(data[pos:pos + take])
                pos += take
                self.left -= take
                if not self.left:
                    member, self.member = self.member, DISCARD
                    member.close()
                continue
            if self.pad:
                take = min(self.pad, size - pos)
                pos += take
                self.pad -= take
                continue
            take = min(512 - len(self.buf), size - pos)
            self.buf += data[pos:pos + take]
            pos += take
            if len(self.buf) == 512:
                self._header(bytes(self.buf))
                self.buf = bytearray()

    def _header(self, block: bytes) -> None:
        if not block.strip(b"\0"):
            self.done = True  # the end-of-archive blocks
            return
        field = block[124:136]
        try:
            if field[0] & 0x80:  # GNU base-256
                length = int.from_bytes(field[1:], "big")
            else:
                length = int(field.strip(b" \0") or b"0", 8)
        except ValueError:
            self.done = True
            return
        if not self.walk.member(self.depth, "tar"):
            self.done = True
            return
        regular = block[156:157] in (b"0", b"\0", b"7")
        if regular:
            name = block[:100].split(b"\0", 1)[0][-60:].decode("latin-1")
            self.walk.unpacked(length, f"tar member {name!r}")
        self.member = Sniff(self.walk, self.depth, is_part=True) if regular else DISCARD
        self.left = length
        self.pad = -length % 512
        if not length:
            member, self.member = self.member, DISCARD
            member.close()

    def close(self) -> None:
        member, self.member = self.member, DISCARD
        member.close()
        self.done = True
