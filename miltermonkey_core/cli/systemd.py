"""``miltermonkey systemd-unit``: the systemd unit (and a sample configuration) shipped in the core.

Both files are package data (``miltermonkey_core/systemd/``), so what an
admin installs is what the tests check with ``systemd-analyze verify``.
The unit points at the virtualenv the README installs into
(``/opt/miltermonkey``); ``--bin`` and ``--config`` write other paths in.
"""

from __future__ import annotations

import argparse
from importlib import resources
from typing import Any

#: Where the README installs the command, and where the unit looks for the configuration.
DEFAULT_BIN = "/opt/miltermonkey/bin/miltermonkey"
DEFAULT_CONFIG = "/etc/miltermonkey.toml"


def shipped(name: str) -> str:
    """The text of a file in ``miltermonkey_core/systemd/``."""
    return resources.files("miltermonkey_core").joinpath("systemd", name).read_text("utf-8")


def unit_text(binary: str = DEFAULT_BIN, config: str = DEFAULT_CONFIG) -> str:
    return shipped("miltermonkey.service").replace("@BIN@", binary).replace("@CONFIG@", config)


def sample_config() -> str:
    return shipped("miltermonkey.toml")


def cmd_systemd_unit(args: argparse.Namespace) -> int:
    if args.sample_config:
        print(sample_config(), end="")
    else:
        print(unit_text(args.bin, args.config), end="")
    return 0


def add_systemd_command(sub: Any) -> None:
    p = sub.add_parser(
        "systemd-unit", help="print the systemd unit (or, with --sample-config, a config)",
        description="Print the systemd unit file for MilterMonkey (Type=notify, reload on "
                    "SIGHUP, hardened).  Install it with: miltermonkey systemd-unit > "
                    "/etc/systemd/system/miltermonkey.service")
    p.add_argument("--bin", default=DEFAULT_BIN,
                   help=f"the miltermonkey command the unit runs (default {DEFAULT_BIN})")
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help=f"the configuration file the unit names (default {DEFAULT_CONFIG})")
    p.add_argument("--sample-config", action="store_true",
                   help="print a sample /etc/miltermonkey.toml instead")
    p.set_defaults(func=cmd_systemd_unit)
