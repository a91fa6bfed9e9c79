"""MilterMonkey's SpamAssassin brain: spamd scores, SpamAssassin headers, the seed's rating=.

Install next to miltermonkey-core and add ``[[brain]] use = "spam"`` to the
config; the README lists every option.  :mod:`miltermonkey_spam.spamc` is a
standalone SPAMC/1.5 client usable without the brain.
"""

from miltermonkey_spam.brain import SpamBrain
from miltermonkey_spam.options import SpamOptions
from miltermonkey_spam.spamc import (
    SpamcClient,
    SpamdAddress,
    SpamdError,
    SpamdProtocolError,
    SpamdReplyError,
    SpamdTimeout,
    SpamdUnavailable,
    SpamResult,
)

__version__ = "0.2.0"

__all__ = [
    "SpamBrain",
    "SpamOptions",
    "SpamResult",
    "SpamcClient",
    "SpamdAddress",
    "SpamdError",
    "SpamdProtocolError",
    "SpamdReplyError",
    "SpamdTimeout",
    "SpamdUnavailable",
    "__version__",
]
