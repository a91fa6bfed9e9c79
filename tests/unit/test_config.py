"""Configuration loading: every mistake is reported at its file, line and key."""

from __future__ import annotations

import textwrap
import tomllib
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from miltermonkey_core import config as config_layer
from miltermonkey_core import script
from miltermonkey_core.config import (
    ALIASES,
    BrainEntry,
    Config,
    DaemonConfig,
    TomlLocator,
    build_brain_options,
    parse_connection,
    parse_duration,
    to_toml_value,
)
from miltermonkey_core.contract.brain import Brain
from miltermonkey_core.errors import ConfigError
from miltermonkey_core.plugins import installed_brains, load_brain_class

# The configuration layer checks brain names against what it is given; the
# front ends (the CLI, the supervisor) give it what is installed, and so do
# these tests.


def loads(text: str, **kw: Any) -> Config:
    return config_layer.loads(text, installed=installed_brains(), **kw)


def load_config(path: str | Path) -> Config:
    return config_layer.load_config(path, installed=installed_brains())


def load_any(path: str | Path) -> Config:
    return config_layer.load_any(path, installed=installed_brains())


def load_script(path: str | Path) -> Config:
    return config_layer.load_script(path, installed=installed_brains())


def embedded_default() -> Config:
    return config_layer.embedded_default(installed=installed_brains())

# --------------------------------------------------------------------------------------
# A brain installed the way a real one is: a distribution with an entry point.
# --------------------------------------------------------------------------------------

FAKE_BRAIN = '''
import re

import attrs

from miltermonkey_core import Brain, Capability, Needs, hookimpl


def _regex(inst, attr, value):
    try:
        re.compile(value)
    except re.error as e:
        raise ValueError(f"not a regular expression: {e}") from None


@attrs.frozen(kw_only=True)
class ScanOptions:
    OPTION_ALIASES = {"uvscanpath": "scanner_path"}

    relay_mode: bool = False
    scanner_path: str = "/usr/bin/clamdscan"
    minscansize: int = 0
    discard_pattern: str = attrs.field(default="(Klez|SirCam)", validator=_regex)
    ports: list[int] = attrs.field(factory=list)
    level: float = 5.0


class ScanBrain(Brain):
    """Test scanner: refuses mail whose subject says VIRUS, fails on CRASH."""

    Options = ScanOptions
    needs = Needs(actions=frozenset({Capability.ADD_HEADERS}))
    description = "test scanner"

    @hookimpl
    def eom_process(self, message, ctx, monkey):
        subject = message.headers.get("Subject") or ""
        if "CRASH" in subject:
            raise RuntimeError("engine down")
        if "VIRUS" in subject:
            ctx.reject(550, "5.7.1", "virus found")
        else:
            ctx.add_header("X-Scanned", "clean")


@attrs.frozen(kw_only=True)
class NeedyOptions:
    server: str


class NeedyBrain(Brain):
    """Test brain with a required option."""

    Options = NeedyOptions


@attrs.frozen(kw_only=True)
class PatternOptions:
    # re.compile raises re.error, not ValueError, on a bad pattern
    subject: re.Pattern = attrs.field(default="^spam", converter=re.compile)
    limit: int = attrs.field(default=1, validator=attrs.validators.ge(1))


class PatternBrain(Brain):
    """Test brain whose converter raises its own error."""

    Options = PatternOptions
'''


def make_fake_dist(root: Path) -> Path:
    """Write the ``scan`` and ``needy`` brains as an installed distribution under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "mm_cfgtest_brain.py").write_text(FAKE_BRAIN)
    info = root / "mm_cfgtest_brain-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mm-cfgtest-brain\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[miltermonkey.brains]\n"
        "scan = mm_cfgtest_brain:ScanBrain\n"
        "needy = mm_cfgtest_brain:NeedyBrain\n"
        "patterned = mm_cfgtest_brain:PatternBrain\n"
    )
    return root


@pytest.fixture(scope="session")
def fake_dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fake_dist(tmp_path_factory.mktemp("fake_dist"))


@pytest.fixture(autouse=True)
def installed(fake_dist: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(fake_dist))


def scan_brain() -> type:
    return load_brain_class("scan")


def write(tmp_path: Path, text: str, name: str = "mm.toml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text).lstrip("\n"))
    return p


def error_of(path: Path) -> ConfigError:
    """Load ``path`` and check every brain's options, returning the error raised."""
    with pytest.raises(ConfigError) as info:
        config = load_any(path)
        for entry in config.brains:
            build_brain_options(load_brain_class(entry.use), entry, config)
    return info.value


