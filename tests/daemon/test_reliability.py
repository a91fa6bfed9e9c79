"""Failure policies, timeouts, the circuit breaker, the worker pool, session lifecycle,
reload, shutdown, sockets and privileges.

The first half runs the chain and the pool in-process (fast, exact); the
second half drives real daemons (supervisor + libmilter worker) over their
sockets with the MTA-side client, as Postfix would.  The fault suite through
a real Postfix is ``test_reliability_postfix.py``.
"""

from __future__ import annotations

import grp
import os
import pwd
import signal
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from reliability_support import (
    LONG,
    RawMilter,
    alive_and_serving,
    connect_packet,
    message,
    proc_ids,
    rss_kib,
    start_with_overrides,
    wait_for,
    worker_pid,
)

from miltermonkey_core import Brain, Message, MilterContext, Monkey, hookimpl
from miltermonkey_core.contract.model import message_from_bytes
from miltermonkey_core.contract.verdict import Action
from miltermonkey_core.engine.breaker import CircuitBreaker
from miltermonkey_core.engine.build import chain_of
from miltermonkey_core.engine.chain import (
    UNCHECKED_HEADER,
    BrainSlot,
    BrainTimeout,
    MtaDecides,
    policy_verdict,
)
from miltermonkey_core.engine.guard import BrainAbandoned
from miltermonkey_core.engine.offline import run_engine
from miltermonkey_core.engine.session import Engine
from miltermonkey_core.errors import MonkeyError
from miltermonkey_core.milter.protocol import MilterProtocolError
from miltermonkey_core.server.pool import WorkerPool
from miltermonkey_core.server.sockets import prepare_unix_socket, remove_unix_socket
from miltermonkey_core.testing.client import MilterClient
from miltermonkey_core.testing.daemon import MonkeyProcess, render_config
from miltermonkey_core.testing.replies import Disposition

# ==========================================================================
# The circuit breaker
# ==========================================================================


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_breaker_opens_after_n_failures_in_window_and_probes_after_cooldown() -> None:
    clock = Clock()
    b = CircuitBreaker(failures=3, window=10, cooldown=30, clock=clock)
    assert b.allow() and not b.failure("error") and not b.failure("timeout")
    assert b.success() is False  # successes in between do not erase failures
    clock.t += 5
    assert b.failure("timeout") is True and b.state == "open" and b.last_kind == "timeout"
    assert not b.allow()
    clock.t += 29
    assert not b.allow()
    clock.t += 2  # cool-down over: exactly one caller probes
    assert b.state == "half-open"
    assert b.allow() is True
    assert b.allow() is False
    assert b.failure("error") is True  # the probe failed: open again
    assert not b.allow()
    clock.t += 31
    assert b.allow()
    assert b.success() is True and b.state == "closed"
    assert b.allow() and b.allow()


def test_breaker_window_forgets_old_failures_and_zero_disables() -> None:
    clock = Clock()
    b = CircuitBreaker(failures=2, window=10, cooldown=30, clock=clock)
    b.failure("error")
    clock.t += 11
    assert b.failure("error") is False and b.state == "closed"
    off = CircuitBreaker(failures=0, window=10, cooldown=30)
    for _ in range(100):
        assert off.failure("error") is False
    assert off.allow() and off.state == "closed"


def test_breaker_probe_that_never_ran_lets_another_probe() -> None:
    clock = Clock()
    b = CircuitBreaker(failures=1, window=10, cooldown=5, clock=clock)
    b.failure("timeout")
    clock.t += 6
    assert b.allow() and not b.allow()
    b.abort_probe()
    assert b.allow()


# ==========================================================================
# Policies, timeouts and the guarded context, in-process
# ==========================================================================


class Writer(Brain):
    """Adds a header; optionally raises or overruns (as seen by a fake invoker)."""

    def __init__(self, name: str, behaviour: str = "ok") -> None:
        super().__init__(None, Monkey(), name)
        self.behaviour = behaviour
        self.ctx: Any = None

    @hookimpl
    def eom_process(self, message: Message, ctx: MilterContext, monkey: Monkey) -> None:
        self.ctx = ctx
        ctx.add_header("X-Ran", self.name)
        if self.behaviour == "raise":
            raise RuntimeError("boom")


