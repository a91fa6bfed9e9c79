"""MilterMonkey: many mail filters ("brains") in one milter, run in configured order.

The public API for brain authors is what this module exports; everything
else is internal and may change.
"""

from miltermonkey_core.brain import Brain, Needs, NoOptions
from miltermonkey_core.context import Capability, MilterContext
from miltermonkey_core.errors import ConfigError, MonkeyError
from miltermonkey_core.hookspecs import hookimpl
from miltermonkey_core.model import Address, Body, Connection, Envelope, Header, Headers, Message
from miltermonkey_core.monkey import Monkey
from miltermonkey_core.verdict import Action, Reply, Verdict

__version__ = "0.1.0"

__all__ = [
    "Action",
    "Address",
    "Body",
    "Brain",
    "Capability",
    "ConfigError",
    "Connection",
    "Envelope",
    "Header",
    "Headers",
    "Message",
    "MilterContext",
    "Monkey",
    "MonkeyError",
    "Needs",
    "NoOptions",
    "Reply",
    "Verdict",
    "__version__",
    "hookimpl",
]
