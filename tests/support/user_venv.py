"""Install MilterMonkey the way a user does: built distributions, a fresh virtualenv, pip.

The development environment has everything installed editable, which hides
what a published wheel would lack (a data file left out, a wrong dependency,
an entry point only an editable install registers).  These helpers build real
sdists and wheels and install them into a new virtualenv with its own pip.

Our packages come only from the local wheel directory (``--no-index``), so a
same-named project on a public index can never stand in for them; their
third-party dependencies are installed first, from the configured index,
read from the wheels' own metadata.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from email.message import Message
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from miltermonkey_core.testing.daemon import render_config
from miltermonkey_core.testing.process import free_port

ROOT = Path(__file__).resolve().parents[2]
REQUIRE_ENV = "MILTERMONKEY_REQUIRE_STACK"

#: The distributions this project publishes, by source directory.
SOURCES: Mapping[str, Path] = {
    "miltermonkey-core": ROOT,
    "miltermonkey-av": ROOT / "plugins" / "miltermonkey-av",
    "miltermonkey-spam": ROOT / "plugins" / "miltermonkey-spam",
}


def missing(reason: str) -> None:
    """Skip the test where a build tool or the package index is missing; fail it in CI."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1 requires it)", pytrace=False)
    pytest.skip(reason)


def run(cmd: Sequence[str | Path], *, cwd: Path | None = None, timeout: float = 600,
        env: Mapping[str, str] | None = None,
        status: int = 0) -> subprocess.CompletedProcess[str]:
    """Run a command; unless it exits ``status``, fail the test with its output."""
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, check=False)
    if proc.returncode != status:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
                    f"--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}",
                    pytrace=False)
    return proc


def build_distributions(sources: Iterable[Path], outdir: Path) -> list[Path]:
    """``python -m build`` each source into ``outdir``; returns the files built.

    Each wheel is built from its sdist, as ``nox -s build`` does: a file
    missing from the sdist fails here, and setuptools' ``build/`` directory in
    the checkout (which keeps modules deleted since) never reaches a wheel.
    The build backend is the one installed in this environment
    (``--no-isolation``: no index round trip per build); ``nox -s build``
    builds in isolation.
    """
    try:
        import build  # noqa: F401  (only its presence is checked)
    except ImportError:
        missing("the 'build' package is not installed (nox -s tests installs it)")
    outdir.mkdir(parents=True, exist_ok=True)
    before = set(outdir.iterdir())
    for source in sources:
        run([sys.executable, "-m", "build", "--no-isolation", "--outdir", outdir, source])
    return sorted(set(outdir.iterdir()) - before)


def wheel_metadata(wheel: Path) -> Message:
    """The METADATA of a wheel, as email headers (Name, Version, Requires-Dist...)."""
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return Parser().parsestr(z.read(name).decode())


def wheels_by_name(wheel_dir: Path) -> dict[str, Path]:
    return {canonicalize_name(wheel_metadata(w)["Name"]): w for w in wheel_dir.glob("*.whl")}


def third_party_requirements(wheel_dir: Path, wanted: Iterable[str]) -> list[str]:
    """What ``wanted`` (``"miltermonkey-core[test]"``...) needs from outside ``wheel_dir``.

    Follows our own packages' Requires-Dist (with their extras) through the
    wheels in ``wheel_dir`` and returns every requirement on anything else,
    markers for this interpreter already applied.
    """
    ours = wheels_by_name(wheel_dir)
    queue = [Requirement(w) for w in wanted]
    seen: set[tuple[str, frozenset[str]]] = set()
    found: dict[str, str] = {}
    while queue:
        req = queue.pop()
        name = canonicalize_name(req.name)
        if name not in ours:
            extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
            found.setdefault(f"{name}{extras}", f"{req.name}{extras}{req.specifier}")
            continue
        key = (name, frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        for line in wheel_metadata(ours[name]).get_all("Requires-Dist") or []:
            dep = Requirement(line)
            if dep.marker is None or any(dep.marker.evaluate({"extra": e})
                                         for e in (*req.extras, "")):
                queue.append(dep)
    return sorted(found.values())


class UserVenv:
    """A new virtualenv with its own pip, as ``python3 -m venv`` gives a user."""

    def __init__(self, path: Path, python: str | Path = sys.executable) -> None:
        self.path = path
        run([python, "-m", "venv", path])
        self.bin = path / "bin"
        self.python = self.bin / "python"

    def pip(self, *args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return run([self.python, "-m", "pip", "--disable-pip-version-check", *args],
                   timeout=timeout)

    def install_from(self, wheel_dir: Path, *requirements: str) -> None:
        """``pip install --no-index --find-links wheel_dir REQ...``, dependencies first.

        Third-party dependencies come from the package index, as wheels only
        (nothing may need a compiler); ours only from ``wheel_dir``.
        """
        outside = third_party_requirements(wheel_dir, requirements)
        if outside:
            self.pip("install", "--only-binary", ":all:", *outside)
        self.pip("install", "--no-index", "--find-links", wheel_dir, *requirements)

    def command(self, name: str, *args: str | Path, cwd: Path | None = None,
                timeout: float = 600, env: Mapping[str, str] | None = None,
                status: int = 0) -> subprocess.CompletedProcess[str]:
        """Run a console script of this virtualenv (``miltermonkey``, ``pytest``...)."""
        return run([self.bin / name, *args], cwd=cwd, timeout=timeout, env=env, status=status)

    def impure_distributions(self) -> list[str]:
        """Installed distributions whose wheel is not pure Python (needed a compiler)."""
        impure = []
        for wheel_file in self.path.glob("lib/python*/site-packages/*.dist-info/WHEEL"):
            text = wheel_file.read_text()
            if "Root-Is-Purelib: true" not in text:
                impure.append(wheel_file.parent.name)
        return sorted(impure)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class VenvDaemon:
    """``miltermonkey run`` from a user's virtualenv, on a free loopback port.

    The test kit's ``monkey_daemon`` runs the daemon with the test run's own
    interpreter; a brain installed only in the user's virtualenv needs that
    virtualenv's ``miltermonkey`` instead.
    """

    def __init__(self, venv: UserVenv, workdir: Path,
                 brains: Sequence[Mapping[str, object]]) -> None:
        self.venv = venv
        self.port = free_port()
        self.log_path = workdir / "monkey.log"
        self.config = workdir / "monkey.toml"
        self.config.write_text(render_config(
            {"connection": f"inet:{self.port}@127.0.0.1", "log_target": str(self.log_path),
             "debug_level": 60, "milter_key": False}, brains))
        self.output = workdir / "monkey.out"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def postfix_spec(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 30.0) -> VenvDaemon:
        with self.output.open("wb") as out:
            self.proc = subprocess.Popen([self.venv.bin / "miltermonkey", "run", "-c", self.config],
                                         stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"miltermonkey exited {self.proc.returncode}:\n"
                            f"{self.output.read_text(errors='replace')}{self.log()}")
            if "is serving" in self.log():
                return self
            time.sleep(0.1)
        self.stop()
        pytest.fail(f"miltermonkey did not serve within {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