def timing_out(names: set[str]) -> Any:
    """An invoker that runs brains but reports a timeout for those in ``names``."""
    def invoke(slot: BrainSlot, call: Any, timeout: float) -> None:
        call()
        if slot.name in names:
            raise BrainTimeout(f"still running after its timeout of {timeout:g} s")
    return invoke


def run_chain(brains: list[Writer], policies: dict[str, tuple[str, str | None]],
              invoke: Any = None, deadline: float | None = None) -> Any:
    chain = chain_of(*brains)
    for slot in chain.slots:
        if slot.name in policies:
            slot.on_error, slot.on_timeout = policies[slot.name]
    engine = Engine(chain, Monkey())
    s = engine.session()
    msg = message_from_bytes(message("policies"))
    s.envfrom("<a@example.test>")
    for h in msg.headers:
        s.header(h.name, h.raw)
    s.body(msg.body.read())
    return s.eom(invoke=invoke, deadline=deadline)


@pytest.mark.parametrize(("policy", "action", "tagged"), [
    ("tempfail", Action.TEMPFAIL, False),
    ("reject", Action.REJECT, False),
    ("accept", Action.ACCEPT, False),
    ("tag", Action.ACCEPT, True),
    ("mta", Action.TEMPFAIL, False),
])
def test_each_timeout_policy(policy: str, action: Action, tagged: bool) -> None:
    a, slow, c = Writer("a"), Writer("slow"), Writer("c")
    d = run_chain([a, slow, c], {"slow": ("tempfail", policy)}, invoke=timing_out({"slow"}))
    assert d.action is action
    ran = [e.value for e in d.ctx.edits if getattr(e, "name", "") == "X-Ran"]
    assert "slow" not in ran  # its edits are rolled back
    if action is Action.ACCEPT:
        assert ran == ["a", "c"]
    assert (UNCHECKED_HEADER in [getattr(e, "name", "") for e in d.ctx.edits]) is tagged
    assert isinstance(d.verdict, MtaDecides) is (policy == "mta")
    result = next(r for r in d.results if r.brain == "slow")
    assert result.outcome == "timeout" and "timeout of" in result.detail


def test_on_error_and_on_timeout_are_separate() -> None:
    d = run_chain([Writer("x", "raise"), Writer("y")], {"x": ("accept", "tempfail")})
    assert d.action is Action.ACCEPT  # an error: on_error
    d = run_chain([Writer("x"), Writer("y")], {"x": ("accept", "tempfail")},
                  invoke=timing_out({"x"}))
    assert d.action is Action.TEMPFAIL  # a timeout: on_timeout
    d = run_chain([Writer("x"), Writer("y")], {"x": ("reject", None)}, invoke=timing_out({"x"}))
    assert d.action is Action.REJECT  # no on_timeout: on_error


def test_abandoned_brain_cannot_write_afterwards() -> None:
    slow = Writer("slow")
    d = run_chain([slow, Writer("after")], {"slow": ("accept", None)},
                  invoke=timing_out({"slow"}))
    assert d.action is Action.ACCEPT
    with pytest.raises(BrainAbandoned):
        slow.ctx.add_header("X-Late", "too late")
    with pytest.raises(BrainAbandoned):
        _ = slow.ctx.headers
    assert all(getattr(e, "name", "") != "X-Late" for e in d.ctx.edits)


def test_no_time_left_gives_remaining_brains_their_policy_without_calling_them() -> None:
    a, b = Writer("a"), Writer("b")
    d = run_chain([a, b], {"a": ("tag", None), "b": ("tempfail", None)},
                  deadline=time.monotonic() - 1)
    assert a.ctx is None and b.ctx is None
    assert d.action is Action.TEMPFAIL and d.verdict is not None and d.verdict.brain == "b"
    assert [r.outcome for r in d.results] == ["timeout", "timeout"]


