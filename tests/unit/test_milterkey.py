"""The milter key: signing, verifying, the format, the service's settings and the CLI.

Everything here runs in-process with a fixed clock.  The secret file is
``test_milterkey_secrets.py``, stripping and signing after the brain chain
``test_milterkey_finish.py``, the real-socket hop 1 -> hop 2 tests
``test_milterkey_daemon.py`` and ``test_milterkey_hops.py``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import re
import socket
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest

from miltermonkey_core import Message
from miltermonkey_core.cli.key import add_key_commands
from miltermonkey_core.config import loads
from miltermonkey_core.contract.model import Header, Headers, message_from_bytes
from miltermonkey_core.errors import ConfigError, SecretError
from miltermonkey_core.milterkey import (
    KeyFields,
    KeyInspection,
    KeyService,
    MalformedKey,
    Reason,
    canonical_header_value,
    check_secret_file,
    generate_secret_file,
    load_secrets,
    mime_digest,
    normalize_message_id,
)
from miltermonkey_core.milterkey.fields import mid_tag

SECRET1 = bytes(range(32))
SECRET2 = bytes(range(100, 132))
NOW = 1_750_000_000
DAY = 86400

RAW = (b"Message-ID: <m1@example.org>\nFrom: a@example.org\nTo: b@example.net\n"
       b"Subject: test\n\nHello\nworld\n")
OTHER = RAW.replace(b"<m1@example.org>", b"<m2@example.org>")
RAN = (("av", "continue"), ("spam", "continue"))


def service(secrets: dict[str, bytes] | None = None, now: float = NOW, **kw: Any) -> KeyService:
    kw.setdefault("hostname", "mx1.example.org")
    return KeyService(secrets or {"k1": SECRET1}, clock=lambda: now, **kw)


def with_headers(raw: bytes, *headers: tuple[str, str]) -> bytes:
    """``raw`` with headers appended to its header block (folded values kept)."""
    head, _, body = raw.partition(b"\n\n")
    extra = b"".join(f"{n}: {v}\n".encode() for n, v in headers)
    return head + b"\n" + extra + b"\n" + body


def msg(raw: bytes = RAW) -> Message:
    return message_from_bytes(raw)


def key_for(svc: KeyService, raw: bytes = RAW, ran: Sequence[tuple[str, str]] = RAN,
            **kw: Any) -> str:
    m = msg(raw)
    mid = normalize_message_id(m.headers)
    assert mid is not None
    return svc.format(svc.sign(ran, mid, m.body.sha256(), mime_digest(m.headers), **kw))


def inspect(svc: KeyService, raw: bytes, value: str, name: str = "X-Milter-Key") -> KeyInspection:
    return svc.inspect(msg(with_headers(raw, (name, value))))


def reason_of(svc: KeyService, raw: bytes, value: str) -> str | None:
    insp = inspect(svc, raw, value)
    assert len(insp.checks) == 1
    return insp.checks[0].reason


def edit_field(value: str, tag: str, new: str) -> str:
    fields = KeyFields.parse(value)
    return "; ".join(f"{t}={new if t == tag else v}" for t, v in fields.items())


# --- round trip and format -------------------------------------------------------------


def test_sign_then_verify_round_trip() -> None:
    svc = service()
    value = key_for(svc)
    insp = inspect(svc, RAW, value)
    assert insp.rejected == []
    assert insp.trusted is not None
    assert insp.trusted.ran == RAN
    assert insp.trusted.host == "mx1.example.org"
    assert insp.trusted.expiry == NOW + 432000
    assert insp.says_ran("av") and insp.says_ran("spam") and not insp.says_ran("other")
    assert KeyFields.parse(value) == insp.trusted


def test_header_is_folded_short_and_parses_back() -> None:
    svc = service()
    ran = tuple((f"brain-number-{i}", "continue") for i in range(60))
    value = key_for(svc, ran=ran)
    lines = value.split("\n")
    assert len(lines) > 3
    assert all(line.startswith("\t") for line in lines[1:])
    assert max(len(line) for line in lines) < 78
    assert reason_of(svc, RAW, value) is None


def test_format_matches_the_documented_shape() -> None:
    value = key_for(service())
    flat = re.sub(r"\s+", " ", value)
    assert re.fullmatch(
        r"v=2; id=k1; host=mx1\.example\.org; exp=\d+; bind=body; mid=[\w-]{8}; "
        r"body=[\w-]{8}; mime=[\w-]{8}; ran=av:continue,spam:continue; mac=[\w-]{43}",
        flat), flat


def test_canonical_encoding_is_length_prefixed() -> None:
    """Moving a character from one field to the next changes the signed bytes."""
    a = KeyFields("k1", "ab.example", 5, "none", "AAAAAAAA", None, None,
                  (("x", "continue"),))
    b = attrs.evolve(a, key_id="k1a", host="b.example")
    assert a.signed_bytes("<m>", None, None) != b.signed_bytes("<m>", None, None)
    c = attrs.evolve(a, ran=(("x", "continue"), ("y", "accept")))
    d = attrs.evolve(a, ran=(("y", "accept"), ("x", "continue")))
    assert c.signed_bytes("<m>", None, None) != d.signed_bytes("<m>", None, None)


# --- what is not trusted -------------------------------------------------------------------

FIELD_EDITS = [
    ("v", "3", Reason.MALFORMED),
    ("v", "1", Reason.OBSOLETE),
    ("id", "k2", Reason.UNKNOWN_KEY),
    ("host", "mx2.example.org", Reason.BAD_MAC),
    ("exp", str(NOW + 432001), Reason.BAD_MAC),
    ("exp", str(NOW + 60), Reason.BAD_MAC),
    ("bind", "none", Reason.MALFORMED),
    ("mid", "AAAAAAAA", Reason.WRONG_MESSAGE),
    ("body", "AAAAAAAA", Reason.WRONG_BODY),
    ("mime", "AAAAAAAA", Reason.WRONG_HEADERS),
    ("ran", "av:continue", Reason.BAD_MAC),
    ("ran", "av:continue,spam:continue,extra:continue", Reason.BAD_MAC),
    ("ran", "spam:continue,av:continue", Reason.BAD_MAC),
    ("ran", "av:accept,spam:continue", Reason.BAD_MAC),
    ("ran", "AV:continue,spam:continue", Reason.BAD_MAC),
    ("ran", "av:continue,av:continue", Reason.MALFORMED),
    ("mac", "A" * 43, Reason.BAD_MAC),
]


@pytest.mark.parametrize(("tag", "new", "reason"), FIELD_EDITS,
                         ids=[f"{t}={n[:20]}" for t, n, _ in FIELD_EDITS])
def test_each_tampered_field_is_refused(tag: str, new: str, reason: str) -> None:
    svc = service()
    value = key_for(svc)
    tampered = edit_field(value, tag, new)
    assert tampered != value
    got = reason_of(svc, RAW, tampered)
    assert got is not None and got.startswith(reason), got


def test_bind_none_with_the_body_field_removed_is_refused() -> None:
    svc = service()
    parts = [p for p in re.split(r"\s*;\s*", key_for(svc))
             if not p.startswith(("body=", "mime="))]
    tampered = "; ".join(p.replace("bind=body", "bind=none") for p in parts)
    for verifier in (svc, service(binding="none")):
        got = reason_of(verifier, RAW, tampered)
        assert got is not None and got.startswith(Reason.BAD_MAC), got


def test_non_canonical_mac_encoding_is_refused() -> None:
    """The last base64url character carries 2 spare bits: flipping them must not pass."""
    svc = service()
    value = key_for(svc)
    mac = KeyFields.parse(value).mac
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    i = alphabet.index(mac[-1])
    sibling = alphabet[i ^ 1]
    assert base64.urlsafe_b64decode(mac[:-1] + sibling + "=") == \
        base64.urlsafe_b64decode(mac + "=")
    got = reason_of(svc, RAW, value.replace(mac, mac[:-1] + sibling))
    assert got is not None and got.startswith(Reason.BAD_MAC)


def test_tampered_body_is_refused_with_binding_body() -> None:
    svc = service()
    value = key_for(svc)
    got = reason_of(svc, RAW + b"-- \nfooter\n", value)
    assert got is not None and got.startswith(Reason.WRONG_BODY), got


def test_tampered_body_passes_with_binding_none() -> None:
    svc = service(binding="none")
    value = key_for(svc)
    assert "bind=none" in value and "body=" not in value
    assert reason_of(svc, RAW + b"-- \nfooter\n", value) is None


def test_unbound_key_is_refused_where_body_binding_is_required() -> None:
    value = key_for(service(binding="none"))
    got = reason_of(service(binding="body"), RAW, value)
    assert got is not None and got.startswith(Reason.UNBOUND), got


def test_expired_key_is_refused() -> None:
    value = key_for(service())
    expiry = NOW + 432000
    got = reason_of(service(now=expiry + 301), RAW, value)
    assert got is not None and got.startswith(Reason.EXPIRED), got


def test_key_within_clock_skew_is_trusted() -> None:
    value = key_for(service())
    expiry = NOW + 432000
    assert reason_of(service(now=expiry + 300), RAW, value) is None
    got = reason_of(service(now=expiry + 60, clock_skew=0), RAW, value)
    assert got is not None and got.startswith(Reason.EXPIRED)


def test_expiry_too_far_in_the_future_is_refused() -> None:
    signer = service(default_expiration=400 * DAY)
    value = key_for(signer)
    got = reason_of(service(), RAW, value)
    assert got is not None and got.startswith(Reason.FUTURE), got
    # a brain override that long makes it acceptable
    assert reason_of(service(expirations={"av": 400 * DAY}), RAW, value) is None


def test_unknown_key_id_is_refused() -> None:
    value = key_for(service({"other": SECRET2}))
    got = reason_of(service(), RAW, value)
    assert got is not None and got.startswith(Reason.UNKNOWN_KEY), got


def test_wrong_secret_is_refused() -> None:
    value = key_for(service({"k1": SECRET2}))
    got = reason_of(service(), RAW, value)
    assert got is not None and got.startswith(Reason.BAD_MAC), got


def test_key_copied_onto_another_message_is_refused() -> None:
    svc = service()
    value = key_for(svc)
    got = reason_of(svc, OTHER, value)
    assert got is not None and got.startswith(Reason.WRONG_MESSAGE), got
    # even with the body not bound
    loose = service(binding="none")
    got = reason_of(loose, OTHER, key_for(loose))
    assert got is not None and got.startswith(Reason.WRONG_MESSAGE), got


def test_message_without_or_with_two_message_ids_cannot_be_trusted() -> None:
    svc = service()
    value = key_for(svc)
    no_mid = RAW.replace(b"Message-ID: <m1@example.org>\n", b"")
    two = with_headers(RAW, ("Message-ID", "<m1@example.org>"))
    for raw in (no_mid, two):
        got = reason_of(svc, raw, value)
        assert got is not None and got.startswith(Reason.WRONG_MESSAGE), got


def test_folded_message_id_binds_like_the_unfolded_one() -> None:
    svc = service()
    value = key_for(svc)
    folded = RAW.replace(b"Message-ID: <m1@example.org>", b"Message-ID:\n <m1@example.org>")
    assert reason_of(svc, folded, value) is None


def test_malformed_values_are_refused() -> None:
    svc = service()
    for bad in ("", "garbage", "v=2", "v=2; id=k1", "x" * 9000, "v=2;" * 20):
        got = reason_of(svc, RAW, bad)
        assert got is not None and got.startswith(Reason.MALFORMED), (bad[:30], got)


# --- rotation and the alternate header -----------------------------------------------------


def _config(secret_file: Path, **daemon: Any) -> Any:
    lines = ["[miltermonkey]", f'miltersecretfile = "{secret_file}"', "milter_key = true"]
    for k, v in daemon.items():
        lines.append(f"{k} = {v!r}".replace("'", '"'))
    return loads("\n".join(lines) + "\n")


def test_rotation(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    assert generate_secret_file(path, "old") == "old"
    old_svc = KeyService.from_config(_config(path))
    old_key = key_for(old_svc)

    assert generate_secret_file(path, "new") == "new"
    assert list(load_secrets(path)) == ["old", "new"]
    # appending does not change the signer: the first line still signs
    assert KeyService.from_config(_config(path)).signing_key == "old"
    # key_id points at the new one: new keys use it, old keys still verify
    svc = KeyService.from_config(_config(path, key_id="new"))
    assert svc.signing_key == "new"
    new_key = key_for(svc)
    assert KeyFields.parse(new_key).key_id == "new"
    assert reason_of(svc, RAW, old_key) is None
    assert reason_of(svc, RAW, new_key) is None
    # remove the old line: its keys are no longer trusted
    text = path.read_text()
    path.write_text("\n".join(x for x in text.splitlines() if not x.startswith("old:")) + "\n")
    svc = KeyService.from_config(_config(path, key_id="new"))
    got = reason_of(svc, RAW, old_key)
    assert got is not None and got.startswith(Reason.UNKNOWN_KEY)
    assert reason_of(svc, RAW, new_key) is None


def test_key_id_not_in_the_file_is_refused_at_start(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    generate_secret_file(path, "k1")
    with pytest.raises(SecretError, match="key_id 'k9' is not in the secret file"):
        KeyService.from_config(_config(path, key_id="k9"))


def test_alternate_header_is_accepted_with_the_shared_secret() -> None:
    relay = service(header_name="X-Relay-Key")
    value = key_for(relay)
    mx = service(alternate_headers=["X-Relay-Key"])
    assert mx.header_names == ("X-Milter-Key", "X-Relay-Key")
    insp = inspect(mx, RAW, value, name="X-Relay-Key")
    assert insp.trusted is not None and insp.says_ran("av")
    # an alternate header name that is not configured is not even looked at
    assert inspect(service(), RAW, value, name="X-Relay-Key").checks == []
    # a key under the alternate name made with another secret is refused
    forged = key_for(service({"k1": SECRET2}, header_name="X-Relay-Key"))
    insp = inspect(mx, RAW, forged, name="X-Relay-Key")
    assert insp.trusted is None and insp.rejected[0][0] == "X-Relay-Key"


def test_from_config_reads_every_setting(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    generate_secret_file(path, "k1")
    svc = KeyService.from_config(_config(
        path, milterkeyheader="X-Our-Key", alternate_key_header=["X-Their-Key", "x-our-key"],
        key_body_binding="none", key_clock_skew=7, defaultexpiration=1000, hostname="h.example"))
    assert svc.header_names == ("X-Our-Key", "X-Their-Key")
    assert (svc.binding, svc.clock_skew, svc.default_expiration, svc.hostname) == \
        ("none", 7, 1000, "h.example")


def test_hostname_that_cannot_go_in_a_key_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    generate_secret_file(path, "k1")
    with pytest.raises(ConfigError, match=r"hostname.*cannot go in a milter key"):
        KeyService.from_config(_config(path, hostname="mx 1;evil"))


# --- the CLI ---------------------------------------------------------------------------------


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="miltermonkey")
    add_key_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    status: int = args.func(args)
    return status


def test_cli_key_generate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "secret"
    assert _cli(["key", "generate", "--file", str(p), "--key-id", "k1"]) == 0
    assert "created with key k1" in capsys.readouterr().out
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert _cli(["key", "generate", str(p), "--key-id", "k2"]) == 0
    assert 'key_id = "k2"' in capsys.readouterr().out
    assert list(load_secrets(p)) == ["k1", "k2"]
    assert _cli(["key", "generate", "--file", str(p), "--key-id", "k3", "--force"]) == 0
    assert list(load_secrets(p)) == ["k3"]
    # the file of a configuration
    cfg = tmp_path / "mm.toml"
    other = tmp_path / "other-secret"
    cfg.write_text(f'[miltermonkey]\nmiltersecretfile = "{other}"\n')
    assert _cli(["key", "generate", "-c", str(cfg)]) == 0
    check_secret_file(other)


def test_cli_key_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    secret = tmp_path / "secret"
    generate_secret_file(secret, "k1")
    cfg = tmp_path / "mm.toml"
    cfg.write_text(f'[miltermonkey]\nmilter_key = true\nmiltersecretfile = "{secret}"\n')
    import time

    svc = KeyService(load_secrets(secret), hostname="mx1.example.org", clock=time.time)
    good = key_for(svc)
    eml = tmp_path / "m.eml"

    eml.write_bytes(with_headers(RAW, ("X-Milter-Key", good)))
    assert _cli(["key", "verify", str(eml), "-c", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "X-Milter-Key #1: TRUSTED: key k1 from mx1.example.org" in out
    assert "ran: av (continue), spam (continue)" in out

    eml.write_bytes(with_headers(OTHER, ("X-Milter-Key", "v=2; junk"), ("X-Milter-Key", good)))
    assert _cli(["key", "verify", str(eml), "-c", str(cfg)]) == 1
    out = capsys.readouterr().out
    assert "X-Milter-Key #1: NOT TRUSTED: malformed" in out
    assert "X-Milter-Key #2: NOT TRUSTED: wrong message" in out
    assert "result: no trusted key" in out

    eml.write_bytes(RAW)
    assert _cli(["key", "verify", str(eml), "-c", str(cfg)]) == 1
    assert "no key header" in capsys.readouterr().out

    secret.chmod(0o644)
    with pytest.raises(SecretError, match="chmod 600"):
        _cli(["key", "verify", str(eml), "-c", str(cfg)])


# --- the encodings, as docs/milter-key.md writes them down -----------------------------------


def _documented_bound_digest(headers: list[tuple[str, str]]) -> bytes:
    """The bound headers' digest computed from the docs, not from the code."""
    def lp(b: bytes) -> bytes:
        return len(b).to_bytes(4, "big") + b

    out = lp(b"MilterMonkey bound headers")
    for name in ("MIME-Version", "Content-Type", "Content-Transfer-Encoding",
                 "Content-Disposition"):
        values = [v.replace("\r", "").replace("\n", "").strip(" \t").encode()
                  for n, v in headers if n.lower() == name.lower()]
        out += lp(name.lower().encode()) + lp(str(len(values)).encode())
        out += b"".join(lp(v) for v in values)
    return hashlib.sha256(out).digest()


