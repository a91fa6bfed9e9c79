"""SMTP replies built from untrusted text stay one well-formed reply."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from miltermonkey_core.contract.verdict import MAX_REPLY_LINE, Reply, Verdict
from miltermonkey_core.errors import ReplyError


def test_percent_doubled_and_crlf_removed() -> None:
    r = Reply.build(550, "5.7.1", "virus 100% Eicar\r\n250 OK")
    assert r.lines == ("virus 100%% Eicar  250 OK",)
    assert r.text == "virus 100% Eicar  250 OK"


@pytest.mark.parametrize(("code", "xcode"), [(250, "2.0.0"), (550, "4.7.1"), (451, "5.7.1"),
                                             (550, "5.7"), (600, "5.0.0")])
def test_bad_codes_refused(code: int, xcode: str) -> None:
    with pytest.raises(ReplyError):
        Reply.build(code, xcode, "x")


def test_disposition_must_match_code() -> None:
    with pytest.raises(ReplyError):
        Verdict.reject(451)
    with pytest.raises(ReplyError):
        Verdict.tempfail(550)


@given(st.text())
def test_any_text_gives_safe_lines(text: str) -> None:
    r = Reply.build(554, "5.7.1", text)
    for line in r.lines:
        assert "\r" not in line and "\n" not in line and "\x00" not in line
        assert len(line) <= MAX_REPLY_LINE
        # every % is part of a doubled pair
        assert line.replace("%%", "").count("%") == 0
    assert 1 <= len(r.lines) <= 32
