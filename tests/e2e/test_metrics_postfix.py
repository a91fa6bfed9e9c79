"""Metrics against the count at the sink: real Postfix, real clamd and spamd, av and spam.

Mail goes in over SMTP to a private Postfix, through the daemon, out to
smtp-sink.  The message and verdict counters scraped from ``/metrics`` must
match what the SMTP client and the sink saw; the endpoint must answer
throughout a SIGHUP reload and while a killed worker is being replaced.
60 messages by default; ``MILTERMONKEY_LONG=1`` (``nox -s long``) sends 500.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from miltermonkey_core.testing.daemon import MonkeyProcess
from miltermonkey_core.testing.process import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.engines]

LONG = os.environ.get("MILTERMONKEY_LONG", "") in ("1", "yes", "true")
MESSAGES = 500 if LONG else 60


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def v(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counters_match_the_sink_through_a_reload_and_a_worker_restart(
        postfix_stack: Any, clamd_server: Any, spamd_server: Any, tmp_path: Path) -> None:
    av = pytest.importorskip("miltermonkey_av.testing.samples")
    spam = pytest.importorskip("miltermonkey_spam.testing.samples")
    port = free_port()
    spamd_host, spamd_port = spamd_server.address
    brains = [{"use": "av", "clamd": [f"tcp:127.0.0.1:{clamd_server.tcp_address[1]}"]},
              # cache_ttl 0: the clean mail is one message again and again, and every
              # message must reach spamd for the call counters below
              {"use": "spam", "servers": [f"{spamd_host}:{spamd_port}"], "reject_score": 100,
               "cache_ttl": 0}]
    with MonkeyProcess(tmp_path / "mm", brains, {"metrics": f"127.0.0.1:{port}",
                                                 "debug_level": 10}) as m:
        postfix_stack.use_milters(m.postfix_spec)
        postfix_stack.sink.clear()
        codes: list[int] = []
        errors: list[str] = []
        stop = threading.Event()

        def poll() -> None:
            while not stop.is_set():
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                                timeout=5) as r:
                        codes.append(r.status)
                except OSError as e:
                    errors.append(str(e))
                time.sleep(0.05)

        poller = threading.Thread(target=poll)
        poller.start()
        try:
            before = scrape(port)
            sent = {"clean": 0, "virus": 0, "spam": 0}
            refused = {"virus": 0, "spam": 0}
            for i in range(MESSAGES):
                if i == MESSAGES // 2:
                    m.signal(signal.SIGHUP)  # mid-run: counters survive a reload
                kind = "virus" if i % 10 == 3 else "spam" if i % 10 == 7 else "clean"
                raw = (av.eicar_body() if kind == "virus" else
                       spam.spam(f"metrics-{i}") if kind == "spam" else av.clean_plain())
                res = postfix_stack.send(raw)
                sent[kind] += 1
                if kind == "clean":
                    assert res.ok, res
                else:
                    assert res.code == 550, (kind, res)
                    refused[kind] += 1
            delivered = len(postfix_stack.sink.wait_for(sent["clean"], timeout=120))
            m.wait_for_log("reload done", timeout=30)
            after = scrape(port)

            def grew(name: str, **labels: str) -> float:
                return v(after, name, **labels) - v(before, name, **labels)

            assert delivered == sent["clean"]
            assert grew("miltermonkey_messages_total", verdict="accept") == delivered
            assert grew("miltermonkey_messages_total", verdict="reject") == sum(refused.values())
            assert grew("miltermonkey_brain_verdicts_total", brain="av",
                        verdict="reject") == refused["virus"]
            assert grew("miltermonkey_brain_verdicts_total", brain="spam",
                        verdict="reject") == refused["spam"]
            assert grew("miltermonkey_brain_calls_total", brain="av") == MESSAGES
            assert grew("miltermonkey_brain_calls_total", brain="spam") == MESSAGES - sent[
                "virus"]
            assert v(after, "miltermonkey_reloads_total", result="ok") == 1
            status = subprocess.run([sys.executable, "-m", "miltermonkey_core", "status", "-c",
                                     str(m.config_path)], capture_output=True, check=False,
                                    text=True, timeout=30)
            assert status.returncode == 0, status.stderr
            rows = {ln.split()[0]: ln.split() for ln in status.stdout.splitlines()
                    if ln.startswith(("av ", "spam "))}
            assert rows["av"][1:4] == [str(MESSAGES), str(MESSAGES - refused["virus"]),
                                       str(refused["virus"])]
            assert rows["spam"][3] == str(refused["spam"])

            old = int(re.findall(r"started worker pid (\d+)", m.log())[-1])
            os.kill(old, signal.SIGKILL)
            end = time.monotonic() + 30
            while time.monotonic() < end and f"worker pid {old} died" not in m.log():
                time.sleep(0.05)
            new = int(re.findall(r"started worker pid (\d+)", m.log())[-1])
            m.wait_for_log(f"worker pid {new} is serving", timeout=60)
            postfix_stack.sink.clear()
            # An smtpd that kept its milter connection to the killed worker (Postfix
            # reuses it across SMTP sessions) tempfails once, then connects afresh.
            for _ in range(3):
                res = postfix_stack.send(av.clean_plain())
                if res.ok:
                    break
                assert res.code == 451, res
            assert res.ok, res
            postfix_stack.sink.wait_for(1, timeout=60)
            restarted = scrape(port)
        finally:
            stop.set()
            poller.join()
    assert not errors, errors[:5]
    assert set(codes) == {200} and len(codes) > 10
    assert v(restarted, "miltermonkey_worker_restarts_total") == 1
    assert v(restarted, "miltermonkey_messages_total", verdict="accept") == 1
    print(f"\n$ miltermonkey status\n{status.stdout}")
    print(f"\n{MESSAGES} messages through Postfix: {delivered} delivered, "
          f"{refused['virus']} virus and {refused['spam']} spam refused; "
          f"{len(codes)} scrapes during the run, all 200")
