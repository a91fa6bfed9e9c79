"""The milter key secret file: strict reading, private modes, trusted owners and directories.

A secret other local users can read or replace lets them sign "already
scanned" for any message, so every refusal here is a way in that is closed.
The real-daemon and check-config side of the directory check is in
``test_milterkey_daemon.py``.
"""

from __future__ import annotations

import base64
import os
import pwd
import re
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from miltermonkey_core.config import loads
from miltermonkey_core.errors import SecretError
from miltermonkey_core.milterkey import (
    KeyService,
    check_secret_file,
    generate_secret_file,
    load_secrets,
    parse_secrets,
    trusted_owners,
)

ROOT = os.geteuid() == 0
as_root = pytest.mark.skipif(not ROOT, reason="changing a file's owner needs root")
NOBODY = pwd.getpwnam("nobody").pw_uid


def _config(secret_file: Path, **daemon: Any) -> Any:
    lines = ["[miltermonkey]", f'miltersecretfile = "{secret_file}"', "milter_key = true"]
    lines += [f'{k} = "{v}"' for k, v in daemon.items()]
    return loads("\n".join(lines) + "\n")


def _write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def _b64(n: int) -> str:
    return base64.b64encode(os.urandom(n)).decode()


def test_secret_file_missing(tmp_path: Path) -> None:
    p = tmp_path / "nope"
    with pytest.raises(SecretError, match=f"does not exist.*key generate --file {p}"):
        check_secret_file(p)


def test_secret_file_empty(tmp_path: Path) -> None:
    p = _write(tmp_path / "s", "# only a comment\n\n")
    with pytest.raises(SecretError, match=f"holds no secret.*key generate --file {p}"):
        check_secret_file(p)


def test_secret_file_short_secret(tmp_path: Path) -> None:
    p = _write(tmp_path / "s", f"k1:{_b64(16)}\n")
    with pytest.raises(SecretError, match=r"16 bytes; at least 32.*key generate"):
        check_secret_file(p)


def test_secret_file_world_readable_is_refused_with_the_fix(tmp_path: Path) -> None:
    p = _write(tmp_path / "s", f"k1:{_b64(32)}\n", 0o644)
    with pytest.raises(SecretError, match=f"mode 0644.*chmod 600 {p}"):
        check_secret_file(p)
    for mode in (0o640, 0o604, 0o620, 0o602):
        p.chmod(mode)
        with pytest.raises(SecretError, match="chmod 600"):
            check_secret_file(p)
    p.chmod(0o600)
    check_secret_file(p)
    p.chmod(0o400)
    check_secret_file(p)


def test_secret_file_not_regular(tmp_path: Path) -> None:
    d = tmp_path / "dir"
    d.mkdir(mode=0o700)
    with pytest.raises(SecretError, match="not a regular file"):
        check_secret_file(d)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(SecretError, match="not a regular file"):
        check_secret_file(fifo)


def test_secret_file_unparsable(tmp_path: Path) -> None:
    for text, match in ((f"{_b64(32)}\n", "expected KEYID:BASE64SECRET"),
                        ("k1:not base64!!\n", "not base64"),
                        (f"k 1:{_b64(32)}\n", "expected KEYID"),
                        (f"k1:{_b64(32)}\nk1:{_b64(32)}\n", "appears twice")):
        p = _write(tmp_path / "s", text)
        with pytest.raises(SecretError, match=match):
            check_secret_file(p)


def test_secret_file_formats_accepted(tmp_path: Path) -> None:
    raw = os.urandom(40)
    urlsafe = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    p = _write(tmp_path / "s", f"# comment\n\n  a : {base64.b64encode(raw).decode()}\n"
                               f"b:{urlsafe}\n")
    assert load_secrets(p) == {"a": raw, "b": raw}


def test_daemon_refuses_to_start_on_a_bad_secret_file(tmp_path: Path) -> None:
    p = _write(tmp_path / "s", f"k1:{_b64(32)}\n", 0o644)
    with pytest.raises(SecretError, match="chmod 600"):
        KeyService.from_config(_config(p))


