"""Brain discovery once the daemon can no longer read its own installation."""

from __future__ import annotations

from typing import Any

import pytest

from miltermonkey_core import plugins


def test_brains_found_before_the_privilege_switch_stay_loadable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # as root: the scan sees the installation
    assert "trivial" in plugins.installed_brains()
    plugins.load_brain_class("trivial")

    # as `user`, with a 0700 virtualenv: a scan finds nothing at all
    def unreadable(**_kw: Any) -> list[Any]:
        return []

    monkeypatch.setattr(plugins, "entry_points", unreadable)
    assert "trivial" in plugins.installed_brains()
    cls = plugins.load_brain_class("trivial")
    assert cls.__name__ == "TrivialBrain"
    with pytest.raises(plugins.BrainLoadError, match="no brain called 'nosuch'"):
        plugins.load_brain_class("nosuch")
