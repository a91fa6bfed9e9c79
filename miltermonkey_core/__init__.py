"""MilterMonkey: many mail filters ("brains") in one milter, run in configured order.

The public API for brain authors is what this module exports, and the
shipped brains import nothing else of the core; everything else is internal
and may change.
"""

from miltermonkey_core.contract.brain import Brain, Needs, NoOptions
from miltermonkey_core.contract.context import MilterContext
from miltermonkey_core.contract.edits import Capability, check_header_name, safe_header_value
from miltermonkey_core.contract.hookspecs import hookimpl
from miltermonkey_core.contract.model import (
    Address,
    Body,
    Connection,
    Envelope,
    Header,
    Headers,
    Message,
)
from miltermonkey_core.contract.monkey import Monkey, NoticeError
from miltermonkey_core.contract.options import (
    duration_converter,
    parse_duration,
    parse_size,
    size_converter,
)
from miltermonkey_core.contract.verdict import Action, Reply, Verdict
from miltermonkey_core.errors import ConfigError, MonkeyError
from miltermonkey_core.logs import current_queue_id

__version__ = "0.2.0"

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
    "NoticeError",
    "Reply",
    "Verdict",
    "__version__",
    "check_header_name",
    "current_queue_id",
    "duration_converter",
    "hookimpl",
    "parse_duration",
    "parse_size",
    "safe_header_value",
    "size_converter",
]