def test_bound_headers_digest_is_the_documented_encoding() -> None:
    cases = [
        [],
        [("Subject", "x")],
        [("MIME-Version", "1.0"), ("Content-Type", "text/plain")],
        [("content-type", 'multipart/mixed;\n\tboundary="a  b" '), ("CONTENT-TYPE", ""),
         ("Content-Disposition", "attachment; filename=x.exe"),
         ("Content-Transfer-Encoding", " base64\t")],
    ]
    for headers in cases:
        expected = _documented_bound_digest(headers)
        assert mime_digest(Headers(Header.from_str(n, v) for n, v in headers)) == expected


def test_canonical_header_value() -> None:
    assert canonical_header_value("text/plain") == b"text/plain"
    assert canonical_header_value(' \tmultipart/mixed;\r\n\tboundary="a  b" \t') == \
        b'multipart/mixed;\tboundary="a  b"'
    assert canonical_header_value("a\n b") == b"a b"
    # only spaces and tabs are trimmed: other control characters are part of the value
    assert canonical_header_value("text/plain\x0c") == b"text/plain\x0c"
    assert canonical_header_value("\x0btext/plain") == b"\x0btext/plain"
    assert canonical_header_value("XtypeX") == b"XtypeX"
    assert canonical_header_value("caf\udce9") == b"caf\xe9"  # 8-bit bytes as they came


