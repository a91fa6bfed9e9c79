"""Mutation testing of the security paths: ``nox -s mutants`` runs this file.

Why mutmut (3.x) and not cosmic-ray: cosmic-ray applies each mutant to the
file in place and runs the whole test command per mutant, which on a working
tree shared with other test runs breaks them, and costs a pytest start per
mutant.  mutmut writes every mutant into a ``mutants/`` copy behind a
trampoline, records which tests reach which function once, and then runs
only those tests per mutant in forked workers.  It runs on Python 3.11 with
this layout (the package at the top of the repository, the tests importing
it by its full name).

Each target of ``targets.toml`` is copied into a work directory first, so
mutmut's ``mutants/`` tree, its cache and its ``setup.cfg`` never land in
the repository.  The score is worked out here from mutmut's results:
killed (or timed out) over all mutants minus the equivalent ones listed in
``equivalent.txt``; the run fails below the target's threshold.

Usage: python tests/mutants/run.py [--work DIR] [--max-children N] [--keep]
[--target NAME] [--show-survivors]
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
#: mutmut's outcomes that mean a test noticed the mutant.
DETECTED = {"killed", "timeout", "caught by type check", "segfault"}
#: Exit codes mutmut stores per mutant (mutmut.stats.status_by_exit_code).
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests",
          34: "skipped", 36: "timeout", 37: "caught by type check", 24: "timeout",
          -24: "timeout", 152: "timeout", 255: "timeout", -11: "segfault", -9: "segfault",
          None: "not checked"}


def load_targets(path: Path = HERE / "targets.toml") -> list[dict[str, Any]]:
    targets: list[dict[str, Any]] = tomllib.loads(path.read_text())["target"]
    return targets


def load_equivalent(path: Path = HERE / "equivalent.txt") -> dict[str, str]:
    """``mutant name  reason`` lines; ``#`` starts a comment line."""
    out: dict[str, str] = {}
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, _, reason = line.partition(" ")
        if not reason.strip():
            raise SystemExit(f"{path}:{lineno}: {name}: give the reason it is equivalent")
        out[name] = reason.strip()
    return out


def setup_cfg(target: dict[str, Any]) -> str:
    def block(key: str, values: Iterable[str]) -> str:
        return f"{key} =\n" + "".join(f"    {v}\n" for v in values)

    return ("[mutmut]\n" + block("source_paths", [target["source"]])
            + block("only_mutate", target["mutate"])
            + block("pytest_add_cli_args_test_selection", target["tests"])
            + block("pytest_add_cli_args", ["-p", "no:cacheprovider", "-q"])
            + "use_git_change_detection = false\n")


def prepare(target: dict[str, Any], work: Path, keep: bool) -> None:
    """Copy the target's package, tests and extra files into ``work``."""
    root = REPO / target["root"]
    if work.exists() and not keep:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for rel in [target["source"], *target["tests"], *target.get("copy", [])]:
        src, dst = root / rel, work / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=ignore, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dst)
    (work / "setup.cfg").write_text(setup_cfg(target))


def results(work: Path, target: dict[str, Any]) -> dict[str, dict[str, str]]:
    """``{module path: {mutant name: status}}`` from mutmut's ``.meta`` files."""
    out: dict[str, dict[str, str]] = {}
    mutants = work / "mutants"
    for meta in sorted(mutants.rglob("*.py.meta")):
        module = str(meta.relative_to(mutants)).removesuffix(".meta")
        if not any(fnmatch.fnmatch(module, p) for p in target["mutate"]):
            continue
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        out[module] = {name: STATUS.get(code, "suspicious") for name, code in codes.items()}
    return out


def score(target: dict[str, Any], found: dict[str, dict[str, str]], equivalent: dict[str, str],
          show: bool) -> bool:
    """Print the table; True when the target reaches its threshold."""
    threshold = float(target.get("threshold", 95))
    print(f"\n== {target['name']}: mutation score (killed / non-equivalent mutants)")
    print(f"{'module':48} {'mutants':>7} {'equiv':>5} {'killed':>6} {'survived':>8} "
          f"{'score':>7}")
    total_all = killed_all = 0
    survivors: list[str] = []
    for module, statuses in found.items():
        counted = {n: s for n, s in statuses.items() if n not in equivalent and s != "skipped"}
        killed = sum(1 for s in counted.values() if s in DETECTED)
        equiv = sum(1 for n in statuses if n in equivalent)
        survivors += [f"{n} ({s})" for n, s in counted.items() if s not in DETECTED]
        total_all += len(counted)
        killed_all += killed
        pct = 100.0 * killed / len(counted) if counted else 100.0
        print(f"{module:48} {len(statuses):7} {equiv:5} {killed:6} {len(counted) - killed:8} "
              f"{pct:6.1f}%")
    pct_all = 100.0 * killed_all / total_all if total_all else 100.0
    print(f"{'all':48} {'':7} {'':5} {killed_all:6} {total_all - killed_all:8} {pct_all:6.1f}%"
          f"   (threshold {threshold:g}%)")
    known = {n for statuses in found.values() for n in statuses}
    module_prefixes = tuple(m.removesuffix(".py").replace("/", ".") + "." for m in found)
    stale = [n for n in equivalent if n.startswith(module_prefixes) and n not in known]
    wrong = [n for statuses in found.values() for n, s in statuses.items()
             if n in equivalent and s in DETECTED]
    for n in stale:
        print(f"equivalent.txt: {n} no longer exists (the function changed): check the list")
    for n in wrong:
        print(f"equivalent.txt: {n} is killed by a test, so it is not equivalent: remove it")
    if show or pct_all < threshold:
        print("surviving mutants (see one with: cd WORK && mutmut show NAME):")
        for s in survivors:
            print(f"  {s}")
    return pct_all >= threshold


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=REPO / ".nox" / "mutants-work",
                        help="where the copies and mutmut's results go")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--keep", action="store_true",
                        help="reuse the last run's work directory: mutmut re-runs only "
                        "the mutants of changed functions, not those a changed test might "
                        "now kill")
    parser.add_argument("--target", action="append", help="run only these targets (by name)")
    parser.add_argument("--show-survivors", action="store_true")
    args = parser.parse_args(argv)
    equivalent = load_equivalent()
    ok = True
    for i, target in enumerate(load_targets()):
        if args.target and target["name"] not in args.target:
            continue
        work = args.work / str(i)
        prepare(target, work, args.keep)
        run = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children",
                              str(args.max_children)], cwd=work, check=False)
        if run.returncode != 0:
            print(f"mutmut failed on {target['name']} (exit {run.returncode}); work "
                  f"directory {work}")
            return run.returncode
        ok = score(target, results(work, target), equivalent, args.show_survivors) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