def test_open_breaker_skips_the_brain_and_applies_policy_at_once() -> None:
    brain = Writer("av", "raise")
    chain = chain_of(brain, Writer("stamp"))
    chain.slots[0].breaker = CircuitBreaker(failures=2, window=60, cooldown=60)
    chain.slots[0].on_error = "tempfail"
    engine = Engine(chain, Monkey())
    outcomes = []
    for _ in range(4):
        r = run_engine(engine, message("breaker"))
        outcomes.append((r.action, r.results[0].outcome))
    assert outcomes == [(Action.TEMPFAIL, "error")] * 2 + [(Action.TEMPFAIL, "open")] * 2
    assert chain.slots[0].breaker.opened == 1


def test_evaluation_brain_failure_is_ignored() -> None:
    bad = Writer("bad", "raise")
    chain = chain_of(bad, Writer("good"))
    chain.slots[0].evaluation = True
    chain.slots[0].on_error = "tempfail"
    r = run_engine(Engine(chain, Monkey()), message("eval"))
    assert r.action is Action.ACCEPT and r.header("X-Ran") == "good"


def test_policy_verdicts() -> None:
    assert policy_verdict("accept", "b", "x") is None
    assert policy_verdict("tag", "b", "x") is None
    v = policy_verdict("tempfail", "b", "x")
    assert v is not None and v.reply is not None and v.reply.code == 451
    v = policy_verdict("mta", "b", "x")
    assert isinstance(v, MtaDecides) and v.action is Action.TEMPFAIL


# ==========================================================================
# The worker pool under hung brains
# ==========================================================================


def test_abandoned_running_job_is_replaced_and_queued_job_never_runs() -> None:
    pool = WorkerPool(size=1, jobs_per_thread=0)
    release = threading.Event()
    hung = pool.submit(lambda: release.wait(10))
    assert wait_for(lambda: hung.started is not None, 2)
    ran: list[int] = []
    queued = pool.submit(lambda: ran.append(1))
    assert pool.abandon(queued) is True  # never started: cancelled
    assert pool.abandon(hung) is True
    assert pool.stuck == 1
    ok = pool.submit(lambda: 42)
    assert ok.wait(2) and ok.result == 42  # a replacement serves
    assert ran == []
    release.set()
    assert hung.wait(2)
    assert wait_for(lambda: pool.stuck == 0 and pool.alive == 1, 2)  # the stuck thread left
    pool.shutdown()


def test_finished_job_is_not_abandoned() -> None:
    pool = WorkerPool(size=1, jobs_per_thread=0)
    job = pool.submit(lambda: 7)
    assert job.wait(2)
    assert pool.abandon(job) is False and job.result == 7
    pool.shutdown()


def test_stuck_threads_are_capped() -> None:
    pool = WorkerPool(size=1, jobs_per_thread=0, max_stuck=2)
    release = threading.Event()
    jobs = []
    for _ in range(3):
        j = pool.submit(lambda: release.wait(10))
        assert wait_for(lambda j=j: j.started is not None, 2)
        pool.abandon(j)
        jobs.append(j)
    # two replacements, the third stuck one was not replaced: no free worker now
    assert pool.stuck == 3 and pool.alive == 3
    release.set()
    assert all(j.wait(2) for j in jobs)
    # the unreplaced thread went back to work: the pool is whole again
    assert wait_for(lambda: pool.stuck == 0 and pool.alive == 1, 2)
    assert pool.submit(lambda: 1).wait(2)
    pool.shutdown()


def test_jobsperthread_zero_never_retires() -> None:
    pool = WorkerPool(size=1, jobs_per_thread=0)
    jobs = [pool.submit(lambda: threading.current_thread().name) for _ in range(20)]
    assert all(j.wait(2) for j in jobs)
    assert len({j.result for j in jobs}) == 1 and pool.retired == 0
    pool.shutdown()


# ==========================================================================
# Daemons over their sockets
# ==========================================================================

SENDER, RCPTS = "<a@example.test>", ["<b@example.test>"]


def send(m: MonkeyProcess, subject: str, timeout: float = 30.0, **kw: Any) -> Any:
    with MilterClient(m.address, timeout=timeout) as c:
        c.negotiate()
        return c.send_message(message(subject, **kw), SENDER, RCPTS)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


