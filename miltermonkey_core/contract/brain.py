"""The base class of brains and the declaration of what a brain needs from the MTA.

A brain is a class registered under the ``miltermonkey.brains`` entry-point
group.  The daemon instantiates it once per configured entry with its
validated options and the monkey, then registers the instance with pluggy;
its hook methods (marked with :data:`miltermonkey_core.hookimpl`) are called
from many MTA sessions at once, so per-message data belongs in
``message.notes`` and never on ``self``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

if TYPE_CHECKING:
    from miltermonkey_core.contract.model import Message
    from miltermonkey_core.contract.monkey import Monkey

#: Milter stages a brain can ask macros for (Postfix/Sendmail names).
MACRO_STAGES = ("connect", "helo", "envfrom", "envrcpt", "data", "eoh", "eom")


@attrs.frozen
class Needs:
    """What a brain needs from the MTA; the daemon negotiates the union.

    Anything no enabled brain needs is not asked for, so Postfix does not
    even send it: a brain that only adds a header makes the whole milter
    skip header and body transfer.
    """

    #: Receive MAIL FROM / RCPT TO (fills ``message.envelope``).
    envelope: bool = True
    #: Receive the headers (fills ``message.headers``; calls ``header``).
    headers: bool = True
    #: Receive the body (fills ``message.body``; calls ``body``).
    body: bool = True
    #: Capabilities the brain may use at EOM (see :class:`~.context.Capability`).
    actions: frozenset[str] = frozenset()
    #: Extra macros per stage, e.g. ``{"envfrom": ("{auth_authen}",)}``.
    macros: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict)
    #: Also receive recipients the MTA already rejected (SMFIP_RCPT_REJ).
    rejected_recipients: bool = False
    #: Fill ``message.connection`` (client name and address, connect-stage
    #: macros).  A brain that never reads it may say False: when no brain
    #: needs it, the MTA's connect step is answered without entering Python.
    connection: bool = True

    def __or__(self, other: Needs) -> Needs:
        macros: dict[str, tuple[str, ...]] = {k: tuple(v) for k, v in self.macros.items()}
        for stage, names in other.macros.items():
            macros[stage] = tuple(dict.fromkeys((*macros.get(stage, ()), *names)))
        return Needs(
            envelope=self.envelope or other.envelope,
            headers=self.headers or other.headers,
            body=self.body or other.body,
            actions=self.actions | other.actions,
            macros=macros,
            rejected_recipients=self.rejected_recipients or other.rejected_recipients,
            connection=self.connection or other.connection,
        )

    @classmethod
    def nothing(cls) -> Needs:
        return cls(envelope=False, headers=False, body=False, connection=False)


@attrs.frozen
class NoOptions:
    """Options class of a brain that takes none."""


class Brain:
    """Subclass this, set ``Options`` and ``needs``, and mark hook methods.

    ``name`` is the configured name of this instance (the same brain class can
    run twice under two names with different options).
    """

    #: attrs class the brain's config table is validated against.
    Options: ClassVar[type[Any]] = NoOptions
    #: Default needs; may be replaced per instance in ``__init__``.
    needs: Needs = Needs()
    #: Shown by ``miltermonkey brains``.
    description: ClassVar[str] = ""
    #: Failure policy when the config gives none (else the daemon's ``on_error``).
    default_on_error: ClassVar[str | None] = None
    #: False for a brain whose ``eom_process`` only computes (no I/O, no
    #: locks, no engine): the daemon then calls it on the connection's own
    #: thread instead of handing it to the worker pool and back.  Its
    #: ``timeout`` cannot be enforced, so never set it on a brain that waits.
    blocking: ClassVar[bool] = True
    #: True when ``eom_process`` neither reads nor depends on what brains before
    #: it did to the message (it only looks at the message as received): the
    #: daemon may then start it at the same time as its independent neighbours,
    #: so their engine calls overlap.  Its results still apply in config order.
    #: May be set per instance, when an option makes the brain read what earlier
    #: brains wrote.
    independent: bool = False
    #: Seconds a cached end-of-message result of this brain may be replayed
    #: (0: never cached).  See :meth:`cache_key`; may be set per instance.
    cache_ttl: float = 0.0

    def __init__(self, options: Any, monkey: Monkey, name: str | None = None) -> None:
        self.options = options
        self.monkey = monkey
        self.name = name or type(self).__name__

    def cache_key(self, message: Message) -> Sequence[str | bytes] | None:
        """What this brain's verdict on ``message`` depends on, for the scan cache.

        Return every input the answer depends on: a digest of the content the
        engine sees (``message.body.sha256()``, or of the headers and body it
        reads), the options that change the answer, and the engine's own
        version where it has one (clamd's signature database, say, so an
        update makes every cached "clean" stale at once).  The daemon adds the
        brain's name and version.  ``None`` means "do not cache this one".
        Called only when :attr:`cache_ttl` is above 0; keep it cheap.
        """
        return None

    @classmethod
    def detect_local(cls) -> Mapping[str, Any] | None:
        """Options that make this brain work with an engine found on this machine.

        Asked only when the daemon runs on its embedded default (no config
        file): a brain whose engine answers at a well-known local address
        (Debian's clamd or spamd socket, say) returns the options that point
        at it and is added to the default chain; ``None`` leaves it out.
        Keep it quick: a short connect timeout, no retries.
        """
        return None

    def close_brain(self) -> None:
        """Release engine connections and threads; called on shutdown and reload."""
