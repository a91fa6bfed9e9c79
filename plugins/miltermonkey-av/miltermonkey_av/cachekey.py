"""What a clamd verdict depends on, for the daemon's scan cache.

The cache replays the brain's result on a message it has seen, so the key
must change whenever clamd could answer differently or the brain would write
something else: the message as clamd sees it, the brain's options, and the
signature database.  The message part is plain: a digest of the header
block (without per-hop trace headers, :func:`header_digest`) and the body's
SHA-256.  The database is the hard part.

**Which database.**  ``VERSION`` answers ``ClamAV 1.4.6/27474/Wed Dec  2
09:24:00 2025`` with the official databases loaded: the daily version
changes on every freshclam update, so an update makes every older entry a
miss.  With custom databases alone it answers ``ClamAV 1.4.6`` and stays so
after a new signature file and a ``RELOAD``; and added local signatures
never show in it.  So the identity is the ``VERSION`` lines of the clamds
that answer, plus, when the signature directory is readable here, a
fingerprint of the files clamd loads from it (:class:`DatabaseFingerprint`).
A clamd that gives no database version and whose directory is not known
here cannot be told apart before and after an update: nothing is cached.

**The reload race.**  freshclam (or an admin) writes the files first and
clamd loads them afterwards; official databases take many seconds to load.
A scan in between answers from the old database, but the fingerprint is
already the new one.  So while the newest file is younger than
``cache_settle``, nothing is stored or looked up.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from fnmatch import translate
from pathlib import Path
from typing import Any, Final

import attrs

from miltermonkey_av.clamd import ClamdAddress, ClamdClient, ClamdPool
from miltermonkey_av.errors import ScanError
from miltermonkey_av.options import AntiVirusOptions
from miltermonkey_core import Message

__all__ = ["FORMAT", "CacheKeyMaker", "DatabaseFingerprint", "EngineIdentity",
           "answer_options", "header_digest", "header_matcher", "resolve_directory"]

#: The layout of the av brain's key parts; a change makes every old entry a miss.
FORMAT: Final = "av-key-1"
#: ``VERSION`` is asked at most this often (seconds), never per message.
VERSION_EVERY: Final = 30.0
#: How long one ``VERSION`` may take: it runs on a message's path, once in a while.
VERSION_TIMEOUT: Final = 2.0
#: The signature directory is listed at most this often (seconds).
FINGERPRINT_EVERY: Final = 1.0
#: An ignored header longer than this (RFC 5322's line limit) makes the message
#: uncacheable: its value is not in the key, so nothing may hide in it.
MAX_IGNORED_VALUE: Final = 998
#: Debian's clamd configuration, read by ``database_directory = "auto"``.
CLAMD_CONF: Final = "/etc/clamav/clamd.conf"
#: clamd's DatabaseDirectory when its configuration names none (Debian's build).
DEFAULT_DATABASE_DIRECTORY: Final = "/var/lib/clamav"
#: Files clamd loads (libclamav's CLI_DBEXT, which its SelfCheck watches too);
#: freshclam.dat and other state files change on every freshclam run and say
#: nothing about the signatures.
DATABASE_SUFFIXES: Final = (
    ".db", ".hdb", ".hdu", ".fp", ".mdb", ".mdu", ".hsb", ".hsu", ".sfp", ".msb", ".msu",
    ".ndb", ".ndu", ".ldb", ".ldu", ".sdb", ".zmd", ".rmd", ".pdb", ".gdb", ".wdb", ".cbc",
    ".ftm", ".cfg", ".cvd", ".cld", ".cud", ".cdb", ".cat", ".crb", ".idb", ".ioc", ".yar",
    ".yara", ".pwdb", ".ign", ".ign2", ".imp", ".info")
#: Signed containers whose first 512 bytes carry the version, build time and digest.
_CONTAINERS: Final = (".cvd", ".cld", ".cud")
_CONTAINER_HEADER: Final = 512

#: Options that change neither clamd's answer nor what the brain writes: where clamd
#: is, how long to wait, and the cache's and the stream's own settings.  Every
#: other option is in the key, so a new one is in it by default.
NOT_IN_KEY: Final = frozenset({
    "clamd", "clamd_cooldown", "connect_timeout", "scan_timeout", "cache_ttl",
    "cache_ignore_headers", "database_directory", "cache_settle", "stream_min_size"})


def _plain(value: Any) -> Any:
    if isinstance(value, re.Pattern):
        return {"pattern": value.pattern, "flags": value.flags}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


def answer_options(options: AntiVirusOptions) -> str:
    """The options that change the answer or what the brain writes, as stable text."""
    return json.dumps({f.name: _plain(getattr(options, f.name))
                       for f in attrs.fields(type(options)) if f.name not in NOT_IN_KEY},
                      sort_keys=True, separators=(",", ":"))


def header_matcher(patterns: Iterable[str]) -> Callable[[str], bool]:
    """A test for header names matching any of ``patterns`` (fnmatch, any case)."""
    joined = "|".join(translate(p) for p in patterns)
    if not joined:
        return lambda _name: False
    rx = re.compile(joined, re.IGNORECASE)
    return lambda name: rx.match(name) is not None


def header_digest(message: Message, ignored: Callable[[str], bool]) -> bytes | None:
    """SHA-256 of the header block as clamd gets it, without the ignored headers.

    None when an ignored header is longer than :data:`MAX_IGNORED_VALUE`:
    what is not in the key is not scanned on a hit, so it must be too short
    to carry anything.
    """
    h = hashlib.sha256()
    for header in message.headers:
        if ignored(header.name):
            if len(header.raw) > MAX_IGNORED_VALUE:
                return None
            continue
        h.update(header.name.encode("ascii", "surrogateescape") + b": " + header.raw + b"\r\n")
    h.update(b"\r\n")
    return h.digest()


# --- which clamd reads which directory ------------------------------------------------------


def _clamd_conf(path: str) -> dict[str, str] | None:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    out: dict[str, str] = {}
    for line in text.splitlines():
        words = line.strip().split(None, 1)
        if len(words) == 2 and not words[0].startswith("#"):
            out[words[0].lower()] = words[1].strip()
    return out


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_directory(option: str, addresses: Sequence[str],
                      clamd_conf: str = CLAMD_CONF) -> tuple[str | None, frozenset[str]]:
    """The signature directory to fingerprint and the clamd addresses it describes.

    ``"auto"`` takes ``DatabaseDirectory`` from ``clamd_conf``, for the
    addresses that reach the clamd that file configures: its ``LocalSocket``,
    or its ``TCPSocket`` port on a loopback address.  Another clamd on this
    host (a private instance, a test's) has a directory of its own, and
    fingerprinting the system one for it would miss its updates.  A path
    given by the admin is taken to be every configured clamd's.
    """
    if option == "":
        return None, frozenset()
    if option != "auto":
        return option, frozenset(addresses)
    conf = _clamd_conf(clamd_conf)
    if conf is None:
        return None, frozenset()
    covered: set[str] = set()
    socket_path = conf.get("localsocket")
    port = conf.get("tcpsocket")
    bind = conf.get("tcpaddr", "")
    for spec in addresses:
        a = ClamdAddress.parse(spec)
        if a.family == "unix":
            if socket_path and os.path.realpath(a.path) == os.path.realpath(socket_path):
                covered.add(spec)
        elif (port and port.isdigit() and int(port) == a.port and _loopback(a.host)
              and (not bind or _loopback(bind) or bind in ("0.0.0.0", "::"))):  # noqa: S104
            covered.add(spec)
    if not covered:
        return None, frozenset()
    return conf.get("databasedirectory", DEFAULT_DATABASE_DIRECTORY), frozenset(covered)


# --- the signature directory -----------------------------------------------------------------


@attrs.frozen
class Fingerprint:
    """The signature files' contents in one digest, and when the newest was written."""

    digest: str
    #: Wall-clock time (seconds) of the newest file or of the directory itself.
    newest: float
    files: int


class DatabaseFingerprint:
    """What the signature files in one directory hold, recomputed at most once a second.

    Each file counts by its name and its content: the first 512 bytes of a
    signed ``.cvd``/``.cld``/``.cud`` (they carry its version, build time and
    digest), the SHA-256 of any other signature file.  Content, not
    modification times, so two hosts with the same databases share entries
    in a common cache.  A file is read again only when its size, inode or
    modification time changes.
    """

    def __init__(self, path: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.clock = clock
        self._checked = float("-inf")
        self._value: Fingerprint | None = None
        self._error = ""
        #: name -> ((size, inode, mtime_ns), content digest)
        self._files: dict[str, tuple[tuple[int, int, int], str]] = {}
        self._lock = threading.Lock()

    def current(self) -> tuple[Fingerprint | None, str]:
        """The fingerprint, or None and why the directory cannot be fingerprinted."""
        if self.clock() - self._checked < FINGERPRINT_EVERY:
            return self._value, self._error
        with self._lock:
            if self.clock() - self._checked >= FINGERPRINT_EVERY:
                try:
                    self._value, self._error = self._compute(), ""
                except OSError as e:
                    self._value = None
                    self._error = (f"cannot read database_directory {self.path}: "
                                   f"{e.strerror or e}")
                if self._value is None and not self._error:
                    self._error = f"no signature files in database_directory {self.path}"
                self._checked = self.clock()
        return self._value, self._error

    def _compute(self) -> Fingerprint | None:
        newest_ns = os.stat(self.path).st_mtime_ns
        seen: dict[str, tuple[tuple[int, int, int], str]] = {}
        with os.scandir(self.path) as entries:
            for entry in entries:
                name = entry.name
                if not name.lower().endswith(DATABASE_SUFFIXES) or not entry.is_file():
                    continue
                st = entry.stat()
                stamp = (st.st_size, st.st_ino, st.st_mtime_ns)
                newest_ns = max(newest_ns, st.st_mtime_ns)
                known = self._files.get(name)
                seen[name] = known if known is not None and known[0] == stamp else (
                    stamp, self._content(entry.path, name))
        self._files = seen
        if not seen:
            return None
        h = hashlib.sha256()
        for name in sorted(seen):
            h.update(f"{name}\0{seen[name][0][0]}\0{seen[name][1]}\n".encode())
        return Fingerprint(h.hexdigest(), newest_ns / 1e9, len(seen))

    @staticmethod
    def _content(path: str, name: str) -> str:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            if name.lower().endswith(_CONTAINERS):
                h.update(f.read(_CONTAINER_HEADER))
            else:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        return h.hexdigest()


# --- the engine's identity ---------------------------------------------------------------------


class EngineIdentity:
    """Which database answers: the clamds' ``VERSION`` lines plus the directory's fingerprint.

    ``VERSION`` is asked at most every :data:`VERSION_EVERY` seconds, of every
    configured clamd not in cool-down (the pool's view: an address known to be
    down is not asked on a message's path).  Every one that answers is in the
    identity, so whichever of them scans the message, its database is named;
    a farm of clamds on the same database shares entries.  None (not cached)
    when no clamd answered, when one gives no database version and the
    directory does not describe it, and while the directory settles.
    """

    def __init__(self, pool: ClamdPool, directory: str | None, covered: frozenset[str],
                 settle: float, say: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.pool = pool
        self.fingerprint = DatabaseFingerprint(directory, clock) if directory else None
        self.covered = covered
        self.settle = settle
        self.say = say
        self.clock = clock
        self.wall = wall
        self._asked = float("-inf")
        self._versions: dict[str, str] = {}
        self._lock = threading.Lock()
        self._said: set[str] = set()
        self._settling: str | None = None

    def _once(self, why: str) -> None:
        if why not in self._said:
            self._said.add(why)
            self.say(why)

    def versions(self) -> dict[str, str]:
        """address -> VERSION line of the clamds that answered it last time it was asked."""
        if self.clock() - self._asked >= VERSION_EVERY and self._lock.acquire(blocking=False):
            try:
                self._versions = self._ask(self.pool.healthy_clients())
                self._asked = self.clock()
            finally:
                self._lock.release()
        return self._versions

    @staticmethod
    def _ask(clients: Iterable[ClamdClient]) -> dict[str, str]:
        out: dict[str, str] = {}
        for client in clients:
            try:
                line = client.version(min(VERSION_TIMEOUT, client.connect_timeout))
            except ScanError:
                continue
            if line.startswith("ClamAV "):
                out[str(client.address)] = " ".join(line.split())
        return out

    def current(self) -> str | None:
        versions = self.versions()
        if not versions:
            return None
        parts = sorted(set(versions.values()))
        blind = [a for a, v in versions.items() if "/" not in v and a not in self.covered]
        if blind:
            self._once(f"scan cache off for clamd {', '.join(sorted(blind))}: VERSION gives no "
                       "database version (custom databases only) and database_directory does "
                       "not describe it, so a signature update could not be told")
            return None
        if self.fingerprint is not None:
            fp, why = self.fingerprint.current()
            if fp is None:
                if any("/" not in v for v in versions.values()):
                    self._once(f"scan cache off: {why}")
                    return None
                self._once(f"{why}; the cache keys on clamd's VERSION alone")
            else:
                age = self.wall() - fp.newest
                if age < self.settle:
                    if self._settling != fp.digest:
                        self._settling = fp.digest
                        self.say(f"signature files changed {max(age, 0.0):.0f} s ago: nothing "
                                 f"cached or replayed for cache_settle {self.settle:g} s, "
                                 "while clamd loads them")
                    return None
                parts.append(f"db {fp.digest} ({fp.files} files)")
        return "\n".join(parts)


# --- the whole key -----------------------------------------------------------------------------


class CacheKeyMaker:
    """The av brain's ``cache_key``: format, engine, options, headers, body."""

    def __init__(self, options: AntiVirusOptions, identity: EngineIdentity) -> None:
        self.identity = identity
        self.options = answer_options(options)
        self.ignored = header_matcher(options.cache_ignore_headers)

    def key(self, message: Message) -> tuple[str | bytes, ...] | None:
        head = header_digest(message, self.ignored)
        if head is None:
            return None
        engine = self.identity.current()
        if engine is None:
            return None
        return (FORMAT, engine, self.options, head, message.body.sha256())
