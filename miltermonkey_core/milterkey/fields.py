"""The milter key: a signed header saying which brains already judged a message.

The seed's "free pass": a message scanned for viruses on the outgoing relay
should not be scanned again on the incoming server.  Each MilterMonkey that
shares the secret adds a header like::

    X-Milter-Key: v=2; id=k2025a; host=relay1.example.org; exp=1767225600;
        bind=body; mid=Ccvkale4; body=Ba3gj8-x; mime=q0Vd2xYk;
        ran=av:continue,spam:continue; mac=D-vl8C_GT16zWsOPfpInvY-sjUrCfPnkigvbtpXu_5I

and the next one skips the brains configured with ``skip_if_key`` that the
key lists.  The MAC is an HMAC-SHA256 over a length-prefixed encoding of every
field plus the whole Message-ID and (``bind=body``) the SHA-256 of the body
and of the headers that decide how the body is read (:data:`BOUND_HEADERS`),
so a key is worth nothing on another message, on an altered body, on the same
bytes declared as another type or transfer encoding, after its expiry, or
under a secret this host does not hold.  A key that does not
verify is never trusted and is removed before the message leaves.
``docs/milter-key.md`` is the administrator's description of all of this.

This module is the header format: its fields, their canonical encoding and
the MAC over them, with a strict parser.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import struct
from collections.abc import Mapping
from typing import Final

import attrs

from miltermonkey_core.contract.model import Headers, encode_header_str
from miltermonkey_core.contract.verdict import Action

#: The header format this module writes and the only one it trusts.
FORMAT_VERSION: Final = "2"
#: Formats once written and now refused with a reason of their own: v=1 keys do
#: not bind the headers that decide how the body is read.
OBSOLETE_VERSIONS: Final = frozenset({"1"})
#: The headers that decide what the body means, bound with it (``bind=body``):
#: the same bytes are another message as base64 or as text, as a zip or as
#: plain text, as one part or as many, under another file name.  Fixed by the
#: format version, so a verifier never takes the list from the key itself.
BOUND_HEADERS: Final = ("MIME-Version", "Content-Type", "Content-Transfer-Encoding",
                        "Content-Disposition")
_BOUND_LOWER: Final = tuple(name.lower() for name in BOUND_HEADERS)
#: Shortest secret accepted: the HMAC-SHA256 block of security.
MIN_SECRET_BYTES: Final = 32
#: A key header longer than this is not even parsed.
MAX_VALUE_CHARS: Final = 8192
#: Removed key headers logged one by one per message; the rest are counted.
MAX_LOGGED_REMOVALS: Final = 20
#: Fold our header before a line would pass this many characters.
FOLD_AT: Final = 76

_KEY_ID = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_BRAIN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
KEY_ID_RE: Final = re.compile(_KEY_ID)
BRAIN_RE: Final = re.compile(_BRAIN)
HOST_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")
VERDICTS: Final = frozenset(a.value for a in Action)
BINDINGS: Final = ("body", "none")

#: Fields in the only order accepted; ``body`` and ``mime`` are present exactly
#: when bind=body.
_FIELDS: Final = ("v", "id", "host", "exp", "bind", "mid", "body", "mime", "ran", "mac")
_BOUND_FIELDS: Final = ("body", "mime")
_FIELD_RE: Final[Mapping[str, re.Pattern[str]]] = {
    "v": re.compile(r"[0-9]{1,3}"),
    "id": KEY_ID_RE,
    "host": HOST_RE,
    "exp": re.compile(r"0|[1-9][0-9]{0,11}"),
    "bind": re.compile("body|none"),
    "mid": re.compile(r"[A-Za-z0-9_-]{8}"),
    "body": re.compile(r"[A-Za-z0-9_-]{8}"),
    "mime": re.compile(r"[A-Za-z0-9_-]{8}"),
    "mac": re.compile(r"[A-Za-z0-9_-]{43}"),
}
_WSP = "[ \t\r\n]*"
_SEMI = re.compile(f"{_WSP};{_WSP}")
_COMMA = re.compile(f"{_WSP},{_WSP}")
_TAG = re.compile(r"([a-z]+)=(.*)", re.DOTALL)
_RAN_ITEM = re.compile(f"({_BRAIN}):([a-z]+)")
_DOMAIN = b"MilterMonkey milter key"
_MIME_DOMAIN = b"MilterMonkey bound headers"
_FOLD = re.compile(rb"[\r\n]")


# --------------------------------------------------------------------------------------
# Why a key is not trusted.
# --------------------------------------------------------------------------------------


class Reason:
    """The reasons a key header is not trusted (``KeyCheck.reason`` starts with one)."""

    MALFORMED = "malformed"
    UNKNOWN_KEY = "unknown key id"
    BAD_MAC = "bad MAC"
    EXPIRED = "expired"
    FUTURE = "expiry too far in the future"
    WRONG_MESSAGE = "wrong message"
    WRONG_BODY = "wrong body"
    WRONG_HEADERS = "wrong MIME headers"
    OBSOLETE = "old format"
    UNBOUND = "not bound to the body"


class MalformedKey(ValueError):
    """A key header that does not parse; the text says which part is wrong."""


class ObsoleteKey(MalformedKey):
    """A key in a format this version no longer trusts (``v=1``)."""


# --------------------------------------------------------------------------------------
# The header fields and their canonical encoding.
# --------------------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


_LENGTH = struct.Struct(">I").pack


def _lp(data: bytes) -> bytes:
    """One length-prefixed field: 4-byte big-endian length, then the bytes."""
    return _LENGTH(len(data)) + data


def normalize_message_id(headers: Headers) -> str | None:
    """The Message-ID a key binds to, or ``None`` when there is not exactly one.

    Folding whitespace is removed (it may differ between hops); case is kept,
    since the left part of a Message-ID is case-sensitive.  Two Message-ID
    headers make the message ambiguous, so such a message is neither signed
    nor trusted.
    """
    values = headers.get_all("Message-ID")
    if len(values) != 1:
        return None
    mid = re.sub(r"[ \t\r\n]+", "", values[0])
    return mid or None


def mid_tag(message_id: str) -> str:
    """A short public fingerprint of the Message-ID, for diagnosing copied keys."""
    h = hashlib.sha256(b"mid\x00" + message_id.encode("utf-8", "surrogateescape")).digest()
    return _b64url(h[:6])


def digest_tag(digest: bytes) -> str:
    """A short public fingerprint of a digest (the body's, the bound headers'), for
    explaining why a key does not match."""
    return _b64url(digest[:6])


def canonical_header_value(value: str) -> bytes:
    """A bound header's value as the MAC sees it: unfolded, without outer whitespace.

    Unfolding removes the line breaks of folding (the whitespace after them
    stays, as RFC 5322 unfolds); leading and trailing spaces and tabs go, since
    MTAs pass the value with or without the space after the colon.  Runs of
    whitespace inside are kept byte for byte: inside a quoted boundary
    (``boundary="a  b"``) they are part of the value, so collapsing them would
    let one header be swapped for another that splits the body differently.
    """
    return _FOLD.sub(b"", encode_header_str(value)).strip(b" \t")


def mime_digest(headers: Headers) -> bytes:
    """SHA-256 over every :data:`BOUND_HEADERS` header of the message, canonicalised.

    Names match case-insensitively; each name is followed by how many copies
    the message has and their values in order, all length-prefixed, so an
    absent header, an empty one and two copies all differ.
    """
    found: dict[str, list[bytes]] = {name: [] for name in _BOUND_LOWER}
    for h in headers:
        values = found.get(h.name.lower())
        if values is not None:
            values.append(canonical_header_value(h.value))
    parts = [_MIME_DOMAIN]
    for name, values in found.items():
        parts += [name.encode(), str(len(values)).encode(), *values]
    return hashlib.sha256(b"".join(map(_lp, parts))).digest()


@attrs.frozen
class KeyFields:
    """The fields of one key header (everything but the header name)."""

    key_id: str
    host: str
    expiry: int
    binding: str
    mid: str
    body: str | None
    mime: str | None
    ran: tuple[tuple[str, str], ...]
    mac: str = ""
    version: str = FORMAT_VERSION

    @property
    def brains(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.ran)

    def verdict_of(self, brain: str) -> str | None:
        for name, verdict in self.ran:
            if name == brain:
                return verdict
        return None

    def signed_bytes(self, message_id: str, body_digest: bytes | None,
                     mime_digest: bytes | None) -> bytes:
        """The canonical, unambiguous encoding the MAC is computed over.

        Every field is length-prefixed, the brain list is preceded by its
        count and each name and verdict is a field of its own, so no two
        different headers (or messages) encode to the same bytes.  With
        ``bind=body`` the body digest and the bound headers' digest
        (:func:`mime_digest`) close the list.
        """
        parts = [
            _DOMAIN,
            self.version.encode(),
            self.key_id.encode(),
            self.host.encode(),
            str(self.expiry).encode(),
            self.binding.encode(),
            self.mid.encode(),
            (self.body or "").encode(),
            (self.mime or "").encode(),
            str(len(self.ran)).encode(),
        ]
        for name, verdict in self.ran:
            parts += [name.encode(), verdict.encode()]
        parts.append(message_id.encode("utf-8", "surrogateescape"))
        bound = self.binding == "body"
        parts.append(body_digest if bound and body_digest is not None else b"")
        parts.append(mime_digest if bound and mime_digest is not None else b"")
        return b"".join(map(_lp, parts))

    def compute_mac(self, secret: bytes, message_id: str, body_digest: bytes | None,
                    mime_digest: bytes | None) -> str:
        signed = self.signed_bytes(message_id, body_digest, mime_digest)
        return _b64url(hmac.new(secret, signed, hashlib.sha256).digest())

    # --- text ---------------------------------------------------------------------

    def items(self) -> list[tuple[str, str]]:
        out = [
            ("v", self.version),
            ("id", self.key_id),
            ("host", self.host),
            ("exp", str(self.expiry)),
            ("bind", self.binding),
            ("mid", self.mid),
        ]
        if self.body is not None:
            out.append(("body", self.body))
        if self.mime is not None:
            out.append(("mime", self.mime))
        out.append(("ran", ",".join(f"{n}:{v}" for n, v in self.ran)))
        out.append(("mac", self.mac))
        return out

    def format(self, header_name: str = "X-Milter-Key", width: int = FOLD_AT) -> str:
        """The header value, folded after ``;`` or ``,`` so no line passes ``width``.

        Continuation lines start with a tab; the parser ignores whitespace
        next to the separators, so the folding is not covered by the MAC.
        """
        tokens: list[str] = []
        for tag, value in self.items():
            if tag == "ran":
                pieces = value.split(",")
                tokens += [f"ran={pieces[0]}" if i == 0 else p for i, p in enumerate(pieces)]
                tokens[-len(pieces):-1] = [t + "," for t in tokens[-len(pieces):-1]]
            else:
                tokens.append(f"{tag}={value}")
            tokens[-1] += ";"
        tokens[-1] = tokens[-1].removesuffix(";")
        lines: list[str] = []
        line = ""
        used = len(header_name) + 2
        for tok in tokens:
            sep = "" if not line or line.endswith(",") else " "
            if line and used + len(line) + len(sep) + len(tok) > width:
                lines.append(line)
                line, used = tok, 1
                continue
            line += sep + tok
        lines.append(line)
        return "\n\t".join(lines)

    @classmethod
    def parse(cls, value: str) -> KeyFields:
        """Parse a header value strictly: fixed field order, no unknown or repeated tags.

        Only whitespace next to ``;`` and ``,`` and around the value (folding)
        is ignored.  Raises :class:`MalformedKey` naming the problem.
        """
        if len(value) > MAX_VALUE_CHARS:
            raise MalformedKey(f"longer than {MAX_VALUE_CHARS} characters")
        text = value.strip(" \t\r\n")
        if not text:
            raise MalformedKey("empty")
        parts = _SEMI.split(text)
        tags: list[tuple[str, str]] = []
        for part in parts:
            m = _TAG.fullmatch(part)
            if m is None:
                raise MalformedKey(f"expected tag=value, got {_show(part)}")
            tags.append((m.group(1), m.group(2)))
        if tags[0][0] != "v":
            raise MalformedKey("does not start with the format version v=")
        if tags[0][1] in OBSOLETE_VERSIONS:
            raise ObsoleteKey(f"v={tags[0][1]} does not bind the headers that say how the "
                              f"body is read ({', '.join(BOUND_HEADERS)}); every host that "
                              f"shares the secret must sign v={FORMAT_VERSION}")
        if tags[0][1] != FORMAT_VERSION:
            raise MalformedKey(f"unsupported format version v={_show(tags[0][1])}")
        names = [t for t, _ in tags]
        bound = ("bind", "body") in tags
        expected = [f for f in _FIELDS if bound or f not in _BOUND_FIELDS]
        if names != expected:
            raise MalformedKey(f"fields {','.join(names)}; expected {','.join(expected)}")
        got = dict(tags)
        for tag, pattern in _FIELD_RE.items():
            if tag in got and not pattern.fullmatch(got[tag]):
                raise MalformedKey(f"bad {tag}={_show(got[tag])}")
        ran: list[tuple[str, str]] = []
        for item in _COMMA.split(got["ran"]):
            m = _RAN_ITEM.fullmatch(item)
            if m is None or m.group(2) not in VERDICTS:
                raise MalformedKey(f"bad ran entry {_show(item)}: expected brain:verdict")
            if any(m.group(1) == n for n, _ in ran):
                raise MalformedKey(f"brain {m.group(1)} listed twice")
            ran.append((m.group(1), m.group(2)))
        return cls(
            key_id=got["id"],
            host=got["host"],
            expiry=int(got["exp"]),
            binding=got["bind"],
            mid=got["mid"],
            body=got.get("body"),
            mime=got.get("mime"),
            ran=tuple(ran),
            mac=got["mac"],
            version=got["v"],
        )


def _show(text: str, limit: int = 40) -> str:
    shown = text if len(text) <= limit else text[:limit] + "..."
    return repr(shown)