def test_mid_fingerprint_is_the_documented_one() -> None:
    for mid in ("<m1@example.org>", "<caf\udce9@example.org>"):
        raw = mid.encode("utf-8", "surrogateescape")
        expected = base64.urlsafe_b64encode(hashlib.sha256(b"mid\x00" + raw).digest()[:6])
        assert mid_tag(mid) == expected.decode()


def test_an_eight_bit_message_id_signs_and_verifies() -> None:
    raw = RAW.replace(b"<m1@example.org>", b"<caf\xe9@example.org>")
    svc = service()
    value = key_for(svc, raw)
    assert reason_of(svc, raw, value) is None
    got = reason_of(svc, RAW, value)
    assert got is not None and got.startswith(Reason.WRONG_MESSAGE)


def _check_folding(fields: KeyFields, name: str) -> None:
    lines = fields.format(name).split("\n\t")
    prefixes = [len(name) + 2] + [1] * (len(lines) - 1)  # "Name: ", then the tab
    for i, (line, prefix) in enumerate(zip(lines, prefixes, strict=True)):
        assert prefix + len(line) <= 76, (i, line)
        if i + 1 < len(lines):
            following = re.split(r"(?<=,)|(?<=;) ", lines[i + 1])[0]
            sep = "" if line.endswith(",") else " "
            assert prefix + len(line) + len(sep) + len(following) > 76, (line, following)
    assert "".join(lines).replace(" ", "") == \
        "".join(f"{t}={v};" for t, v in fields.items()).rstrip(";").replace(" ", "")


