"""What the structure walk before the engine costs (``miltermonkey_av.mime_limits.inspect``).

No clamd: the walk alone, over the message in 64 KiB pieces as the brain
streams it, with the brain's default limits.  Each case runs for about
``seconds`` (default 2) and the median of the runs is printed.

Run: ``python bench/bench_walk.py [seconds-per-case]``
"""

from __future__ import annotations

import base64
import io
import random
import statistics
import sys
import time
import zipfile
from collections.abc import Callable

from miltermonkey_av.mime_limits import inspect
from miltermonkey_av.testing import samples as av_samples

CHUNK = 65536


def attachment(size: int) -> bytes:
    """A text part and a base64 attachment of ``size`` random bytes."""
    b64 = base64.encodebytes(random.Random(size).randbytes(size)).replace(b"\n", b"\r\n")
    return (b"From: a@example.org\r\nSubject: bench\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n--XX\r\n"
            b"Content-Type: text/plain\r\n\r\nhello\r\n--XX\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
            b"\r\n" + b64 + b"--XX--\r\n")


def zipped(size: int) -> bytes:
    """A message with a zip of 100 files of ``size // 100`` random bytes each."""
    buf = io.BytesIO()
    rnd = random.Random(size)
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for i in range(100):
            z.writestr(f"file{i}.bin", rnd.randbytes(size // 100))
    b64 = base64.encodebytes(buf.getvalue()).replace(b"\n", b"\r\n")
    return (b"From: a@example.org\r\nSubject: zip\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n--XX\r\n"
            b"Content-Type: application/zip\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + b64 + b"--XX--\r\n")


def _hostile(after_boundary: bytes, lines: bytes) -> bytes:
    """Lines that each look like they could matter (a boundary, a header) after one part."""
    return (b"From: a@example.org\r\nSubject: hostile\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n" + after_boundary
            + lines)


CASES: list[tuple[str, Callable[[], bytes]]] = [
    ("2 KB, one attachment", lambda: attachment(1500)),
    ("50 KB, one attachment", lambda: attachment(38_000)),
    ("1 MB, one attachment", lambda: attachment(750_000)),
    ("25 MB, one attachment", lambda: attachment(18_000_000)),
    ("5 MB zip of 100 files", lambda: zipped(5_000_000)),
    ("1,000 parts", lambda: av_samples.many_parts(1000)),
    ("50,000 parts (stops at 5,001)", lambda: av_samples.many_parts(50_000)),
    ("50 forwarded levels (stops at 13)", lambda: av_samples.nested_rfc822(50)),
    ("zip 20 deep (stops at 13)", lambda: av_samples.nested_zip_message(20)),
    ("hostile: 25 MB of '--x' lines", lambda: _hostile(b"\r\n", b"--x\r\n" * 5_000_000)),
    ("hostile: 24 MB of header lines in a part",
     lambda: _hostile(b"", b"X-A: b\r\n" * 3_000_000)),
]


def main(argv: list[str]) -> int:
    seconds = float(argv[1]) if len(argv) > 1 else 2.0
    print("| message | bytes | walk ms (median) | outcome |")
    print("|---|---:|---:|---|")
    for name, build in CASES:
        raw = build()
        chunks = [raw[i:i + CHUNK] for i in range(0, len(raw), CHUNK)]
        times: list[float] = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline or len(times) < 3:
            t0 = time.perf_counter()
            result = inspect(chunks)
            times.append(time.perf_counter() - t0)
        outcome = (f"{result.exceeded.limit} limit" if result.exceeded else
                   f"depth {result.depth}, {result.parts} parts")
        print(f"| {name} | {len(raw):,} | {statistics.median(times) * 1000:.2f} | {outcome} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
