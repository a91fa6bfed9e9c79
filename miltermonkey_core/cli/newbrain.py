"""``miltermonkey new-brain NAME``: write a brain package a new author can install and test.

The package it writes works as generated: ``pip install ./NAME && pytest NAME``
passes, with tests that use the core's fixtures in-process and through a
real daemon.  The templates are package data (``miltermonkey_core/scaffold``),
filled with :class:`string.Template`, so what is written is plain Python and
TOML an author can read without knowing any template language.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

import attrs

from miltermonkey_core import __version__
from miltermonkey_core.cli.common import EXIT_ERROR, err
from miltermonkey_core.plugins import installed_brains

#: A brain name that is also a usable package and entry-point name.
NAME_RE = re.compile(r"[a-z][a-z0-9]*(?:[_-][a-z0-9]+)*")
NAME_MAX = 40

#: Template file -> path in the new package ("{package}" and "{module}" filled in).
LAYOUT: tuple[tuple[str, str], ...] = (
    ("pyproject.toml.tmpl", "pyproject.toml"),
    ("README.md.tmpl", "README.md"),
    ("gitignore.tmpl", ".gitignore"),
    ("__init__.py.tmpl", "{package}/__init__.py"),
    ("brain.py.tmpl", "{package}/brain.py"),
    ("py.typed.tmpl", "{package}/py.typed"),
    ("test_brain.py.tmpl", "tests/test_{module}.py"),
)


def core_requirement(version: str) -> str:
    """The core releases a new brain accepts: this one's series, not the next.

    Before 1.0 a minor release may change the brain API, so ``0.2.x`` gives
    ``>=0.2,<0.3``; from 1.0 on, ``>=1.4,<2``.
    """
    major, minor = (int(p) for p in [*re.findall(r"\d+", version), "0", "0"][:2])
    upper = f"{major}.{minor + 1}" if major == 0 else f"{major + 1}"
    return f"miltermonkey-core>={major}.{minor},<{upper}"


@attrs.frozen
class BrainNames:
    """Every name the new package uses, derived from the brain's name."""

    name: str
    module: str
    package: str
    distribution: str
    class_name: str
    options_name: str
    header: str

    @classmethod
    def of(cls, name: str) -> BrainNames:
        words = re.split(r"[_-]", name)
        camel = "".join(w.capitalize() for w in words)
        module = name.replace("-", "_")
        return cls(
            name=name,
            module=module,
            package=f"miltermonkey_{module}",
            distribution=f"miltermonkey-{name.replace('_', '-')}",
            class_name=f"{camel}Brain",
            options_name=f"{camel}Options",
            header="X-" + "-".join(w.capitalize() for w in words),
        )


def check_name(name: str) -> str | None:
    """Why ``name`` cannot be a new brain's name, or None when it can."""
    if len(name) > NAME_MAX or not NAME_RE.fullmatch(name):
        return (f"{name!r} cannot be a brain name: use lowercase letters and digits, "
                f"starting with a letter, words joined by '-' or '_', at most {NAME_MAX} "
                "characters (it becomes `use = \"NAME\"` and the package miltermonkey_NAME)")
    taken = installed_brains().get(name)
    if taken is not None:
        dist = taken.dist.name if taken.dist else taken.value
        return (f"a brain called {name!r} is already installed ({dist}); two brains of one "
                "name would make `use = ...` ambiguous: choose another name")
    return None


def render(names: BrainNames) -> dict[str, str]:
    """The new package's files, by path relative to its directory.

    The README and the tests name the directory as ``./NAME``, relative to
    where the author ran ``new-brain``.
    """
    values = {**attrs.asdict(names), "directory": names.name,
              "core_requirement": core_requirement(__version__)}
    scaffold = resources.files("miltermonkey_core").joinpath("scaffold")
    files = {}
    for template, target in LAYOUT:
        text = scaffold.joinpath(template).read_text(encoding="utf-8")
        path = target.format(package=names.package, module=names.module)
        files[path] = Template(text).substitute(values)
    return files


def write_package(target: Path, files: dict[str, str]) -> None:
    for relative, text in files.items():
        path = target / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def cmd_new_brain(args: argparse.Namespace) -> int:
    name: str = args.name
    problem = check_name(name)
    if problem:
        err(f"new-brain: {problem}")
        return EXIT_ERROR
    parent = Path(args.directory)
    target = parent / name
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        err(f"new-brain: {target}: already exists and is not empty; choose another NAME "
            "or --directory")
        return EXIT_ERROR
    names = BrainNames.of(name)
    shown = str(target) if args.directory != "." else name
    files = render(names)
    try:
        write_package(target, files)
    except OSError as e:
        err(f"new-brain: {e.filename or target}: {e.strerror or e}")
        return EXIT_ERROR
    out = sys.stdout
    out.write(f"wrote {shown}/: distribution {names.distribution}, package {names.package}, "
              f"brain \"{name}\" ({names.class_name})\n")
    for relative in files:
        out.write(f"  {shown}/{relative}\n")
    # pip takes a directory only as a path: ./hello, not hello
    path = shown if shown.startswith(("/", ".")) else f"./{shown}"
    steps = ((f"pip install '{path}[test]'", "pip install -e while you work on it"),
             (f"pytest {shown}", "its tests: in-process and through a real daemon"),
             ("miltermonkey brains", f"lists \"{name}\" with its options"))
    width = max(len(command) for command, _ in steps) + 2
    out.write("next:\n")
    for command, why in steps:
        out.write(f"  {command.ljust(width)}# {why}\n")
    out.write(f"then enable it in the configuration:\n  [[brain]]\n  use = \"{name}\"\n")
    return 0


def add_new_brain_command(subparsers: Any) -> None:
    """Add ``new-brain`` to the ``miltermonkey`` sub-commands."""
    p = subparsers.add_parser(
        "new-brain", help="write a new brain package (pyproject, brain class, tests)",
        description="Write NAME/ (or DIR/NAME/): a pip package with the entry point "
        "miltermonkey.brains NAME, a brain class with an attrs Options class, a README, "
        "and tests using the core's pytest fixtures. As written, "
        "`pip install ./NAME && pytest NAME` passes.",
    )
    p.add_argument("name", metavar="NAME",
                   help="the brain's name, as admins write it in `use = \"NAME\"`")
    p.add_argument("-d", "--directory", metavar="DIR", default=".",
                   help="where to create NAME/ (default: the current directory)")
    p.set_defaults(func=cmd_new_brain)