@pytest.mark.parametrize("name", ["X-Milter-Key", "X-K", "X-A-Much-Longer-Key-Header-Name"])
def test_folding_fills_each_line_up_to_76_columns(name: str) -> None:
    """Every length of host and brain names, so some token lands on each column."""
    for size in range(1, 48):
        svc = service(hostname="h" * size)
        ran = tuple((f"b{'r' * (size % 9)}-{i}", "continue" if i % 3 else "accept")
                    for i in range(size % 7 + 1))
        fields = svc.sign(ran, "<m1@example.org>", bytes(32), bytes(32))
        _check_folding(fields, name)
        assert fields.format() == fields.format("X-Milter-Key")


def _bad(value: str) -> str:
    with pytest.raises(MalformedKey) as e:
        KeyFields.parse(value)
    return str(e.value)


def test_parse_says_what_is_wrong() -> None:
    value = key_for(service()).replace("\n\t", " ")
    assert _bad("") == "empty"
    assert _bad(" \t\r\n ") == "empty"
    assert _bad("x" * 8193) == "longer than 8192 characters"
    assert _bad("v=2" + " " * 8189) == \
        "fields v; expected v,id,host,exp,bind,mid,ran,mac"
    assert _bad("\x0b" + value) == "expected tag=value, got '\\x0bv=2'"
    assert _bad("id=k1; " + value) == "does not start with the format version v="
    assert _bad("v=9; id=k1") == "unsupported format version v='9'"
    assert _bad("v=" + "9" * 41) == f"unsupported format version v='{'9' * 40}...'"
    assert _bad("v=" + "9" * 40) == f"unsupported format version v='{'9' * 40}'"
    assert _bad("v=2; id=k1") == "fields v,id; expected v,id,host,exp,bind,mid,ran,mac"
    assert _bad(value.replace("bind=body", "bind=none")) == (
        "fields v,id,host,exp,bind,mid,body,mime,ran,mac; expected "
        "v,id,host,exp,bind,mid,ran,mac")
    assert _bad(edit_field(value, "host", "h" * 41 + "!")) == f"bad host='{'h' * 40}...'"
    assert _bad(edit_field(value, "ran", "av-continue")) == \
        "bad ran entry 'av-continue': expected brain:verdict"
    assert _bad(edit_field(value, "ran", "av:continue,av:accept")) == "brain av listed twice"


