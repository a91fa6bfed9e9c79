"""EICAR hidden past the engine's limits, against a real clamd: never "Clean".

Two clamds: the session one, configured as the README recommends
(``AlertExceedsMax yes``, Debian's ``MaxRecursion 16`` and ``MaxFiles
10000``), and one as Debian ships it (no ``AlertExceedsMax``), which
answers ``OK`` for what it stopped looking into.  The brain must refuse
every case on both: on the second by its own structure walk alone.

The 50,000-part and 10 x 10 x 100 MB cases that need clamd itself to work
through them are in test_av_limits_long.py (``nox -s long``).
"""

from __future__ import annotations

import base64
import io
import random
import shutil
import zipfile
from collections.abc import Callable, Iterator

import pytest
from av_helpers import (
    CLAMD_DECIDES,
    QID,
    SIGNATURES,
    assert_refused_for_limits,
    assert_virus,
    brain_on,
    make_brain,
    run,
)
from miltermonkey_av.clamd import parse_reply
from miltermonkey_av.command import CommandScanner, preset_for
from miltermonkey_av.mime_limits import DEFAULT_MAX_DEPTH, DEFAULT_MAX_PARTS, inspect
from miltermonkey_av.result import Status, classify_found
from miltermonkey_av.testing import EICAR, Clamd, signature_files
from miltermonkey_av.testing import samples as av_samples

from miltermonkey_core.contract.model import message_from_bytes
from miltermonkey_core.contract.verdict import Action
from miltermonkey_core.engine.build import chain_of
from miltermonkey_core.engine.offline import run_engine
from miltermonkey_core.engine.session import Engine
from miltermonkey_core.milterkey import KeyFields, KeyService
from miltermonkey_core.testing.part import require_or_skip
from miltermonkey_core.testing.process import free_port

pytestmark = pytest.mark.engines

CLAMSCAN = shutil.which("clamscan")
CLAMDSCAN = shutil.which("clamdscan")

Builder = Callable[[int], bytes]
BUILDERS: dict[str, Builder] = {
    "rfc822": av_samples.nested_rfc822,
    "multipart": av_samples.nested_multipart,
    "parts": av_samples.many_parts,
    "zip": av_samples.nested_zip_message,
    "stored-zip": lambda n: av_samples.nested_zip_message(n, stored=True),
}


class FewFilesClamd(Clamd):
    """MaxFiles 200: clamd's part-count boundary in a message of 10 kB instead of 500 kB."""

    def _write_config(self) -> None:
        super()._write_config()
        text = self.config_path.read_text()
        assert "MaxFiles 10000" in text
        self.config_path.write_text(text.replace("MaxFiles 10000", "MaxFiles 200"))


@pytest.fixture(scope="module")
def few_files_clamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clamd]:
    require_or_skip(Clamd)
    c = FewFilesClamd(tmp_path_factory.mktemp("few-files-clamd"), free_port(),
                      db_files=signature_files())
    c.start()
    yield c
    c.stop()


# --- the table, by the brain's defaults ---------------------------------------------

TABLE = [
    ("rfc822", 5, "virus"), ("rfc822", 15, "depth"), ("rfc822", 20, "depth"),
    ("rfc822", 50, "depth"), ("rfc822", 200, "depth"),
    ("parts", 1000, "virus"), ("parts", 10_000, "parts"), ("parts", 50_000, "parts"),
    ("zip", 5, "virus"), ("zip", 15, "depth"), ("zip", 20, "depth"),
    ("stored-zip", 20, "depth"), ("multipart", 20, "depth"),
]
REASONS = {"depth": f"deeper than max_mime_depth {DEFAULT_MAX_DEPTH}",
           "parts": f"more than max_mime_parts {DEFAULT_MAX_PARTS} MIME parts"}


@pytest.mark.parametrize(("kind", "n", "outcome"), TABLE, ids=[f"{k}-{n}" for k, n, _ in TABLE])
@pytest.mark.parametrize("engine", ["plain", "alerting"])
def test_eicar_past_the_limits_is_never_clean(kind: str, n: int, outcome: str, engine: str,
                                              plain_clamd: Clamd, clamd: Clamd) -> None:
    result = run(brain_on(plain_clamd if engine == "plain" else clamd), BUILDERS[kind](n))
    assert result.header("X-Virus-Status") != "Clean"
    if outcome == "virus":
        assert_virus(result)
    else:
        assert_refused_for_limits(result, REASONS[outcome])


# --- the brain's own limits, at and past the boundary (Debian's clamd: no alert) ------------


