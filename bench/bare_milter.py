#!/usr/bin/env python3
"""The smallest useful pymilter milter: add one header at end of message.

The benchmark's yardstick for "what does a milter in Python cost before any
framework", written the classic way, on pymilter and libmilter: MilterMonkey
with its trivial brain does the same work (one header) through its own
milter protocol code and its whole engine.

    python bench/bare_milter.py SOCKET            pymilter's defaults
    python bench/bare_milter.py --tuned SOCKET    answered connect/DATA + TCP_NODELAY

SOCKET is libmilter's syntax: ``inet:PORT@127.0.0.1`` or ``unix:/path``.

The defaults are what a pymilter tutorial gives you: connect() is marked
``@Milter.noreply`` and DATA is negotiated away.  Over TCP each message then
waits on Nagle's algorithm meeting the MTA's delayed ACK (libmilter never sets
TCP_NODELAY and sends its end-of-message reply in two small writes), and on
the MTA's next packet queued behind an unanswered one.  ``--tuned`` answers
connect and DATA and sets TCP_NODELAY on the listening socket, which Linux
copies to every accepted connection.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

import Milter
import milter

HEADER = "X-Bench-Bare"


class DefaultMilter(Milter.Base):  # type: ignore[misc]
    """pymilter defaults: no reply to connect, DATA not negotiated."""

    @Milter.noreply  # type: ignore[untyped-decorator]
    def connect(self, hostname: str, family: int, hostaddr: object) -> int:
        return Milter.CONTINUE  # type: ignore[no-any-return]

    def eom(self) -> int:
        self.addheader(HEADER, "1")
        return Milter.ACCEPT  # type: ignore[no-any-return]


class TunedMilter(Milter.Base):  # type: ignore[misc]
    """Every step the MTA sends is answered, so no packet waits behind an unanswered one.

    Not a subclass of DefaultMilter: pymilter caches the negotiated protocol
    mask on the class, and a subclass would inherit the parent's.
    """

    def connect(self, hostname: str, family: int, hostaddr: object) -> int:
        return Milter.CONTINUE  # type: ignore[no-any-return]

    def data(self) -> int:
        return Milter.CONTINUE  # type: ignore[no-any-return]

    def eom(self) -> int:
        self.addheader(HEADER, "1")
        return Milter.ACCEPT  # type: ignore[no-any-return]


def nodelay_listeners() -> int:
    """Set TCP_NODELAY on this process's listening TCP sockets (libmilter opened them in C)."""
    done = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            s = socket.socket(fileno=int(name))
        except OSError:
            continue
        try:
            if s.family in (socket.AF_INET, socket.AF_INET6) and s.type == socket.SOCK_STREAM \
                    and s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                done += 1
        except OSError:
            pass
        finally:
            s.detach()  # the descriptor is libmilter's: never close it
    return done


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("socket", help="inet:PORT@HOST or unix:/path")
    ap.add_argument("--tuned", action="store_true",
                    help="answer connect and DATA, TCP_NODELAY on the listening socket")
    args = ap.parse_args()

    Milter.factory = TunedMilter if args.tuned else DefaultMilter
    Milter.set_flags(Milter.ADDHDRS)
    if args.tuned:
        # Milter.runmilter opens the socket and then serves; wrap the opening step
        # so the option is set between the two.
        opensocket = milter.opensocket

        def opensocket_nodelay(rmsock: bool) -> object:
            result = opensocket(rmsock)
            nodelay_listeners()
            return result

        milter.opensocket = opensocket_nodelay
    if args.socket.startswith(("unix:", "local:")):
        os.umask(0o000)  # Postfix's smtpd (user postfix) must be able to connect
    print(f"bare milter ({'tuned' if args.tuned else 'defaults'}) on {args.socket}", flush=True)
    Milter.runmilter("benchbare", args.socket, 240)
    return 0


if __name__ == "__main__":
    sys.exit(main())
