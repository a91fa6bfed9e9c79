"""The structure walk on its own: what it counts, where it stops, and that it stays bounded.

No engine here; tests/test_av_limits.py puts the same messages through a
real clamd and the brain.
"""

from __future__ import annotations

import base64
import gzip
import io
import quopri
import random
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from miltermonkey_av.mime_limits import (
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_PARTS,
    MAX_CONTENT_FIELDS,
    MAX_FIELD,
    Structure,
    inspect,
    looks_like_mail,
)
from miltermonkey_av.testing import EICAR
from miltermonkey_av.testing import samples as av_samples
from miltermonkey_av.walk import MEMBER_BUDGET

UNLIMITED = {"max_depth": 10**6, "max_parts": 10**9}


def walk(raw: bytes, chunk: int = 65536, **limits: int) -> Structure:
    return inspect((raw[i:i + chunk] for i in range(0, len(raw), chunk)),
                   **({**UNLIMITED, **limits}))


def head(content_type: str, extra: str = "") -> bytes:
    return (f"From: a@example.org\r\nSubject: t\r\nMIME-Version: 1.0\r\n"
            f"Content-Type: {content_type}\r\n{extra}\r\n").encode()


def attachment(data: bytes, content_type: str = "application/octet-stream") -> bytes:
    """A multipart/mixed message with ``data`` as its one base64 part."""
    return (head('multipart/mixed; boundary="b"') + b"--b\r\nContent-Type: "
            + content_type.encode() + b"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + base64.encodebytes(data).replace(b"\n", b"\r\n") + b"--b--\r\n")


def zip_of(files: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


# --- what it counts -------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    b"From the desk of the CEO: hello.\r\n",
    b"From the desk\r\nFrom the desk\r\nFrom here on, nothing.\r\n",
    b">From a quoted mbox line\r\n",
])
def test_a_body_that_starts_with_from_is_not_mail_inside_mail(text: bytes) -> None:
    """A plain body starting "From " looks like mbox to clamd's typing: the mbox line
    is skipped, not taken for the body and sniffed again at every level."""
    raw = b"From: a@example.org\r\nSubject: memo\r\n\r\n" + text
    s = inspect([raw])
    assert s.exceeded is None and s.depth <= 1, s


def test_mbox_envelope_lines_still_count_each_nested_message() -> None:
    inner = b"From someone@example.org Thu Dec  3 10:00:00 2026\r\nSubject: inner\r\n\r\nx\r\n"
    nested = inner
    for _ in range(5):
        nested = (b"From someone@example.org Thu Dec  3 10:00:00 2026\r\nSubject: fwd\r\n"
                  b"\r\n" + nested)
    s = walk(b"From: a@example.org\r\nSubject: t\r\n\r\n" + nested)
    assert s.depth == 6, s  # five forwards and the inner message, each one level


def test_the_shipped_samples_are_far_inside_the_defaults() -> None:
    for s in av_samples.SAMPLES:
        result = walk(s.raw, max_depth=DEFAULT_MAX_DEPTH, max_parts=DEFAULT_MAX_PARTS)
        assert result.within_limits, s.name
        assert result.depth <= 3 and result.parts <= 6, (s.name, result)


@pytest.mark.parametrize("levels", [0, 1, 5, 15, 20, 50])
def test_each_forwarded_message_is_one_level(levels: int) -> None:
    # mixed (0) > message/rfc822 part = forwarded message (1) > its parts (2) ...
    result = walk(av_samples.nested_rfc822(levels))
    assert result.depth == levels + 1
    assert result.parts == 2 * (levels + 1)


@pytest.mark.parametrize("levels", [1, 5, 17, 20])
def test_each_nested_multipart_is_one_level(levels: int) -> None:
    assert walk(av_samples.nested_multipart(levels)).depth == levels


def test_a_message_whose_body_is_a_message_adds_one() -> None:
    raw = av_samples.nested_rfc822(0)
    for _ in range(4):
        raw = head("message/rfc822") + raw
    assert walk(raw).depth == 4 + 1  # four wrappers, then the EICAR message's own parts


@pytest.mark.parametrize("count", [1000, 10_000, 50_000])
def test_every_part_is_counted(count: int) -> None:
    result = walk(av_samples.many_parts(count))
    assert (result.parts, result.depth) == (count + 1, 1)


@pytest.mark.parametrize("levels", [1, 2, 5, 15, 20])
@pytest.mark.parametrize("stored", [False, True], ids=["deflated", "stored"])
def test_each_nested_zip_is_one_level(levels: int, stored: bool) -> None:
    # the zip part is at depth 1; its members at 2, theirs at 3 ...
    result = walk(av_samples.nested_zip_message(levels, stored=stored))
    assert (result.depth, result.archives) == (levels + 1, levels)


