"""The metrics endpoint, health checks and ``miltermonkey status``, on a real daemon.

Every test here starts the daemon as production does (supervisor and
worker), sends real milter sessions over its socket and reads its HTTP
endpoint over a real TCP connection.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from miltermonkey_core.cli.status import quantile
from miltermonkey_core.server.metrics import key_reason, skip_reason
from miltermonkey_core.testing.client import MessageSpec, SessionResult, run_session
from miltermonkey_core.testing.daemon import MonkeyProcess
from miltermonkey_core.testing.process import free_port

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def scrape(port: int) -> Samples:
    status, text = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200, text
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def send(m: MonkeyProcess, qid: str, body: bytes = b"hello\r\n",
         subject: str = "metrics") -> SessionResult:
    raw = f"From: a@example.test\r\nSubject: {subject}\r\n\r\n".encode() + body
    return run_session(m.address, [MessageSpec(raw, "<a@example.test>", ["<b@example.test>"],
                                               queue_id=qid)])[0]


def worker_pid(m: MonkeyProcess) -> int:
    pids = re.findall(r"started worker pid (\d+)", m.log())
    return int(pids[-1])


BRAINS = [{"use": "gate"},
          {"use": "gate", "name": "gate-eval", "mode": "evaluate", "reject_body": "hello"},
          {"use": "trivial"}]


@pytest.fixture
def monkey(tmp_path: Path):
    port = free_port()
    with MonkeyProcess(tmp_path, BRAINS, {"metrics": f"127.0.0.1:{port}"}) as m:
        m.metrics_port = port  # type: ignore[attr-defined]
        yield m


def test_counters_match_the_messages_the_daemon_judged(monkey: MonkeyProcess) -> None:
    port = monkey.metrics_port  # type: ignore[attr-defined]
    before = scrape(port)
    results = [send(monkey, f"MET{i}", b"REJECT-ME\r\n" if i % 4 == 0 else b"hello\r\n")
               for i in range(12)]
    rejected = sum(r.rejected for r in results)
    accepted = sum(r.accepted for r in results)
    assert (accepted, rejected) == (9, 3)
    after = scrape(port)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("miltermonkey_messages_total", verdict="accept") == accepted
    assert grew("miltermonkey_messages_total", verdict="reject") == rejected
    assert grew("miltermonkey_sessions_total") == 12
    assert grew("miltermonkey_brain_calls_total", brain="gate") == 12
    assert grew("miltermonkey_brain_verdicts_total", brain="gate", verdict="reject") == 3
    assert grew("miltermonkey_brain_verdicts_total", brain="gate", verdict="continue") == 9
    # the brain in evaluation mode ran on the 9 messages gate let through, would have
    # rejected each (its reject_body is in them), and none of that was applied
    assert grew("miltermonkey_brain_evaluation_verdicts_total", brain="gate-eval",
                verdict="reject") == 9
    assert grew("miltermonkey_brain_verdicts_total", brain="gate-eval", verdict="reject") == 0
    assert grew("miltermonkey_brain_calls_total", brain="trivial") == 9
    assert grew("miltermonkey_brain_duration_seconds_count", brain="trivial") == 9
    assert grew("miltermonkey_message_bytes_total") == 9 * len(b"hello\r\n") + 3 * len(
        b"REJECT-ME\r\n")
    assert value(after, "miltermonkey_brain_breaker_state", brain="gate", state="closed") == 1
    assert value(after, "miltermonkey_ready") == 1
    assert value(after, "miltermonkey_worker_up") == 1
    assert value(after, "miltermonkey_config_generation") == 1
    assert value(after, "miltermonkey_connections_accepted_total") >= 12
    # labels are bounded: no queue id, no address anywhere in the exposition
    labels = {v for (_, ls) in after for _, v in ls}
    assert not any("MET" in v or "example.test" in v for v in labels), labels
    assert get(f"http://127.0.0.1:{port}/healthz") == (200, "ok\n")
    assert get(f"http://127.0.0.1:{port}/readyz") == (200, "ready\n")


def test_the_endpoint_answers_through_a_reload_and_a_killed_worker(monkey: MonkeyProcess
                                                                     ) -> None:
    port = monkey.metrics_port  # type: ignore[attr-defined]
    for i in range(3):
        assert send(monkey, f"RLD{i}").accepted
    errors: list[str] = []
    codes: list[int] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                codes.append(get(f"http://127.0.0.1:{port}/metrics", timeout=3)[0])
            except OSError as e:
                errors.append(str(e))
            time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        monkey.signal(signal.SIGHUP)
        monkey.wait_for_log("reload done", timeout=20)
        reloaded = scrape(port)
        assert value(reloaded, "miltermonkey_reloads_total", result="ok") == 1
        assert value(reloaded, "miltermonkey_last_reload_success") == 1
        assert value(reloaded, "miltermonkey_config_generation") == 2
        # counters live in the worker, not in a generation: a reload keeps them
        assert value(reloaded, "miltermonkey_messages_total", verdict="accept") == 3
        old = worker_pid(monkey)
        subprocess.run(["kill", "-KILL", str(old)], check=True)
        end = time.monotonic() + 20
        while time.monotonic() < end and worker_pid(monkey) == old:
            time.sleep(0.05)
        monkey.wait_for_log(f"worker pid {worker_pid(monkey)} is serving", timeout=20)
    finally:
        stop.set()
        poller.join()
    assert not errors, errors
    assert codes and set(codes) == {200}, codes
    after = scrape(port)
    assert value(after, "miltermonkey_worker_restarts_total") == 1
    assert value(after, "miltermonkey_worker_up") == 1
    # a new worker counts from zero (Prometheus takes counter resets in its stride)
    assert value(after, "miltermonkey_messages_total", verdict="accept") == 0
    assert send(monkey, "RLD9").accepted
    assert value(scrape(port), "miltermonkey_messages_total", verdict="accept") == 1
    assert get(f"http://127.0.0.1:{port}/readyz")[0] == 200


def test_sigterm_turns_readyz_off_while_the_listener_drains(tmp_path: Path) -> None:
    port = free_port()
    m = MonkeyProcess(tmp_path, [{"use": "trivial"}],
                      {"metrics": f"127.0.0.1:{port}", "drain_period": 5.0}).start()
    try:
        assert get(f"http://127.0.0.1:{port}/readyz")[0] == 200
        t0 = time.monotonic()
        m.signal(signal.SIGTERM)
        end = t0 + 3.0  # a loaded box may take a while to run the signal handler
        status, text = get(f"http://127.0.0.1:{port}/readyz")
        while status == 200 and time.monotonic() < end:
            status, text = get(f"http://127.0.0.1:{port}/readyz")
        assert status == 404 and "draining" in text, text
        # the balancer has stopped sending, but whoever still connects is served
        assert send(m, "DRAIN1").accepted
        assert value(scrape(port), "miltermonkey_draining") == 1
        served = time.monotonic() - t0
        assert m.proc is not None
        assert m.proc.wait(20) == 0
        # Served inside the drain period, and the daemon waited it out before exiting.
        assert served < 5.0 <= time.monotonic() - t0
    finally:
        m.stop()
    assert "keeps serving for the drain period" in m.log()


def test_a_refusing_brain_with_an_open_breaker_makes_the_host_not_ready(tmp_path: Path
                                                                         ) -> None:
    """av (on_error tempfail) with no clamd opens its breaker: not ready; the same
    brain with on_error accept lets mail through and keeps the host ready."""
    port, dead = free_port(), free_port()
    brains = [{"use": "av", "name": "lenient", "clamd": [f"127.0.0.1:{dead}"],
               "on_error": "accept", "breaker_failures": 1, "breaker_cooldown": 600},
              {"use": "av", "clamd": [f"127.0.0.1:{dead}"], "on_error": "tempfail",
               "breaker_failures": 2, "breaker_cooldown": 600}]
    with MonkeyProcess(tmp_path, brains, {"metrics": f"127.0.0.1:{port}"}) as m:
        assert get(f"http://127.0.0.1:{port}/readyz")[0] == 200
        first = send(m, "BRK1")
        assert first.tempfailed
        assert get(f"http://127.0.0.1:{port}/readyz")[0] == 200  # lenient's breaker is open
        assert send(m, "BRK2").tempfailed
        status, text = get(f"http://127.0.0.1:{port}/readyz")
        assert status == 503, text
        assert "brain av: circuit breaker open" in text and "lenient" not in text
        s = scrape(port)
        assert value(s, "miltermonkey_ready") == 0
        assert value(s, "miltermonkey_brain_breaker_state", brain="av", state="open") == 1
        assert value(s, "miltermonkey_brain_breaker_state", brain="lenient", state="open") == 1
        assert value(s, "miltermonkey_brain_errors_total", brain="av") == 2
        assert value(s, "miltermonkey_messages_total", verdict="tempfail") == 2
        status_run = subprocess.run(
            [sys.executable, "-m", "miltermonkey_core", "status", "-c", str(m.config_path)],
            capture_output=True, check=False, text=True, timeout=30)
    assert status_run.returncode == 3, status_run.stderr
    assert "NOT READY: brain av: circuit breaker open" in status_run.stdout


def test_status_prints_the_daemon_at_a_glance(monkey: MonkeyProcess) -> None:
    for i in range(8):
        send(monkey, f"ST{i}", b"REJECT-ME\r\n" if i == 0 else b"hello\r\n")
    monkey.signal(signal.SIGHUP)
    monkey.wait_for_log("reload done", timeout=20)
    run = subprocess.run(
        [sys.executable, "-m", "miltermonkey_core", "status", "-c", str(monkey.config_path)],
        capture_output=True, check=False, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    print(out)
    assert re.search(r"^MilterMonkey \S+ at http://127\.0\.0\.1:\d+: ready$", out, re.M)
    assert "configuration generation 2" in out
    assert re.search(r"Reloads: 1 applied, 0 refused; last applied at ", out)
    assert "Messages: 8: accept 7 (87.5%), reject 1 (12.5%)" in out
    rows = {ln.split()[0]: ln.split() for ln in out.splitlines()
            if ln.startswith(("gate", "trivial"))}
    head = next(ln.split() for ln in out.splitlines() if ln.startswith("BRAIN"))
    assert head == ["BRAIN", "CALLS", "PASS", "REJECT", "TEMPFAIL", "DISCARD", "CACHED",
                    "SKIPPED", "ERRORS", "TIMEOUTS", "OPEN", "P50", "P99", "BREAKER"]
    assert rows["gate"][1:4] == ["8", "7", "1"] and rows["gate"][-1] == "closed"
    assert rows["gate-eval"][:5] == ["gate-eval", "(eval)", "7", "0", "7"]
    assert rows["trivial"][1:3] == ["7", "7"]
    assert all(re.fullmatch(r"[\d.]+(ms|s)", cell) for cell in rows["trivial"][-3:-1])


def test_status_explains_a_daemon_without_metrics(tmp_path: Path) -> None:
    cfg = tmp_path / "mm.toml"
    cfg.write_text("[miltermonkey]\nmilter_key = false\n[[brain]]\nuse = \"trivial\"\n")
    run = subprocess.run([sys.executable, "-m", "miltermonkey_core", "status", "-c", str(cfg)],
                         capture_output=True, check=False, text=True, timeout=30)
    assert run.returncode == 1
    assert "metrics endpoint is off" in run.stderr
    dead = free_port()
    run = subprocess.run([sys.executable, "-m", "miltermonkey_core", "status", "--url",
                          f"127.0.0.1:{dead}"], capture_output=True, check=False, text=True,
                         timeout=30)
    assert run.returncode == 1
    assert f"cannot read http://127.0.0.1:{dead}/metrics" in run.stderr


def test_a_metrics_address_in_use_stops_the_start_with_the_option_named(tmp_path: Path
                                                                         ) -> None:
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        m = MonkeyProcess(tmp_path, [{"use": "trivial"}], {"metrics": f"127.0.0.1:{busy}"})
        with pytest.raises(RuntimeError) as e:
            m.start(timeout=15)
    assert f"metrics '127.0.0.1:{busy}': cannot listen" in str(e.value)
    assert not (tmp_path / "monkey.pid").exists()


# --- the arithmetic behind the numbers (unit tests of single functions) ---------------------


def test_quantiles_interpolate_inside_the_bucket_like_prometheus() -> None:
    buckets = {"0.1": 50.0, "0.2": 90.0, "0.4": 100.0, "+Inf": 100.0}
    assert quantile(0.5, buckets) == pytest.approx(0.1)
    assert quantile(0.7, buckets) == pytest.approx(0.15)
    assert quantile(0.99, buckets) == pytest.approx(0.38)
    assert quantile(0.5, {"0.1": 0.0, "+Inf": 0.0}) is None
    assert quantile(0.99, {"0.1": 1.0, "+Inf": 10.0}) == pytest.approx(0.1)  # above the last


@pytest.mark.parametrize(("detail", "label"), [
    ("declined", "declined"), ("key", "key"), ("error", "error"),
    ("condition:networks", "condition:networks"),
    ("condition:" + "x" * 200, "other"), ("virus Eicar-Test-Signature", "other"),
    ("condition:from 192.0.2.1", "other"),
])
def test_skip_reasons_become_bounded_labels(detail: str, label: str) -> None:
    assert skip_reason(detail) == label


def test_key_reasons_become_bounded_labels() -> None:
    assert key_reason("bad MAC") == "bad_mac"
    assert key_reason("expired at 2026-01-01 (host mx1.example.test)") == "expired"
    assert key_reason("something new") == "other"


def test_a_verdict_replayed_from_the_scan_cache_counts_as_the_brains_verdict() -> None:
    from miltermonkey_core.contract.verdict import Action
    from miltermonkey_core.engine.chain import BrainResult
    from miltermonkey_core.engine.session import Decision
    from miltermonkey_core.server.metrics import WorkerMetrics

    metrics = WorkerMetrics()

    class NoMessage:
        message = None

    decision = Decision(None, None, [  # type: ignore[arg-type]
        BrainResult("av", "cached", Action.CONTINUE, detail="age 3 s"),
        BrainResult("spam", "ran", Action.CONTINUE, 0.2),
        BrainResult("late", "something new")], 0.25)
    metrics.message_done(NoMessage(), decision)  # type: ignore[arg-type]
    snap = metrics.snapshot()
    assert ["av", "cached", 1] in snap["brain_outcomes"]
    assert ["av", "continue", 1] in snap["brain_verdicts"]
    assert "av" not in snap["brain_latency"]  # no call, no time
    assert ["late", "other", 1] in snap["brain_outcomes"]
    assert snap["messages"] == {"accept": 1}
