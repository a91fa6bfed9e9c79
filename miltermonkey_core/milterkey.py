"""The milter key: a signed header saying which brains already judged a message.

The seed's "free pass": a message scanned for viruses on the outgoing relay
should not be scanned again on the incoming server.  Each MilterMonkey that
shares the secret adds a header like::

    X-Milter-Key: v=1; id=k2025a; host=relay1.example.org; exp=1767225600;
        bind=body; mid=Ccvkale4; body=Ba3gj8-x; ran=av:continue,spam:continue;
        mac=D-vl8C_GT16zWsOPfpInvY-sjUrCfPnkigvbtpXu_5I

and the next one skips the brains configured with ``skip_if_key`` that the
key lists.  The MAC is an HMAC-SHA256 over a length-prefixed encoding of every
field plus the whole Message-ID and (``bind=body``) the SHA-256 of the body,
so a key is worth nothing on another message, on an altered body, after its
expiry, or under a secret this host does not hold.  A key that does not
verify is never trusted and is removed before the message leaves.
``docs/milter-key.md`` is the administrator's description of all of this.

Everything here is pure computation on the :class:`~miltermonkey_core.model.Message`
and the recording :class:`~miltermonkey_core.context.MilterContext`; the
engine calls :meth:`KeyService.inspect` before the brain chain and
:meth:`KeyService.finish` after it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import socket
import stat
import struct
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Protocol

import attrs

from miltermonkey_core.context import MilterContext, ReplaceBody
from miltermonkey_core.errors import ConfigError, SecretError
from miltermonkey_core.logs import ROOT
from miltermonkey_core.model import Header, Headers, Message
from miltermonkey_core.verdict import Action

log = logging.getLogger(f"{ROOT}.milterkey")

__all__ = [
    "FORMAT_VERSION",
    "MIN_SECRET_BYTES",
    "KeyCheck",
    "KeyFields",
    "KeyInspection",
    "KeyService",
    "MalformedKey",
    "Reason",
    "check_secret_file",
    "generate_secret_file",
    "load_secrets",
    "normalize_message_id",
    "parse_secrets",
]

#: The header format this module writes and the only one it reads.
FORMAT_VERSION: Final = "1"
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

#: Fields in the only order accepted; ``body`` is present exactly when bind=body.
_FIELDS: Final = ("v", "id", "host", "exp", "bind", "mid", "body", "ran", "mac")
_FIELD_RE: Final[Mapping[str, re.Pattern[str]]] = {
    "v": re.compile(r"[0-9]{1,3}"),
    "id": KEY_ID_RE,
    "host": HOST_RE,
    "exp": re.compile(r"0|[1-9][0-9]{0,11}"),
    "bind": re.compile("body|none"),
    "mid": re.compile(r"[A-Za-z0-9_-]{8}"),
    "body": re.compile(r"[A-Za-z0-9_-]{8}"),
    "mac": re.compile(r"[A-Za-z0-9_-]{43}"),
}
_WSP = "[ \t\r\n]*"
_SEMI = re.compile(f"{_WSP};{_WSP}")
_COMMA = re.compile(f"{_WSP},{_WSP}")
_TAG = re.compile(r"([a-z]+)=(.*)", re.DOTALL)
_RAN_ITEM = re.compile(f"({_BRAIN}):([a-z]+)")
_DOMAIN = b"MilterMonkey milter key"


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
    UNBOUND = "not bound to the body"


class MalformedKey(ValueError):
    """A key header that does not parse; the text says which part is wrong."""


# --------------------------------------------------------------------------------------
# The header fields and their canonical encoding.
# --------------------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _lp(data: bytes) -> bytes:
    """One length-prefixed field: 4-byte big-endian length, then the bytes."""
    return struct.pack(">I", len(data)) + data


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


def body_tag(digest: bytes) -> str:
    """A short public fingerprint of the body digest, for diagnosing altered bodies."""
    return _b64url(digest[:6])


@attrs.frozen
class KeyFields:
    """The fields of one key header (everything but the header name)."""

    key_id: str
    host: str
    expiry: int
    binding: str
    mid: str
    body: str | None
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

    def signed_bytes(self, message_id: str, body_digest: bytes | None) -> bytes:
        """The canonical, unambiguous encoding the MAC is computed over.

        Every field is length-prefixed, the brain list is preceded by its
        count and each name and verdict is a field of its own, so no two
        different headers (or messages) encode to the same bytes.
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
            str(len(self.ran)).encode(),
        ]
        for name, verdict in self.ran:
            parts += [name.encode(), verdict.encode()]
        parts.append(message_id.encode("utf-8", "surrogateescape"))
        parts.append(body_digest if self.binding == "body" and body_digest is not None else b"")
        return b"".join(_lp(p) for p in parts)

    def compute_mac(self, secret: bytes, message_id: str, body_digest: bytes | None) -> str:
        mac = hmac.new(secret, self.signed_bytes(message_id, body_digest), hashlib.sha256)
        return _b64url(mac.digest())

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
        if tags[0][1] != FORMAT_VERSION:
            raise MalformedKey(f"unsupported format version v={_show(tags[0][1])}")
        names = [t for t, _ in tags]
        has_body = "body" in names
        expected = [f for f in _FIELDS if f != "body" or has_body]
        if names != expected:
            raise MalformedKey(f"fields {','.join(names)}; expected {','.join(expected)}")
        got = dict(tags)
        for tag, pattern in _FIELD_RE.items():
            if tag in got and not pattern.fullmatch(got[tag]):
                raise MalformedKey(f"bad {tag}={_show(got[tag])}")
        binding = got["bind"]
        if (binding == "body") != has_body:
            raise MalformedKey("body= must be present exactly when bind=body")
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
            binding=binding,
            mid=got["mid"],
            body=got.get("body"),
            ran=tuple(ran),
            mac=got["mac"],
            version=got["v"],
        )


