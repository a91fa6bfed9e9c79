"""The ``av`` brain: scan each message with clamd or a command-line scanner.

What happens to infected mail is the seed's choice of modes:

* **relay mode** (``relay_mode = true``, the default here): the message is
  refused at end of data with the configured 5xx reply.  The SMTP client
  keeps the problem; nobody gets a notice, so no backscatter.
* **notify mode** (``relay_mode = false``): the message is delivered with
  its body replaced by a notice for the recipients, and (``notify_sender``)
  the sender is told.  Viruses whose name matches ``discard_pattern`` (worms
  that forge the sender) are discarded instead, with no notice to anyone.
* ``infected_action = "discard"`` or ``"quarantine"`` (the MTA's hold queue)
  are there for sites that want neither.

A failed scan (engine down, timeout, a reply we cannot read) raises: the
core then applies this brain's ``on_error`` policy, ``tempfail`` unless the
admin says otherwise, so mail is never accepted unscanned by accident.

Mail the engine could not look at to the end is never "Clean" either:
before the engine, :mod:`~miltermonkey_av.mime_limits` walks the structure
(nesting depth, part count, nested archives) against ``max_mime_depth`` and
``max_mime_parts``, and an engine that says it stopped at one of its own
limits (clamd's ``Heuristics.Limits.Exceeded.*``) is believed.  Both go to
``limits_action``: reject by default.

Skipping mail a trusted hop already scanned (the seed's milter key and
``alternate_key_header``) is the core's job: set ``skip_if_key = true`` on
the ``[[brain]]`` table and the core does not call this brain for it.

Doing less work per message: clamd verdicts go into the daemon's scan cache
(:mod:`~miltermonkey_av.cachekey` says what the key is made of), and a
large message is streamed to clamd while it arrives
(:mod:`~miltermonkey_av.stream`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, Protocol

from miltermonkey_av import __version__
from miltermonkey_av.cachekey import CacheKeyMaker, EngineIdentity, resolve_directory
from miltermonkey_av.clamd import CHUNK_SIZE, ClamdClient, ClamdPool
from miltermonkey_av.command import CommandScanner
from miltermonkey_av.errors import EngineReportedError, ScanError, ScanTimeout
from miltermonkey_av.mime_limits import Exceeded, inspect
from miltermonkey_av.notices import (
    RECIPIENT_NOTICE,
    SENDER_NOTICE,
    build_sender_notice,
    encode_header_value,
    load_templates,
    notice_values,
    one_line,
    parse_address,
    text_part,
)
from miltermonkey_av.options import AntiVirusOptions
from miltermonkey_av.result import LIMITS_PREFIX, ScanResult, Status
from miltermonkey_av.stream import BodyStream, Streamer, StreamStopped
from miltermonkey_core import (
    Brain,
    Capability,
    Connection,
    Message,
    MilterContext,
    Monkey,
    Needs,
    NoticeError,
    Verdict,
    hookimpl,
)

SCANNED_HEADER = "X-Virus-Scanned"
STATUS_HEADER = "X-Virus-Status"
#: The status of mail delivered although the scan stopped at a limit (limits_action accept-tag).
UNSCANNED_LIMITS = "Unscanned (limits)"


#: Debian's clamd addresses, tried in order when the daemon runs on its embedded default.
CLAMD_DEFAULTS: Final = ("unix:/run/clamav/clamd.ctl", "unix:/var/run/clamav/clamd.ctl",
                         "tcp:127.0.0.1:3310")


class Engine(Protocol):
    """What the brain needs from a scanner engine."""

    @property
    def description(self) -> str: ...

    def scan(self, message: Message) -> ScanResult: ...

    def close(self) -> None: ...


class ClamdEngine:
    """clamd over INSTREAM, with the pool's failover; the message is streamed, not copied."""

    def __init__(self, options: AntiVirusOptions, monkey: Monkey) -> None:
        def event(level: str, msg: str) -> None:
            (monkey.log.warning if level == "warning" else monkey.log.info)("%s", msg)

        self.pool = ClamdPool(options.clamd, connect_timeout=options.connect_timeout,
                              timeout=options.scan_timeout, cooldown=options.clamd_cooldown,
                              on_event=event)

    @property
    def description(self) -> str:
        return "clamd " + ", ".join(self.pool.addresses)

    def scan(self, message: Message) -> ScanResult:
        return self.pool.scan(lambda: message.iter_bytes(CHUNK_SIZE))

    def close(self) -> None:
        """Connections are per scan; nothing stays open."""


