"""The engine: the configured brains as a chain, and one session's path through it.

Above the contract, the configuration, the plugin loader and the milter key;
below anything that speaks the milter protocol.  The same engine serves the
daemon, ``miltermonkey try`` and the test kit's in-process runs.
"""
