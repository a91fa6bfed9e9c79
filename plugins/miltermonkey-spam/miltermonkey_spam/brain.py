"""The spam brain: the seed's Sendmail::Milter::Monkey::Spam, grown up.

The seed's module "acts as a spamc client, contacting a spamd", and "simply
sets the X-Spam-Flag & X-Spam-Status headers", adding a ``rating=`` field of
``S`` characters so procmail users can filter on a certainty level that the
admin can retune.  This brain keeps exactly that and adds what spamass-milter
and rspamd users expect today:

* headers in SpamAssassin's own format (X-Spam-Checker-Version, X-Spam-Flag
  only on spam, X-Spam-Level, X-Spam-Status), with ``rating=`` appended;
* X-Spam-* headers arriving from outside are never trusted: they are not
  shown to spamd and are removed or replaced, so a forged
  ``X-Spam-Flag: YES`` (or ``NO``) never reaches a mailbox;
* optional reject and quarantine thresholds and a Subject tag;
* skips for authenticated senders, trusted networks and oversized mail;
* a policy of its own for when spamd is down or slow (tag by default: the
  mail is delivered marked ``X-Spam-Status: Unchecked (...)``);
* the core's scan cache: a message seen again from the same client (a retry,
  a bulk sender's next transaction) gets the verdict spamd gave it a moment
  ago without asking spamd again (:meth:`SpamBrain.cache_key`).

Everything per message lives in locals and ``message.notes[<brain name>]``;
the instance is shared by all worker threads.
"""

from __future__ import annotations

import email.utils
import hashlib
import ipaddress
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

from miltermonkey_core import (
    Address,
    Brain,
    Capability,
    Connection,
    Message,
    MilterContext,
    Monkey,
    Needs,
    Verdict,
    current_queue_id,
    hookimpl,
)
from miltermonkey_spam import headers as hdr
from miltermonkey_spam.cachekey import FORMAT, answer_options, engine_identity
from miltermonkey_spam.options import SpamOptions
from miltermonkey_spam.spamc import SpamcClient, SpamdError, SpamdTimeout, SpamResult

#: Levels (the seed's 0-99 debug levels, logged when <= debug_level).
LOG_VERDICT = 10  # one line per message (verdict or skip): shown with the default debug_level
LOG_DETAIL = 50  # which server, timings


#: Debian's spamd address, tried when the daemon runs on its embedded default.
SPAMD_DEFAULTS: Final = ("127.0.0.1:783",)


