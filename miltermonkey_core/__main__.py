"""``python -m miltermonkey_core``: the same command as ``miltermonkey``."""

from miltermonkey_core.cli import main

raise SystemExit(main())
