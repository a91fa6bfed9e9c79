"""Reading a configuration: a TOML file, a seed-style start script, or the
embedded default that makes a plain ``miltermonkey run`` work out of the box.

Nothing here touches the network or the entry points: which brains are
installed, and which engines answer on this machine, are found by the layers
above (``plugins`` and the brains themselves) and handed in.
"""

from __future__ import annotations

import pathlib
import re
import tomllib
from collections.abc import Mapping
from typing import Any, Final

from miltermonkey_core.config.build import RawItem, RawTable, build_config
from miltermonkey_core.config.locator import TomlLocator
from miltermonkey_core.config.schema import (
    ALIASES,
    BRAIN_TABLE,
    DAEMON_FIELDS,
    DAEMON_TABLE,
    Config,
    to_toml_value,
)
from miltermonkey_core.config.script import load_script
from miltermonkey_core.config.values import did_you_mean
from miltermonkey_core.errors import ConfigError

_TOML_POS: Final = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")


def _toml_error(e: tomllib.TOMLDecodeError, path: str | None) -> ConfigError:
    msg = str(e)
    line = None
    if m := _TOML_POS.search(msg):
        line = int(m.group(1))
        msg = f"TOML syntax error: {msg[: m.start()]} (column {m.group(2)})"
    else:
        msg = f"TOML syntax error: {msg}"
    return ConfigError(msg, path=path, line=line)


def loads(
    text: str,
    *,
    path: str | None = None,
    source: str = "toml",
    installed: Mapping[str, Any] | None = None,
    problems: list[ConfigError] | None = None,
) -> Config:
    """Parse and check a TOML configuration given as text (``problems``: see build_config)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise _toml_error(e, path) from None
    loc = TomlLocator(text)
    daemon = RawTable()
    brains: list[RawTable] = []
    for key, value in data.items():
        line = loc.key_line((), key)
        if key == DAEMON_TABLE:
            if not isinstance(value, dict):
                raise ConfigError(f"must be a table: write [{DAEMON_TABLE}] and the options "
                                  "below it", path=path, line=line, key=key)
            daemon = RawTable(
                tuple(RawItem(k, v, loc.key_line((key,), k)) for k, v in value.items()),
                loc.table_line((key,)),
            )
        elif key == BRAIN_TABLE:
            if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
                raise ConfigError(f"must be an array of tables: write [[{BRAIN_TABLE}]] for "
                                  "each brain", path=path, line=line, key=key)
            for i, t in enumerate(value):
                tline = loc.table_line((key, i)) or line
                brains.append(RawTable(
                    tuple(RawItem(k, v, loc.key_line((key, i), k) or tline,
                                  _sublines(loc, (key, i, k), v))
                          for k, v in t.items()),
                    tline,
                ))
        else:
            if key in DAEMON_FIELDS or key in ALIASES:
                hint = f"; daemon options go in the [{DAEMON_TABLE}] table"
            else:
                hint = did_you_mean(key, (DAEMON_TABLE, BRAIN_TABLE)) or (
                    f"; the file has a [{DAEMON_TABLE}] table and [[{BRAIN_TABLE}]] tables"
                )
            what = "table" if isinstance(value, dict) else "key"
            raise ConfigError(f"unknown top-level {what}{hint}", path=path, line=line, key=key)
    return build_config(daemon, brains, path=path, source=source, installed=installed,
                        problems=problems)


def _sublines(loc: TomlLocator, table: tuple[str | int, ...], value: Any) -> dict[str, int]:
    """The line of each key of a table value (``when.client_in = [...]``), for errors."""
    if not isinstance(value, dict):
        return {}
    return {k: line for k in value if (line := loc.key_line(table, k)) is not None}


def _read_text(path: str | pathlib.Path) -> str:
    try:
        return pathlib.Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text ({e.reason} at byte {e.start})",
                          path=str(path)) from None
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror or e}", path=str(path)) from None


def load_config(path: str | pathlib.Path, *, installed: Mapping[str, Any] | None = None,
                problems: list[ConfigError] | None = None) -> Config:
    """Load and check a TOML configuration file."""
    return loads(_read_text(path), path=str(path), installed=installed, problems=problems)


def load_any(path: str | pathlib.Path, *, installed: Mapping[str, Any] | None = None,
             problems: list[ConfigError] | None = None) -> Config:
    """Load a ``.toml`` file or a ``.py`` start script, by suffix."""
    suffix = pathlib.Path(path).suffix.lower()
    if suffix == ".py":
        return load_script(path, installed=installed)
    if suffix == ".toml":
        return load_config(path, installed=installed, problems=problems)
    raise ConfigError(f"unknown configuration type {suffix or '(no suffix)'!r}: "
                      "use a .toml file or a .py start script", path=str(path))


def embedded_default(
    *,
    installed: Mapping[str, Any] | None = None,
    detected: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """The shipped ``default.toml``: a milter that works out of the box.

    ``detected`` maps brain names to the options each installed brain found
    for an engine answering on this machine (a local clamd, a local spamd);
    each is added after the trivial brain, so a plain ``miltermonkey run``
    on a mail host scans without writing a config.
    """
    # The file ships beside the package's modules (package data); importlib.resources
    # would bring tempfile, shutil, bz2 and lzma into both daemon processes.
    res = pathlib.Path(__file__).resolve().parent.parent / "default.toml"
    text = res.read_text(encoding="utf-8")
    for name, options in (detected or {}).items():
        lines = "".join(f"{key} = {to_toml_value(value)}\n" for key, value in options.items())
        text += f'\n# detected on this machine\n[[brain]]\nuse = "{name}"\n{lines}'
    return loads(text, path=str(res), source="embedded", installed=installed)
