"""Through a real Postfix: a signature update makes a cached clean message be scanned again.

SMTP client -> Postfix -> the daemon (av brain, scan cache on) -> a private
clamd whose signature directory the test changes and RELOADs.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path

import attrs
import pytest
import redis as redis_client
from av_helpers import LoggingClamd, maillog_ids, reload_with, settle, smtp_data, unix
from miltermonkey_av.testing import Clamd
from miltermonkey_av.testing.samples import EICAR

from miltermonkey_core.engine.cache_redis import PREFIX
from miltermonkey_core.milterkey import generate_secret_file
from miltermonkey_core.testing.daemon import MonkeyProcess
from miltermonkey_core.testing.part import require_or_skip
from miltermonkey_core.testing.postfix import Postfix
from miltermonkey_core.testing.process import free_port, wait_until
from miltermonkey_core.testing.redis import Redis
from miltermonkey_core.testing.sink import SmtpSink

pytestmark = [pytest.mark.e2e, pytest.mark.engines]

#: The brain's cache_settle here: short, so the test can wait it out.
SETTLE = 1.0




@attrs.define
class Stack:
    clamd: LoggingClamd
    postfix: Postfix
    sink: SmtpSink
    monkey: MonkeyProcess
    redis: Redis | None = None


@pytest.fixture
def stack(tmp_path: Path, make_clamd: Callable[..., Clamd]) -> Iterator[Stack]:
    require_or_skip(Postfix)
    require_or_skip(SmtpSink)
    c = make_clamd(LoggingClamd)
    assert isinstance(c, LoggingClamd)
    sink = SmtpSink(tmp_path / "sink", free_port())
    brain = {"use": "av", "clamd": [unix(c)], "database_directory": str(c.db_dir),
             "cache_settle": SETTLE}
    monkey = MonkeyProcess(tmp_path / "monkey", [brain], {"hostname": "mx.example.org"})
    postfix = Postfix(tmp_path / "postfix", free_port(), sink.port, milters=monkey.postfix_spec)
    try:
        sink.start()
        monkey.start()
        postfix.start()
        yield Stack(c, postfix, sink, monkey)
    finally:
        postfix.stop()
        monkey.stop()
        sink.stop()


def test_a_signature_update_makes_a_cached_clean_message_be_scanned_again_and_refused(
        stack: Stack) -> None:
    c, log = stack.clamd, stack.monkey.wait_for_log
    marker = f"MilterMonkey-AV reload marker {uuid.uuid4().hex}".encode()
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = "alice@example.org", "bob@example.net", "reload"
    # A real sender's: else Postfix adds a new Message-ID and Date to each copy.
    m["Message-ID"], m["Date"] = f"<{uuid.uuid4().hex}@example.org>", formatdate()
    m.set_content("Nothing here yet.\n\n" + marker.decode() + "\n")
    raw = m.as_bytes()
    settle(c.db_dir, SETTLE)

    # Scanned once, then replayed: Postfix's own Received line differs, the key does not.
    assert smtp_data(stack.postfix, raw)[0] == 250
    assert smtp_data(stack.postfix, raw)[0] == 250
    delivered = stack.sink.wait_for(2)
    log("cached result replayed (continue")
    assert [ln.split("-> ", 1)[1] for ln in c.scans()] == ["instream(local): OK"]

    # A signature for it; clamd RELOADs, and answers with it.
    name = "MilterMonkey.Test.Reload"
    took = reload_with(c, "reload.ndb", f"{name}:0:*:{marker.hex()}\n", marker, name)
    assert took < 90
    settle(c.db_dir, SETTLE)  # past the settle window: the fingerprint alone forces the scan

    code, text = smtp_data(stack.postfix, raw)
    assert (code, text) == (550, f"5.7.1 Virus found: {name}.UNOFFICIAL")
    rejected = maillog_ids(stack.postfix, r"(\w+): milter-reject: END-OF-MESSAGE .*Virus found")
    assert len(rejected) == 1
    text = log(f"{rejected[0]}: infected: {name}.UNOFFICIAL (clamd {unix(c)}")
    assert text.count("cached result replayed") == 1
    local = [ln.split("-> ", 1)[1] for ln in c.scans() if "instream(local)" in ln]
    assert local == ["instream(local): OK", f"instream(local): {name}.UNOFFICIAL FOUND"]
    stack.postfix.wait_queue_empty()
    assert stack.sink.messages() == delivered  # nothing delivered the third time


# --- a shared cache in Redis, tampered with by hand ---------------------------------------


@pytest.fixture
def redis_stack(tmp_path: Path, make_clamd: Callable[..., Clamd]) -> Iterator[Stack]:
    """As :func:`stack`, with ``cache = "redis://..."`` and its own signing secret."""
    require_or_skip(Postfix)
    require_or_skip(SmtpSink)
    require_or_skip(Redis)
    c = make_clamd(LoggingClamd)
    assert isinstance(c, LoggingClamd)
    redis = Redis(tmp_path / "redis", free_port())
    secret = tmp_path / "cache-secret"
    generate_secret_file(str(secret), "c1", False)
    sink = SmtpSink(tmp_path / "sink", free_port())
    brain = {"use": "av", "clamd": [unix(c)], "database_directory": str(c.db_dir),
             "cache_settle": SETTLE}
    monkey = MonkeyProcess(tmp_path / "monkey", [brain],
                           {"hostname": "mx.example.org", "cache": redis.url,
                            "cache_secret_file": str(secret)})
    postfix = Postfix(tmp_path / "postfix", free_port(), sink.port, milters=monkey.postfix_spec)
    try:
        redis.start()
        sink.start()
        monkey.start()
        postfix.start()
        yield Stack(c, postfix, sink, monkey, redis)
    finally:
        postfix.stop()
        monkey.stop()
        sink.stop()
        redis.stop()


def _mail(subject: str, text: str) -> bytes:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = "alice@example.org", "bob@example.net", subject
    m["Message-ID"], m["Date"] = f"<{uuid.uuid4().hex}@example.org>", formatdate()
    m.set_content(text)
    return m.as_bytes()


def test_a_redis_entry_tampered_by_hand_is_refused_and_the_brain_runs(
        redis_stack: Stack) -> None:
    """Someone with write access to Redis but not the secret copies a signed "clean"
    entry over an infected message's entry, and flips bytes in another: both are
    misses with a log line, the brain scans, the virus is refused again."""
    stack, c = redis_stack, redis_stack.clamd
    assert stack.redis is not None
    settle(c.db_dir, SETTLE)
    clean = _mail("clean", "Nothing to see.\n")
    virus = _mail("virus", "Attached, as text:\n" + EICAR.decode() + "\n")
    client = redis_client.Redis.from_url(stack.redis.url)

    assert smtp_data(stack.postfix, clean)[0] == 250
    clean_keys = set(client.keys(PREFIX + b"*"))
    assert len(clean_keys) == 1
    assert smtp_data(stack.postfix, virus)[0] == 550
    virus_keys = set(client.keys(PREFIX + b"*")) - clean_keys
    assert len(virus_keys) == 1
    (clean_key,), (virus_key,) = clean_keys, virus_keys
    assert wait_until(lambda: len(c.scans()) == 2, 10, 0.05), c.scans()
    scans = 2

    # 1. A valid "clean" entry, signature and all, copied over the virus's entry.
    client.set(virus_key, client.get(clean_key))
    assert smtp_data(stack.postfix, virus)[0] == 550
    stack.monkey.wait_for_log("has a bad signature")
    # not trusted: clamd was asked again (it logs the scan just after answering)
    assert wait_until(lambda: len(c.scans()) == scans + 1, 10, 0.05), c.scans()

    # 2. The entry the brain stored again, with one byte of its verdict changed.
    stored = client.get(virus_key)
    assert stored is not None and b"550" in stored
    client.set(virus_key, stored.replace(b"550", b"250", 1))
    assert smtp_data(stack.postfix, virus)[0] == 550
    assert wait_until(lambda: len(c.scans()) == scans + 2, 10, 0.05), c.scans()
    assert stack.monkey.log().count("has a bad signature") == 2
    assert "cached result replayed (reject" not in stack.monkey.log()
    stack.postfix.wait_queue_empty()
    assert [m for m in stack.sink.messages() if b"EICAR" in m.read_bytes()] == []
