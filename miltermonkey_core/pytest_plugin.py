"""Pytest fixtures for brain authors, loaded automatically (entry point ``pytest11``).

* ``monkey_daemon``: start real MilterMonkey daemons with the brains you name;
  they are stopped after the test.
* ``milter_session``: drive a daemon over its socket as an MTA would (the
  MTA side honours the no-reply and skip flags the daemon negotiated).
* ``run_brains``: run brain instances over a message in-process, through the
  same engine code as the daemon, for fast unit tests.
* ``postfix_stack``: a private Postfix relaying to an ``smtp-sink``, for
  end-to-end tests through a real MTA (skipped when Postfix is not
  installed, unless ``MILTERMONKEY_REQUIRE_STACK=1``).

The engines are the brains' business: ``clamd_server`` comes with
miltermonkey-av and ``spamd_server`` with miltermonkey-spam (their
``testing.plugin`` modules), so this plugin stays engine-agnostic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest

from miltermonkey_core.testing.client import MessageSpec, run_session
from miltermonkey_core.testing.daemon import MonkeyProcess
from miltermonkey_core.testing.part import require_or_skip
from miltermonkey_core.testing.postfix import Postfix
from miltermonkey_core.testing.process import free_port
from miltermonkey_core.testing.sink import SmtpSink
from miltermonkey_core.testing.smtp import send_mail


@pytest.fixture
def monkey_daemon(tmp_path: Path) -> Iterator[Callable[..., MonkeyProcess]]:
    """Factory: ``monkey_daemon(brains=[{"use": "trivial"}], daemon={...}, unix=False)``."""
    started: list[MonkeyProcess] = []

    def start(
        brains: Sequence[Mapping[str, Any]] = ({"use": "trivial"},),
        daemon: Mapping[str, Any] | None = None,
        *,
        unix: bool = False,
        name: str | None = None,
    ) -> MonkeyProcess:
        n = name or f"monkey{len(started) + 1}"
        m = MonkeyProcess(tmp_path / n, brains, daemon, unix=unix, name=n)
        started.append(m)
        return m.start()

    yield start
    for m in started:
        m.stop()


@pytest.fixture
def milter_session() -> Callable[..., Any]:
    """Send one message to a running daemon: ``milter_session(address, raw, sender, rcpts)``.

    Returns the MTA client's session result (EOM actions, disposition, and
    the message with the edits applied).
    """
    def send(address: Any, raw: bytes, sender: str = "<sender@example.test>",
             recipients: Sequence[str] = ("<rcpt@example.test>",), **kw: Any) -> Any:
        return run_session(address, [MessageSpec(raw, sender, list(recipients))], **kw)[0]

    return send


@pytest.fixture
def run_brains() -> Callable[..., Any]:
    """``run_brains(brain1, brain2, raw=b"...", sender=..., recipients=[...], macros={})``.

    Brains are instances (``MyBrain(MyBrain.Options(), Monkey(), "name")``);
    they run in the order given.  Returns an
    :class:`~miltermonkey_core.engine.offline.OfflineResult`.
    """
    # Imported when a test asks for the fixture: pytest loads this plugin in
    # every test run of an environment where the core is installed.
    from miltermonkey_core.contract.monkey import Monkey  # noqa: PLC0415 - start-up cost
    from miltermonkey_core.engine.build import chain_of  # noqa: PLC0415 - start-up cost
    from miltermonkey_core.engine.offline import run_engine  # noqa: PLC0415 - start-up cost
    from miltermonkey_core.engine.session import Engine  # noqa: PLC0415 - start-up cost

    def run(*brains: Any, raw: bytes, **kw: Any) -> Any:
        engine = Engine(chain_of(*brains), Monkey())
        return run_engine(engine, raw, **kw)

    return run


@attrs.define
class PostfixStack:
    """A running private Postfix, its sink, and a way to send it mail."""

    postfix: Any
    sink: Any
    smtp_port: int

    def send(self, raw: bytes, sender: str = "sender@example.test",
             recipients: Sequence[str] = ("rcpt@example.test",)) -> Any:
        return send_mail(self.smtp_port, raw, sender, list(recipients))

    def use_milters(self, spec: str, **params: str) -> None:
        self.postfix.set_milters(spec, **params)


@pytest.fixture(scope="module")
def postfix_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostfixStack]:
    """A private Postfix on a free loopback port relaying to an smtp-sink (module scope)."""
    require_or_skip(Postfix)
    base = tmp_path_factory.mktemp("postfix")
    sink_port, smtp_port = free_port(), free_port()
    sink = SmtpSink(base / "sink", sink_port)
    pf = Postfix(base / "pf", smtp_port, sink_port)
    sink.start()
    try:
        pf.start()
        try:
            yield PostfixStack(pf, sink, smtp_port)
        finally:
            pf.stop()
    finally:
        sink.stop()