@pytest.mark.parametrize(("kind", "n", "limit", "within"), [
    ("rfc822", 11, {"max_mime_depth": 12}, True),
    ("rfc822", 12, {"max_mime_depth": 12}, False),
    ("multipart", 12, {"max_mime_depth": 12}, True),
    ("multipart", 13, {"max_mime_depth": 12}, False),
    ("zip", 11, {"max_mime_depth": 12}, True),
    ("zip", 12, {"max_mime_depth": 12}, False),
    ("stored-zip", 12, {"max_mime_depth": 12}, False),
    ("parts", 99, {"max_mime_parts": 100}, True),
    ("parts", 100, {"max_mime_parts": 100}, False),
], ids=lambda v: str(v) if not isinstance(v, dict) else "")
def test_brain_limit_boundary(kind: str, n: int, limit: dict[str, int], within: bool,
                              plain_clamd: Clamd) -> None:
    result = run(brain_on(plain_clamd, **limit), BUILDERS[kind](n))
    if within:
        assert_virus(result)  # clamd looked, and found it
    else:
        assert_refused_for_limits(result, "max_mime_")


@pytest.mark.parametrize("kind", ["rfc822", "multipart", "zip"])
def test_the_default_depth_is_below_where_debian_clamd_stops(kind: str,
                                                             plain_clamd: Clamd) -> None:
    """Find the first level at which clamd (MaxRecursion 16, no alert) says OK over EICAR:
    the walk must count it past max_mime_depth, so the brain refuses before clamd goes blind."""
    first_blind = next(n for n in range(1, 40)
                       if plain_clamd.instream(BUILDERS[kind](n)) == "stream: OK")
    seen = plain_clamd.instream(BUILDERS[kind](first_blind - 1))
    assert seen == f"stream: {av_samples.NAME_EICAR} FOUND"
    depth = inspect([BUILDERS[kind](first_blind)], max_depth=10**6, max_parts=10**9).depth
    assert depth > DEFAULT_MAX_DEPTH, (kind, first_blind, depth)


def test_the_default_part_count_is_below_clamds(plain_clamd: Clamd) -> None:
    # clamd (MaxFiles 10000) still finds EICAR after the most parts the brain lets through.
    raw = av_samples.many_parts(DEFAULT_MAX_PARTS - 1)
    assert inspect([raw]).within_limits
    assert plain_clamd.instream(raw) == f"stream: {av_samples.NAME_EICAR} FOUND"


# --- clamd's own limits: AlertExceedsMax, mapped to limits_action ----------------------------


def test_without_either_defence_clamd_calls_it_clean(plain_clamd: Clamd) -> None:
    """The control: why both defences exist.  Structure limits off, clamd without alert."""
    result = run(brain_on(plain_clamd, **CLAMD_DECIDES), av_samples.nested_rfc822(20))
    assert result.header("X-Virus-Status") == "Clean"


@pytest.mark.parametrize(("kind", "n", "found"), [
    ("rfc822", 14, True), ("rfc822", 15, False), ("rfc822", 50, False),
    ("multipart", 17, True), ("multipart", 18, False),
    ("zip", 14, True), ("zip", 15, False), ("zip", 20, False),
])
def test_clamd_limit_boundary_with_alert(kind: str, n: int, found: bool, clamd: Clamd) -> None:
    result = run(brain_on(clamd, **CLAMD_DECIDES), BUILDERS[kind](n))
    if found:
        assert_virus(result)
    else:
        assert_refused_for_limits(result, "stopped at its MaxRecursion limit")
        assert result.verdict is not None and result.verdict.reply is not None
        assert result.verdict.reply.text == \
            "Message refused: past the virus scanner's MaxRecursion limit"


@pytest.mark.parametrize(("n", "found"), [(198, True), (199, False), (1000, False)])
def test_clamd_part_count_boundary_with_alert(n: int, found: bool,
                                              few_files_clamd: Clamd) -> None:
    result = run(brain_on(few_files_clamd, **CLAMD_DECIDES), av_samples.many_parts(n))
    if found:
        assert_virus(result)
    else:
        assert_refused_for_limits(result, "stopped at its MaxFiles limit")


def test_a_deep_archive_the_walk_cannot_see_is_clamds_to_refuse(clamd: Clamd,
                                                                plain_clamd: Clamd) -> None:
    # A 20 kB member first at every level hides the levels below from the walk
    # (it reads 16 KiB of a member); clamd with AlertExceedsMax still refuses it.
    raw = av_samples.nested_zip_message(20, decoy=random.Random(3).randbytes(20_000))
    assert inspect([raw]).within_limits
    assert_refused_for_limits(run(brain_on(clamd), raw), "stopped at its MaxRecursion limit")
    # Debian's clamd, unconfigured, is blind here: the reason the README asks for the alert.
    assert plain_clamd.instream(raw) == "stream: OK"


# --- archives that unpack past the size limit ------------------------------------------------


