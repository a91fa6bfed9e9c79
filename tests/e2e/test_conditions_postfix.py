"""Conditions and evaluation mode through a real Postfix, clamd and spamd, read two ways.

Each message's brains are known from the daemon's log line for its queue id
(Postfix's) and from ``/metrics``; the two must tell the same story, and
the sink must hold what the verdicts say.  Clients come from several
loopback addresses (the whole of 127.0.0.0/8 is this host's), so Postfix
hands the daemon a different client address for each.
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from miltermonkey_core.testing.daemon import MonkeyProcess
from miltermonkey_core.testing.process import free_port
from miltermonkey_core.testing.sink import parse_dump
from miltermonkey_core.testing.smtp import send_mail

pytestmark = [pytest.mark.e2e, pytest.mark.engines]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def grew(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def summary_line(log: str, qid: str) -> str:
    """The line that ends the message ``qid`` (accepted or refused)."""
    lines = [ln for ln in log.splitlines()
             if re.search(rf"{qid}: (accept|reject|tempfail|discard) ", ln)]
    assert len(lines) == 1, (qid, lines)
    return lines[0]


def queue_id(postfix: Any, client: str) -> str:
    """The queue id Postfix gave the last message from ``client``."""
    found = re.findall(rf"(\w+): client=\S+\[{re.escape(client)}\]", postfix.maillog())
    assert found, client
    return str(found[-1])


@pytest.fixture
def engines(clamd_server: Any, spamd_server: Any) -> Iterator[tuple[str, str]]:
    spamd_host, spamd_port = spamd_server.address
    yield f"tcp:127.0.0.1:{clamd_server.tcp_address[1]}", f"{spamd_host}:{spamd_port}"


def test_spam_only_for_clients_outside_a_network_av_for_everyone(
        postfix_stack: Any, engines: tuple[str, str], tmp_path: Path) -> None:
    samples = pytest.importorskip("miltermonkey_av.testing.samples")
    clamd, spamd = engines
    port = free_port()
    brains = [{"use": "av", "clamd": [clamd]},
              {"use": "spam", "servers": [spamd], "cache_ttl": 0,
               "when": {"client_not_in": ["127.0.0.0/30"]}}]
    with MonkeyProcess(tmp_path / "mm", brains, {"metrics": f"127.0.0.1:{port}"}) as m:
        postfix_stack.use_milters(m.postfix_spec)
        postfix_stack.sink.clear()
        before = scrape(port)
        clients = {"127.0.0.1": False, "127.0.0.2": False, "127.0.0.5": True,
                   "127.0.0.9": True}  # address: spam runs for it
        qids = {}
        for client in clients:
            res = send_mail(postfix_stack.smtp_port, samples.clean_plain(),
                            "sender@example.test", ["rcpt@example.test"], source=client)
            assert res.ok, (client, res)
            qids[client] = queue_id(postfix_stack.postfix, client)
        delivered = [parse_dump(p) for p in postfix_stack.sink.wait_for(4, timeout=60)]
        after = scrape(port)
        log = m.log()
    ran = {}
    for client, qid in qids.items():
        line = summary_line(log, qid)
        assert "av=ran:continue" in line, line
        ran[client] = "spam=ran:" in line
        if not clients[client]:
            assert "spam=skipped" in line, line
    assert ran == clients, ran
    # The metrics say the same: av called four times, spam twice, skipped twice by its
    # condition; every message delivered, tagged by spam only when spam ran.
    assert grew(before, after, "miltermonkey_brain_calls_total", brain="av") == 4
    assert grew(before, after, "miltermonkey_brain_calls_total", brain="spam") == 2
    assert grew(before, after, "miltermonkey_brain_skips_total", brain="spam",
                reason="condition:client_not_in") == 2
    assert grew(before, after, "miltermonkey_messages_total", verdict="accept") == 4
    tagged = sum(1 for d in delivered if d.header("X-Spam-Status") is not None)
    assert len(delivered) == 4 and tagged == 2


def test_a_brain_in_evaluation_mode_that_would_reject_changes_nothing(
        postfix_stack: Any, engines: tuple[str, str], tmp_path: Path) -> None:
    samples = pytest.importorskip("miltermonkey_av.testing.samples")
    clamd, _ = engines
    port = free_port()
    brains = [{"use": "av", "clamd": [clamd], "mode": "evaluate"}]
    with MonkeyProcess(tmp_path / "mm", brains, {"metrics": f"127.0.0.1:{port}",
                                                 "milter_key": False}) as m:
        postfix_stack.use_milters(m.postfix_spec)
        postfix_stack.sink.clear()
        before = scrape(port)
        raw = samples.eicar_body()
        res = postfix_stack.send(raw)
        assert res.ok, res  # delivered: the brain only says what it would do
        (dump,) = postfix_stack.sink.wait_for(1, timeout=60)
        got = parse_dump(dump)
        after = scrape(port)
        qid = queue_id(postfix_stack.postfix, "127.0.0.1")
        log = m.log()
    # Unchanged: the headers that came, in order, and no X-Virus-* from the brain.
    sent_head, sent_body = raw.replace(b"\r\n", b"\n").split(b"\n\n", 1)
    sent_names = [ln.split(b":", 1)[0].decode() for ln in sent_head.splitlines()
                  if ln[:1] not in (b" ", b"\t")]
    got_names = [n for n, _ in got.headers() if n.lower() not in ("received", "return-path")]
    assert got_names == sent_names, got_names
    assert got.header("X-Virus-Status") is None
    assert got.body.replace(b"\r\n", b"\n") == sent_body
    assert re.search(rf"{qid}: brain av \(evaluation\) would reject 550", log), log[-2000:]
    assert grew(before, after, "miltermonkey_brain_evaluation_verdicts_total", brain="av",
                verdict="reject") == 1
    assert grew(before, after, "miltermonkey_messages_total", verdict="accept") == 1
    assert grew(before, after, "miltermonkey_messages_total", verdict="reject") == 0
