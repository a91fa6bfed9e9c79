"""Checking the keys on an arriving message and signing the one it leaves with.

Pure computation on the :class:`~miltermonkey_core.contract.model.Message`
and the recording :class:`~miltermonkey_core.contract.context.MilterContext`:
the engine calls :meth:`KeyService.inspect` before the brain chain and
:meth:`KeyService.finish` after it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import attrs

from miltermonkey_core.contract.context import MilterContext
from miltermonkey_core.contract.edits import ReplaceBody
from miltermonkey_core.contract.model import Header, Message
from miltermonkey_core.contract.verdict import Action
from miltermonkey_core.errors import ConfigError, SecretError
from miltermonkey_core.logs import ROOT
from miltermonkey_core.milterkey.fields import (
    BINDINGS,
    BOUND_HEADERS,
    BRAIN_RE,
    HOST_RE,
    MAX_LOGGED_REMOVALS,
    VERDICTS,
    KeyFields,
    MalformedKey,
    ObsoleteKey,
    Reason,
    digest_tag,
    mid_tag,
    mime_digest,
    normalize_message_id,
)
from miltermonkey_core.milterkey.secrets import load_secrets

log = logging.getLogger(f"{ROOT}.milterkey")

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
    #: What the keys were judged against: the Message-ID and the bound headers'
    #: digest (None until a key got as far as its MAC).  ``finish`` reuses a
    #: key's MAC check when the message leaves with the same ones and its body.
    message_id: str | None = None
    headers_digest: bytes | None = None

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


Digest = bytes | Callable[[], bytes]


class _Once:
    """A digest worked out on first use, then remembered (a key refused before its
    MAC costs no hashing; lighter than ``functools.cache`` on a per-message path)."""

    __slots__ = ("_compute", "value")

    def __init__(self, compute: Callable[[], bytes]) -> None:
        self._compute = compute
        #: None until first asked for.
        self.value: bytes | None = None

    def __call__(self) -> bytes:
        if self.value is None:
            self.value = self._compute()
        return self.value


def _value(digest: Digest) -> bytes:
    return digest() if callable(digest) else digest


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
        bound = set(names) & {b.lower() for b in BOUND_HEADERS}
        if bound:
            raise ValueError(f"{', '.join(sorted(bound))} cannot hold a milter key: the key "
                             "binds that header")
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
        secrets = load_secrets(d.miltersecretfile, d.user)
        for key, names in (("milterkeyheader", [d.milterkeyheader]),
                           ("alternate_key_header", d.alternate_key_header or ())):
            bound = [n for n in names if n.lower() in {b.lower() for b in BOUND_HEADERS}]
            if bound:
                raise config.error(f"{bound[0]} cannot hold a milter key: the key binds "
                                   "that header", key=key)
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
        body_digest: Digest,
        headers_digest: Digest,
        now: float,
    ) -> tuple[KeyFields | None, str | None]:
        """Verify one header value against a message; ``(fields, None)`` when trusted.

        ``body_digest`` (the body's SHA-256) and ``headers_digest``
        (:func:`~.fields.mime_digest` of its headers) may be callables, so a
        key refused before its MAC costs no hashing.  ``now`` is read once
        per message, so every key on it is judged at the same instant.  The
        reason, when not trusted, starts with one of :class:`Reason`.
        """
        try:
            fields = KeyFields.parse(value)
        except ObsoleteKey as e:
            return None, f"{Reason.OBSOLETE}: {e}"
        except MalformedKey as e:
            return None, f"{Reason.MALFORMED}: {e}"
        secret = self.secrets.get(fields.key_id)
        if secret is None:
            return fields, f"{Reason.UNKNOWN_KEY} {fields.key_id!r}"
        if message_id is None:
            return fields, f"{Reason.WRONG_MESSAGE}: the message has no single Message-ID"
        digest, mime = _value(body_digest), _value(headers_digest)
        expected = fields.compute_mac(secret, message_id, digest, mime)
        if not hmac.compare_digest(expected.encode(), fields.mac.encode()):
            if fields.mid != mid_tag(message_id):
                return fields, f"{Reason.WRONG_MESSAGE}: issued for another Message-ID"
            if fields.body is not None and fields.body != digest_tag(digest):
                return fields, f"{Reason.WRONG_BODY}: the body changed since the key was made"
            if fields.mime is not None and fields.mime != digest_tag(mime):
                return fields, (f"{Reason.WRONG_HEADERS}: {', '.join(BOUND_HEADERS)} changed "
                                "since the key was made, so the body reads differently")
            return fields, (f"{Reason.BAD_MAC}: forged, altered, or made with another "
                            f"secret for key id {fields.key_id!r}")
        return fields, self._timely(fields, now)

    def _timely(self, fields: KeyFields, now: float) -> str | None:
        """Why a key whose MAC verified is still not trusted at ``now``, or None."""
        if now > fields.expiry + self.clock_skew:
            return f"{Reason.EXPIRED} {int(now - fields.expiry)} s ago"
        if fields.expiry > now + self.max_lifetime + self.clock_skew:
            return (f"{Reason.FUTURE}: {int(fields.expiry - now)} s from now, more "
                    f"than the longest lifetime here ({self.max_lifetime} s)")
        if fields.binding == "none" and self.binding == "body":
            return f"{Reason.UNBOUND} (bind=none) while key_body_binding = body here"
        return None

    def inspect(self, message: Message) -> KeyInspection:
        """Check every key header on ``message``; store the result in its notes."""
        now = self.clock()
        headers = message.headers
        mid = normalize_message_id(headers)
        # Each worked out once, and only if a key gets as far as its MAC: thousands
        # of forged keys cost one walk of the headers, not one each.
        digest = _Once(message.body.sha256)
        headers_digest = _Once(lambda: mime_digest(headers))

        result = KeyInspection(message_id=mid)
        found: dict[str, list[Header]] = {name.lower(): [] for name in self.header_names}
        for h in headers:
            same_name = found.get(h.name.lower())
            if same_name is not None:
                same_name.append(h)
        for name in self.header_names:
            for index, h in enumerate(found[name.lower()], 1):
                fields, reason = self.check(h.value, mid, digest, headers_digest, now)
                result.checks.append(KeyCheck(h.name, index, h.value, fields, reason))
        result.headers_digest = headers_digest.value
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
        headers_digest: bytes | None,
        *,
        expiry: int | None = None,
        now: float | None = None,
    ) -> KeyFields:
        """A signed key for these brains and this message, under the signing key.

        With body binding, ``body_digest`` and ``headers_digest`` are those of
        the message as it leaves this hop (after every brain's edits).
        """
        if expiry is None:
            start = self.clock() if now is None else now
            expiry = int(start) + self.lifetime(name for name, _ in ran)
        body = mime = None
        if self.binding == "body":
            if body_digest is None or headers_digest is None:
                raise ValueError("body binding needs the body and bound headers' digests")
            body, mime = digest_tag(body_digest), digest_tag(headers_digest)
        fields = KeyFields(
            key_id=self.signing_key,
            host=self.hostname,
            expiry=expiry,
            binding=self.binding,
            mid=mid_tag(message_id),
            body=body,
            mime=mime,
            ran=tuple(ran),
        )
        mac = fields.compute_mac(self.secrets[self.signing_key], message_id, body_digest,
                                 headers_digest)
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
        mid_now = normalize_message_id(ctx.headers)
        now = self.clock()
        # The message as it leaves: a brain's replacement body, the headers after
        # every edit (no key header is a bound header, so removing keys leaves
        # the bound headers' digest as it is).
        body_out = _Once(lambda: _replaced_body_digest(ctx) or message.body.sha256())
        headers_out = _Once(lambda: mime_digest(ctx.headers))

        # Remove every key header not trusted for the message as it leaves (those
        # that came with it and those a brain of this hop added), by its index in
        # the live list.
        removed = 0

        # A key that came with the message was judged by ``inspect``; when the
        # message leaves with the same Message-ID, body and bound headers, its
        # MAC's answer stands and only the clock is asked again.
        judged = {c.value: (c.fields, c.reason) for c in insp.checks}
        # Looked up once: hashing a replacement body again for each of thousands of
        # forged keys would cost more than the checks it saves.
        body_kept = not any(isinstance(e, ReplaceBody) for e in ctx.edits)

        def same_message() -> bool:
            return (body_kept and mid_now == insp.message_id
                    and insp.headers_digest is not None
                    and headers_out() == insp.headers_digest)

        def untrusted(h: Header, index: int) -> bool:
            nonlocal removed
            before = judged.get(h.value)
            if before is not None and same_message():
                fields, reason = before
                if reason is None and fields is not None:
                    reason = self._timely(fields, now)
            else:
                _, reason = self.check(h.value, mid_now, body_out, headers_out, now)
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
        expiry = int(now) + self.lifetime(n for n, _ in ran)
        for name, _ in ran:
            claim = insp.claim(name) if name in insp.spared else None
            if claim is not None:  # a claim carried forward keeps the expiry it was made with
                expiry = min(expiry, claim.expiry)
        fields = self.sign(ran, mid_now, body_out(), headers_out(), expiry=expiry)
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
