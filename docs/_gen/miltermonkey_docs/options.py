"""The configuration reference's tables, read from the attrs classes the loader uses.

Defaults and one-line docs come from the code, so a new option shows up on
the site the day it is added, and an option without a doc stops the build.
"""

from __future__ import annotations

import re
from typing import Any

import attrs

from miltermonkey_docs import sources
from miltermonkey_docs.introspect import (
    GenerationError,
    code,
    field_default,
    field_doc,
    first_paragraph,
    option_fields,
    option_name,
    table,
    toml_value,
)

#: Notes of a page's own, linked from the tables: a heading ``{#opt-NAME}``.
_NOTE_ANCHOR = re.compile(r"\{#opt-([A-Za-z0-9_]+)\}")

#: The ``[[brain]]`` keys' docs, used where ``BrainEntry``'s field carries no
#: ``metadata["doc"]``.  ``unset`` is what a default of None (or no default) means.
BRAIN_KEY_DOCS: dict[str, dict[str, str]] = {
    "use": {"unset": "required",
            "doc": "Which brain: its entry-point name in the group `miltermonkey.brains` "
                   "(`miltermonkey brains` lists the installed ones)."},
    "name": {"unset": "the value of `use`",
             "doc": "The name of this instance in logs and in the milter key. It must be "
                    "unique, so give it when one brain runs twice with different options. "
                    "Letters, digits, `.`, `_` and `-` only."},
    "on_error": {"unset": "the brain's own default, else the daemon's `on_error`",
                 "doc": "This brain's [failure policy](#failure-policies) when it raises or "
                        "cannot reach its engine."},
    "on_timeout": {"unset": "`on_error`",
                   "doc": "The policy when the brain overruns its `timeout`."},
    "timeout": {"doc": "Seconds this brain's `eom_process` may take (a duration). The MTA is "
                       "kept waiting with progress replies meanwhile."},
    "mode": {"doc": "`enforce` applies the brain's verdicts and edits; `evaluate` runs it on "
                    "live mail, logs and counts what it would have done and applies nothing "
                    "(see [conditions and evaluation](conditions.md)). The seed's "
                    "`evaluation = true` means `evaluate`."},
    "when": {"doc": "Conditions under which the brain is called, all of which must hold "
                    "(see [conditions](conditions.md)); left out, the brain runs for every "
                    "message."},
    "skip_if_key": {"doc": "Skip this brain when a trusted [milter key](milter-key.md) says it "
                           "already ran on this message, at an earlier hop."},
    "expiration": {"unset": "`defaultexpiration`",
                   "doc": "How long this brain's entry in the milter key stays valid, when it "
                          "should differ from the default (a duration)."},
    "breaker_failures": {"doc": "Failures or timeouts within `breaker_window` that open the "
                                "circuit breaker (0: no breaker)."},
    "breaker_window": {"doc": "Seconds over which failures are counted (a duration)."},
    "breaker_cooldown": {"doc": "Seconds the open breaker keeps the brain from being called; "
                                "its policy applies at once meanwhile (a duration)."},
}


def _sentence(text: str) -> str:
    """The doc as written (it may start with a name), ended like a sentence."""
    text = text.strip()
    return text if not text or text.endswith((".", "!", "?", ")")) else text + "."


def _default(value: Any) -> str:
    if value is attrs.NOTHING:
        return "required"
    return "not set" if value is None else code(toml_value(value))


def _aliases_of(aliases: dict[str, str], name: str) -> str:
    return ", ".join(code(a) for a, target in aliases.items() if target == name)


def _note_link(name: str, notes: set[str]) -> str:
    return f" [More](#opt-{name})." if name in notes else ""


def page_notes(markdown: str, known: set[str]) -> set[str]:
    """Option names the page has notes for; a note on no option is stale."""
    notes = set(_NOTE_ANCHOR.findall(markdown))
    stale = sorted(notes - known)
    if stale:
        raise GenerationError(f"notes for options that do not exist: {', '.join(stale)}")
    return notes


def daemon_options(markdown: str) -> str:
    """Every ``[miltermonkey]`` option: name, default, other spellings, doc."""
    fields = attrs.fields(sources.DaemonConfig)
    notes = page_notes(markdown, {f.name for f in fields} | set(sources.BRAIN_KEYS))
    aliases = dict(sources.ALIASES)
    rows = []
    for f in fields:
        doc = field_doc(sources.DaemonConfig, f)
        if not doc:
            raise GenerationError(f"[miltermonkey] option {f.name!r} has no metadata['doc']")
        rows.append((code(f.name), _default(field_default(f)),
                     _aliases_of(aliases, f.name), _sentence(doc) + _note_link(f.name, notes)))
    return table(("option", "default", "also accepted", "meaning"), rows)


