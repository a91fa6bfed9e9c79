"""No mutation of a valid milter key header verifies, unless it changes nothing.

A mutation "changes nothing" only when it adds or removes whitespace next to
the ``;`` and ``,`` separators or around the whole value (folding, which the
format ignores by design).  Everything else (byte flips, field edits,
truncation, insertion, reordering, repeated fields, case changes) must leave
the header untrusted.

The same holds for the message under the key: any change to a header that
decides how the body is read (``BOUND_HEADERS``) makes a ``bind=body`` key
untrusted, and changes to other headers, refolding and the case of header
names do not.
"""

from __future__ import annotations

import re
import string

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from miltermonkey_core.contract.model import Message, message_from_bytes
from miltermonkey_core.milterkey import (
    BOUND_HEADERS,
    KeyFields,
    KeyService,
    Reason,
    mime_digest,
    normalize_message_id,
)

NOW = 1_750_000_000
SECRETS = {"k1": bytes(range(32)), "k2": bytes(range(64, 96))}
RAW = (b"Message-ID: <prop@example.org>\nSubject: property\nMIME-Version: 1.0\n"
       b"Content-Type: text/plain; charset=us-ascii\n\nsome body\r\nline two\n")

MESSAGE = message_from_bytes(RAW)
MID = normalize_message_id(MESSAGE.headers)
DIGEST = MESSAGE.body.sha256()
HEADERS = mime_digest(MESSAGE.headers)
assert MID is not None


def _service(binding: str) -> KeyService:
    return KeyService(SECRETS, hostname="mx1.example.org", binding=binding,
                      clock=lambda: NOW, expirations={"long": 900_000})


BODY = _service("body")
NONE = _service("none")
RAN = (("av", "continue"), ("spam", "accept"), ("long", "continue"))


def _valid(svc: KeyService) -> str:
    assert MID is not None
    return svc.format(svc.sign(RAN, MID, DIGEST, HEADERS))


VALID = {"body": _valid(BODY), "none": _valid(NONE)}
SERVICES = {"body": BODY, "none": NONE}

_SEP_WS = re.compile(r"[ \t\r\n]*([;,])[ \t\r\n]*")


def canonical(value: str) -> str:
    """The header with the whitespace the format ignores taken out."""
    return _SEP_WS.sub(r"\1", value.strip(" \t\r\n"))


def trusted(binding: str, value: str) -> bool:
    _, reason = SERVICES[binding].check(value, MID, DIGEST, HEADERS, NOW)
    return reason is None


def test_the_unmutated_keys_verify() -> None:
    for binding, value in VALID.items():
        assert trusted(binding, value)
        assert trusted(binding, value.replace("\n\t", " "))
        assert trusted(binding, canonical(value))


# --- mutations ---------------------------------------------------------------------------

CHARS = string.ascii_letters + string.digits + "-_=;:,. \t\n\r<>@+/" + "\x00\xe9"
bindings = st.sampled_from(["body", "none"])


@st.composite
def byte_flip(draw: st.DrawFn, value: str) -> str:
    i = draw(st.integers(0, len(value) - 1))
    c = draw(st.sampled_from(CHARS))
    return value[:i] + c + value[i + 1 :]


@st.composite
def truncation(draw: st.DrawFn, value: str) -> str:
    start = draw(st.integers(0, len(value)))
    end = draw(st.integers(start, len(value)))
    assume(end - start < len(value))
    return value[start:end]


@st.composite
def deletion(draw: st.DrawFn, value: str) -> str:
    start = draw(st.integers(0, len(value) - 1))
    end = draw(st.integers(start + 1, min(len(value), start + 12)))
    return value[:start] + value[end:]


@st.composite
def insertion(draw: st.DrawFn, value: str) -> str:
    i = draw(st.integers(0, len(value)))
    text = draw(st.text(alphabet=CHARS, min_size=1, max_size=12))
    return value[:i] + text + value[i:]


def _parts(value: str) -> list[str]:
    return re.split(r"[ \t\r\n]*;[ \t\r\n]*", value.strip())


