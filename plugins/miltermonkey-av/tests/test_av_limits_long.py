"""The slow cases of test_av_limits.py, for ``nox -s long`` (``MILTERMONKEY_LONG=1``).

What makes them slow is clamd working through them, not the brain: with
its default limits the brain refuses 50,000 parts after reading 5,001 and
the 10 x 10 x 100 MB zip after one header (the default suite has both).
Here the brain's limits are raised so clamd itself must decide, which takes
it seconds per message, and the 10 GB zip takes seconds to build.
"""

from __future__ import annotations

import os
import time

import pytest
from av_helpers import CLAMD_DECIDES, assert_refused_for_limits, brain_on, run
from miltermonkey_av.testing import Clamd
from miltermonkey_av.testing import samples as av_samples

pytestmark = [
    pytest.mark.engines,
    pytest.mark.skipif(os.environ.get("MILTERMONKEY_LONG", "") not in ("1", "yes", "true"),
                       reason="a long run: MILTERMONKEY_LONG=1 (nox -s long)"),
]

@pytest.mark.parametrize("count", [10_000, 50_000])
def test_clamd_refuses_eicar_after_many_parts_by_its_max_files(count: int, clamd: Clamd) -> None:
    t0 = time.monotonic()
    result = run(brain_on(clamd, **CLAMD_DECIDES), av_samples.many_parts(count))
    assert_refused_for_limits(result, "stopped at its MaxFiles limit")
    print(f"\n{count} parts, clamd deciding: {time.monotonic() - t0:.1f} s")


@pytest.fixture(scope="module")
def zip_bomb() -> bytes:
    """The issue's nested zip: 10 zips of 10 files of 100 MB (zeros), EICAR in the last zip."""
    return av_samples.zip_bomb_message(100)


def test_the_zip_bomb_is_refused_by_the_walk(zip_bomb: bytes, plain_clamd: Clamd) -> None:
    # One member header, read from the first 16 KiB of inner0.zip, is enough.
    result = run(brain_on(plain_clamd), zip_bomb)
    assert_refused_for_limits(result, "'file0.bin' of 104857600 bytes unpacked")


def test_the_zip_bomb_is_refused_by_clamds_max_scan_size(zip_bomb: bytes, clamd: Clamd) -> None:
    result = run(brain_on(clamd, max_scan_size=0, **CLAMD_DECIDES), zip_bomb)
    assert_refused_for_limits(result, "stopped at its MaxScanSize limit")


def test_the_zip_bomb_was_clean_with_neither(zip_bomb: bytes, plain_clamd: Clamd) -> None:
    """The issue's report, kept as the control: no walk, clamd without the alert."""
    result = run(brain_on(plain_clamd, max_scan_size=0, **CLAMD_DECIDES), zip_bomb)
    assert result.header("X-Virus-Status") == "Clean"
