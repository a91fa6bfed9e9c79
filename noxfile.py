"""Developer sessions: ``nox -s tests`` (the whole suite, real parts included),
``lint``, ``types``, ``e2e`` and ``bench``.

Every session installs the core, both brain packages and the test brains
into its own virtualenv from this checkout, so what is tested is what
``pip install`` gives a user.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "types", "layers"]
nox.options.reuse_existing_virtualenvs = True

PACKAGES = ["-e", ".", "-e", "plugins/miltermonkey-av", "-e", "plugins/miltermonkey-spam",
            "-e", "tests/dists/miltermonkey-fixture-brains",
            "-e", "tests/dists/miltermonkey-keytest-brains"]


#: pymilter is no part of the daemon: the test suite uses it as an independent
#: milter to check the test kit's MTA side against, and the benchmarks as the
#: bare-milter contender.
DEV_TOOLS = ["pytest>=8", "hypothesis>=6.100", "pymilter>=1.0.5", "redis>=5",
             # tests/meta/test_packaging.py builds the wheels users install
             "build>=1.2", "setuptools>=77"]

#: miltertest (GPLv3) is an MTA side independent of ours, for
#: tests/daemon/test_quit_nc_miltertest.py: installed for the tests only, never a
#: dependency of a MilterMonkey package.
DEV_TOOLS += ["miltertest>=1.0"]


def install_project(session: nox.Session) -> None:
    session.install(*PACKAGES)
    session.install(*DEV_TOOLS)


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite, including real Postfix, clamd and spamd tests."""
    install_project(session)
    session.run("pytest", *(session.posargs or ["-q"]))


#: The distributions published to a package index, in dependency order.
DISTRIBUTIONS = [".", "plugins/miltermonkey-av", "plugins/miltermonkey-spam"]


@nox.session
def build(session: nox.Session) -> None:
    """Sdists and wheels of miltermonkey-core, -av and -spam into dist/, checked by twine.

    Each wheel is built from its sdist (python -m build), so a file missing
    from an sdist fails here rather than on a user's machine.
    """
    import pathlib

    session.install("build>=1.2", "twine>=5")
    dist = pathlib.Path("dist")
    for old in dist.glob("miltermonkey[-_]*"):  # this project's files only
        old.unlink()
    for source in DISTRIBUTIONS:
        session.run("python", "-m", "build", "--outdir", str(dist), source)
    built = sorted(str(p) for p in dist.glob("miltermonkey[-_]*"))
    session.run("twine", "check", "--strict", *built)
    session.log("built: " + ", ".join(built))


@nox.session
def e2e(session: nox.Session) -> None:
    """Only the end-to-end tests through a real Postfix."""
    install_project(session)
    session.run("pytest", "-m", "e2e", *(session.posargs or ["-q"]))


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over everything."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", "miltermonkey_core", "plugins", "tests", "bench", "examples",
                "noxfile.py")


@nox.session
def layers(session: nox.Session) -> None:
    """import-linter: each layer of the core imports only the ones below it."""
    install_project(session)
    session.install("import-linter>=2.1")
    session.run("lint-imports")


@nox.session
def types(session: nox.Session) -> None:
    """mypy --strict: the core, both brains, the example brain and what new-brain writes."""
    install_project(session)
    session.install("mypy>=1.10")
    session.run("mypy", "miltermonkey_core")
    session.run("mypy", "--strict", "plugins/miltermonkey-av/miltermonkey_av")
    session.run("mypy", "--strict", "plugins/miltermonkey-spam/miltermonkey_spam")
    session.run("mypy", "--strict", "examples/miltermonkey-subject-tag/miltermonkey_subject_tag")
    # What `miltermonkey new-brain` writes is held to the same standard (and to ruff).
    import pathlib
    import shutil
    import tempfile

    session.install("ruff>=0.5")
    scaffold = pathlib.Path(tempfile.mkdtemp(prefix="mm-new-brain-"))  # ruff skips .nox/
    try:
        session.run("miltermonkey", "new-brain", "hello", "--directory", str(scaffold))
        session.run("mypy", "--strict", str(scaffold / "hello" / "miltermonkey_hello"),
                    str(scaffold / "hello" / "tests"))
        session.run("ruff", "check", str(scaffold / "hello"))
    finally:
        shutil.rmtree(scaffold)


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site, in strict mode (any warning fails), into site/.

    The core and both brain packages are installed because the option tables
    and the hook reference are generated from their code.
    """
    install_project(session)
    session.install("mkdocs~=1.6.1", "mkdocs-material~=9.8.2")
    session.run("mkdocs", "build", "--strict", "--clean", "--site-dir", "site", *session.posargs,
                env={"NO_MKDOCS_2_WARNING": "1"})  # material's end-of-life banner


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks against the peers on real Postfix, clamd and spamd (needs root)."""
    install_project(session)
    session.install("-e", "bench/brains")  # the retry workload's tempfail-once brain
    session.run("python", "bench/run.py", *session.posargs)


@nox.session
def long(session: nox.Session) -> None:
    """The long reliability runs: 100,000-message RSS, 10,000+ fuzz cases, 300-message faults.

    Results are recorded in docs/operations.md.
    """
    install_project(session)
    session.run("pytest", "-s", "tests/e2e/test_reliability_postfix.py",
                "tests/daemon/test_fuzz.py",
                "tests/daemon/test_reliability.py::test_no_leak_over_many_messages",
                "tests/e2e/test_metrics_postfix.py",
                "plugins/miltermonkey-av/tests/test_av_limits_long.py",
                "tests/daemon/test_connection_drill.py", *session.posargs,
                env={"MILTERMONKEY_LONG": "1", "MILTERMONKEY_FAULT_REPORT": "faults.json",
                     "MILTERMONKEY_FUZZ_REPORT": "fuzz.json",
                     "MILTERMONKEY_DRILL_REPORT": "drill.json"})
    session.notify("fleet")  # then the fleet drills (tests/fleet, figures in docs/deployment.md)


@nox.session
def fleet(session: nox.Session) -> None:
    """Fleet drills (needs root): 3 monkey hosts in network namespaces behind HAProxy.

    The test creates and removes its namespaces, bridge and processes itself;
    figures go to fleet.json and into docs/deployment.md.
    """
    import tempfile

    install_project(session)
    # A base directory of its own (other pytest runs on the machine prune the
    # shared one), in /tmp: clamd, running as clamav, writes its temporary files
    # where TMPDIR says, and a nox tmp directory is root's.
    base = tempfile.mkdtemp(prefix="miltermonkey-fleet-")
    session.run("pytest", "-s", "tests/fleet", f"--basetemp={base}", *session.posargs,
                env={"MILTERMONKEY_FLEET": "1", "MILTERMONKEY_FLEET_REPORT": "fleet.json"})


@nox.session
def mutants(session: nox.Session) -> None:
    """Mutation testing of the security paths (milter key, context); not run in CI.

    Targets, thresholds and equivalent mutants: tests/mutants/. The working
    tree is never mutated: each target runs in a copy under .nox/.
    """
    install_project(session)
    session.install("mutmut==3.8.1")
    session.run("python", "tests/mutants/run.py", *session.posargs)
