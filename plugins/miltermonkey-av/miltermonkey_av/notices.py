"""Notices in notify mode: the text that replaces an infected message, and the
mail to its sender.

Templates are plain files the admin can edit (``recipient_notice.txt`` and
``sender_notice.txt``; the shipped ones are in ``miltermonkey_av/templates``).
Format: a ``Subject:`` line, a blank line, then the body.  They are
:class:`string.Template` texts with these placeholders::

    $virus $sender $recipients $subject $queue_id $message_id
    $who $domainname $helpaddr $hostname $date

Unknown placeholders are refused when the brain starts, not when the first
virus arrives.

Everything substituted comes from the mail (a subject, a sender) or the
engine, so it is hostile: every value is flattened to one line of printable
text before it goes anywhere, and headers are built with :mod:`email` and
its ``SMTP`` policy, which encodes non-ASCII text as RFC 2047 words and
refuses line breaks; a subject like ``"hi\\r\\nBcc: victim@x"`` cannot add a
header to a notice.
"""

from __future__ import annotations

import contextlib
import email.errors
import email.header
import email.utils
import re
import string
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from importlib import resources
from pathlib import Path

import attrs

RECIPIENT_NOTICE = "recipient_notice.txt"
SENDER_NOTICE = "sender_notice.txt"
TEMPLATE_FILES = (RECIPIENT_NOTICE, SENDER_NOTICE)

PLACEHOLDERS = frozenset({
    "virus", "sender", "recipients", "subject", "queue_id", "message_id",
    "who", "domainname", "helpaddr", "hostname", "date",
})

#: C0/C1 controls and Unicode line/paragraph separators: anything that could
#: end a header line in some parser.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_POLICY = policy.SMTP.clone(max_line_length=78)


class TemplateError(ValueError):
    """A notice template is malformed or names an unknown placeholder."""


def one_line(value: str, limit: int = 200) -> str:
    """Flatten untrusted text to one printable line of at most ``limit`` characters.

    Lone surrogates (8-bit header bytes decoded with surrogateescape) become
    U+FFFD so the text can be encoded at all.
    """
    value = _SURROGATE.sub("\ufffd", value)
    value = " ".join(_CONTROL.sub(" ", value).split())
    if len(value) > limit:
        value = value[: limit - 3].rstrip() + "..."
    return value


def decode_subject(raw: str | None) -> str:
    """The human text of a Subject header: RFC 2047 words decoded, 8-bit bytes guessed.

    Header values arrive decoded with surrogateescape; bytes that were not
    UTF-8 are taken as Latin-1, the usual culprit.
    """
    if not raw:
        return ""
    data = raw.encode("utf-8", "surrogateescape")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    with contextlib.suppress(ValueError, LookupError, UnicodeError,
                             email.errors.HeaderParseError):
        text = str(email.header.make_header(email.header.decode_header(text)))
    return one_line(text)


def encode_header_value(name: str, text: str) -> str:
    """A header value safe to hand to the MTA: one line, RFC 2047 if not ASCII, folded.

    Returns what follows ``Name: ``, with folds as ``\\r\\n `` (the milter
    core turns them into the MTA's form).
    """
    # policy.fold() leaves short values alone (raw UTF-8 included); the header
    # object always encodes non-ASCII text as RFC 2047 words.
    header = _POLICY.header_factory(name, one_line(text, 900))
    folded: str = header.fold(policy=_POLICY)
    return folded.split(":", 1)[1].strip(" ").rstrip("\r\n")


@attrs.frozen
class NoticeTemplate:
    """A parsed template: a subject and a body, both :class:`string.Template`."""

    subject: string.Template
    body: string.Template
    source: str

    @classmethod
    def parse(cls, text: str, source: str) -> NoticeTemplate:
        text = text.replace("\r\n", "\n")
        head, sep, body = text.partition("\n\n")
        if not sep:
            raise TemplateError(f"{source}: expected a 'Subject:' line, a blank line, then "
                                "the body")
        subject: str | None = None
        for line in head.split("\n"):
            name, colon, value = line.partition(":")
            if not colon or name.strip().lower() != "subject":
                raise TemplateError(f"{source}: only a 'Subject:' line may precede the blank "
                                    f"line, found {line!r}")
            subject = value.strip()
        if subject is None:
            raise TemplateError(f"{source}: no Subject: line")
        tpl = cls(string.Template(subject), string.Template(body), source)
        for part in (tpl.subject, tpl.body):
            if not part.is_valid():
                raise TemplateError(f"{source}: invalid placeholder (write $$ for a "
                                    "literal $)")
            unknown = set(part.get_identifiers()) - PLACEHOLDERS
            if unknown:
                names = ", ".join("$" + u for u in sorted(unknown))
                known = ", ".join("$" + p for p in sorted(PLACEHOLDERS))
                raise TemplateError(f"{source}: unknown placeholder(s) {names}; known: {known}")
        return tpl

    def render(self, values: Mapping[str, str]) -> tuple[str, str]:
        """(subject, body) with every value flattened to one safe line."""
        safe = {k: one_line(v) for k, v in values.items()}
        subject = one_line(self.subject.substitute(safe), 900)
        body = self.body.substitute(safe)
        return subject, body