def build_engine(options: AntiVirusOptions, monkey: Monkey) -> Engine:
    if options.resolved_engine == "command":
        assert options.scanner_path is not None  # checked by the options
        scanner = CommandScanner(
            options.scanner_path,
            args=options.scanner_args,
            clean_codes=options.scanner_clean_codes,
            infected_codes=options.scanner_infected_codes,
            regex=options.scanner_virus_regex,
            tempfile_template=options.tempfile_template,
            timeout=options.scan_timeout,
        )
        scanner.check()  # a missing binary stops the daemon now, not every message later
        return scanner
    return ClamdEngine(options, monkey)


def needs_for(options: AntiVirusOptions) -> Needs:
    """Exactly what the configured behaviour uses, so the MTA is asked for no more.

    Relay mode without headers needs no modification rights at all; notify
    mode rewrites the body and the headers; quarantine needs the hold action.
    """
    actions: set[str] = set()
    if options.add_headers:
        # replace_header: change (or delete) copies from outside, add ours.
        actions |= {Capability.ADD_HEADERS, Capability.CHANGE_HEADERS}
    if options.action == "notify":
        actions |= {Capability.CHANGE_BODY, Capability.CHANGE_HEADERS, Capability.ADD_HEADERS}
    if options.action == "quarantine":
        actions.add(Capability.QUARANTINE)
    return Needs(envelope=options.action == "notify", headers=True, body=True,
                 actions=frozenset(actions))


def _limit_reply(exceeded: Exceeded) -> str:
    """The part of the SMTP reply that tells the sender which limit, without internals."""
    if exceeded.limit == "depth":
        return "nested too deeply to scan for viruses"
    if exceeded.limit == "parts":
        return "too many MIME parts to scan for viruses"
    if exceeded.limit == "size":
        return "an archive member too large to scan for viruses"
    return "a MIME header too long to scan for viruses"


def _domain_of(hostname: str) -> str:
    labels = hostname.split(".")
    return ".".join(labels[1:]) if len(labels) > 2 else hostname


