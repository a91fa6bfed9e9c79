"""Building a checked :class:`Config` from located key/value pairs.

The TOML loader and the seed's start-script form both produce
:class:`RawTable` lists (each value with the line it was written on) and
hand them here, so both are checked by the same code and point at the same
kind of line.  Which brains are installed is given by the caller: the
configuration layer never looks at entry points or the network itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

import attrs

from miltermonkey_core.config.conditions import WhenError, parse_when
from miltermonkey_core.config.schema import (
    ALIASES,
    BRAIN_ALIASES,
    BRAIN_KEYS,
    BRAIN_MODES,
    BRAIN_TABLE,
    DAEMON_FIELDS,
    DAEMON_TABLE,
    ON_ERROR_POLICIES,
    BrainEntry,
    Config,
    DaemonConfig,
)
from miltermonkey_core.config.values import (
    BRAIN_NAME,
    Coerce,
    Invalid,
    boolean,
    choice,
    did_you_mean,
    duration,
    integer,
    optional,
    string,
)
from miltermonkey_core.errors import ConfigError, ConfigErrors, config_problems


@attrs.frozen
class RawItem:
    """One ``key = value`` as written, with the line it was written on."""

    key: str
    value: Any
    line: int | None = None
    #: For a table value: the line of each of its keys.
    sublines: Mapping[str, int] = attrs.field(factory=dict, eq=False)


@attrs.frozen
class RawTable:
    """A table as written: the daemon table or one ``[[brain]]``."""

    items: tuple[RawItem, ...] = ()
    line: int | None = None


def _canonical(
    table: RawTable,
    aliases: Mapping[str, str],
    path: str | None,
) -> dict[str, RawItem]:
    """Items by canonical key; the same option given twice is an error."""
    out: dict[str, RawItem] = {}
    for item in table.items:
        canon = aliases.get(item.key, item.key)
        if canon in out:
            first = out[canon]
            where = f" at line {first.line}" if first.line else ""
            raise ConfigError(
                f"given twice (first as {first.key!r}{where})",
                path=path, line=item.line, key=item.key,
            )
        out[canon] = item
    return out


def _build_daemon(table: RawTable, path: str | None
                  ) -> tuple[DaemonConfig, dict[str, int], list[ConfigError]]:
    """The daemon table, its keys' lines, and every problem found (keys left at default)."""
    items = _canonical(table, ALIASES, path)
    kwargs: dict[str, Any] = {}
    lines: dict[str, int] = {}
    problems: list[ConfigError] = []
    for canon, item in items.items():
        field = DAEMON_FIELDS.get(canon)
        if field is None:
            hint = did_you_mean(item.key, [*DAEMON_FIELDS, *ALIASES])
            if item.key == BRAIN_TABLE or item.key in BRAIN_KEYS:
                hint = "; brains are configured in [[brain]] tables"
            problems.append(ConfigError(f"unknown key in [{DAEMON_TABLE}]{hint}",
                                        path=path, line=item.line, key=item.key))
            continue
        assert field.converter is not None
        try:
            kwargs[canon] = field.converter(item.value)  # type: ignore[operator]
        except Invalid as e:
            problems.append(ConfigError(str(e), path=path, line=item.line, key=item.key))
            continue
        if item.line:
            lines[canon] = item.line
    return DaemonConfig(**kwargs), lines, problems


def mode_value(value: Any) -> str:
    """``mode = "enforce" | "evaluate"``; the seed's ``evaluation = true/false`` too."""
    if isinstance(value, bool):
        return "evaluate" if value else "enforce"
    return str(choice(*BRAIN_MODES)(value))


_BRAIN_CHECKS: Final[Mapping[str, Coerce]] = {
    "use": string(),
    "name": string(),
    "on_error": choice(*ON_ERROR_POLICIES),
    "on_timeout": choice(*ON_ERROR_POLICIES),
    "timeout": duration(0.001, whole=False),
    "mode": mode_value,
    "skip_if_key": boolean,
    "expiration": optional(duration(1)),
    "breaker_failures": integer(0, 1_000_000),
    "breaker_window": duration(0.001, whole=False),
    "breaker_cooldown": duration(0, whole=False),
}