def load_templates(directory: str | None) -> dict[str, NoticeTemplate]:
    """The two templates: from ``directory`` where present, else the shipped defaults."""
    out: dict[str, NoticeTemplate] = {}
    shipped = resources.files("miltermonkey_av") / "templates"
    for name in TEMPLATE_FILES:
        path = Path(directory) / name if directory else None
        if path is not None and path.exists():
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise TemplateError(f"{path}: cannot read: {e}") from e
            out[name] = NoticeTemplate.parse(text, str(path))
        else:
            out[name] = NoticeTemplate.parse((shipped / name).read_text(encoding="utf-8"),
                                             f"(shipped) {name}")
    return out


def now_rfc5322() -> str:
    return email.utils.format_datetime(datetime.now(UTC))


@attrs.frozen
class TextPart:
    """A text/plain body ready to replace a message body: its MIME headers and bytes."""

    content_type: str
    transfer_encoding: str
    body: bytes


def text_part(body: str) -> TextPart:
    """Encode a notice body: 7bit when ASCII, quoted-printable UTF-8 otherwise; CRLF lines."""
    m = EmailMessage(policy=_POLICY)
    ascii_only = body.isascii()
    m.set_content(body, charset="us-ascii" if ascii_only else "utf-8",
                  cte="7bit" if ascii_only else "quoted-printable")
    payload = m.get_payload()
    assert isinstance(payload, str)
    data = re.sub(r"\r?\n", "\r\n", payload).encode("ascii")
    return TextPart(str(m["Content-Type"]), str(m["Content-Transfer-Encoding"]), data)


def parse_address(addr: str) -> Address | None:
    """A bare envelope address as a header-safe :class:`Address`, or None if unusable."""
    bare = addr.strip().removeprefix("<").removesuffix(">").strip()
    if not bare or _CONTROL.search(bare) or "@" not in bare:
        return None
    try:
        return Address(addr_spec=bare)
    except (ValueError, IndexError, email.errors.HeaderParseError):
        return None


def build_sender_notice(
    *,
    template: NoticeTemplate,
    values: Mapping[str, str],
    to: Address,
    from_name: str,
    from_addr: str,
    hostname: str,
    in_reply_to: str | None,
) -> bytes:
    """The complete notice to the sender, as bytes for the MTA.

    ``Auto-Submitted: auto-replied`` (RFC 3834) keeps well-behaved
    responders from answering it; the envelope sender is chosen by the
    caller (the null sender by default, so it never bounces).
    """
    subject, body = template.render(values)
    m = EmailMessage(policy=_POLICY)
    sender = parse_address(from_addr)
    m["From"] = Address(display_name=one_line(from_name, 100),
                        addr_spec=sender.addr_spec) if sender else one_line(from_addr)
    m["To"] = to
    m["Subject"] = subject
    m["Date"] = now_rfc5322()
    m["Message-ID"] = email.utils.make_msgid("mmav", domain=one_line(hostname, 200) or None)
    m["Auto-Submitted"] = "auto-replied"
    msgid = one_line(in_reply_to or "", 500)
    if re.fullmatch(r"<[^<>\s]+@[^<>\s]+>", msgid):
        m["In-Reply-To"] = msgid
        m["References"] = msgid
    m.set_content(body, charset="us-ascii" if body.isascii() else "utf-8",
                  cte="7bit" if body.isascii() else "quoted-printable")
    return m.as_bytes(policy=_POLICY)


def notice_values(
    *,
    virus: str,
    sender: str,
    recipients: Sequence[str],
    subject: str | None,
    queue_id: str,
    message_id: str | None,
    who: str,
    domainname: str,
    helpaddr: str,
    hostname: str,
) -> dict[str, str]:
    """The placeholder values for one infected message (flattened when rendered)."""
    return {
        "virus": virus,
        "sender": sender.strip().removeprefix("<").removesuffix(">") or "<>",
        "recipients": ", ".join(r.strip().removeprefix("<").removesuffix(">")
                                for r in recipients),
        "subject": decode_subject(subject) or "(no subject)",
        "queue_id": queue_id,
        "message_id": message_id or "",
        "who": who,
        "domainname": domainname,
        "helpaddr": helpaddr,
        "hostname": hostname,
        "date": now_rfc5322(),
    }