def test_hung_brain_gets_progress_then_its_policy_and_the_breaker_opens(workdir: Path) -> None:
    brains = [{"use": "fault", "fault": "hang", "when_subject": "hang", "timeout": 1.5},
              {"use": "stamp"}]
    with MonkeyProcess(workdir / "m", brains, {"progress_interval": 0.3, "threads": 2},
                       unix=True) as m:
        t0 = time.monotonic()
        r = send(m, "please hang")
        took = time.monotonic() - t0
        assert r.tempfailed and r.reply.code == 451 and "4.3.0" in r.reply.raw
        assert 1.4 <= took < 5 and r.eom.progress_count >= 3
        ok = send(m, "fine")
        assert ok.accepted and ok.applied.header_values("X-Stamp") == ["stamp:stamped"]
        for _ in range(4):
            assert send(m, "hang again").tempfailed
        t0 = time.monotonic()
        r = send(m, "hang once more")  # the breaker is open: no waiting
        assert r.tempfailed and time.monotonic() - t0 < 1
        log = m.wait_for_log("circuit breaker OPEN")
        assert "brain fault timed out in eom_process (still running after its timeout of 1.5 s)" \
            in log
        assert "brain fault skipped: circuit breaker open" in log
        assert alive_and_serving(m.address)


def test_eom_timeout_bounds_the_whole_chain(workdir: Path) -> None:
    brains = [{"use": "fault", "fault": "hang", "hang_seconds": 1.2, "timeout": 30},
              {"use": "fault", "name": "fault2", "fault": "hang", "hang_seconds": 1.2,
               "timeout": 30, "on_error": "tag"},
              {"use": "stamp"}]
    with MonkeyProcess(workdir / "m", brains, {"eom_timeout": 2, "progress_interval": 0.5},
                       unix=True) as m:
        t0 = time.monotonic()
        r = send(m, "slow chain")
        took = time.monotonic() - t0
        # fault ran (1.2 s), fault2 ran out of eom_timeout (tag), stamp had no time (tempfail)
        assert 1.9 <= took < 4, took
        assert r.tempfailed
        log = m.wait_for_log("brain stamp timed out")
        assert "eom_timeout of 2 s spent" in log
        assert "no time left for it within eom_timeout" in log


def test_mta_policy_drops_the_connection(workdir: Path) -> None:
    m = MonkeyProcess(workdir / "m", [{"use": "fault", "when_subject": "explode"},
                                      {"use": "stamp"}], unix=True)
    start_with_overrides(m, {"fault": {"on_error": "mta"}})
    try:
        with MilterClient(m.address, timeout=10) as c:
            c.negotiate()
            assert c.send_message(message("fine"), SENDER, RCPTS).accepted
            with pytest.raises(MilterProtocolError):
                c.send_message(message("explode"), SENDER, RCPTS)
        log = m.wait_for_log("dropping the milter connection")
        assert "the MTA's default action decides" in log
        assert alive_and_serving(m.address)
    finally:
        m.stop()


def test_double_abort_abort_mid_message_and_quit_nc(workdir: Path) -> None:
    with MonkeyProcess(workdir / "m", [{"use": "gate"}, {"use": "stamp"}], unix=True) as m:
        with MilterClient(m.address, timeout=10) as c:
            c.negotiate()
            assert c.send_message(message("one"), SENDER, RCPTS).accepted
            c.abort()
            c.abort()  # Postfix sends ABORT twice after EOM
            c.mail(SENDER)
            c.rcpt(RCPTS[0])
            c.header("Subject", "aborted halfway")
            c.abort()
            r = c.send_message(message("two"), SENDER, RCPTS)
            assert r.accepted and r.applied.header_values("X-Stamp") == ["stamp:stamped"]
            c.quit_nc()
            assert c.send_message(message("three"), SENDER, RCPTS).accepted
            c.quit()
        # a connection dropped in the middle of a message
        with RawMilter(m.socket_path) as raw:
            raw.negotiate()
            raw.step("C", connect_packet())
            raw.step("M", b"<a@example.test>\0")
            raw.step("R", b"<b@example.test>\0")
            raw.step("L", b"Subject\0cut\0")
        assert alive_and_serving(m.address)
    log = m.log()
    assert "internal error" not in log and "Traceback" not in log


