"""What every ``miltermonkey`` command shares: the program name, exit statuses,
error output, and reading the configuration named by ``-c``."""

from __future__ import annotations

import argparse
import os
import sys

from miltermonkey_core.config.load import embedded_default, load_any
from miltermonkey_core.config.schema import Config
from miltermonkey_core.errors import ConfigError
from miltermonkey_core.plugins import detect_local_engines, installed_brains

PROG = "miltermonkey"

#: ``try`` exit statuses follow the SMTP reply class of the verdict.
EXIT_DELIVERED = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_TEMPFAIL = 4
EXIT_REFUSED = 5


def err(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


def load(config_path: str | None, problems: list[ConfigError] | None = None) -> Config:
    """The configuration at ``config_path``, else the built-in default.

    The embedded default adds the av and spam brains when they are installed
    and find their engine answering on this machine.  ``problems``: collect
    the file's mistakes there instead of raising the first (``check-config``).
    """
    installed = installed_brains()
    if config_path:
        return load_any(config_path, installed=installed, problems=problems)
    return embedded_default(installed=installed, detected=detect_local_engines(installed))


def config_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-c", "--config", metavar="FILE", default=os.environ.get("MILTERMONKEY_CONFIG"),
        help="a .toml file or a .py start script (default: $MILTERMONKEY_CONFIG, else the "
             "built-in configuration)",
    )
