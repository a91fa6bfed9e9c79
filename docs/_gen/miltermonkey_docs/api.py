"""Tables of a class's public members, for the objects brain authors and tests hold.

``<!-- generated: api SmtpResult -->`` lists the attributes (attrs fields
with their types and docs), properties and public methods of the class that
:data:`sources.API_CLASSES` names ``SmtpResult``; ``skip=a,b`` leaves
members out (calls the daemon makes, not the brain).
"""

from __future__ import annotations

import enum
import inspect
from typing import Any

import attrs

from miltermonkey_docs import sources
from miltermonkey_docs.introspect import (
    GenerationError,
    code,
    comment_docs,
    field_doc,
    first_paragraph,
    format_signature,
    table,
    toml_value,
)


def _type_text(field: attrs.Attribute[Any]) -> str:
    tp = field.type
    if tp is None:
        return ""
    return tp if isinstance(tp, str) else inspect.formatannotation(tp)


def _enum_rows(cls: type[enum.Enum]) -> list[tuple[str, str]]:
    docs = comment_docs(cls)
    return [(code(f"{cls.__name__}.{m.name}"),
             f"{code(toml_value(m.value))}. {docs.get(m.name, '')}") for m in cls]


def _member_rows(cls: type[Any], skip: set[str]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    if not attrs.has(cls):  # plain class attributes a subclass sets, with their #: docs
        notes = comment_docs(cls)
        for name, ann in vars(cls).get("__annotations__", {}).items():
            if name.startswith("_") or name in skip:
                continue
            ann_text = ann if isinstance(ann, str) else inspect.formatannotation(ann)
            rows.append((code(f"{name}: {ann_text}"), notes.get(name, "")))
    if attrs.has(cls):
        for f in attrs.fields(cls):
            if f.name.startswith("_") or f.name in skip:
                continue
            ann = _type_text(f)
            rows.append((code(f"{f.name}: {ann}" if ann else f.name), field_doc(cls, f)))
    for name, member in vars(cls).items():
        if name.startswith("_") or name in skip:
            continue
        if isinstance(member, property):
            ret = inspect.signature(member.fget).return_annotation if member.fget else None
            ann = ret if isinstance(ret, str) else ""
            rows.append((code(f"{name}: {ann}" if ann else name) + " (property)",
                         first_paragraph(member.__doc__)))
        elif isinstance(member, classmethod | staticmethod):
            fn = member.__func__
            rows.append((code(f"{cls.__name__}.{format_signature(fn, name)}"),
                         first_paragraph(fn.__doc__)))
        elif inspect.isfunction(member):
            rows.append((code(format_signature(member, name)), first_paragraph(member.__doc__)))
    return rows


def api_table(_markdown: str, args: str = "") -> str:
    words = args.split()
    if not words:
        raise GenerationError("api needs a class name: <!-- generated: api NAME -->")
    name, options = words[0], words[1:]
    cls = sources.API_CLASSES.get(name)
    if cls is None:
        raise GenerationError(f"api {name!r}: not in sources.API_CLASSES")
    skip: set[str] = set()
    for option in options:
        key, _, value = option.partition("=")
        if key != "skip":
            raise GenerationError(f"api {name}: unknown option {option!r} (skip=a,b)")
        skip.update(v for v in value.split(",") if v)
    fields = {f.name for f in attrs.fields(cls)} if attrs.has(cls) else set()
    unknown = sorted(s for s in skip if not hasattr(cls, s) and s not in fields)
    if unknown:
        raise GenerationError(f"api {name}: skip names members that do not exist: {unknown}")
    rows = _enum_rows(cls) if issubclass(cls, enum.Enum) else []
    rows += _member_rows(cls, skip)
    if not rows:
        raise GenerationError(f"api {name}: nothing public to list")
    summary = first_paragraph(cls.__doc__)
    title = f"**{code(name)}**" + (f": {summary}" if summary else "")
    return title + "\n\n" + table(("member", "meaning"), rows)


def import_line(name: str) -> str:
    """Where a helper lives, as the import line a test writes (modules move; this follows)."""
    target = sources.API_FUNCTIONS.get(name.strip()) or sources.API_CLASSES.get(name.strip())
    if target is None:
        raise GenerationError(f"import {name!r}: not in sources.API_FUNCTIONS or API_CLASSES")
    return f"```python\nfrom {target.__module__} import {target.__name__}\n```"
