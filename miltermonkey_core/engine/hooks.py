"""A typed facade over one brain's hook implementations.

The engine calls brains one at a time, in config order, each call isolated,
so it cannot use pluggy's ``pm.hook.<name>(...)`` loop.  It calls each
brain's implementation itself, through :class:`BrainHooks`: one typed
method per hook (tox 4's ``plugin.manager`` is the model), so mypy checks
every call site against the hook's signature, and a hook's name appears as
a string in exactly one place: the hook specifications.

pluggy lets an implementation take any subset of the spec's arguments; the
call to each is bound once, when the brain is loaded, so the per-call cost
is one dictionary lookup and the brain's own function.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, Final

from miltermonkey_core.contract import hookspecs
from miltermonkey_core.contract.context import MilterContext
from miltermonkey_core.contract.model import Address, Connection, Header, Message
from miltermonkey_core.contract.monkey import Monkey

#: A brain's function for one hook and the argument names it takes, in order.
HookImpl = tuple[Callable[..., Any], tuple[str, ...]]

#: Each hook's arguments as the specification orders them.
SPEC_ARGS: Final[Mapping[str, tuple[str, ...]]] = {
    hook: tuple(inspect.signature(getattr(hookspecs, hook)).parameters)
    for hook in hookspecs.HOOKS
}


def _bind(hook: str, fn: Callable[..., Any], argnames: tuple[str, ...]) -> Callable[..., Any]:
    """A callable taking the spec's arguments in spec order, passing ``fn`` only its own."""
    spec = SPEC_ARGS[hook]
    if argnames == spec:
        return fn
    picks = tuple(spec.index(a) for a in argnames)

    def call(*args: Any) -> Any:
        return fn(*[args[i] for i in picks])

    return call


def _missing(*args: Any) -> None:
    """What an unimplemented hook does: nothing (the chain never calls it anyway)."""


class BrainHooks:
    """One brain's hooks behind typed methods; ``monkey`` is filled in for the brain."""

    __slots__ = ("_calls", "implemented", "monkey")

    def __init__(self, impls: Mapping[str, HookImpl], monkey: Monkey) -> None:
        self.monkey = monkey
        self._calls: dict[str, Callable[..., Any]] = {
            hook: _bind(hook, fn, argnames) for hook, (fn, argnames) in impls.items()
        }
        for hook in hookspecs.HOOKS:
            self._calls.setdefault(hook, _missing)
        #: The hooks this brain implements.
        self.implemented = frozenset(impls)

    # --- session stage ---------------------------------------------------------------

    def connect(self, connection: Connection) -> object:
        return self._calls["connect"](connection, self.monkey)

    def helo(self, connection: Connection, helo_name: str) -> object:
        return self._calls["helo"](connection, helo_name, self.monkey)

    # --- envelope -----------------------------------------------------------------------

    def envfrom(self, message: Message, sender: Address) -> object:
        return self._calls["envfrom"](message, sender, self.monkey)

    def envrcpt(self, message: Message, recipient: Address) -> object:
        return self._calls["envrcpt"](message, recipient, self.monkey)

    # --- content ------------------------------------------------------------------------

    def header(self, message: Message, header: Header) -> object:
        return self._calls["header"](message, header, self.monkey)

    def eoh(self, message: Message) -> object:
        return self._calls["eoh"](message, self.monkey)

    def body(self, message: Message, chunk: bytes) -> object:
        return self._calls["body"](message, chunk, self.monkey)

    # --- end of message and clean-up ---------------------------------------------------

    def eom_process(self, message: Message, ctx: MilterContext) -> None:
        self._calls["eom_process"](message, ctx, self.monkey)

    def abort(self, message: Message) -> None:
        self._calls["abort"](message, self.monkey)

    def close(self, connection: Connection) -> None:
        self._calls["close"](connection, self.monkey)
