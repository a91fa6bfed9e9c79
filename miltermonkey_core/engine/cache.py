"""The scan cache: a brain's result on some content, replayed instead of scanning again.

Real mail repeats itself: Postfix retries a message after a 4xx, a list
server delivers one body in many transactions, the same message reaches two
MX hosts.  A brain that declares its result cacheable (``Brain.cache_ttl``
and ``Brain.cache_key``: the content digest, the options and the engine
version the answer depends on) has it looked up here before it is called;
a hit replays what it did, as if it had run.

Two backends: :class:`MemoryCache`, in-process and bounded in entries and
bytes (the default), and :class:`~miltermonkey_core.engine.cache_redis.RedisCache`,
shared by every host of a fleet.  Entries are signed with a secret, so a
cache that others can write (a Redis reachable from elsewhere) cannot plant
a "clean" verdict: an entry whose signature does not verify is a miss, and
is logged.  A cache that fails is a miss too: the brain just runs.

Never cached: errors, timeouts, results a brain marked unchecked, results of
brains in evaluation mode, results with work deferred to after acceptance.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import struct
import threading
import time
from collections.abc import Iterable
from typing import Final, Protocol

import attrs

from miltermonkey_core.engine.replay import Call, dump_calls, load_calls
from miltermonkey_core.logs import ROOT

log = logging.getLogger(f"{ROOT}.cache")

#: The format of keys and entries; a change makes every old entry a miss.
FORMAT: Final = b"mm-scan-cache-1"
_STAMP: Final = struct.Struct("!dd")  # created, expires


def cache_key(brain_use: str, brain_version: str, parts: Iterable[str | bytes]) -> bytes:
    """The lookup key: a SHA-256 over length-prefixed parts, so no two inputs collide."""
    h = hashlib.sha256()
    for part in (FORMAT, brain_use, brain_version, *parts):
        raw = part.encode("utf-8", "surrogateescape") if isinstance(part, str) else part
        h.update(len(raw).to_bytes(8, "big"))
        h.update(raw)
    return h.digest()


@attrs.frozen
class CachedResult:
    """What one brain did to some content, and until when that may be replayed."""

    calls: tuple[Call, ...]
    created: float
    expires: float


@attrs.define
class CacheStats:
    hits: int = 0
    misses: int = 0
    stores: int = 0
    #: Entries refused because their signature did not verify.
    forged: int = 0
    #: Lookups and stores that failed (backend down, slow, full).
    errors: int = 0


class ScanCache(Protocol):
    """Where results are kept; every failure is a miss, never an error."""

    stats: CacheStats

    def get(self, key: bytes) -> CachedResult | None: ...

    def put(self, key: bytes, result: CachedResult) -> None: ...

    def close(self) -> None: ...


class EntryCodec:
    """Serialises entries and signs them: ``mac(32) | created,expires(16) | journal``.

    Entries are signed with ``secret`` and accepted when any of ``trusted``
    signed them: while a new secret is rolled out host by host, entries
    written by hosts already signing with it stay good on the others.
    """

    def __init__(self, secret: bytes, trusted: Iterable[bytes] = ()) -> None:
        self.secret = secret
        self.trusted = (secret, *(t for t in trusted if t != secret))

    def encode(self, key: bytes, result: CachedResult) -> bytes:
        body = _STAMP.pack(result.created, result.expires) + dump_calls(result.calls)
        return hmac.new(self.secret, key + body, hashlib.sha256).digest() + body

    def decode(self, key: bytes, data: bytes) -> CachedResult | None:
        """The entry, or None when no trusted secret signed it (forged, or a stale secret)."""
        mac, body = data[:32], data[32:]
        if len(mac) != 32 or not any(
                hmac.compare_digest(mac, hmac.new(s, key + body, hashlib.sha256).digest())
                for s in self.trusted):
            return None
        created, expires = _STAMP.unpack_from(body)
        return CachedResult(tuple(load_calls(body[_STAMP.size:])), created, expires)


class MemoryCache:
    """In-process, least recently used first out, bounded in entries and bytes."""

    def __init__(self, max_entries: int = 10000, max_bytes: int = 32 * 1024 * 1024,
                 clock: object = time.time) -> None:
        self.max_entries = max(1, max_entries)
        self.max_bytes = max(1024, max_bytes)
        self.stats = CacheStats()
        self._entries: collections.OrderedDict[bytes, tuple[CachedResult, int]] = (
            collections.OrderedDict())
        self._bytes = 0
        self._lock = threading.Lock()
        self._clock = clock

    @staticmethod
    def _size(key: bytes, result: CachedResult) -> int:
        return len(key) + 64 + sum(len(repr(c)) for c in result.calls)

    def get(self, key: bytes) -> CachedResult | None:
        now = self._clock()  # type: ignore[operator]
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                self.stats.misses += 1
                return None
            result, size = found
            if result.expires <= now:
                del self._entries[key]
                self._bytes -= size
                self.stats.misses += 1
                return None
            self._entries.move_to_end(key)
            self.stats.hits += 1
            return result

    def put(self, key: bytes, result: CachedResult) -> None:
        size = self._size(key, result)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._entries[key] = (result, size)
            self._bytes += size
            self.stats.stores += 1
            while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
                _, (_, dropped) = self._entries.popitem(last=False)
                self._bytes -= dropped

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes

    def close(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
