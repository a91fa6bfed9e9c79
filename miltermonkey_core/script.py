"""The seed's start script, kept: ``monkey()``, ``brain()`` and ``spank()``.

The 2005 daemon was started by a Perl script whose ``use`` lines named the
daemon options and the brains in the order they run; admins who kept such
scripts keep the shape::

    #!/usr/bin/env python3
    from miltermonkey_core.script import brain, monkey, spank
    monkey(connection="inet:6609@127.0.0.1")
    brain("av", relay_mode=False)
    brain("spam")
    spank()

Recording and checking live in the configuration layer
(:mod:`miltermonkey_core.config.script`); this front end only adds what
``spank()`` does when the script is run for real: start the daemon.
"""

from __future__ import annotations

from miltermonkey_core.config.script import brain, collect, finish, load_script, monkey, reset
from miltermonkey_core.plugins import installed_brains
from miltermonkey_core.server.main import run

__all__ = ["brain", "collect", "load_script", "monkey", "reset", "spank"]


def spank() -> None:
    """Check the configuration and run the daemon until it is stopped.

    Run directly, a configuration mistake ends the script with a one-line
    ``miltermonkey: file:line: key: message`` and exit status 1, not a traceback.
    """
    config = finish(installed_brains())
    status = run(config)
    if status:
        raise SystemExit(status)
