"""The scan cache in Redis, shared by every monkey host of a fleet (redis-py).

A message scanned on one host and sent again (a retry that the balancer
hands to another host, the same message to a second MX) is answered from
here.  Redis is never in the way: every command has a short timeout, and
an outage, a slow server or a wiped database is a miss (logged, rate
limited), so the brain just runs and no mail waits on the cache.  After a
failure the cache is not asked again for ``retry_after`` seconds, so a dead
Redis costs one timeout per interval, not one per message.

Entries are signed (:class:`~miltermonkey_core.engine.cache.EntryCodec`):
whoever can write to the Redis cannot plant a verdict.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

import redis

from miltermonkey_core.engine.cache import CachedResult, CacheStats, EntryCodec
from miltermonkey_core.logs import ROOT, current_queue_id

log = logging.getLogger(f"{ROOT}.cache")

#: Keys live under this prefix, so one Redis can serve other tools too.
PREFIX = b"mm:scan:"


class RedisCache:
    """A :class:`~miltermonkey_core.engine.cache.ScanCache` in Redis."""

    def __init__(self, url: str, secret: bytes, *, trusted: Iterable[bytes] = (),
                 timeout: float = 0.05, retry_after: float = 5.0, client: Any = None) -> None:
        self.url = url
        self.codec = EntryCodec(secret, trusted)
        self.timeout = timeout
        self.retry_after = retry_after
        self.stats = CacheStats()
        self.client = client or redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout,
            health_check_interval=0, retry_on_timeout=False)
        self._down_until = 0.0
        self._warned = 0.0
        self._lock = threading.Lock()

    def _available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, what: str, error: Exception) -> None:
        self.stats.errors += 1
        now = time.monotonic()
        with self._lock:
            self._down_until = now + self.retry_after
            warn = now - self._warned >= 30.0
            if warn:
                self._warned = now
        if warn:
            log.warning("scan cache %s: %s failed (%s: %s); brains run without the cache "
                        "for %g s", self.url, what, type(error).__name__, error,
                        self.retry_after)

    def get(self, key: bytes) -> CachedResult | None:
        if not self._available():
            self.stats.misses += 1
            return None
        try:
            data = self.client.get(PREFIX + key)
        except (redis.RedisError, OSError) as e:
            self._failed("a lookup", e)
            self.stats.misses += 1
            return None
        if not isinstance(data, bytes):
            self.stats.misses += 1
            return None
        try:
            result = self.codec.decode(key, data)
        except (ValueError, TypeError) as e:
            result = None
            log.warning("%s: scan cache %s: entry %s does not parse (%s); ignored",
                        current_queue_id(), self.url, key.hex()[:16], e)
        if result is None or result.expires <= time.time():
            if result is None:
                self.stats.forged += 1
                log.warning("%s: scan cache %s: entry %s has a bad signature (written by "
                            "someone without the secret, or with another one); not trusted, "
                            "the brain runs", current_queue_id(), self.url, key.hex()[:16])
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        return result

    def put(self, key: bytes, result: CachedResult) -> None:
        if not self._available():
            return
        ttl_ms = max(1, int((result.expires - time.time()) * 1000))
        try:
            self.client.set(PREFIX + key, self.codec.encode(key, result), px=ttl_ms)
        except (redis.RedisError, OSError) as e:
            self._failed("a store", e)
            return
        self.stats.stores += 1

    def close(self) -> None:
        try:
            self.client.close()
        except (redis.RedisError, OSError):
            log.debug("closing the scan cache connection failed", exc_info=True)
