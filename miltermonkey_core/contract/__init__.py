"""The brain contract: what a brain implements and everything it is handed.

Hook specifications, the message model, verdicts, the recording milter
context and its edits, the brain base class and its needs, the monkey
utility handle, and the option value types brains share with the daemon.
Only :mod:`miltermonkey_core.errors` and :mod:`miltermonkey_core.logs` sit
below it; the public API in :mod:`miltermonkey_core` is drawn from here.
"""