def _show(text: str, limit: int = 40) -> str:
    shown = text if len(text) <= limit else text[:limit] + "..."
    return repr(shown)


# --------------------------------------------------------------------------------------
# The secret file.
# --------------------------------------------------------------------------------------

_MAX_SECRET_FILE = 1 << 20


def _fix_generate(path: str) -> str:
    return f"create one with: miltermonkey key generate --file {path}"


def _decode_secret(text: str) -> bytes:
    """Standard or URL-safe base64, padding optional; anything else is refused."""
    s = text.translate(str.maketrans("-_", "+/"))
    s += "=" * (-len(s) % 4)
    return base64.b64decode(s, validate=True)


def parse_secrets(text: str, path: str = "secret file") -> dict[str, bytes]:
    """``KEYID:BASE64SECRET`` lines, in file order; ``#`` comments and blank lines."""
    secrets: dict[str, bytes] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key_id, colon, encoded = line.partition(":")
        key_id, encoded = key_id.strip(), encoded.strip()
        if not colon or not KEY_ID_RE.fullmatch(key_id) or not encoded:
            raise SecretError(
                f"{path}:{lineno}: expected KEYID:BASE64SECRET (key id of letters, digits, "
                f"'.', '_', '-'); {_fix_generate(path)} --force to start over"
            )
        try:
            secret = _decode_secret(encoded)
        except (binascii.Error, ValueError):
            raise SecretError(
                f"{path}:{lineno}: secret of key {key_id!r} is not base64; "
                f"{_fix_generate(path)} --force to start over"
            ) from None
        if len(secret) < MIN_SECRET_BYTES:
            raise SecretError(
                f"{path}:{lineno}: secret of key {key_id!r} is {len(secret)} bytes; at least "
                f"{MIN_SECRET_BYTES} are needed: add a strong one with "
                f"`miltermonkey key generate --file {path} --key-id NEWID`, point key_id at it "
                f"and remove this line"
            )
        if key_id in secrets:
            raise SecretError(f"{path}:{lineno}: key id {key_id!r} appears twice")
        secrets[key_id] = secret
    if not secrets:
        raise SecretError(f"{path} holds no secret; {_fix_generate(path)}")
    return secrets