# --------------------------------------------------------------------------------------
# The five mistakes the project must catch precisely.
# --------------------------------------------------------------------------------------

BROKEN = {
    "unknown_daemon_key": (
        """
        [miltermonkey]
        connection = "inet:8890@127.0.0.1"
        thraeds = 4
        """,
        3, "thraeds", "did you mean 'threads'?",
    ),
    "wrong_type": (
        """
        # threads as a word
        [miltermonkey]
        debug_level = 50
        threads = "twenty"
        """,
        4, "threads", "expected an integer, got 'twenty'",
    ),
    "bad_connection": (
        """
        [miltermonkey]
        connection = "tcp:127.0.0.1:8890"
        """,
        2, "connection", "write 'inet:8890@127.0.0.1'",
    ),
    "unknown_brain": (
        """
        [miltermonkey]

        [[brain]]
        use = "trivial"

        [[brain]]
        name = "second"
        use = "scna"
        """,
        8, "use", "installed brains: ",
    ),
    "brain_option_type": (
        """
        [[brain]]
        use = "trivial"

        [[brain]]
        use = "scan"
        minscansize = 100
        relay_mode = "no"
        """,
        7, "relay_mode", "expected true or false, got 'no'",
    ),
    "unknown_brain_option": (
        """
        [[brain]]
        use = "scan"
        relay_mode = true
        uvscanpth = "/usr/av/bin/uvscan"
        """,
        4, "uvscanpth", "did you mean 'uvscanpath'?",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_config_is_located(tmp_path: Path, case: str) -> None:
    text, line, key, fragment = BROKEN[case]
    path = write(tmp_path, text)
    err = error_of(path)
    assert (err.path, err.line, err.key) == (str(path), line, key)
    assert fragment in err.message
    assert str(err).startswith(f"{path}:{line}: {key}: ")


def test_unknown_brain_lists_installed_ones(tmp_path: Path) -> None:
    err = error_of(write(tmp_path, BROKEN["unknown_brain"][0]))
    assert "trivial" in err.message and "scan" in err.message
    assert "did you mean 'scan'?" in err.message


def test_unknown_brain_without_close_match_says_how_to_install(tmp_path: Path) -> None:
    err = error_of(write(tmp_path, '[[brain]]\nuse = "clamav-deluxe"\n'))
    assert "pip install" in err.message and err.line == 2


# --------------------------------------------------------------------------------------
# More mistakes, each located.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "key", "fragment"),
    [
        ("[miltermonkey]\nthreads = 0\n", 2, "threads", "between 1 and 10000, got 0"),
        ("[miltermonkey]\ndebug_level = 120\n", 2, "debug_level", "between 0 and 99"),
        ("[miltermonkey]\nthreads = \"20\"\n", 2, "threads", "without quotes"),
        ("[miltermonkey]\nmilter_key = \"yes\"\n", 2, "milter_key", "true or false"),
        ("[miltermonkey]\non_error = \"tempfial\"\n", 2, "on_error", "did you mean 'tempfail'"),
        ("[miltermonkey]\nsocket_mode = 660\n", 2, "socket_mode", '"0660"'),
        ("[miltermonkey]\ndefaultexpiration = \"5 days\"\n", 2, "defaultexpiration", '"5d"'),
        ("[miltermonkey]\nmilterkeyheader = \"X Key\"\n", 2, "milterkeyheader", "header name"),
        ("[miltermonkey]\nnotify_smtp = \"localhost\"\n", 2, "notify_smtp", "host:port"),
        ("[miltermonkey]\nlog_target = \"var/log/mm\"\n", 2, "log_target", "absolute"),
        ("[miltermonkey]\nconnection = \"8890\"\n", 2, "connection", "inet:8890@127.0.0.1"),
        ("[miltermonkey]\nconnection = \"inet:99999@localhost\"\n", 2, "connection", "65535"),
        ("[miltermonkey]\nconnection = \"unix:run/mm.sock\"\n", 2, "connection", "absolute"),
        ("[miltermonkey]\nmilter_name = \"a\"\nmiltername = \"b\"\n", 3, "miltername",
         "given twice (first as 'milter_name' at line 2)"),
        ("[miltermonkey]\n[miltermonkey.extra]\nx = 1\n", 2, "extra", "unknown key"),
        ("threads = 4\n", 1, "threads", "go in the [miltermonkey] table"),
        ("[daemon]\nthreads = 4\n", 1, "daemon", "[miltermonkey] table and [[brain]]"),
        ("[brians]\n", 1, "brians", "did you mean 'brain'?"),
        ("[brain]\nuse = \"trivial\"\n", 1, "brain", "write [[brain]]"),
        ("[[brain]]\nname = \"x\"\n", 1, "use", 'needs use = "<brain>"'),
        ("[[brain]]\nuse = 7\n", 2, "use", "expected a string"),
        ("[[brain]]\nuse = \"trivial\"\non_error = \"drop\"\n", 3, "on_error", "one of"),
        ("[[brain]]\nuse = \"trivial\"\ntimeout = -1\n", 3, "timeout", "at least"),
        ("[[brain]]\nuse = \"trivial\"\nname = \"a b\"\n", 3, "name", "letters, digits"),
        ("[[brain]]\nuse = \"trivial\"\n\n[[brain]]\nuse = \"trivial\"\n", 5, "use",
         "already used by the [[brain]] at line 1"),
        ("[[brain]]\nuse = \"trivial\"\nevaluation = true\nevaluation_mode = false\n", 4,
         "evaluation_mode", "given twice"),
    ],
)
def test_more_mistakes(tmp_path: Path, text: str, line: int, key: str, fragment: str) -> None:
    path = write(tmp_path, text)
    err = error_of(path)
    assert (err.line, err.key) == (line, key), str(err)
    assert fragment in err.message, str(err)


def test_toml_syntax_error_has_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[miltermonkey]\nthreads = 4\nconnection = "inet:1@x\n')
    err = error_of(path)
    assert err.line == 3 and err.key is None
    assert "TOML syntax error" in err.message


def test_unreadable_and_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match=r"use a \.toml file or a \.py start script"):
        load_any(tmp_path / "mm.conf")
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b"# caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad)