def zip_with_zeros_then_eicar(zeros: int) -> bytes:
    """A zip in a zip holding one file: ``zeros`` zero bytes, then EICAR; as a message."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("zeros.bin", bytes(zeros) + EICAR)
    outer = io.BytesIO()
    with zipfile.ZipFile(outer, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("inner.zip", buf.getvalue())
    return (b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: zeros\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"z\"\r\n\r\n"
            b"--z\r\nContent-Type: application/zip\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + base64.encodebytes(outer.getvalue()).replace(b"\n", b"\r\n") + b"--z--\r\n")


@pytest.mark.parametrize("engine", ["plain", "alerting"])
def test_a_member_that_unpacks_past_max_scan_size(engine: str, plain_clamd: Clamd,
                                                  clamd: Clamd) -> None:
    c = plain_clamd if engine == "plain" else clamd
    mib = 1024 * 1024
    assert_virus(run(brain_on(c), zip_with_zeros_then_eicar(24 * mib)))
    result = run(brain_on(c), zip_with_zeros_then_eicar(26 * mib))
    assert_refused_for_limits(result, f"'zeros.bin' of {26 * mib + len(EICAR)} bytes unpacked, "
                                      "over max_scan_size 26214400")
    assert result.verdict is not None and result.verdict.reply is not None
    assert result.verdict.reply.text == \
        "Message refused: an archive member too large to scan for viruses"


def test_only_the_walk_refuses_a_member_past_clamds_max_file_size(clamd: Clamd) -> None:
    """clamd 1.4 skips a zip member over MaxFileSize and answers OK, AlertExceedsMax or not:
    the size the archive declares, checked by the walk, is what refuses it."""
    raw = zip_with_zeros_then_eicar(26 * 1024 * 1024)
    assert clamd.instream(raw) == "stream: OK"
    assert run(brain_on(clamd, max_scan_size=0), raw).header("X-Virus-Status") == "Clean"
    assert_refused_for_limits(run(brain_on(clamd), raw), "over max_scan_size 26214400")


# --- limits_action --------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["walk", "clamd"])
@pytest.mark.parametrize("spelling", ["accept-tag", "accept"])
def test_accept_tag_delivers_unscanned_never_clean(source: str, spelling: str,
                                                   clamd: Clamd) -> None:
    options = {"limits_action": spelling, **(CLAMD_DECIDES if source == "clamd" else {})}
    forged = b"X-Virus-Status: Clean\r\n"
    result = run(brain_on(clamd, **options), forged + av_samples.nested_rfc822(20))
    assert result.action is Action.ACCEPT
    assert result.ctx.headers.get_all("X-Virus-Status") == ["Unscanned (limits)"]
    assert (result.header("X-Virus-Scanned") or "").startswith("MilterMonkey-AV ")
    # the milter key will not say av ran: the next hop scans for itself
    assert "av" in result.ctx.unchecked_brains
    assert "not scanned to the end" in result.ctx.unchecked_brains["av"]
    [line] = [ln for ln in result.log if "not scanned to the end" in ln]
    assert f"{QID}: " in line and "limits_action accept-tag" in line


def test_the_milter_key_never_says_av_ran_on_unscanned_mail(clamd: Clamd) -> None:
    brain = brain_on(clamd, limits_action="accept-tag")
    key = KeyService({"k1": bytes(range(32))}, hostname="mx.example.org")
    engine = Engine(chain_of(brain), brain.monkey, key=key)
    clean = run_engine(engine, av_samples.sample("clean-plain").raw, macros={"i": QID})
    signed = clean.header("X-Milter-Key")
    assert signed is not None and ("av", "continue") in KeyFields.parse(signed).ran
    unscanned = run_engine(engine, av_samples.nested_rfc822(20), macros={"i": QID})
    assert unscanned.header("X-Virus-Status") == "Unscanned (limits)"
    value = unscanned.header("X-Milter-Key")
    assert value is None or all(b != "av" for b, _ in KeyFields.parse(value).ran)
    assert any("brain av not listed in the milter key: not scanned to the end" in line
               for line in unscanned.log)


def test_accept_tag_still_refuses_a_virus_the_engine_can_see(clamd: Clamd) -> None:
    # EICAR at the top, and a structure past the limits further down.
    raw = av_samples.nested_rfc822(20)
    top = av_samples.sample("eicar-base64").raw
    boundary = b"--mixed-top"
    msg = (b"From: a@example.org\r\nSubject: both\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary=\"mixed-top\"\r\n\r\n"
           + boundary + b"\r\nContent-Type: message/rfc822\r\n\r\n" + top + b"\r\n"
           + boundary + b"\r\nContent-Type: message/rfc822\r\n\r\n" + raw + b"\r\n"
           + boundary + b"--\r\n")
    result = run(brain_on(clamd, limits_action="accept-tag"), msg)
    assert_virus(result)


@pytest.mark.parametrize("source", ["walk", "clamd"])
def test_tempfail(source: str, clamd: Clamd) -> None:
    options = {"limits_action": "tempfail", **(CLAMD_DECIDES if source == "clamd" else {})}
    result = run(brain_on(clamd, **options), av_samples.nested_rfc822(20))
    assert result.action is Action.TEMPFAIL
    assert result.verdict is not None and result.verdict.reply is not None
    assert (result.verdict.reply.code, result.verdict.reply.xcode) == (451, "4.7.0")
    assert result.verdict.reply.text.endswith(", try later")
    assert result.header("X-Virus-Status") is None
    assert any(f"{QID}: not scanned to the end" in ln and "limits_action tempfail" in ln
               for ln in result.log)


def test_notify_mode_sends_no_virus_notice_for_limits(clamd: Clamd) -> None:
    brain = brain_on(clamd, relay_mode=False, **CLAMD_DECIDES)
    result = run(brain, av_samples.nested_rfc822(20))
    assert_refused_for_limits(result, "MaxRecursion")
    assert brain.monkey.sent == []  # type: ignore[attr-defined]


# --- the engines' answers ------------------------------------------------------------------


@pytest.mark.parametrize(("reply", "status", "name"), [
    ("stream: Heuristics.Limits.Exceeded.MaxRecursion FOUND", Status.LIMITS,
     "Heuristics.Limits.Exceeded.MaxRecursion"),
    ("stream: Heuristics.Limits.Exceeded.MaxFiles FOUND", Status.LIMITS,
     "Heuristics.Limits.Exceeded.MaxFiles"),
    ("stream: Heuristics.Limits.Exceeded FOUND", Status.LIMITS, "Heuristics.Limits.Exceeded"),
    ("stream: Heuristics.Phishing.Email.SpoofedDomain FOUND", Status.INFECTED,
     "Heuristics.Phishing.Email.SpoofedDomain"),
    ("stream: Eicar-Signature FOUND", Status.INFECTED, "Eicar-Signature"),
])
def test_clamd_reply_classification(reply: str, status: Status, name: str) -> None:
    assert parse_reply(reply) == (status, name)


def test_a_real_virus_beats_a_limits_alert() -> None:
    assert classify_found(("Heuristics.Limits.Exceeded.MaxFiles", "Win.Test.EICAR")) == \
        (Status.INFECTED, ("Win.Test.EICAR",))
    assert classify_found(("Heuristics.Limits.Exceeded.MaxFiles",)) == \
        (Status.LIMITS, ("Heuristics.Limits.Exceeded.MaxFiles",))
    assert classify_found(()) == (Status.INFECTED, ())  # an infected exit code, no name


def test_clamscan_is_told_to_alert_by_default() -> None:
    preset = preset_for("/usr/bin/clamscan")
    assert preset is not None and "--alert-exceeds-max=yes" in preset.args


@pytest.mark.skipif(CLAMSCAN is None, reason="clamscan not installed (Debian package clamav)")
def test_clamscan_limits_are_limits(tempdir_template: str) -> None:
    assert CLAMSCAN is not None
    preset = preset_for(CLAMSCAN)
    assert preset is not None
    scanner = CommandScanner(CLAMSCAN, args=("-d", str(SIGNATURES), *preset.args),
                             tempfile_template=tempdir_template)
    result = scanner.scan(message_from_bytes(av_samples.nested_rfc822(20), queue_id=QID))
    assert (result.status, result.viruses) == (
        Status.LIMITS, ("Heuristics.Limits.Exceeded.MaxRecursion",))
    brain = make_brain(scanner_path=CLAMSCAN, scanner_args=("-d", str(SIGNATURES), *preset.args),
                       tempfile_template=tempdir_template, **CLAMD_DECIDES)
    assert_refused_for_limits(run(brain, av_samples.many_parts(12_000)),
                              "stopped at its MaxFiles limit")


@pytest.mark.skipif(CLAMDSCAN is None, reason="clamdscan not installed (Debian package clamdscan)")
def test_clamdscan_reports_clamds_alert(clamd: Clamd, tempdir_template: str) -> None:
    assert CLAMDSCAN is not None
    brain = make_brain(scanner_path=CLAMDSCAN, tempfile_template=tempdir_template,
                       scanner_args=(f"--config-file={clamd.config_path}", "--no-summary",
                                     "--stdout", "--stream", "{file}"), **CLAMD_DECIDES)
    assert_refused_for_limits(run(brain, av_samples.nested_zip_message(20)),
                              "stopped at its MaxRecursion limit")