def test_cid_timeout_frees_idle_state_and_the_session_can_resume(workdir: Path) -> None:
    with MonkeyProcess(workdir / "m", [{"use": "stamp"}], {"cid_timeout": 1},
                       unix=True) as m, MilterClient(m.address, timeout=10) as c:
        c.negotiate()
        c.connect("client.test", port=4242, address="127.0.0.1")
        c.mail(SENDER)
        c.rcpt(RCPTS[0])
        c.header("Subject", "idle")
        m.wait_for_log("freeing state of session", timeout=10)
        c.eoh()
        c.body(b"late\r\n")
        r = c.eom()
        assert r.disposition is Disposition.ACCEPT
        assert m.wait_for_log("spoke again after cid_timeout")


def _reload(m: MonkeyProcess, brains: list[dict[str, Any]], marker: str) -> str:
    m.config_path.write_text(render_config(m.daemon_options, brains))
    before = m.log().count(marker)
    m.signal(signal.SIGHUP)
    assert wait_for(lambda: m.log().count(marker) > before, 15), m.output()[-3000:]
    return m.log()


def test_sighup_reload_under_load_drops_nothing_and_refuses_bad_configs(workdir: Path) -> None:
    with MonkeyProcess(workdir / "m", [{"use": "stamp", "value": "v0"}], unix=True) as m:
        stop = threading.Event()
        results: list[Any] = []
        errors: list[BaseException] = []

        def load() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    with MilterClient(m.address, timeout=20) as c:
                        c.negotiate()
                        for _ in range(3):
                            results.append(c.send_message(message(f"load {n}"), SENDER, RCPTS))
                        c.quit()
                except BaseException as e:
                    errors.append(e)

        threads = [threading.Thread(target=load) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            for i in range(1, 6):
                _reload(m, [{"use": "stamp", "value": f"v{i}"}], "reload done")
            # a configuration the supervisor refuses (unknown option)
            log = _reload(m, [{"use": "stamp", "valeu": "bad"}], "reload refused")
            assert "valeu: unknown option" in log
            # one the worker refuses (the brain cannot start)
            log = _reload(m, [{"use": "av", "engine": "command",
                               "scanner_path": "/nonexistent/uvscan"}],
                          "reload refused by worker")
            assert "keeps running" in log
            time.sleep(0.5)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert not errors, errors[:3]
        assert len(results) > 20
        assert all(r.accepted for r in results)
        stamps = {r.applied.header_values("X-Stamp")[0] for r in results}
        assert "stamp:v5" in stamps and len(stamps) >= 3
        # after the refused reloads the last good configuration still serves
        assert send(m, "after").applied.header_values("X-Stamp") == ["stamp:v5"]
        assert m.alive()


def test_sigterm_finishes_the_message_in_flight_then_cleans_up(workdir: Path) -> None:
    brains = [{"use": "fault", "fault": "hang", "hang_seconds": 2, "timeout": 20},
              {"use": "stamp"}]
    m = MonkeyProcess(workdir / "m", brains, {"progress_interval": 0.5}, unix=True)
    m.start()
    pidfile = Path(m.daemon_options["pidfile"])
    assert pidfile.read_text().strip() == str(m.proc.pid)
    box: list[Any] = []
    t = threading.Thread(target=lambda: box.append(send(m, "in flight")))
    t.start()
    time.sleep(0.5)
    m.signal(signal.SIGTERM)
    # the listener closes at once: new connections are refused
    assert wait_for(lambda: not m._listening(), 3)
    t.join(20)
    assert box and box[0].accepted, box
    assert box[0].applied.header_values("X-Stamp") == ["stamp:stamped"]
    assert m.proc.wait(20) == 0
    assert not pidfile.exists() and not m.socket_path.exists()
    assert "waiting for 1 message(s) in progress" in m.log() or "stopped" in m.log()
    m.stop()


def test_shutdown_deadline_gives_a_hung_message_its_policy(workdir: Path) -> None:
    """A message still in progress at the stop deadline gets its brain's timeout
    policy just before it, so the MTA hears a defined answer, not a closed socket."""
    brains = [{"use": "fault", "fault": "hang", "timeout": 60}, {"use": "stamp"}]
    m = MonkeyProcess(workdir / "m", brains, {"progress_interval": 0.5, "shutdown_timeout": 3},
                      unix=True)
    start_with_overrides(m, {}, env={"MILTERMONKEY_NO_SUPERVISOR": "1"})
    try:
        box: list[Any] = []
        t = threading.Thread(target=lambda: box.append(send(m, "stuck")))
        t.start()
        m.wait_for_log("fault brain: hanging")  # the message is in progress
        t0 = time.monotonic()
        m.signal(signal.SIGTERM)
        t.join(20)
        assert box and box[0].tempfailed, box
        assert m.proc is not None and m.proc.wait(10) == 0
        took = time.monotonic() - t0
        # the message gets its policy just before the 3 s deadline, then the daemon exits
        assert 1.5 < took < 10, took
        log = m.log()
        assert "the daemon is shutting down" in log and "policy tempfail" in log
    finally:
        m.stop()


def test_killed_worker_is_restarted_and_the_stale_socket_replaced(workdir: Path) -> None:
    with MonkeyProcess(workdir / "m", [{"use": "stamp"}], unix=True) as m:
        m.wait_for_log("is serving")
        first = worker_pid(m)
        os.kill(first, signal.SIGKILL)
        assert wait_for(lambda: m.log().count("is serving") == 2 and m._listening(), 15), \
            m.output()
        assert worker_pid(m) != first
        assert send(m, "after crash").accepted
        log = m.log()
        assert "died unexpectedly (killed by SIGKILL)" in log
        assert "removing stale socket" in log


def test_stale_socket_files(workdir: Path, tmp_path: Path) -> None:
    d = Path(os.environ.get("TMPDIR", "/tmp")) / f"mm-stale-{os.getpid()}"
    d.mkdir(exist_ok=True)
    path = str(d / "s.sock")
    try:
        # a dead socket: removed
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)
        s.close()
        prepare_unix_socket(path)
        assert not os.path.exists(path)
        # a live one: refused
        live = socket.socket(socket.AF_UNIX)
        live.bind(path)
        live.listen(1)
        with pytest.raises(MonkeyError, match="another process is listening"):
            prepare_unix_socket(path)
        live.close()
        os.unlink(path)
        # not a socket: refused, never deleted
        Path(path).write_text("precious")
        with pytest.raises(MonkeyError, match="not a socket"):
            prepare_unix_socket(path)
        assert Path(path).read_text() == "precious"
        # only our own socket is removed at exit, never a successor's
        os.unlink(path)
        a = socket.socket(socket.AF_UNIX)
        a.bind(path)
        st = os.stat(path)
        os.unlink(path)
        b = socket.socket(socket.AF_UNIX)
        b.bind(path)
        assert remove_unix_socket(path, (st.st_dev, st.st_ino)) is False
        assert os.path.exists(path)
        a.close()
        b.close()
    finally:
        for p in d.iterdir():
            p.unlink()
        d.rmdir()