def brain_keys(markdown: str) -> str:
    """The keys every ``[[brain]]`` table has, with ``BrainEntry``'s defaults."""
    fields = {f.name: f for f in attrs.fields(sources.BrainEntry)}
    notes = page_notes(markdown, set(fields) | {f.name for f in
                                                attrs.fields(sources.DaemonConfig)})
    stale = sorted(set(BRAIN_KEY_DOCS) - set(sources.BRAIN_KEYS))
    if stale:
        raise GenerationError(f"BRAIN_KEY_DOCS documents keys that are gone: {stale}")
    aliases = dict(sources.BRAIN_ALIASES)
    rows = []
    for key in sources.BRAIN_KEYS:
        f = fields.get(key)
        if f is None:
            raise GenerationError(f"[[brain]] key {key!r} is not a BrainEntry field")
        extra = BRAIN_KEY_DOCS.get(key, {})
        doc = (f.metadata.get("doc") if f.metadata else None) or extra.get("doc")
        if not doc:
            raise GenerationError(f"[[brain]] key {key!r} has no doc: add metadata['doc'] to "
                                  "BrainEntry or an entry to BRAIN_KEY_DOCS")
        default = field_default(f)
        if default is None or default is attrs.NOTHING:
            if "unset" not in extra:
                raise GenerationError(f"[[brain]] key {key!r}: say what leaving it out means "
                                      "(BRAIN_KEY_DOCS[...]['unset'])")
            shown = extra["unset"]
        else:
            shown = _default(default)
        rows.append((code(key), shown, _aliases_of(aliases, key),
                     _sentence(doc) + _note_link(key, notes)))
    return table(("key", "default", "also accepted", "meaning"), rows)


def when_keys(markdown: str) -> str:
    """Every condition a ``when`` table takes, with what it reads."""
    rows = [(code(key), _sentence(doc)) for key, doc in sources.WHEN_KEYS.items()]
    if not rows:
        raise GenerationError("no conditions found (WHEN_KEYS)")
    return table(("condition", "meaning"), rows)


def _implemented_hooks(cls: type[Any]) -> list[str]:
    marker = f"{sources.hookspecs.PROJECT}_impl"
    return [h for h in sources.hookspecs.HOOKS
            if getattr(getattr(cls, h, None), marker, None) is not None]


def _brain_section(ep: Any) -> str:
    cls = ep.load()
    dist = sources.distribution_name(ep)
    version = ep.dist.version if ep.dist is not None else "?"
    desc = getattr(cls, "description", "") or first_paragraph(cls.__doc__)
    hooks = ", ".join(f"[{code(h)}](writing-brains.md#hook-{h})"
                      for h in _implemented_hooks(cls)) or "none"
    policy = getattr(cls, "default_on_error", None)
    lines = [
        f"### `{ep.name}` {{#brain-{ep.name}}}", "",
        f"{_sentence(desc)}", "",
        f"`use = \"{ep.name}\"`, from the distribution `{dist}` {version} "
        f"(`{ep.value}`). Hooks: {hooks}. "
        + (f"Failure policy unless the table sets `on_error`: `{policy}`."
           if policy else "Failure policy unless the table sets `on_error`: the daemon's."),
        "",
    ]
    options_cls = getattr(cls, "Options", None)
    if options_cls is None or not attrs.has(options_cls) or not option_fields(options_cls):
        return "\n".join([*lines, "It takes no options."])
    aliases = dict(getattr(options_cls, "OPTION_ALIASES", {}) or {})
    rows = []
    for f in option_fields(options_cls):
        doc = field_doc(options_cls, f)
        rows.append((code(option_name(f)), _default(field_default(f)),
                     _aliases_of(aliases, option_name(f)), _sentence(doc) if doc else "—"))
    return "\n".join([*lines, table(("option", "default", "also accepted", "meaning"), rows)])


def brain_options(_markdown: str) -> str:
    """One section per shipped brain: where it comes from, its hooks, its options."""
    eps = sources.brain_entry_points()
    found = {sources.distribution_name(ep) for ep in eps}
    missing = [d for d in sources.SHIPPED_BRAIN_DISTRIBUTIONS if d not in found]
    if missing:
        raise GenerationError(f"brains of {', '.join(missing)} are not installed: install "
                              "them before building the docs (nox -s docs does)")
    return "\n\n".join(_brain_section(ep) for ep in eps)
