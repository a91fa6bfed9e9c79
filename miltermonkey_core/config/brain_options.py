"""Checking a brain's raw options against the brain's own attrs ``Options`` class.

A brain author declares options as an attrs class; an admin writes them in
a ``[[brain]]`` table.  Between the two, this module turns TOML values into
what the annotations ask for where that is natural (a string to a compiled
regex, a list to a tuple) and turns every refusal into a
:class:`~miltermonkey_core.errors.ConfigError` at the key's line, naming the
brain, with a "did you mean" for typos.
"""

from __future__ import annotations

import enum
import pathlib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Final

import attrs

from miltermonkey_core.config.schema import BRAIN_KEYS, BrainEntry, Config, option_fields
from miltermonkey_core.config.values import (
    Invalid,
    boolean,
    did_you_mean,
    integer,
    number,
    show,
    string,
)
from miltermonkey_core.errors import ConfigError, ConfigErrors


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # names only imported under TYPE_CHECKING: check nothing
        return {}


_TYPE_NAMES: Final[Mapping[Any, str]] = {
    bool: "true or false", int: "an integer", float: "a number", str: "a string",
    pathlib.Path: "a path", re.Pattern: "a regular expression",
}


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp in _TYPE_NAMES:
        return _TYPE_NAMES[tp]
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple, set, frozenset, Sequence):
        return "a list"
    if origin in (dict, Mapping):
        return "a table"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    return getattr(tp, "__name__", str(tp))


class _Unknown(Exception):
    """The annotation is not one this module knows how to check."""


