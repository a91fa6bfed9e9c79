"""A fleet on one machine: monkey hosts in network namespaces behind HAProxy, one Redis, one clamd.

::

    load client --SMTP--> Postfix 127.0.0.1 --milter--> HAProxy 127.0.0.1 (TCP, /readyz checks)
        (retries 4xx)         |                              |-> h1 10.217.X.11:8890 (netns)
                              v                              |-> h2 10.217.X.12:8890 (netns)
                          smtp-sink                          '-> h3 10.217.X.13:8890 (netns)
    Redis 10.217.X.1 (the bridge, root namespace): the shared scan cache
    clamd: one, in the root namespace, reached by every host over its UNIX
    socket (a socket path is no part of a network namespace)

One clamd, not one per host: the box has two cores shared by everything,
and what the drills look at is the balancer, the cache and the hosts, not
the engine; a per-host clamd would only multiply its start-up time and
memory.  Each host still fails on its own: a killed or cut-off host loses
its sessions and its Redis, not clamd.

The load client sends each message in its own SMTP session, as the MTAs of
a fleet do most of the time, so every message gets its own milter
connection and HAProxy balances messages; a 4xx (or a dropped connection) is
retried after a short pause, as a sending MTA would retry from its queue.
Accounting (:func:`account`) reads every delivered message at the sink and
every host's log, so "delivered without its scan" is counted, not assumed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from miltermonkey_av.options import DEFAULT_CACHE_IGNORE_HEADERS
from miltermonkey_av.testing.client import clamd_command
from miltermonkey_av.testing.engine import Clamd
from miltermonkey_av.testing.samples import EICAR
from prometheus_client.parser import text_string_to_metric_families

from miltermonkey_core.milterkey import generate_secret_file
from miltermonkey_core.testing.daemon import render_config
from miltermonkey_core.testing.haproxy import HAProxy, Server
from miltermonkey_core.testing.netns import BridgeNetwork, NetnsHost
from miltermonkey_core.testing.postfix import Postfix
from miltermonkey_core.testing.process import StackError, chown, free_port, wait_until
from miltermonkey_core.testing.redis import Redis
from miltermonkey_core.testing.sink import SinkMessage, SmtpSink, parse_dump
from miltermonkey_core.testing.smtp import SmtpResult, send_mail

MILTER_PORT = 8890
METRICS_PORT = 9899
DOMAIN = "fleet.test"
#: Postfix's milter timeouts in the drills (its defaults are 30 s, 30 s, 300 s).
POSTFIX_MILTER_TIMEOUTS = {"milter_connect_timeout": "10s", "milter_command_timeout": "30s",
                           "milter_content_timeout": "60s"}
#: HAProxy's session timeout: longer than any milter timeout of the MTA.
HAPROXY_SESSION_TIMEOUT = 90.0


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text as {(sample name, sorted labels): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(values: Mapping[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
           **labels: str) -> float:
    """The sum of the samples called *name* whose labels include *labels*."""
    want = set(labels.items())
    return sum(v for (n, lab), v in values.items() if n == name and want <= set(lab))


class MonkeyHost:
    """One ``miltermonkey run`` inside its own namespace, with its own config and secret copy."""

    def __init__(self, net: BridgeNetwork, name: str, workdir: Path,
                 daemon: Mapping[str, Any], brains: Sequence[Mapping[str, Any]]) -> None:
        self.net = net
        self.name = name
        self.host: NetnsHost = net[name]
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o700)
        self.hostname = f"{name}.{DOMAIN}"
        self.config_path = workdir / "miltermonkey.toml"
        self.log_path = workdir / "miltermonkey.log"
        self.secret_path = workdir / "miltersecret"
        self.daemon_options: dict[str, Any] = {
            "connection": f"inet:{MILTER_PORT}@{self.host.address}",
            "metrics": f"{self.host.address}:{METRICS_PORT}",
            "hostname": self.hostname,
            "log_target": str(self.log_path),
            "debug_level": 50,
            "pidfile": str(workdir / "miltermonkey.pid"),
            "miltersecretfile": str(self.secret_path),
            "drain_period": 3,
            "shutdown_timeout": 20,
            **daemon,
        }
        self.brains = list(brains)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def server(self) -> Server:
        return Server(self.name, self.host.address, MILTER_PORT, METRICS_PORT)

    def write_config(self, **changes: Any) -> None:
        self.daemon_options.update(changes)
        self.config_path.write_text(render_config(self.daemon_options, self.brains))

    def set_brains(self, brains: Sequence[Mapping[str, Any]]) -> None:
        self.brains = list(brains)
        self.write_config()

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        self.write_config()
        self.proc = self.net.spawn(
            self.name, [sys.executable, "-m", "miltermonkey_core", "run", "-c",
                        str(self.config_path)], self.workdir / "stdout.log", cwd=self.workdir)
        if not wait_until(lambda: self.ready() or not self.alive(), timeout, 0.1) \
                or not self.alive():
            raise StackError(f"{self.name} did not become ready:\n{self.output()[-3000:]}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the host's whole process group: the machine is gone, mid-sentence."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> None:
        """SIGTERM: /readyz turns 404 (draining), the listener serves drain_period, then stops."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    def wait_exit(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def reload(self, timeout: float = 30.0) -> None:
        """SIGHUP and wait for the supervisor's "reload done" line."""
        assert self.proc is not None
        before = self.log().count("reload done")
        self.proc.send_signal(signal.SIGHUP)
        if not wait_until(lambda: self.log().count("reload done") > before, timeout, 0.05):
            raise StackError(f"{self.name}: reload not done:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.daemon_options["drain_period"]
                               + self.daemon_options["shutdown_timeout"] + 10)
            except subprocess.TimeoutExpired:
                self.kill()

    # -- what it says ------------------------------------------------------------------

    def _get(self, path: str) -> tuple[int, str]:
        url = f"http://{self.host.address}:{METRICS_PORT}{path}"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError as e:
            return 0, str(e)

    def ready(self) -> bool:
        return self._get("/readyz")[0] == 200

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        status, text = self._get("/metrics")
        if status != 200:
            raise StackError(f"{self.name}: /metrics answered {status}: {text[:200]}")
        return metric_values(text)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def output(self) -> str:
        out = self.workdir / "stdout.log"
        return (out.read_text(errors="replace") if out.exists() else "") + self.log()


