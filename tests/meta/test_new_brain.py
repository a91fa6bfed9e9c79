"""``miltermonkey new-brain``: what a new brain author gets works as generated.

The walk-through a new author follows, in a fresh virtualenv holding only
the core from this checkout: ``miltermonkey new-brain hello``,
``pip install ./hello``, ``miltermonkey brains`` lists it, ``pytest hello``
passes (in-process and real-daemon tests), and enabled in a configuration it
adds its header to mail through a real Postfix.
"""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from user_venv import UserVenv, VenvDaemon

import miltermonkey_core
from miltermonkey_core.cli import main
from miltermonkey_core.cli.newbrain import BrainNames, core_requirement, render
from miltermonkey_core.testing.sink import parse_dump


@pytest.fixture(scope="module")
def author(author_venv: UserVenv, tmp_path_factory: pytest.TempPathFactory,
           ) -> tuple[UserVenv, Path]:
    """The author's virtualenv (core and pytest from this checkout) and a working directory."""
    return author_venv, tmp_path_factory.mktemp("work")


@pytest.fixture(scope="module")
def hello(author: tuple[UserVenv, Path]) -> tuple[UserVenv, Path, str]:
    venv, work = author
    generated = venv.command("miltermonkey", "new-brain", "hello", cwd=work).stdout
    installed = venv.pip("install", work / "hello").stdout
    return venv, work, generated + installed


# --- the walk-through ---------------------------------------------------------------------


def test_new_brain_writes_an_installable_package(hello: tuple[UserVenv, Path, str]) -> None:
    _, work, output = hello
    assert "wrote hello/: distribution miltermonkey-hello" in output
    files = sorted(str(p.relative_to(work)) for p in (work / "hello").rglob("*")
                   if p.is_file() and "egg-info" not in str(p) and "/build/" not in str(p))
    assert files == ["hello/.gitignore", "hello/README.md",
                     "hello/miltermonkey_hello/__init__.py", "hello/miltermonkey_hello/brain.py",
                     "hello/miltermonkey_hello/py.typed", "hello/pyproject.toml",
                     "hello/tests/test_hello.py"]
    assert "Successfully installed miltermonkey-hello-0.1.0" in output


def test_brains_lists_the_new_brain(hello: tuple[UserVenv, Path, str]) -> None:
    venv, _, _ = hello
    out = venv.command("miltermonkey", "brains").stdout
    assert "hello  (miltermonkey-hello 0.1.0)  miltermonkey_hello.brain:HelloBrain" in out, out
    assert "adds one header to each message" in out
    block = out.split("hello  (", 1)[1].split("\n\n", 1)[0]
    assert "eom_process" in block and "header" in block and "X-Hello" in block, block


def test_generated_tests_pass(hello: tuple[UserVenv, Path, str]) -> None:
    venv, work, _ = hello
    result = venv.command("pytest", "hello", cwd=work, timeout=300)
    summary = result.stdout.strip().splitlines()[-1]
    assert re.search(r"\b4 passed\b", summary), result.stdout
    assert "skipped" not in summary and "warning" not in summary, result.stdout


def test_check_config_reports_a_bad_option_of_the_new_brain(
        hello: tuple[UserVenv, Path, str]) -> None:
    venv, work, _ = hello
    config = work / "bad.toml"
    config.write_text('[miltermonkey]\nmilter_key = false\n\n[[brain]]\nuse = "hello"\n'
                      'header = "X Hello"\n')
    proc = venv.command("miltermonkey", "check-config", "-c", config, status=1)
    assert f"{config}:6" in proc.stderr and "header" in proc.stderr, proc.stderr
    assert "invalid header name 'X Hello'" in proc.stderr, proc.stderr


def test_new_brain_adds_its_header_through_postfix(
        hello: tuple[UserVenv, Path, str], postfix_stack: Any) -> None:
    venv, work, _ = hello
    daemon = VenvDaemon(venv, work, [{"use": "hello", "value": "greeted on {host}"}]).start()
    try:
        postfix_stack.use_milters(daemon.postfix_spec, milter_default_action="tempfail")
        postfix_stack.sink.clear()
        sent = postfix_stack.send(b"From: <alice@example.test>\r\nTo: <bob@example.test>\r\n"
                                  b"Subject: new-brain through postfix\r\n\r\nHello.\r\n",
                                  "alice@example.test", ["bob@example.test"])
        assert sent.ok, sent
        dump = postfix_stack.sink.wait_for_text(b"new-brain through postfix")
    finally:
        daemon.stop()
    delivered = parse_dump(dump)
    value = delivered.header("X-Hello")
    assert value is not None and value.startswith("greeted on "), delivered.headers
    assert "hello" in daemon.log()


# --- the generator itself, in-process -------------------------------------------------------


def test_new_brain_refuses_a_bad_name_and_an_existing_directory(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["new-brain", "Hello World", "-d", str(tmp_path)]) == 1
    assert "cannot be a brain name" in capsys.readouterr().err
    assert main(["new-brain", "trivial", "-d", str(tmp_path)]) == 1
    assert "already installed (miltermonkey-core)" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert main(["new-brain", "taken", "-d", str(tmp_path)]) == 1
    assert "already exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    assert not list(tmp_path.glob("*/pyproject.toml"))


def test_names_derive_from_the_brain_name() -> None:
    n = BrainNames.of("subject-tag")
    assert (n.package, n.distribution, n.class_name, n.options_name, n.header) == (
        "miltermonkey_subject_tag", "miltermonkey-subject-tag", "SubjectTagBrain",
        "SubjectTagOptions", "X-Subject-Tag")


@pytest.mark.parametrize(("version", "requirement"), [
    ("0.2.0", "miltermonkey-core>=0.2,<0.3"),
    ("0.10.3", "miltermonkey-core>=0.10,<0.11"),
    ("1.4.2", "miltermonkey-core>=1.4,<2"),
])
def test_core_requirement_accepts_this_series_only(version: str, requirement: str) -> None:
    assert core_requirement(version) == requirement


def test_rendered_package_is_valid_python_and_toml() -> None:
    files = render(BrainNames.of("under_score"))
    for path, text in files.items():
        if path.endswith(".py"):
            ast.parse(text, path)
        assert "$" not in text, path  # every placeholder was filled
    project = tomllib.loads(files["pyproject.toml"])
    assert project["project"]["name"] == "miltermonkey-under-score"
    assert project["project"]["entry-points"]["miltermonkey.brains"] == {
        "under_score": "miltermonkey_under_score.brain:UnderScoreBrain"}
    assert project["project"]["dependencies"][0] == core_requirement(
        miltermonkey_core.__version__)
    assert "tests/test_under_score.py" in files