@st.composite
def field_edit(draw: st.DrawFn, value: str) -> str:
    parts = _parts(value)
    i = draw(st.integers(0, len(parts) - 1))
    tag, _, old = parts[i].partition("=")
    new = draw(st.one_of(
        st.text(alphabet=string.ascii_letters + string.digits + "-_.:,", max_size=50),
        st.sampled_from(["1", "2", "k1", "k2", "body", "none", "0", str(NOW), str(NOW + 1),
                         "av:continue", "spam:accept,av:continue,long:continue",
                         "av:continue,spam:accept", "av:continue,spam:continue,long:continue",
                         old.upper(), old.lower(), old + old, old[::-1]]),
    ))
    parts[i] = f"{tag}={new}"
    return "; ".join(parts)


B64URL = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"


def _sibling(c: str) -> str:
    """The base64url digit differing in the lowest bit: the same bytes when it is the
    spare bits of the last digit, unless the MAC is compared as text."""
    return B64URL[B64URL.index(c) ^ 1] if c and c in B64URL else c + "A"


@st.composite
def field_lookalike(draw: st.DrawFn, value: str) -> str:
    """Edits a lenient parser might read as the same field: case, padding, zeros."""
    parts = _parts(value)
    i = draw(st.integers(0, len(parts) - 1))
    tag, _, old = parts[i].partition("=")
    how = draw(st.sampled_from([
        lambda t, v: (t.upper(), v), lambda t, v: (t, v.upper()), lambda t, v: (t, v.lower()),
        lambda t, v: (t, v.swapcase()), lambda t, v: (t, v.capitalize()),
        lambda t, v: (t, "0" + v), lambda t, v: (t, "+" + v), lambda t, v: (t, v + "="),
        lambda t, v: (t, v + "=="), lambda t, v: (t + " ", v), lambda t, v: (t, " " + v),
        lambda t, v: (t, v + " x"), lambda t, v: (t, v + ","), lambda t, v: (t, "," + v),
        lambda t, v: (t, v.replace(",", ", ,")), lambda t, v: (t, v.replace(":", "=")),
        lambda t, v: (t, v.replace("-", "+").replace("_", "/")),
        lambda t, v: (t, v.replace(".", "..")), lambda t, v: (t, v + "."),
        lambda t, v: (t, v[:-1] + _sibling(v[-1:])),
    ]))
    tag, new = how(tag, old)
    parts[i] = f"{tag}={new}"
    return "; ".join(parts)


@st.composite
def reorder(draw: st.DrawFn, value: str) -> str:
    parts = _parts(value)
    return "; ".join(draw(st.permutations(parts)))


@st.composite
def reorder_brains(draw: st.DrawFn, value: str) -> str:
    parts = _parts(value)
    i = next(i for i, p in enumerate(parts) if p.startswith("ran="))
    items = re.split(r"[ \t\r\n]*,[ \t\r\n]*", parts[i][4:])
    parts[i] = "ran=" + ",".join(draw(st.permutations(items)))
    return "; ".join(parts)


@st.composite
def repeat_or_drop_field(draw: st.DrawFn, value: str) -> str:
    parts = _parts(value)
    i = draw(st.integers(0, len(parts) - 1))
    if draw(st.booleans()):
        parts.insert(draw(st.integers(0, len(parts))), parts[i])
    else:
        del parts[i]
    return "; ".join(parts)


@st.composite
def case_change(draw: st.DrawFn, value: str) -> str:
    start = draw(st.integers(0, len(value) - 1))
    end = draw(st.integers(start + 1, len(value)))
    how = draw(st.sampled_from([str.upper, str.lower, str.swapcase]))
    return value[:start] + how(value[start:end]) + value[end:]


@st.composite
def several(draw: st.DrawFn, value: str) -> str:
    for _ in range(draw(st.integers(2, 4))):
        kind = draw(st.sampled_from(SIMPLE))
        value = draw(kind(value))
    return value


SIMPLE = [byte_flip, deletion, insertion, field_edit, field_lookalike, case_change,
          repeat_or_drop_field]