def test_characters_around_a_key_are_not_ignored() -> None:
    svc = service()
    value = key_for(svc)
    for changed in (value + "X", "X" + value, value + "\x0b", "\x0c" + value):
        assert reason_of(svc, RAW, changed) is not None, changed
    for ignored in (value + " \t", "\r\n " + value):
        assert reason_of(svc, RAW, ignored) is None


# --- KeyService's own checks and messages -----------------------------------------------------


def test_service_refuses_bad_settings_with_reasons() -> None:
    with pytest.raises(SecretError, match=r"^no milter key secret given$"):
        KeyService({})
    with pytest.raises(SecretError, match=r"^key_id 'k9' is not in the secret file \(it has: "
                       r"a, b\); add it with `miltermonkey key generate --key-id k9` or fix "
                       r"key_id$"):
        KeyService({"a": SECRET1, "b": SECRET2}, signing_key="k9")
    with pytest.raises(ValueError, match=r"^key_body_binding must be one of \('body', 'none'\), "
                       r"not 'headers'$"):
        KeyService({"a": SECRET1}, binding="headers")
    with pytest.raises(ValueError, match=r"^hostname 'a b' cannot go in a milter key$"):
        KeyService({"a": SECRET1}, hostname="a b")
    with pytest.raises(ValueError, match=r"^content-type cannot hold a milter key: the key binds "
                       r"that header$"):
        KeyService({"a": SECRET1}, alternate_headers=["X-Relay-Key", "Content-Type"])
    with pytest.raises(ValueError, match=r"^content-type, mime-version cannot hold a milter key"):
        KeyService({"a": SECRET1}, header_name="MIME-Version", alternate_headers=["Content-Type"])
    assert KeyService({"a": SECRET1}).hostname == "localhost"
    svc = KeyService({"a": SECRET1}, alternate_headers=["X-A", "X-B", "x-a", "x-milter-KEY"])
    assert svc.header_names == ("X-Milter-Key", "X-A", "X-B")


