"""Exceptions, each naming what went wrong and, where it can, how to fix it."""

from __future__ import annotations


class MonkeyError(Exception):
    """Base class of every error MilterMonkey raises on purpose."""


class ConfigError(MonkeyError):
    """A configuration problem, located by file, line and key when known."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        key: str | None = None,
    ) -> None:
        self.message = message
        self.path = path
        self.line = line
        self.key = key
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ""
        if self.path:
            where = self.path + (f":{self.line}" if self.line else "") + ": "
        key = f"{self.key}: " if self.key else ""
        return f"{where}{key}{self.message}"


class BrainLoadError(MonkeyError):
    """A configured brain could not be found, imported or instantiated."""


class ReplyError(MonkeyError, ValueError):
    """An SMTP reply that libmilter or the MTA would refuse or mangle."""


class ActionNotNegotiated(MonkeyError):
    """A brain asked for an edit the MTA did not agree to during negotiation."""


class SecretError(MonkeyError):
    """The milter key secret file is missing, weak or readable by others."""
