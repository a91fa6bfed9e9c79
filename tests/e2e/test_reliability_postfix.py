"""The fault suite on real parts: Postfix -> Postfix + MilterMonkey -> smtp-sink.

Mail enters a first Postfix (``front``, no milter) that relays it to a
second one (``filter``, with MilterMonkey as its milter) that relays to the
sink.  So when the filter hop tempfails a message, the front Postfix keeps
it in its deferred queue and retries it (``postqueue -f``), exactly what a
sending MTA on the Internet does.

For every fault the suite counts, per message (by Message-ID):

* **sent**: accepted by the front Postfix;
* **first try**: delivered at the sink without a deferral;
* **tempfailed**: deferred by the front at least once because the filter
  hop answered 4xx (the milter's policy, or Postfix's
  ``milter_default_action`` when the milter was unreachable);
* **retried**: of those, delivered after the fault was fixed and the
  deferred queue flushed;
* **lost**: never delivered (must be 0);
* **unscanned**: delivered without a header that a scan which policy
  requires adds (X-Stamp, X-Virus-Status, X-Spam-Status), which must be 0.

``MILTERMONKEY_LONG=1`` sends ten times more mail per fault.
``MILTERMONKEY_FAULT_REPORT=path`` appends each fault's counts as JSON.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
from miltermonkey_av.testing import Clamd
from miltermonkey_spam.testing import Spamd
from reliability_support import (
    LONG,
    render_brains_reload,
    start_with_overrides,
    wait_for,
    worker_pid,
)

from miltermonkey_core.testing.daemon import MonkeyProcess
from miltermonkey_core.testing.part import require_or_skip
from miltermonkey_core.testing.postfix import Postfix
from miltermonkey_core.testing.process import free_port
from miltermonkey_core.testing.sink import SmtpSink, parse_dump
from miltermonkey_core.testing.smtp import send_mail

pytestmark = pytest.mark.e2e

N = 300 if LONG else 30
RATE = 25.0  # messages a second into the front Postfix


@attrs.define
class Relay:
    front: Postfix
    filter: Postfix
    sink: SmtpSink
    base: Path

    def use(self, m: MonkeyProcess, **params: str) -> None:
        self.filter.set_milters(m.postfix_spec, **params)


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    require_or_skip(Postfix)
    require_or_skip(SmtpSink)
    base = tmp_path_factory.mktemp("faults")
    sink = SmtpSink(base / "sink", free_port())
    filt = Postfix(base / "filter", free_port(), sink.port,
                   extra={"smtpd_client_connection_count_limit": "0"})
    front = Postfix(base / "front", free_port(), filt.smtp_port,
                    extra={"minimal_backoff_time": "1h", "maximal_backoff_time": "1h",
                           "queue_run_delay": "1h", "smtp_connection_cache_on_demand": "no"})
    sink.start()
    try:
        filt.start()
        try:
            front.start()
            try:
                yield Relay(front, filt, sink, base)
            finally:
                front.stop()
        finally:
            filt.stop()
    finally:
        sink.stop()


@attrs.define
class Counts:
    fault: str
    sent: int = 0
    first_try: int = 0
    tempfailed: int = 0
    retried: int = 0
    lost: int = 0
    unscanned: int = 0
    duplicates: int = 0
    tagged: int = 0
    seconds: float = 0.0

    def row(self) -> str:
        return (f"| {self.fault} | {self.sent} | {self.first_try} | {self.tempfailed} | "
                f"{self.retried} | {self.lost} | {self.unscanned} |")


def _report(c: Counts) -> None:
    print("\nfault | sent | first try | tempfailed | retried+delivered | lost | unscanned")
    print(c.row(), f"(tagged {c.tagged}, duplicates {c.duplicates}, {c.seconds:.0f} s)")
    path = os.environ.get("MILTERMONKEY_FAULT_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({**attrs.asdict(c), "long": LONG}) + "\n")


def _message(case: str, i: int, subject: str) -> bytes:
    return (f"From: a@example.test\r\nTo: b@example.test\r\nSubject: {subject}\r\n"
            f"Message-ID: <{case}-{i}@fault.test>\r\n\r\n"
            f"message {i} of the {case} fault\r\n").encode()


def _queue_settled(pf: Postfix) -> bool:
    return all(e.get("queue_name") == "deferred" for e in pf.queue())


def _flush_until_empty(pf: Postfix, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pf.queue_empty():
            return True
        pf.flush()
        wait_for(lambda: _queue_settled(pf), 20, 0.2)
        if pf.queue_empty():
            return True
        time.sleep(1.0)
    return pf.queue_empty()


def run_fault(relay: Relay, case: str, *, subjects: Callable[[int], str],
              trigger: Callable[[], None] | None, fix: Callable[[], None] | None,
              required: Sequence[str], n: int = N, fix_wait: float = 90.0) -> Counts:
    """Send ``n`` messages, pull ``trigger`` a third of the way, ``fix``, flush, count."""
    t0 = time.monotonic()
    front, sink = relay.front, relay.sink
    before = {p for p in sink.messages()}
    log_start = len(front.maillog())
    errors: list[str] = []
    pulled: threading.Thread | None = None
    for i in range(n):
        if trigger is not None and i == n // 3:
            pulled = threading.Thread(target=trigger, daemon=True)
            pulled.start()
        res = send_mail(front.smtp_port, _message(case, i, subjects(i)), "a@example.test",
                        ["b@example.test"])
        if not res.ok:
            errors.append(str(res))
        time.sleep(1.0 / RATE)
    assert not errors, errors[:3]
    assert wait_for(lambda: _queue_settled(front), 120, 0.2), front.queue()
    if fix is not None:
        fix()
    if pulled is not None:
        pulled.join(120)  # the fault is over (a restart finished) before the retries
        assert not pulled.is_alive()
    assert _flush_until_empty(front, fix_wait), front.queue()
    # what the filter hop accepted it hands to the sink on its own time
    relay.filter.wait_queue_empty(120)
    ours = {f"{case}-{i}@fault.test" for i in range(n)}

    def all_at_sink() -> bool:
        got = {(parse_dump(p).header("Message-ID") or "").strip().strip("<>")
               for p in sink.messages() if p not in before}
        return ours <= got

    wait_for(all_at_sink, 60, 0.5)
    # -- count, per message, from the front's log and the sink's dumps --------
    log = front.maillog()[log_start:]
    mids = dict(re.findall(r"(\w+): message-id=<([^>]+)>", log))
    deferred = {mids.get(q) for q in re.findall(r"(\w+): to=<[^>]*>.*status=deferred", log)}
    sent_ok = {mids.get(q) for q in re.findall(r"(\w+): to=<[^>]*>.*status=sent", log)}
    deferred.discard(None)
    sent_ok.discard(None)
    seen: dict[str, int] = {}
    c = Counts(case, sent=n)
    for path in sink.messages():
        if path in before:
            continue
        msg = parse_dump(path)
        mid = (msg.header("Message-ID") or "").strip().strip("<>")
        if mid not in ours:
            continue
        seen[mid] = seen.get(mid, 0) + 1
        if any(msg.header(h) is None for h in required):
            c.unscanned += 1
        if msg.header("X-MilterMonkey-Unchecked") or "Unchecked" in (msg.header("X-Spam-Status")
                                                                     or ""):
            c.tagged += 1
    c.duplicates = sum(v - 1 for v in seen.values())
    c.first_try = len((ours & sent_ok) - deferred)
    c.tempfailed = len(ours & deferred)
    c.retried = len(ours & deferred & set(seen))
    c.lost = len(ours - set(seen))
    c.seconds = time.monotonic() - t0
    _report(c)
    return c


def check(c: Counts, expect_tempfails: bool | None = True) -> None:
    assert c.lost == 0, c
    assert c.unscanned == 0, c
    assert c.duplicates == 0, c
    assert c.first_try + c.retried == c.sent, c
    if expect_tempfails is True:
        assert c.tempfailed > 0, c  # the fault did bite
    elif expect_tempfails is False:
        assert c.tempfailed == 0, c


def _reload(m: MonkeyProcess, brains: list[dict[str, Any]]) -> None:
    before = m.log().count("reload done")
    render_brains_reload(m, brains)
    assert wait_for(lambda: m.log().count("reload done") > before, 20), m.output()[-3000:]


# ==========================================================================
# The faults
# ==========================================================================


def test_brain_raising(relay: Relay, tmp_path: Path) -> None:
    """A brain raises on a third of the mail; policy tempfail; fixed by a reload."""
    brains = [{"use": "fault", "when_subject": "boom"}, {"use": "stamp"}]
    with MonkeyProcess(tmp_path / "m", brains, unix=True) as m:
        relay.use(m)
        c = run_fault(relay, "raising", subjects=lambda i: "boom" if i % 3 == 0 else "calm",
                      trigger=None,
                      fix=lambda: _reload(m, [{"use": "fault", "when_subject": "never-matches"},
                                              {"use": "stamp"}]),
                      required=["X-Stamp", "X-Fault"])
        log = m.log()
        assert re.search(r"[0-9A-F]{6,}: brain fault failed in eom_process: RuntimeError", log)
    check(c)


def test_brain_hanging_past_the_mta_timeout(relay: Relay, tmp_path: Path) -> None:
    """A brain hangs far longer than Postfix's milter_content_timeout (3 s): progress
    keeps Postfix waiting, the brain's own timeout (5 s) applies its policy, then
    the circuit breaker answers at once; fixed by a reload."""
    brains = [{"use": "fault", "fault": "hang", "when_subject": "hang", "timeout": 5},
              {"use": "stamp"}]
    old = relay.filter.param("milter_content_timeout")
    filter_log = len(relay.filter.maillog())
    with MonkeyProcess(tmp_path / "m", brains, {"progress_interval": 1}, unix=True) as m:
        relay.use(m, milter_content_timeout="3s")
        try:
            c = run_fault(relay, "hanging",
                          subjects=lambda i: "hang" if i % 4 == 0 else "calm", trigger=None,
                          fix=lambda: _reload(m, [{"use": "fault", "when_subject": "never"},
                                                  {"use": "stamp"}]),
                          required=["X-Stamp"])
        finally:
            relay.filter.postconf(milter_content_timeout=old)
        log = m.log()
        assert "still running after its timeout of 5 s" in log
        # Postfix never hit its own 3 s timeout: the heartbeats kept it waiting
        filt = relay.filter.maillog()[filter_log:]
        assert "SMFIC_BODYEOB reply" not in filt and "timed out" not in filt, filt[-2000:]
    check(c)


def test_daemon_restarted_mid_load(relay: Relay, tmp_path: Path) -> None:
    """The libmilter worker is SIGKILLed (the supervisor restarts it), then the whole
    daemon is stopped and started again, both while mail flows (TCP socket)."""
    m = MonkeyProcess(tmp_path / "m", [{"use": "stamp"}], {"threads": 4})
    m.start()
    try:
        relay.use(m)

        def faults() -> None:
            m.wait_for_log("is serving")
            os.kill(worker_pid(m), signal.SIGKILL)
            wait_for(lambda: m.log().count("is serving") >= 2 and m._listening(), 20)
            time.sleep(0.3)
            m.stop()
            time.sleep(0.3)
            m.start()

        c = run_fault(relay, "restart", subjects=lambda i: "calm", trigger=faults, fix=None,
                      required=["X-Stamp"])
        assert "died unexpectedly (killed by SIGKILL)" in m.log()
    finally:
        m.stop()
    check(c, expect_tempfails=None)


def test_sighup_under_load(relay: Relay, tmp_path: Path) -> None:
    """Reload every 0.2 s while mail flows, bad configurations included: nothing is
    tempfailed, nothing is delivered without the stamp."""
    with MonkeyProcess(tmp_path / "m", [{"use": "stamp", "value": "v0"}], unix=True) as m:
        relay.use(m)
        stop = threading.Event()

        def reloads() -> None:
            i = 0
            while not stop.is_set():
                i += 1
                brains = ([{"use": "stamp", "valu": "broken"}] if i % 5 == 0 else
                          [{"use": "stamp", "value": f"v{i}"}])
                render_brains_reload(m, brains)
                time.sleep(0.2)

        try:
            # Each reload's check runs in a child process (a few tenths of a
            # second): enough messages that several reloads land mid-flow.
            c = run_fault(relay, "sighup", subjects=lambda i: "calm", trigger=reloads,
                          fix=stop.set, required=["X-Stamp"], n=3 * N)
        finally:
            stop.set()
        log = m.log()
        assert log.count("reload done") >= 3 and "reload refused" in log
    check(c, expect_tempfails=False)


def test_engine_killed_mid_load(relay: Relay, tmp_path: Path) -> None:
    """clamd and spamd are SIGKILLed while mail flows.  AV's policy is tempfail
    (the circuit breaker then answers at once); spam tags the mail unchecked.
    clamd is restarted, the deferred mail retried: every delivered message
    carries X-Virus-Status and X-Spam-Status."""
    require_or_skip(Clamd)
    require_or_skip(Spamd)
    pytest.importorskip("miltermonkey_av")
    pytest.importorskip("miltermonkey_spam")
    clamd = Clamd(tmp_path / "clamd", free_port())
    spamd = Spamd(tmp_path / "spamd", free_port(), max_children=3)
    clamd.start()
    spamd.start()
    try:
        brains = [{"use": "av", "clamd": [f"unix:{clamd.unix_socket}"], "scan_timeout": 10,
                   "clamd_cooldown": 1},
                  {"use": "spam", "servers": [f"127.0.0.1:{spamd.port}"], "scan_timeout": 8,
                   "cooldown": 1},
                  {"use": "stamp"}]
        with MonkeyProcess(tmp_path / "m", brains, {"threads": 4}, unix=True) as m:
            relay.use(m)
            before = len(relay.sink.messages())

            def kill_engines() -> None:
                # once some mail got through both engines
                wait_for(lambda: len(relay.sink.messages()) >= before + N // 6, 60)
                clamd.kill()
                spamd.kill()

            def restart_clamd() -> None:
                clamd.start()

            c = run_fault(relay, "engines", subjects=lambda i: "calm", trigger=kill_engines,
                          fix=restart_clamd,
                          required=["X-Virus-Status", "X-Spam-Status", "X-Stamp"],
                          fix_wait=120)
            log = m.log()
            assert "brain av failed in eom_process" in log
            assert "policy tempfail" in log
    finally:
        clamd.stop()
        spamd.stop()
    check(c)
    assert c.tagged > 0  # spam's own policy: delivered, marked unchecked


@pytest.mark.parametrize("default_action", ["tempfail", "accept"])
def test_mta_policy_lets_postfix_decide(relay: Relay, tmp_path: Path,
                                        default_action: str) -> None:
    """Policy ``mta``: the milter drops the connection and Postfix applies its own
    milter_default_action, whatever the admin set there."""
    m = MonkeyProcess(tmp_path / "m", [{"use": "fault", "when_subject": "explode"},
                                       {"use": "stamp"}], unix=True)
    start_with_overrides(m, {"fault": {"on_error": "mta"}})
    try:
        m.wait_for_log("is serving")
        relay.use(m, milter_default_action=default_action)
        raw = _message("mta", 0, f"explode {default_action}")
        res = send_mail(relay.filter.smtp_port, raw, "a@example.test", ["b@example.test"])
        m.wait_for_log("dropping the milter connection")
        if default_action == "tempfail":
            assert res.code == 451 and "4.7.1" in res.text, res
        else:
            assert res.ok, res
            dump = relay.sink.wait_for_text(f"explode {default_action}".encode(), timeout=30)
            assert parse_dump(dump).header("X-Stamp") is None  # the admin chose to skip it
        calm = send_mail(relay.filter.smtp_port, _message("mta", 1, f"calm {default_action}"),
                         "a@example.test", ["b@example.test"])
        assert calm.ok, calm
        dump = relay.sink.wait_for_text(f"calm {default_action}".encode(), timeout=30)
        assert parse_dump(dump).header("X-Stamp") == "stamp:stamped"
    finally:
        m.stop()
        relay.filter.postconf(milter_default_action="tempfail")
