"""The server: the daemon process, its worker pool and sockets, the supervisor.

The top of the core below the command line: it imports the milter layer and
everything under it, and nothing imports it but the CLI and the seed's
start-script front end.
"""
