"""Fleet drills: three monkey hosts in network namespaces behind HAProxy, one Redis, real Postfix.

Run with ``nox -s fleet`` (as root): it sets ``MILTERMONKEY_FLEET=1``, and
the figures each drill prints (``FLEET ...`` lines, and the JSON report
named by ``MILTERMONKEY_FLEET_REPORT``) are the ones docs/deployment.md
quotes.  The harness is :mod:`fleet_kit`; the network is
:mod:`miltermonkey_core.testing.netns`, torn down even when a drill fails.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fleet_kit import (
    Fleet,
    LoadRun,
    account,
    av_brain,
    deliveries,
    message,
    metric,
    send_load,
)
from miltermonkey_av.testing.engine import Clamd

from miltermonkey_core.engine.cache import CachedResult, cache_key
from miltermonkey_core.engine.cache_redis import PREFIX, RedisCache
from miltermonkey_core.milterkey import generate_secret_file
from miltermonkey_core.testing.haproxy import HAProxy
from miltermonkey_core.testing.part import StackPart, require_or_skip
from miltermonkey_core.testing.postfix import Postfix
from miltermonkey_core.testing.process import binary, is_root, wait_until
from miltermonkey_core.testing.redis import Redis
from miltermonkey_core.testing.sink import SmtpSink

pytestmark = pytest.mark.skipif(os.environ.get("MILTERMONKEY_FLEET") != "1",
                                reason="the fleet drills run in nox -s fleet")

MESSAGES = int(os.environ.get("MILTERMONKEY_FLEET_MESSAGES", "2000"))
#: New messages per second in the fault drills: a steady stream that outlasts the
#: faults and their recoveries (each takes seconds), well below the fleet's limit.
RATE = float(os.environ.get("MILTERMONKEY_FLEET_RATE", "40"))
REPORT: dict[str, Any] = {}


def _report(name: str, figures: dict[str, Any]) -> None:
    REPORT[name] = figures
    print(f"\nFLEET {name}: {json.dumps(figures, sort_keys=True)}")
    path = os.environ.get("MILTERMONKEY_FLEET_REPORT")
    if path:
        Path(path).write_text(json.dumps(REPORT, indent=2, sort_keys=True) + "\n")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    part: type[StackPart]
    for part in (HAProxy, Clamd, Postfix, Redis, SmtpSink):
        require_or_skip(part)
    if not is_root():
        pytest.skip("network namespaces need root")
    f = Fleet(tmp_path_factory.mktemp("fleet")).start(lambda fl: [av_brain(fl.clamd)])
    try:
        yield f
    finally:
        f.close()
        left = f.net.leftovers()
        assert not left, f"namespaces or links left behind: {left}"


@pytest.fixture(autouse=True)
def _all_hosts_serving(fleet: Fleet) -> None:
    """Each drill starts with every host up and in rotation, Redis up."""
    for name, host in fleet.hosts.items():
        if not host.alive():
            host.start()
        fleet.balancer.set_state(name, "ready")
    if not fleet.redis.is_running():
        fleet.redis.start()
    fleet.balancer.wait_all_up(30)


def mix(run: str, count: int, eicar_every: int = 20, start: int = 0
        ) -> list[tuple[int, str, bytes]]:
    """*count* messages, every *eicar_every*-th carrying EICAR."""
    out = []
    for seq in range(start, start + count):
        kind = "eicar" if seq % eicar_every == 7 else "clean"
        out.append((seq, kind, message(run, seq, kind)))
    return out


class FaultScript(threading.Thread):
    """Runs fault steps while the load runs, each once the load has reached its share."""

    def __init__(self, total: int, steps: list[tuple[float, str, Callable[[], dict[str, Any]]]]
                 ) -> None:
        super().__init__(daemon=True)
        self.total = total
        self.steps = steps
        self.progress = 0
        self.done_at: list[tuple[str, int, dict[str, Any]]] = []
        self.error: BaseException | None = None

    def on_progress(self, done: int) -> None:
        self.progress = done

    def run(self) -> None:
        try:
            for share, name, step in self.steps:
                wait_until(lambda s=share: self.progress >= s * self.total, 600, 0.02)  # type: ignore[misc]
                at = self.progress
                t0 = time.monotonic()
                figures = step()
                self.done_at.append((name, at, {**figures, "_window": (t0, time.monotonic())}))
        except BaseException as e:  # reported by the test
            self.error = e


# ------------------------------------------------------------------------------------------


def test_network_is_the_tests_own(fleet: Fleet) -> None:
    """No default route in any host; the hosts' addresses exist only on the test's bridge."""
    for name, host in fleet.net.hosts.items():
        routes = fleet.net.routes(name)
        assert "default" not in routes, routes
        assert [line.strip() for line in routes.strip().splitlines()] == [
            f"{fleet.net.subnet} dev eth0 proto kernel scope link src {host.address}"], routes
    ours = subprocess.run([binary("ip"), "-4", "-o", "addr", "show"], capture_output=True,
                          text=True, check=True).stdout
    lines = [line for line in ours.splitlines() if str(fleet.net.subnet.network_address)[:-1]
             in line]
    assert len(lines) == 1 and fleet.net.bridge in lines[0], lines


def test_faults_under_load(fleet: Fleet) -> None:
    """2,000 messages (EICAR mixed in): one host SIGKILLed, one cut off, one drained."""
    run = "faults"
    items = mix(run, MESSAGES)
    hap = fleet.balancer

    def kill_h1() -> dict[str, Any]:
        t0 = time.monotonic()
        fleet["h1"].kill()
        down = hap.wait_status("h1", "DOWN", 30)
        fleet["h1"].start()
        hap.wait_status("h1", "UP", 30)
        return {"marked_down_s": round(down, 2), "back_up_s": round(time.monotonic() - t0, 1)}

    def cut_h2() -> dict[str, Any]:
        t0 = time.monotonic()
        fleet.net.link_down("h2")
        down = hap.wait_status("h2", "DOWN", 30)
        time.sleep(2)
        fleet.net.link_up("h2")
        hap.wait_status("h2", "UP", 30)
        return {"marked_down_s": round(down, 2), "back_up_s": round(time.monotonic() - t0, 1)}

    def drain_h3() -> dict[str, Any]:
        t0 = time.monotonic()
        fleet["h3"].terminate()
        # /readyz answers 404 while draining: NOLB (no new sessions, open ones go on).
        down = hap.wait_status("h3", "NOLB", 30)
        status = fleet["h3"].wait_exit(60)
        exited = time.monotonic() - t0
        fleet["h3"].start()
        hap.wait_status("h3", "UP", 30)
        return {"marked_down_s": round(down, 2), "exited_s": round(exited, 1),
                "exit_status": status, "back_up_s": round(time.monotonic() - t0, 1)}

    script = FaultScript(len(items), [(0.15, "SIGKILL h1", kill_h1),
                                      (0.40, "link cut h2", cut_h2),
                                      (0.65, "SIGTERM drain h3", drain_h3)])
    script.start()
    load = send_load(fleet.mta.smtp_port, run, items, threads=8, rate=RATE,
                     on_progress=script.on_progress)
    script.join(120)
    assert script.error is None, script.error
    acc = account(fleet, load)
    attempts = [a for o in load.outcomes.values() for a in o.attempts
                if not 200 <= a.code < 300 and a.code < 500]
    faults = {}
    for name, at, fig in script.done_at:
        start, end = fig.pop("_window")
        # A tempfail belongs to the fault whose window (injection to back in
        # rotation, plus the session timeouts' reach) it falls in.
        during = sum(1 for a in attempts if start <= a.at <= end + 2)
        faults[name] = {"at_message": at, **fig, "tempfailed_attempts": during}
    _report("faults", {**acc.line_figures(), "faults": faults,
                       "haproxy": {n: s.status for n, s in hap.servers().items()}})
    assert [name for name, _, _ in script.done_at] == ["SIGKILL h1", "link cut h2",
                                                      "SIGTERM drain h3"]
    assert all(at < len(items) for _, at, _ in script.done_at), "a fault came after the load"
    assert acc.lost == 0, acc.problems
    assert acc.unscanned == 0, acc.problems
    assert acc.duplicates == 0, acc.problems
    assert acc.eicar_refused == acc.eicar_sent and acc.eicar_delivered == 0
    assert acc.delivered == acc.accepted == acc.sent - acc.eicar_sent
    assert acc.retried_messages > 0, "no fault was felt: the drill proved nothing"


def test_redis_outage_under_load(fleet: Fleet) -> None:
    """Redis stopped mid-run and started again: scanning goes on, no error at the client."""
    run = "redis-outage"
    items = mix(run, max(300, MESSAGES // 4))

    def stop_redis() -> dict[str, Any]:
        fleet.redis.stop()
        return {}

    def start_redis() -> dict[str, Any]:
        fleet.redis.start()
        return {}

    script = FaultScript(len(items), [(0.25, "Redis stopped", stop_redis),
                                      (0.70, "Redis started (empty)", start_redis)])
    before = {n: h.log().count("scan cache") for n, h in fleet.hosts.items()}
    script.start()
    load = send_load(fleet.mta.smtp_port, run, items, threads=8, rate=RATE,
                     on_progress=script.on_progress)
    script.join(60)
    assert script.error is None, script.error
    acc = account(fleet, load)
    warned = {n: h.log().count("scan cache") - before[n] for n, h in fleet.hosts.items()}
    _report("redis_outage", {**acc.line_figures(), "client_errors": acc.tempfailed_attempts,
                             "cache_warnings_per_host": warned})
    assert [name for name, _, _ in script.done_at] == ["Redis stopped", "Redis started (empty)"]
    assert acc.tempfailed_attempts == 0, acc.problems
    assert acc.lost == 0 and acc.unscanned == 0, acc.problems
    assert acc.eicar_refused == acc.eicar_sent and acc.eicar_delivered == 0
    assert any(warned.values()), "no host noticed the outage: was Redis in use?"


def _only(fleet: Fleet, name: str) -> None:
    """Route every new session to host *name*: the others go to maintenance."""
    for other in fleet.hosts:
        fleet.balancer.set_state(other, "ready" if other == name else "maint")
    fleet.balancer.wait_status(name, "UP", 30)


def test_cache_across_hosts_and_signature_change(fleet: Fleet) -> None:
    """Scanned on h1, answered from Redis on h2; a new signature makes it scanned again."""
    run = "cache"
    marker = f"FLEET-NEW-SIGNATURE-{random.randrange(10**9):09d}".encode()
    body = b"A message that repeats itself: a retry, a second MX, a list.\n" * 30 + marker + b"\n"
    raw = message(run, 1, body=body)
    _only(fleet, "h1")
    first = send_load(fleet.mta.smtp_port, run, [(1, "clean", raw)], threads=1)
    assert first.accepted(), first.outcomes
    h1_log = fleet["h1"].log()
    qid1 = deliveries_qid(fleet, run, 1)
    assert f"{qid1}: clean (" in h1_log
    _only(fleet, "h2")
    m_before = fleet["h2"].metrics()
    again = send_load(fleet.mta.smtp_port, run + "-again",
                      [(2, "clean", raw.replace(b"X-Fleet-Run: cache", b"X-Fleet-Run: cache-again")
                        .replace(b"X-Fleet-Seq: 1", b"X-Fleet-Seq: 2"))], threads=1)
    assert again.accepted(), again.outcomes
    fleet.mta.wait_queue_empty(30)
    qid2 = deliveries_qid(fleet, run + "-again", 2)
    m_after = fleet["h2"].metrics()
    h2_log = fleet["h2"].log()
    replay_line = next((ln for ln in h2_log.splitlines()
                        if f"{qid2}: brain av: cached result replayed" in ln), None)
    calls = (metric(m_after, "miltermonkey_brain_calls_total", brain="av")
             - metric(m_before, "miltermonkey_brain_calls_total", brain="av"))
    results = {lab: v - m_before.get((n, lab), 0.0) for (n, lab), v in m_after.items()
               if n == "miltermonkey_brain_results_total" and ("brain", "av") in lab}
    delivered = deliveries(fleet.sink, run + "-again")[2][0].message
    # Then a signature database change: the same content is scanned again, and caught.
    fleet.add_signature("fleet-new.ndb", "Fleet.Test.NewSignature", marker)
    third = send_load(fleet.mta.smtp_port, run + "-third",
                      [(3, "clean", raw.replace(b"X-Fleet-Run: cache", b"X-Fleet-Run: cache-3")
                        .replace(b"X-Fleet-Seq: 1", b"X-Fleet-Seq: 3"))], threads=1)
    final = third.outcomes[3].final
    _report("cache_across_hosts", {
        "scanned_on": "h1", "qid_h1": qid1, "replayed_on": "h2", "qid_h2": qid2,
        "h2_log": replay_line, "h2_av_calls_delta": calls,
        "h2_av_results_delta": {dict(lab)["outcome"]: v for lab, v in results.items() if v},
        "delivered_X-Virus-Scanned": delivered.header("X-Virus-Scanned"),
        "after_signature_change": str(final)})
    assert replay_line is not None, h2_log[-3000:]
    assert calls == 0, "h2 called clamd for a message Redis had the answer to"
    assert sum(results.values()) == 1
    assert (delivered.header("X-Virus-Scanned") or "").endswith("on h1.fleet.test")
    assert final is not None and final.code // 100 == 5 and "NewSignature" in final.text, final


def deliveries_qid(fleet: Fleet, run: str, seq: int) -> str:
    fleet.mta.wait_queue_empty(30)
    wait_until(lambda: seq in deliveries(fleet.sink, run), 15, 0.1)
    return deliveries(fleet.sink, run)[seq][0].qid


# ------------------------------------------------------------------------------------------
# Key rotation under load.
# ------------------------------------------------------------------------------------------

_MAC = re.compile(rb"mac=([A-Za-z0-9_-]+)")


def _forge(raw: bytes, how: str, rnd: random.Random) -> bytes:
    if how == "bad-mac":
        def swap(m: re.Match[bytes]) -> bytes:
            alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
            return b"mac=" + bytes(rnd.choice(alphabet) for _ in m.group(1))
        return _MAC.sub(swap, raw, count=1)
    return re.sub(rb"id=k\d+;", b"id=k9;", raw, count=1)  # a key id nobody holds


def _relabel(raw: bytes, run: str, seq: int, kind: str) -> bytes:
    raw = re.sub(rb"(?m)^X-Fleet-Run: .*$", f"X-Fleet-Run: {run}".encode(), raw, count=1)
    raw = re.sub(rb"(?m)^X-Fleet-Seq: .*$", f"X-Fleet-Seq: {seq}".encode(), raw, count=1)
    return re.sub(rb"(?m)^X-Fleet-Kind: .*$", f"X-Fleet-Kind: {kind}".encode(), raw, count=1)


def test_key_rotation_under_load(fleet: Fleet, tmp_path: Path) -> None:
    """A new key id rolled out host by host with SIGHUP, then made the signing key, under load.

    The load mixes fresh mail, mail carrying a fleet key (what one host
    signed, sent again: a second hop, a retry) and mail with forged keys (a
    MAC made without the secret, a key id nobody holds).  Every fleet key
    must be trusted by whichever host gets it, at every step; no forged one
    ever.
    """
    run = "rotation"
    seed = send_load(fleet.mta.smtp_port, run + "-seed", mix(run + "-seed", 60, eicar_every=1000),
                     threads=8)
    fleet.mta.wait_queue_empty(60)
    wait_until(lambda: len(deliveries(fleet.sink, run + "-seed")) >= len(seed.accepted()), 15)
    keyed = [d[0].message.message for d in deliveries(fleet.sink, run + "-seed").values()]
    lock = threading.Lock()
    stop = threading.Event()
    rnd = random.Random(17)
    loads: list[LoadRun] = []
    kinds: dict[int, str] = {}

    def generate() -> None:
        seq = 0
        while not stop.is_set():
            batch = []
            for _ in range(40):
                seq += 1
                pick = seq % 4
                if pick == 0:
                    kind, raw = "fresh", message(run, seq)
                elif pick in (1, 2):
                    with lock:
                        source = rnd.choice(keyed)
                    kind, raw = "keyed", _relabel(source, run, seq, "keyed")
                else:
                    how = "bad-mac" if seq % 8 == 3 else "unknown-id"
                    kind = f"forged-{how}"
                    raw = _forge(_relabel(rnd.choice(keyed), run, seq, kind), how, rnd)
                kinds[seq] = kind
                batch.append((seq, kind, raw))
            loads.append(send_load(fleet.mta.smtp_port, run, batch, threads=6))
            # What the fleet signs now is keyed mail for the next batches.
            fleet.mta.wait_queue_empty(60)
            got = deliveries(fleet.sink, run)
            with lock:
                keyed.extend(d[0].message.message for s, d in got.items()
                             if kinds.get(s) == "fresh" and s > seq - 40)

    sender = threading.Thread(target=generate, daemon=True)
    sender.start()
    shared = tmp_path / "miltersecret"
    shared.write_bytes(fleet["h1"].secret_path.read_bytes())
    shared.chmod(0o600)
    generate_secret_file(shared, key_id="k2")  # appended: k1 still signs
    steps = []
    time.sleep(3)
    for name, host in fleet.hosts.items():  # 1: every host learns k2, one by one
        host.secret_path.write_bytes(shared.read_bytes())
        host.reload()
        steps.append(f"{name}: k2 added")
        time.sleep(2)
    for name, host in fleet.hosts.items():  # 2: k2 signs, one by one
        host.write_config(key_id="k2")
        host.reload()
        steps.append(f"{name}: k2 signs")
        time.sleep(2)
    time.sleep(3)
    stop.set()
    sender.join(180)
    assert not sender.is_alive()
    logs = fleet.logs()
    trusted = set(re.findall(r"([0-9A-F]{6,}): trusted milter key: skipping", logs))
    refused: dict[str, str] = dict(re.findall(
        r"([0-9A-F]{6,}): removed untrusted milter key \S+ #\d+: ([A-Za-z ]+)", logs))
    signed = dict(re.findall(r"([0-9A-F]{6,}): milter key (k\d) added", logs))
    got = deliveries(fleet.sink, run)
    tally: dict[str, dict[str, int]] = {}
    wrong: list[str] = []
    for seq, kind in kinds.items():
        for d in got.get(seq, []):
            verdict = ("trusted" if d.qid in trusted else
                       f"refused: {refused[d.qid]}" if d.qid in refused else "no key seen")
            bucket = tally.setdefault(kind, {})
            bucket[verdict] = bucket.get(verdict, 0) + 1
            should_trust = kind == "keyed"
            if should_trust != (verdict == "trusted"):
                wrong.append(f"{kind} seq {seq} qid {d.qid}: {verdict}")
    sent = sum(ld.sent for ld in loads)
    lost = sum(len(ld.accepted()) for ld in loads) - sum(
        1 for s in kinds if s in got)
    bad_cache = logs.count("has a bad signature")
    _report("key_rotation", {
        "messages": sent, "by_kind_and_outcome": tally, "steps": steps,
        "signing_key_of_delivered": {k: sum(1 for ds in got.values() for d in ds
                                            if signed.get(d.qid) == k) for k in ("k1", "k2")},
        "should_trust_but_refused": sum(1 for w in wrong if w.startswith("keyed")),
        "trusted_but_should_not": sum(1 for w in wrong if w.startswith("forged")),
        "tempfailed_attempts": sum(ld.tempfailed_attempts for ld in loads),
        "lost": lost, "cache_entries_refused_as_bad_signature": bad_cache})
    assert not wrong, wrong[:20]
    assert lost == 0
    assert tally.get("keyed") and tally.get("forged-bad-mac") and tally.get("forged-unknown-id")
    assert list(signed.values()).count("k2") > 0, "k2 never signed"


# ------------------------------------------------------------------------------------------
# Capacity with the trivial brain.
# ------------------------------------------------------------------------------------------


def _smtp_source(port: int, count: int, sessions: int = 10, size: int = 2048) -> float:
    """smtp-source (Postfix's C load generator): one message per session; seconds taken."""
    t0 = time.monotonic()
    subprocess.run([binary("smtp-source"), "-A", "-s", str(sessions), "-m", str(count),
                    "-l", str(size), "-f", "sender@client.test", "-t", "rcpt@dest.test",
                    f"127.0.0.1:{port}"], check=True, capture_output=True, timeout=600)
    return time.monotonic() - t0


def _cpu_seconds(pid: int | None) -> float:
    """User and system CPU of process *pid* so far."""
    assert pid is not None
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_capacity_one_two_three_hosts(fleet: Fleet) -> None:
    """msg/s through HAProxy with 1, 2 and 3 hosts on the trivial brain, same run."""
    for host in fleet.hosts.values():
        host.set_brains([{"use": "trivial"}])
        host.reload()
    try:
        count = max(500, MESSAGES // 2)
        figures: dict[str, list[float]] = {}
        balancer_ms: list[float] = []
        direct = f"inet:{fleet['h1'].host.address}:8890"
        rounds = 2
        for _ in range(rounds):
            for label, spec, hosts in (("direct to h1 (no balancer)", direct, ["h1"]),
                                       ("haproxy, 1 host", fleet.balancer.spec, ["h1"]),
                                       ("haproxy, 2 hosts", fleet.balancer.spec, ["h1", "h2"]),
                                       ("haproxy, 3 hosts", fleet.balancer.spec,
                                        ["h1", "h2", "h3"])):
                for name in fleet.hosts:
                    fleet.balancer.set_state(name, "ready" if name in hosts else "maint")
                for name in hosts:
                    fleet.balancer.wait_status(name, "UP", 30)
                fleet.mta.set_milters(spec)
                _smtp_source(fleet.mta.smtp_port, 50)  # warm-up
                fleet.mta.wait_queue_empty(60)
                cpu0 = _cpu_seconds(fleet.balancer.pid)
                seconds = _smtp_source(fleet.mta.smtp_port, count)
                fleet.mta.wait_queue_empty(120)
                figures.setdefault(label, []).append(round(count / seconds, 1))
                if spec == fleet.balancer.spec:
                    balancer_ms.append(1000 * (_cpu_seconds(fleet.balancer.pid) - cpu0) / count)
        _report("capacity_trivial", {
            "messages_per_round": count, "rounds": rounds, "msg_per_s": figures,
            "haproxy_cpu_ms_per_message": round(sorted(balancer_ms)[len(balancer_ms) // 2], 3),
            "note": "all hosts, Postfix, HAProxy and the client share this box's 2 cores"})
        assert all(min(v) > 0 for v in figures.values())
    finally:
        fleet.mta.set_milters(fleet.balancer.spec)
        for host in fleet.hosts.values():
            host.set_brains([av_brain(fleet.clamd)])
            host.reload()


# ------------------------------------------------------------------------------------------
# Redis sizing: what one cache entry costs.
# ------------------------------------------------------------------------------------------

#: What the av brain records for a clean message, and a spam-brain-sized one.
_JOURNALS: dict[str, tuple[Any, ...]] = {
    "av clean": (("replace_header", ("X-Virus-Scanned", "MilterMonkey-AV 0.2.0 on h1.fleet.test"),
                  {}), ("replace_header", ("X-Virus-Status", "Clean"), {})),
    "av infected (reject)": (("reject", (550, "5.7.1", "Virus found: Win.Test.EICAR_HDB-1"),
                              {"reason": "virus Win.Test.EICAR_HDB-1"}),),
    "spam score headers": (
        ("replace_header", ("X-Spam-Flag", "NO"), {}),
        ("replace_header", ("X-Spam-Status", "No, score=1.3 required=5.0 tests=BAYES_00,"
                            "DKIM_SIGNED,DKIM_VALID,HTML_MESSAGE,RDNS_NONE,SPF_HELO_NONE "
                            "autolearn=no autolearn_force=no version=4.0.0"), {}),
        ("replace_header", ("X-Spam-Level", "*"), {})),
}


def test_cache_entry_size(fleet: Fleet) -> None:
    """Bytes of Redis memory per scan cache entry, measured (the sizing in the guide)."""
    client = redis.Redis(host=fleet.redis.host, port=fleet.redis.port)
    real = [k for k in client.scan_iter(match=PREFIX + b"*", count=1000)]
    real_sizes = [client.memory_usage(k) or 0 for k in real[:1000]]
    secret = fleet["h1"].secret_path.read_bytes()
    cache = RedisCache(fleet.redis.url, secret, timeout=2.0)
    figures: dict[str, Any] = {}
    n = 10000
    for label, calls in _JOURNALS.items():
        client.flushdb()
        base = int(client.info("memory")["used_memory"])
        now = time.time()
        for i in range(n):
            key = cache_key("av", "0.2.0", ("av", f"{label}-{i}".encode(), "clamd-db"))
            cache.put(key, CachedResult(tuple(calls), now, now + 3600))
        used = int(client.info("memory")["used_memory"]) - base
        one = next(iter(client.scan_iter(match=PREFIX + b"*", count=10)))
        figures[label] = {"value_bytes": len(client.get(one) or b""),
                          "memory_usage_bytes": client.memory_usage(one),
                          "used_memory_per_entry": round(used / n)}
    client.flushdb()
    cache.close()
    client.close()
    if real_sizes:
        figures["entries left by the drills"] = {
            "count": len(real), "mean_memory_usage_bytes": round(sum(real_sizes)
                                                                 / len(real_sizes))}
    _report("cache_entry_size", figures)
    assert all(0 < f["used_memory_per_entry"] < 2048 for k, f in figures.items()
               if k in _JOURNALS)