class SpamBrain(Brain):
    """Scores mail with spamd and writes SpamAssassin's X-Spam-* headers plus ``rating=``."""

    Options = SpamOptions
    description = ("SpamAssassin via spamd: X-Spam-Flag/Level/Status with the seed's rating=, "
                   "reject and quarantine thresholds")
    #: A spamd outage should not stop mail: deliver, marked unchecked.
    default_on_error = "tag"
    #: spamd sees the message as received (headers, body, this hop's Received
    #: line), never what earlier brains wrote, so its call can overlap theirs.
    #: Not with ``subject_tag``: the tag goes on the Subject as earlier brains
    #: left it (set per instance in ``__init__``).
    independent = True

    @classmethod
    def detect_local(cls) -> dict[str, Any] | None:
        """The first Debian spamd address that answers PING, for the embedded default."""
        for address in SPAMD_DEFAULTS:
            try:
                SpamcClient([address], connect_timeout=0.5, timeout=0.5).ping()
            except (SpamdError, OSError, ValueError):
                continue
            return {"servers": [address]}
        return None

    def __init__(self, options: SpamOptions, monkey: Monkey, name: str | None = None) -> None:
        super().__init__(options, monkey, name or "spam")
        self.options: SpamOptions = options
        self.client = SpamcClient(
            options.servers,
            connect_timeout=options.connect_timeout,
            timeout=options.scan_timeout,
            cooldown=options.cooldown,
            balance=options.balance,
            user=options.user,
            max_response=max(4 * 1024 * 1024, options.max_size + 65536),
            logger=monkey.log.logger,
        )
        self.networks = options.networks()
        actions = {Capability.ADD_HEADERS, Capability.CHANGE_HEADERS}
        if options.quarantine_score is not None:
            actions.add(Capability.QUARANTINE)
        macros: dict[str, tuple[str, ...]] = {}
        if options.skip_authenticated:
            # Postfix sends {auth_authen} with MAIL FROM (and later stages);
            # Sendmail's default envfrom list has it too.
            macros["envfrom"] = ("{auth_authen}",)
        self.needs = Needs(envelope=True, headers=True, body=True,
                           actions=frozenset(actions), macros=macros)
        self.cache_ttl = options.cache_ttl
        if options.subject_tag:
            self.independent = False
        #: The spamd that answered last (see :func:`.cachekey.engine_identity`);
        #: None until the first answer, and until then nothing is cached.
        self.spamd_identity: str | None = None
        self._answer_options = answer_options(options)
        self._warn_about_timeouts(monkey)

    def _warn_about_timeouts(self, monkey: Monkey) -> None:
        """Say so at start-up if spamd may take longer than the daemon waits for brains.

        The daemon's limits (``eom_timeout``, the brain table's ``timeout``)
        end a brain with the core's failure policy; the spam brain's own
        ``on_engine_error`` only applies if spamd's bound is shorter.
        """
        config = getattr(monkey, "config", None)
        limits: list[tuple[str, float]] = []
        eom = getattr(getattr(config, "daemon", None), "eom_timeout", None)
        if isinstance(eom, int | float):
            limits.append(("the daemon's eom_timeout", float(eom)))
        try:
            entry = config.brain(self.name) if config is not None else None
        except (KeyError, AttributeError):
            entry = None
        own = getattr(entry, "timeout", None)
        if isinstance(own, int | float):
            limits.append(("this brain's timeout", float(own)))
        o = self.options
        worst = o.connect_timeout * len(o.servers) + o.scan_timeout
        for what, limit in limits:
            if worst >= limit:
                monkey.log.warning(
                    "brain %s: spamd may take up to %.0f s (connect_timeout x servers + "
                    "scan_timeout) but %s is %.0f s; lower scan_timeout so on_engine_error "
                    "applies", self.name, worst, what, limit)

    # --- skips -------------------------------------------------------------------------

    def _trusted(self, connection: Connection) -> bool:
        if not self.networks or not connection.address:
            return False
        text = connection.address.strip().removeprefix("IPv6:").removeprefix("ipv6:")
        text = text.strip("[]").split("%", 1)[0]
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == net.version and ip in net for net in self.networks)

    @hookimpl
    def connect(self, connection: Connection, monkey: Monkey) -> Verdict | None:
        """Sit out sessions from trusted networks (checked once per SMTP connection)."""
        if self._trusted(connection):
            monkey.log(LOG_VERDICT, "%sspam: not scanning: client %s is in trusted_networks",
                       _qid(connection.id), connection.address)
            return Verdict.skip("trusted network")
        return None

    @hookimpl
    def helo(self, connection: Connection, helo_name: str, monkey: Monkey) -> Verdict | None:
        """Nothing to decide here; implemented so the daemon asks the MTA for HELO.

        The HELO name goes into the Received line spamd sees; without it
        SpamAssassin's HELO rules would fire on a placeholder.
        """
        return None

    @hookimpl
    def envfrom(self, message: Message, sender: Address, monkey: Monkey) -> Verdict | None:
        """Skip mail from authenticated senders (``{auth_authen}`` arrives with MAIL FROM)."""
        user = message.connection.authenticated
        if self.options.skip_authenticated and user:
            monkey.log(LOG_VERDICT, "%sspam: not scanning: sender authenticated as %s",
                       _qid(message.id), user)
            return Verdict.skip("authenticated")
        return None

    # --- end of message ------------------------------------------------------------------

    @hookimpl
    def eom_process(self, message: Message, ctx: MilterContext, monkey: Monkey) -> None:
        """Score the message with spamd and write the headers; reject or quarantine if asked."""
        o = self.options
        notes: dict[str, Any] = {"checked": False}
        message.notes[self.name] = notes
        user = message.connection.authenticated
        if o.skip_authenticated and user:
            # {auth_authen} came only after MAIL FROM (some Sendmail setups).
            monkey.log(LOG_VERDICT, "%sspam: not scanning: sender authenticated as %s",
                       _qid(message.id), user)
            notes["skipped"] = "authenticated"
            ctx.unchecked("sender authenticated")
            return
        chunks, length = self.payload(message)
        if length > o.max_size:
            notes["skipped"] = "too large"
            ctx.unchecked(f"too large for spamd ({length} > max_size {o.max_size})")
            monkey.log(LOG_VERDICT, "%sspam: not scanned: %d bytes is above max_size %d",
                       _qid(message.id), length, o.max_size)
            self._remove_outside_headers(ctx, keep=())
            if o.on_too_large == "tag":
                ctx.replace_header(hdr.STATUS, hdr.unchecked_status(
                    f"skipped: too large, {length} bytes > max_size {o.max_size}"))
            return
        try:
            if o.command == "symbols":
                result = self.client.symbols(chunks, length)
            else:
                result = self.client.headers(chunks, length)
        except SpamdError as e:
            self._engine_error(message, ctx, monkey, e, notes)
            return
        self.spamd_identity = engine_identity(result)
        self._apply(message, ctx, monkey, result, notes)

    # --- the scan cache -------------------------------------------------------------------

    def cache_key(self, message: Message) -> Sequence[str | bytes] | None:
        """Everything spamd's verdict on ``message`` and what this brain writes depend on.

        * the header block exactly as spamd gets it, with this hop's Received
          line (client address, HELO name, reverse DNS name, MTA host,
          envelope sender) but without its queue id and date, which differ
          on every retry; SpamAssassin compares that date with the Date
          header only in steps of hours, far above ``cache_ttl``;
        * the names of the ``remove_headers`` headers that came with it: spamd
          does not see them, but the brain deletes them by name, and a replay
          must delete a forged ``X-Spam-Report`` as the scan did;
        * the body's digest (the MTA sent it; the core hashed it on arrival);
        * the SASL login name, if any;
        * the options that change the answer or the headers written
          (:func:`.cachekey.answer_options`);
        * the spamd that answered last: SpamAssassin's version, rules version
          if it says, ``required_score`` (:func:`.cachekey.engine_identity`).

        Not cached (None): before spamd has answered once (its version is not
        known yet), and messages this brain will not scan (authenticated
        senders it skips, messages above ``max_size``).  The recipients are
        not part of it: spamd never sees them, so one body sent to many
        recipients in many transactions is scanned once.
        """
        engine = self.spamd_identity
        if engine is None:
            return None
        o = self.options
        user = message.connection.authenticated
        if o.skip_authenticated and user:
            return None
        received = self._received_line(message, stable=True) if o.received_header else b""
        head = self._header_block(message, received)
        if len(head) + message.body.size > o.max_size:
            return None
        removed = "\n".join(h.name for h in message.headers
                            if hdr.matches_any(h.name, o.remove_headers))
        return (FORMAT, engine, self._answer_options, user or "", removed,
                hashlib.sha256(head).digest(), message.body.sha256())

    def payload(self, message: Message) -> tuple[Callable[[], Iterator[bytes]], int]:
        """The bytes spamd gets, as a chunk source and its exact length.

        The header block is rebuilt (small) with CRLF line ends; X-Spam-*
        headers from outside are left out, as spamass-milter does, so forged
        verdicts cannot sway SpamAssassin; a ``Received:`` line for this hop
        is put on top because the MTA's own one is not visible to milters
        and SpamAssassin needs the client's address for its network rules.
        The body is streamed from the spool, never copied.
        """
        received = self._received_line(message) if self.options.received_header else b""
        head_bytes = self._header_block(message, received)
        body = message.body

        def chunks() -> Iterator[bytes]:
            yield head_bytes
            yield from body.chunks(65536)

        return chunks, len(head_bytes) + body.size

    def _header_block(self, message: Message, received: bytes) -> bytes:
        """``received``, the headers as received minus ``remove_headers`` (CRLF), a blank line."""
        head = bytearray(received)
        patterns = self.options.remove_headers
        for h in message.headers:
            if hdr.matches_any(h.name, patterns):
                continue
            value = h.raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            head += h.name.encode("utf-8", "surrogateescape") + b": " + value + b"\r\n"
        head += b"\r\n"
        return bytes(head)

    def _received_line(self, message: Message, *, stable: bool = False) -> bytes:
        """A Sendmail-style Received line for this hop, as spamass-milter writes for spamc.

        ``stable``: without the queue id and the date, for the cache key.
        """
        conn = message.connection
        if not conn.address:
            return b""
        helo = _clean(conn.helo or "unknown")
        rdns = _clean(conn.hostname or "unknown")
        if rdns.startswith("[") or rdns == conn.address:
            rdns = "unknown"
        by = _clean(message.macros.get("j") or conn.macros.get("j") or self.monkey.hostname)
        sender = _clean(message.envelope.sender.address if message.envelope.sender else "<>")
        if stable:
            qid = date = ""
        else:
            qid = _clean(message.queue_id or "unknown")
            date = email.utils.formatdate(localtime=True)
        line = (f"Received: from {helo} ({rdns} [{_clean(conn.address)}])\r\n"
                f"\tby {by} (MilterMonkey) with ESMTP id {qid};\r\n"
                f"\t{date}\r\n\t(envelope-from {sender})\r\n")
        return line.encode("utf-8", "surrogateescape")

    # --- writing the verdict ------------------------------------------------------------------

    def _remove_outside_headers(self, ctx: MilterContext, keep: tuple[str, ...]) -> None:
        """Delete every X-Spam-* (``remove_headers``) header not about to be replaced.

        ``X-Spam-Flag`` always goes: a forged ``YES`` on clean mail, or a
        forged ``NO`` on spam, must not survive.
        """
        keep_low = {k.lower() for k in keep}
        names = {h.name.lower(): h.name for h in ctx.headers
                 if hdr.matches_any(h.name, self.options.remove_headers)}
        names.setdefault(hdr.FLAG.lower(), hdr.FLAG)
        for low, name in names.items():
            if low not in keep_low:
                ctx.delete_all(name)

    def _apply(self, message: Message, ctx: MilterContext, monkey: Monkey,
               result: SpamResult, notes: dict[str, Any]) -> None:
        o = self.options
        rating = hdr.rating(result.score, o.rating_ladder)
        tests = self._tests(result)
        written: list[tuple[str, str]] = []
        sa = {n.lower(): v for n, v in result.headers}
        if hdr.CHECKER_VERSION.lower() in sa:
            written.append((hdr.CHECKER_VERSION, sa[hdr.CHECKER_VERSION.lower()]))
        if result.is_spam:
            written.append((hdr.FLAG, "YES"))
        written.append((hdr.LEVEL, hdr.stars(result.score)))
        status = sa.get(hdr.STATUS.lower()) or hdr.build_status(
            is_spam=result.is_spam, score_text=result.score_text,
            required_text=result.required_text, tests=tests)
        if o.legacy_rating:
            status = hdr.append_field(status, f"rating={rating}", len(hdr.STATUS) + 2)
        written.append((hdr.STATUS, status))
        ours = {n.lower() for n, _ in written} | {hdr.FLAG.lower()}
        for name, value in result.headers:  # X-Spam-Report and any the admin added
            if name.lower().startswith("x-spam-") and name.lower() not in ours:
                written.append((name, value))
                ours.add(name.lower())
        self._remove_outside_headers(ctx, keep=tuple(n for n, _ in written))
        for name, value in written:
            ctx.replace_header(name, value)
        if result.is_spam and o.subject_tag:
            subject = ctx.headers.get("Subject")
            if subject is None:
                ctx.add_header("Subject", o.subject_tag)
            elif not subject.lstrip().startswith(o.subject_tag):
                ctx.change_header("Subject", f"{o.subject_tag} {subject.lstrip()}")

        action = "tagged" if result.is_spam else "clean"
        if o.reject_score is not None and result.score >= o.reject_score:
            text = (o.reject_text.replace("{score}", result.score_text)
                    .replace("{required}", result.required_text)
                    .replace("{threshold}", f"{o.reject_score:g}"))
            ctx.reject(o.reject_code, o.reject_xcode, text,
                       reason=f"spam score {result.score_text} >= reject_score {o.reject_score:g}")
            action = "rejected"
        elif o.quarantine_score is not None and result.score >= o.quarantine_score:
            ctx.quarantine(f"spam score {result.score_text} >= quarantine_score "
                           f"{o.quarantine_score:g}")
            action = "quarantined"
        notes.update(checked=True, is_spam=result.is_spam, score=result.score,
                     required=result.required, tests=tests, rating=rating, action=action,
                     server=result.server, seconds=result.seconds)
        monkey.log(LOG_VERDICT, "%sspam: %s score=%s required=%s rating=%s tests=%s (%s)",
                   _qid(message.id), action, result.score_text, result.required_text, rating or "-",
                   ",".join(tests) or "none", "spam" if result.is_spam else "ham")
        monkey.log(LOG_DETAIL, "%sspam: spamd %s answered %s in %.1f ms (connect %.2f ms)",
                   _qid(message.id), result.server, result.command, result.seconds * 1000,
                   result.connect_seconds * 1000)

    @staticmethod
    def _tests(result: SpamResult) -> tuple[str, ...]:
        if result.symbols:
            return result.symbols
        status = result.header(hdr.STATUS) or ""
        unfolded = re.sub(r",\s+", ",", " ".join(status.split()))
        for field in unfolded.split(" "):
            if field.startswith("tests="):
                return tuple(t for t in field[len("tests="):].split(",") if t and t != "none")
        return ()

    def _engine_error(self, message: Message, ctx: MilterContext, monkey: Monkey,
                      error: SpamdError, notes: dict[str, Any]) -> None:
        """spamd down, slow or confused: the brain's own ``on_engine_error`` policy."""
        policy = self.options.on_engine_error
        why = "spamd timed out" if isinstance(error, SpamdTimeout) else "spamd unavailable"
        notes.update(checked=False, error=str(error))
        ctx.unchecked(why)
        monkey.log.warning("%sspam: message not scanned, %s: %s; on_engine_error=%s",
                           _qid(message.id), why, error, policy)
        if policy == "tempfail":
            ctx.tempfail(451, "4.7.1", "Spam filter temporarily unavailable, try again later",
                         reason=why)
        elif policy == "reject":
            ctx.reject(554, "5.7.1", "Message could not be checked for spam", reason=why)
        else:
            self._remove_outside_headers(ctx, keep=())
            if policy == "tag":
                ctx.replace_header(hdr.STATUS, hdr.unchecked_status(why))


def _qid(qid: str) -> str:
    """``"QID: "`` for a log line, unless the daemon's log format already shows it."""
    return "" if current_queue_id() == qid else f"{qid}: "


def _clean(text: str) -> str:
    """One header token: no spaces, line breaks or control characters from the session."""
    return "".join(c if c.isprintable() and not c.isspace() else "?" for c in text.strip()) or "?"