def _build_brain(
    table: RawTable,
    daemon: DaemonConfig,
    path: str | None,
    installed: Mapping[str, Any] | None,
) -> BrainEntry:
    items = _canonical(table, BRAIN_ALIASES, path)
    common: dict[str, Any] = {}
    options: dict[str, Any] = {}
    lines: dict[str, int] = {}
    problems: list[ConfigError] = []
    for canon, item in items.items():
        if item.line:
            lines[item.key] = item.line
            lines.setdefault(canon, item.line)
        if canon == "when":
            try:
                common["when"] = parse_when(item.value)
            except WhenError as e:
                sub = e.key.partition(".")[2]
                problems.append(ConfigError(str(e), path=path,
                                            line=item.sublines.get(sub, item.line), key=e.key))
            continue
        check = _BRAIN_CHECKS.get(canon)
        if check is None:
            options[item.key] = item.value
            continue
        try:
            common[canon] = check(item.value)
        except Invalid as e:
            problems.append(ConfigError(str(e), path=path, line=item.line, key=item.key))
    if problems:
        raise ConfigErrors(problems)
    if "use" not in common:
        have = f" (installed: {', '.join(sorted(installed))})" if installed else ""
        raise ConfigError(f'every [[brain]] needs use = "<brain>"{have}',
                          path=path, line=table.line, key="use")
    use = common["use"]
    if installed is not None and use not in installed:
        have = ", ".join(sorted(installed)) or "none"
        hint = did_you_mean(use, installed) or (
            f"; install the package providing it (e.g. pip install miltermonkey-{use})"
        )
        raise ConfigError(f"no brain called {use!r} is installed (installed brains: {have}){hint}",
                          path=path, line=lines.get("use", table.line), key="use")
    name = common.get("name", use)
    if not BRAIN_NAME.fullmatch(name):
        raise ConfigError(
            f"brain name {name!r} must be letters, digits, '.', '_' or '-' "
            "(it is written into the milter key and log lines)",
            path=path, line=lines.get("name", lines.get("use", table.line)), key="name",
        )
    settings = {k: v for k, v in common.items() if k not in ("use", "name")}
    return BrainEntry(
        use=use,
        name=name,
        **settings,
        options=options,
        line=table.line,
        option_lines=lines,
        path=path,
    )


def build_config(
    daemon: RawTable,
    brains: Sequence[RawTable],
    *,
    path: str | None = None,
    source: str = "toml",
    installed: Mapping[str, Any] | None = None,
    problems: list[ConfigError] | None = None,
) -> Config:
    """Check located raw tables and build the Config.

    Every problem is collected, in file order, and raised together as
    :class:`~miltermonkey_core.errors.ConfigErrors`: a mistake in the daemon
    table does not hide the brains' mistakes.  ``installed`` (brain name ->
    anything) is what brains the machine has, looked up by the caller;
    ``None`` skips that check (for tools that only edit, and for unit tests
    of the schema).  Given a ``problems`` list, the problems go there instead
    and the Config holds what could be read (defaults for the bad keys, the
    good brains), so ``check-config`` can go on to check the brains' options.
    """
    daemon_cfg, lines, found = _build_daemon(daemon, path)
    entries: list[BrainEntry] = []
    seen: dict[str, BrainEntry] = {}
    for table in brains:
        try:
            entry = _build_brain(table, daemon_cfg, path, installed)
        except ConfigError as e:
            found.append(e)
            continue
        if entry.name in seen:
            other = seen[entry.name]
            where = f" at line {other.line}" if other.line else ""
            key = "name" if "name" in entry.option_lines else "use"
            found.append(entry.error(
                f"brain name {entry.name!r} is already used by the [[brain]]{where}; "
                f'give one of them its own name = "..."',
                key=key,
            ))
            continue
        seen[entry.name] = entry
        entries.append(entry)
    if found and problems is None:
        raise ConfigErrors(found)
    if problems is not None:
        problems.extend(config_problems(ConfigErrors(found)) if found else [])
    return Config(daemon=daemon_cfg, brains=tuple(entries), path=path, source=source,
                  daemon_lines=lines)
