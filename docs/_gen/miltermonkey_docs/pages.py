"""Filling a page's ``<!-- generated: NAME ARGS -->`` markers with generated Markdown.

A marker stays an HTML comment in the Markdown source (invisible where the
file is read raw) and becomes a table or a reference on the site.  An
unknown marker, or a generator that finds the code and the docs at odds,
raises :class:`GenerationError`, which fails the build.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from miltermonkey_docs import api, hookref, options
from miltermonkey_docs.introspect import GenerationError

MARKER = re.compile(r"^<!--\s*generated:\s*([a-z-]+)((?:\s+[^\s>]+)*)\s*-->[ \t]*$", re.M)

#: What each marker name produces; each takes the whole page (for its notes).
GENERATORS: dict[str, Callable[[str], str]] = {
    "daemon-options": options.daemon_options,
    "brain-keys": options.brain_keys,
    "when-keys": options.when_keys,
    "brain-options": options.brain_options,
    "hook-contract": hookref.hook_contract,
    "hook-summary": hookref.hook_summary,
    "hook-reference": hookref.hook_reference,
}


def render(markdown: str) -> str:
    """The page with every marker replaced by what it stands for."""

    def expand(m: re.Match[str]) -> str:
        name, args = m.group(1), m.group(2).strip()
        if name == "api":
            return api.api_table(markdown, args)
        if name == "import":
            return api.import_line(args)
        generator = GENERATORS.get(name)
        if generator is None:
            raise GenerationError(f"unknown marker 'generated: {name}'; known: api, import, "
                                  + ", ".join(GENERATORS))
        if args:
            raise GenerationError(f"marker 'generated: {name}' takes no arguments")
        return generator(markdown)

    return MARKER.sub(expand, markdown)
