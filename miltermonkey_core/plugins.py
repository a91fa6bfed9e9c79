"""Finding brains by entry point and loading only the configured ones, in order.

pluggy calls the last registered implementation first and its entry-point
loader walks distributions in installation order, so neither can give the
order the admin wrote.  Here pluggy validates hook signatures and markers;
the order and the isolation of calls belong to the engine
(:mod:`miltermonkey_core.engine.chain`).
"""

from __future__ import annotations

import configparser
import importlib
import inspect
import os
import re
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import attrs
import pluggy

from miltermonkey_core.config.schema import to_toml_value
from miltermonkey_core.contract import hookspecs
from miltermonkey_core.contract.brain import Brain
from miltermonkey_core.errors import BrainLoadError

ENTRY_POINT_GROUP = "miltermonkey.brains"


# --------------------------------------------------------------------------------------
# Entry points, read from the installed distributions' metadata files.
#
# importlib.metadata (and its backport) parse every METADATA file with the
# email package and bring zipfile, tempfile, shutil, bz2 and lzma along:
# about 4 MiB in each of the daemon's two processes, for a few lines of
# entry_points.txt.  The brains' entry points are read here directly, the
# way importlib.metadata finds them: every *.dist-info and *.egg-info
# directory on sys.path, the first distribution of a name winning.
# --------------------------------------------------------------------------------------


@attrs.frozen
class Distribution:
    name: str
    version: str


@attrs.frozen
class EntryPoint:
    """One ``name = module:attr`` of a group, with the distribution that declares it."""

    name: str
    value: str
    group: str
    dist: Distribution | None

    def load(self) -> Any:
        module, _, attr = self.value.partition(":")
        obj: Any = importlib.import_module(module.strip())
        for part in attr.split("[", 1)[0].strip().split(".") if attr else ():
            obj = getattr(obj, part)
        return obj


def _metadata(info_dir: str) -> Distribution:
    fields: dict[str, str] = {}
    for filename in ("METADATA", "PKG-INFO"):
        try:
            with open(os.path.join(info_dir, filename), encoding="utf-8") as f:
                for line in f:
                    if not line.strip():
                        break  # the body (the long description) follows the headers
                    key, sep, value = line.partition(":")
                    if sep and key in ("Name", "Version"):
                        fields.setdefault(key, value.strip())
            break
        except OSError:
            continue
    stem = os.path.basename(info_dir).rsplit(".", 1)[0]
    name, _, version = stem.partition("-")
    return Distribution(fields.get("Name", name), fields.get("Version", version or "0"))


def _info_dirs() -> Iterator[str]:
    for entry in sys.path:
        try:
            names = sorted(os.listdir(entry or "."))
        except OSError:  # not a directory (a zip), or unreadable
            continue
        for name in names:
            if name.endswith((".dist-info", ".egg-info")):
                yield os.path.join(entry or ".", name)


def entry_points(group: str) -> list[EntryPoint]:
    """Every entry point of ``group``, in sys.path order, each distribution once."""
    seen: set[str] = set()
    out: list[EntryPoint] = []
    for info in _info_dirs():
        path = os.path.join(info, "entry_points.txt")
        if not os.path.isfile(path):
            continue
        dist = _metadata(info)
        key = re.sub(r"[-_.]+", "-", dist.name).lower()
        if key in seen:
            continue
        seen.add(key)
        parser = configparser.RawConfigParser(delimiters=("=",))
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        try:
            parser.read(path, encoding="utf-8")
        except (configparser.Error, OSError, UnicodeDecodeError):
            continue
        if parser.has_section(group):
            out += [EntryPoint(name, value.strip(), group, dist)
                    for name, value in parser.items(group)]
    return out


#: Every brain seen by any scan in this process.  The daemon scans as root
#: before it switches to ``user``; after the switch the installation may
#: not be readable (a 0700 virtualenv), and a scan then finds nothing.  The
#: brains found earlier stay known: their modules are already imported.
_seen: dict[str, EntryPoint] = {}


def installed_brains() -> dict[str, EntryPoint]:
    """Every brain any installed distribution registers, by entry-point name."""
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    _seen.update(found)
    return {**_seen, **found}


