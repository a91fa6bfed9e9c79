"""The milter key over real sockets: two daemons, hop 1 signs, hop 2 skips.

Both daemons share one secret file and run two brains from the
``tests/dists/miltermonkey-keytest-brains`` distribution: ``keytest-a`` (``skip_if_key = true``)
and ``keytest-b``.  Each stamps the message with the host it ran on, so which
hop ran which brain is read off the message hop 2 lets through.  Every
tampered key must make hop 2 run both brains and strip the bad header.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from miltermonkey_core.contract.model import message_from_bytes
from miltermonkey_core.milterkey import (
    KeyFields,
    KeyService,
    generate_secret_file,
    load_secrets,
    mime_digest,
    normalize_message_id,
)
from miltermonkey_core.plugins import installed_brains
from miltermonkey_core.testing.cleanup import AppliedMessage
from miltermonkey_core.testing.client import MilterClient, SessionResult
from miltermonkey_core.testing.daemon import MonkeyProcess

FIXTURE = Path(__file__).parents[1] / "dists" / "miltermonkey-keytest-brains"
HOP1 = "hop1.example.test"
HOP2 = "hop2.example.test"
BRAINS = [{"use": "keytest-a", "skip_if_key": True}, {"use": "keytest-b"}]
RAW = (b"Message-ID: <keytest-1@example.org>\r\nFrom: alice@example.org\r\n"
       b"To: bob@example.net\r\nSubject: milter key over sockets\r\n\r\n"
       b"Hello Bob,\r\nthis went through two MilterMonkeys.\r\n")


@pytest.fixture(scope="session")
def keytest_brains() -> None:
    """Install the keytest brains (tests/dists) editable unless they are installed already."""
    if {"keytest-a", "keytest-b"} <= set(installed_brains()):
        return
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "-e", str(FIXTURE)],
        capture_output=True, text=True, check=False, timeout=300,
    )
    importlib.invalidate_caches()
    if proc.returncode != 0 or not {"keytest-a", "keytest-b"} <= set(installed_brains()):
        pytest.skip(f"cannot install {FIXTURE} (pip install -e it first):\n{proc.stderr[-2000:]}")


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "miltersecret"
    generate_secret_file(path, "k1")
    return path


@pytest.fixture(scope="module")
def hops(keytest_brains: None, secret_file: Path,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MonkeyProcess, MonkeyProcess]]:
    work = tmp_path_factory.mktemp("hops")
    daemons = [
        MonkeyProcess(work / name, BRAINS, {
            "milter_key": True, "miltersecretfile": str(secret_file), "hostname": host,
        }, name=name)
        for name, host in (("hop1", HOP1), ("hop2", HOP2))
    ]
    try:
        for d in daemons:
            d.start()
        yield daemons[0], daemons[1]
    finally:
        for d in daemons:
            d.stop()


def send(daemon: MonkeyProcess, raw: bytes) -> SessionResult:
    with MilterClient(daemon.address) as client:
        client.negotiate()
        result = client.send_message(raw, "<alice@example.org>", ["<bob@example.net>"])
        client.quit()
    assert result.accepted, result
    assert result.applied is not None
    return result


def out(result: SessionResult) -> AppliedMessage:
    assert result.applied is not None
    return result.applied


def render(headers: list[tuple[str, str]], body: bytes) -> bytes:
    lines = b"".join(f"{n}: {v}".replace("\n", "\r\n").encode() + b"\r\n" for n, v in headers)
    return lines + b"\r\n" + body


def replace_key(applied: AppliedMessage, value: str | None, body: bytes | None = None,
                message_id: str | None = None) -> bytes:
    headers = [(n, v) for n, v in applied.headers if n.lower() != "x-milter-key"]
    if message_id is not None:
        headers = [(n, message_id if n.lower() == "message-id" else v) for n, v in headers]
    if value is not None:
        headers.append(("X-Milter-Key", value))
    return render(headers, applied.body if body is None else body)


def _ours(applied: AppliedMessage, host: str, secrets: dict[str, bytes]) -> KeyFields:
    """The single key on ``applied``: made by ``host`` and valid for the message."""
    keys = applied.header_values("X-Milter-Key")
    assert len(keys) == 1, keys
    fields = KeyFields.parse(keys[0])
    assert fields.host == host
    m = message_from_bytes(applied.as_bytes())
    svc = KeyService(secrets, hostname="verifier")
    assert svc.check(keys[0], normalize_message_id(m.headers), m.body.sha256(),
                     mime_digest(m.headers), time.time())[1] is None
    return fields


@pytest.fixture(scope="module")
def hop1_result(hops: tuple[MonkeyProcess, MonkeyProcess]) -> AppliedMessage:
    return out(send(hops[0], RAW))


def test_hop1_signs(hop1_result: AppliedMessage, secret_file: Path) -> None:
    assert hop1_result.header_values("X-Keytest-A") == [f"keytest-a@{HOP1} key-says-ran=no"]
    assert hop1_result.header_values("X-Keytest-B") == [f"keytest-b@{HOP1} key-says-ran=no"]
    fields = _ours(hop1_result, HOP1, load_secrets(secret_file))
    assert fields.ran == (("keytest-a", "continue"), ("keytest-b", "continue"))


def test_hop2_skips_the_brain_the_key_lists(hops: tuple[MonkeyProcess, MonkeyProcess],
                                             hop1_result: AppliedMessage,
                                             secret_file: Path) -> None:
    hop2 = hops[1]
    result = out(send(hop2, hop1_result.as_bytes()))
    # keytest-a (skip_if_key) did not run again; keytest-b (no skip_if_key) did
    assert result.header_values("X-Keytest-A") == [f"keytest-a@{HOP1} key-says-ran=no"]
    assert result.header_values("X-Keytest-B") == [
        f"keytest-b@{HOP1} key-says-ran=no", f"keytest-b@{HOP2} key-says-ran=yes"]
    fields = _ours(result, HOP2, load_secrets(secret_file))
    # keytest-a is carried forward: the next hop may skip it too
    assert fields.ran == (("keytest-a", "continue"), ("keytest-b", "continue"))
    hop2.wait_for_log("trusted milter key: skipping keytest-a")


def _sign(secrets: dict[str, bytes], raw: bytes, *, expiry: int | None = None) -> str:
    m = message_from_bytes(raw)
    mid = normalize_message_id(m.headers)
    assert mid is not None
    svc = KeyService(secrets, hostname="somewhere.example")
    return svc.format(svc.sign([("keytest-a", "continue"), ("keytest-b", "continue")], mid,
                               m.body.sha256(), mime_digest(m.headers), expiry=expiry))


Tamper = Callable[[AppliedMessage, dict[str, bytes]], bytes]


def _field(applied: AppliedMessage, secrets: dict[str, bytes]) -> bytes:
    (value,) = applied.header_values("X-Milter-Key")
    return replace_key(applied, value.replace("ran=keytest-a:continue,",
                                              "ran=keytest-a:accept,"))


def _body(applied: AppliedMessage, secrets: dict[str, bytes]) -> bytes:
    (value,) = applied.header_values("X-Milter-Key")
    return replace_key(applied, value, body=applied.body + b"-- \r\nappended footer\r\n")


def _expired(applied: AppliedMessage, secrets: dict[str, bytes]) -> bytes:
    value = _sign(secrets, applied.as_bytes(), expiry=int(time.time()) - 3600)
    return replace_key(applied, value)


def _unknown_id(applied: AppliedMessage, secrets: dict[str, bytes]) -> bytes:
    return replace_key(applied, _sign({"k9": os.urandom(32)}, applied.as_bytes()))


def _wrong_secret(applied: AppliedMessage, secrets: dict[str, bytes]) -> bytes:
    return replace_key(applied, _sign({"k1": os.urandom(32)}, applied.as_bytes()))


def _copied(applied: AppliedMessage, secrets: dict[str, bytes]) -> bytes:
    (value,) = applied.header_values("X-Milter-Key")
    return replace_key(applied, value, message_id="<another-message@example.org>")


TAMPERING: list[tuple[str, Tamper, str]] = [
    ("field", _field, "bad MAC"),
    ("body", _body, "wrong body"),
    ("expired", _expired, "expired"),
    ("unknown-id", _unknown_id, "unknown key id 'k9'"),
    ("wrong-secret", _wrong_secret, "bad MAC"),
    ("copied", _copied, "wrong message"),
]


@pytest.mark.parametrize(("tamper", "reason"), [(t, r) for _, t, r in TAMPERING],
                         ids=[n for n, _, _ in TAMPERING])
def test_hop2_scans_in_full_and_strips_a_bad_key(
    hops: tuple[MonkeyProcess, MonkeyProcess], hop1_result: AppliedMessage, secret_file: Path,
    tamper: Tamper, reason: str,
) -> None:
    hop2 = hops[1]
    secrets = load_secrets(secret_file)
    raw = tamper(hop1_result, secrets)
    sent = send(hop2, raw)
    result = out(sent)
    # both brains ran on hop 2
    assert f"keytest-a@{HOP2} key-says-ran=no" in result.header_values("X-Keytest-A")
    assert f"keytest-b@{HOP2} key-says-ran=no" in result.header_values("X-Keytest-B")
    # the bad key is gone; the only key is hop 2's own, valid for the message as it leaves
    fields = _ours(result, HOP2, secrets)
    assert fields.ran == (("keytest-a", "continue"), ("keytest-b", "continue"))
    log = hop2.wait_for_log(f"{sent.queue_id}: removed untrusted milter key X-Milter-Key #1: "
                            f"{reason}")
    assert f"{sent.queue_id}: trusted milter key: skipping" not in log


def test_two_forged_keys_are_both_stripped(hops: tuple[MonkeyProcess, MonkeyProcess],
                                           hop1_result: AppliedMessage,
                                           secret_file: Path) -> None:
    hop2 = hops[1]
    secrets = load_secrets(secret_file)
    forged = _sign({"k1": os.urandom(32)}, hop1_result.as_bytes())
    raw = replace_key(hop1_result, forged)
    head, _, body = raw.partition(b"\r\n\r\n")
    raw = head + b"\r\nX-Milter-Key: v=2; nonsense\r\n\r\n" + body
    sent = send(hop2, raw)
    result = out(sent)
    _ours(result, HOP2, secrets)
    assert f"keytest-a@{HOP2} key-says-ran=no" in result.header_values("X-Keytest-A")
    hop2.wait_for_log(f"{sent.queue_id}: removed untrusted milter key X-Milter-Key #1: bad MAC")
    # numbered by position in the message as received, which an admin can find
    hop2.wait_for_log(f"{sent.queue_id}: removed untrusted milter key X-Milter-Key #2: malformed")


@pytest.mark.skipif(os.geteuid() != 0, reason="acting as another local user needs root")
def test_a_secret_another_user_could_replace_stops_check_config_and_the_daemon(
    keytest_brains: None, tmp_path: Path
) -> None:
    """Issue 13, finding 5: the file is 0600, but its directory lets anyone rename it.

    ``nobody`` moves the admin's secret aside and writes one of its own (mode
    0600 too): with it, nobody could sign "av already ran" for any message.
    Both check-config and the daemon must refuse the directory, name it and
    say how to fix it, and still refuse the file while nobody owns it.
    """
    # /tmp itself (root, sticky) is a safe ancestor; the shared directory is not
    shared = Path(tempfile.mkdtemp(prefix="mm-shared-", dir="/tmp"))
    try:
        secret = shared / "miltersecret"
        generate_secret_file(secret, "k1")
        shared.chmod(0o777)
        subprocess.run(
            ["sh", "-c", "mv miltersecret miltersecret.admin && umask 077 && "
             "printf 'k1:%s\\n' \"$(head -c 32 /dev/urandom | base64 -w0)\" > miltersecret"],
            cwd=shared, user="nobody", check=True, timeout=30)
        assert secret.stat().st_uid != 0
        settings = {"milter_key": True, "miltersecretfile": str(secret)}
        hop = MonkeyProcess(tmp_path / "mx", BRAINS, settings, name="mx")

        def check_config() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "miltermonkey_core", "check-config", "-c",
                 str(hop.config_path)], capture_output=True, text=True, timeout=60, check=False)

        why = (f"milter key secret file {secret}: directory {shared} has mode 0777: group or "
               f"others may write to it, so another local user could replace the secret; fix "
               f"it with: chmod go-w {shared}")
        result = check_config()
        assert result.returncode != 0
        assert f"{hop.config_path}:" in result.stderr and why in result.stderr, result.stderr
        with pytest.raises(RuntimeError, match="miltermonkey exited") as started:
            hop.start()
        assert why in str(started.value)

        # the directory fixed, the file nobody wrote is still not trusted
        shared.chmod(0o755)
        result = check_config()
        assert result.returncode != 0
        assert f"milter key secret file {secret} belongs to nobody" in result.stderr

        # the admin's own secret back: all well
        os.replace(shared / "miltersecret.admin", secret)
        result = check_config()
        assert result.returncode == 0, result.stderr
    finally:
        shutil.rmtree(shared, ignore_errors=True)
