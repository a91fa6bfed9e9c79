"""What a real daemon negotiates, over TCP and a UNIX socket, and what brains then see.

Over TCP every step the MTA sends must be answered (no-reply steps stall on
Nagle's algorithm), so connect and DATA stay in the protocol there; they
are answered by libmilter alone when no brain needs them.  What must not
change with the transport: a brain that reads the connection or asks for a
DATA-stage macro gets it at end of message, on either socket.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from miltermonkey_core.milter import protocol as mp
from miltermonkey_core.testing.client import ConnectInfo, MilterClient, SessionResult
from miltermonkey_core.testing.daemon import MonkeyProcess

RAW = b"From: a@example.test\r\nSubject: negotiation\r\n\r\nbody\r\n"
CLIENT = ConnectInfo(hostname="client.example.test", address="192.0.2.77", port=40001)


def transaction(m: MonkeyProcess, macros: dict[str, dict[str, str]] | None = None
                ) -> tuple[SessionResult, MilterClient]:
    client = MilterClient(m.address)
    client.negotiate()
    result = client.send_message(RAW, "<a@example.test>", ["<b@example.test>"],
                                 connect_info=CLIENT, macros=macros, queue_id="NEG1")
    client.quit()
    client.close()
    return result, client


def replies(client: MilterClient, cmd: str) -> list[str]:
    """The reply commands that followed each ``cmd`` packet in the transcript."""
    t = client.transcript
    return [t[i + 1][1] for i, (d, c, _) in enumerate(t[:-1]) if d == ">" and c == cmd]


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
def test_trivial_alone_negotiates_everything_away_but_what_tcp_must_answer(
        tmp_path: Path, unix: bool) -> None:
    with MonkeyProcess(tmp_path, [{"use": "trivial"}], {}, unix=unix) as m:
        m.wait_for_log("is serving")
        result, client = transaction(m)
    neg = result.negotiated
    for bit in (mp.SMFIP_NOHELO, mp.SMFIP_NOMAIL, mp.SMFIP_NORCPT, mp.SMFIP_NOHDRS,
                mp.SMFIP_NOEOH, mp.SMFIP_NOBODY):
        assert neg.protocol & bit, mp.describe_protocol(bit)
    if unix:
        assert neg.protocol & mp.SMFIP_NOCONNECT and neg.protocol & mp.SMFIP_NODATA
        assert replies(client, mp.SMFIC_CONNECT) == [] and replies(client, mp.SMFIC_DATA) == []
    else:
        # sent, and answered (by libmilter itself: the trivial brain needs neither)
        assert not neg.protocol & (mp.SMFIP_NOCONNECT | mp.SMFIP_NODATA)
        assert not neg.protocol & (mp.SMFIP_NR_CONN | mp.SMFIP_NR_DATA)
        assert replies(client, mp.SMFIC_CONNECT) == ["c"]
        assert replies(client, mp.SMFIC_DATA) == ["c"]
    assert result.accepted
    assert result.applied is not None
    assert result.applied.header_values("X-MilterMonkey") == ["trivial on localhost"]


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
def test_connection_and_data_macros_reach_a_brain_at_end_of_message(
        tmp_path: Path, unix: bool) -> None:
    brains: list[dict[str, Any]] = [{"use": "stamp", "show_client": True,
                                     "data_macro": "{bench_tag}"}, {"use": "trivial"}]
    with MonkeyProcess(tmp_path, brains, {}, unix=unix) as m:
        m.wait_for_log("is serving")
        result, _ = transaction(m, macros={"data": {"{bench_tag}": "tag-at-data"}})
    assert result.accepted
    assert result.applied is not None
    # the stamp brain has no connect hook: the connect step is sent for it anyway
    assert not result.negotiated.protocol & mp.SMFIP_NOCONNECT
    assert result.applied.header_values("X-Stamp-Client") == [CLIENT.address]
    # asked for at DATA (setsymlist), read at end of message
    assert result.negotiated.macro_lists.get(mp.SMFIM_DATA) == ("i", "{bench_tag}")
    assert result.applied.header_values("X-Stamp-Macro") == ["tag-at-data"]


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
def test_noreply_always_over_tcp_is_warned_about(tmp_path: Path, unix: bool) -> None:
    with MonkeyProcess(tmp_path, [{"use": "trivial"}], {"noreply": "always"}, unix=unix) as m:
        m.wait_for_log("is serving")
        result, _ = transaction(m)
        log = m.log()
    assert result.accepted
    assert ("stall on Nagle's algorithm" in log) is (not unix)
