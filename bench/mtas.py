"""The MTAs the benchmark sends mail through, each private, each relaying to the one sink.

A contender names its milters the way Postfix's ``smtpd_milters`` does
(``inet:127.0.0.1:PORT``, ``unix:/path``, comma-separated, in the order
they run).  :class:`PostfixMta` passes that on; :class:`SendmailMta`
rewrites it into ``INPUT_MAIL_FILTER`` lines (``S=inet:PORT@127.0.0.1``)
and restarts Sendmail, which reads its ``.cf`` only at start.  Both count
what is still queued the same way, so the measurement does not care which
MTA it drives.

Sendmail is worth measuring beside Postfix because it drives a milter
differently: it writes each macro packet and its command in two writes, so
over TCP it can wait on Nagle's algorithm for the milter host's delayed ACK
(issue 15).  Both run as shipped by Debian, tuned only so that neither
throttles a benchmark (no rate limits, no load-average refusals, generous
milter timeouts).
"""

from __future__ import annotations

import abc
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from console import log

from miltermonkey_core.testing.postfix import Postfix
from miltermonkey_core.testing.process import free_port
from miltermonkey_core.testing.sendmail import Sendmail, SendmailMilter

#: Postfix tuned for throughput (and the 50 MB memory test, and slow engines on 1 MB mail).
POSTFIX_EXTRA = {
    # no slow start, no rate limits
    "default_destination_concurrency_limit": "20",
    "smtp_destination_concurrency_limit": "20",
    "initial_destination_concurrency": "20",
    "smtpd_client_connection_count_limit": "0",
    "smtpd_client_connection_rate_limit": "0",
    "smtpd_client_message_rate_limit": "0",
    "smtpd_client_recipient_rate_limit": "0",
    "in_flow_delay": "0s",
    "message_size_limit": str(120 * 1024 * 1024),
    "milter_command_timeout": "60s",
    "milter_content_timeout": "300s",
}

#: Sendmail's milter timeouts as generous as Postfix's above: C connect, S send,
#: R read (a reply, e.g. after a scan of 1 MB of mail), E the whole end of message.
SENDMAIL_TIMEOUTS = {"C": "10s", "S": "60s", "R": "300s", "E": "10m"}

_INET = re.compile(r"inet:(?P<host>[^:,\s]+):(?P<port>\d+)")


class Mta(abc.ABC):
    """One private MTA: where clients connect, how to point it at milters, its queue."""

    #: The name on the command line (``--mta``) and in the results.
    name: ClassVar[str]
    #: The name in labels and headings.
    title: ClassVar[str]
    smtp_port: int

    def __init__(self, state_dir: Path, relay_port: int) -> None:
        self.state_dir = state_dir
        self.relay_port = relay_port
        self._milters: str | None = None

    @staticmethod
    @abc.abstractmethod
    def unavailable_reason() -> str | None:
        """Why this MTA cannot run here, or None."""

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def stop(self) -> None: ...

    @property
    @abc.abstractmethod
    def pid(self) -> int | None:
        """The MTA's root process: every process it runs is below it (CPU metering)."""

    @abc.abstractmethod
    def apply_milters(self, spec: str) -> None:
        """Make new SMTP sessions use the milters of ``spec`` (Postfix syntax, "" for none)."""

    @abc.abstractmethod
    def queue_count(self) -> int:
        """Messages accepted but not yet handed to the sink."""

    @abc.abstractmethod
    def purge_queue(self) -> None: ...

    @abc.abstractmethod
    def wait_queue_empty(self, timeout: float) -> None: ...

    def set_milters(self, spec: str) -> None:
        """Point the MTA at ``spec`` unless it already is (a switch costs a reload or restart)."""
        if spec != self._milters:
            self.apply_milters(spec)
            self._milters = spec


