"""Test mail for the AV brain, and the clamd signatures that detect it.

Run ``python -m miltermonkey_av.testing.samples OUTDIR`` to write every
sample as ``OUTDIR/NAME.eml`` (to feed them to a real MTA by hand); tests use
:data:`SAMPLES`, :func:`sample` and the markers.

Why generated instead of committed .eml files: a desktop scanner on a
developer's machine would quarantine a checked-in EICAR file, and the
encodings (zip, base64, quoted-printable, nested message/rfc822) are easier
to review as the code that builds them.  Every sample is built
deterministically, so the bytes are the same on every run.

The markers are strings invented for this project.  :func:`signature_files`
is the ClamAV database for them (hex ``.ndb`` body signatures and one
``.hdb`` MD5 file signature); the ``clamd_server`` fixture loads it, and the
brain's tests keep a committed copy for ``clamscan -d``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import random
import sys
import zipfile
from email import policy
from email.message import EmailMessage
from pathlib import Path

import attrs

__all__ = [
    "ALPHA",
    "CLEAN",
    "EICAR",
    "EICAR_DATABASE",
    "EICAR_SIGNATURE",
    "HASH_PAYLOAD",
    "INFECTED",
    "NAME_ALPHA",
    "NAME_EICAR",
    "NAME_HASH",
    "NAME_QP",
    "NAME_WORM",
    "QP",
    "SAMPLES",
    "WORM",
    "Sample",
    "many_parts",
    "nested_multipart",
    "nested_rfc822",
    "nested_zip",
    "nested_zip_message",
    "sample",
    "signature_files",
    "zip_bomb_message",
]

#: The 68-byte EICAR anti-virus test string, split so that no scanner on a
#: developer's machine quarantines this source file.
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"

#: Invented marker strings; each has a signature in :func:`signature_files`.
ALPHA = b"MilterMonkey-AV test marker ALPHA 5b2f0c1e8d7a4c339e416a0f2d9b7c15"
WORM = b"MilterMonkey-AV test marker WORM 0c9e1f5a77d34b2e8f1a6c0d3b5e7a91"
#: Contains '=' and is longer than a quoted-printable line, so its encoded
#: form (=3D escapes, soft line breaks) never contains the marker itself.
QP = (b"MilterMonkey-AV=quoted=printable=marker=" + b"7d1c0b9a2e8f4a6b" * 4 + b"=end")
#: An attachment detected by its MD5 (``.hdb``): only the decoded file matches.
HASH_PAYLOAD = b"MilterMonkey-AV hash signature payload\n" * 40

SUFFIX = ".UNOFFICIAL"  # clamd appends it to every signature it did not ship
#: The name clamd reports for :data:`EICAR` with these signatures.
EICAR_SIGNATURE = "MilterMonkey.Test.EICAR" + SUFFIX
NAME_EICAR = EICAR_SIGNATURE
NAME_ALPHA = "MilterMonkey.Test.Alpha" + SUFFIX
NAME_WORM = "MilterMonkey.Test.Worm.Mydoom" + SUFFIX
NAME_QP = "MilterMonkey.Test.QP" + SUFFIX
NAME_HASH = "MilterMonkey.Test.Hash" + SUFFIX


def _ndb(name: str, data: bytes) -> str:
    # Name:TargetType:Offset:HexSignature  (0 = any file, * = any offset)
    return f"{name.removesuffix(SUFFIX)}:0:*:{data.hex()}\n"


#: The smallest database clamd starts with (it refuses an empty one): EICAR only.
EICAR_DATABASE = {"miltermonkey-eicar.ndb": _ndb(EICAR_SIGNATURE, EICAR)}


def signature_files() -> dict[str, str]:
    """The signature database for every sample, as ``{file name: content}``.

    ``miltermonkey-eicar.ndb`` is also the file of :data:`EICAR_DATABASE`, the
    clamd part's default, so passing these files to it replaces that file
    instead of loading EICAR twice.
    """
    return {
        **EICAR_DATABASE,
        "miltermonkey-av.ndb": _ndb(NAME_ALPHA, ALPHA) + _ndb(NAME_WORM, WORM) + _ndb(NAME_QP, QP),
        # MD5:FileSize:Name (ClamAV's hash signatures are MD5; no security involved)
        "miltermonkey-av.hdb": (
            f"{hashlib.md5(HASH_PAYLOAD, usedforsecurity=False).hexdigest()}:"
            f"{len(HASH_PAYLOAD)}:{NAME_HASH.removesuffix(SUFFIX)}\n"
        ),
    }


@attrs.frozen
class Sample:
    """One test message and what clamd must say about it."""

    name: str
    raw: bytes
    #: The virus name clamd reports, or None for clean mail.
    expect: str | None
    #: Marker that must NOT appear in the raw bytes (proves the engine decoded).
    hidden: bytes | None = None


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            info = zipfile.ZipInfo(name, date_time=(2005, 1, 23, 6, 43, 39))
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)
    return buf.getvalue()


def _noise(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _base(subject: str, sender: str = "alice@example.org",
          to: str = "bob@example.net", msgid: str | None = None) -> EmailMessage:
    m = EmailMessage(policy=policy.SMTP)
    m["From"] = sender
    m["To"] = to
    m["Subject"] = subject
    m["Date"] = "Sun, 23 Jan 2005 06:43:39 +0000"
    m["Message-ID"] = msgid or f"<{subject.replace(' ', '.').lower()}@example.org>"
    return m


def _bytes(m: EmailMessage) -> bytes:
    return m.as_bytes(policy=policy.SMTP)


def clean_plain() -> bytes:
    m = _base("hello")
    m.set_content("Just saying hello.\nNothing to see here.\n")
    return _bytes(m)


def clean_multipart() -> bytes:
    m = _base("report attached")
    m.set_content("The report is attached.\n")
    m.add_alternative("<p>The report is <b>attached</b>.</p>\n", subtype="html")
    m.add_attachment(_noise(20000, 1), maintype="application", subtype="octet-stream",
                     filename="report.bin")
    return _bytes(m)


def clean_zip() -> bytes:
    m = _base("archive")
    m.set_content("Zipped notes.\n")
    m.add_attachment(_zip({"notes.txt": b"nothing bad\n" * 100}), maintype="application",
                     subtype="zip", filename="notes.zip")
    return _bytes(m)


def eicar_body() -> bytes:
    m = _base("eicar in the body")
    m.set_content(EICAR.decode("ascii") + "\n", cte="7bit")
    return _bytes(m)


def eicar_base64() -> bytes:
    m = _base("eicar attachment")
    m.set_content("see attachment\n")
    m.add_attachment(EICAR, maintype="application", subtype="octet-stream",
                     filename="eicar.com")
    return _bytes(m)


def eicar_zip() -> bytes:
    m = _base("eicar zipped")
    m.set_content("see attachment\n")
    m.add_attachment(_zip({"readme.txt": b"hi\n", "eicar.com": EICAR}),
                     maintype="application", subtype="zip", filename="eicar.zip")
    return _bytes(m)


def alpha_base64() -> bytes:
    m = _base("alpha binary")
    m.set_content("binary attached\n")
    m.add_attachment(_noise(3000, 2) + ALPHA + _noise(3000, 3), maintype="application",
                     subtype="octet-stream", filename="data.bin")
    return _bytes(m)


def alpha_zip() -> bytes:
    m = _base("alpha zipped")
    m.set_content("zip attached\n")
    m.add_attachment(_zip({"a/b/data.bin": _noise(5000, 4) + ALPHA}), maintype="application",
                     subtype="zip", filename="data.zip")
    return _bytes(m)


def alpha_nested() -> bytes:
    """mixed > (alternative, message/rfc822 > mixed > base64 zip > file with ALPHA)."""
    inner = _base("forwarded inner", sender="carol@example.com", msgid="<inner@example.com>")
    inner.set_content("inner text\n")
    inner.add_attachment(_zip({"deep.bin": ALPHA + b"\n"}), maintype="application",
                         subtype="zip", filename="deep.zip")
    outer = _base("fwd: nested")
    outer.set_content("see forwarded message\n")
    outer.add_alternative("<p>see forwarded message</p>\n", subtype="html")
    outer.add_attachment(inner)  # message/rfc822
    return _bytes(outer)


def qp_text() -> bytes:
    m = _base("quoted printable")
    m.set_content("Line before.\n" + QP.decode("ascii") + "\nLine after.\n",
                  cte="quoted-printable")
    return _bytes(m)


def hash_attachment() -> bytes:
    m = _base("hash match")
    m.set_content("file attached\n")
    m.add_attachment(HASH_PAYLOAD, maintype="application", subtype="octet-stream",
                     filename="payload.dat")
    return _bytes(m)


def worm_mydoom() -> bytes:
    """A mass-mailer-style message: forged sender, zipped payload."""
    m = _base("Mail Delivery System", sender="postmaster@victim.example",
              to="bob@example.net", msgid="<worm@victim.example>")
    m.set_content("The message contains Unicode characters and has been sent as a binary "
                  "attachment.\n")
    m.add_attachment(_zip({"document.scr": _noise(2000, 5) + WORM}), maintype="application",
                     subtype="zip", filename="document.zip")
    return _bytes(m)


def eicar_8bit_headers() -> bytes:
    """EICAR behind raw Latin-1 header bytes and a NUL-free but hostile subject."""
    head = (b"From: =?iso-8859-1?q?J=FCrgen?= <juergen@example.de>\r\n"
            b"To: bob@example.net\r\n"
            b"Subject: Gr\xfc\xdfe \xe9t\xe9 %s %v %%\r\n"
            b"Message-ID: <latin1@example.de>\r\n"
            b"MIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=iso-8859-1\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n\r\n")
    return head + b"Gr\xfc\xdfe\r\n" + EICAR + b"\r\n"


# --- structures past a scanner's limits --------------------------------------------------
#
# clamd stops descending at MaxRecursion nested containers and after MaxFiles
# files, and (without AlertExceedsMax) then answers "OK" for what it never
# looked at.  These build EICAR at the bottom of such structures.  Sizes stay
# small: 50,000 parts is 2.4 MB, 50 forwarded levels 26 kB.


def _eicar_message(subject: str = "the bottom") -> EmailMessage:
    m = _base(subject, msgid="<bottom@example.org>")
    m.set_content("attached\n")
    m.add_attachment(EICAR, maintype="application", subtype="octet-stream",
                     filename="eicar.com")
    return m


def nested_rfc822(depth: int, payload: bytes | None = None) -> bytes:
    """EICAR (or the message *payload*) forwarded as an attachment *depth* times.

    Each level is what a mail client sends for "forward as attachment": a
    ``multipart/mixed`` with a text part and the previous message as
    ``message/rfc822``.  ``depth = 0`` is the EICAR message itself.  Built
    as bytes: :mod:`email` cannot serialise a few hundred levels.
    """
    raw = payload if payload is not None else _bytes(_eicar_message())
    for level in range(1, depth + 1):
        boundary = f"fwd-{level}".encode()
        raw = (b"From: alice@example.org\r\nTo: bob@example.net\r\n"
               b"Subject: fwd " + str(level).encode() + b"\r\n"
               b"Date: Sun, 23 Jan 2005 06:43:39 +0000\r\n"
               b"Message-ID: <fwd." + str(level).encode() + b"@example.org>\r\n"
               b"MIME-Version: 1.0\r\n"
               b"Content-Type: multipart/mixed; boundary=\"" + boundary + b"\"\r\n\r\n"
               b"--" + boundary + b"\r\nContent-Type: text/plain; charset=\"utf-8\"\r\n\r\n"
               b"forwarded, level " + str(level).encode() + b"\r\n"
               b"--" + boundary + b"\r\nContent-Type: message/rfc822\r\n"
               b"Content-Disposition: attachment\r\n\r\n" + raw + b"\r\n"
               b"--" + boundary + b"--\r\n")
    return raw


def nested_multipart(depth: int) -> bytes:
    """EICAR as a base64 attachment inside *depth* nested ``multipart/mixed`` bodies."""
    inner = (b"Content-Type: application/octet-stream; name=eicar.com\r\n"
             b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.b64encode(EICAR) + b"\r\n")
    for level in range(depth, 0, -1):
        boundary = f"level-{level}".encode()
        inner = (b"Content-Type: multipart/mixed; boundary=\"" + boundary + b"\"\r\n\r\n"
                 b"--" + boundary + b"\r\nContent-Type: text/plain\r\n\r\nlevel "
                 + str(level).encode() + b"\r\n--" + boundary + b"\r\n" + inner
                 + b"--" + boundary + b"--\r\n")
    return (b"From: alice@example.org\r\nTo: bob@example.net\r\n"
            b"Subject: nested multipart " + str(depth).encode() + b"\r\n"
            b"Message-ID: <nested.multipart." + str(depth).encode() + b"@example.org>\r\n"
            b"MIME-Version: 1.0\r\n" + inner)


def many_parts(count: int) -> bytes:
    """A ``multipart/mixed`` with *count* small text parts, then EICAR as the last part.

    Written as bytes directly: :mod:`email` takes minutes for 50,000 parts.
    """
    boundary = b"many-parts-boundary"
    out = [b"From: alice@example.org\r\nTo: bob@example.net\r\n"
           b"Subject: " + str(count).encode() + b" parts\r\n"
           b"Message-ID: <parts." + str(count).encode() + b"@example.org>\r\n"
           b"MIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary=\"" + boundary + b"\"\r\n\r\n"]
    out.extend(b"--" + boundary + b"\r\nContent-Type: text/plain\r\n\r\npart "
               + str(i).encode() + b"\r\n" for i in range(count))
    out.append(b"--" + boundary + b"\r\nContent-Type: application/octet-stream; name=eicar.com"
               b"\r\nContent-Transfer-Encoding: base64\r\n\r\n" + base64.b64encode(EICAR)
               + b"\r\n--" + boundary + b"--\r\n")
    return b"".join(out)


def nested_zip(depth: int, payload: bytes = EICAR, *, stored: bool = False,
               decoy: bytes = b"") -> bytes:
    """A zip holding a zip ... *depth* archives in all, with *payload* in the innermost.

    ``stored`` keeps every level uncompressed (the nested archives are then
    visible byte for byte); ``decoy`` puts a member before the nested one at
    every level.
    """
    if depth < 1:
        raise ValueError("a nested zip has at least one level")
    method = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    data, name = payload, "eicar.com"
    for level in range(depth, 0, -1):
        files = {"decoy.bin": decoy} if decoy else {}
        files[name] = data
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", method) as z:
            for fname, content in files.items():
                info = zipfile.ZipInfo(fname, date_time=(2005, 1, 23, 6, 43, 39))
                info.compress_type = method
                z.writestr(info, content)
        data, name = buf.getvalue(), f"level{level}.zip"
    return data


def nested_zip_message(depth: int, *, stored: bool = False, decoy: bytes = b"") -> bytes:
    """A message with :func:`nested_zip` attached (EICAR *depth* archives down)."""
    m = _base(f"zip nested {depth}", msgid=f"<zip.{depth}@example.org>")
    m.set_content("archive attached\n")
    m.add_attachment(nested_zip(depth, stored=stored, decoy=decoy), maintype="application",
                     subtype="zip", filename="level1.zip")
    return _bytes(m)


def zip_bomb_message(member_mib: int = 100, *, zips: int = 10, files: int = 10) -> bytes:
    """The issue's nested zip: *zips* zips of *files* files of *member_mib* MiB of zeros each,
    EICAR as one more file of the last zip (10 x 10 x 100 MB: 10 GB, 28 kB zipped).

    Building the default takes about 20 s (a hundred 100 MiB compressions).
    """
    zeros = bytes(member_mib * 1024 * 1024)

    def inner(with_eicar: bool) -> bytes:
        files_in = {f"file{i}.bin": zeros for i in range(files)}
        if with_eicar:
            files_in["eicar.com"] = EICAR
        return _zip(files_in)

    plain = inner(False)
    outer = {f"inner{i}.zip": plain for i in range(zips - 1)}
    outer[f"inner{zips - 1}.zip"] = inner(True)
    m = _base(f"{zips} x {files} x {member_mib} MiB", msgid="<zip.bomb@example.org>")
    m.set_content("archive attached\n")
    m.add_attachment(_zip(outer), maintype="application", subtype="zip", filename="bomb.zip")
    return _bytes(m)


SAMPLES: tuple[Sample, ...] = (
    Sample("clean-plain", clean_plain(), None),
    Sample("clean-multipart", clean_multipart(), None),
    Sample("clean-zip", clean_zip(), None),
    Sample("eicar-body", eicar_body(), NAME_EICAR),
    Sample("eicar-base64", eicar_base64(), NAME_EICAR, EICAR),
    Sample("eicar-zip", eicar_zip(), NAME_EICAR, EICAR),
    Sample("eicar-8bit-headers", eicar_8bit_headers(), NAME_EICAR),
    Sample("alpha-base64", alpha_base64(), NAME_ALPHA, ALPHA),
    Sample("alpha-zip", alpha_zip(), NAME_ALPHA, ALPHA),
    Sample("alpha-nested", alpha_nested(), NAME_ALPHA, ALPHA),
    Sample("qp-text", qp_text(), NAME_QP, QP),
    Sample("hash-attachment", hash_attachment(), NAME_HASH, HASH_PAYLOAD),
    Sample("worm-mydoom", worm_mydoom(), NAME_WORM, WORM),
)

CLEAN = tuple(s for s in SAMPLES if s.expect is None)
INFECTED = tuple(s for s in SAMPLES if s.expect is not None)


def sample(name: str) -> Sample:
    """The sample called *name*; tests pick single samples by name, not by position."""
    for s in SAMPLES:
        if s.name == name:
            return s
    raise KeyError(name)


def main(argv: list[str]) -> int:
    """Write every sample as an .eml file, to send them through a real MTA by hand."""
    if len(argv) != 2:
        print(f"usage: {argv[0]} OUTDIR", file=sys.stderr)
        return 2
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for s in SAMPLES:
        (out / f"{s.name}.eml").write_bytes(s.raw)
    print(f"wrote {len(SAMPLES)} samples to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
