"""Options as an admin writes them (TOML through the core's loader), and notice safety."""

from __future__ import annotations

import email
import email.policy
from pathlib import Path
from typing import Any

import pytest
from miltermonkey_av.brain import AntiVirusBrain
from miltermonkey_av.notices import (
    TemplateError,
    build_sender_notice,
    encode_header_value,
    load_templates,
    notice_values,
    one_line,
    parse_address,
)
from miltermonkey_av.options import DEFAULT_DISCARD_PATTERN, AntiVirusOptions

from miltermonkey_core.config import build_brain_options, loads
from miltermonkey_core.errors import ConfigError


def options(toml_brain: str, daemon: str = "") -> Any:
    cfg = loads(f"[miltermonkey]\n{daemon}\n\n[[brain]]\nuse = \"av\"\n{toml_brain}\n",
                path="test.toml")
    return build_brain_options(AntiVirusBrain, cfg.brains[0], cfg)


def test_defaults() -> None:
    o = options("")
    assert o.resolved_engine == "clamd"
    assert o.clamd == ("unix:/var/run/clamav/clamd.ctl",)
    assert o.action == "reject"  # relay_mode = true
    assert o.minscansize == 0
    assert o.max_scan_size == 25 * 1024 * 1024
    assert o.oversize_action == "accept-tag"
    assert (o.limits_action, o.max_mime_depth, o.max_mime_parts) == ("reject", 12, 5000)
    assert o.notify_sender is False and o.notify_recipients is True
    assert o.tempfile_template == "/var/tmp/av_%s"
    assert o.add_headers is True


def test_seed_spellings() -> None:
    o = options('uvscanpath = "/usr/av/bin/uvscan"\nsendmailpath = "/usr/lib/sendmail"\n'
                "relay_mode = false\nminscansize = 50000\ndomainname = \"membrain.com\"\n"
                'helpaddr = "postmaster@membrain.com"\nwho = "Membrain Technologies"\n'
                'tempfile_template = "/var/tmp/av_%s"\n'
                'discard_pattern = "(Klez|SirCam|Exploit-MIME)"\n')
    assert o.scanner_path == "/usr/av/bin/uvscan"
    assert o.resolved_engine == "command"  # a seed config with uvscanpath scans with it
    assert o.sendmail_path == "/usr/lib/sendmail"
    assert o.action == "notify"
    assert o.minscansize == 50000
    assert o.discard_pattern.search("W32/Klez.h@MM")
    assert not o.discard_pattern.search("W32/Klez.h@MM".lower())  # the admin's regex, as is


def test_readable_aliases_and_units() -> None:
    o = options('clamd_socket = "tcp:av1:3310"\nmin_scan_size = "1k"\n'
                'max_scan_size = "10MiB"\ndomain_name = "example.org"\nhelp_addr = "h@x.org"\n')
    assert o.clamd == ("tcp:av1:3310",)
    assert (o.minscansize, o.max_scan_size) == (1024, 10 * 1024 * 1024)
    assert (o.domainname, o.helpaddr) == ("example.org", "h@x.org")


@pytest.mark.parametrize(("written", "size"), [
    ("0", 0), ("26214400", 25 * 1024**2), ('"25MiB"', 25 * 1024**2), ('"25M"', 25 * 1024**2),
    ('"25 MB"', 25 * 1024**2), ('"50k"', 50 * 1024), ('"50KiB"', 50 * 1024), ('"1G"', 1024**3),
])
def test_sizes_mean_what_they_mean_in_the_core(written: str, size: int) -> None:
    from miltermonkey_core import parse_size

    o = options(f"max_scan_size = {written}\nminscansize = 0\n")
    assert o.max_scan_size == size == parse_size(written.strip('"') if '"' in written
                                                 else int(written))
    daemon = loads(f"[miltermonkey]\nmax_message_size = {written}\n", path="t.toml")
    assert daemon.daemon.max_message_size == size  # the same words, the same bytes


@pytest.mark.parametrize(("written", "canonical"), [
    ('"reject"', "reject"), ('"tempfail"', "tempfail"), ('"accept-tag"', "accept-tag"),
    ('"accept"', "accept-tag"),
])
def test_limits_action_spellings(written: str, canonical: str) -> None:
    assert options(f"limits_action = {written}\n").limits_action == canonical