def test_a_bound_header_cannot_be_the_key_header_in_the_config(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    generate_secret_file(path, "k1")
    with pytest.raises(ConfigError) as e:
        KeyService.from_config(_config(path, milterkeyheader="MIME-Version"))
    assert e.value.key == "milterkeyheader"
    assert "MIME-Version cannot hold a milter key: the key binds that header" in str(e.value)
    with pytest.raises(ConfigError) as e:
        KeyService.from_config(_config(path, alternate_key_header=["X-Ok", "content-disposition"]))
    assert e.value.key == "alternate_key_header"
    assert "content-disposition cannot hold a milter key" in str(e.value)


def test_from_config_takes_each_brains_expiration(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    generate_secret_file(path, "k1")
    config = loads(f'[miltermonkey]\nmilter_key = true\nmiltersecretfile = "{path}"\n'
                   '[[brain]]\nuse = "av"\nexpiration = "1d"\n[[brain]]\nuse = "spam"\n')
    svc = KeyService.from_config(config)
    assert svc.expirations == {"av": DAY}
    assert svc.lifetime(["av", "spam"]) == DAY


@pytest.mark.parametrize(("fqdn", "name"), [
    ("Mx1.Example.ORG", "Mx1.Example.ORG"),
    ("._-mx 1!.example.", "mx-1-.example."),
    ("\xc4\xd6", "localhost"),
    ("Xmail.example", "Xmail.example"),
    ("", "localhost"),
    ("h" * 300, "h" * 253),
])
def test_hostname_from_the_fqdn_is_made_fit_for_a_key(
        fqdn: str, name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "secret"
    generate_secret_file(path, "k1")
    monkeypatch.setattr(socket, "getfqdn", lambda: fqdn)
    assert KeyService.from_config(_config(path)).hostname == name


def test_a_configured_hostname_that_cannot_go_in_a_key_names_the_setting(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    generate_secret_file(path, "k1")
    with pytest.raises(ConfigError) as e:
        KeyService.from_config(_config(path, hostname="mx1;evil"))
    assert e.value.key == "hostname"
    assert "'mx1;evil' cannot go in a milter key: use letters, digits, '.', '_' and '-' only" \
        in str(e.value)


def test_sign_needs_both_digests_and_honours_its_instant() -> None:
    svc = service()
    for body, headers in ((None, bytes(32)), (bytes(32), None), (None, None)):
        with pytest.raises(ValueError, match=r"^body binding needs the body and bound headers' "
                           r"digests$"):
            svc.sign(RAN, "<m1@example.org>", body, headers)
    # without body binding neither is needed
    service(binding="none").sign(RAN, "<m1@example.org>", None, None)
    assert svc.sign(RAN, "<m1@example.org>", bytes(32), bytes(32), now=NOW - DAY).expiry == \
        NOW - DAY + 432000
    assert svc.sign(RAN, "<m1@example.org>", bytes(32), bytes(32)).expiry == NOW + 432000
    assert svc.lifetime([]) == 432000
    assert service(expirations={"av": 60}).lifetime(["av", "spam"]) == 60


def test_check_judges_at_the_instant_it_is_given() -> None:
    svc = service()  # its clock says NOW
    m = msg(RAW)
    value = key_for(svc)
    args = (value, normalize_message_id(m.headers), m.body.sha256(), mime_digest(m.headers))
    expiry = NOW + 432000
    assert svc.check(*args, NOW)[1] is None
    assert svc.check(*args, expiry + 300)[1] is None
    assert svc.check(*args, expiry + 301)[1] == "expired 301 s ago"
    # a key may be made at most max_lifetime (+ skew) ahead
    assert svc.check(*args, expiry - 432000 - 300)[1] is None
    assert svc.check(*args, expiry - 432000 - 301)[1] == (
        "expiry too far in the future: 432301 s from now, more than the longest lifetime "
        "here (432000 s)")


def test_refusal_reasons_read_in_full() -> None:
    svc = service()
    value = key_for(svc)
    unbound = key_for(service(binding="none"))
    assert reason_of(svc, RAW, unbound) == \
        "not bound to the body (bind=none) while key_body_binding = body here"
    assert reason_of(svc, with_headers(RAW, ("Content-Type", "text/html")), value) == (
        "wrong MIME headers: MIME-Version, Content-Type, Content-Transfer-Encoding, "
        "Content-Disposition changed since the key was made, so the body reads differently")
    assert reason_of(svc, RAW + b"x", value) == \
        "wrong body: the body changed since the key was made"


def test_skip_brains_adds_up_over_calls() -> None:
    svc = service()
    insp = inspect(svc, RAW, key_for(svc))
    slot = attrs.make_class("S", {"name": attrs.field(), "skip_if_key": attrs.field()})
    assert insp.skip_brains([slot("av", True), slot("spam", False)]) == {"av"}
    assert insp.skip_brains([slot("spam", True), slot("other", True)]) == {"spam"}
    assert insp.spared == {"av", "spam"}


def test_inspect_records_each_header_and_logs_the_trusted_one(
        caplog: pytest.LogCaptureFixture) -> None:
    svc = service()
    good = key_for(svc)
    caplog.set_level("DEBUG", logger="miltermonkey")
    forged = key_for(service({"k1": SECRET2}))
    m = msg(with_headers(RAW, ("X-Milter-Key", "v=2; bad"), ("x-milter-key", good),
                         ("X-Milter-Key", forged)))
    insp = svc.inspect(m)
    assert [(c.header, c.index, c.value, c.trusted) for c in insp.checks] == [
        ("X-Milter-Key", 1, "v=2; bad", False), ("x-milter-key", 2, good, True),
        ("X-Milter-Key", 3, forged, False)]
    assert m.notes["_mm_key"] is insp
    assert [r.getMessage() for r in caplog.records] == [
        f"{m.id}: trusted milter key in x-milter-key #2: key k1 from mx1.example.org, "
        "ran av,spam"]
