"""What to ask of the MTA: the steps, actions, no-reply bits and macros the brains need.

"You will only get what you asked for": a step no brain needs is negotiated
away, so the MTA does not even send it, and an action no brain uses is not
requested.  Over TCP every step that is sent at all is answered, because a
step the MTA does not wait for leaves its next small packet behind Nagle's
algorithm until the milter's delayed ACK (about 40 ms a message); no-reply
steps are negotiated on UNIX sockets, where they are free.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Final

from miltermonkey_core.contract.brain import Needs
from miltermonkey_core.contract.edits import Capability
from miltermonkey_core.engine.session import Engine
from miltermonkey_core.milter import protocol as p

CAPABILITY_FLAGS: Final[Mapping[str, int]] = {
    Capability.ADD_HEADERS: p.SMFIF_ADDHDRS,
    Capability.CHANGE_HEADERS: p.SMFIF_CHGHDRS,
    Capability.CHANGE_BODY: p.SMFIF_CHGBODY,
    Capability.ADD_RCPT: p.SMFIF_ADDRCPT,
    Capability.ADD_RCPT_PAR: p.SMFIF_ADDRCPT_PAR,
    Capability.DEL_RCPT: p.SMFIF_DELRCPT,
    Capability.QUARANTINE: p.SMFIF_QUARANTINE,
    Capability.CHANGE_FROM: p.SMFIF_CHGFROM,
}

#: Macros the core reads at each stage when something reads that stage's data:
#: the connection's when a brain reads the connection (or hooks connect/helo),
#: the envelope's when the envelope is negotiated.  The queue id ``i`` is asked
#: for at every stage of a message: Sendmail sends it only with MAIL by
#: default, and MAIL is not sent when no brain needs it.  ``v`` (the MTA's
#: name and version) is always asked for at connect: it tells the daemon
#: whether the MTA writes a macro packet and its command in one segment.
CORE_MACROS: Final[Mapping[str, tuple[str, ...]]] = {
    "connect": ("v", "j", "_", "{daemon_name}", "{daemon_addr}", "{daemon_port}",
                "{client_addr}", "{client_name}", "{if_addr}"),
    "helo": ("{tls_version}", "{cipher}"),
    "envfrom": ("i", "{auth_type}", "{auth_authen}", "{mail_addr}"),
    "envrcpt": ("i", "{rcpt_addr}", "{rcpt_mailer}"),
    "data": ("i",),
    "eoh": ("i",),
    "eom": ("i", "{msg_id}"),
}
#: What is asked for when nothing reads a stage's data: just enough for the log
#: line (the queue id) and the MTA's name.  A stage asked for nothing would get
#: the MTA's whole default list instead.
_MINIMAL_MACROS: Final[Mapping[str, tuple[str, ...]]] = {
    "connect": ("v",), "helo": ("v",), "envfrom": ("i",), "envrcpt": ("i",), "data": ("i",),
    "eoh": ("i",), "eom": ("i",),
}

#: The SMFIM_* number of each stage, for the macro lists sent in the OPTNEG reply.
MACRO_STAGES: Final[Mapping[str, int]] = {
    "connect": p.SMFIM_CONNECT, "helo": p.SMFIM_HELO, "envfrom": p.SMFIM_ENVFROM,
    "envrcpt": p.SMFIM_ENVRCPT, "data": p.SMFIM_DATA, "eoh": p.SMFIM_EOH,
    "eom": p.SMFIM_EOM,
}

_OPTNEG: Final = struct.Struct("!III")

#: Hooks whose step can be skipped or left unanswered, with their SMFIP_NO* and
#: SMFIP_NR_* bits.
_STEP_BITS: Final = (
    ("connect", p.SMFIP_NOCONNECT, p.SMFIP_NR_CONN),
    ("helo", p.SMFIP_NOHELO, p.SMFIP_NR_HELO),
    ("envfrom", p.SMFIP_NOMAIL, p.SMFIP_NR_MAIL),
    ("envrcpt", p.SMFIP_NORCPT, p.SMFIP_NR_RCPT),
    ("header", p.SMFIP_NOHDRS, p.SMFIP_NR_HDR),
    ("eoh", p.SMFIP_NOEOH, p.SMFIP_NR_EOH),
    ("body", p.SMFIP_NOBODY, p.SMFIP_NR_BODY),
)


class Plan:
    """What to negotiate with the MTA, fixed per configuration generation."""

    def __init__(self, needs: Needs, engine: Engine, use_noreply: bool) -> None:
        chain = engine.chain
        self.needs = needs
        self.hooks = {h: chain.implemented(h) for h, _, _ in _STEP_BITS}
        #: Python must see the connect step (brains read the connection, or
        #: hook it, or asked for connect-stage macros).
        self.connect = bool(needs.connection or self.hooks["connect"]
                            or needs.macros.get("connect"))
        self.envelope = needs.envelope or self.hooks["envfrom"] or self.hooks["envrcpt"]
        self.headers = needs.headers or self.hooks["header"]
        self.body = needs.body or self.hooks["body"]
        self.eoh = self.hooks["eoh"]
        self.use_noreply = use_noreply
        actions = 0
        for cap in needs.actions:
            actions |= CAPABILITY_FLAGS[cap]
        full = {"connect": self.connect, "helo": self.connect or self.hooks["helo"],
                "envfrom": self.envelope, "envrcpt": self.envelope, "data": True, "eoh": True,
                "eom": True}
        self.macros: dict[str, tuple[str, ...]] = {
            stage: tuple(dict.fromkeys((*(names if full[stage] else _MINIMAL_MACROS[stage]),
                                        *needs.macros.get(stage, ()))))
            for stage, names in CORE_MACROS.items()
        }
        self.actions = actions | p.SMFIF_SETSYMLIST
        self._allowed: dict[int, frozenset[str]] = {}

    def allowed(self, actions: int) -> frozenset[str]:
        """The capabilities that negotiated ``actions`` grant, as the context checks them."""
        found = self._allowed.get(actions)
        if found is None:
            found = frozenset(c for c, f in CAPABILITY_FLAGS.items() if f & actions)
            self._allowed[actions] = found
        return found

    def protocol(self, offered: int) -> int:
        """The NO*/NR* bits to ask for, out of those the MTA offered."""
        want = p.SMFIP_SKIP | p.SMFIP_NOUNKNOWN
        # Over TCP, connect and DATA are always answered (see the module doc); on
        # a UNIX socket they are skipped unless a brain needs them.
        if self.use_noreply and not self.connect:
            want |= p.SMFIP_NOCONNECT
        if not self.hooks["helo"]:
            want |= p.SMFIP_NOHELO
        if not self.envelope:
            want |= p.SMFIP_NOMAIL | p.SMFIP_NORCPT
        if not self.headers:
            want |= p.SMFIP_NOHDRS
        if not self.eoh:
            want |= p.SMFIP_NOEOH
        if not self.body:
            want |= p.SMFIP_NOBODY
        if self.use_noreply:
            want |= p.SMFIP_NODATA | p.SMFIP_NR_DATA | p.SMFIP_NR_UNKN
            for hook, _, reply_bit in _STEP_BITS:
                if not self.hooks[hook]:
                    want |= reply_bit
        if self.needs.rejected_recipients:
            want |= p.SMFIP_RCPT_REJ
        return offered & want

    def reply(self, version: int, actions_offered: int,
              protocol_offered: int) -> tuple[bytes, int, int]:
        """The OPTNEG reply for what the MTA offered: ``(data, actions, protocol)``.

        Actions the MTA does not offer are left out (the context then refuses
        those edits with a log line); macro lists go along only when the MTA
        takes them (SMFIF_SETSYMLIST).
        """
        actions = self.actions & actions_offered
        proto = self.protocol(protocol_offered)
        data = bytearray(_OPTNEG.pack(min(version, p.SMFI_PROT_VERSION), actions, proto))
        if actions & p.SMFIF_SETSYMLIST:
            for stage, names in self.macros.items():
                if names:
                    data += MACRO_STAGES[stage].to_bytes(4, "big")
                    data += " ".join(names).encode("ascii") + b"\0"
        return bytes(data), actions, proto

    @staticmethod
    def parse_offer(data: bytes) -> tuple[int, int, int]:
        """``(version, actions, protocol)`` from the MTA's OPTNEG; raises ValueError."""
        if len(data) < _OPTNEG.size:
            raise ValueError(f"OPTNEG of {len(data)} bytes, expected {_OPTNEG.size}")
        version, actions, proto = _OPTNEG.unpack_from(data)
        if version < 2:
            raise ValueError(f"milter protocol version {version} is too old (2 or later)")
        return version, actions, proto
