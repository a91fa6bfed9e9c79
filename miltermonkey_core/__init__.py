"""MilterMonkey: many mail filters ("brains") in one milter, run in configured order.

The public API for brain authors is what this module exports, and the
shipped brains import nothing else of the core; everything else is internal
and may change.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

#: Where each public name lives.  They are imported when first used (PEP 562):
#: every ``import miltermonkey_core.X`` runs this module first, and the
#: supervisor process, the CLI's quick commands and the config layer need none
#: of the brain contract's modules.
_PUBLIC: dict[str, str] = {
    "Brain": "contract.brain", "Needs": "contract.brain", "NoOptions": "contract.brain",
    "MilterContext": "contract.context",
    "Capability": "contract.edits", "check_header_name": "contract.edits",
    "safe_header_value": "contract.edits",
    "hookimpl": "contract.hookspecs",
    "Address": "contract.model", "Body": "contract.model", "Connection": "contract.model",
    "Envelope": "contract.model", "Header": "contract.model", "Headers": "contract.model",
    "Message": "contract.model",
    "Monkey": "contract.monkey", "NoticeError": "contract.monkey",
    "duration_converter": "contract.options", "parse_duration": "contract.options",
    "parse_size": "contract.options", "size_converter": "contract.options",
    "Action": "contract.verdict", "Reply": "contract.verdict", "Verdict": "contract.verdict",
    "ConfigError": "errors", "MonkeyError": "errors",
    "current_queue_id": "logs",
}


def __getattr__(name: str) -> Any:
    where = _PUBLIC.get(name)
    if where is None:
        raise AttributeError(f"module 'miltermonkey_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"miltermonkey_core.{where}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])


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
