"""EICAR hidden past a scanner's limits, through ``miltermonkey try``: what does the av brain say?

Starts a private clamd with the test signatures (``miltermonkey_av.testing.Clamd``)
configured the way Debian ships it, without ``AlertExceedsMax`` (or with it:
``--alert-exceeds-max``), writes one configuration with the ``av`` brain on
it, and runs the real command, ``miltermonkey try -c CONFIG --macro i=QID
MESSAGE.eml``, over EICAR at the bottom of:

* ``fwd-N``: N levels of "forward as attachment" (``message/rfc822``);
* ``mp-N``: N nested ``multipart/mixed`` bodies;
* ``parts-N``: N text parts before it;
* ``zip-N``: a zip in a zip ... N archives deep (deflated);
* ``zip0-N``: the same, stored (no compression);
* ``bomb-N``: 10 zips of 10 files of N MiB of zeros, EICAR in the last
  (``bomb-100`` is the issue's 10 GB zip; it takes about 20 s to build).

Each line gives the exit status of ``miltermonkey try`` (0 delivered, 4
tempfail, 5 refused), its verdict line and the ``X-Virus-Status`` it would
add.  Run as root (clamd drops to its own user):

    python bench/limits_drill.py [--alert-exceeds-max] [--set OPTION=VALUE ...] [CASE ...]

``--set`` adds an option to the ``[[brain]]`` table (a TOML value:
``--set 'limits_action="accept"'``).  The messages and the configuration
stay in ``--workdir`` (printed) to run ``miltermonkey try`` on by hand.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from miltermonkey_av.testing import Clamd, samples, signature_files

from miltermonkey_core.testing.process import free_port

DEFAULT_CASES = ("fwd-5", "fwd-15", "fwd-20", "fwd-50", "mp-20", "parts-1000", "parts-10000",
                 "parts-50000", "zip-5", "zip-15", "zip-16", "zip-20", "zip0-20")

BUILDERS: dict[str, Callable[[int], bytes]] = {
    "fwd": samples.nested_rfc822,
    "mp": samples.nested_multipart,
    "parts": samples.many_parts,
    "zip": samples.nested_zip_message,
    "zip0": lambda depth: samples.nested_zip_message(depth, stored=True),
    "bomb": samples.zip_bomb_message,
}


class DrillClamd(Clamd):
    """The test clamd with ``AlertExceedsMax`` set as the drill says, whatever the default."""

    alert_exceeds_max = False

    def _write_config(self) -> None:
        super()._write_config()
        lines = [ln for ln in self.config_path.read_text().splitlines()
                 if not ln.startswith("AlertExceedsMax")]
        lines.append(f"AlertExceedsMax {'yes' if self.alert_exceeds_max else 'no'}")
        self.config_path.write_text("\n".join(lines) + "\n")


def build(case: str) -> bytes:
    kind, _, number = case.rpartition("-")
    if kind not in BUILDERS or not number.isdigit():
        raise SystemExit(f"unknown case {case!r}: use {', '.join(BUILDERS)} followed by -N")
    return BUILDERS[kind](int(number))


def summary(output: str) -> tuple[str, str]:
    verdict = next((ln.removeprefix("verdict: ") for ln in output.splitlines()
                    if ln.startswith("verdict: ")), "?")
    status = re.search(r"add header X-Virus-Status: (.*)", output)
    return verdict, status.group(1) if status else "-"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="*", default=list(DEFAULT_CASES))
    parser.add_argument("--alert-exceeds-max", action="store_true",
                        help="configure clamd with AlertExceedsMax yes")
    parser.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                        help="an av brain option, as a TOML assignment")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the messages and the configuration stay (default: a new "
                             "temporary directory, printed)")
    args = parser.parse_args(argv)
    miltermonkey = shutil.which("miltermonkey", path=str(Path(sys.executable).parent))
    if miltermonkey is None:
        raise SystemExit("miltermonkey is not installed beside this python")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="limits-drill-"))
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o755)  # clamd, running as its own user, keeps its state in here
    DrillClamd.alert_exceeds_max = args.alert_exceeds_max
    clamd = DrillClamd(work / "clamd", free_port(), db_files=signature_files())
    clamd.start()
    try:
        config = work / "drill.toml"
        extra = "".join(f"{assignment}\n" for assignment in args.set)
        config.write_text('[miltermonkey]\nhostname = "mx.example.org"\nmilter_key = false\n\n'
                          f'[[brain]]\nuse = "av"\nclamd = ["unix:{clamd.unix_socket}"]\n{extra}')
        print(f"in {work}: clamd AlertExceedsMax {'yes' if args.alert_exceeds_max else 'no'}; "
              f"brain options: {', '.join(args.set) or 'defaults'}")
        print("| case | bytes | exit | seconds | verdict | X-Virus-Status |")
        print("|---|---:|---:|---:|---|---|")
        for case in args.cases:
            eml = work / f"{case}.eml"
            eml.write_bytes(build(case))
            qid = "DRILL" + re.sub(r"[^A-Za-z0-9]", "", case).upper()
            t0 = time.monotonic()
            done = subprocess.run([miltermonkey, "try", "-c", str(config), "--macro",
                                   f"i={qid}", "-v", str(eml)],
                                  capture_output=True, text=True, check=False)
            seconds = time.monotonic() - t0
            verdict, status = summary(done.stdout)
            if done.returncode not in (0, 4, 5):
                verdict = f"error: {done.stderr.strip()[-200:]}"
            print(f"| {case} | {eml.stat().st_size} | {done.returncode} | {seconds:.2f} "
                  f"| {verdict} | {status} |", flush=True)
    finally:
        clamd.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
