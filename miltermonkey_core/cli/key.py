"""``miltermonkey key``: create the milter key secret file and explain the keys on a message.

``key generate`` writes (or extends, for rotation) the secret file with a
fresh 32-byte secret, mode 0600.  ``key verify MESSAGE.eml`` says, for every
key header on a saved message, whether this host would trust it and why not,
with the settings of the configuration; exit status 0 when one is trusted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from miltermonkey_core.cli.common import config_option, load
from miltermonkey_core.config.schema import Config, DaemonConfig
from miltermonkey_core.contract.model import message_from_bytes
from miltermonkey_core.milterkey.fields import normalize_message_id
from miltermonkey_core.milterkey.secrets import generate_secret_file
from miltermonkey_core.milterkey.service import KeyService

#: Where ``key generate`` writes without --file or -c: the config's default.
DEFAULT_FILE = DaemonConfig().miltersecretfile


def _load_config(path: str | None) -> Config:
    return load(path)


def _when(expiry: int, now: float) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(expiry))
    delta = int(expiry - now)
    span = abs(delta)
    text = (f"{span // 86400}d {span % 86400 // 3600}h" if span >= 86400
            else f"{span // 3600}h {span % 3600 // 60}m" if span >= 3600
            else f"{span // 60}m {span % 60}s")
    return f"{stamp} ({'in ' + text if delta >= 0 else text + ' ago'})"


def cmd_key_generate(args: argparse.Namespace) -> int:
    if args.file and args.path and args.file != args.path:
        print(f"miltermonkey: key generate: give the file once ({args.path} or --file "
              f"{args.file})", file=sys.stderr)
        return 2
    path = args.file or args.path
    if path is None:
        path = _load_config(args.config).daemon.miltersecretfile if args.config \
            else DEFAULT_FILE
    existed = Path(path).exists()
    key_id = generate_secret_file(path, args.key_id, args.force)
    if args.force and existed:
        print(f"{path}: replaced; key {key_id} is now the only secret")
    elif existed:
        print(f"{path}: added key {key_id}. To sign with it, copy the file to every host "
              f"that shares keys, then set key_id = \"{key_id}\" and restart; remove the old "
              "line once keys signed with it have expired (defaultexpiration).")
    else:
        print(f"{path}: created with key {key_id} (mode 0600). Copy it to every host that "
              "shares keys, owned by the milter's user, and set milter_key = true.")
    return 0


def cmd_key_verify(args: argparse.Namespace) -> int:
    try:
        raw = sys.stdin.buffer.read() if args.message == "-" else Path(args.message).read_bytes()
    except OSError as e:
        print(f"miltermonkey: {args.message}: {e.strerror or e}", file=sys.stderr)
        return 1
    config = _load_config(args.config)
    service = KeyService.from_config(config)
    message = message_from_bytes(raw)
    try:
        now = service.clock()
        mid = normalize_message_id(message.headers)
        print(f"message: Message-ID {mid or '(none or several: no key can bind)'}, "
              f"body sha256 {message.body.sha256().hex()} ({message.body.size} bytes)")
        print(f"trusting: {', '.join(service.header_names)}; key ids "
              f"{', '.join(service.secrets)}; key_body_binding = {service.binding}; "
              f"clock skew {service.clock_skew} s")
        inspection = service.inspect(message)
        if not inspection.checks:
            print(f"no key header ({', '.join(service.header_names)}): nothing to trust")
            return 1
        for c in inspection.checks:
            f = c.fields
            where = f"{c.header} #{c.index}"
            if c.trusted and f is not None:
                print(f"{where}: TRUSTED: key {f.key_id} from {f.host}, expires "
                      f"{_when(f.expiry, now)}, bind={f.binding}")
                print(f"    ran: {', '.join(f'{n} ({v})' for n, v in f.ran)}")
            else:
                print(f"{where}: NOT TRUSTED: {c.reason}")
                if f is not None:
                    print(f"    claims: key {f.key_id} from {f.host}, expires "
                          f"{_when(f.expiry, now)}, bind={f.binding}, ran "
                          f"{','.join(f.brains)}")
                print("    the milter removes this header before the message goes on")
        skipping = sorted(b.name for b in config.brains
                          if b.skip_if_key and inspection.says_ran(b.name))
        if inspection.trusted is None:
            print("result: no trusted key: every brain runs")
            return 1
        print(f"result: trusted key found; brains this config would skip: "
              f"{', '.join(skipping) or 'none (set skip_if_key = true on a brain)'}")
        return 0
    finally:
        message.close()


def add_key_commands(subparsers: Any) -> None:
    """Add ``key generate`` and ``key verify`` to the ``miltermonkey`` sub-commands."""
    key = subparsers.add_parser(
        "key", help="create the milter key secret file; check the keys on a message",
        description="The milter key is a signed header naming the brains that already "
        "judged a message, so the next MilterMonkey sharing the secret can skip them.",
    )
    actions = key.add_subparsers(dest="key_command", metavar="ACTION", required=True)

    g = actions.add_parser(
        "generate", help="create the secret file, or add a secret to it",
        description="Write a new 32-byte secret as KEYID:BASE64 to the secret file, mode "
        "0600. A missing file is created (never over an existing one); an existing file "
        "gets the new secret appended, for key rotation; --force replaces it.",
    )
    g.add_argument("path", nargs="?", metavar="PATH", help="the secret file (same as --file)")
    g.add_argument("--file", metavar="PATH",
                   help="the secret file (default: miltersecretfile of -c, else "
                   f"{DEFAULT_FILE})")
    g.add_argument("--key-id", metavar="ID",
                   help="name of the new secret (default: k + today's date, UTC)")
    g.add_argument("--force", action="store_true",
                   help="replace the file with one holding only the new secret")
    g.add_argument("-c", "--config", metavar="FILE",
                   default=os.environ.get("MILTERMONKEY_CONFIG"),
                   help="take the file name from this configuration (default: "
                   "$MILTERMONKEY_CONFIG)")
    g.set_defaults(func=cmd_key_generate)

    v = actions.add_parser(
        "verify", help="say whether each key header on a message would be trusted",
        description="Check every milter key header of a saved message (.eml) with the "
        "configuration's secret file and key settings. Exit status 0 when a key is "
        "trusted, 1 otherwise.",
    )
    v.add_argument("message", metavar="MESSAGE.eml", help="the message file ('-' for stdin)")
    config_option(v)
    v.set_defaults(func=cmd_key_verify)