def test_generate_creates_mode_0600_with_o_excl(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, int, int]] = []
    real_open = os.open

    def spy(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        calls.append((os.fspath(path), flags, mode))
        return real_open(path, flags, mode, **kw)

    monkeypatch.setattr(os, "open", spy)
    old = os.umask(0)
    try:
        p = tmp_path / "secret"
        key_id = generate_secret_file(p, "k1")
    finally:
        os.umask(old)
    assert key_id == "k1"
    create = [c for c in calls if c[0] == str(p)]
    assert create and create[0][1] & os.O_EXCL and create[0][1] & os.O_CREAT
    assert create[0][2] == 0o600
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    secrets = load_secrets(p)
    assert list(secrets) == ["k1"] and len(secrets["k1"]) == 32


def test_generate_appends_replaces_and_refuses(tmp_path: Path) -> None:
    p = tmp_path / "secret"
    first = generate_secret_file(p)
    assert re.fullmatch(r"k\d{8}", first)
    second = generate_secret_file(p)
    assert second == f"{first}-2"
    assert list(load_secrets(p)) == [first, second]
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    with pytest.raises(SecretError, match="already holds key id"):
        generate_secret_file(p, first)
    generate_secret_file(p, "fresh", force=True)
    assert list(load_secrets(p)) == ["fresh"]
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    # never appends to a file others can read
    p.chmod(0o644)
    with pytest.raises(SecretError, match="chmod 600"):
        generate_secret_file(p, "more")
    with pytest.raises(SecretError, match="key id"):
        generate_secret_file(tmp_path / "other", "bad id")
    assert [x.name for x in tmp_path.iterdir()] == ["secret"]


def test_rotating_a_symlinked_file_keeps_the_symlink(tmp_path: Path) -> None:
    target = tmp_path / "real-secret"
    link = tmp_path / "secret"
    generate_secret_file(target, "k1")
    link.symlink_to(target)
    generate_secret_file(link, "k2")
    assert link.is_symlink()
    assert list(load_secrets(target)) == ["k1", "k2"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_generate_does_not_follow_a_dangling_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    link = tmp_path / "secret"
    link.symlink_to(target)
    with pytest.raises(SecretError):
        generate_secret_file(link, "k1")
    assert not target.exists()


# --- modes, sizes and encodings ---------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o601, 0o610, 0o701, 0o660, 0o606, 0o611, 0o1600, 0o4600])
def test_any_right_for_group_or_others_is_refused(tmp_path: Path, mode: int) -> None:
    p = _write(tmp_path / "s", f"k1:{_b64(32)}\n", mode)
    if mode & 0o077:
        with pytest.raises(SecretError, match=f"has mode {stat.S_IMODE(mode):04o}: group or "
                           f"others have rights on it; fix it with: chmod 600 {p}$"):
            check_secret_file(p)
    else:  # setuid or sticky bits alone give nobody else anything
        check_secret_file(p)


def test_owner_only_modes_are_accepted(tmp_path: Path) -> None:
    p = _write(tmp_path / "s", f"k1:{_b64(32)}\n")
    for mode in (0o600, 0o400, 0o700, 0o200 | 0o400):
        p.chmod(mode)
        check_secret_file(p)


def test_size_limit_is_one_mebibyte(tmp_path: Path) -> None:
    line = f"k1:{_b64(32)}\n"
    limit = 1 << 20
    p = _write(tmp_path / "s", "#" * (limit - len(line) - 1) + "\n" + line)
    assert p.stat().st_size == limit
    assert len(load_secrets(p)["k1"]) == 32
    _write(p, "#" * (limit - len(line)) + "\n" + line)
    assert p.stat().st_size == limit + 1
    with pytest.raises(SecretError, match=f"^milter key secret file {p} is larger than 1 MiB; "
                       "is it the right file\\?$"):
        check_secret_file(p)


def test_a_large_file_is_read_whole(tmp_path: Path) -> None:
    """Several reads of 64 KiB: the secret after them is the one loaded."""
    secret = os.urandom(32)
    p = _write(tmp_path / "s", "# padding\n" * 20000
               + f"k1:{base64.b64encode(secret).decode()}\n")
    assert p.stat().st_size > 3 * 65536
    assert load_secrets(p) == {"k1": secret}


def test_unpadded_and_urlsafe_secrets_are_accepted(tmp_path: Path) -> None:
    for n in (32, 33, 34, 40):  # every padding length
        raw = os.urandom(n)
        plain = base64.b64encode(raw).decode()
        url = base64.urlsafe_b64encode(raw).decode()
        text = (f"a:{plain}\nb:{plain.rstrip('=')}\nc:{url}\nd:{url.rstrip('=')}\n")
        p = _write(tmp_path / f"s{n}", text)
        assert load_secrets(p) == {"a": raw, "b": raw, "c": raw, "d": raw}


def test_a_secret_with_characters_outside_base64_is_refused(tmp_path: Path) -> None:
    good = _b64(32)
    for bad in (good[:10] + "!" + good[10:], good[:10] + " " + good[10:], good + "*",
                good[:-1] + ":"):
        p = _write(tmp_path / "s", f"k1:{bad}\n")
        with pytest.raises(SecretError, match=f"^{p}:1: secret of key 'k1' is not base64; "
                           f"create one with: miltermonkey key generate --file {p} --force "
                           "to start over$"):
            check_secret_file(p)


def test_errors_name_the_file_and_line(tmp_path: Path) -> None:
    p = _write(tmp_path / "s", f"# comment\n\nk1:{_b64(32)}\nk 2:{_b64(32)}\n")
    with pytest.raises(SecretError, match=f"^{p}:4: expected KEYID:BASE64SECRET .*"
                       f"key generate --file {p} --force to start over$"):
        check_secret_file(p)
    p = _write(tmp_path / "s", f"k1:{_b64(32)}\nk2:{_b64(31)}\n")
    with pytest.raises(SecretError, match=f"^{p}:2: secret of key 'k2' is 31 bytes; at least "
                       f"32 are needed: add a strong one with `miltermonkey key generate "
                       f"--file {p} --key-id NEWID`"):
        check_secret_file(p)
    p = _write(tmp_path / "s", f"k1:{_b64(32)}\nk1:{_b64(32)}\n")
    with pytest.raises(SecretError, match=f"^{p}:2: key id 'k1' appears twice$"):
        check_secret_file(p)


def test_parse_secrets_without_a_path_says_secret_file() -> None:
    with pytest.raises(SecretError, match=r"^secret file holds no secret; create one with: "
                       r"miltermonkey key generate --file secret file$"):
        parse_secrets("# nothing\n")
    with pytest.raises(SecretError, match=r"^secret file:1: expected KEYID"):
        parse_secrets("no colon here\n")


def test_not_ascii_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "s"
    p.write_bytes(f"k1:{_b64(32)}\n# caf\xe9\n".encode("latin-1"))
    p.chmod(0o600)
    with pytest.raises(SecretError, match=f"^milter key secret file {p} is not ASCII text of "
                       f"KEYID:BASE64SECRET lines; create one with: miltermonkey key generate "
                       f"--file {p} --force to start over$"):
        check_secret_file(p)


def test_an_unopenable_path_says_why(tmp_path: Path) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(SecretError, match=f"^cannot open milter key secret file {loop}: Too "
                       "many levels of symbolic links$"):
        check_secret_file(loop)


def test_missing_file_names_both_fixes(tmp_path: Path) -> None:
    p = tmp_path / "nope"
    with pytest.raises(SecretError, match=f"^milter key secret file {p} does not exist; create "
                       f"one with: miltermonkey key generate --file {p} \\(or set milter_key "
                       "= false\\)$"):
        check_secret_file(p)


def test_a_directory_is_not_a_secret_file(tmp_path: Path) -> None:
    d = tmp_path / "dir"
    d.mkdir(mode=0o700)
    with pytest.raises(SecretError, match=f"^milter key secret file {d} is not a regular file; "
                       f"create one with: miltermonkey key generate --file {d}$"):
        check_secret_file(d)


# --- who may own the file and the directories above it ---------------------------------------


@pytest.fixture
def private(tmp_path: Path) -> Path:
    """A 0700 directory under pytest's private tree, holding a good secret file."""
    d = tmp_path / "etc"
    d.mkdir(mode=0o700)
    generate_secret_file(d / "miltersecret", "k1")
    return d


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o775, 0o757, 0o730, 0o703])
def test_a_directory_others_can_write_is_refused(private: Path, mode: int) -> None:
    secret = private / "miltersecret"
    private.chmod(mode)
    message = (f"^milter key secret file {secret}: directory {private} has mode {mode:04o}: "
               f"group or others may write to it, so another local user could replace the "
               f"secret; fix it with: chmod go-w {private} \\(or move the file")
    with pytest.raises(SecretError, match=message):
        check_secret_file(secret)
    with pytest.raises(SecretError, match=message):
        KeyService.from_config(_config(secret))
    private.chmod(0o755)
    check_secret_file(secret)


