#!/usr/bin/env python3
"""Instructions per message of the in-process engine path, counted by callgrind.

    python bench/engine_instructions.py prepare 300 DIR      # keyed messages, not measured
    valgrind --tool=callgrind --callgrind-out-file=OUT python bench/engine_instructions.py \
        {trivial|keyed} N [DIR]

Wall-clock timings on a shared 2-core box swing with whatever else runs;
instruction counts do not: the same binary, inputs and environment give the
same total, so two versions of the code can be compared on a noisy machine.
Run it twice with different N (say 100 and 300) and take the difference
divided by 200: start-up cost (imports, building the brains) cancels out.

``trivial``: the trivial brain, no milter key.  ``keyed``: hop 2 of the
bench's mm-keyed contender: two brains named av and spam with skip_if_key,
fed messages carrying a valid milter key signed by hop 1, so both are
skipped and the cost is the key's.

Works with this checkout and with older ones (the module paths moved when
the core was layered), so a before/after pair comes from one command.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

try:  # the layered core
    from miltermonkey_core.config import loads as _loads
    from miltermonkey_core.engine.build import build_engine
    from miltermonkey_core.engine.offline import run_engine
    from miltermonkey_core.plugins import installed_brains

    def loads(text: str) -> Any:
        return _loads(text, installed=installed_brains())
except ImportError:  # before it
    from miltermonkey_core.runner import build_engine, run_engine  # type: ignore[no-redef]

    from miltermonkey_core.config import loads  # type: ignore[no-redef]

from miltermonkey_core.milterkey import generate_secret_file

BODY = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\r\n" * 27)


def message(i: int, extra: bytes = b"") -> bytes:
    return (f"From: a@example.com\r\nTo: b@example.org\r\nSubject: m{i}\r\n"
            f"Message-ID: <m{i}@bench.example>\r\nDate: Thu, 03 Dec 2026 10:00:00 +0000\r\n"
            ).encode() + extra + b"\r\n" + BODY.encode()


def config(secret: Path | None, skip: bool, names: tuple[str, ...]) -> str:
    head = ("[miltermonkey]\nmilter_key = false\n" if secret is None else
            f'[miltermonkey]\nmilter_key = true\nmiltersecretfile = "{secret}"\n'
            'hostname = "hop.example"\n')
    brains = "".join(f'\n[[brain]]\nuse = "trivial"\nname = "{n}"\nheader_name = "X-{n}"\n'
                     + ("skip_if_key = true\n" if skip else "") for n in names)
    return head + brains


def main(kind: str, n: int, workdir: Path | None) -> None:
    if kind == "trivial":
        engine = build_engine(loads(config(None, False, ("trivial",))))
        for i in range(n):
            run_engine(engine, message(i))
        return
    assert workdir is not None, "keyed and prepare need a directory"
    secret = workdir / "secret"
    if kind == "prepare":
        workdir.mkdir(parents=True, exist_ok=True)
        generate_secret_file(str(secret), "k1", False)
        hop1 = build_engine(loads(config(secret, False, ("av", "spam"))))
        for i in range(n):
            (workdir / f"{i}.eml").write_bytes(run_engine(hop1, message(i)).message_bytes)
        return
    hop2 = build_engine(loads(config(secret, True, ("av", "spam"))))
    for i in range(n):
        result = run_engine(hop2, (workdir / f"{i}.eml").read_bytes())
        assert all(r.outcome == "skipped" for r in result.results), result.results


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 else None)
