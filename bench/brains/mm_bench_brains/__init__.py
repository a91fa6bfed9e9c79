"""A brain for the benchmark's retry workload: the first attempt of marked mail gets a 4xx.

Postfix retries a message after a 4xx, and every retry is a full message
again: the brains that already passed it would scan it again from scratch.
The retry workload (``bench/workloads.py``) marks one message in five with
a header; this brain, last in the chain after av and spam, answers 451 the
first time it sees a marked Message-ID and lets every later attempt through,
so the front MTA's retry is what the cache can save.

It is installed as a real distribution with an entry point (``nox -s bench``
does ``pip install -e bench/brains``), so the daemon finds it the way it
finds any third-party brain.
"""

from __future__ import annotations

import threading

import attrs

from miltermonkey_core import Brain, Message, MilterContext, Monkey, Needs, hookimpl


@attrs.frozen(kw_only=True)
class TempfailOnceOptions:
    #: Mail carrying this header is tempfailed on its first attempt.
    header: str = "X-Bench-Retry"


class TempfailOnce(Brain):
    """451 for the first attempt of each marked Message-ID; every later attempt passes."""

    Options = TempfailOnceOptions
    needs = Needs(envelope=False, headers=True, body=False, connection=False)
    description = "benchmark: tempfails marked mail once per Message-ID"
    # a set lookup under a lock held for microseconds: it runs on the connection's thread
    blocking = False

    def __init__(self, options: TempfailOnceOptions, monkey: Monkey,
                 name: str | None = None) -> None:
        super().__init__(options, monkey, name)
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    @hookimpl
    def eom_process(self, message: Message, ctx: MilterContext, monkey: Monkey) -> None:
        if message.headers.get(self.options.header) is None:
            return
        mid = message.message_id or ""
        with self._lock:
            first = mid not in self._seen
            self._seen.add(mid)
        if first:
            ctx.tempfail(451, "4.7.1", "bench: first attempt refused, try again",
                         reason="first attempt of a marked message")