def _read_secret_file(path: str) -> str:
    """The text of the secret file, after checking it is a private regular file.

    The checks are made on the open file itself (``fstat``), so the file
    cannot be swapped between the check and the read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SecretError(
            f"milter key secret file {path} does not exist; {_fix_generate(path)} "
            "(or set milter_key = false)"
        ) from None
    except PermissionError:
        raise SecretError(
            f"cannot read milter key secret file {path}: permission denied; it must belong to "
            f"the user the milter runs as: chown THAT-USER {path} && chmod 600 {path}"
        ) from None
    except OSError as e:
        raise SecretError(
            f"cannot open milter key secret file {path}: {e.strerror or e}"
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SecretError(
                f"milter key secret file {path} is not a regular file; {_fix_generate(path)}"
            )
        if st.st_mode & 0o077:
            raise SecretError(
                f"milter key secret file {path} has mode {stat.S_IMODE(st.st_mode):04o}: "
                f"readable or writable by group or others; fix it with: chmod 600 {path}"
            )
        data = b""
        while len(data) <= _MAX_SECRET_FILE:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    if len(data) > _MAX_SECRET_FILE:
        raise SecretError(
            f"milter key secret file {path} is larger than 1 MiB; is it the right file?"
        )
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise SecretError(
            f"milter key secret file {path} is not ASCII text of KEYID:BASE64SECRET lines; "
            f"{_fix_generate(path)} --force to start over"
        ) from None


def load_secrets(path: str | os.PathLike[str]) -> dict[str, bytes]:
    """The secrets of a private secret file, in file order (the first signs by default)."""
    p = os.fspath(path)
    return parse_secrets(_read_secret_file(p), p)


def check_secret_file(path: str | os.PathLike[str]) -> None:
    """Raise :class:`SecretError` (with the fix) unless ``path`` is a usable secret file."""
    load_secrets(path)


def _default_key_id(existing: Iterable[str]) -> str:
    taken = set(existing)
    base = time.strftime("k%Y%m%d", time.gmtime())
    candidate, n = base, 1
    while candidate in taken:
        n += 1
        candidate = f"{base}-{n}"
    return candidate


def _secret_line(key_id: str) -> str:
    return f"{key_id}:{base64.b64encode(os.urandom(MIN_SECRET_BYTES)).decode('ascii')}\n"


_FILE_HEADER = (
    "# MilterMonkey milter key secrets: KEYID:BASE64SECRET, one per line.\n"
    "# The first line signs new keys unless key_id says otherwise; every line verifies.\n"
    "# Keep this file mode 0600, owned by the milter's user, identical on every host\n"
    "# that shares keys.\n"
)


def _write_exclusive(path: Path, text: str) -> None:
    """Create ``path`` (it must not exist) with mode 0600 and ``text``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        view = text.encode("ascii")
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def generate_secret_file(
    path: str | os.PathLike[str], key_id: str | None = None, force: bool = False
) -> str:
    """Create a secret file, or add a secret to one; returns the new key id.

    * ``path`` missing: created with ``O_EXCL`` and mode 0600, one 32-byte secret.
    * ``path`` exists, ``force`` false: the new secret is appended (key
      rotation); the file must already pass :func:`check_secret_file`, and the
      first line stays the signing key unless ``key_id`` in the config names
      the new one.
    * ``force`` true: the file is replaced by one holding only the new secret.

    Existing files are rewritten through a new 0600 file renamed over them,
    so a reader never sees half a file.
    """
    p = Path(path)
    if key_id is not None and not KEY_ID_RE.fullmatch(key_id):
        raise SecretError(
            f"key id {key_id!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )
    fresh = not (p.exists() or p.is_symlink())
    if fresh or force:
        new_id = key_id or _default_key_id(())
        text = _FILE_HEADER + _secret_line(new_id)
    else:
        old_text = _read_secret_file(str(p))
        existing = parse_secrets(old_text, str(p))
        new_id = key_id or _default_key_id(existing)
        if new_id in existing:
            raise SecretError(f"{p} already holds key id {new_id!r}; choose another --key-id")
        text = old_text + ("" if old_text.endswith("\n") else "\n") + _secret_line(new_id)
    if fresh:
        _write_exclusive(p, text)
        return new_id
    # Rewrite through a new private file renamed over the old one (over the
    # symlink's target, so a symlinked secret file stays a symlink).
    real = p.resolve() if p.is_symlink() else p
    tmp = real.with_name(f".{real.name}.{os.getpid()}.tmp")
    try:
        _write_exclusive(tmp, text)
        os.replace(tmp, real)
    finally:
        if tmp.exists():
            tmp.unlink()
    return new_id


# --------------------------------------------------------------------------------------
# Checking the keys on a message.
# --------------------------------------------------------------------------------------


class _Slot(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def skip_if_key(self) -> bool: ...


@attrs.frozen
class KeyCheck:
    """The verdict on one key header: trusted when ``reason`` is ``None``."""

    header: str
    index: int
    value: str
    fields: KeyFields | None
    reason: str | None

    @property
    def trusted(self) -> bool:
        return self.reason is None


@attrs.define
class KeyInspection:
    """Every key header found on a message, which one is trusted, and why not the rest.

    Stored in ``message.notes["_mm_key"]`` so brains can ask
    :meth:`~miltermonkey_core.monkey.Monkey.key_says_ran`.
    """

    checks: list[KeyCheck] = attrs.field(factory=list)
    #: Brains :meth:`skip_brains` told the engine to skip (carried forward by ``finish``).
    spared: set[str] = attrs.field(factory=set)

    @property
    def trusted(self) -> KeyFields | None:
        """The first trusted key (the primary header before alternates), or ``None``."""
        for c in self.checks:
            if c.trusted:
                return c.fields
        return None

    @property
    def rejected(self) -> list[tuple[str, int, str]]:
        """``(header name, 1-based index among headers of that name, reason)``."""
        return [(c.header, c.index, c.reason) for c in self.checks if c.reason is not None]

    def claim(self, brain: str) -> KeyFields | None:
        """The first trusted key that lists ``brain``."""
        for c in self.checks:
            if c.trusted and c.fields is not None and c.fields.verdict_of(brain) is not None:
                return c.fields
        return None

    def verdict_of(self, brain: str) -> str | None:
        """What the first trusted key listing ``brain`` says it answered."""
        claim = self.claim(brain)
        return claim.verdict_of(brain) if claim is not None else None

    def says_ran(self, brain: str) -> bool:
        """True when a trusted key lists ``brain`` as having run on this message."""
        return self.verdict_of(brain) is not None

    def skip_brains(self, slots: Iterable[_Slot]) -> set[str]:
        """Names of the slots with ``skip_if_key`` that a trusted key says already ran."""
        spared = {s.name for s in slots if s.skip_if_key and self.says_ran(s.name)}
        self.spared |= spared
        return spared


def _replaced_body_digest(ctx: MilterContext) -> bytes | None:
    """SHA-256 of the body a brain put in place of the original, if one did."""
    replaced = [e for e in ctx.edits if isinstance(e, ReplaceBody)]
    if not replaced:
        return None
    h = hashlib.sha256()
    for chunk in replaced[-1].chunks():
        h.update(chunk)
    return h.digest()


def _hostname(configured: str | None) -> str:
    if configured:
        if not HOST_RE.fullmatch(configured):
            raise ConfigError(
                f"{configured!r} cannot go in a milter key: use letters, digits, '.', '_' "
                "and '-' only", key="hostname"
            )
        return configured
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.getfqdn()).lstrip("._-")
    return name[:253] or "localhost"


class KeyService:
    """Signs and verifies milter keys for one daemon (thread-safe: no mutable state).

    ``secrets`` maps key ids to secrets; every one verifies, ``signing_key``
    signs.  ``expirations`` maps brain names to their ``expiration`` override.
    ``clock`` returns UTC unix seconds (tests replace it).
    """

    def __init__(
        self,
        secrets: Mapping[str, bytes],
        *,
        signing_key: str | None = None,
        header_name: str = "X-Milter-Key",
        alternate_headers: Sequence[str] = (),
        hostname: str = "localhost",
        binding: str = "body",
        clock_skew: int = 300,
        default_expiration: int = 432000,
        expirations: Mapping[str, int | None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not secrets:
            raise SecretError("no milter key secret given")
        self.secrets = dict(secrets)
        self.signing_key = signing_key or next(iter(self.secrets))
        if self.signing_key not in self.secrets:
            raise SecretError(
                f"key_id {self.signing_key!r} is not in the secret file (it has: "
                f"{', '.join(self.secrets)}); add it with `miltermonkey key generate "
                f"--key-id {self.signing_key}` or fix key_id"
            )
        if binding not in BINDINGS:
            raise ValueError(f"key_body_binding must be one of {BINDINGS}, not {binding!r}")
        if not HOST_RE.fullmatch(hostname):
            raise ValueError(f"hostname {hostname!r} cannot go in a milter key")
        self.header_name = header_name
        names: dict[str, str] = {header_name.lower(): header_name}
        for alt in alternate_headers:
            names.setdefault(alt.lower(), alt)
        self.header_names: tuple[str, ...] = tuple(names.values())
        self.hostname = hostname
        self.binding = binding
        self.clock_skew = int(clock_skew)
        self.default_expiration = int(default_expiration)
        self.expirations = {k: v for k, v in (expirations or {}).items() if v}
        #: The longest lifetime any key of ours may have; later expiries are refused.
        self.max_lifetime = max([self.default_expiration, *self.expirations.values()])
        self.clock = clock

    @classmethod
    def from_config(cls, config: Any) -> KeyService:
        """Build from a :class:`~miltermonkey_core.config.Config`; checks the secret file.

        Raises :class:`SecretError` (the daemon refuses to start) when the
        file is missing, weak, unparsable or readable by others.
        """
        d = config.daemon
        secrets = load_secrets(d.miltersecretfile)
        return cls(
            secrets,
            signing_key=d.key_id,
            header_name=d.milterkeyheader,
            alternate_headers=tuple(d.alternate_key_header or ()),
            hostname=_hostname(d.hostname),
            binding=d.key_body_binding,
            clock_skew=d.key_clock_skew,
            default_expiration=d.defaultexpiration,
            expirations={b.name: b.expiration for b in config.brains},
        )

    # --- verifying -----------------------------------------------------------------

    def check(
        self,
        value: str,
        message_id: str | None,
        body_digest: bytes | Callable[[], bytes],
        now: float | None = None,
    ) -> tuple[KeyFields | None, str | None]:
        """Verify one header value against a message; ``(fields, None)`` when trusted.

        ``body_digest`` may be a callable so a bodyless check costs nothing.
        The reason, when not trusted, starts with one of :class:`Reason`.
        """
        try:
            fields = KeyFields.parse(value)
        except MalformedKey as e:
            return None, f"{Reason.MALFORMED}: {e}"
        secret = self.secrets.get(fields.key_id)
        if secret is None:
            return fields, f"{Reason.UNKNOWN_KEY} {fields.key_id!r}"
        if message_id is None:
            return fields, f"{Reason.WRONG_MESSAGE}: the message has no single Message-ID"
        digest = body_digest() if callable(body_digest) else body_digest
        expected = fields.compute_mac(secret, message_id, digest)
        if not hmac.compare_digest(expected.encode(), fields.mac.encode()):
            if fields.mid != mid_tag(message_id):
                return fields, f"{Reason.WRONG_MESSAGE}: issued for another Message-ID"
            if fields.body is not None and fields.body != body_tag(digest):
                return fields, f"{Reason.WRONG_BODY}: the body changed since the key was made"
            return fields, (f"{Reason.BAD_MAC}: forged, altered, or made with another "
                            f"secret for key id {fields.key_id!r}")
        now = self.clock() if now is None else now
        if now > fields.expiry + self.clock_skew:
            return fields, f"{Reason.EXPIRED} {int(now - fields.expiry)} s ago"
        if fields.expiry > now + self.max_lifetime + self.clock_skew:
            return fields, (f"{Reason.FUTURE}: {int(fields.expiry - now)} s from now, more "
                            f"than the longest lifetime here ({self.max_lifetime} s)")
        if fields.binding == "none" and self.binding == "body":
            return fields, (f"{Reason.UNBOUND} (bind=none) while key_body_binding = body "
                            "here")
        return fields, None

    def inspect(self, message: Message) -> KeyInspection:
        """Check every key header on ``message``; store the result in its notes."""
        now = self.clock()
        headers = message.headers
        mid = normalize_message_id(headers)
        cache: list[bytes] = []

        def digest() -> bytes:
            if not cache:
                cache.append(message.body.sha256())
            return cache[0]

        result = KeyInspection()
        for name in self.header_names:
            index = 0
            for h in headers:
                if not h.matches(name):
                    continue
                index += 1
                fields, reason = self.check(h.value, mid, digest, now)
                result.checks.append(KeyCheck(h.name, index, h.value, fields, reason))
        for c in result.checks:
            if c.trusted and c.fields is not None:
                log.debug("%s: trusted milter key in %s #%d: key %s from %s, ran %s",
                          message.id, c.header, c.index, c.fields.key_id, c.fields.host,
                          ",".join(c.fields.brains))
        message.notes["_mm_key"] = result
        return result

    # --- signing -------------------------------------------------------------------

    def lifetime(self, brains: Iterable[str]) -> int:
        """Seconds a key listing ``brains`` stays valid.

        Each brain's claim lasts its ``expiration`` override, else
        ``defaultexpiration``; a key lasts as long as its shortest claim.
        """
        return min((self.expirations.get(b, self.default_expiration) for b in brains),
                   default=self.default_expiration)

    def sign(
        self,
        ran: Sequence[tuple[str, str]],
        message_id: str,
        body_digest: bytes | None,
        *,
        expiry: int | None = None,
        now: float | None = None,
    ) -> KeyFields:
        """A signed key for these brains and this message, under the signing key."""
        now = self.clock() if now is None else now
        if expiry is None:
            expiry = int(now) + self.lifetime(name for name, _ in ran)
        if self.binding == "body" and body_digest is None:
            raise ValueError("body binding needs the body digest")
        fields = KeyFields(
            key_id=self.signing_key,
            host=self.hostname,
            expiry=expiry,
            binding=self.binding,
            mid=mid_tag(message_id),
            body=body_tag(body_digest) if self.binding == "body" and body_digest else None,
            ran=tuple(ran),
        )
        mac = fields.compute_mac(self.secrets[self.signing_key], message_id, body_digest)
        return attrs.evolve(fields, mac=mac)

    def format(self, fields: KeyFields) -> str:
        return fields.format(self.header_name)

    def finish(
        self,
        message: Message,
        ctx: MilterContext,
        results: Sequence[Any],
        inspected: KeyInspection | None,
    ) -> None:
        """Strip untrusted key headers and put our signed key on the message.

        Called inside ``ctx.begin("core")`` after the brain chain, unless a
        brain gave a final verdict.  ``results`` are the chain's
        :class:`~miltermonkey_core.dispatch.BrainResult` list.
        """
        insp = inspected if inspected is not None else self.inspect(message)
        qid = message.id
        known = {(c.header.lower(), c.value): c for c in insp.checks}
        mid_now = normalize_message_id(ctx.headers)
        now = self.clock()

        # Remove every key header that is not trusted, by its index in the live list.
        removed = 0

        def untrusted(h: Header, index: int) -> bool:
            nonlocal removed
            check = known.get((h.name.lower(), h.value))
            if check is None:  # put there by a brain of this hop: judge it too
                _, reason = self.check(h.value, mid_now, message.body.sha256, now)
            else:
                reason = check.reason
            if reason is None:
                return False
            removed += 1
            if removed <= MAX_LOGGED_REMOVALS:
                log.warning("%s: removed untrusted milter key %s #%d: %s", qid, h.name,
                            index, reason)
            return True

        for name in self.header_names:
            ctx.delete_where(name, untrusted)
        if removed > MAX_LOGGED_REMOVALS:
            log.warning("%s: removed %d more untrusted milter keys", qid,
                        removed - MAX_LOGGED_REMOVALS)

        ran = self._brains_to_sign(qid, results, insp, ctx.unchecked_brains)
        if not ran:
            log.debug("%s: no brain ran: no milter key added", qid)
            return
        if mid_now is None:
            log.info("%s: no milter key added: the message has no single Message-ID", qid)
            return
        digest = _replaced_body_digest(ctx) or message.body.sha256()
        expiry = int(now) + self.lifetime(n for n, _ in ran)
        for name, _ in ran:
            claim = insp.claim(name) if name in insp.spared else None
            if claim is not None:  # a claim carried forward keeps the expiry it was made with
                expiry = min(expiry, claim.expiry)
        fields = self.sign(ran, mid_now, digest, expiry=expiry, now=now)
        ctx.replace_header(self.header_name, self.format(fields))
        log.info("%s: milter key %s added: ran %s, expires %d", qid, fields.key_id,
                 ",".join(f"{n}:{v}" for n, v in ran), fields.expiry)

    def _brains_to_sign(
        self,
        qid: str,
        results: Sequence[Any],
        insp: KeyInspection,
        unchecked: Mapping[str, str],
    ) -> list[tuple[str, str]]:
        """This hop's brains that ran, and those a trusted key let it skip, in chain order.

        A brain that ran but said it could not judge the message (``ctx.unchecked``:
        engine down under an accept policy, too large) is never claimed.
        """
        out: list[tuple[str, str]] = []
        for r in results:
            if r.brain in unchecked:
                log.info("%s: brain %s not listed in the milter key: %s", qid, r.brain,
                         unchecked[r.brain])
                continue
            if r.outcome == "ran":
                verdict = r.action.value if isinstance(r.action, Action) else str(r.action)
            elif r.outcome == "skipped" and r.brain in insp.spared:
                verdict = insp.verdict_of(r.brain) or ""
            else:
                continue
            if not BRAIN_RE.fullmatch(r.brain) or verdict not in VERDICTS:
                log.warning("%s: brain %r cannot be listed in a milter key (name of 1-64 "
                            "letters, digits, '.', '_', '-')", qid, r.brain)
                continue
            if all(r.brain != n for n, _ in out):
                out.append((r.brain, verdict))
        return out