def test_default_discard_pattern_covers_forging_families() -> None:
    import re

    p = re.compile(DEFAULT_DISCARD_PATTERN)
    for name in ("Worm.Mydoom.M", "W32/Netsky.p@MM!zip", "Win.Worm.Bagle-1", "Worm.SomeFool.Q",
                 "W32/Sober.y@MM", "Exploit-MIME.gen.exe", "W32/Klez.h@MM", "Worm.SirCam"):
        assert p.search(name), name
    for name in ("Eicar-Test-Signature", "Heuristics.Phishing.Email.SpoofedDomain",
                 "Doc.Dropper.Agent-123", "Win.Trojan.Emotet-1"):
        assert not p.search(name), name


@pytest.mark.parametrize(("toml", "key", "fragment"), [
    ('clamd = ["inet:3310@127.0.0.1"]', "clamd", "tcp:HOST:PORT"),
    ('clamd = []', "clamd", "non-empty"),
    ('engine = "kaspersky"', "engine", "must be one of"),
    ('infected_action = "bounce"', "infected_action", "must be one of"),
    ('oversize_action = "accept"', "oversize_action", "must be one of"),
    ('reject_code = 450', "reject_code", "5xx"),
    ('reject_xcode = "4.7.1"', "reject_xcode", "does not match"),
    ('tempfile_template = "/var/tmp/av"', "tempfile_template", "exactly one %s"),
    ('tempfile_template = "av_%s"', "tempfile_template", "absolute"),
    ('tempfile_template = "/var/%s/x"', "tempfile_template", "file name"),
    ('discard_pattern = "(unclosed"', "discard_pattern", "regular expression"),
    ('minscansize = "lots"', "minscansize", "size"),
    ('max_scan_size = "1.5M"', "max_scan_size", "25MiB"),
    ('max_scan_size = -1', "max_scan_size", "at least 0"),
    ('limits_action = "drop"', "limits_action", "must be one of"),
    ('max_mime_depth = 0', "max_mime_depth", "at least 1"),
    ('max_mime_depth = true', "max_mime_depth", "whole number"),
    ('max_mime_parts = "many"', "max_mime_parts", "whole number"),
    ('scan_timeout = 0', "scan_timeout", "positive"),
    ('engine = "command"', None, "needs scanner_path"),
    ('scanner_path = "/opt/kav/bin/kavscan"', None, "scanner_clean_codes"),
    ('scanner_virus_regex = "FOUND"', "scanner_virus_regex", "(?P<name>"),
    ('alternate_key_header = "X-Outbound-Key"', "alternate_key_header", "[miltermonkey]"),
    ('uvscanpth = "/usr/av/bin/uvscan"', "uvscanpth", "uvscanpath"),
])
def test_bad_options_name_key_and_fix(toml: str, key: str | None, fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        options(toml)
    assert fragment in str(e.value)
    assert "test.toml:" in str(e.value)
    if key is not None:
        assert e.value.key == key
        assert e.value.line == 6


def test_unknown_scanner_with_codes_is_fine() -> None:
    o = options('scanner_path = "/opt/kav/bin/kavscan"\nscanner_clean_codes = [0]\n'
                'scanner_infected_codes = [20, 21]\n'
                'scanner_virus_regex = "detected (?P<name>\\\\S+)"\n')
    assert o.scanner_infected_codes == (20, 21)
    assert o.scanner_virus_regex.search("x detected Foo.Bar\n").group("name") == "Foo.Bar"


def test_brain_default_on_error_beats_daemon_default() -> None:
    """A daemon that accepts on spam-engine failure must not accept unscanned virus mail."""
    from miltermonkey_core.contract.monkey import Monkey
    from miltermonkey_core.engine.build import build_chain

    cfg = loads('[miltermonkey]\non_error = "accept"\n\n[[brain]]\nuse = "av"\n'
                'clamd = "tcp:127.0.0.1:1"\n')
    chain = build_chain(cfg, Monkey())
    assert chain.slots[0].on_error == "tempfail"
    explicit = loads('[miltermonkey]\non_error = "accept"\n\n[[brain]]\nuse = "av"\n'
                     'clamd = "tcp:127.0.0.1:1"\non_error = "tag"\n')
    assert build_chain(explicit, Monkey()).slots[0].on_error == "tag"


def test_show_config_round_trip() -> None:
    cfg = loads('[miltermonkey]\n\n[[brain]]\nuse = "av"\nuvscanpath = "/usr/bin/clamscan"\n'
                'scanner_args = ["--no-summary", "{file}"]\n')
    built = build_brain_options(AntiVirusBrain, cfg.brains[0], cfg)
    text = cfg.to_toml({"av": built})
    again = loads(text)
    assert build_brain_options(AntiVirusBrain, again.brains[0], again) == built


# --- templates ----------------------------------------------------------------------------


def test_shipped_templates_load() -> None:
    t = load_templates(None)
    assert set(t) == {"recipient_notice.txt", "sender_notice.txt"}


def test_admin_template_overrides_one_file(tmp_path: Path) -> None:
    (tmp_path / "sender_notice.txt").write_text("Subject: Virus $virus\n\nGot $virus.\n")
    t = load_templates(str(tmp_path))
    assert t["sender_notice.txt"].source == str(tmp_path / "sender_notice.txt")
    assert t["recipient_notice.txt"].source.startswith("(shipped)")


@pytest.mark.parametrize(("text", "fragment"), [
    ("Subject: x $virsu\n\nbody\n", "unknown placeholder(s) $virsu"),
    ("Subject: x\n\nCost: 5$\n", "invalid placeholder"),
    ("no header here", "blank line"),
    ("From: me\n\nbody\n", "only a 'Subject:' line"),
])
def test_bad_templates_are_refused_at_start(tmp_path: Path, text: str, fragment: str) -> None:
    (tmp_path / "recipient_notice.txt").write_text(text)
    with pytest.raises(TemplateError, match=fragment.replace("$", r"\$").replace("(", r"\(")
                       .replace(")", r"\)")):
        load_templates(str(tmp_path))


def test_bad_template_stops_the_brain(tmp_path: Path) -> None:
    from av_helpers import RecordingMonkey

    (tmp_path / "recipient_notice.txt").write_text("Subject: $nope\n\nx\n")
    with pytest.raises(TemplateError):
        AntiVirusBrain(AntiVirusOptions(templates_dir=str(tmp_path)), RecordingMonkey())


# --- hostile values -----------------------------------------------------------------------


HOSTILE = "hi\r\nBcc: victim@example.com\r\n\r\nfake body\x00\u2028Reply-To: x@evil"


def test_one_line() -> None:
    assert one_line(HOSTILE) == "hi Bcc: victim@example.com fake body Reply-To: x@evil"
    assert one_line("a" * 500, 20) == "a" * 17 + "..."
    assert one_line("caf\udce9") == "caf\ufffd"


def test_header_value_cannot_inject_headers() -> None:
    v = encode_header_value("Subject", "[virus removed] " + HOSTILE)
    assert "\r\nBcc" not in v and "\nBcc" not in v
    msg = email.message_from_string(f"Subject: {v}\r\n\r\nbody", policy=email.policy.default)
    assert msg["Bcc"] is None and msg["Reply-To"] is None


def test_sender_notice_cannot_be_injected() -> None:
    values = notice_values(virus="Evil\r\nX-Injected: 1", sender="<alice@example.org>",
                           recipients=["<bob@example.net>\r\nBcc: x@y"], subject=HOSTILE,
                           queue_id="Q\nX-Q: 1", message_id="<a@b>\r\nX-M: 1", who="W\r\nX-W: 1",
                           domainname="example.org", helpaddr="help@example.org",
                           hostname="mx.example.org")
    to = parse_address("alice@example.org")
    assert to is not None
    data = build_sender_notice(template=load_templates(None)["sender_notice.txt"],
                               values=values, to=to, from_name="W\r\nX-W: 1",
                               from_addr="help@example.org", hostname="mx.example.org",
                               in_reply_to="<a@b>\r\nX-M: 1")
    msg = email.message_from_bytes(data, policy=email.policy.default)
    names = {k.lower() for k in msg}
    assert not names & {"bcc", "reply-to", "x-injected", "x-q", "x-m", "x-w"}
    assert msg["In-Reply-To"] is None  # not a clean Message-ID: left out
    assert msg.get_all("To") == ["alice@example.org"]


@pytest.mark.parametrize("addr", ["", "<>", "no-at-sign", "a@b\r\nBcc: c@d", "<a@b>\nX: y"])
def test_unusable_sender_addresses(addr: str) -> None:
    assert parse_address(addr) is None


# --- packaging ----------------------------------------------------------------------------


def test_committed_signatures_match_the_samples() -> None:
    from av_helpers import signature_db
    from miltermonkey_av.testing import samples as av_samples

    assert signature_db() == av_samples.signature_files()


def test_entry_point_is_listed_with_options() -> None:
    from miltermonkey_core.plugins import brain_info, load_brain_class

    assert load_brain_class("av") is AntiVirusBrain
    [info] = [b for b in brain_info() if b.name == "av"]
    assert info.error is None
    # body, abort and close: streaming to clamd while the body arrives
    assert set(info.hooks) == {"body", "eom_process", "abort", "close"}
    assert dict(info.options)["relay_mode"] == "true"
    assert dict(info.options)["scanner_path"] == "None"