ALL = [*SIMPLE, truncation, reorder, reorder_brains, several]


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, str, str]:
    binding = draw(bindings)
    original = VALID[binding]
    if draw(st.booleans()):  # also mutate the unfolded form
        original = original.replace("\n\t", " ")
    kind = draw(st.sampled_from(ALL))
    return binding, original, draw(kind(original))


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_no_mutation_verifies(case: tuple[str, str, str]) -> None:
    binding, original, value = case
    if canonical(value) == canonical(original):
        assert trusted(binding, value)  # only ignorable whitespace changed
        return
    assert not trusted(binding, value), f"mutated key verified: {value!r}"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=CHARS, max_size=300))
def test_random_text_never_verifies(value: str) -> None:
    assert not trusted("body", value)
    assert not trusted("none", value)


def test_a_key_never_verifies_for_another_message_or_body() -> None:
    for binding, value in VALID.items():
        svc = SERVICES[binding]
        assert svc.check(value, "<other@example.org>", DIGEST, HEADERS, NOW)[1] is not None
        if binding == "body":
            assert svc.check(value, MID, bytes(32), HEADERS, NOW)[1] is not None
            assert svc.check(value, MID, DIGEST, bytes(32), NOW)[1] is not None
        else:
            assert svc.check(value, MID, bytes(32), bytes(32), NOW)[1] is None
        parsed = KeyFields.parse(value)
        assert parsed.binding == binding


# --- the headers that decide how the body is read ----------------------------------------

#: A message with every bound header, folded, duplicated and empty ones included.
BASE_HEADERS: list[tuple[str, str]] = [
    ("Received", "from relay.example by mx.example"),
    ("Message-ID", "<mime@example.org>"),
    ("Subject", "property of the bound headers"),
    ("MIME-Version", "1.0"),
    ("Content-Type", 'multipart/mixed;\r\n\tboundary="=_a  b"'),
    ("Content-Disposition", ""),
    ("X-Other", "kept"),
]
BODY = b"--=_a  b\r\nContent-Type: text/plain\r\n\r\nhello\r\n--=_a  b--\r\n"
UNRELATED = ["Received", "X-Other", "Subject", "Content-Description", "Content-ID",
             "X-Content-Type", "Content-Type-X", "Content-Transfer-Encodings", "MIME"]
VALUES = st.text(alphabet=string.ascii_letters + string.digits + ' "=;/.-_\t', max_size=30)


def render(headers: list[tuple[str, str]], body: bytes = BODY) -> bytes:
    return b"".join(f"{n}: {v}\r\n".encode() for n, v in headers) + b"\r\n" + body


def canonical_value(value: str) -> str:
    """The value as the bound headers' digest reads it: folds out, outer blanks off."""
    return value.replace("\r", "").replace("\n", "").strip(" \t")


