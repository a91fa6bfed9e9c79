"""The hook reference: every hook's signature and docstring, from the hook specifications.

Each hook gets a section with the anchor ``hook-NAME``; its signature is
printed exactly as the specification declares it, because that is what a
brain's method must accept (pluggy passes arguments by name).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from miltermonkey_docs import sources
from miltermonkey_docs.introspect import (
    GenerationError,
    code,
    first_paragraph,
    format_signature,
    parse_docstring,
    rest_to_markdown,
    table,
)


def hook_names() -> tuple[str, ...]:
    return tuple(sources.hookspecs.HOOKS)


def hook_spec(name: str) -> Callable[..., Any]:
    spec: Callable[..., Any] | None = getattr(sources.hookspecs, name, None)
    if spec is None or not callable(spec):
        raise GenerationError(f"hook {name!r} is listed in HOOKS but has no specification")
    return spec


def hook_signature(name: str) -> str:
    """``name(arg: Type, ...) -> Return``, as the specification declares it."""
    return format_signature(hook_spec(name), name)


def _link(target: str) -> str | None:
    return f"#hook-{target}" if target in hook_names() else None


def hook_summary(_markdown: str) -> str:
    """One row per hook, in the order the MTA drives them."""
    rows = [(f"[{code(name)}](#hook-{name})", first_paragraph(hook_spec(name).__doc__))
            for name in hook_names()]
    return table(("hook", "called"), rows)


def hook_contract(_markdown: str) -> str:
    """The rules every hook shares: the specification module's own docstring."""
    doc = sources.hookspecs.__doc__ or ""
    body = doc.split("\n\n", 1)[1] if "\n\n" in doc else doc
    return rest_to_markdown(body.strip(), _link)


def _section(name: str) -> str:
    spec = hook_spec(name)
    if not (spec.__doc__ or "").strip():
        raise GenerationError(f"hook {name!r} has no docstring: document it in the "
                              "specification before it reaches brain authors")
    doc = parse_docstring(spec.__doc__, _link)
    out = [f"### `{name}` {{#hook-{name}}}", "", "```python",
           f"def {hook_signature(name)}", "```", "", doc.body]
    if doc.params:
        out += ["", "**Arguments**", ""]
        out += [f"- `{param}`: {text}" for param, text in doc.params]
    if doc.returns:
        out += ["", f"**Returns** {doc.returns}"]
    return "\n".join(out)


def hook_reference(_markdown: str) -> str:
    """A section per hook: signature, what it is for, arguments, what it may return."""
    return "\n\n".join(_section(name) for name in hook_names())