def load_brain_class(use: str) -> type[Brain]:
    """Import the brain class registered as ``use``.

    The error lists what is installed, since a typo or a missing
    ``pip install`` are the usual causes.
    """
    eps = installed_brains()
    ep = eps.get(use)
    if ep is None:
        have = ", ".join(sorted(eps)) or "none"
        raise BrainLoadError(
            f"no brain called {use!r} is installed (installed brains: {have}); "
            f"install its package, e.g. pip install miltermonkey-{use}"
        )
    try:
        obj = ep.load()
    except Exception as e:
        dist = ep.dist.name if ep.dist else "?"
        raise BrainLoadError(
            f"brain {use!r} ({ep.value}, from {dist}) failed to import: "
            f"{type(e).__name__}: {e}"
        ) from e
    if not (inspect.isclass(obj) and issubclass(obj, Brain)):
        raise BrainLoadError(
            f"entry point {use!r} = {ep.value} is not a miltermonkey_core.Brain subclass"
        )
    return obj


def brain_version(use: str) -> str:
    """The version of the distribution that provides brain ``use`` ("0" if unknown)."""
    ep = installed_brains().get(use)
    return str(ep.dist.version) if ep is not None and ep.dist is not None else "0"


def hooks_of(cls: type) -> list[str]:
    """Hook names a brain class implements (methods carrying the hookimpl marker)."""
    out = []
    for name in hookspecs.HOOKS:
        fn = getattr(cls, name, None)
        if fn is not None and getattr(fn, f"{hookspecs.PROJECT}_impl", None) is not None:
            out.append(name)
    return out


@attrs.frozen
class BrainInfo:
    name: str
    value: str
    distribution: str
    version: str
    hooks: tuple[str, ...]
    description: str
    options: tuple[tuple[str, str], ...]
    error: str | None = None


def _shown(default: Any) -> str:
    """An option's default as the admin writes it (show-config's spelling)."""
    try:
        return to_toml_value(default)
    except TypeError:
        return repr(default)


def brain_info() -> list[BrainInfo]:
    """What ``miltermonkey brains`` shows: one entry per installed brain."""
    out = []
    for name, ep in sorted(installed_brains().items()):
        dist = ep.dist.name if ep.dist else "?"
        version = ep.dist.version if ep.dist else "?"
        try:
            cls = load_brain_class(name)
        except BrainLoadError as e:
            out.append(BrainInfo(name, ep.value, dist, version, (), "", (), str(e)))
            continue
        opts: list[tuple[str, str]] = []
        if attrs.has(cls.Options):
            for f in attrs.fields(cls.Options):
                default = f.default
                if isinstance(default, attrs.Factory):  # type: ignore[arg-type,unused-ignore]
                    default = default.factory()
                opts.append((f.name, _shown(default)))
        desc = cls.description or (inspect.getdoc(cls) or "").split("\n", 1)[0]
        out.append(BrainInfo(name, ep.value, dist, version, tuple(hooks_of(cls)), desc,
                             tuple(opts)))
    return out


def new_plugin_manager() -> pluggy.PluginManager:
    """A plugin manager with the brain contract and nothing registered."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def register(pm: pluggy.PluginManager, brain: Brain, name: str) -> None:
    """Register one brain instance, refusing ordering requests the config overrides."""
    for hook in hookspecs.HOOKS:
        fn = getattr(brain, hook, None)
        opts: Any = getattr(fn, f"{hookspecs.PROJECT}_impl", None) if fn else None
        if opts and (opts.get("tryfirst") or opts.get("trylast")):
            raise BrainLoadError(
                f"brain {name!r}: hook {hook} asks for tryfirst/trylast; the order of "
                "brains is set by the config only - remove the flag"
            )
    try:
        pm.register(brain, name=name)
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        raise BrainLoadError(f"brain {name!r} does not fit the brain contract: {e}") from e


def detect_local_engines(installed: Mapping[str, EntryPoint] | None = None) -> dict[str, Any]:
    """Options for each installed brain that found its engine answering on this machine.

    Only for the embedded default: each brain class's
    :meth:`~miltermonkey_core.Brain.detect_local` is asked, in brain-name
    order; a brain that fails to import or to probe is left out.
    """
    found: dict[str, Any] = {}
    for name in sorted(installed if installed is not None else installed_brains()):
        try:
            options = load_brain_class(name).detect_local()
        except Exception:  # noqa: S112 - a broken brain simply is not detected
            continue
        if options is not None:
            found[name] = dict(options)
    return found
