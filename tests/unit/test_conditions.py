"""Per-brain ``when`` conditions and evaluation mode: from the file to the brain's calls."""

from __future__ import annotations

import ipaddress
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from miltermonkey_core import config as config_layer
from miltermonkey_core.config import Config
from miltermonkey_core.config.conditions import WHEN_KEYS, When, parse_when
from miltermonkey_core.contract.model import Address, Connection, Message
from miltermonkey_core.engine.build import build_engine
from miltermonkey_core.engine.conditions import Conditions, domain_matches
from miltermonkey_core.engine.offline import run_offline
from miltermonkey_core.errors import ConfigError
from miltermonkey_core.milter import protocol as mp
from miltermonkey_core.milter.generation import new_generation
from miltermonkey_core.plugins import installed_brains
from miltermonkey_core.testing.client import ConnectInfo, MessageSpec, run_session
from miltermonkey_core.testing.daemon import MonkeyProcess


def ip(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


def re_(text: str) -> re.Pattern[str]:
    return re.compile(text)


MESSAGE = (b"From: a@example.com\r\nTo: b@example.org\r\nSubject: hi\r\n"
           b"Message-ID: <c1@example.com>\r\n\r\nHello.\r\n")


def loads(text: str) -> Config:
    return config_layer.loads(textwrap.dedent(text), installed=installed_brains())


def two_trivials(when: str) -> Config:
    """Brains ``always`` and ``gated`` (the second with ``when``), each adding a header."""
    return loads(f"""
        [miltermonkey]
        milter_key = false
        [[brain]]
        use = "trivial"
        name = "always"
        header_name = "X-Always"
        [[brain]]
        use = "trivial"
        name = "gated"
        header_name = "X-Gated"
        {when}
        """)


def ran(config: Config, **kw: object) -> dict[str, str]:
    result = run_offline(config, MESSAGE, **kw)  # type: ignore[arg-type]
    return {r.brain: r.outcome + (f" {r.detail}" if r.detail else "") for r in result.results}


# --------------------------------------------------------------------------------------
# Reading: every mistake at its line
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("when", "key", "line", "fragment"), [
    ('when.client_in = ["10.0.0.0/33"]', "when.client_in", 12, "is not a network"),
    ('when.colour = "red"', "when.colour", 12, "unknown condition"),
    ('when.client_nto_in = ["10.0.0.0/8"]', "when.client_nto_in", 12, "did you mean"),
    ('when.macro = { "{daemon_name}" = "(" }', "when.macro", 12, "not a regular expression"),
    ('when.sender_domain = ["exa mple.com"]', "when.sender_domain", 12, "is not a domain"),
    ('when.size_min = "2M"\n        when.size_max = "1M"', "when.size_min", 12, "never run"),
    ('when.authenticated = "yes"', "when.authenticated", 12, "true or false"),
    ('when = "always"', "when", 12, "expected a table"),
])
def test_bad_conditions_are_refused_at_their_line(
        when: str, key: str, line: int, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        two_trivials(when)
    err = info.value
    assert (err.key, err.line) == (key, line), str(err)
    assert fragment in str(err)


def test_condition_lines_in_a_when_table(tmp_path: Path) -> None:
    text = textwrap.dedent("""\
        [[brain]]
        use = "trivial"

        [brain.when]
        authenticated = false
        client_not_in = ["127.0.0.0/8",
                         "10.0.0.300/8"]
        """)
    with pytest.raises(ConfigError) as info:
        config_layer.loads(text, installed=installed_brains())
    assert (info.value.key, info.value.line) == ("when.client_not_in", 6)


def test_check_config_names_the_bad_condition(tmp_path: Path) -> None:
    path = tmp_path / "mm.toml"
    path.write_text('[miltermonkey]\nmilter_key = false\n\n[[brain]]\nuse = "trivial"\n'
                    'when.client_in = ["10.0.0.0/8", "bogus"]\n')
    r = subprocess.run([sys.executable, "-m", "miltermonkey_core", "check-config", "-c",
                        str(path)], capture_output=True, text=True, check=False)
    assert r.returncode == 1
    assert f"{path}:6: when.client_in: 'bogus' is not a network" in r.stderr


def test_every_condition_key_is_parsed() -> None:
    table = {
        "authenticated": True, "client_in": ["10.0.0.0/8", "2001:db8::/32"],
        "client_not_in": ["127.0.0.0/30"], "sender_domain": ["Example.COM."],
        "sender_domain_not": ["*.spam.example"], "recipient_domain": ["example.org"],
        "recipient_domain_not": ["*.example.net"], "size_min": "1k", "size_max": "10M",
        "macro": {"daemon_name": "^in$"}, "key_ran": ["av"], "unless_key_ran": ["spam"],
    }
    assert set(table) == set(WHEN_KEYS)
    w = parse_when(table)
    assert w.sender_domain == ("example.com",)
    assert (w.size_min, w.size_max) == (1024, 10 * 1024 * 1024)
    assert w.macro[0][0] == "{daemon_name}"
    assert parse_when(w.as_table()) == w  # show-config writes what reads back


# --------------------------------------------------------------------------------------
# Deciding
# --------------------------------------------------------------------------------------


def test_domain_patterns() -> None:
    assert domain_matches("example.org", ("example.org",))
    assert not domain_matches("mail.example.org", ("example.org",))
    assert domain_matches("mail.example.org", ("*.example.org",))
    assert not domain_matches("example.org", ("*.example.org",))
    assert not domain_matches("badexample.org", ("*.example.org",))


def msg(sender: str = "<a@example.com>", rcpts: tuple[str, ...] = ("<b@example.org>",),
        address: str | None = "192.0.2.7", **macros: str) -> Message:
    conn = Connection(id="c", family="inet", address=address)
    m = Message(connection=conn)
    m.envelope.sender = Address(sender)
    m.envelope.recipients = [Address(r) for r in rcpts]
    m.macros.update(macros)
    return m


@pytest.mark.parametrize(("when", "message", "stage", "outcome"), [
    (When(client_not_in=(ip("127.0.0.0/30"),)), msg(address="127.0.0.1"), "connect",
     "condition:client_not_in"),
    (When(client_not_in=(ip("127.0.0.0/30"),)), msg(address="127.0.0.5"), "connect", None),
    (When(client_in=(ip("2001:db8::/32"),)), msg(address="2001:db8::1"), "connect", None),
    (When(client_in=(ip("192.0.2.0/24"),)), msg(address="::ffff:192.0.2.9"), "connect", None),
    (When(client_in=(ip("192.0.2.0/24"),)), msg(address="/run/x.sock"), "connect",
     "condition:client_in"),
    (When(authenticated=False), msg(**{"{auth_authen}": "alice"}), "envfrom",
     "condition:authenticated"),
    (When(authenticated=True), msg(**{"{auth_authen}": "alice"}), "envfrom", None),
    (When(authenticated=False), msg(**{"{auth_authen}": "alice"}), "connect", None),
    (When(sender_domain=("example.com",)), msg(sender="<>"), "envfrom",
     "condition:sender_domain"),
    (When(recipient_domain=("example.net",)), msg(), "envrcpt", None),  # not known yet
    (When(recipient_domain=("example.net",)), msg(), "eom", "condition:recipient_domain"),
    (When(recipient_domain_not=("*.example.org",)), msg(rcpts=("<x@mx.example.org>",)), "eom",
     "condition:recipient_domain_not"),
    (When(size_max=10), msg(), "eoh", None),
    (When(macro=(("{daemon_name}", re_("^in$")),)), msg(), "envfrom", None),  # not sent yet
    (When(macro=(("{daemon_name}", re_("^in$")),)), msg(), "eom", "condition:macro"),
    (When(macro=(("{daemon_name}", re_("^in$")),)), msg(**{"{daemon_name}": "in"}), "eom",
     None),
    (When(key_ran=("av",)), msg(), "eom", "condition:key_ran"),
    (When(unless_key_ran=("av",)), msg(), "eom", None),
])
def test_conditions_are_decided_once_known(
        when: When, message: Message, stage: str, outcome: str | None) -> None:
    assert Conditions(when).failing(stage, message.connection, message) == outcome


def test_size_conditions_read_the_received_body() -> None:
    m = msg()
    m.body.write(b"x" * 100)
    assert Conditions(When(size_max=50)).failing("eom", m.connection, m) == "condition:size_max"
    assert Conditions(When(size_min=50)).failing("eom", m.connection, m) is None


# --------------------------------------------------------------------------------------
# Through the engine (offline) and the daemon
# --------------------------------------------------------------------------------------


def test_a_brain_whose_condition_fails_is_skipped_with_the_reason() -> None:
    config = two_trivials('when.client_not_in = ["127.0.0.0/30"]')
    assert ran(config, client="127.0.0.1") == {
        "always": "ran", "gated": "skipped condition:client_not_in"}
    assert ran(config, client="198.51.100.4") == {"always": "ran", "gated": "ran"}
    result = run_offline(config, MESSAGE, client="127.0.0.2")
    assert result.header("X-Always") is not None and result.header("X-Gated") is None


def test_conditions_make_the_daemon_ask_for_what_they_read() -> None:
    config = two_trivials('when.authenticated = false\n'
                          '        when.macro = { "{daemon_name}" = "^in$" }\n'
                          '        when.size_max = "1M"')
    plan = new_generation(config, build_engine(config), use_noreply=False).plan
    assert "{auth_authen}" in plan.macros["envfrom"]
    for stage in ("connect", "envfrom", "eom"):
        assert "{daemon_name}" in plan.macros[stage]
    assert plan.envelope and plan.body and plan.connect


def test_no_condition_costs_no_negotiation() -> None:
    bare = two_trivials("")
    plan = new_generation(bare, build_engine(bare), use_noreply=True).plan
    assert not (plan.envelope or plan.body or plan.headers or plan.connect)


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
def test_daemon_skips_by_client_address_over_real_sockets(tmp_path: Path, unix: bool) -> None:
    brains = [{"use": "trivial", "name": "always", "header_name": "X-Always"},
              {"use": "trivial", "name": "gated", "header_name": "X-Gated",
               "when": {"client_not_in": ["127.0.0.0/30"]}}]
    with MonkeyProcess(tmp_path, brains, unix=unix) as m:
        m.wait_for_log("is serving")
        spec = MessageSpec(MESSAGE, "<a@example.com>", ["<b@example.org>"])
        inside = run_session(m.address, [spec],
                             connect_info=ConnectInfo(address="127.0.0.1"))[0]
        outside = run_session(m.address, [spec],
                              connect_info=ConnectInfo(address="203.0.113.9"))[0]
        log = m.log_path.read_text()
    assert inside.applied is not None and outside.applied is not None
    assert inside.applied.header_values("X-Gated") == []
    assert outside.applied.header_values("X-Gated") != []
    assert inside.applied.header_values("X-Always") != []
    assert "gated=skipped" in log and "gated=ran" in log
    assert inside.negotiated.protocol & mp.SMFIP_NOCONNECT == 0  # the connect step is sent


# --------------------------------------------------------------------------------------
# Evaluation mode
# --------------------------------------------------------------------------------------


def test_mode_evaluate_and_its_seed_spelling() -> None:
    for spelling in ('mode = "evaluate"', "evaluation = true", "evaluation_mode = true"):
        assert two_trivials(spelling).brain("gated").evaluation
    assert not two_trivials('mode = "enforce"').brain("gated").evaluation
    with pytest.raises(ConfigError) as info:
        two_trivials('mode = "dry-run"')
    assert info.value.key == "mode" and "'enforce', 'evaluate'" in str(info.value)

