"""Why a scan did not produce a verdict.

Every one of these means "the message is NOT known to be clean".  The brain
lets them propagate on purpose: the core then applies the brain's
``on_error`` policy (``tempfail`` by default for this brain), so an engine
that is down, slow or confused can never turn into unscanned mail being
accepted behind the admin's back.
"""

from __future__ import annotations

from miltermonkey_core import MonkeyError


class ScanError(MonkeyError):
    """The scan failed; the message must not be treated as clean."""


class EngineUnavailable(ScanError):
    """No engine could be reached (every clamd address down, scanner not executable)."""


class ScanTimeout(ScanError):
    """The engine did not answer within the brain's ``timeout``."""


class EngineProtocolError(ScanError):
    """The engine answered something this client does not understand, or hung up."""


class EngineReportedError(ScanError):
    """The engine answered, but with an error for this message (``... ERROR``, exit 2)."""