def _conform(tp: Any, value: Any) -> Any:
    """Check ``value`` against an annotation, converting TOML types where natural.

    Only plain, common annotations are checked; anything else raises
    :class:`_Unknown` and is left to the brain's own validators.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if tp is bool:
        return boolean(value)
    if tp is int:
        return integer()(value)
    if tp is float:
        return number()(value)
    if tp is str:
        return string(empty=True)(value)
    if tp is pathlib.Path:
        return pathlib.Path(string()(value)) if not isinstance(value, pathlib.Path) else value
    if tp is re.Pattern or origin is re.Pattern:
        if isinstance(value, re.Pattern):
            return value
        try:
            return re.compile(string(empty=True)(value))
        except re.error as e:
            raise Invalid(f"not a valid regular expression: {e}") from None
    if origin is typing.Literal:
        if value in args:
            return value
        raise Invalid(f"expected {_describe(tp)}, got {show(value)}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for member in (a for a in args if a is not type(None)):
            try:
                return _conform(member, value)
            except Invalid as e:
                errors.append(_describe(member))
                last = e
        if len(errors) == 1:
            raise last
        raise Invalid(f"expected {' or '.join(errors)}, got {show(value)}")
    if origin in (list, tuple, set, frozenset, Sequence):
        if not isinstance(value, list | tuple | set | frozenset):
            raise Invalid(f"expected a list, got {show(value)}")
        if origin is tuple and args and (len(args) != 2 or args[1] is not Ellipsis):
            raise _Unknown  # a fixed-length tuple: leave it to the brain
        item_tp = args[0] if args else Any
        try:
            items = [_conform(item_tp, v) for v in value]
        except Invalid as e:
            raise Invalid(f"in the list: {e}") from None
        if origin in (set, frozenset):
            return origin(items)
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise Invalid(f"expected a table, got {show(value)}")
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if value in (member, member.value, member.name):
                return member
        raise Invalid(f"expected {_describe(tp)}, got {show(value)}")
    raise _Unknown


def _refusals(options_cls: type, kwargs: Mapping[str, Any],
              order: Sequence[str]) -> dict[str, str]:
    """Which supplied options make the Options class refuse, each tried alone.

    attrs validators raise without saying which field they guard, and custom
    ones raise plain ValueError (or, as ``converter=re.compile`` does, an
    error of their own); building with each option alone (plus the required
    ones) finds every bad one as long as the defaults are valid.
    """
    fields = option_fields(options_cls)
    required = {k: v for k, v in kwargs.items()
                if k in fields and fields[k].default is attrs.NOTHING}
    out: dict[str, str] = {}
    for key in order:
        try:
            options_cls(**{**required, key: kwargs[key]})
        except Exception as e:
            out[key] = _validator_message(e)
    return out


def build_brain_options(brain_cls: type, entry: BrainEntry, config: Config | None = None) -> Any:
    """Validate a brain's raw options against its ``Options`` attrs class.

    Unknown keys (with a "did you mean"), wrong types and values the class's
    own validators or converters refuse all become ConfigErrors at the key's
    line; every bad option is reported (:class:`~miltermonkey_core.errors.ConfigErrors`),
    not the first only.  ``OPTION_ALIASES`` on the Options class maps seed
    spellings (``uvscanpath``) to field names (``scanner_path``).
    """
    path = config.path if config is not None and config.path else entry.path
    where = f"[[brain]] {entry.name!r}" + (f" ({entry.use})" if entry.name != entry.use else "")

    def fail(message: str, key: str | None) -> ConfigError:
        line = entry.option_lines.get(key, entry.line) if key else entry.line
        return ConfigError(message, path=path, line=line, key=key)

    options_cls: Any = getattr(brain_cls, "Options", None)
    if options_cls is None or not attrs.has(options_cls):
        if entry.options:
            raise ConfigErrors([fail(f"brain {entry.use!r} takes no options ({where})", key)
                                for key in entry.options])
        return options_cls() if options_cls is not None else None
    fields = option_fields(options_cls)
    clash = sorted(set(fields) & set(BRAIN_KEYS))
    if clash:
        raise fail(
            f"brain {entry.use!r} has option(s) {', '.join(clash)} that clash with keys every "
            "[[brain]] table reserves; the brain must rename them", None)
    aliases: Mapping[str, str] = getattr(options_cls, "OPTION_ALIASES", {}) or {}
    hints = _type_hints(options_cls)
    kwargs: dict[str, Any] = {}
    written: dict[str, str] = {}  # field name -> key as written
    problems: list[ConfigError] = []
    for key, raw in entry.options.items():
        name = aliases.get(key, key)
        if name not in fields:
            valid = sorted(fields)
            hint = did_you_mean(key, [*valid, *aliases]) or (
                f"; {entry.use!r} takes: {', '.join(valid)}" if valid else
                f"; {entry.use!r} takes no options"
            )
            problems.append(fail(f"unknown option in {where}{hint}", key))
            continue
        if name in written:
            problems.append(fail(f"given twice in {where} (also as {written[name]!r})", key))
            continue
        written[name] = key
        attr = fields[name]
        tp = hints.get(attr.name, attr.type)
        value = raw
        if attr.converter is None and tp is not None and not isinstance(tp, str):
            try:
                value = _conform(tp, value)
            except Invalid as e:
                problems.append(fail(f"{e} ({where})", key))
                continue
            except _Unknown:
                pass
        kwargs[name] = value
    problems += [fail(f"brain {entry.use!r} needs option {n!r} in {where}", n)
                 for n, a in fields.items() if a.default is attrs.NOTHING and n not in kwargs
                 and n not in written]
    if problems:
        raise ConfigErrors(problems)
    try:
        return options_cls(**kwargs)
    except Exception as e:
        refused = _refusals(options_cls, kwargs, list(written))
        if not refused:  # only the combination is refused
            raise fail(f"{_validator_message(e)} ({where})", None) from None
        raise ConfigErrors([fail(f"{message} ({where})", written[name])
                            for name, message in refused.items()]) from None


def _validator_message(e: Exception) -> str:
    """attrs validators put the message first in ``args``, then the attribute."""
    if isinstance(e, (TypeError, ValueError)) and e.args and isinstance(e.args[0], str):
        return e.args[0]
    text = str(e) or type(e).__name__
    return text if isinstance(e, (TypeError, ValueError)) else f"{type(e).__name__}: {text}"
