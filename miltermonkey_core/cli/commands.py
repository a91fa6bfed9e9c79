"""The commands: run the daemon, check and show a configuration, list the
installed brains, and try the configured brains on one message.

A mail admin meets these when something is wrong, so a user error (a bad
config, a missing file, an uninstalled brain) is one line naming the file,
the line and the key, and exit status 1; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from miltermonkey_core.cli.common import (
    EXIT_DELIVERED,
    EXIT_ERROR,
    EXIT_REFUSED,
    EXIT_TEMPFAIL,
    config_option,
    err,
    load,
)
from miltermonkey_core.engine.offline import run_offline
from miltermonkey_core.errors import BrainLoadError, ConfigError, MonkeyError
from miltermonkey_core.plugins import brain_info, load_brain_class
from miltermonkey_core.server.main import run
from miltermonkey_core.server.preflight import problems_of, resolve_brains


def cmd_run(args: argparse.Namespace) -> int:
    config = load(args.config)
    return int(run(config, supervise_worker=False if args.no_supervisor else None) or 0)


def cmd_check_config(args: argparse.Namespace) -> int:
    found: list[ConfigError] = []
    config = load(args.config, problems=found)
    problems: list[MonkeyError] = [*found, *problems_of(config, environment=True)]
    for p in problems:
        err(str(p))
    if problems:
        return EXIT_ERROR
    n = len(config.brains)
    names = ", ".join(b.name for b in config.brains) or "none"
    print(f"OK: {n} brain{'' if n == 1 else 's'}: {names}")
    return 0


def cmd_show_config(args: argparse.Namespace) -> int:
    config = load(args.config)
    built, problems = resolve_brains(config)
    for p in problems:
        err(f"warning: {p} (showing the options as written)")
    classes: dict[str, type] = {}
    for entry in config.brains:
        with contextlib.suppress(BrainLoadError):
            classes[entry.name] = load_brain_class(entry.use)
    sys.stdout.write(config.with_effective_policies(classes).to_toml(built))
    return 0


def cmd_brains(args: argparse.Namespace) -> int:
    infos = brain_info()
    if not infos:
        print("no brains installed (pip install miltermonkey-av, miltermonkey-spam, ...)")
        return 0
    for i, info in enumerate(infos):
        if i:
            print()
        print(f"{info.name}  ({info.distribution} {info.version})  {info.value}")
        if info.error:
            print(f"    error: {info.error}")
            continue
        if info.description:
            print(f"    {info.description}")
        print(f"    hooks: {', '.join(info.hooks) or 'none'}")
        if info.options:
            print("    options:")
            for name, default in info.options:
                print(f"      {name} = {default}")
        else:
            print("    options: none")
    return 0


def _address(text: str) -> str:
    text = text.strip()
    return text if text.startswith("<") else f"<{text}>"


def _macros(pairs: Sequence[str], parser: argparse.ArgumentParser) -> dict[str, str]:
    """``NAME=VALUE`` pairs; long names get the braces the MTA uses ({auth_authen})."""
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            parser.error(f"--macro {pair!r}: expected NAME=VALUE")
        if len(name) > 1 and not name.startswith("{"):
            name = "{" + name + "}"
        out[name] = value
    return out


def _describe_edit(edit: Any) -> str:
    """One edit as an admin reads it (the context's own repr is for debugging)."""
    kind = type(edit).__name__
    if kind == "AddHeader":
        return f"add header {edit.name}: {edit.value}"
    if kind == "InsertHeader":
        return f"insert header at {edit.index}: {edit.name}: {edit.value}"
    if kind == "ChangeHeader":
        if edit.value is None:
            return f"delete header {edit.name} #{edit.index}"
        return f"change header {edit.name} #{edit.index}: {edit.value}"
    if kind == "ReplaceBody":
        src = edit.source
        size = len(src) if isinstance(src, bytes) else Path(src).stat().st_size
        return f"replace body ({size} bytes)"
    if kind == "AddRcpt":
        return f"add recipient {edit.address}" + (f" {edit.params}" if edit.params else "")
    if kind == "DelRcpt":
        return f"delete recipient {edit.address}"
    if kind == "ChangeFrom":
        return f"change sender to {edit.address}" + (f" {edit.params}" if edit.params else "")
    return repr(edit)


def _exit_for(action: Any) -> int:
    value = getattr(action, "value", "accept")
    if value == "tempfail":
        return EXIT_TEMPFAIL
    if value in ("reject", "discard"):
        return EXIT_REFUSED
    return EXIT_DELIVERED


def cmd_try(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.parser
    macros = _macros(args.macro or [], parser)
    try:
        raw = sys.stdin.buffer.read() if args.message == "-" else Path(args.message).read_bytes()
    except OSError as e:
        err(f"{args.message}: {e.strerror or e}")
        return EXIT_ERROR
    config = load(args.config)
    kwargs: dict[str, Any] = {"macros": macros}
    if args.sender:
        kwargs["sender"] = _address(args.sender)
    if args.to:
        kwargs["recipients"] = [_address(r) for r in args.to]
    if args.client:
        kwargs["client"] = args.client
    result = run_offline(config, raw, **kwargs)
    verdict = result.verdict
    stage = getattr(result, "stage", "eom")
    if verdict is None:
        print("verdict: continue (no brain gave a final verdict: the message is delivered)")
    else:
        by = f" [by {verdict.brain}]" if verdict.brain else ""
        print(f"verdict: {verdict.describe()}{by}")
    if stage != "eom":
        print(f"stage: {stage}")
    for r in getattr(result, "results", []):
        detail = f" ({r.detail})" if r.detail else ""
        print(f"brain {r.brain}: {r.outcome}, {r.action.value}, {r.seconds:.3f} s{detail}")
    edits = result.ctx.edits
    if verdict is not None and verdict.final:
        print("edits: none applied (the message is not delivered)"
              if edits else "edits: none")
    else:
        print(f"edits: {len(edits) or 'none'}")
        for i, edit in enumerate(edits, 1):
            print(f"  {i}. {edit.brain}: {_describe_edit(edit)}")
    q = result.ctx.quarantine_request
    if q is not None:
        print(f"quarantine: {q.reason} [by {q.brain}]")
    for refused in result.ctx.refused:
        print(f"refused: {refused}")
    if args.verbose:
        for line in result.log:
            print(f"log: {line}")
    if args.show_message and result.message_bytes:
        print("--- message ---")
        sys.stdout.flush()
        sys.stdout.buffer.write(result.message_bytes.replace(b"\r\n", b"\n"))
        sys.stdout.buffer.flush()
    return _exit_for(verdict.action if verdict else None)


def add_commands(sub: Any) -> None:
    """The daemon and configuration commands, on the top-level parser's subparsers."""
    p = sub.add_parser("run", help="run the milter in the foreground",
                       description="Run the milter in the foreground until SIGTERM. It never "
                       "forks: run it under systemd, runit or s6, which keep it running.")
    config_option(p)
    p.add_argument("--foreground", action="store_true",
                   help="accepted for familiarity; the milter always stays in the foreground")
    p.add_argument("--no-supervisor", action="store_true",
                   help="one process, no SIGHUP reload (for debugging); by default a small "
                   "supervisor owns the signals and runs the milter as its child")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check-config", help="check a configuration and the brains it uses",
                       description="Load the configuration, import every brain it lists, check "
                       "their options and the files the daemon will need. Prints OK or every "
                       "problem (file:line: key: message) and exits 1.")
    config_option(p)
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("show-config", help="print the effective configuration as TOML",
                       description="Print the configuration with every default filled in; the "
                       "output is itself a valid configuration file.")
    config_option(p)
    p.set_defaults(func=cmd_show_config)

    p = sub.add_parser("brains", help="list the installed brains",
                       description="List the brains installed in this Python environment, "
                       "with their package, hooks and options.")
    p.set_defaults(func=cmd_brains)

    p = sub.add_parser(
        "try", help="run the configured brains over one message, offline",
        description="Run the configured brains over one message without an MTA and show the "
        "verdict and the edits. Exit status: 0 delivered (accept/continue), 4 tempfail, "
        "5 reject or discard, 1 error.",
    )
    p.add_argument("message", metavar="MESSAGE.eml", help="the message file ('-' for stdin)")
    config_option(p)
    p.add_argument("--from", dest="sender", metavar="ADDR", help="envelope sender")
    p.add_argument("--to", action="append", metavar="ADDR",
                   help="envelope recipient (repeat for several)")
    p.add_argument("--client", metavar="ADDR",
                   help="the client address the message comes from (default 127.0.0.1)")
    p.add_argument("--macro", action="append", metavar="NAME=VALUE",
                   help="a milter macro, e.g. i=4XyZ1 or auth_authen=alice (repeatable)")
    p.add_argument("--show-message", action="store_true",
                   help="print the message as it would leave, edits applied")
    p.add_argument("-v", "--verbose", action="store_true", help="print the brains' log lines")
    p.set_defaults(func=cmd_try, parser=p)