@pytest.mark.parametrize(
    ("option", "value", "fragment"),
    [
        ("minscansize", '"50k"', "expected an integer, got '50k'"),
        ("level", "true", "expected a number, got true"),
        ("ports", "[25, \"smtp\"]", "in the list: expected an integer, got 'smtp'"),
        ("ports", "25", "expected a list"),
        ("discard_pattern", '"(Klez"', "not a regular expression"),
        ("scanner_path", "[1]", "expected a string"),
    ],
)
def test_brain_option_checks(tmp_path: Path, option: str, value: str, fragment: str) -> None:
    path = write(tmp_path, f'[[brain]]\nuse = "scan"\nname = "av"\n\n{option} = {value}\n')
    err = error_of(path)
    assert (err.line, err.key) == (5, option), str(err)
    assert fragment in err.message
    assert "[[brain]] 'av' (scan)" in err.message


def test_required_brain_option(tmp_path: Path) -> None:
    err = error_of(write(tmp_path, '[[brain]]\nuse = "needy"\n'))
    assert (err.line, err.key) == (1, "server")
    assert "needs option 'server'" in err.message


def test_brain_without_options_refuses_some(tmp_path: Path) -> None:
    entry = BrainEntry(use="plain", name="plain", options={"x": 1}, option_lines={"x": 4},
                       line=3, path="p.toml")
    with pytest.raises(ConfigError, match="takes no options") as info:
        build_brain_options(Brain, entry)
    assert info.value.line == 4


# --------------------------------------------------------------------------------------
# What loads.
# --------------------------------------------------------------------------------------