class PostfixMta(Mta):
    name = "postfix"
    title = "Postfix"

    def __init__(self, state_dir: Path, relay_port: int,
                 extra: Mapping[str, str] | None = None) -> None:
        """``extra``: main.cf settings over :data:`POSTFIX_EXTRA` (a second host, a front MTA)."""
        super().__init__(state_dir, relay_port)
        self.part = Postfix(state_dir, free_port(), relay_port, milters="",
                            extra={**POSTFIX_EXTRA, **(extra or {})})
        self.smtp_port = self.part.smtp_port

    @staticmethod
    def unavailable_reason() -> str | None:
        return Postfix.unavailable_reason()

    def start(self) -> None:
        self.part.start()
        self._milters = ""
        log(f"postfix ({self.state_dir.name}) on 127.0.0.1:{self.smtp_port} -> "
            f"127.0.0.1:{self.relay_port}")

    def stop(self) -> None:
        self.part.stop()

    @property
    def pid(self) -> int | None:
        return self.part.pid

    def apply_milters(self, spec: str) -> None:
        self.part.set_milters(spec)

    def queue_count(self) -> int:
        n = 0
        for name in ("incoming", "active", "deferred", "hold", "maildrop"):
            for _dirpath, _dirs, files in os.walk(self.part.queue_dir / name):
                n += len(files)
        return n

    def purge_queue(self) -> None:
        self.part.purge_queue()

    def wait_queue_empty(self, timeout: float) -> None:
        self.part.wait_queue_empty(timeout)


def sendmail_filters(spec: str, prefix: str) -> list[SendmailMilter]:
    """Postfix's milter list as Sendmail filters, in the same order.

    Sendmail wants a name per filter (``Xname, S=...``); the names only have
    to differ, so they are ``prefix`` and the position.
    """
    out = []
    for n, item in enumerate((s.strip() for s in spec.split(",") if s.strip()), start=1):
        inet = _INET.fullmatch(item)
        if inet is not None:
            socket = f"inet:{inet['port']}@{inet['host']}"
        elif item.startswith("unix:"):
            socket = item
        else:
            raise ValueError(f"cannot give Sendmail the milter {item!r}")
        name = re.sub(r"\W", "_", prefix) + str(n)
        out.append(SendmailMilter(name, socket, "T", dict(SENDMAIL_TIMEOUTS)))
    return out


class SendmailMta(Mta):
    """Debian's Sendmail, unpacked privately (``.ci/install-system.sh``), as the test kit runs it.

    Its log level stays at Sendmail's default (9, and the milter log level
    with it): what an installation logs per message is part of its cost.
    """

    name = "sendmail"
    title = "Sendmail"

    def __init__(self, state_dir: Path, relay_port: int) -> None:
        super().__init__(state_dir, relay_port)
        self.part = Sendmail(state_dir, free_port(), relay_port)
        self.smtp_port = self.part.smtp_port
        self._filters = 0

    @staticmethod
    def unavailable_reason() -> str | None:
        return Sendmail.unavailable_reason()

    def start(self) -> None:
        self.part.start()
        self._milters = ""
        log(f"sendmail on 127.0.0.1:{self.smtp_port} -> smtp-sink :{self.relay_port}")

    def stop(self) -> None:
        self.part.stop()

    @property
    def pid(self) -> int | None:
        return self.part.pid

    def apply_milters(self, spec: str) -> None:
        # fresh names at every switch: nothing of the previous filters carries over
        self._filters += 1
        self.part.set_milters(sendmail_filters(spec, f"bench{self._filters}_"))

    def queue_count(self) -> int:
        return len(self.part.queued())

    def purge_queue(self) -> None:
        """Stop, delete every queue file, start: Sendmail has no ``postsuper -d ALL``."""
        self.part.stop()
        for path in self.part.queue_dir.iterdir():
            if path.is_file():
                path.unlink()
        self.part.start()

    def wait_queue_empty(self, timeout: float) -> None:
        self.part.wait_queue_empty(timeout)


#: Every MTA the benchmark knows, by ``--mta`` name, in the order of the tables.
MTAS: dict[str, type[Mta]] = {cls.name: cls for cls in (PostfixMta, SendmailMta)}
