"""MilterMonkey AV brain: clamd (INSTREAM, failover) or a command-line scanner.

Installed as the ``av`` entry point of ``miltermonkey.brains``; configure it
with a ``[[brain]]`` table whose ``use = "av"`` (see the README).
"""

from __future__ import annotations

__version__ = "0.2.0"

__all__ = ["__version__"]
