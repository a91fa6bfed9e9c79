"""The X-Spam-* header values, in SpamAssassin's own format plus the seed's ``rating=``.

Kept apart from the brain so the formats are plain functions with plain
tests: downstream filters (procmail, sieve, Dovecot's spamtest, rspamd's
``remove_upstream_spam_flag``) parse these strings, so they must not drift.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

#: The headers SpamAssassin writes, in the order it writes them.
CHECKER_VERSION = "X-Spam-Checker-Version"
FLAG = "X-Spam-Flag"
LEVEL = "X-Spam-Level"
STATUS = "X-Spam-Status"
REPORT = "X-Spam-Report"

#: SpamAssassin caps X-Spam-Level at 50 stars (``_STARS_`` in PerMsgStatus.pm).
MAX_STARS = 50
#: Where SpamAssassin folds its headers; kept so ours look the same.
FOLD_WIDTH = 78


def rating(score: float, ladder: Sequence[float]) -> str:
    """The seed's ``generate_rating``: one ``S`` for every rung of the ladder reached.

    With the default ladder ``(5, 10, 15, 20, 30)`` a score of 12 gives
    ``SS`` and GTUBE's 1000 gives ``SSSSS``; below the first rung the rating
    is empty.  Procmail rules such as ``^X-Spam-Status:.*rating=SSS`` then
    keep working when the admin retunes the ladder to a new SpamAssassin.
    """
    return "S" * sum(1 for rung in ladder if score >= rung)


def stars(score: float, char: str = "*") -> str:
    """X-Spam-Level: one character per whole point, none below 1, at most 50."""
    return char * max(0, min(MAX_STARS, int(score)))


def fold(value: str, first_line_used: int, width: int = FOLD_WIDTH) -> str:
    """Fold a long header value at spaces and commas the way SpamAssassin does.

    ``first_line_used`` is how much of the first line the header name and
    ``": "`` take.  Continuation lines start with a tab.
    """
    tokens: list[str] = []
    for word in value.split(" "):
        parts = word.split(",")
        tokens.extend(p + "," for p in parts[:-1])
        tokens.append(parts[-1])
    lines: list[str] = []
    line = ""
    used = first_line_used
    for tok in tokens:
        if not tok:
            continue
        glue = "" if not line or line.endswith(",") else " "
        if line and used + len(line) + len(glue) + len(tok) > width:
            lines.append(line)
            line, used, glue = "", 8, ""  # a tab counts as 8 columns
        line += glue + tok
    lines.append(line)
    return "\n\t".join(lines)


def append_field(value: str, field: str, first_line_used: int, width: int = FOLD_WIDTH) -> str:
    """Append ``field`` to a (possibly folded) value, folding before it if the line is full."""
    last = value.rsplit("\n", 1)[-1]
    used = (first_line_used if "\n" not in value else 8) + len(last.lstrip("\t "))
    if value and used + 1 + len(field) > width:
        return f"{value}\n\t{field}"
    return f"{value} {field}" if value else field


def build_status(
    *,
    is_spam: bool,
    score_text: str,
    required_text: str,
    tests: Iterable[str],
    extra: Sequence[str] = (),
) -> str:
    """An X-Spam-Status value in SpamAssassin's default layout.

    Used when spamd's own X-Spam-Status is not available (SYMBOLS mode, or
    an admin's SpamAssassin configured without it): ``Yes, score=15.3
    required=5.0 tests=A,B,C`` followed by ``extra`` fields.
    """
    tests_text = ",".join(tests) or "none"
    parts = [f"{'Yes' if is_spam else 'No'}, score={score_text}", f"required={required_text}",
             f"tests={tests_text}", *extra]
    return fold(" ".join(parts), len(STATUS) + 2)


def unchecked_status(why: str) -> str:
    """X-Spam-Status for a message that was not scored (too large, spamd down).

    It deliberately does not start with ``Yes``/``No`` and carries no
    ``score=``: parsers then treat the message as untested, not as a
    0-point ham.
    """
    return f"Unchecked ({why})"


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """Case-insensitive shell-style match (``X-Spam-*``) of a header name."""
    low = name.lower()
    return any(fnmatch.fnmatchcase(low, p.lower()) for p in patterns)