def test_a_daemon_starts_over_a_stale_socket_file(workdir: Path) -> None:
    m = MonkeyProcess(workdir / "m", [{"use": "stamp"}], unix=True)
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(m.socket_path))
    s.close()
    with m:
        assert send(m, "stale").accepted
        assert "removing stale socket" in m.log()


@pytest.mark.skipif(os.geteuid() != 0, reason="privilege drop needs root")
def test_privileges_dropped_after_binding_and_socket_mode_and_group(workdir: Path) -> None:
    user = "nobody"
    group = grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name
    sock_group = "mail" if _group_exists("mail") else group
    daemon = {"user": user, "group": group, "socket_mode": "0660", "socket_group": sock_group}
    with MonkeyProcess(workdir / "m", [{"use": "stamp"}], daemon, unix=True) as m:
        m.wait_for_log("is serving")  # listening comes before the switch to nobody
        worker = worker_pid(m)
        ids = proc_ids(worker)
        nobody = pwd.getpwnam(user)
        assert set(ids["Uid"]) == {nobody.pw_uid}
        assert set(ids["Gid"]) == {grp.getgrnam(group).gr_gid}
        st = os.stat(m.socket_path)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == grp.getgrnam(sock_group).gr_gid
        assert send(m, "as nobody").accepted
        # the supervisor stays root to restart the worker and clean up
        assert proc_ids(m.proc.pid)["Uid"][0] == 0
    assert not m.socket_path.exists()  # removed although nobody cannot write its directory


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def test_unknown_user_is_refused_at_start(workdir: Path) -> None:
    m = MonkeyProcess(workdir / "m", [{"use": "stamp"}], {"user": "no-such-user-mm"}, unix=True)
    with pytest.raises(RuntimeError, match="user 'no-such-user-mm' does not exist"):
        m.start()
    assert not m.socket_path.exists()


