#!/usr/bin/env python3
"""MilterMonkey against its peers, on a real Postfix (and Sendmail), clamd and spamd, in one run.

    nox -s bench -- [--count N] [--concurrency C] [--sizes 2k,50k,1m,mix]
                    [--contenders LIST] [--repeat N] [--mta postfix,sendmail]
                    [--workloads retries,bulk,hosts|all|none] [--quick]
    (or, as root, in the dev venv:  python bench/run.py ...)

It starts on loopback a private Postfix (and with ``--mta``, a private
Sendmail) relaying to smtp-sink, one clamd and one spamd that every
contender shares, starts and checks every contender, then sends the same
message set at the same concurrency through each one in turn, size by size
(--repeat N: N interleaved rounds per size), through each MTA:

    none             the MTA without milter: the ceiling
    bare             bare pymilter milter adding a header, pymilter defaults, TCP
    bare-tuned       the same, TCP_NODELAY + connect/DATA answered, TCP
    bare-unix        the same as bare, UNIX socket
    c-tuned          a C libmilter milter adding a header, tuned like bare-tuned, TCP
    mm-trivial       MilterMonkey, trivial brain, TCP
    mm-trivial-when  the same with a `when` condition that holds (client_not_in), TCP
    mm-trivial-unix  MilterMonkey, trivial brain, UNIX socket
    peers            clamav-milter + spamass-milter chained (Debian)
    mm-avspam        MilterMonkey, av + spam brains (milter key signing when available)
    mm-avspam-serial the same with overlap = false: av, then spam (overlap vs not, same run)
    mm-keyed         MilterMonkey hop 2: av + spam with skip_if_key, fed mail keyed by hop 1
    mimedefang       MIMEDefang with clamd and embedded SpamAssassin
    clamd, spamd, engines   the engines alone (INSTREAM, CHECK, both per message)
    smtp-source      the Postfix ceiling again with Postfix's smtp-source as the client

then every milter again with --one-session N messages sent one after
another in a single SMTP session, each timed on its own, then the workloads
where a scan cache saves work, and finally the memory checks (20 concurrent
sessions; one 50 MB message).

Every contender's MilterMonkey daemon runs with ``cache = "off"``: its rows
measure unique mail, though the warm-up, --min-time and --repeat send the
same set again.  The workloads (--workloads; all of them in a full run, i.e.
without --contenders and --quick; none otherwise unless named) each run
twice, with the cache off and on, on the mix set of --count messages:

    retries  a front Postfix relays to the milter'ed one; 20% of messages get a
             451 from the tempfail-once brain (bench/brains) on their first
             attempt, after av and spam, and the front retries them
    bulk     each body of the set to 5 recipients in 5 transactions
    hosts    two av+spam daemons sharing one Redis as their cache; host 2 is
             fed what host 1 delivered

with the engines alone on the same unique mail (E3) as the reference.
Results are printed and written to bench-results/ as JSON and Markdown.
Needs root (the MTAs, daemons dropping to their users).  See
docs/benchmarks.md.

The benchmark's modules, by job: ``run`` (this: options, main), ``runner``
(the run: shared parts, start and check, rounds), ``contenders`` (the
registry), ``mtas`` (Postfix and Sendmail), ``measure`` (load runs and
their rows), ``workloads`` (retries, bulk, two hosts), ``checks``,
``memory``, ``report`` (tables, ratios, files); below them ``loadgen``,
``messages``, ``procstats``, ``cachestats`` (a daemon's cache counters) and
``peers``; ``brains/`` is the tempfail-once brain's distribution.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import traceback
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import messages  # noqa: E402
import peers  # noqa: E402
import report  # noqa: E402
import workloads  # noqa: E402
from console import log, loud  # noqa: E402
from contenders import ALL_CONTENDERS  # noqa: E402
from mtas import MTAS  # noqa: E402
from runner import Bench  # noqa: E402


def _names(text: str) -> list[str]:
    return [c.strip() for c in text.split(",") if c.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="MilterMonkey vs peers on a private Postfix (and Sendmail), clamd and spamd "
        "(root).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="contenders: " + ", ".join(ALL_CONTENDERS))
    ap.add_argument("--count", type=int, default=None,
                    help="messages per size and contender (default 200; --quick 30)")
    ap.add_argument("--concurrency", type=int, default=5, help="concurrent SMTP sessions (5)")
    ap.add_argument("--sizes", default=None,
                    help="comma list of 2k, 50k, 1m, mix (default all; --quick 2k)")
    ap.add_argument("--contenders", default=None,
                    help="comma list (default all); prefix a name with - to leave it out")
    ap.add_argument("--mta", default="postfix",
                    help="comma list of the MTAs every milter contender is measured through: "
                    f"{', '.join(MTAS)} (postfix); Sendmail is the private one of the test kit")
    ap.add_argument("--one-session", type=int, default=50, metavar="N",
                    help="per milter and MTA, also send N 2k messages one after another in ONE "
                    "SMTP session and time each (50; 0 = off)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds per size: the contenders are measured in turn, N times over "
                    "(1); the tables show each one's median round and the range")
    ap.add_argument("--workloads", default=None,
                    help="comma list of " + ", ".join(workloads.WORKLOADS) + ", or all or "
                    "none: the scan cache's workloads on the mix set of --count messages, "
                    "cache off and on (default: all in a full run, none with --contenders "
                    "or --quick)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 30 messages of 2k, short memory tests, 10 MB big message")
    ap.add_argument("--warmup", type=int, default=None,
                    help="warm-up messages before each measurement (default 2 x concurrency, "
                    "at least 10)")
    ap.add_argument("--min-time", type=float, default=None,
                    help="a measurement shorter than this many seconds is repeated with the "
                    "set sent several times over (default 5; --quick 0 = off)")
    ap.add_argument("--spamd-children", type=int, default=5,
                    help="spamd --max-children, also MIMEDefang's workers (5)")
    ap.add_argument("--mm-debug-level", type=int, default=10,
                    help="MilterMonkey debug_level for every daemon (10, the default config)")
    ap.add_argument("--big-mb", type=int, default=None, help="size of the big message (50)")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory tests")
    ap.add_argument("--seed", type=int, default=1, help="message set seed")
    ap.add_argument("--workdir", default=None,
                    help="state directory (default: a new /tmp/mm-bench-*; removed afterwards "
                    "unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the state directory (logs)")
    ap.add_argument("--results-dir", default=str(ROOT / "bench-results"),
                    help="where the JSON and Markdown go (default bench-results/)")
    a = ap.parse_args(argv)
    a.count = a.count or (30 if a.quick else 200)
    if a.repeat < 1:
        ap.error("--repeat must be at least 1")
    if a.one_session < 0:
        ap.error("--one-session must be 0 (off) or more")
    a.sizes = _names(a.sizes or ("2k" if a.quick else "2k,50k,1m,mix"))
    for s in a.sizes:
        if s not in (*messages.SIZES, "mix"):
            ap.error(f"unknown size {s!r}")
    a.mta = _names(a.mta)
    for m in a.mta:
        if m not in MTAS:
            ap.error(f"unknown MTA {m!r}; choose from {', '.join(MTAS)}")
    if not a.mta or len(set(a.mta)) != len(a.mta):
        ap.error("--mta names each MTA once")
    chosen = list(ALL_CONTENDERS)
    contenders_given = a.contenders is not None
    if a.contenders:
        items = _names(a.contenders)
        if all(i.startswith("-") for i in items):
            chosen = [c for c in ALL_CONTENDERS if f"-{c}" not in items]
        else:
            chosen = items
        for c in chosen:
            if c not in ALL_CONTENDERS:
                ap.error(f"unknown contender {c!r}; choose from {', '.join(ALL_CONTENDERS)}")
    a.contenders = chosen
    wl = a.workloads if a.workloads is not None else (
        "none" if a.quick or contenders_given else "all")
    a.workloads = (list(workloads.WORKLOADS) if wl == "all" else [] if wl == "none"
                   else _names(wl))
    for w in a.workloads:
        if w not in workloads.WORKLOADS:
            ap.error(f"unknown workload {w!r}; choose from {', '.join(workloads.WORKLOADS)}, "
                     "all, none")
    a.warmup = a.warmup if a.warmup is not None else max(10, 2 * a.concurrency)
    a.big_mb = a.big_mb or (10 if a.quick else 50)
    a.min_time = a.min_time if a.min_time is not None else (0.0 if a.quick else 5.0)
    return a


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench/run.py needs root: it runs a private Postfix and daemons that drop to "
              "their own users", file=sys.stderr)
        return 2
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="mm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o755)  # the daemons' users must reach their own directories below it

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGINT too: a shell starting us in the background (cmd &) leaves it ignored
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, on_signal)
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    machine = report.machine_info()  # now: its load average is the one at the start
    bench = Bench(args, work)
    log(f"state in {work}; {args.count} messages per size, {args.concurrency} sessions, "
        f"sizes {','.join(args.sizes)}; contenders {','.join(args.contenders)}"
        + (f"; MTAs {','.join(args.mta)}" if args.mta != ["postfix"] else "")
        + (f"; workloads {','.join(args.workloads)}" if args.workloads else ""))
    status = 0
    try:
        bench.run()
    except KeyboardInterrupt as e:
        loud(f"interrupted ({e or 'Ctrl-C'}): stopping everything")
        status = 130
    except Exception:
        traceback.print_exc()
        status = 1
    finally:
        bench.stop_everything()
        for child in list(peers.STARTED):
            with contextlib.suppress(Exception):
                child.stop()
    data = {
        "started": started,
        "command": " ".join(["python bench/run.py", *(argv if argv is not None
                                                       else sys.argv[1:])]),
        "args": dict(vars(args)),
        "machine": machine,
        "versions": report.versions(args.mta),
        "results": bench.results,
        "sessions": bench.sessions,
        "ratios": report.ratios(bench.results),
        "checks": bench.checks,
        "skipped": bench.skipped,
        "memory": bench.memory,
        "workloads": bench.workload_rows,
        "loadavg_end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "status": status,
    }
    print(report.text_report(data))
    if bench.results or bench.memory or bench.sessions or bench.workload_rows:
        outdir = Path(args.results_dir)
        outdir.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        (outdir / f"bench-{stamp}.json").write_text(json.dumps(data, indent=2) + "\n",
                                                    encoding="utf-8")
        (outdir / f"bench-{stamp}.md").write_text(report.markdown_report(data) + "\n",
                                                  encoding="utf-8")
        log(f"results: {outdir}/bench-{stamp}.json and .md")
    problems = [p for r in (*bench.results, *bench.sessions, *bench.workload_rows)
                for p in r.get("problems", [])]
    if problems:
        loud(f"{len(problems)} problem(s) in this run; see the table")
        status = status or 1
    if args.keep or status:
        log(f"state kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
