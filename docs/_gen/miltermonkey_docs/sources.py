"""The one place where the docs generator imports the code it documents.

The core's modules are being arranged into layers; when one of them moves,
change its import here and nowhere else.  Everything the generator needs
from the installed packages is named in this module.
"""

from __future__ import annotations

import re
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any, Final

import miltermonkey_core
from miltermonkey_core import (
    Action,
    Address,
    Brain,
    Connection,
    Header,
    Message,
    MilterContext,
    Monkey,
    Needs,
    Reply,
    Verdict,
)
from miltermonkey_core.config import ALIASES, BRAIN_ALIASES, BRAIN_KEYS, BrainEntry, DaemonConfig
from miltermonkey_core.config.conditions import WHEN_KEYS
from miltermonkey_core.contract import hookspecs as _hookspecs
from miltermonkey_core.engine.chain import BrainResult
from miltermonkey_core.engine.offline import OfflineResult
from miltermonkey_core.pytest_plugin import PostfixStack
from miltermonkey_core.testing.cleanup import AppliedMessage, EomResult
from miltermonkey_core.testing.client import SessionResult
from miltermonkey_core.testing.daemon import MonkeyProcess
from miltermonkey_core.testing.replies import SmtpReply
from miltermonkey_core.testing.sink import SinkMessage, SmtpSink, parse_dump
from miltermonkey_core.testing.smtp import SmtpResult

#: The module of hook specifications: one function per hook, in ``HOOKS`` order.
hookspecs: Final[ModuleType] = _hookspecs

#: Entry-point group brains register under.
BRAIN_GROUP: Final = "miltermonkey.brains"

#: Distributions of this repository whose brains the site documents.  Other
#: installed brains (the test suite's fixture brains) are left out; a shipped
#: brain that is not installed fails the build instead of vanishing.
SHIPPED_BRAIN_DISTRIBUTIONS: Final = ("miltermonkey-core", "miltermonkey-av", "miltermonkey-spam")

#: Classes whose attributes and methods a page may list with
#: ``<!-- generated: api NAME -->``, by the name pages use.
API_CLASSES: Final[dict[str, type[Any]]] = {
    cls.__name__: cls
    for cls in (
        Action, Address, Brain, Connection, Header, Message, MilterContext, Monkey, Needs,
        Reply, Verdict, BrainResult, OfflineResult, MonkeyProcess, SessionResult, EomResult,
        AppliedMessage, SmtpReply, PostfixStack, SmtpResult, SmtpSink, SinkMessage,
    )
}

#: Functions a page may tell readers to import, with ``<!-- generated: import NAME -->``.
API_FUNCTIONS: Final[dict[str, Any]] = {fn.__name__: fn for fn in (parse_dump,)}

__all__ = [
    "ALIASES",
    "API_CLASSES",
    "API_FUNCTIONS",
    "BRAIN_ALIASES",
    "BRAIN_GROUP",
    "BRAIN_KEYS",
    "SHIPPED_BRAIN_DISTRIBUTIONS",
    "WHEN_KEYS",
    "BrainEntry",
    "DaemonConfig",
    "brain_entry_points",
    "core_version",
    "distribution_name",
    "hookspecs",
]


def brain_entry_points() -> list[Any]:
    """Installed brains from the shipped distributions, the core's first."""
    found = [ep for ep in entry_points(group=BRAIN_GROUP)
             if distribution_name(ep) in SHIPPED_BRAIN_DISTRIBUTIONS]
    return sorted(found, key=lambda ep: (SHIPPED_BRAIN_DISTRIBUTIONS.index(distribution_name(ep)),
                                         ep.name))


def distribution_name(ep: Any) -> str:
    """The distribution's name, PEP 503 normalised (``miltermonkey_av``: ``miltermonkey-av``)."""
    return re.sub(r"[-_.]+", "-", ep.dist.name).lower() if ep.dist is not None else ""


def core_version() -> str:
    return str(miltermonkey_core.__version__)
