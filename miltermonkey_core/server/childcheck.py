"""Checking a configuration in a child process, for the supervisor's reloads."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Final

from miltermonkey_core.config.schema import Config
from miltermonkey_core.server.control import unpack_config

#: Seconds a reload's check may take (importing brains, reading secrets).
CHILD_TIMEOUT: Final = 120.0


def check_in_child(current: Config) -> tuple[Config | None, list[str]]:
    """Read the configuration again and check it, in a process of its own.

    What the supervisor does at SIGHUP: the brains' packages must be imported
    to check their options, and imported into the supervisor they would stay
    there, in a process that never runs a brain.  The child prints its
    findings as one JSON object: the problems, and the Config when there is
    none (pickled: it comes from our own child, run with our privileges).
    """
    args = [sys.executable, "-m", "miltermonkey_core.server.preflight"]
    if current.source != "embedded" and current.path:
        args.append(current.path)
    try:
        proc = subprocess.run(args, capture_output=True, timeout=CHILD_TIMEOUT, check=False,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as e:
        return None, [f"checking the configuration failed: {e}"]
    try:
        reply = json.loads(proc.stdout)
        problems = [str(p) for p in reply["problems"]]
        config = unpack_config(reply["config"]) if reply.get("config") else None
    except (ValueError, KeyError, TypeError) as e:
        said = proc.stderr.decode(errors="replace").strip()[-2000:]
        return None, [f"checking the configuration failed ({type(e).__name__}: {e}): {said}"]
    if config is None and not problems:
        problems = ["checking the configuration gave no configuration"]
    return config, problems
