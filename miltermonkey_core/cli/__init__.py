"""The ``miltermonkey`` command: the top of the core, where every layer meets."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence

from miltermonkey_core import __version__
from miltermonkey_core.cli.commands import add_commands
from miltermonkey_core.cli.common import EXIT_ERROR, PROG, err
from miltermonkey_core.cli.key import add_key_commands
from miltermonkey_core.cli.newbrain import add_new_brain_command
from miltermonkey_core.cli.status import add_status_command
from miltermonkey_core.cli.systemd import add_systemd_command
from miltermonkey_core.errors import ConfigError, MonkeyError, config_problems


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run many mail filters (brains) in one Sendmail/Postfix milter.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_commands(sub)
    add_key_commands(sub)
    add_status_command(sub)
    add_systemd_command(sub)
    add_new_brain_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``miltermonkey`` and ``python -m miltermonkey_core``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status: int = args.func(args)
    except MonkeyError as e:  # ConfigError(s), BrainLoadError, SecretError...
        for problem in config_problems(e) if isinstance(e, ConfigError) else [e]:
            err(str(problem))
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `miltermonkey show-config | head`
        with contextlib.suppress(OSError):
            sys.stdout.close()
        return 0
    return status