def test_an_ancestor_others_can_write_is_refused(private: Path) -> None:
    deeper = private / "a" / "b"
    deeper.mkdir(parents=True)
    generate_secret_file(deeper / "s", "k1")
    (private / "a").chmod(0o777)
    with pytest.raises(SecretError, match=f"directory {private / 'a'} has mode 0777"):
        check_secret_file(deeper / "s")


def test_a_sticky_directory_is_refused_as_the_files_own(private: Path) -> None:
    secret = private / "miltersecret"
    private.chmod(0o1777)
    with pytest.raises(SecretError, match=f"^milter key secret file {secret}: directory "
                       f"{private} has mode 1777: everyone may create files in it \\(like "
                       "/tmp\\), so anyone can put their own secret there while the file is "
                       "missing; move it to a directory only root and the milter's user can "
                       "write, such as /etc/mail$"):
        check_secret_file(secret)


def test_a_sticky_ancestor_like_tmp_is_accepted(private: Path) -> None:
    """Nobody but an entry's owner may rename it in a sticky directory."""
    inner = private / "inner"
    inner.mkdir(mode=0o700)
    generate_secret_file(inner / "s", "k1")
    private.chmod(0o1777)
    check_secret_file(inner / "s")
    private.chmod(0o1770)  # sticky and writable by the group only: still like /tmp
    check_secret_file(inner / "s")


