"""The brain contract: every hook a brain can implement, in milter order.

A brain implements any subset of these as methods marked with
``@miltermonkey_core.hookimpl``.  The daemon calls them brain by brain in the
order the configuration lists the brains (never pluggy's registration
order), each call isolated: an exception in one brain is logged with the
brain's name and the queue id and turned into that brain's failure policy;
the other brains and the daemon carry on.

Return values of the per-stage hooks (everything but ``eom_process``,
``abort`` and ``close``):

* ``None`` or ``Verdict.continue_()``: carry on.
* ``Verdict.skip()``: this brain is done and is not called again for this
  message (for the session when returned from ``connect`` or ``helo``).
* a final ``Verdict.reject()``, ``Verdict.tempfail()`` or ``Verdict.discard()``:
  answered to the MTA at once; later brains are not called.  From ``envrcpt``
  it refuses only that recipient.

The first final verdict wins; brains after it are not called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from miltermonkey_core.contract.context import MilterContext
    from miltermonkey_core.contract.model import Address, Connection, Header, Message
    from miltermonkey_core.contract.monkey import Monkey
    from miltermonkey_core.contract.verdict import Verdict

PROJECT = "miltermonkey"

_hookspec = pluggy.HookspecMarker(PROJECT)
#: Mark a brain method as the implementation of a hook.
hookimpl = pluggy.HookimplMarker(PROJECT)

# --------------------------------------------------------------------------------------
# Session stage: once per SMTP connection.
# --------------------------------------------------------------------------------------


@_hookspec
def connect(connection: Connection, monkey: Monkey) -> Verdict | None:
    """Called when a client connects to the MTA, before HELO.

    :param connection: client host name, address, port and family, and the
        connect-stage macros in ``connection.macros``.
    :param monkey: the utility handle (logging, temp files, the milter key).
    :returns: ``Verdict.skip()`` to sit out the whole session (an
        authenticated or trusted client), a final verdict to refuse the
        connection, or ``None``.
    """


@_hookspec
def helo(connection: Connection, helo_name: str, monkey: Monkey) -> Verdict | None:
    """Called on HELO/EHLO with the name the client gave (also in ``connection.helo``).

    :param helo_name: the HELO/EHLO argument as the client sent it.

    :returns: as for :func:`connect`.
    """


# --------------------------------------------------------------------------------------
# Envelope stage: once per message (MAIL FROM), once per recipient (RCPT TO).
# --------------------------------------------------------------------------------------


@_hookspec
def envfrom(message: Message, sender: Address, monkey: Monkey) -> Verdict | None:
    """Called on MAIL FROM; a new ``message`` starts here.

    :param message: the message being received; only ``connection`` and
        ``envelope.sender`` are known yet.  ``message.notes`` is this brain's
        place for per-message state (shared dict, key by brain name).
    :param sender: the envelope sender with its ESMTP parameters.
    :returns: ``Verdict.skip()`` to ignore this message, a final verdict to
        refuse the sender, or ``None``.
    """


@_hookspec
def envrcpt(message: Message, recipient: Address, monkey: Monkey) -> Verdict | None:
    """Called on each RCPT TO, after it is added to ``message.envelope.recipients``.

    :returns: a final verdict refuses this recipient only (the message goes
        on for the others); ``Verdict.skip()`` or ``None`` as elsewhere.
    """


# --------------------------------------------------------------------------------------
# Content stage: streamed while the client sends DATA.
# --------------------------------------------------------------------------------------


@_hookspec
def header(message: Message, header: Header, monkey: Monkey) -> Verdict | None:
    """Called for each header in order, as it arrives.

    :param header: name, decoded value and raw bytes.  It is also appended to
        ``message.headers`` before the call.
    :returns: as for :func:`envfrom`.  Brains that only judge the whole
        message need not implement this: ``eom_process`` sees every header.
    """


@_hookspec
def eoh(message: Message, monkey: Monkey) -> Verdict | None:
    """Called once all headers are in, before the body.

    :returns: as for :func:`envfrom`; ``Verdict.skip()`` here spares the brain
        the body stream.
    """


@_hookspec
def body(message: Message, chunk: bytes, monkey: Monkey) -> Verdict | None:
    """Called for each body chunk (at most 64 KiB) as it arrives.

    For brains that stream to an engine while the client is still sending.
    The chunk is also written to ``message.body`` (spooled to disk when large).

    :returns: as for :func:`envfrom`.
    """


# --------------------------------------------------------------------------------------
# End of message: the verdict.
# --------------------------------------------------------------------------------------


@_hookspec
def eom_process(message: Message, ctx: MilterContext, monkey: Monkey) -> None:
    """Judge the whole message: the seed's one required hook.

    Called in configured order once the MTA has sent the whole message.

    :param message: envelope, macros, headers in arrival order (raw bytes
        kept) and the body (``message.body``: in memory, or a temporary file
        above the spool threshold).
    :param ctx: records edits (``add_header``, ``change_header``,
        ``insert_header``, ``delete_header``, ``replace_header``,
        ``replace_body``, ``add_rcpt``, ``del_rcpt``, ``change_from``,
        ``quarantine``) and the verdict (``accept``, ``reject``, ``tempfail``,
        ``discard``).  ``ctx.headers`` shows the headers after earlier
        brains' edits.  Nothing is sent to the MTA until every brain has run.
    :param monkey: the utility handle.
    :returns: nothing; a final verdict set on ``ctx`` stops the chain.  If
        the brain raises, its edits are rolled back and its failure policy
        applies.
    """


# --------------------------------------------------------------------------------------
# Clean-up.
# --------------------------------------------------------------------------------------


@_hookspec
def abort(message: Message, monkey: Monkey) -> None:
    """Called when the MTA abandons the current message (RSET, a reject, a lost client).

    Per-message state must be released here: the session may carry on with
    another message.  May be called more than once (Postfix sends ABORT twice).
    """


@_hookspec
def close(connection: Connection, monkey: Monkey) -> None:
    """Called once when the SMTP session ends, even after errors; free session state."""


#: Hooks in protocol order: every function above marked as a spec, in the order
#: it is defined, so the list cannot drift from the specs.
HOOKS: tuple[str, ...] = tuple(
    name for name, obj in list(globals().items())
    if callable(obj) and hasattr(obj, f"{PROJECT}_spec")
)