def test_defaults_are_the_seed_ones() -> None:
    d = DaemonConfig()
    assert d.cid_timeout == 600 and d.threads == 20 and d.jobsperthread == 200
    assert d.milter_key is True and d.milterkeyheader == "X-Milter-Key"
    assert d.miltersecretfile == "/etc/mail/miltersecret" and d.miltername == "MilterMonkey"
    assert d.pidfile is None  # the seed's /tmp/monkey.pid is unsafe
    assert d.defaultexpiration == 5 * 86400


def test_every_seed_daemon_option_exists() -> None:
    names = {f.name for f in attrs.fields(DaemonConfig)}
    seed = {"connection", "cid_timeout", "debug_level", "debug_mode", "defaultexpiration",
            "milter_key", "milterkeyheader", "miltersecretfile", "pidfile", "miltername",
            "threads", "jobsperthread", "alternate_key_header"}
    assert seed <= names
    assert set(ALIASES.values()) <= names


def test_aliases_and_normalisation(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [miltermonkey]
        socket = "inet:127.0.0.1:6609"   # Postfix spelling
        milter_name = "Monkey2"
        sendmailpath = "/usr/lib/sendmail"
        jobs_per_thread = 50
        alternate_key_header = "X-Relay-Key"
        milter_key = 0                   # the seed's "1 or 0"
        socket_mode = 0o600
        spool_threshold = "2M"
        pidfile = ""

        [[brain]]
        use = "scan"
        uvscanpath = "/usr/av/bin/uvscan"
        evaluation_mode = true
        """)
    config = load_config(path)
    d = config.daemon
    assert d.connection == "inet:6609@127.0.0.1"
    assert (d.miltername, d.sendmail_path, d.jobsperthread) == ("Monkey2", "/usr/lib/sendmail", 50)
    assert d.alternate_key_header == ("X-Relay-Key",)
    assert d.milter_key is False and d.socket_mode == "0600" and d.pidfile is None
    assert d.spool_threshold == 2 * 1024 * 1024
    entry = config.brains[0]
    assert entry.evaluation is True
    opts = build_brain_options(scan_brain(), entry, config)
    assert opts.scanner_path == "/usr/av/bin/uvscan"
    assert config.error("oops", key="milter_name").line == 3


def test_brain_common_keys(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [miltermonkey]
        on_error = "accept"

        [[brain]]
        use = "trivial"

        [[brain]]
        use = "scan"
        name = "av-outbound"
        on_error = "tempfail"
        timeout = "2m"
        skip_if_key = true
        expiration = "1d"
        relay_mode = true
        ports = [25, 587]
        """)
    config = load_config(path)
    trivial, av = config.brains
    # unset: resolved when the chain is built (brain class default, then the daemon's)
    assert trivial.on_error is None and trivial.timeout == 60.0 and trivial.line == 4
    assert (av.name, av.on_error, av.timeout, av.skip_if_key, av.expiration) == (
        "av-outbound", "tempfail", 120.0, True, 86400)
    assert av.options == {"relay_mode": True, "ports": [25, 587]}
    assert av.line == 7 and av.option_lines["ports"] == 15
    opts = build_brain_options(scan_brain(), av, config)
    assert opts.relay_mode is True and opts.ports == [25, 587]
    assert config.brain("av-outbound") is av


def test_unset_on_error_falls_back_to_brain_default_then_daemon(tmp_path: Path) -> None:
    from miltermonkey_core.brains.trivial import TrivialBrain
    from miltermonkey_core.contract.monkey import Monkey
    from miltermonkey_core.engine.build import build_chain

    path = write(tmp_path, """
        [miltermonkey]
        on_error = "accept"

        [[brain]]
        use = "trivial"
        name = "t1"

        [[brain]]
        use = "trivial"
        name = "t2"
        on_error = "reject"
        """)
    config = load_config(path)
    chain = build_chain(config, Monkey())
    assert [s.on_error for s in chain.slots] == ["accept", "reject"]
    TrivialBrain.default_on_error = "tag"
    try:
        chain = build_chain(config, Monkey())
        assert [s.on_error for s in chain.slots] == ["tag", "reject"]
    finally:
        TrivialBrain.default_on_error = None


