"""What a spamd verdict depends on besides the message: the engine and the brain's options.

The scan cache replays the brain's result on a message it has seen, so its
key must change whenever spamd could answer differently or the brain would
write something else.  The message's part (the header block spamd sees and
the body) is worked out by the brain; the two other parts live here, as
plain functions with plain tests.

**The engine.**  spamd says which SpamAssassin answers in every ``HEADERS``
reply (``X-Spam-Checker-Version: SpamAssassin 4.0.1 (2024-03-25) on host``),
and its ``required_score`` in the ``Spam:`` line.  Those are taken from the
last answer, so no request is ever sent just to learn them: an upgrade or a
changed ``required_score`` changes every key from the first message scanned
after it.  SpamAssassin's default headers do not carry the rules' version;
an ``X-Spam-*`` header whose name says ``version`` or ``rules`` (``add_header
all Rules-Version _RULESVERSION_`` in ``local.cf``) is taken in as well, so
an ``sa-update`` picked up by spamd does the same.  Without it, the cache's
short lifetime bounds how long a verdict from before a rules update is
replayed.  PING would only give the protocol version (``SPAMD/1.5``), which
says nothing about rules, so it is not asked.
"""

from __future__ import annotations

import json
import re
from typing import Final

from miltermonkey_spam import headers as hdr
from miltermonkey_spam.options import SpamOptions
from miltermonkey_spam.spamc import SpamResult

__all__ = ["FORMAT", "answer_options", "engine_identity"]

#: The layout of the spam brain's key parts; a change makes every old entry a miss.
FORMAT: Final = "spam-key-1"

_ON_HOST = re.compile(r"\s+on\s+\S+$")


def engine_identity(result: SpamResult) -> str:
    """Which SpamAssassin, with which rules and ``required_score``, gave ``result``.

    The host name in ``X-Spam-Checker-Version`` is left out: a farm of spamd
    servers on the same version and rules gives the same verdicts, and
    failing over between them must not empty the cache.
    """
    parts = [f"SPAMD/{result.protocol}", f"required={result.required_text}"]
    for name, value in result.headers:
        low = name.lower()
        flat = " ".join(value.split())
        if low == hdr.CHECKER_VERSION.lower():
            parts.append(_ON_HOST.sub("", flat))
        elif low.startswith("x-spam-") and ("version" in low or "rules" in low):
            parts.append(f"{low}: {flat}")
    return "\n".join(parts)


def answer_options(options: SpamOptions) -> str:
    """The options that change what spamd answers or what the brain writes, as stable text.

    Left out on purpose: where spamd is and how long to wait for it
    (``servers``, timeouts, ``balance``), and what only applies to messages
    that are not scanned (``max_size``, ``on_too_large``, ``on_engine_error``,
    ``skip_authenticated``, ``trusted_networks``): those results are never
    cached.
    """
    return json.dumps({
        "user": options.user,
        "command": options.command,
        "received_header": options.received_header,
        "remove_headers": list(options.remove_headers),
        "legacy_rating": options.legacy_rating,
        "rating_ladder": list(options.rating_ladder),
        "subject_tag": options.subject_tag,
        "reject_score": options.reject_score,
        "reject_code": options.reject_code,
        "reject_xcode": options.reject_xcode,
        "reject_text": options.reject_text,
        "quarantine_score": options.quarantine_score,
    }, sort_keys=True, separators=(",", ":"))
