"""Reading documentation out of code: attribute doc comments, docstrings, signatures.

The project documents attributes the way Sphinx reads them: a ``#:``
comment above the field, or ``metadata={"doc": ...}`` on an attrs field.
Docstrings are written in reST (``double backticks``, ``:param x:``,
``:func:`name```); the site is Markdown, so they are converted here, in a
deliberately small dialect: what the project's docstrings use, nothing more.
"""

from __future__ import annotations

import ast
import functools
import inspect
import re
import textwrap
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs


class GenerationError(Exception):
    """The code and the docs disagree: the site must not be built."""


# --- attribute documentation -------------------------------------------------------------


_COMMENT_DOCS: dict[type[Any], Mapping[str, str]] = {}


def comment_docs(cls: type[Any]) -> Mapping[str, str]:
    """``#:`` comments above each attribute of ``cls``'s own body (read once per class)."""
    if cls not in _COMMENT_DOCS:
        _COMMENT_DOCS[cls] = _read_comment_docs(cls)
    return _COMMENT_DOCS[cls]


def _read_comment_docs(cls: type[Any]) -> Mapping[str, str]:
    try:
        source_lines, _start = inspect.getsourcelines(cls)
    except (OSError, TypeError):
        return {}
    source = textwrap.dedent("".join(source_lines))
    lines = source.splitlines()
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return {}
    node = tree.body[0]
    if not isinstance(node, ast.ClassDef):
        return {}
    docs: dict[str, str] = {}
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            name = stmt.target.id
        elif (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
              and isinstance(stmt.targets[0], ast.Name)):
            name = stmt.targets[0].id
        else:
            continue
        comment: list[str] = []
        i = stmt.lineno - 2
        while i >= 0 and lines[i].strip().startswith("#:"):
            comment.insert(0, lines[i].strip()[2:].strip())
            i -= 1
        if comment:
            docs[name] = " ".join(comment)
    return docs


def field_doc(cls: type[Any], field: attrs.Attribute[Any]) -> str:
    """An attrs field's documentation as Markdown: ``metadata["doc"]``, else its ``#:`` comment."""
    doc = field.metadata.get("doc") if field.metadata else None
    if doc:
        return escape_text(rest_to_markdown(str(doc)))
    for klass in getattr(cls, "__mro__", (cls,)):
        found = comment_docs(klass).get(field.name)
        if found:
            return escape_text(rest_to_markdown(found))
    return ""


def option_fields(options_cls: type[Any]) -> list[attrs.Attribute[Any]]:
    """The options a brain takes, as the config loader sees them (init arguments)."""
    return [a for a in attrs.fields(options_cls) if a.init]


def option_name(field: attrs.Attribute[Any]) -> str:
    """The key users write for ``field`` (attrs' ``alias`` for private names)."""
    return str(field.alias or field.name)


def field_default(field: attrs.Attribute[Any]) -> Any:
    """The default value, with factories called; ``attrs.NOTHING`` when required."""
    default: Any = field.default
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type,unused-ignore]
        return default.factory() if not default.takes_self else attrs.NOTHING
    if default is not attrs.NOTHING and field.converter is not None and callable(field.converter):
        try:  # show what the default becomes (a pattern string becomes a compiled regex)
            return field.converter(default)
        except Exception:
            return default
    return default


# --- values as a user writes them ---------------------------------------------------------


def toml_value(value: Any) -> str:
    """``value`` in the TOML a user would write in the config file."""
    if value is None:
        return "not set"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, re.Pattern):
        return toml_value(value.pattern)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple | set | frozenset):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    if hasattr(value, "value"):  # an enum member: written as its value
        return toml_value(value.value)
    return str(value)


def code(text: str) -> str:
    """Inline code that survives any backticks inside ``text``."""
    fence = "``" if "`" in text else "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


_CODE_SPAN = re.compile(r"(`+)(.+?)\1")


def escape_text(text: str) -> str:
    """``<`` and ``&`` outside code spans, so ``(?P<name>...)`` is not taken for HTML."""
    out, pos = [], 0
    for m in _CODE_SPAN.finditer(text):
        out.append(text[pos:m.start()].replace("&", "&amp;").replace("<", "&lt;"))
        out.append(m.group(0))
        pos = m.end()
    out.append(text[pos:].replace("&", "&amp;").replace("<", "&lt;"))
    return "".join(out)