@pytest.mark.parametrize(
    ("text", "seconds"),
    [(432000, 432000.0), ("5d", 432000.0), ("12h", 43200.0), ("30m", 1800.0), ("90s", 90.0),
     ("1h30m", 5400.0), ("2w", 1209600.0), ("3600", 3600.0), (1.5, 1.5), (" 1d 12h ", 129600.0)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["5 days", "d", "", "-5m", True, [1]])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


def test_whole_seconds_and_floats(tmp_path: Path) -> None:
    config = loads('[miltermonkey]\ndefaultexpiration = "12h"\neom_timeout = "4m"\n'
                   'progress_interval = 2.5\ncid_timeout = 60\n')
    assert config.daemon.defaultexpiration == 43200
    assert config.daemon.eom_timeout == 240.0 and config.daemon.progress_interval == 2.5
    with pytest.raises(ConfigError, match="whole seconds"):
        loads('[miltermonkey]\ncid_timeout = "1.5s"\n')


@pytest.mark.parametrize(
    ("spec", "family", "host", "port", "canonical"),
    [
        ("inet:8890@127.0.0.1", "inet", "127.0.0.1", 8890, "inet:8890@127.0.0.1"),
        ("inet:6609", "inet", None, 6609, "inet:6609"),
        ("inet:localhost:10025", "inet", "localhost", 10025, "inet:10025@localhost"),
        ("inet6:8890@::1", "inet6", "::1", 8890, "inet6:8890@::1"),
        ("inet:[::1]:8890", "inet6", "::1", 8890, "inet6:8890@::1"),
        ("INET:8890@[::1]", "inet6", "::1", 8890, "inet6:8890@::1"),
        ("unix:/run/mm/mm.sock", "unix", None, None, "unix:/run/mm/mm.sock"),
        ("local:/run/mm.sock", "unix", None, None, "unix:/run/mm.sock"),
    ],
)
def test_connection_forms(spec: str, family: str, host: str | None, port: int | None,
                          canonical: str) -> None:
    ep = parse_connection(spec)
    assert (ep.family, ep.host, ep.port, ep.spec) == (family, host, port, canonical)


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("tcp:127.0.0.1:8890", "'tcp' is not a milter socket type (write 'inet:8890@127.0.0.1')"),
        ("tcp:8890", "write 'inet:8890'"),
        ("inet:abc@host", "port 'abc'"),
        ("inet:::1:25", "ambiguous IPv6"),
        ("unx:/x", "did you mean 'unix'?"),
        ("/run/mm.sock", "write 'unix:/run/mm.sock'"),
        ("inet:25@bad host", "bad host"),
    ],
)
def test_bad_connections(spec: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_connection(spec)
    assert fragment in str(info.value)


def test_direct_construction_is_checked_too() -> None:
    assert DaemonConfig(threads=5, connection="inet:localhost:1").connection == "inet:1@localhost"
    with pytest.raises(ValueError, match="between 1 and"):
        DaemonConfig(threads=0)


def test_embedded_default_works_out_of_the_box() -> None:
    config = embedded_default()
    assert config.source == "embedded"
    assert config.daemon.connection == "inet:8890@127.0.0.1"
    assert config.daemon.milter_key is False
    assert [b.use for b in config.brains] == ["trivial"]
    text = Path(config.path or "").read_text()
    assert "miltermonkey key generate" in text and 'use = "av"' in text and 'use = "spam"' in text


# --------------------------------------------------------------------------------------
# show-config: the effective config as TOML, read back identically.
# --------------------------------------------------------------------------------------

FULL = """
[miltermonkey]
connection = "unix:/run/miltermonkey/mm.sock"
socket_group = "postfix"
debug_level = 55
alternate_key_header = ["X-Relay-Key", "X-Old-Key"]
hostname = "mx1.example.test"
notify_smtp = "[::1]:25"
miltername = "Monkey \\"quoted\\" \\u00e9"

[[brain]]
use = "trivial"
header_value = "line\\twith tab"

[[brain]]
use = "scan"
name = "av"
expiration = 3600
ports = [25]
discard_pattern = "(Klez|\\\\d+)"
"""


def test_show_config_round_trips() -> None:
    config = loads(FULL, path="full.toml")
    text = config.to_toml()
    tomllib.loads(text)
    again = loads(text, path="full.toml")
    assert again.daemon == config.daemon
    assert again.brains == config.brains
    assert again.to_toml() == text


def test_show_config_with_brain_defaults() -> None:
    config = loads(FULL, path="full.toml")
    built = {e.name: build_brain_options(load_brain_class(e.use), e, config)
             for e in config.brains}
    text = config.to_toml(built)
    assert 'header_name = "X-MilterMonkey"' in text  # trivial's default, not in FULL
    assert "relay_mode = false" in text and "level = 5.0" in text
    assert '# pidfile = ""' in text  # unset options stay visible, commented
    again = loads(text)
    built_again = {e.name: build_brain_options(load_brain_class(e.use), e, again)
                   for e in again.brains}
    assert built_again == built
    assert again.to_toml(built_again).splitlines()[2:] == text.splitlines()[2:]


def test_every_daemon_option_is_shown() -> None:
    text = Config().to_toml()
    for field in attrs.fields(DaemonConfig):
        assert f"{field.name} =" in text


@pytest.mark.parametrize(
    "value",
    ["plain", 'quo"te', "back\\slash", "new\nline", "del\x7f", "tab\t", "é ü", 0, -3, 2.5,
     True, [], ["a", 1], {"a": 1, "b c": [True]}],
)
def test_toml_values_read_back(value: object) -> None:
    assert tomllib.loads(f"v = {to_toml_value(value)}")["v"] == value


def test_toml_value_refuses_objects() -> None:
    with pytest.raises(TypeError):
        to_toml_value(object())


# --------------------------------------------------------------------------------------
# The line locator.
# --------------------------------------------------------------------------------------

LOCATOR_TEXT = '''\
# comment with key = value and [table]
top = 1
[miltermonkey]
"quoted key" = 2
dotted.key = 3
multi = """
fake = 4
[not_a_table]
"""
arr = [
  "x = 5",  # [[brain]]
  'y',
]
literal = \'\'\'
[[brain]]
\'\'\'
inline = { a = 1, b = "}" }

[[brain]]
use = "a"   # trailing = comment

[[brain]]
 use = "b"
[brain.sub]
deep = 1
[[brain]]
use = "c"
'''


def test_locator_finds_keys_and_tables() -> None:
    tomllib.loads(LOCATOR_TEXT)
    loc = TomlLocator(LOCATOR_TEXT)
    assert loc.key_line((), "top") == 2
    assert loc.table_line(("miltermonkey",)) == 3
    assert loc.key_line(("miltermonkey",), "quoted key") == 4
    assert loc.key_line(("miltermonkey",), "dotted") == 5
    assert loc.key_line(("miltermonkey", "dotted"), "key") == 5
    assert loc.key_line(("miltermonkey",), "multi") == 6
    assert loc.key_line(("miltermonkey",), "fake") is None
    assert loc.table_line(("not_a_table",)) is None
    assert loc.key_line(("miltermonkey",), "arr") == 10
    assert loc.key_line(("miltermonkey",), "literal") == 14
    assert loc.key_line(("miltermonkey",), "inline") == 17
    assert [loc.table_line(("brain", i)) for i in range(4)] == [19, 22, 26, None]
    assert [loc.key_line(("brain", i), "use") for i in range(3)] == [20, 23, 27]
    assert loc.key_line(("brain", 1), "sub") == 24
    assert loc.key_line(("brain", 1, "sub"), "deep") == 25
    assert loc.key_line((), "brain") == 19


_keys = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)
_values = st.recursive(
    st.text(max_size=12) | st.integers() | st.booleans(),
    lambda inner: st.lists(inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=60, deadline=None)
@given(tables=st.lists(st.dictionaries(_keys, _values, min_size=1, max_size=4),
                       min_size=1, max_size=4),
       spread=st.booleans())
def test_locator_agrees_with_what_was_written(tables: list[dict[str, object]],
                                              spread: bool) -> None:
    lines: list[str] = []
    expected: dict[tuple[int, str], int] = {}
    for i, table in enumerate(tables):
        lines.append("[[brain]]")
        for key, value in table.items():
            literal = to_toml_value(value)
            if spread and literal.startswith("["):
                literal = literal.replace(", ", ",\n  # ] = [\n  ")
            expected[(i, key)] = len(lines) + 1
            lines.extend(f"{key} = {literal}".split("\n"))
    text = "\n".join(lines) + "\n"
    assert tomllib.loads(text)["brain"] == tables
    loc = TomlLocator(text)
    for (i, key), line in expected.items():
        assert loc.key_line(("brain", i), key) == line


# --------------------------------------------------------------------------------------
# The seed's way: a start script.
# --------------------------------------------------------------------------------------

SCRIPT = """\
#!/usr/bin/env python3
from miltermonkey_core.script import brain, monkey, spank

monkey(connection="inet:6609@127.0.0.1", debug_level=50)
# Use your monkey brains in the order you wish them to be executed.
brain("scan", relay_mode=False, uvscanpath="/usr/av/bin/uvscan")
brain("trivial", on_error="accept")
# Spank your monkey
spank()
raise SystemExit("not reached when loaded")
"""


def test_script_config(tmp_path: Path) -> None:
    path = tmp_path / "monkey.py"
    path.write_text(SCRIPT)
    config = load_any(path)
    assert config.source == "script" and config.path == str(path)
    assert config.daemon.connection == "inet:6609@127.0.0.1" and config.daemon.debug_level == 50
    assert [(b.use, b.on_error) for b in config.brains] == [("scan", None),
                                                             ("trivial", "accept")]
    scan = config.brains[0]
    assert scan.line == 6
    opts = build_brain_options(scan_brain(), scan, config)
    assert opts.scanner_path == "/usr/av/bin/uvscan" and opts.relay_mode is False
    # the same TOML comes out as from the equivalent file
    assert loads(config.to_toml()).brains == config.brains


@pytest.mark.parametrize(
    ("body", "line", "key", "fragment"),
    [
        ('monkey(thraeds=4)\n', 3, "thraeds", "did you mean 'threads'?"),
        ('monkey()\nbrain("trivial")\nbrain("nope")\n', 5, "use", "installed brains"),
        ('brain("scan",\n      relay_mode="no")\n', 3, "relay_mode", "true or false"),
        ('x = undefined_name\n', 3, None, "NameError"),
        ('brain("trivial"\n', 3, None, "syntax error"),
    ],
)
def test_script_errors_point_at_the_call(tmp_path: Path, body: str, line: int,
                                         key: str | None, fragment: str) -> None:
    path = tmp_path / "monkey.py"
    path.write_text("from miltermonkey_core.script import monkey, brain, spank\n\n"
                    + body + "spank()\n")
    err = error_of(path)
    assert (err.path, err.line, err.key) == (str(path), line, key), str(err)
    assert fragment in err.message


def test_script_without_spank_and_isolation(tmp_path: Path) -> None:
    path = tmp_path / "monkey.py"
    path.write_text('from miltermonkey_core.script import brain\nbrain("trivial")\n')
    assert [b.use for b in load_script(path).brains] == ["trivial"]
    # loading recorded nothing in the process-wide builder
    assert script.collect().brains == ()


def test_spank_when_run_directly_reports_without_traceback(
        monkeypatch: pytest.MonkeyPatch) -> None:
    script.reset()
    try:
        script.monkey(threads="many")
        with pytest.raises(SystemExit) as info:
            script.spank()
        assert str(info.value.code).startswith("miltermonkey: ")
        assert ": threads: expected an integer" in str(info.value.code)
    finally:
        script.reset()


def test_spank_runs_the_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[Config] = []
    monkeypatch.setattr(script, "run", lambda config: ran.append(config) or 0)
    script.reset()
    try:
        script.brain("trivial")
        script.spank()
    finally:
        script.reset()
    assert [b.use for b in ran[0].brains] == ["trivial"]