def test_symlinks_are_checked_on_both_sides(private: Path, tmp_path: Path) -> None:
    secret = private / "miltersecret"
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    # the link lives where others may write: they could point it elsewhere
    link = open_dir / "link"
    link.symlink_to(secret)
    check_secret_file(link)
    open_dir.chmod(0o777)
    with pytest.raises(SecretError, match=f"directory {open_dir} has mode 0777"):
        check_secret_file(link)
    # the link is safe but the file it leads to is not
    safe_link = private / "link"
    real = open_dir / "real"
    os.rename(secret, real)
    safe_link.symlink_to(real)
    with pytest.raises(SecretError, match=f"directory {open_dir} has mode 0777"):
        check_secret_file(safe_link)
    open_dir.chmod(0o755)
    check_secret_file(safe_link)


@pytest.fixture
def relative_cwd(private: Path) -> Iterator[Path]:
    old = os.getcwd()
    os.chdir(private)
    try:
        yield private
    finally:
        os.chdir(old)


def test_a_relative_path_is_checked_from_the_working_directory(relative_cwd: Path) -> None:
    check_secret_file("miltersecret")
    relative_cwd.chmod(0o777)
    with pytest.raises(SecretError, match=f"directory {relative_cwd} has mode 0777"):
        check_secret_file("miltersecret")


@as_root
def test_a_directory_of_another_user_is_refused_unless_it_is_the_daemons(private: Path) -> None:
    secret = private / "miltersecret"
    os.chown(private, NOBODY, -1)
    with pytest.raises(SecretError, match=f"^milter key secret file {secret}: directory "
                       f"{private} belongs to nobody \\(uid {NOBODY}\\), not to root or the "
                       f"milter's user, so that user could replace the secret; fix it with: "
                       f"chown root {private} "):
        check_secret_file(secret)
    # the daemon runs as nobody (user = "nobody"): its own directory is fine
    check_secret_file(secret, "nobody")
    KeyService.from_config(_config(secret, user="nobody"))
    with pytest.raises(SecretError, match="belongs to nobody"):
        KeyService.from_config(_config(secret))


@as_root
def test_a_file_of_another_user_is_refused_unless_it_is_the_daemons(private: Path) -> None:
    secret = private / "miltersecret"
    os.chown(secret, NOBODY, -1)
    with pytest.raises(SecretError, match=f"^milter key secret file {secret} belongs to nobody "
                       f"\\(uid {NOBODY}\\), not to root or the milter's user, who could have "
                       f"written any secret in it; if it is yours, fix it with: chown root "
                       f"{secret}, else make a new one$"):
        check_secret_file(secret)
    check_secret_file(secret, "nobody")
    os.chown(secret, 54321, -1)  # a uid with no name
    with pytest.raises(SecretError, match=f"{secret} belongs to uid 54321, not to root"):
        check_secret_file(secret, "nobody")