def test_a_small_member_before_the_nested_zip_hides_nothing() -> None:
    # Each level's decoy eats into the 16 KiB looked at in the level above: 8 x 1 kB fits.
    result = walk(av_samples.nested_zip_message(8, decoy=random.Random(1).randbytes(1000)))
    assert result.depth == 9


def test_a_nested_zip_past_the_inflated_prefix_counts_by_its_name() -> None:
    # A 20 kB incompressible member first in every level pushes the next level
    # past the 16 KiB looked at.  The zip part is at 1 and its members at 2;
    # "level2.zip" counts its members at 3 by name; below that nothing is seen.
    # clamd's AlertExceedsMax covers what is left (tests/test_av_limits.py).
    raw = av_samples.nested_zip_message(8, decoy=random.Random(2).randbytes(20_000))
    assert walk(raw).depth == 3


def test_a_mail_inside_a_base64_attachment_is_walked() -> None:
    inner = av_samples.nested_rfc822(3)
    result = walk(attachment(inner, "application/octet-stream; name=forwarded.eml"))
    assert result.depth == 1 + 4  # the attachment's depth, then the message's own levels


def test_base64_encoded_message_rfc822_is_walked() -> None:
    raw = av_samples.nested_rfc822(0)
    for _ in range(6):
        raw = attachment(raw, "message/rfc822")
    assert walk(raw).depth == 7


def test_quoted_printable_nested_mail_is_walked() -> None:
    inner = av_samples.nested_rfc822(2)
    qp = quopri.encodestring(inner.replace(b"\r\n", b"\n")).replace(b"\n", b"\r\n")
    assert b"From: " not in qp.split(b"\r\n", 1)[0] or b"=" in qp  # really encoded
    raw = (head('multipart/mixed; boundary="b"') + b"--b\r\nContent-Type: text/plain\r\n"
           b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + qp + b"\r\n--b--\r\n")
    assert walk(raw).depth == 1 + 3


def test_a_digest_part_is_a_message_by_default() -> None:
    raw = (head('multipart/digest; boundary="d"')
           + b"--d\r\n\r\n" + av_samples.nested_rfc822(2) + b"\r\n--d--\r\n")
    assert walk(raw).depth == 1 + 3


def test_of_two_content_types_the_structural_one_counts() -> None:
    raw = (b"From: a@example.org\r\nContent-Type: text/plain\r\n"
           b"Content-Type: multipart/mixed; boundary=x\r\n\r\n"
           b"--x\r\nContent-Type: multipart/mixed; boundary=y\r\n\r\n--y\r\n\r\nhi\r\n--y--\r\n"
           b"--x--\r\n")
    assert walk(raw).depth == 2


def test_gzip_and_tar_are_levels_too() -> None:
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as t:
        data = zip_of({"eicar.com": EICAR})
        info = tarfile.TarInfo("inner.zip")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    # part (1) > gzip content (2) > tar member (3) > zip member (4)
    assert walk(attachment(gzip.compress(tar.getvalue()))).depth == 4


def test_an_archive_it_cannot_read_is_still_one_level() -> None:
    assert walk(attachment(b"Rar!\x1a\x07\x00" + bytes(100))).depth == 2


def test_text_that_reads_like_a_reply_is_not_a_message() -> None:
    body = b"".join(b"Re: point %d\r\n\r\n" % i for i in range(40))
    raw = head("text/plain") + body
    assert walk(raw).depth == 0


def test_mail_magic_follows_clamd() -> None:
    for line in (b"Received: from x", b"From: a@b", b"From alice Mon Jan  1", b"To: x",
                 b"Return-Path: <a@b>", b"MIME-Version: 1.0", b"x-uidl: 1", b"SUBJECT: hi"):
        assert looks_like_mail(line), line
    for line in (b"Re: your mail", b"Hello: world", b"%PDF-1.4", b"PK\x03\x04", b"", b"Date"):
        assert not looks_like_mail(line), line


# --- where it stops -------------------------------------------------------------------------


@pytest.mark.parametrize(("levels", "within"), [(11, True), (12, False)])
def test_depth_at_and_past_the_limit(levels: int, within: bool) -> None:
    result = walk(av_samples.nested_rfc822(levels), max_depth=12)
    assert result.within_limits is within
    if not within:
        assert result.exceeded is not None and result.exceeded.limit == "depth"
        assert result.depth == 13
        assert "deeper than max_mime_depth 12" in result.exceeded.detail


@pytest.mark.parametrize(("count", "within"), [(99, True), (100, False)])
def test_parts_at_and_past_the_limit(count: int, within: bool) -> None:
    result = walk(av_samples.many_parts(count), max_parts=100)
    assert result.within_limits is within
    assert result.parts == min(count + 1, 101)
    if not within:
        assert result.exceeded is not None and result.exceeded.limit == "parts"


