"""The milter key secret file: reading it strictly, refusing it when others can
read or replace it, and writing a new one.

A key is only as good as its secret: a secret other local users can read
lets them sign "already scanned" for any message, and so does one they can
swap for their own.  So every time the file is read it must be a private
regular file owned by root or the milter's user, and every directory from it
up to ``/`` must be owned by root or that user and writable by nobody else
(OpenSSH's StrictModes).  ``miltermonkey key generate`` writes one that
passes the check.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import pwd
import stat
import time
from collections.abc import Collection, Iterable
from pathlib import Path

from miltermonkey_core.errors import SecretError
from miltermonkey_core.milterkey.fields import KEY_ID_RE, MIN_SECRET_BYTES

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


def trusted_owners(user: str | None = None) -> frozenset[int]:
    """The users who may own the secret file and its directories.

    root, the user running this process and ``user`` (the daemon's ``user``
    setting, which it switches to after start) when that user exists.
    """
    owners = {0, os.geteuid()}
    if user:
        with contextlib.suppress(KeyError):  # check-config reports an unknown user itself
            owners.add(pwd.getpwnam(user).pw_uid)
    return frozenset(owners)


def _owner_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _unsafe_directory(path: str, owners: Collection[int] | None) -> str | None:
    """What is wrong with the directories on the way to ``path``, or ``None``.

    Both the path as written and the one its symlinks lead to are walked
    from the file's directory up to ``/``.  A directory others can write to
    lets them rename the secret away and put their own in its place.  An
    ancestor that is world-writable but sticky and owned by root (``/tmp``)
    is safe, since nobody else can rename what is in it; as the file's own
    directory it is not: anyone may create the file there while it is
    missing.  ``owners`` ``None`` skips the ownership test (for ``key
    generate``, run by root for a file another user will own).
    """
    for start in dict.fromkeys((os.path.abspath(path), os.path.realpath(path))):
        directory, own = os.path.dirname(start), True
        while True:
            problem = _directory_problem(path, directory, own, owners)
            if problem is not None:
                return problem
            parent = os.path.dirname(directory)
            if parent == directory:
                break
            directory, own = parent, False
    return None


def _directory_problem(path: str, directory: str, own: bool,
                       owners: Collection[int] | None) -> str | None:
    try:
        st = os.stat(directory)
    except OSError:
        return None  # opening the file says what is wrong
    where = f"milter key secret file {path}: directory {directory}"
    if owners is not None and st.st_uid not in owners:
        return (f"{where} belongs to {_owner_name(st.st_uid)}, not to root or the milter's "
                f"user, so that user could replace the secret; fix it with: "
                f"chown root {directory} (or move the file to a directory root owns)")
    mode = stat.S_IMODE(st.st_mode)
    if not mode & 0o022:
        return None
    if mode & stat.S_ISVTX and own:
        return (f"{where} has mode {mode:04o}: everyone may create files in it (like /tmp), "
                f"so anyone can put their own secret there while the file is missing; move "
                f"it to a directory only root and the milter's user can write, such as "
                f"/etc/mail")
    if mode & stat.S_ISVTX:
        return None  # like /tmp: only the owner of an entry may rename it
    return (f"{where} has mode {mode:04o}: group or others may write to it, so another "
            f"local user could replace the secret; fix it with: chmod go-w {directory} (or "
            f"move the file to a directory only root and the milter's user can write, such "
            f"as /etc/mail)")


def _read_secret_file(path: str, owners: Collection[int] | None = None) -> str:
    """The text of the secret file, after checking it is a private regular file.

    The checks are made on the open file itself (``fstat``), so the file
    cannot be swapped between the check and the read; the directories
    leading to it are checked first, so nobody else can swap it afterwards.
    ``owners`` are the users who may own it (:func:`trusted_owners`);
    ``None`` skips the ownership tests.
    """
    problem = _unsafe_directory(path, owners)
    if problem is not None:
        raise SecretError(problem)
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
                f"group or others have rights on it; fix it with: chmod 600 {path}"
            )
        if owners is not None and st.st_uid not in owners:
            raise SecretError(
                f"milter key secret file {path} belongs to {_owner_name(st.st_uid)}, not to "
                f"root or the milter's user, who could have written any secret in it; if "
                f"it is yours, fix it with: chown root {path}, else make a new one"
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


def load_secrets(path: str | os.PathLike[str], user: str | None = None) -> dict[str, bytes]:
    """The secrets of a private secret file, in file order (the first signs by default).

    ``user`` is the daemon's ``user`` setting: it may own the file and its
    directories besides root (see :func:`trusted_owners`).
    """
    p = os.fspath(path)
    return parse_secrets(_read_secret_file(p, trusted_owners(user)), p)


def check_secret_file(path: str | os.PathLike[str], user: str | None = None) -> None:
    """Raise :class:`SecretError` (with the fix) unless ``path`` is a usable secret file."""
    load_secrets(path, user)


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
    problem = _unsafe_directory(str(p), None)
    if problem is not None:
        raise SecretError(problem)
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
