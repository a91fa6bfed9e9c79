"""The public API brains import: every exported name resolves, and nothing else is exported."""

from __future__ import annotations

import subprocess
import sys

import pytest

import miltermonkey_core


@pytest.mark.parametrize("name", sorted(miltermonkey_core.__all__))
def test_every_exported_name_resolves(name: str) -> None:
    assert getattr(miltermonkey_core, name) is not None


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Brian'"):
        miltermonkey_core.Brian  # noqa: B018 - the lookup is the test


def test_the_exports_are_resolved_on_first_use_only() -> None:
    """The supervisor and the CLI import submodules; they must not pay for the contract."""
    code = ("import sys; import miltermonkey_core.config, miltermonkey_core.server.supervisor; "
            "print(sorted(m for m in sys.modules if m.startswith('miltermonkey_core.contract.') "
            "or m.startswith(('prometheus_client', 'miltermonkey_av', 'miltermonkey_spam'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "['miltermonkey_core.contract.options']", out