def bound_view(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """What the key binds: each bound name's canonical values, in order."""
    return [(b, canonical_value(v)) for b in BOUND_HEADERS for n, v in headers
            if n.lower() == b.lower()]


def _signed(headers: list[tuple[str, str]]) -> tuple[Message, str]:
    message = message_from_bytes(render(headers))
    mid = normalize_message_id(message.headers)
    assert mid is not None
    fields = BODY_SERVICE.sign(RAN, mid, message.body.sha256(), mime_digest(message.headers))
    return message, BODY_SERVICE.format(fields)


BODY_SERVICE = _service("body")


def reason_on(headers: list[tuple[str, str]], key: str, binding: str = "body") -> str | None:
    message = message_from_bytes(render([*headers, ("X-Milter-Key", key)]))
    inspection = SERVICES[binding].inspect(message)
    (check,) = inspection.checks
    return check.reason


@st.composite
def bound_change(draw: st.DrawFn) -> list[tuple[str, str]]:
    """BASE_HEADERS with one bound header added, removed, moved or given a new value."""
    headers = list(BASE_HEADERS)
    name = draw(st.sampled_from(BOUND_HEADERS))
    spelled = draw(st.sampled_from([name, name.lower(), name.upper()]))
    at = [i for i, (n, _) in enumerate(headers) if n.lower() == name.lower()]
    how = draw(st.sampled_from(["add", "drop", "set", "inner", "swap"]))
    if how == "drop" and at:
        del headers[draw(st.sampled_from(at))]
    elif how == "set" and at:
        i = draw(st.sampled_from(at))
        headers[i] = (spelled, draw(VALUES))
    elif how == "inner" and at:  # whitespace inside the value counts (a quoted boundary)
        i = draw(st.sampled_from(at))
        value = headers[i][1]
        headers[i] = (headers[i][0], value.replace("  ", " ") if "  " in value
                      else value.replace(" ", "  ", 1) if " " in value else value + " x")
    elif how == "swap" and at:  # a second copy in front: parsers differ on which wins
        headers.insert(at[0], (spelled, draw(VALUES)))
    else:
        headers.insert(draw(st.integers(0, len(headers))), (spelled, draw(VALUES)))
    return headers


@settings(max_examples=600, deadline=None)
@given(bound_change())
def test_any_change_to_a_bound_header_makes_the_key_untrusted(
        headers: list[tuple[str, str]]) -> None:
    assume(bound_view(headers) != bound_view(BASE_HEADERS))
    _, key = _signed(BASE_HEADERS)
    reason = reason_on(headers, key)
    assert reason is not None and reason.startswith(Reason.WRONG_HEADERS), (headers, reason)
    # a key made for the changed message holds there, and not on the original
    _, other = _signed(headers)
    assert reason_on(headers, other) is None
    assert reason_on(BASE_HEADERS, other) is not None
    # bind=none never looked at them
    loose = NONE.format(NONE.sign(RAN, "<mime@example.org>", None, None))
    assert reason_on(headers, loose, "none") is None


@st.composite
def unrelated_change(draw: st.DrawFn) -> list[tuple[str, str]]:
    """BASE_HEADERS changed in ways that leave the body's meaning alone."""
    headers = list(BASE_HEADERS)
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["add", "edit", "case", "refold", "blanks", "move"]))
        bound_at = [i for i, (n, _) in enumerate(headers)
                    if n.lower() in {b.lower() for b in BOUND_HEADERS}]
        if how == "add":
            headers.insert(draw(st.integers(0, len(headers))),
                           (draw(st.sampled_from(UNRELATED)), draw(VALUES)))
        elif how == "edit":
            i = next(i for i, (n, _) in enumerate(headers) if n == "Subject")
            headers[i] = ("Subject", draw(VALUES))
        elif how == "case":
            i = draw(st.sampled_from(bound_at))
            headers[i] = (draw(st.sampled_from([str.lower, str.upper, str.swapcase]))(
                headers[i][0]), headers[i][1])
        elif how == "refold":  # a line break before existing whitespace is folding
            i = draw(st.sampled_from(bound_at))
            name, value = headers[i]
            spaces = [j for j, c in enumerate(value) if c in " \t" and value[j - 1:j].strip()]
            if spaces:
                j = draw(st.sampled_from(spaces))
                headers[i] = (name, value[:j] + "\r\n" + value[j:])
        elif how == "blanks":
            i = draw(st.sampled_from(bound_at))
            name, value = headers[i]
            headers[i] = (name, draw(st.sampled_from(["", " ", "\t"])) + value
                          + draw(st.sampled_from(["", " ", "\t ", "\r\n "])))
        else:  # bound headers of different names may come in any order
            i = draw(st.sampled_from(bound_at))
            moved = headers.pop(i)
            same = [k for k, (n, _) in enumerate(headers) if n.lower() == moved[0].lower()]
            lo = same[-1] + 1 if same and same[-1] < i else 0
            hi = same[0] if same and same[0] >= i else len(headers)
            headers.insert(draw(st.integers(lo, hi)), moved)
    return headers


@settings(max_examples=600, deadline=None)
@given(unrelated_change())
def test_unrelated_header_changes_keep_the_key(headers: list[tuple[str, str]]) -> None:
    assert bound_view(headers) == bound_view(BASE_HEADERS)
    _, key = _signed(BASE_HEADERS)
    assert reason_on(headers, key) is None, headers
