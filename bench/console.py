"""What the benchmark prints while it runs: time-stamped progress lines and loud warnings.

Progress goes to stdout, flushed at once, so a run in the background or
under ``tee`` shows where it is; a warning stands out between lines of
``!`` because it means lost, refused or unmarked mail.
"""

from __future__ import annotations

import time


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def loud(msg: str) -> None:
    bar = "!" * 78
    print(f"\n{bar}\n!! {msg}\n{bar}\n", flush=True)
