"""Everything that would stop a configuration from running, checked before it runs.

``miltermonkey check-config`` and the supervisor (before a start and before
each reload) ask the same questions here: is every brain installed and
importable, do its options pass its own checks, is the milter key secret
usable.  Problems are collected, not raised one at a time, so one run shows
them all.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import sys
from typing import Any

from miltermonkey_core.config.brain_options import build_brain_options
from miltermonkey_core.config.endpoint import parse_connection
from miltermonkey_core.config.load import embedded_default, load_any
from miltermonkey_core.config.schema import Config
from miltermonkey_core.errors import BrainLoadError, ConfigError, MonkeyError, config_problems
from miltermonkey_core.milterkey.secrets import check_secret_file
from miltermonkey_core.plugins import detect_local_engines, installed_brains, load_brain_class
from miltermonkey_core.server.control import pack_config


def load_fresh(current: Config) -> Config:
    """Read the configuration again from where ``current`` came from."""
    installed = installed_brains()
    if current.source == "embedded" or not current.path:
        return embedded_default(installed=installed, detected=detect_local_engines(installed))
    return load_any(current.path, installed=installed)


def resolve_brains(config: Config) -> tuple[dict[str, Any], list[MonkeyError]]:
    """Import every configured brain and build its options; collect every problem.

    One run of check-config should show all the broken brains, not the
    first one only.
    """
    built: dict[str, Any] = {}
    problems: list[MonkeyError] = []
    for entry in config.brains:
        try:
            cls = load_brain_class(entry.use)
        except BrainLoadError as e:
            problems.append(entry.error(str(e), key="use"))
            continue
        try:
            built[entry.name] = build_brain_options(cls, entry, config)
        except ConfigError as e:
            problems.extend(config_problems(e))
    return built, problems


def secret_problems(config: Config) -> list[MonkeyError]:
    """The milter key's secret file, checked as the daemon will check it at start."""
    d = config.daemon
    if not d.milter_key:
        return []
    key = "miltersecretfile" if "miltersecretfile" in config.daemon_lines else "milter_key"
    try:
        check_secret_file(d.miltersecretfile, d.user)
    except (MonkeyError, OSError) as e:
        return [config.error(str(e), key=key)]
    return []


def environment_problems(config: Config) -> list[MonkeyError]:
    """What only this machine can say: users, groups and directories that must exist."""
    d = config.daemon
    out: list[MonkeyError] = []
    if d.user:
        try:
            pwd.getpwnam(d.user)
        except KeyError:
            out.append(config.error(f"no such user {d.user!r}", key="user"))
    for key, name in (("group", d.group), ("socket_group", d.socket_group)):
        if name:
            try:
                grp.getgrnam(name)
            except KeyError:
                out.append(config.error(f"no such group {name!r}", key=key))
    endpoint = parse_connection(d.connection)
    dirs = [("tmpdir", d.tmpdir)]
    if endpoint.path:
        dirs.append(("connection", os.path.dirname(endpoint.path)))
    for key, value in (("pidfile", d.pidfile), ("log_target", d.log_target)):
        if value and value.startswith("/"):
            dirs.append((key, os.path.dirname(value)))
    for key, directory in dirs:
        if directory and not os.path.isdir(directory):
            out.append(config.error(f"directory {directory} does not exist", key=key))
    return out


def problems_of(config: Config, *, environment: bool = False) -> list[MonkeyError]:
    """Everything that would stop ``config`` from running, without starting brains.

    ``environment`` adds what only this machine can say (users, groups,
    directories): ``check-config`` asks for it; a reload keeps the running
    identity and sockets, so the supervisor does not.
    """
    _, problems = resolve_brains(config)
    problems += secret_problems(config)
    if environment:
        problems += environment_problems(config)
    return problems


def main(argv: list[str] | None = None) -> int:
    """``python -m miltermonkey_core.server.preflight [PATH]``: the child of
    :func:`~miltermonkey_core.server.childcheck.check_in_child`."""
    args = sys.argv[1:] if argv is None else argv
    installed = installed_brains()
    try:
        if args:
            config = load_any(args[0], installed=installed)
        else:
            config = embedded_default(installed=installed,
                                      detected=detect_local_engines(installed))
        problems = [str(p) for p in problems_of(config)]
    except MonkeyError as e:
        found = config_problems(e) if isinstance(e, ConfigError) else [e]
        print(json.dumps({"problems": [str(p) for p in found], "config": None}))
        return 0
    except Exception as e:  # a start script may raise anything
        print(json.dumps({"problems": [f"{type(e).__name__}: {e}"], "config": None}))
        return 0
    print(json.dumps({"problems": problems,
                      "config": None if problems else pack_config(config)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
