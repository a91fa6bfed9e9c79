"""The subject_tag brain, in-process (``run_brains``) and inside a real daemon.

The daemon tests need the package installed (``pip install .``), so the
daemon finds the ``subject_tag`` entry point.
"""

from __future__ import annotations

from typing import Any

import pytest
from miltermonkey_core import Action, Monkey

from miltermonkey_subject_tag import SubjectTagBrain, SubjectTagOptions

OURS = ("example.com", "*.example.com")


def message(subject: str | None = "Quarterly numbers", sender: str = "alice@example.com") -> bytes:
    lines = [f"From: Alice <{sender}>", "To: <bob@example.com>"]
    if subject is not None:
        lines.append(f"Subject: {subject}")
    return ("\r\n".join(lines) + "\r\n\r\nHi Bob.\r\n").encode()


def tag(run_brains: Any, raw: bytes, sender: str, **options: Any) -> Any:
    brain = SubjectTagBrain(SubjectTagOptions(**{"internal_domains": OURS, **options}),
                            Monkey(), "subject_tag")
    return run_brains(brain, raw=raw, sender=f"<{sender}>")


# --- who is outside -----------------------------------------------------------------------


def test_mail_from_outside_is_tagged(run_brains):
    res = tag(run_brains, message(sender="eve@elsewhere.test"), "eve@elsewhere.test")
    assert res.action is Action.ACCEPT
    assert res.header("Subject") == "[EXTERNAL] Quarterly numbers"


@pytest.mark.parametrize("sender", ["alice@example.com", "alice@Mail.Example.COM",
                                    "alice@a.b.example.com"])
def test_mail_from_our_domains_is_left_alone(run_brains, sender):
    res = tag(run_brains, message(sender=sender), sender)
    assert res.header("Subject") == "Quarterly numbers"
    assert res.ctx.edits == []


def test_a_lookalike_domain_is_outside(run_brains):
    res = tag(run_brains, message(sender="eve@notexample.com"), "eve@notexample.com")
    assert res.header("Subject") == "[EXTERNAL] Quarterly numbers"


def test_subdomains_only_with_the_wildcard(run_brains):
    res = tag(run_brains, message(sender="alice@mail.example.com"), "alice@mail.example.com",
              internal_domains=["example.com"])
    assert res.header("Subject") == "[EXTERNAL] Quarterly numbers"


def test_a_forged_internal_from_is_tagged(run_brains):
    raw = message(sender="ceo@example.com")  # From: says the CEO...
    res = tag(run_brains, raw, "eve@elsewhere.test")  # ...the envelope says otherwise
    assert res.header("Subject") == "[EXTERNAL] Quarterly numbers"


def test_an_outside_from_behind_an_internal_envelope_is_tagged(run_brains):
    res = tag(run_brains, message(sender="eve@elsewhere.test"), "alice@example.com")
    assert res.header("Subject") == "[EXTERNAL] Quarterly numbers"


def test_without_check_from_header_the_envelope_decides(run_brains):
    res = tag(run_brains, message(sender="eve@elsewhere.test"), "alice@example.com",
              check_from_header=False)
    assert res.header("Subject") == "Quarterly numbers"


def test_a_bounce_is_judged_on_its_from_header(run_brains):
    ours = tag(run_brains, message(sender="mailer-daemon@mx.example.com"), "")
    assert ours.header("Subject") == "Quarterly numbers"
    theirs = tag(run_brains, message(sender="mailer-daemon@elsewhere.test"), "")
    assert theirs.header("Subject") == "[EXTERNAL] Quarterly numbers"


# --- the subject ----------------------------------------------------------------------------


def test_a_reply_is_not_tagged_twice(run_brains):
    raw = message(subject="Re: [external] Quarterly numbers", sender="eve@elsewhere.test")
    res = tag(run_brains, raw, "eve@elsewhere.test")
    assert res.header("Subject") == "Re: [external] Quarterly numbers"
    assert res.ctx.edits == []


def test_a_missing_subject_becomes_the_tag(run_brains):
    res = tag(run_brains, message(subject=None, sender="eve@elsewhere.test"),
              "eve@elsewhere.test")
    assert res.header("Subject") == "[EXTERNAL]"


def test_an_encoded_subject_keeps_its_encoding(run_brains):
    raw = message(subject="=?utf-8?q?Gr=C3=BC=C3=9Fe?=", sender="eve@elsewhere.test")
    res = tag(run_brains, raw, "eve@elsewhere.test", tag="[EXT]")
    assert res.header("Subject") == "[EXT] =?utf-8?q?Gr=C3=BC=C3=9Fe?="


# --- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "error", "text"), [
    ({"internal_domains": ["exa mple.com"]}, ValueError, "is not a domain"),
    ({"internal_domains": ["alice@example.com"]}, ValueError, "is not a domain"),
    ({"internal_domains": "example.com"}, TypeError, "expected a list of domains"),
    ({"tag": "  "}, ValueError, "must not be empty"),
    ({"tag": "[EXT]\r\nBcc: x"}, ValueError, "one line"),
    ({"check_from_header": "yes"}, TypeError, "expected true or false"),
])
def test_bad_options_are_refused(options, error, text):
    with pytest.raises(error, match=text):
        SubjectTagOptions(**options)


def test_domains_are_normalised():
    options = SubjectTagOptions(internal_domains=["Example.COM.", "example.com", "*.Example.com"])
    assert options.internal_domains == ("example.com", "*.example.com")


# --- through a real daemon ------------------------------------------------------------------


def test_through_a_real_daemon(monkey_daemon, milter_session):
    daemon = monkey_daemon(brains=[{"use": "subject_tag", "tag": "[EXT]",
                                    "internal_domains": ["example.com"]}])
    outside = milter_session(daemon.address, message(sender="eve@elsewhere.test"),
                             "<eve@elsewhere.test>", ["<bob@example.com>"])
    assert outside.accepted
    assert ("Subject", "[EXT] Quarterly numbers") in outside.applied.headers

    inside = milter_session(daemon.address, message(), "<alice@example.com>",
                            ["<bob@example.com>"])
    assert inside.accepted
    assert ("Subject", "Quarterly numbers") in inside.applied.headers
    assert "tagged: from eve@elsewhere.test" in daemon.log()
