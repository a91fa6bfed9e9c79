"""``log_format = "json"``: one JSON object a line, each message's outcome as fields.

A real daemon with the milter key on: a message it signs, the same message
sent again with that key (trusted: the brain that ran is spared), and one
with a forged key (stripped, with the reason), each read back from the log
as JSON and from the metrics endpoint.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

from miltermonkey_core.milterkey import generate_secret_file
from miltermonkey_core.testing.client import MessageSpec, SessionResult, run_session
from miltermonkey_core.testing.daemon import MonkeyProcess
from miltermonkey_core.testing.process import free_port

RAW = (b"Message-ID: <json-1@example.org>\r\nFrom: alice@example.org\r\n"
       b"To: bob@example.net\r\nSubject: json logs\r\n\r\nHello Bob,\r\n")


def send(m: MonkeyProcess, raw: bytes, qid: str, rcpts: int = 1) -> SessionResult:
    spec = MessageSpec(raw, "<alice@example.org>",
                       [f"<bob{i}@example.net>" for i in range(rcpts)], queue_id=qid)
    return run_session(m.address, [spec])[0]


def records(m: MonkeyProcess) -> list[dict[str, Any]]:
    out = []
    for line in m.log().splitlines():
        out.append(json.loads(line))  # every line is one JSON object
    return out


def outcome(m: MonkeyProcess, qid: str) -> dict[str, Any]:
    end = time.monotonic() + 10
    while time.monotonic() < end:
        found = [r for r in records(m) if r.get("event") == "message" and r["queue_id"] == qid]
        if found:
            assert len(found) == 1, found
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no outcome line for {qid}:\n{m.log()[-3000:]}")


def test_every_line_is_json_and_each_message_has_its_outcome(tmp_path: Path) -> None:
    secret = tmp_path / "miltersecret"
    generate_secret_file(secret, "k1")
    port = free_port()
    brains = [{"use": "gate", "skip_if_key": True}, {"use": "trivial"}]
    daemon = {"log_format": "json", "milter_key": True, "miltersecretfile": str(secret),
              "hostname": "mx1.example.test", "metrics": f"127.0.0.1:{port}"}
    with MonkeyProcess(tmp_path, brains, daemon) as m:
        first = send(m, RAW, "JSON1", rcpts=3)
        assert first.accepted and first.applied is not None
        signed = first.applied.as_bytes()
        assert b"X-Milter-Key:" in signed
        again = send(m, signed, "JSON2")
        forged = send(m, b"X-Milter-Key: v=1; k=k1; nonsense\r\n" + RAW, "JSON3")
        refused = send(m, RAW.replace(b"Hello Bob", b"REJECT-ME"), "JSON4")
        assert again.accepted and forged.accepted and refused.rejected
        one, two, three, four = (outcome(m, q) for q in ("JSON1", "JSON2", "JSON3", "JSON4"))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            metrics = r.read().decode()
        lines = records(m)

    assert all({"time", "level", "logger", "message"} <= set(r) for r in lines)
    assert any(r["logger"] == "miltermonkey.supervisor" for r in lines)

    assert one["verdict"] == "accept" and one["by"] is None
    assert one["client_address"] == "192.0.2.10"
    assert one["sender"] == "alice@example.org"
    assert one["recipients"] == 3
    assert one["size"] == len(b"Hello Bob,\r\n")
    assert one["edits"] >= 2  # trivial's header and the key
    assert [(b["brain"], b["outcome"], b["action"]) for b in one["brains"]] == [
        ("gate", "ran", "continue"), ("trivial", "ran", "continue")]
    assert all(isinstance(b["ms"], float) for b in one["brains"])
    assert one["key"] == {"result": "none"}
    assert one["message"].startswith("JSON1: accept in ")

    assert two["key"]["result"] == "trusted"
    assert two["key"]["issuer"] == "mx1.example.test" and two["key"]["spared"] == ["gate"]
    assert ("gate", "skipped") in {(b["brain"], b["outcome"]) for b in two["brains"]}
    assert [b.get("detail") for b in two["brains"] if b["brain"] == "gate"] == ["key"]

    assert three["key"]["result"] == "untrusted"
    assert [s["reason"].split(":")[0] for s in three["key"]["stripped"]] == ["malformed"]

    assert four["verdict"] == "reject" and four["by"] == "gate"
    assert four["reply"] == "550 5.7.1 gate: body matched"
    assert [b["brain"] for b in four["brains"]] == ["gate"]

    assert 'miltermonkey_milter_keys_total{result="trusted"} 1.0' in metrics
    assert 'miltermonkey_milter_keys_stripped_total{reason="malformed"} 1.0' in metrics
    assert 'miltermonkey_brain_skips_total{brain="gate",reason="key"} 1.0' in metrics


def test_text_stays_the_default(tmp_path: Path) -> None:
    with MonkeyProcess(tmp_path, [{"use": "trivial"}]) as m:
        assert send(m, RAW, "TEXT1").accepted
        text = m.wait_for_log("TEXT1: accept in")
    line = next(ln for ln in text.splitlines() if "TEXT1: accept in" in ln)
    assert not line.lstrip().startswith("{")
    assert "miltermonkey.milter: TEXT1: accept in" in line