def cell(text: str) -> str:
    """Text made safe for one Markdown table cell.

    A ``|`` outside code spans would end the cell; inside one, the tables
    extension already ignores it, and a backslash would show.
    """
    text = " ".join(text.split())
    out, pos = [], 0
    for m in _CODE_SPAN.finditer(text):
        out.append(text[pos:m.start()].replace("|", "\\|"))
        out.append(m.group(0))
        pos = m.end()
    out.append(text[pos:].replace("|", "\\|"))
    return "".join(out)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


# --- signatures and docstrings ------------------------------------------------------------


def _annotation(ann: Any) -> str:
    if ann is inspect.Parameter.empty:
        return ""
    if isinstance(ann, str):
        return ann
    return inspect.formatannotation(ann)


def format_signature(fn: Callable[..., Any], name: str | None = None, *,
                     drop_self: bool = True) -> str:
    """``name(arg: Type, ...) -> Return`` with annotations exactly as written in the source.

    ``inspect.signature`` would quote postponed (string) annotations.
    """
    sig = inspect.signature(fn)
    parts: list[str] = []
    star_done = False
    params = list(sig.parameters.values())
    if drop_self and params and params[0].name in ("self", "cls"):
        params = params[1:]
    for p in params:
        if p.kind is p.KEYWORD_ONLY and not star_done:
            parts.append("*")
            star_done = True
        text = p.name
        if p.kind is p.VAR_POSITIONAL:
            text, star_done = "*" + text, True
        elif p.kind is p.VAR_KEYWORD:
            text = "**" + text
        ann = _annotation(p.annotation)
        if ann:
            text += f": {ann}"
        if p.default is not inspect.Parameter.empty:
            text += f" = {p.default!r}" if ann else f"={p.default!r}"
        parts.append(text)
    out = f"{name or fn.__name__}({', '.join(parts)})"
    ret = _annotation(sig.return_annotation)
    return f"{out} -> {ret}" if ret else out


_ROLE = re.compile(r":(?:func|meth|class|data|attr|mod|exc|obj):`~?([^`]+)`")
_LITERAL = re.compile(r"``(.+?)``")
_FIELD = re.compile(r"^:(param\s+(\w+)|returns?|raises?\s+(\w+)):\s*(.*)$")


@attrs.frozen
class Docstring:
    """A docstring split the way the reference shows it."""

    body: str
    params: tuple[tuple[str, str], ...] = ()
    returns: str = ""


def rest_to_markdown(text: str, link: Callable[[str], str | None] = lambda _n: None) -> str:
    """Inline reST to Markdown: literals and cross-reference roles.

    ``link(name)`` gives an anchor for a role's target, or None for plain code.
    """
    def role(m: re.Match[str]) -> str:
        target = m.group(1).rsplit(".", 1)[-1]
        anchor = link(target)
        return f"[{code(target)}]({anchor})" if anchor else code(target)

    text = _ROLE.sub(role, text)
    return _LITERAL.sub(lambda m: code(m.group(1)), text)


def parse_docstring(doc: str | None,
                    link: Callable[[str], str | None] = lambda _n: None) -> Docstring:
    """Split ``:param:``/``:returns:`` fields from the prose and convert both."""
    text = inspect.cleandoc(doc or "")
    body: list[str] = []
    params: list[tuple[str, str]] = []
    returns: list[str] = []
    mode = ""  # the field an indented line continues: "param", "returns" or ""
    for line in text.splitlines():
        stripped = line.strip()
        m = None if line.startswith(" ") else _FIELD.match(stripped)
        if m and m.group(2):
            params.append((m.group(2), m.group(4)))
            mode = "param"
        elif m and m.group(1).startswith("return"):
            returns.append(m.group(4))
            mode = "returns"
        elif m:
            body.append(f"Raises ``{m.group(3) or ''}``: {m.group(4)}")
            mode = ""
        elif mode == "param" and line.startswith(" ") and stripped:
            name, prev = params[-1]
            params[-1] = (name, f"{prev} {stripped}")
        elif mode == "returns" and line.startswith(" ") and stripped:
            returns.append(stripped)
        else:
            mode = ""
            body.append(line)
    convert = functools.partial(rest_to_markdown, link=link)
    return Docstring(
        body=convert("\n".join(body).strip()),
        params=tuple((n, convert(" ".join(d.split()))) for n, d in params),
        returns=convert(" ".join(" ".join(returns).split())),
    )


def first_paragraph(doc: str | None) -> str:
    """The summary of a docstring, converted, on one line."""
    text = inspect.cleandoc(doc or "").split("\n\n", 1)[0]
    return rest_to_markdown(" ".join(text.split()))
