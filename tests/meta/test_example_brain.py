"""The example brain package (examples/miltermonkey-subject-tag), used as a site would.

pip-installed into a fresh virtualenv with the core, listed by
``miltermonkey brains``, its own tests run there, and enabled in a
configuration it tags mail through a real daemon over its socket.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from user_venv import ROOT, UserVenv, VenvDaemon

from miltermonkey_core.testing.client import MessageSpec, run_session

EXAMPLE = ROOT / "examples" / "miltermonkey-subject-tag"


@pytest.fixture(scope="module")
def example(author_venv: UserVenv, tmp_path_factory: pytest.TempPathFactory,
            ) -> tuple[UserVenv, Path]:
    """The example installed with pip from a copy (a build leaves files in its source tree)."""
    source = tmp_path_factory.mktemp("example") / EXAMPLE.name
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns(
        "build", "*.egg-info", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"))
    author_venv.pip("install", source)
    return author_venv, source


def test_the_example_is_listed_with_its_options(example: tuple[UserVenv, Path]) -> None:
    venv, _ = example
    out = venv.command("miltermonkey", "brains").stdout
    assert ("subject_tag  (miltermonkey-subject-tag 1.0.0)  "
            "miltermonkey_subject_tag.brain:SubjectTagBrain") in out, out
    block = out.split("subject_tag  (", 1)[1].split("\n\n", 1)[0]
    for option in ("tag", "internal_domains", "check_from_header"):
        assert option in block, block


def test_the_example_passes_its_own_tests(example: tuple[UserVenv, Path]) -> None:
    venv, source = example
    result = venv.command("pytest", source, cwd=source.parent, timeout=300)
    summary = result.stdout.strip().splitlines()[-1]
    passed = re.search(r"\b(\d+) passed\b", summary)
    assert passed and int(passed.group(1)) >= 20, result.stdout
    assert "failed" not in summary and "skipped" not in summary, result.stdout


def test_check_config_reports_a_bad_domain_with_its_line(example: tuple[UserVenv, Path],
                                                          tmp_path: Path) -> None:
    venv, _ = example
    config = tmp_path / "tag.toml"
    config.write_text('[miltermonkey]\nmilter_key = false\n\n[[brain]]\nuse = "subject_tag"\n'
                      'internal_domains = ["example.com", "exa mple.org"]\n')
    proc = venv.command("miltermonkey", "check-config", "-c", config, status=1)
    assert f"{config}:6" in proc.stderr and "internal_domains" in proc.stderr, proc.stderr
    assert "'exa mple.org' is not a domain" in proc.stderr, proc.stderr


def test_the_example_tags_mail_through_the_daemon(example: tuple[UserVenv, Path],
                                                  tmp_path: Path) -> None:
    venv, _ = example
    daemon = VenvDaemon(venv, tmp_path, [
        {"use": "trivial"},
        {"use": "subject_tag", "tag": "[EXTERNAL]", "internal_domains": ["example.com"]},
    ]).start()
    try:
        def mail(from_header: str) -> bytes:
            return (f"From: {from_header}\r\nTo: <bob@example.com>\r\nSubject: invoice\r\n"
                    "\r\nPlease pay.\r\n").encode()

        outside, forged, inside = run_session(("127.0.0.1", daemon.port), [
            MessageSpec(mail("<eve@elsewhere.test>"), "<eve@elsewhere.test>",
                        ["<bob@example.com>"]),
            MessageSpec(mail("CEO <ceo@example.com>"), "<eve@elsewhere.test>",
                        ["<bob@example.com>"]),
            MessageSpec(mail("<alice@example.com>"), "<alice@example.com>",
                        ["<bob@example.com>"]),
        ])
    finally:
        daemon.stop()
    for tagged in (outside, forged):
        assert tagged.accepted
        assert ("Subject", "[EXTERNAL] invoice") in tagged.applied.headers, tagged.applied
    assert inside.accepted
    assert ("Subject", "invoice") in inside.applied.headers, inside.applied
    # both brains ran on every message, in config order
    for result in (outside, forged, inside):
        assert result.applied.header_values("X-MilterMonkey"), result.applied
    log = daemon.log()
    assert "tagged: from eve@elsewhere.test" in log and "internal mail" in log, log