# ------------------------------------------------------------------------------------------
# The fleet.
# ------------------------------------------------------------------------------------------


def av_brain(clamd: Clamd, **options: Any) -> dict[str, Any]:
    """av on the shared clamd, its verdicts in the shared cache.

    The drills' own tracking headers (``X-Fleet-*``) are ignored by the cache
    key like trace headers: the drills send one content under several tags.
    The private clamd's signatures are fingerprinted from its directory, with
    a short settle window since the drills RELOAD on purpose.
    """
    return {"use": "av", "clamd": [f"unix:{clamd.unix_socket}"], "skip_if_key": True,
            "scan_timeout": 20, "database_directory": str(clamd.db_dir), "cache_settle": 1,
            "cache_ignore_headers": [*DEFAULT_CACHE_IGNORE_HEADERS, "X-Fleet-*"], **options}


class Fleet:
    """Everything of the drawing above; :meth:`close` takes it all down again, whatever failed."""

    def __init__(self, base: Path, hosts: Sequence[str] = ("h1", "h2", "h3")) -> None:
        self.base = base
        self.names = list(hosts)
        self.net = BridgeNetwork(self.names)
        self.clamd = Clamd(base / "clamd", free_port())
        self.redis = Redis(base / "redis", free_port(), host=self.net.gateway)
        self.sink = SmtpSink(base / "sink", free_port())
        self.hosts: dict[str, MonkeyHost] = {}
        self.haproxy: HAProxy | None = None
        self.postfix: Postfix | None = None
        self._stack = contextlib.ExitStack()

    def start(self, brains: Callable[[Fleet], Sequence[Mapping[str, Any]]],
              daemon: Mapping[str, Any] | None = None) -> Fleet:
        try:
            self._start(brains, daemon or {})
        except BaseException:
            self.close()
            raise
        return self

    def _start(self, brains: Callable[[Fleet], Sequence[Mapping[str, Any]]],
               daemon: Mapping[str, Any]) -> None:
        self._stack.callback(self.net.destroy)
        self.net.create()
        for part in (self.clamd, self.redis, self.sink):
            self._stack.callback(part.stop)
            part.start()
        secret = self.base / "miltersecret"
        generate_secret_file(secret, key_id="k1")
        for name in self.names:
            host = MonkeyHost(self.net, name, self.base / name,
                              {"cache": self.redis.url, **daemon}, brains(self))
            host.secret_path.write_bytes(secret.read_bytes())  # "deployed" to every host
            host.secret_path.chmod(0o600)
            self.hosts[name] = host
            self._stack.callback(host.stop)
        # Start in parallel: each host takes a second or two of CPU to import its brains.
        with concurrent.futures.ThreadPoolExecutor(len(self.names)) as pool:
            list(pool.map(lambda h: h.start(), self.hosts.values()))
        self.haproxy = HAProxy(self.base / "haproxy", free_port(),
                               [h.server for h in self.hosts.values()],
                               timeout_session=HAPROXY_SESSION_TIMEOUT)
        self._stack.callback(self.haproxy.stop)
        self.haproxy.start()
        self.haproxy.wait_all_up()
        self.postfix = Postfix(self.base / "postfix", free_port(), self.sink.port,
                               milters=self.haproxy.spec, milter_default_action="tempfail",
                               extra={**POSTFIX_MILTER_TIMEOUTS,
                                      "smtpd_client_restrictions": "",
                                      "default_process_limit": "40"})
        self._stack.callback(self.postfix.stop)
        self.postfix.start()

    def close(self) -> None:
        self._stack.close()

    def __getitem__(self, name: str) -> MonkeyHost:
        return self.hosts[name]

    @property
    def balancer(self) -> HAProxy:
        assert self.haproxy is not None
        return self.haproxy

    @property
    def mta(self) -> Postfix:
        assert self.postfix is not None
        return self.postfix

    def logs(self) -> str:
        return "\n".join(h.log() for h in self.hosts.values())

    def add_signature(self, filename: str, name: str, data: bytes) -> None:
        """A new signature file in clamd's database and a RELOAD, waited for."""
        path = self.clamd.db_dir / filename
        path.write_text(f"{name}:0:*:{data.hex()}\n", encoding="ascii")
        chown(path, "clamav", "clamav")
        before = self.clamd.log_path.read_text(errors="replace").count("reloaded")
        if clamd_command(self.clamd.tcp_address, "RELOAD", timeout=10.0) != "RELOADING":
            raise StackError("clamd did not accept RELOAD")
        if not wait_until(lambda: self.clamd.log_path.read_text(errors="replace")
                          .count("reloaded") > before, 30.0, 0.1):
            raise StackError(f"clamd did not reload:\n{self.clamd.log_path.read_text()[-2000:]}")


