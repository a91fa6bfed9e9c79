"""Every contender of the benchmark, registered by name: how it starts, what it must add.

A :class:`Contender` is a declarative entry: its key on the command line,
its label in the tables, how to start it (a function returning a
:class:`Running`: the milter socket the MTA is pointed at, the processes
whose CPU and memory count as the milter's, how to stop it), the headers
every delivered message must carry, whether the functional check sends it
GTUBE and EICAR, and what the ratios compare it with.  :data:`REGISTRY`
holds them in the order they are measured; adding a contender is adding an
entry, nothing else in the benchmark names contenders.

MilterMonkey runs as ``miltermonkey run`` starts it in production: a small
supervisor with the worker (the process that speaks the milter protocol and
runs the brains) as its child.  Every contender's daemon runs with the scan
cache off (``cache = "off"``): a measurement sends the same set again for
its warm-up, for ``--min-time`` and in every ``--repeat`` round, and a
replayed verdict would pass for a fast scan.  What the cache saves is
measured on its own, by the workloads of :mod:`workloads`.  The bare
pymilter milters (2a-2c) and the C libmilter milter (2d) are the peers'
floor: what one header costs in libmilter before any framework.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.metadata
import importlib.util
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import attrs
import loadgen
import peers
from miltermonkey_av.testing import Clamd
from miltermonkey_spam.testing import Spamd

from miltermonkey_core.testing.daemon import MonkeyProcess
from miltermonkey_core.testing.process import free_port, port_in_use

HERE = Path(__file__).resolve().parent
SPAM_LIMIT = loadgen.SPAMC_MAX_SIZE

#: A header every delivered message must carry: (name, only on messages up to
#: this many bytes; 0 = on all).
Marker = tuple[str, int]
#: How a contender is measured: through an MTA, the engines alone, or the
#: ceiling with Postfix's smtp-source as the client.
Kind = Literal["milter", "engine", "client"]


class Skip(Exception):
    """A contender cannot run here; the text says why (printed, and kept in the results)."""


@attrs.frozen
class Contender:
    """One registered contender (see the module's docstring)."""

    key: str
    #: ``{mta}`` in it becomes the MTA's name ("Postfix", "Sendmail").
    label: str
    start: Starter | None = None
    kind: Kind = "milter"
    markers: tuple[Marker, ...] = ()
    #: The functional check sends GTUBE (must be tagged) and EICAR (must be refused).
    spam: bool = False
    virus: bool = False
    #: Starting it needs the shared clamd and spamd.
    needs_engines: bool = False
    #: For kind "engine": what is asked of each message (clamd, spamd or both).
    engine: Literal["clamd", "spamd", "both"] | None = None
    #: The MTAs it can be measured through.
    mtas: tuple[str, ...] = ("postfix", "sendmail")
    #: Why it cannot run here, asked before anything is started for it.
    unavailable: Callable[[Resources], str | None] | None = None
    #: Measured on the mail this contender delivered (a second hop), not on the set.
    fed_by: str | None = None
    # --- what the ratios compare it with ----------------------------------------------------
    #: With the C milter (2d), the floor of any milter here.
    vs_c: bool = False
    #: A scanning contender: compared with the engines alone (E3) and with ``peer``.
    scanning: bool = False
    peer: str | None = None
    #: With the tuned bare pymilter milter (2b): MilterMonkey's own overhead.
    vs_bare_tuned: bool = False
    #: The same daemon with ``overlap = false``: p50 and rate with overlap vs without.
    serial: str | None = None

    def label_for(self, mta_title: str) -> str:
        return self.label.format(mta=mta_title)


@attrs.define
class Running:
    """A started contender: what the MTA points at and how to meter and stop it."""

    contender: Contender
    #: The milters in Postfix's ``smtpd_milters`` syntax ("" for none).
    spec: str
    #: The processes whose CPU and memory are the milter's (their trees, re-read each time).
    roots: Callable[[], list[int]]
    stop: Callable[[], None]
    #: Headers required besides the contender's own markers (decided at start).
    extra_markers: list[Marker] = attrs.field(factory=list)
    #: After a measurement of n messages: None if fine, else what is wrong.
    after: Callable[[int], str | None] | None = None
    notes: list[str] = attrs.field(factory=list)
    monkey: MonkeyProcess | None = None

    @property
    def markers(self) -> list[Marker]:
        return [*self.contender.markers, *self.extra_markers]

    @property
    def spam(self) -> bool:
        return self.contender.spam

    @property
    def virus(self) -> bool:
        return self.contender.virus


Starter = Callable[["Resources", Contender], Running]


@attrs.define
class Resources:
    """What contenders are started from: the state directory, the options, the shared engines."""

    work: Path
    args: argparse.Namespace
    clamd: Clamd | None = None
    spamd: Spamd | None = None
    #: Every MilterMonkey daemon started and not yet stopped (stopped at the end).
    monkeys: list[MonkeyProcess] = attrs.field(factory=list)
    secret_file: Path | None = None

    def engines(self) -> tuple[Clamd, Spamd]:
        assert self.clamd is not None and self.spamd is not None, "engines not started"
        return self.clamd, self.spamd

    def monkey(self, name: str, brains: list[dict[str, Any]], unix: bool = False,
               **daemon: Any) -> MonkeyProcess:
        # the cache off: see the module's docstring (workloads turn it on themselves)
        opts = {"debug_level": self.args.mm_debug_level, "milter_key": False,
                "tmpdir": str(self.work / "mm-tmp"), "cache": "off"}
        (self.work / "mm-tmp").mkdir(exist_ok=True)
        opts.update(daemon)
        m = MonkeyProcess(self.work / name, brains, opts, unix=unix, name=name)
        self.monkeys.append(m)
        m.start(timeout=60)
        return m

    def monkey_running(self, contender: Contender, m: MonkeyProcess, **kw: Any) -> Running:
        def stop() -> None:
            m.stop()
            with contextlib.suppress(ValueError):
                self.monkeys.remove(m)

        def roots() -> list[int]:
            # the supervisor; its worker and anything below count too
            return [m.proc.pid] if m.proc is not None and m.alive() else []

        return Running(contender, m.postfix_spec, roots, stop, monkey=m, **kw)

    def key_options(self, keyed: bool) -> dict[str, Any]:
        if not keyed:
            return {"milter_key": False}
        if self.secret_file is None:
            path = self.work / "miltersecret"
            out = subprocess.run([sys.executable, "-m", "miltermonkey_core", "key", "generate",
                                  "--file", str(path)], capture_output=True, text=True,
                                 timeout=60, check=False)
            if out.returncode != 0:
                raise Skip(f"miltermonkey key generate failed: {out.stdout}{out.stderr}")
            self.secret_file = path
        return {"milter_key": True, "miltersecretfile": str(self.secret_file)}

    def avspam_brains(self, skip_if_key: bool) -> list[dict[str, Any]]:
        clamd, spamd = self.engines()
        av: dict[str, Any] = {"use": "av", "clamd": [f"tcp:127.0.0.1:{clamd.tcp_port}"],
                              "relay_mode": True}
        spam: dict[str, Any] = {"use": "spam", "servers": [f"127.0.0.1:{spamd.port}"]}
        if skip_if_key:
            av["skip_if_key"] = spam["skip_if_key"] = True
        return [av, spam]


def brains_missing(_res: Resources | None = None) -> str | None:
    names = {ep.name for ep in importlib.metadata.entry_points(group="miltermonkey.brains")}
    missing = [b for b in ("av", "spam") if b not in names]
    if missing:
        return (f"brain package(s) not installed: {', '.join(missing)} (pip install -e "
                "plugins/miltermonkey-av -e plugins/miltermonkey-spam)")
    return None


def milterkey_missing(_res: Resources | None = None) -> str | None:
    if importlib.util.find_spec("miltermonkey_core.milterkey") is None:
        return "miltermonkey_core.milterkey is not available yet"
    return None


def keyed_hop_missing(res: Resources) -> str | None:
    return brains_missing(res) or milterkey_missing(res)


# --------------------------------------------------------------------------------------------
# how each kind of contender starts
# --------------------------------------------------------------------------------------------


def start_nothing(_res: Resources, c: Contender) -> Running:
    return Running(c, "", list, lambda: None)


def start_bare(res: Resources, c: Contender, *, tuned: bool, unix: bool) -> Running:
    """``bench/bare_milter.py``: pymilter adding one header, defaults or tuned."""
    w = res.work
    ready: Callable[[], bool]
    if unix:
        sockdir = w / "bare-sock"
        sockdir.mkdir(exist_ok=True)
        sockdir.chmod(0o755)
        sock = sockdir / "bare.sock"
        lib, spec, ready = f"unix:{sock}", f"unix:{sock}", sock.exists
    else:
        port = free_port()
        lib, spec = f"inet:{port}@127.0.0.1", f"inet:127.0.0.1:{port}"
        ready = functools.partial(port_in_use, port)
    (w / c.key).mkdir(exist_ok=True)
    cmd = [sys.executable, str(HERE / "bare_milter.py"), *(["--tuned"] if tuned else []), lib]
    child = peers.Child(c.key, cmd, w / c.key / "stdout.log")
    peers.wait_for(c.key, ready, 20, child.alive, child.log)
    return Running(c, spec, lambda: [child.pid] if child.alive() else [], child.stop)


def start_c_milter(res: Resources, c: Contender) -> Running:
    """``bench/c_milter.c``, compiled here against libmilter."""
    (res.work / c.key).mkdir(exist_ok=True)
    binary = res.work / c.key / "c_milter"
    why = peers.build_c_milter(binary)
    if why:
        raise Skip(why)
    port = free_port()
    child = peers.Child(c.key, [str(binary), f"inet:{port}@127.0.0.1"],
                        res.work / c.key / "stdout.log")
    peers.wait_for(c.key, lambda: port_in_use(port), 20, child.alive, child.log)
    return Running(c, f"inet:127.0.0.1:{port}", lambda: [child.pid] if child.alive() else [],
                   child.stop)


def start_monkey_trivial(res: Resources, c: Contender, *, unix: bool,
                         when: dict[str, Any] | None = None) -> Running:
    brain: dict[str, Any] = {"use": "trivial"}
    if when is not None:
        brain["when"] = when
    return res.monkey_running(c, res.monkey(c.key, [brain], unix=unix))


def start_clamav_milter(res: Resources, c: Contender) -> Running:
    clamd, _spamd = res.engines()
    one = peers.ClamavMilter(res.work / c.key, free_port(), clamd.tcp_port)
    one.start()
    return Running(c, one.postfix_spec, one.roots, lambda: peers.stop_many(one.children))


def start_spamass_milter(res: Resources, c: Contender) -> Running:
    _clamd, spamd = res.engines()
    one = peers.SpamassMilter(res.work / c.key, free_port(), spamd.port)
    one.start()
    return Running(c, one.postfix_spec, one.roots, lambda: peers.stop_many(one.children))


def start_monkey_one_brain(res: Resources, c: Contender, *, brain: str) -> Running:
    av, spam = res.avspam_brains(skip_if_key=False)
    m = res.monkey(c.key, [av if brain == "av" else spam])
    return res.monkey_running(c, m)


def start_peers(res: Resources, c: Contender) -> Running:
    """clamav-milter, then spamass-milter: the classic chain."""
    clamd, spamd = res.engines()
    # own directories: 4a and 4b run at the same time, from theirs
    cm = peers.ClamavMilter(res.work / "peers" / "clamav-milter", free_port(), clamd.tcp_port)
    sm = peers.SpamassMilter(res.work / "peers" / "spamass-milter", free_port(), spamd.port)
    try:
        cm.start()
        sm.start()
    except Exception:
        cm.stop()
        sm.stop()
        raise

    def stop() -> None:
        peers.stop_many([*sm.children, *cm.children])
        sm.children, cm.children = [], []

    return Running(c, f"{cm.postfix_spec}, {sm.postfix_spec}", lambda: cm.roots() + sm.roots(),
                   stop)


def start_monkey_avspam(res: Resources, c: Contender, *, overlap: bool = True) -> Running:
    """av + spam, signing a milter key when the core has one: hop 1 for mm-keyed.

    ``overlap = false`` runs the two engine calls one after the other (the
    daemon's default starts them together): the same daemon otherwise.
    """
    keyed = milterkey_missing() is None
    m = res.monkey(c.key, res.avspam_brains(skip_if_key=False), overlap=overlap,
                   **res.key_options(keyed))
    run = res.monkey_running(c, m, extra_markers=[("X-Milter-Key", 0)] if keyed else [])
    run.notes.append("signs a milter key (milter_key = true)" if keyed
                     else "milter key module not available: no signing")
    if not overlap:
        run.notes.append("overlap = false: av, then spam")
    return run


def start_monkey_keyed(res: Resources, c: Contender) -> Running:
    """Hop 2: av + spam with skip_if_key, every message must be recognised as scanned."""
    m = res.monkey(c.key, res.avspam_brains(skip_if_key=True), **res.key_options(True))

    def after(n: int) -> str | None:
        deadline = time.monotonic() + 5
        while True:
            skipped = m.log().count("trusted milter key: skipping")
            if skipped >= n or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        m.log_path.write_text("")
        if skipped < n:
            return f"only {skipped} of {n} messages had their brains skipped by the key"
        return None

    run = res.monkey_running(c, m, after=after)
    m.log_path.write_text("")
    return run


def start_mimedefang(res: Resources, c: Contender) -> Running:
    clamd, _spamd = res.engines()
    md = peers.MimeDefang(res.work / "mimedefang", free_port(), clamd.unix_socket,
                          res.args.spamd_children)
    try:
        md.start()
    except Exception as e:
        md.stop()
        raise Skip(f"MIMEDefang did not start: {e}") from e
    return Running(c, md.postfix_spec, md.roots, md.stop,
                   notes=[f"{res.args.spamd_children} pre-forked workers, clamd over its UNIX "
                          "socket (SCAN), SpamAssassin embedded"])


# --------------------------------------------------------------------------------------------
# the registry
# --------------------------------------------------------------------------------------------

REGISTRY: dict[str, Contender] = {}


def register(c: Contender) -> Contender:
    if c.key in REGISTRY:
        raise ValueError(f"contender {c.key!r} registered twice")
    REGISTRY[c.key] = c
    return c


BARE: tuple[Marker, ...] = (("X-Bench-Bare", 0),)
MONKEY: tuple[Marker, ...] = (("X-MilterMonkey", 0),)
VIRUS: tuple[Marker, ...] = (("X-Virus-Status", 0),)
SPAM: tuple[Marker, ...] = (("X-Spam-Status", SPAM_LIMIT),)
P = functools.partial

register(Contender("none", "1  {mta}, no milter (ceiling)", start_nothing))
register(Contender("smtp-source", "C  ceiling, smtp-source client", kind="client",
                   mtas=("postfix",)))
register(Contender("bare", "2a bare pymilter, defaults, TCP",
                   P(start_bare, tuned=False, unix=False), markers=BARE, vs_c=True))
register(Contender("bare-tuned", "2b bare pymilter, tuned, TCP",
                   P(start_bare, tuned=True, unix=False), markers=BARE, vs_c=True))
register(Contender("bare-unix", "2c bare pymilter, defaults, UNIX",
                   P(start_bare, tuned=False, unix=True), markers=BARE, vs_c=True))
register(Contender("c-tuned", "2d C libmilter milter, tuned, TCP", start_c_milter,
                   markers=(("X-Bench-C", 0),)))
register(Contender("mm-trivial", "3a miltermonkey trivial, TCP",
                   P(start_monkey_trivial, unix=False), markers=MONKEY, vs_c=True,
                   vs_bare_tuned=True))
register(Contender("mm-trivial-when", "3w miltermonkey trivial with a when condition, TCP",
                   # A condition that holds for the bench's client (it is not in
                   # TEST-NET-1): the brain runs, and the daemon asks for and
                   # decides the client's address for each session.
                   P(start_monkey_trivial, unix=False,
                     when={"client_not_in": ["192.0.2.0/24"]}),
                   markers=MONKEY, vs_c=True, vs_bare_tuned=True))
register(Contender("mm-trivial-unix", "3b miltermonkey trivial, UNIX",
                   P(start_monkey_trivial, unix=True), markers=MONKEY, vs_c=True,
                   vs_bare_tuned=True))
register(Contender("clamav-milter", "4a clamav-milter alone", start_clamav_milter,
                   markers=VIRUS, virus=True, needs_engines=True))
register(Contender("mm-av", "5a miltermonkey av alone", P(start_monkey_one_brain, brain="av"),
                   markers=VIRUS, virus=True, needs_engines=True, unavailable=brains_missing,
                   peer="clamav-milter"))
register(Contender("spamass-milter", "4b spamass-milter alone", start_spamass_milter,
                   markers=SPAM, spam=True, needs_engines=True))
register(Contender("mm-spam", "5b miltermonkey spam alone",
                   P(start_monkey_one_brain, brain="spam"), markers=SPAM, spam=True,
                   needs_engines=True, unavailable=brains_missing, peer="spamass-milter"))
register(Contender("peers", "4  clamav-milter + spamass-milter", start_peers,
                   markers=VIRUS + SPAM, spam=True, virus=True, needs_engines=True,
                   scanning=True))
register(Contender("mm-avspam", "5  miltermonkey av+spam", start_monkey_avspam,
                   markers=VIRUS + SPAM, spam=True, virus=True, needs_engines=True,
                   unavailable=brains_missing, scanning=True, peer="peers",
                   serial="mm-avspam-serial"))
register(Contender("mm-avspam-serial", "5s miltermonkey av+spam, overlap off",
                   P(start_monkey_avspam, overlap=False), markers=VIRUS + SPAM, spam=True,
                   virus=True, needs_engines=True, unavailable=brains_missing, scanning=True,
                   peer="peers"))
register(Contender("mm-keyed", "6  miltermonkey hop 2, valid key", start_monkey_keyed,
                   markers=(("X-Milter-Key", 0),), needs_engines=True,
                   unavailable=keyed_hop_missing, fed_by="mm-avspam", scanning=True,
                   peer="peers"))
register(Contender("mimedefang", "7  MIMEDefang clamd+SA", start_mimedefang,
                   markers=(("X-Scanned-By", 0), *SPAM), spam=True, virus=True,
                   needs_engines=True,
                   unavailable=lambda _res: peers.MimeDefang.unavailable_reason(),
                   scanning=True, peer="peers"))
register(Contender("clamd", "E1 clamd alone (INSTREAM)", kind="engine", engine="clamd",
                   needs_engines=True, mtas=()))
register(Contender("spamd", "E2 spamd alone (CHECK)", kind="engine", engine="spamd",
                   needs_engines=True, mtas=()))
register(Contender("engines", "E3 clamd+spamd alone", kind="engine", engine="both",
                   needs_engines=True, mtas=()))

ALL_CONTENDERS = tuple(REGISTRY)


def start(res: Resources, key: str) -> Running:
    """Start the registered contender ``key`` (a milter, or ``none``)."""
    c = REGISTRY[key]
    if c.start is None:
        raise ValueError(f"{key} is not started: it is measured as kind {c.kind}")
    why = c.unavailable(res) if c.unavailable is not None else None
    if why:
        raise Skip(why)
    return c.start(res, c)
