"""What every contender must get right, or its numbers mean nothing.

* Before it is measured, through each MTA: a clean message arrives with the
  contender's headers; GTUBE arrives tagged ``X-Spam-Flag: YES`` (a spam
  filter); EICAR is refused with a 5xx (a virus filter); hop 2 of the
  milter key logs that it trusted hop 1's key.  A contender whose clean
  message fails is skipped; a missed GTUBE or EICAR is printed loudly.
* After every measurement: delivered == sent (no message lost or refused),
  and every delivered message carries the contender's headers
  (:func:`missing_markers`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import loadgen
import messages
from console import log, loud
from contenders import Marker, Running, Skip
from mtas import Mta

from miltermonkey_core.testing.sink import SinkMessage, SmtpSink, parse_dump


def dump_of(sink: SmtpSink, message: bytes) -> SinkMessage | None:
    """The delivered copy of ``message`` (found by its Message-ID), or None within 30 s."""
    mid = next(line for line in message.split(b"\r\n") if line.startswith(b"Message-ID:"))
    try:
        return parse_dump(sink.wait_for_text(mid, timeout=30))
    except Exception:
        return None


def functional_check(key: str, run: Running, mta: Mta, sink: SmtpSink) -> list[str]:
    """Clean mail gets the marker headers; GTUBE is tagged; EICAR is refused."""
    mta.set_milters(run.spec)
    samples = messages.sample_messages()
    found: list[str] = []
    port = mta.smtp_port
    clean = loadgen.smtp_send("127.0.0.1", port, messages.wire_form(samples["clean"]),
                              messages.SENDER, messages.RECIPIENT)
    if not clean.ok:
        raise Skip(f"a clean message was refused: {clean.detail}")
    dump = dump_of(sink, samples["clean"])
    hdrs = dump.headers() if dump else []
    for name, _limit in run.markers:
        vals = [v for k, v in hdrs if k.lower() == name.lower()]
        found.append(f"clean: {name}: {vals[0][:60] if vals else 'MISSING'}")
        if not vals:
            raise Skip(f"clean message delivered without {name}")
    if run.spam:
        ok = loadgen.smtp_send("127.0.0.1", port, messages.wire_form(samples["gtube"]),
                               messages.SENDER, messages.RECIPIENT)
        d = dump_of(sink, samples["gtube"]) if ok.ok else None
        flag = d.header("X-Spam-Flag") if d else None
        found.append(f"GTUBE: {'X-Spam-Flag: ' + flag if flag else 'NOT TAGGED: ' + ok.detail}")
        if not flag or flag.strip().upper() != "YES":
            loud(f"{key}: GTUBE was not tagged as spam")
    if run.virus:
        bad = loadgen.smtp_send("127.0.0.1", port, messages.wire_form(samples["eicar"]),
                                messages.SENDER, messages.RECIPIENT)
        found.append(f"EICAR: {'refused: ' + bad.detail if not bad.ok else 'ACCEPTED'}")
        if bad.ok:
            loud(f"{key}: EICAR was accepted")
    mta.wait_queue_empty(30)
    sink.clear()
    for line in found:
        log(f"  check {key}: {line}")
    return found


def keyed_check(run: Running, mta: Mta, sink: SmtpSink, ks: messages.MessageSet) -> str:
    """Hop 2 must trust hop 1's key: the log line it wrote, or Skip."""
    assert run.monkey is not None
    out = loadgen.smtp_send("127.0.0.1", mta.smtp_port, messages.wire_form(ks.messages[0]),
                            messages.SENDER, messages.RECIPIENT)
    if not out.ok:
        raise Skip(f"a keyed message was refused: {out.detail}")
    text = ""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = run.monkey.log()
        if "trusted milter key: skipping" in text:
            break
        time.sleep(0.1)
    line = next((ln for ln in text.splitlines() if "trusted milter key" in ln), None)
    log(f"  check {run.contender.key}: {line or 'NO SKIP LOGGED'}")
    if line is None:
        raise Skip("hop 2 did not trust hop 1's key")
    mta.wait_queue_empty(30)
    sink.clear()
    run.monkey.log_path.write_text("")
    return f"keyed message: {line}"


def missing_markers(sink: SmtpSink, markers: Sequence[Marker]) -> str | None:
    """Which required headers delivered messages lack, counted per header; None if none."""
    if not markers:
        return None
    missing: dict[str, int] = {}
    for path in sink.messages():
        size = path.stat().st_size
        with path.open("rb") as f:
            # smtp-sink's records, its Received: header, then the message's
            # header: all of it ends at the first empty line
            block = b"\n" + f.read(256 * 1024).split(b"\n\n", 1)[0].lower()
        for name, limit in markers:
            if limit and size > limit + 16 * 1024:
                continue
            if b"\n" + name.lower().encode() + b":" not in block:
                missing[name] = missing.get(name, 0) + 1
    if missing:
        return "MISSING HEADERS on delivered mail: " + ", ".join(
            f"{k} on {v}" for k, v in missing.items())
    return None


def delivery_problems(res: loadgen.LoadResult, sent: int, delivered: int) -> list[str]:
    """Refused or lost mail, in the words the tables print."""
    problems = []
    if res.failures:
        problems.append(f"{len(res.failures)} of {sent} refused; first: "
                        f"{res.failures[0].detail}")
    if delivered != sent:
        problems.append(f"DELIVERED {delivered} != SENT {sent}")
    return problems