def test_single_process_mode(workdir: Path) -> None:
    m = MonkeyProcess(workdir / "m", [{"use": "stamp"}], unix=True,
                      env={"MILTERMONKEY_NO_SUPERVISOR": "1"})
    with m:
        assert m.proc is not None
        assert Path(m.daemon_options["pidfile"]).read_text().strip() == str(m.proc.pid)
        assert send(m, "single").accepted
        m.signal(signal.SIGTERM)
        assert m.proc.wait(15) == 0
    assert not m.socket_path.exists()
    assert not Path(m.daemon_options["pidfile"]).exists()


# ==========================================================================
# Memory: per-message and per-connection state is freed on every path
# ==========================================================================


def _mixed_load(address: Any, n_messages: int, n_threads: int = 4) -> dict[str, int]:
    """Messages over a mix of lifecycles: normal, double ABORT after EOM, ABORT
    mid-message, QUIT_NC, and connections dropped mid-message."""
    counts = {"sent": 0, "accepted": 0, "aborted": 0, "dropped": 0}
    lock = threading.Lock()
    per_thread = n_messages // n_threads

    def worker(k: int) -> None:
        done = 0
        body = "x" * 2000 + "\r\n"
        while done < per_thread:
            with MilterClient(address, timeout=30) as c:
                c.negotiate()
                for i in range(min(50, per_thread - done)):
                    kind = (done + i) % 10
                    if kind == 7:
                        c.mail(SENDER)
                        c.rcpt(RCPTS[0])
                        c.header("Subject", "aborted")
                        c.abort()
                        with lock:
                            counts["aborted"] += 1
                        continue
                    r = c.send_message(message(f"rss {k} {done + i}", body), SENDER, RCPTS)
                    with lock:
                        counts["sent"] += 1
                        counts["accepted"] += r.accepted
                    if kind == 3:
                        c.abort()
                        c.abort()
                    if kind == 5:
                        c.quit_nc()
                done += min(50, per_thread - done)
                if done % 500 < 50:
                    c.mail(SENDER)
                    c.rcpt(RCPTS[0])
                    c.header("Subject", "dropped")
                    with lock:
                        counts["dropped"] += 1
                    continue  # closes the socket without QUIT
                c.quit()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return counts


def test_no_leak_over_many_messages(workdir: Path) -> None:
    """RSS after a warm-up vs after the run; MILTERMONKEY_LONG=1 runs 100,000 messages.

    One transaction in ten is aborted halfway, so 100,000 complete messages
    take 112,000 transactions.
    """
    total = 112_000 if LONG else 6_000
    with MonkeyProcess(workdir / "m", [{"use": "gate"}, {"use": "stamp"}],
                       {"debug_level": 0, "jobsperthread": 50}, unix=True) as m:
        worker = worker_pid(m)
        _mixed_load(m.address, 2_000)
        time.sleep(0.5)
        before = rss_kib(worker)
        t0 = time.monotonic()
        counts = _mixed_load(m.address, total)
        took = time.monotonic() - t0
        time.sleep(1.0)
        after = rss_kib(worker)
        threads = len(list(Path(f"/proc/{worker}/task").iterdir()))
        fds = len(list(Path(f"/proc/{worker}/fd").iterdir()))
        report = (f"RSS {before} KiB -> {after} KiB ({after - before:+d}) over "
                  f"{counts['sent']} messages in {took:.0f} s ({counts['sent'] / took:.0f}/s), "
                  f"{counts['aborted']} aborted, {counts['dropped']} connections dropped; "
                  f"threads {threads}, fds {fds}")
        print(report)
        (workdir / "rss.txt").write_text(report + "\n")
        assert counts["accepted"] == counts["sent"]
        assert after - before < (8_000 if LONG else 6_000), report
        assert threads < 40 and fds < 40, report
