"""The documentation cannot fall behind the code (datasette's documentation tests).

* every hook is in the brain author guide with the signature its specification
  declares, as the site build generates it;
* every ``[miltermonkey]`` option and every ``[[brain]]`` key, with its other
  spellings, is in the configuration reference, with a description;
* every hook is implemented by some brain in the tests, so it is exercised.

The pages are rendered with the same generator the site build runs
(``docs/_gen``), so these tests need neither MkDocs nor a built site.
"""

from __future__ import annotations

import ast
import inspect
import re
import sys
from pathlib import Path

import attrs
import pytest

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "mkdocs.yml").is_file())
sys.path.insert(0, str(ROOT / "docs" / "_gen"))

from miltermonkey_docs import pages, sources  # noqa: E402

HOOKS = tuple(sources.hookspecs.HOOKS)


def rendered(page: str) -> str:
    return pages.render((ROOT / "docs" / page).read_text())


@pytest.fixture(scope="module")
def guide() -> str:
    return rendered("writing-brains.md")


@pytest.fixture(scope="module")
def reference() -> str:
    return rendered("configuration.md")


def declared_signatures() -> dict[str, str]:
    """Each hook's signature as the specification's source spells it (read with ast)."""
    path = inspect.getsourcefile(sources.hookspecs)
    assert path is not None
    tree = ast.parse(Path(path).read_text())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in HOOKS:
            returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
            out[node.name] = f"{node.name}({ast.unparse(node.args)}){returns}"
    return out


def test_every_hook_has_a_specification_in_its_module() -> None:
    assert set(declared_signatures()) == set(HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_in_the_brain_guide_with_its_exact_signature(guide: str, hook: str) -> None:
    signature = declared_signatures()[hook]
    assert f"{{#hook-{hook}}}" in guide, f"no section for hook {hook}"
    assert f"\ndef {signature}\n" in guide, f"signature of {hook} missing: {signature}"


def test_the_brain_guide_documents_no_hook_that_is_gone(guide: str) -> None:
    documented = set(re.findall(r"\{#hook-(\w+)\}", guide))
    assert documented == set(HOOKS)


def _table_rows(markdown: str) -> dict[str, list[str]]:
    """First-column name of each table row -> its other cells."""
    rows: dict[str, list[str]] = {}
    for line in markdown.splitlines():
        m = re.match(r"^\| `([^`]+)` \|(.*)\|$", line)
        if m:
            rows.setdefault(m.group(1), [c.strip() for c in m.group(2).split(" | ")])
    return rows


def test_every_daemon_option_is_in_the_reference_with_a_description(reference: str) -> None:
    rows = _table_rows(reference)
    for field in attrs.fields(sources.DaemonConfig):
        assert field.name in rows, f"[miltermonkey] option {field.name} not in the reference"
        default, _also, meaning = rows[field.name]
        assert default and meaning, field.name
    for alias, name in sources.ALIASES.items():
        assert f"`{alias}`" in rows[name][1], f"spelling {alias} of {name} not in the reference"


def test_every_brain_key_is_in_the_reference_with_a_description(reference: str) -> None:
    rows = _table_rows(reference)
    for key in sources.BRAIN_KEYS:
        assert key in rows, f"[[brain]] key {key} not in the reference"
        default, _also, meaning = rows[key]
        assert default and meaning, key
    for alias, key in sources.BRAIN_ALIASES.items():
        assert f"`{alias}`" in rows[key][1], f"spelling {alias} of {key} not in the reference"


def test_every_option_of_the_shipped_brains_is_in_the_reference(reference: str) -> None:
    for ep in sources.brain_entry_points():
        options_cls = getattr(ep.load(), "Options", None)
        if options_cls is None or not attrs.has(options_cls):
            continue
        section = reference.split(f"{{#brain-{ep.name}}}", 1)[1].split("\n### ", 1)[0]
        rows = _table_rows(section)
        for field in attrs.fields(options_cls):
            if field.init:
                assert (field.alias or field.name) in rows, f"{ep.name}: {field.name}"


_IMPLEMENTED = re.compile(r"@hookimpl(?:\([^)]*\))?\s*\n\s*def (\w+)\(")


def test_every_hook_is_implemented_by_a_brain_in_the_tests() -> None:
    test_dirs = [ROOT / "tests", *sorted((ROOT / "plugins").glob("*/tests"))]
    implemented: set[str] = set()
    for directory in test_dirs:
        for path in directory.rglob("*.py"):
            implemented.update(_IMPLEMENTED.findall(path.read_text(errors="replace")))
    untested = [hook for hook in HOOKS if hook not in implemented]
    assert not untested, f"no brain in tests/ or plugins/*/tests implements: {untested}"


def test_a_hook_added_without_a_docstring_stops_the_docs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The generator refuses, rather than publishing a hook nobody described."""
    from miltermonkey_docs import hookref
    from miltermonkey_docs.introspect import GenerationError

    def newhook(message: object, monkey: object) -> None:
        pass

    monkeypatch.setattr(sources.hookspecs, "newhook", newhook, raising=False)
    monkeypatch.setattr(sources.hookspecs, "HOOKS", (*HOOKS, "newhook"))
    with pytest.raises(GenerationError, match="newhook"):
        hookref.hook_reference("")


def test_a_daemon_option_without_a_doc_stops_the_docs(monkeypatch: pytest.MonkeyPatch) -> None:
    from miltermonkey_docs import options
    from miltermonkey_docs.introspect import GenerationError

    @attrs.frozen(kw_only=True)
    class Undocumented:
        threads: int = attrs.field(default=20, metadata={"doc": "messages judged at once"})
        brand_new: int = 0

    monkeypatch.setattr(sources, "DaemonConfig", Undocumented)
    with pytest.raises(GenerationError, match="brand_new"):
        options.daemon_options("")