def test_trusted_owners() -> None:
    me = os.geteuid()
    assert trusted_owners() == {0, me}
    assert trusted_owners("nobody") == {0, me, NOBODY}
    assert trusted_owners("no-such-user-here") == {0, me}
    assert trusted_owners("") == {0, me}


def test_generate_refuses_a_directory_others_can_write(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(SecretError, match=f"directory {shared} has mode 0777: group or others "
                       "may write to it"):
        generate_secret_file(shared / "miltersecret", "k1")
    assert list(shared.iterdir()) == []


@as_root
def test_generate_leaves_ownership_to_the_admin(private: Path) -> None:
    """key generate runs as root for a file the milter's user will own."""
    os.chown(private, NOBODY, -1)
    assert generate_secret_file(private / "miltersecret", "k2") == "k2"
    assert re.findall(r"^(k\d):", (private / "miltersecret").read_text(), re.M) == ["k1", "k2"]


def test_a_permission_refusal_says_who_must_own_the_file(tmp_path: Path) -> None:
    """Read as a user the file does not belong to (a child process that became nobody)."""
    if not ROOT:
        pytest.skip("becoming another user needs root")
    secret = tmp_path / "miltersecret"
    generate_secret_file(secret, "k1")
    check_secret_file(secret)  # root may read it
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                check_secret_file(secret)
                os.write(write_end, b"no error")
            except SecretError as e:
                os.write(write_end, str(e).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        said = pipe.read().decode()
    os.waitpid(pid, 0)
    assert said == (f"cannot read milter key secret file {secret}: permission denied; it must "
                    f"belong to the user the milter runs as: chown THAT-USER {secret} && "
                    f"chmod 600 {secret}")


@pytest.fixture
def far_from_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A local time zone whose date is not today's UTC date, right now."""
    behind = time.gmtime().tm_hour < 12
    monkeypatch.setenv("TZ", "FAR+12" if behind else "FAR-12")
    time.tzset()
    assert time.strftime("%Y%m%d") != time.strftime("%Y%m%d", time.gmtime())
    try:
        yield
    finally:
        monkeypatch.undo()
        time.tzset()


def test_default_key_id_is_the_utc_date(tmp_path: Path, far_from_utc: None) -> None:
    today = time.strftime("k%Y%m%d", time.gmtime())
    p = tmp_path / "secret"
    assert generate_secret_file(p) == today
    assert generate_secret_file(p) == f"{today}-2"
    assert generate_secret_file(p) == f"{today}-3"


def test_appending_keeps_one_secret_per_line(tmp_path: Path) -> None:
    p = tmp_path / "secret"
    generate_secret_file(p, "k1")
    generate_secret_file(p, "k2")
    text = p.read_text()
    assert "\n\n" not in text and text.endswith("\n")
    assert re.findall(r"^(k\d):", text, re.M) == ["k1", "k2"]
    # a file written by hand without a final newline
    first = f"a:{_b64(32)}"
    _write(p, first)
    generate_secret_file(p, "b")
    lines = p.read_text().splitlines()
    assert lines[0] == first and lines[1].startswith("b:") and len(lines) == 2


def test_appending_to_a_broken_file_names_it(tmp_path: Path) -> None:
    p = _write(tmp_path / "secret", "this is not a secret file\n")
    with pytest.raises(SecretError, match=f"^{p}:1: expected KEYID:BASE64SECRET"):
        generate_secret_file(p, "k2")
    assert p.read_text() == "this is not a secret file\n"


def test_a_bad_key_id_says_what_a_key_id_is(tmp_path: Path) -> None:
    for bad in ("bad id", "-leading", "x" * 65, "k:1"):
        with pytest.raises(SecretError, match=f"^key id {re.escape(repr(bad))}: use 1-64 "
                           "letters, digits, '.', '_' or '-', starting with a letter or digit$"):
            generate_secret_file(tmp_path / "secret", bad)
    assert not (tmp_path / "secret").exists()
