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


class ConfigErrors(ConfigError):
    """Every problem found in one configuration, each located; listed one per line.

    A check that stops at the first mistake makes the admin run it once per
    mistake; the loader and the brain option checks collect them all.  It
    is a :class:`ConfigError` whose location is the first problem's.
    """

    problems: list[ConfigError]

    def __init__(self, problems: list[ConfigError]) -> None:
        flat: list[ConfigError] = []
        for p in problems:
            flat.extend(p.problems if isinstance(p, ConfigErrors) else [p])
        self.problems = flat
        first = flat[0]
        super().__init__(first.message, path=first.path, line=first.line, key=first.key)

    def __str__(self) -> str:
        return "\n".join(ConfigError.__str__(p) for p in self.problems)


def config_problems(error: ConfigError) -> list[ConfigError]:
    """The single problems an error stands for (itself, or each of a ConfigErrors)."""
    return list(error.problems) if isinstance(error, ConfigErrors) else [error]


class BrainLoadError(MonkeyError):
    """A configured brain could not be found, imported or instantiated."""


class ReplyError(MonkeyError, ValueError):
    """An SMTP reply that the MTA would refuse or mangle."""


class ActionNotNegotiated(MonkeyError):
    """A brain asked for an edit the MTA did not agree to during negotiation."""


class SecretError(MonkeyError):
    """The milter key secret file is missing, weak or readable by others."""