# ------------------------------------------------------------------------------------------
# Messages and the load client.
# ------------------------------------------------------------------------------------------

SENDER = "sender@client.test"
RECIPIENT = "rcpt@dest.test"


def message(run: str, seq: int, kind: str = "clean", size: int = 2048,
            body: bytes | None = None) -> bytes:
    """A message of the drill: ``X-Fleet-Run``/``X-Fleet-Seq`` say which, the body is unique."""
    if body is None:
        line = f"{run} message {seq} of the fleet drill, some text to scan.\n".encode()
        body = line * max(1, size // len(line))
        if kind == "eicar":
            body = body[: size // 2] + EICAR + b"\n" + body[size // 2:]
    # A Date of its own, as real clients send: Postfix would add one at each attempt.
    head = (f"From: <{SENDER}>\nTo: <{RECIPIENT}>\nSubject: {run} {seq} {kind}\n"
            "Date: Thu, 03 Dec 2026 10:00:00 +0000\n"
            f"Message-ID: <{run}.{seq}@client.test>\nX-Fleet-Run: {run}\n"
            f"X-Fleet-Seq: {seq}\nX-Fleet-Kind: {kind}\n\n").encode()
    return head + body


@attrs.define
class Attempt:
    seq: int
    code: int
    stage: str | None
    text: str
    at: float


@attrs.define
class Outcome:
    seq: int
    kind: str
    attempts: list[Attempt] = attrs.field(factory=list)
    final: SmtpResult | None = None

    @property
    def tempfails(self) -> int:
        return sum(1 for a in self.attempts if not 200 <= a.code < 300 and not a.code >= 500)


@attrs.define
class LoadRun:
    """What the client saw: every attempt of every message."""

    run: str
    outcomes: dict[int, Outcome] = attrs.field(factory=dict)
    seconds: float = 0.0

    @property
    def sent(self) -> int:
        return len(self.outcomes)

    def accepted(self, kind: str | None = None) -> list[Outcome]:
        return [o for o in self.outcomes.values() if o.final is not None and o.final.ok
                and (kind is None or o.kind == kind)]

    def rejected(self, kind: str | None = None) -> list[Outcome]:
        return [o for o in self.outcomes.values() if o.final is not None and not o.final.ok
                and (kind is None or o.kind == kind)]

    def unfinished(self) -> list[Outcome]:
        return [o for o in self.outcomes.values() if o.final is None]

    @property
    def tempfailed_attempts(self) -> int:
        return sum(o.tempfails for o in self.outcomes.values())

    @property
    def retried_messages(self) -> int:
        return sum(1 for o in self.outcomes.values() if o.tempfails)


def send_load(port: int, run: str, items: Iterable[tuple[int, str, bytes]], *,
              threads: int = 8, retry_pause: float = 0.3, give_up_after: float = 180.0,
              rate: float | None = None,
              on_progress: Callable[[int], None] | None = None) -> LoadRun:
    """Send every (seq, kind, raw) item, one SMTP session each; retry 4xx like an MTA.

    ``rate``: new messages per second at most (mail arrives at its own pace,
    so a drill's faults meet a steady stream); retries are not paced.
    """
    result = LoadRun(run)
    lock = threading.Lock()
    finished = [0]
    t0 = time.monotonic()
    #: Set when the caller is interrupted or fails: no new attempt starts.
    cancel = threading.Event()

    def one(index: int, item: tuple[int, str, bytes]) -> None:
        seq, kind, raw = item
        if rate and cancel.wait(max(0.0, t0 + index / rate - time.monotonic())):
            return
        if cancel.is_set():
            return
        outcome = Outcome(seq, kind)
        with lock:
            result.outcomes[seq] = outcome
        deadline = time.monotonic() + give_up_after
        while time.monotonic() < deadline and not cancel.is_set():
            r = send_mail(port, raw, SENDER, [RECIPIENT], timeout=120.0)
            outcome.attempts.append(Attempt(seq, r.code, r.stage, r.text, time.monotonic()))
            if r.ok or 500 <= r.code < 600:
                outcome.final = r
                break
            cancel.wait(retry_pause)  # 4xx, or no answer at all: the MTA keeps it and retries
        with lock:
            finished[0] += 1
            done = finished[0]
        if on_progress is not None:
            on_progress(done)

    pool = concurrent.futures.ThreadPoolExecutor(threads)
    try:
        for f in [pool.submit(one, i, item) for i, item in enumerate(items)]:
            f.result()
    except BaseException:
        cancel.set()  # an interrupted drill must come down now, not after every retry
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    result.seconds = time.monotonic() - t0
    return result


# ------------------------------------------------------------------------------------------
# Accounting at the sink and in the hosts' logs.
# ------------------------------------------------------------------------------------------

_QID_RE = re.compile(r"by mta\.milter\.test \(Postfix\) with E?SMTP id ([0-9A-Z]+)")
_SCANNED_RE = re.compile(rf"^MilterMonkey-AV \S+ on (h\d+)\.{re.escape(DOMAIN)}$")


@attrs.define
class Delivery:
    seq: int
    qid: str
    message: SinkMessage


def deliveries(sink: SmtpSink, run: str) -> dict[int, list[Delivery]]:
    """Every message of *run* the sink received, by sequence number (duplicates kept)."""
    out: dict[int, list[Delivery]] = {}
    for path in sink.messages():
        m = parse_dump(path)
        if m.header("X-Fleet-Run") != run:
            continue
        seq = int(m.header("X-Fleet-Seq") or -1)
        received = " ".join(m.header_values("Received"))
        match = _QID_RE.search(received)
        out.setdefault(seq, []).append(Delivery(seq, match.group(1) if match else "", m))
    return out


@attrs.define
class Accounting:
    """The drill's figures: what the closing note reports."""

    run: str
    sent: int
    eicar_sent: int
    attempts: int
    tempfailed_attempts: int
    retried_messages: int
    accepted: int
    delivered: int
    lost: int
    duplicates: int
    unscanned: int
    eicar_refused: int
    eicar_delivered: int
    unfinished: int
    replayed: int
    seconds: float
    scanned_by: dict[str, int]
    problems: list[str]

    def line_figures(self) -> dict[str, Any]:
        """The figures as JSON-ready data, without the problem list."""
        figures = attrs.asdict(self)
        figures.pop("problems")
        figures["seconds"] = round(self.seconds, 1)
        figures["problems_first"] = self.problems[:5]
        return figures

    def line(self) -> str:
        return (f"sent={self.sent} (eicar {self.eicar_sent}) attempts={self.attempts} "
                f"tempfailed_attempts={self.tempfailed_attempts} "
                f"retried_messages={self.retried_messages} accepted={self.accepted} "
                f"delivered={self.delivered} lost={self.lost} duplicates={self.duplicates} "
                f"delivered_without_scan={self.unscanned} "
                f"eicar_refused={self.eicar_refused}/{self.eicar_sent} "
                f"eicar_delivered={self.eicar_delivered} unfinished={self.unfinished} "
                f"cache_replays={self.replayed} scanned_by={self.scanned_by} "
                f"time={self.seconds:.1f}s")


def account(fleet: Fleet, load: LoadRun, *, queue_timeout: float = 120.0) -> Accounting:
    """Count the run at the sink and in every host's log; see :class:`Accounting`."""
    fleet.mta.wait_queue_empty(queue_timeout)
    accepted = load.accepted()
    want = {o.seq for o in accepted}
    # The sink writes a dump while it answers; give the last ones a moment.
    wait_until(lambda: want <= set(deliveries(fleet.sink, load.run)), 15.0, 0.2)
    got = deliveries(fleet.sink, load.run)
    logs = fleet.logs()
    scanned_qids = set(re.findall(r"^\S+ \S+ .*?([0-9A-F]{6,}): (?:av: )?clean \(", logs, re.M))
    replayed_qids = set(re.findall(r"([0-9A-F]{6,}): brain av: cached result replayed", logs))
    skipped_qids = set(re.findall(r"([0-9A-F]{6,}): trusted milter key: skipping [^\n]*\bav\b",
                                  logs))
    problems: list[str] = []
    unscanned = 0
    replayed = 0
    scanned_by: dict[str, int] = {}
    for seq in sorted(want):
        for d in got.get(seq, []):
            status = d.message.header("X-Virus-Status")
            by = _SCANNED_RE.match(d.message.header("X-Virus-Scanned") or "")
            how = ("scanned" if d.qid in scanned_qids else "replayed" if d.qid in replayed_qids
                   else "key" if d.qid in skipped_qids else None)
            if status != "Clean" or by is None or how is None:
                unscanned += 1
                problems.append(f"seq {seq} qid {d.qid}: X-Virus-Status {status!r}, "
                                f"X-Virus-Scanned {d.message.header('X-Virus-Scanned')!r}, "
                                f"host log: {how}")
                continue
            replayed += how == "replayed"
            scanned_by[by.group(1)] = scanned_by.get(by.group(1), 0) + 1
    eicar = [o for o in load.outcomes.values() if o.kind == "eicar"]
    eicar_refused = sum(1 for o in eicar if o.final is not None and o.final.code // 100 == 5)
    eicar_delivered = sum(len(got.get(o.seq, [])) for o in eicar)
    lost = sorted(want - set(got))
    problems += [f"seq {s}: accepted ({load.outcomes[s].final}) but never delivered"
                 for s in lost]
    clean_refused = [o for o in load.rejected() if o.kind != "eicar"]
    problems += [f"seq {o.seq} ({o.kind}): refused {o.final}" for o in clean_refused]
    return Accounting(
        run=load.run, sent=load.sent, eicar_sent=len(eicar),
        attempts=sum(len(o.attempts) for o in load.outcomes.values()),
        tempfailed_attempts=load.tempfailed_attempts, retried_messages=load.retried_messages,
        accepted=len(accepted), delivered=sum(len(got.get(s, [])) for s in want),
        lost=len(lost) + len(load.unfinished()) + len(clean_refused),
        duplicates=sum(max(0, len(v) - 1) for v in got.values()),
        unscanned=unscanned, eicar_refused=eicar_refused, eicar_delivered=eicar_delivered,
        unfinished=len(load.unfinished()), replayed=replayed, seconds=load.seconds,
        scanned_by=dict(sorted(scanned_by.items())), problems=problems)
