"""Two real hops with the real brains: AV scanned on the relay is not scanned again at the MX.

Hop 1 (an outbound relay) runs av and spam on a real clamd and spamd and
signs the message; hop 2 (the MX, same secret) has ``skip_if_key`` on for av
only.  clamd is stopped before hop 2 sees the message: if av were not
skipped, its tempfail policy would refuse the message.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from miltermonkey_core.contract.model import message_from_bytes
from miltermonkey_core.milterkey import KeyService, Reason, generate_secret_file, load_secrets
from miltermonkey_core.testing.client import run_session
from miltermonkey_core.testing.daemon import MonkeyProcess
from miltermonkey_core.testing.replies import Disposition

if TYPE_CHECKING:  # the brains are imported only after importorskip
    from miltermonkey_av.testing import Clamd
    from miltermonkey_spam.testing import Spamd

pytest.importorskip("miltermonkey_av")
pytest.importorskip("miltermonkey_spam")
pytestmark = pytest.mark.engines

CLEAN = (b"From: alice@relay.example\r\nTo: bob@mx.example\r\nSubject: quarterly numbers\r\n"
         b"Message-ID: <hops-1@relay.example>\r\nDate: Tue, 24 Nov 2026 10:00:00 +0000\r\n\r\n"
         b"Hello Bob,\r\nthe numbers are attached in the usual place.\r\nAlice\r\n")


@pytest.fixture
def engines(clamd_server: Clamd,
            spamd_server: Spamd) -> tuple[Clamd, Spamd]:
    return clamd_server, spamd_server


def brains(clamd: Clamd, spamd: Spamd, av_skip: bool) -> list[dict[str, object]]:
    return [
        {"use": "av", "clamd": [f"tcp:127.0.0.1:{clamd.tcp_address[1]}"],
         "skip_if_key": av_skip},
        {"use": "spam", "servers": [f"127.0.0.1:{spamd.address[1]}"], "skip_if_key": False},
    ]


def test_relay_scans_and_mx_skips_av_but_runs_spam(
    engines: tuple[Clamd, Spamd], tmp_path: Path
) -> None:
    clamd, spamd = engines
    secret = tmp_path / "miltersecret"
    generate_secret_file(secret, "site1")
    key = {"milter_key": True, "miltersecretfile": str(secret)}
    hop1 = MonkeyProcess(tmp_path / "relay", brains(clamd, spamd, av_skip=False),
                         {**key, "hostname": "relay.example"}, name="relay")
    hop2 = MonkeyProcess(tmp_path / "mx", brains(clamd, spamd, av_skip=True),
                         {**key, "hostname": "mx.example"}, name="mx")
    try:
        with hop1, hop2:
            first = run_session(hop1.address, [(CLEAN, "<alice@relay.example>",
                                                    ["<bob@mx.example>"])])[0]
            assert first.disposition is Disposition.ACCEPT, first
            relayed = first.applied
            assert relayed is not None
            assert relayed.header_values("X-Virus-Status") == ["Clean"]
            assert relayed.header_values("X-Spam-Flag") in ([], ["NO"])
            assert len(relayed.header_values("X-Milter-Key")) == 1
            assert "ran=av:continue,spam:continue" in relayed.header_values("X-Milter-Key")[0] \
                .replace("\n", "").replace("\t", "").replace(" ", "")

            clamd.stop()  # av must not be needed at the MX any more
            second = run_session(hop2.address, [(relayed.as_bytes(), "<alice@relay.example>",
                                                     ["<bob@mx.example>"])])[0]
            assert second.disposition is Disposition.ACCEPT, second
            log = hop2.wait_for_log("trusted milter key: skipping av")
            assert "av=skipped" in log and "spam=ran" in log
            # spam ran at the MX: its status header was written again, exactly once
            assert second.applied is not None
            assert len(second.applied.header_values("X-Spam-Status")) == 1
            # the MX re-signs, carrying the relay's av claim forward
            mx_key = second.applied.header_values("X-Milter-Key")
            assert len(mx_key) == 1 and "host=mx.example" in mx_key[0]
            assert "av:continue" in mx_key[0].replace("\n", "").replace("\t", "")
    finally:
        clamd.start()  # the engine is shared with other tests


def _mime_headers_added(raw: bytes, *headers: bytes) -> bytes:
    head, _, body = raw.partition(b"\r\n\r\n")
    return head + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body


def test_a_key_replayed_onto_a_differently_decoded_body_is_refused(
    clamd_server: Clamd, tmp_path: Path
) -> None:
    """Issue 13, finding 2: the same body bytes read as base64 are a different message.

    Message A carries the base64 text of EICAR as a plain-text body: clamd sees
    text, hop 1 calls it clean and signs it.  Message B is A as hop 1 let it
    through (same Message-ID, same body bytes, A's key) plus the headers that
    make the body a base64 attachment.  Hop 2 skips av on a trusted key, so
    it must not trust A's key on B.
    """
    from miltermonkey_av.testing import EICAR, EICAR_SIGNATURE

    clamd = clamd_server
    secret = tmp_path / "miltersecret"
    generate_secret_file(secret, "site1")
    key = {"milter_key": True, "miltersecretfile": str(secret)}
    av = {"use": "av", "clamd": [f"tcp:127.0.0.1:{clamd.tcp_address[1]}"]}
    hop1 = MonkeyProcess(tmp_path / "relay", [{**av, "skip_if_key": False}],
                         {**key, "hostname": "relay.example"}, name="relay")
    hop2 = MonkeyProcess(tmp_path / "mx", [{**av, "skip_if_key": True}],
                         {**key, "hostname": "mx.example"}, name="mx")
    body = base64.encodebytes(EICAR).replace(b"\n", b"\r\n")
    message_a = (b"From: mallory@relay.example\r\nTo: bob@mx.example\r\n"
                 b"Subject: replay\r\nMessage-ID: <replay-1@relay.example>\r\n\r\n" + body)
    envelope = ("<mallory@relay.example>", ["<bob@mx.example>"])
    with hop1, hop2:
        first = run_session(hop1.address, [(message_a, *envelope)])[0]
        assert first.disposition is Disposition.ACCEPT, first
        assert first.applied is not None
        assert first.applied.header_values("X-Virus-Status") == ["Clean"]
        assert len(first.applied.header_values("X-Milter-Key")) == 1

        message_b = _mime_headers_added(
            first.applied.as_bytes(), b"MIME-Version: 1.0",
            b"Content-Type: application/octet-stream; name=eicar.com",
            b"Content-Transfer-Encoding: base64")
        second = run_session(hop2.address, [(message_b, *envelope)])[0]
        log = hop2.wait_for_log(f"{second.queue_id}: reject")
        assert f"{second.queue_id}: trusted milter key: skipping av" not in log, log
        assert second.disposition is Disposition.REJECT, second
        assert f"{second.queue_id}: infected: {EICAR_SIGNATURE}" in log
        assert "[av=ran:reject]" in log
        # why hop 2 did not trust A's key, as `miltermonkey key verify` explains it
        mx = KeyService(load_secrets(secret), hostname="mx.example")
        check = mx.inspect(message_from_bytes(message_b))
        assert [c.reason.split(":")[0] for c in check.checks if c.reason] == [
            Reason.WRONG_HEADERS]