class AntiVirusBrain(Brain):
    """Virus scanning with clamd (INSTREAM, failover) or a command-line scanner."""

    Options = AntiVirusOptions
    description = "virus scanning with clamd (INSTREAM, failover) or uvscan/clamscan"
    #: An AV engine that cannot answer must not let mail through unscanned.
    default_on_error = "tempfail"

    def __init__(self, options: AntiVirusOptions, monkey: Monkey,
                 name: str | None = None) -> None:
        super().__init__(options, monkey, name)
        self.options: AntiVirusOptions = options
        self.action = options.action
        self.needs = needs_for(options)
        self.templates = load_templates(options.templates_dir)
        self.hostname = monkey.hostname
        self.domainname = options.domainname or _domain_of(self.hostname)
        self.helpaddr = options.helpaddr or f"postmaster@{self.domainname}"
        self.who = options.who or f"the mail system at {self.hostname}"
        self.scanned_by = f"MilterMonkey-AV {__version__} on {self.hostname}"
        self.engine = build_engine(options, monkey)
        # Notify mode reads the headers as earlier brains left them (it deletes
        # every Content-* header there): its work depends on theirs.
        self.independent = self.action != "notify"
        self.cache_ttl = options.cache_ttl
        self.keys: CacheKeyMaker | None = None
        self.streamer: Streamer | None = None
        if isinstance(self.engine, ClamdEngine):
            pool = self.engine.pool
            if self.action != "notify":  # notices depend on the envelope: never replayed
                directory, covered = resolve_directory(options.database_directory,
                                                       options.clamd)
                identity = EngineIdentity(pool, directory, covered, options.cache_settle,
                                          lambda why: monkey.log.info("av: %s", why))
                self.keys = CacheKeyMaker(options, identity)
            if options.stream_min_size:
                self.streamer = Streamer(pool, options, self.name, monkey.log)
        if self.streamer is None:
            # Not streaming: leave the hooks unregistered, so the daemon can still
            # tell the MTA not to wait for an answer to every body chunk.
            for hook in ("body", "abort", "close"):
                setattr(self, hook, None)
        monkey.log(20, "av: %s; infected mail: %s", self.engine.description, self.action)

    @classmethod
    def detect_local(cls) -> dict[str, Any] | None:
        """The first of Debian's clamd addresses that answers PING, for the embedded default."""
        for address in CLAMD_DEFAULTS:
            try:
                if ClamdClient(address, connect_timeout=0.5, timeout=0.5).ping(0.5):
                    return {"clamd": [address]}
            except (OSError, ValueError):
                continue
        return None

    def close_brain(self) -> None:
        self.engine.close()

    def cache_key(self, message: Message) -> Sequence[str | bytes] | None:
        """The header block clamd sees without trace headers, the body, options, database.

        None (not cached) with a command-line scanner (it names no database),
        in notify mode (notices depend on the envelope), when the database
        cannot be identified or is settling, and when a header left out of
        the key is too long to be left unscanned (see :mod:`.cachekey`).
        """
        return self.keys.key(message) if self.keys is not None else None

    # --- streaming while the body arrives -------------------------------------------------

    @hookimpl
    def body(self, message: Message, chunk: bytes, monkey: Monkey) -> Verdict | None:
        """Stream to clamd; unregistered (None) on an instance that does not stream."""
        if self.streamer is not None:
            self.streamer.body(message, chunk)
        return None

    @hookimpl
    def abort(self, message: Message, monkey: Monkey) -> None:
        if self.streamer is not None:
            self.streamer.abort(message)

    @hookimpl
    def close(self, connection: Connection, monkey: Monkey) -> None:
        if self.streamer is not None:
            self.streamer.close_connection(connection)

    # --- end of message -------------------------------------------------------------------

    @hookimpl
    def eom_process(self, message: Message, ctx: MilterContext, monkey: Monkey) -> None:
        stream = self.streamer.take(message) if self.streamer is not None else None
        try:
            self._eom(message, ctx, monkey, stream)
        finally:
            if stream is not None:
                stream.close()

    def _eom(self, message: Message, ctx: MilterContext, monkey: Monkey,
             stream: BodyStream | None) -> None:
        o = self.options
        size = message.size
        if size < o.minscansize:
            monkey.log(40, "%d bytes, below minscansize %d: not scanned", size, o.minscansize)
            self._tag(ctx, f"Unscanned (smaller than minscansize {o.minscansize})")
            ctx.unchecked(f"below minscansize {o.minscansize}")
            return
        if o.max_scan_size and size > o.max_scan_size:
            self._oversize(ctx, monkey, f"{size} bytes, above max_scan_size {o.max_scan_size}")
            return
        # clamd got the message while it arrived: let it scan during the walk.
        stream = self._end_stream(stream, message, monkey)
        # Before the engine: an engine stops at its own limits and may call the
        # rest "clean" (clamd without AlertExceedsMax does).
        structure = inspect(message.iter_bytes(CHUNK_SIZE), max_depth=o.max_mime_depth,
                            max_parts=o.max_mime_parts, max_member_size=o.max_scan_size)
        if structure.exceeded is not None and o.limits_action != "accept-tag":
            self._limits(ctx, monkey, structure.exceeded.detail,
                         _limit_reply(structure.exceeded))
            return
        # A ScanError propagates: the core applies on_error (tempfail by default).
        # With accept-tag the engine still looks, so a virus it can find is refused.
        result = self._streamed(stream, monkey) if stream is not None else None
        if result is None:
            result = self.engine.scan(message)
        if result.status is Status.TOO_LARGE:
            self._oversize(ctx, monkey, f"{result.engine} refused it as too large "
                                        f"({result.detail}); max_scan_size is above "
                                        "clamd's StreamMaxLength")
            return
        if result.infected:
            self._infected(message, ctx, monkey, result)
            return
        if result.limits:
            names = [n.removeprefix(LIMITS_PREFIX).strip(".") for n in result.viruses]
            which = f"{', '.join(n for n in names if n)} limit" if any(names) else "limits"
            self._limits(ctx, monkey, f"{result.engine} stopped at its {which} "
                                      f"({result.name})", f"past the virus scanner's {which}")
            return
        if structure.exceeded is not None:
            self._limits(ctx, monkey, structure.exceeded.detail,
                         _limit_reply(structure.exceeded))
            return
        monkey.log(50, "clean (%s, %.1f ms; depth %d, %d parts)", result.engine,
                   result.seconds * 1000, structure.depth, structure.parts)
        self._tag(ctx, "Clean")

    def _end_stream(self, stream: BodyStream | None, message: Message,
                    monkey: Monkey) -> BodyStream | None:
        """The stream, terminated, if clamd got exactly this message; else None (closed)."""
        if stream is None:
            return None
        if not stream.matches(message):
            monkey.log(50, "stream to clamd %s dropped: it got %d bytes of %d, or other "
                           "headers; scanning at end of data", stream.address, stream.sent,
                       message.size)
            stream.close()
            return None
        try:
            stream.end()
        except StreamStopped as e:
            # clamd refused the stream (its size limit) after the last body chunk's
            # check: as when the body hook sees it, the usual scan decides.
            monkey.log(50, "stream to clamd stopped: %s; scanning at end of data", e)
            stream.close()
            return None
        except ScanError as e:
            self._stream_failed(stream, monkey, e)
            return None
        return stream

    def _streamed(self, stream: BodyStream, monkey: Monkey) -> ScanResult | None:
        """clamd's answer to the stream; None to scan at end of data as always."""
        try:
            return stream.result()
        except ScanError as e:
            self._stream_failed(stream, monkey, e)
            return None

    def _stream_failed(self, stream: BodyStream, monkey: Monkey, error: ScanError) -> None:
        """A stream that failed at the end: a timeout is the scan's (on_error applies, as
        for any scan); anything else leaves the message to the usual scan and its failover."""
        stream.close()
        if isinstance(error, ScanTimeout):
            assert isinstance(self.engine, ClamdEngine)
            self.engine.pool.mark_failed(stream.client, str(error))
            raise error
        if not isinstance(error, EngineReportedError):
            monkey.log.warning("stream to clamd %s failed at the end: %s; scanning at end of "
                               "data", stream.address, error)

    # --- outcomes -------------------------------------------------------------------------

    def _tag(self, ctx: MilterContext, status: str) -> None:
        """Our X-Virus-* headers, replacing any copies from outside (never trusted)."""
        if not self.options.add_headers:
            return
        ctx.replace_header(SCANNED_HEADER, self.scanned_by)
        ctx.replace_header(STATUS_HEADER, one_line(status, 300))

    def _oversize(self, ctx: MilterContext, monkey: Monkey, why: str) -> None:
        action = self.options.oversize_action
        monkey.log.warning("not scanned: %s; oversize_action %s", why, action)
        if action == "reject":
            ctx.reject(552, "5.3.4", "Message too big for virus scanning",
                       reason=f"av: {why}")
        elif action == "tempfail":
            ctx.tempfail(452, "4.3.4", "Message too big for virus scanning, try later",
                         reason=f"av: {why}")
        else:
            self._tag(ctx, "Unscanned (too large)")
            ctx.unchecked(f"not scanned: {why}")

    def _limits(self, ctx: MilterContext, monkey: Monkey, why: str, reply: str) -> None:
        """Mail the scan could not look at to the end: never "Clean"; limits_action decides."""
        action = self.options.limits_action
        monkey.log.warning("not scanned to the end: %s; limits_action %s", why, action)
        if action == "reject":
            ctx.reject(554, "5.7.0", f"Message refused: {reply}", reason=f"av: {why}")
        elif action == "tempfail":
            ctx.tempfail(451, "4.7.0", f"Message not scanned: {reply}, try later",
                         reason=f"av: {why}")
        else:
            self._tag(ctx, UNSCANNED_LIMITS)
            ctx.unchecked(f"not scanned to the end: {why}")

    def _infected(self, message: Message, ctx: MilterContext, monkey: Monkey,
                  result: ScanResult) -> None:
        o = self.options
        name = one_line(result.name, 200)
        monkey.log.warning("infected: %s (%s, %.1f ms); action %s", name, result.engine,
                           result.seconds * 1000, self.action)
        reason = f"virus {name}"
        if self.action == "reject":
            ctx.reject(o.reject_code, o.reject_xcode, o.reject_text.replace("%v", name),
                       reason=reason)
        elif self.action == "discard":
            ctx.discard(reason=reason)
        elif self.action == "quarantine":
            ctx.quarantine(reason)
            self._tag(ctx, f"Infected ({name})")
        elif o.discard_pattern.search(name):
            monkey.log.info("%s matches discard_pattern: discarded without notices", name)
            ctx.discard(reason=f"{reason} (discard_pattern)")
        else:
            self._notify(message, ctx, monkey, name)

    def _notify(self, message: Message, ctx: MilterContext, monkey: Monkey, name: str) -> None:
        o = self.options
        sender = message.envelope.sender.address if message.envelope.sender else ""
        values = notice_values(
            virus=name, sender=sender,
            recipients=[r.address for r in message.envelope.recipients],
            subject=message.headers.get("Subject"), queue_id=message.id,
            message_id=message.message_id, who=self.who, domainname=self.domainname,
            helpaddr=self.helpaddr, hostname=self.hostname)
        if o.notify_recipients:
            self._replace_with_notice(ctx, values, name)
        else:
            ctx.discard(reason=f"virus {name} (notify_recipients off)")
        if o.notify_sender:
            self._notify_sender(message, ctx, monkey, values)

    def _replace_with_notice(self, ctx: MilterContext, values: dict[str, str],
                             name: str) -> None:
        """Turn the message into a plain-text notice: new body, Subject and MIME headers.

        Every ``Content-*`` header goes (a multipart boundary or a base64
        encoding would mangle the notice); From/To/Date stay so the
        recipient sees which message it was.
        """
        subject, body = self.templates[RECIPIENT_NOTICE].render(values)
        part = text_part(body)
        ctx.replace_body(part.body)
        ctx.replace_header("Subject", encode_header_value("Subject", subject))
        for hname in dict.fromkeys(h.name for h in ctx.headers
                                   if h.name.lower().startswith("content-")):
            ctx.delete_all(hname)
        ctx.replace_header("MIME-Version", "1.0")
        ctx.add_header("Content-Type", part.content_type)
        ctx.add_header("Content-Transfer-Encoding", part.transfer_encoding)
        self._tag(ctx, f"Infected ({name})")

    def sender_notice_skipped(self, message: Message) -> str | None:
        """Why the sender must not get a notice (RFC 3834 rules), or None."""
        sender = message.envelope.sender.bare if message.envelope.sender else ""
        if not sender:
            return "null sender (a bounce)"
        if sender.split("@", 1)[0].lower() in ("mailer-daemon", "postmaster-bounces"):
            return f"sender {sender} is a mailer daemon"
        auto = (message.headers.get("Auto-Submitted") or "no").strip().lower()
        if not auto.startswith("no"):
            return f"Auto-Submitted: {one_line(auto, 40)}"
        precedence = (message.headers.get("Precedence") or "").strip().lower()
        if precedence in ("bulk", "junk", "list"):
            return f"Precedence: {precedence}"
        if message.headers.get("List-Id") is not None:
            return "mailing list mail (List-Id)"
        if parse_address(sender) is None:
            return f"unusable sender address {one_line(sender, 80)!r}"
        return None

    def _notify_sender(self, message: Message, ctx: MilterContext, monkey: Monkey,
                       values: dict[str, str]) -> None:
        why_not = self.sender_notice_skipped(message)
        if why_not:
            monkey.log.info("no sender notice: %s", why_not)
            return
        to = parse_address(values["sender"])
        assert to is not None
        data = build_sender_notice(
            template=self.templates[SENDER_NOTICE], values=values, to=to,
            from_name=self.who, from_addr=self.helpaddr, hostname=self.hostname,
            in_reply_to=message.message_id)

        def send() -> None:
            # Only once the message is accepted: a later brain's tempfail would
            # otherwise mean one notice per retry.
            try:
                monkey.send_mail(self.options.notice_sender, [to.addr_spec], data,
                                 sendmail_path=self.options.sendmail_path)
            except NoticeError as e:
                # The message itself is handled; a lost notice is logged, not retried.
                monkey.log.error("sender notice to %s failed: %s", to.addr_spec, e)
                return
            monkey.log.info("sender notice sent to %s", to.addr_spec)

        ctx.after_accept(send)
