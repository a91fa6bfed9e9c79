"""The benchmark's message sets: deterministic, realistic enough for the engines.

Every contender gets the same bytes.  A message has the usual headers (a
unique Message-ID, which the milter key binds to), a text part of
English-like prose for SpamAssassin to chew on, and from 8 KB up a base64
attachment of random bytes that clamd has to decode and scan.  Sizes are
total message sizes; ``mix`` draws sizes from :data:`MIX` (mostly small mail,
some attachments, a few large ones).
"""

from __future__ import annotations

import base64
import random
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from email.utils import format_datetime

import attrs

SIZES: dict[str, int] = {"2k": 2 * 1024, "50k": 50 * 1024, "1m": 1024 * 1024}
#: The mix: (size name, weight).
MIX: tuple[tuple[str, int], ...] = (("2k", 70), ("50k", 25), ("1m", 5))
SENDER = "bench@client.bench.test"
RECIPIENT = "rcpt@sink.bench.test"

_VOCABULARY = (
    "the of and to in is that for it as was with be by on not he this are or his from at "
    "which but have an they you were her she there been one all we their has would when "
    "if so no will can more other what time up some out only into its them two then may "
    "first any like now my such make over our even most me state after also made many "
    "did must before back see through way where get much go well your know should down "
    "work year because come people just say each those take day good how long very new "
    "meeting report budget quarter invoice schedule project review update team customer "
    "office shipment order account delivery contract draft agenda minutes proposal "
    "please thanks regards attached following question answer monday tuesday friday "
    "tomorrow yesterday week month morning afternoon call send receive confirm check"
)
_WORDS = _VOCABULARY.split()


def _prose(rng: random.Random, nbytes: int) -> str:
    """Lines of about 70 characters of word salad, ``nbytes`` long (roughly)."""
    lines: list[str] = []
    size = 0
    while size < nbytes:
        words: list[str] = []
        n = 0
        while n < 66:
            w = rng.choice(_WORDS)
            words.append(w)
            n += len(w) + 1
        line = " ".join(words)
        line = line[0].upper() + line[1:] + "."
        lines.append(line)
        size += len(line) + 2
        if rng.random() < 0.15:
            lines.append("")
            size += 2
    return "\r\n".join(lines) + "\r\n"


def make_message(set_name: str, index: int, size: int, rng: random.Random) -> bytes:
    """One message of about ``size`` bytes (CRLF line ends, 7-bit)."""
    date = datetime(2025, 1, 1, tzinfo=UTC).timestamp() + index * 37
    headers = [
        f"From: Bench Sender <{SENDER}>",
        f"To: Bench Recipient <{RECIPIENT}>",
        f"Subject: {' '.join(rng.choice(_WORDS) for _ in range(5)).capitalize()} #{index}",
        f"Date: {format_datetime(datetime.fromtimestamp(date, UTC))}",
        f"Message-ID: <bench-{set_name}-{index:06d}.{rng.getrandbits(40):010x}@client.bench.test>",
        "MIME-Version: 1.0",
    ]
    head_len = sum(len(h) + 2 for h in headers)
    if size <= 8 * 1024:
        headers.append("Content-Type: text/plain; charset=us-ascii")
        head = "\r\n".join(headers) + "\r\n\r\n"
        body = _prose(rng, max(64, size - len(head)))
        return (head + body).encode("ascii")
    boundary = f"=_bench_{rng.getrandbits(64):016x}"
    headers.append(f'Content-Type: multipart/mixed; boundary="{boundary}"')
    text = _prose(rng, 1500)
    parts_head = (
        f"--{boundary}\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n{text}"
        f"--{boundary}\r\nContent-Type: application/octet-stream; name=\"data-{index}.bin\"\r\n"
        "Content-Transfer-Encoding: base64\r\n"
        f"Content-Disposition: attachment; filename=\"data-{index}.bin\"\r\n\r\n"
    )
    tail = f"\r\n--{boundary}--\r\n"
    room = size - head_len - len(headers[-1]) - 4 - len(parts_head) - len(tail)
    # base64 lines of 76 characters + CRLF encode 57 bytes each
    raw_len = max(57, room * 57 // 78)
    b64 = base64.encodebytes(rng.randbytes(raw_len)).replace(b"\n", b"\r\n").rstrip(b"\r\n")
    head = "\r\n".join(headers) + "\r\n\r\n"
    return (head + parts_head).encode("ascii") + b64 + tail.encode("ascii")


@attrs.frozen
class MessageSet:
    """A named list of messages, as RFC 5322 bytes with CRLF line ends."""

    name: str
    messages: tuple[bytes, ...]

    @property
    def total_bytes(self) -> int:
        return sum(len(m) for m in self.messages)

    @property
    def mean_bytes(self) -> float:
        return self.total_bytes / max(1, len(self.messages))

    def __len__(self) -> int:
        return len(self.messages)


def build_set(name: str, count: int, seed: int = 1) -> MessageSet:
    """``count`` messages of size ``name`` (a key of :data:`SIZES` or ``mix``)."""
    rng = random.Random(f"{seed}:{name}")
    if name == "mix":
        # exact proportions (largest remainders), then shuffled: a small set
        # drawn at random could miss the rare large messages altogether
        total = sum(w for _, w in MIX)
        shares = [(n, count * w / total) for n, w in MIX]
        counts = {n: int(x) for n, x in shares}
        by_rest = sorted(shares, key=lambda item: item[1] - int(item[1]), reverse=True)
        for n, _x in by_rest[: count - sum(counts.values())]:
            counts[n] += 1
        sizes = [SIZES[n] for n, _ in MIX for _ in range(counts[n])]
        rng.shuffle(sizes)
    elif name in SIZES:
        sizes = [SIZES[name]] * count
    else:
        raise ValueError(f"unknown size {name!r} (use {', '.join([*SIZES, 'mix'])})")
    return MessageSet(name, tuple(make_message(name, i, s, rng) for i, s in enumerate(sizes)))


def big_message(size: int, seed: int = 1) -> bytes:
    """One large message (the 50 MB memory test)."""
    return make_message("big", 0, size, random.Random(f"{seed}:big"))


_BARE_LF = re.compile(rb"(?<!\r)\n")


def to_crlf(raw: bytes) -> bytes:
    """LF line ends (as smtp-sink stores mail) back to CRLF."""
    return _BARE_LF.sub(b"\r\n", raw)


def wire_form(message: bytes) -> bytes:
    """The DATA payload: CRLF, dot-stuffed, ending in CRLF.CRLF."""
    data = to_crlf(message)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..") + b".\r\n"


def sample_messages() -> dict[str, bytes]:
    """Small messages for the functional checks: clean, GTUBE (spam), EICAR (virus)."""
    from miltermonkey_av.testing import EICAR
    from miltermonkey_spam.testing import GTUBE

    def msg(tag: str, body: bytes) -> bytes:
        return (
            f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: bench check {tag}\r\n"
            f"Message-ID: <bench-check-{tag}-{random.getrandbits(48):012x}@client.bench.test>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n"
        ).encode() + body + b"\r\n"

    return {
        "clean": msg("clean", b"Hello, this is a perfectly ordinary message.\r\nRegards\r\n"),
        "gtube": msg("gtube", b"This is spam.\r\n" + GTUBE + b"\r\n"),
        "eicar": msg("eicar", EICAR + b"\r\n"),
    }


def describe(sets: Sequence[MessageSet]) -> str:
    return ", ".join(f"{s.name}: {len(s)} x ~{s.mean_bytes / 1024:.0f} KiB" for s in sets)