@pytest.mark.parametrize(("levels", "within"), [(11, True), (12, False)])
def test_archive_depth_at_and_past_the_limit(levels: int, within: bool) -> None:
    result = walk(av_samples.nested_zip_message(levels), max_depth=12)
    assert result.within_limits is within


def test_a_member_that_unpacks_past_the_size_limit() -> None:
    raw = attachment(zip_of({"zeros.bin": bytes(3 * 1024 * 1024)}))
    assert walk(raw, max_member_size=3 * 1024 * 1024).within_limits
    result = walk(raw, max_member_size=3 * 1024 * 1024 - 1)
    assert result.exceeded is not None and result.exceeded.limit == "size"
    assert "'zeros.bin' of 3145728 bytes unpacked" in result.exceeded.detail


def test_an_oversized_content_type_is_a_limit_not_a_blind_spot() -> None:
    raw = head('multipart/mixed; x="' + "a" * MAX_FIELD + '"; boundary=b') + b"--b\r\n\r\nx\r\n"
    result = walk(raw)
    assert result.exceeded is not None and result.exceeded.limit == "header"


def test_a_part_with_a_crowd_of_content_types_is_a_limit() -> None:
    raw = head("text/plain", "Content-Type: text/plain\r\n" * MAX_CONTENT_FIELDS)
    result = walk(raw)
    assert result.exceeded is not None and result.exceeded.limit == "header"
    assert walk(head("text/plain", "Content-Type: text/plain\r\n" * 14)).within_limits


def test_it_stops_reading_at_the_first_limit() -> None:
    raw = av_samples.many_parts(50_000)
    read = 0

    def chunks() -> Iterator[bytes]:
        nonlocal read
        for i in range(0, len(raw), 65536):
            read += 65536
            yield raw[i:i + 65536]

    result = inspect(chunks(), max_depth=12, max_parts=100)
    assert result.exceeded is not None
    assert read == 65536  # 100 parts fit in the first chunk


# --- bounded ----------------------------------------------------------------------------------


def test_a_base64_attachment_without_line_breaks_is_still_decoded() -> None:
    inner = av_samples.many_parts(2000)
    one_line = base64.b64encode(inner)
    assert len(one_line) > 64 * 1024  # longer than a line is kept
    raw = (head('multipart/mixed; boundary="b"') + b"--b\r\nContent-Type: message/rfc822\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\n" + one_line + b"\r\n--b--\r\n")
    assert walk(raw).parts == 1 + 2001


def test_a_zip_of_many_empty_files_costs_at_most_ten_thousand_headers() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for i in range(MEMBER_BUDGET + 2000):
            z.writestr(f"{i}", b"")
    result = walk(attachment(buf.getvalue()))
    assert result.within_limits and result.depth == 2
    assert result.members == MEMBER_BUDGET  # then the archive is left to the engine


MULTIPART = head('multipart/mixed; boundary="b"')
HOSTILE_BODIES: dict[str, Callable[[], bytes]] = {
    # lines that each look like the start of a boundary or a header, 25 MB of them
    "25 MB of '--x' lines": lambda: MULTIPART + b"--b\r\n\r\n" + b"--x\r\n" * 5_000_000,
    "25 MB of near-boundaries": lambda: MULTIPART + b"--b\r\n\r\n" + b"--bx\r\n" * 4_000_000,
    "24 MB of header lines in a part": lambda: MULTIPART + b"--b\r\n" + b"X-A: b\r\n" * 3_000_000,
    "25 MB of one line": lambda: head("text/plain") + b"a" * 25_000_000,
    "20 MB of blank lines": lambda: MULTIPART + b"--b\r\n" + b"\r\n" * 10_000_000,
}


@pytest.mark.parametrize("name", list(HOSTILE_BODIES))
def test_hostile_bodies_are_walked_at_c_speed(name: str) -> None:
    """Each took 15-30 s when every line went through Python; now well under a second
    (the bound here is loose for a busy machine: the figures are in the README)."""
    raw = HOSTILE_BODIES[name]()
    t0 = time.perf_counter()
    result = walk(raw)
    seconds = time.perf_counter() - t0
    assert result.within_limits
    assert seconds < 8, f"{name}: {seconds:.2f} s"


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(min_value=1, max_value=700), min_size=1, max_size=40),
       name=st.sampled_from(["fwd", "zip", "parts", "b64mail"]))
def test_how_the_bytes_are_cut_changes_nothing(sizes: list[int], name: str) -> None:
    raw = {"fwd": av_samples.nested_rfc822(4),
           "zip": av_samples.nested_zip_message(4),
           "parts": av_samples.many_parts(30),
           "b64mail": attachment(av_samples.nested_rfc822(2))}[name]
    expected = walk(raw)
    pieces, pos, i = [], 0, 0
    while pos < len(raw):
        step = sizes[i % len(sizes)]
        pieces.append(raw[pos:pos + step])
        pos += step
        i += 1
    assert inspect(iter(pieces), **UNLIMITED) == expected
