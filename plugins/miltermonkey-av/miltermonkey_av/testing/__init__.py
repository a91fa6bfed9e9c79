"""Test helpers of the AV brain: a real clamd, sample mail, a small INSTREAM client.

For this package's own tests, the core's, and any brain or benchmark that
needs an anti-virus engine:

* :class:`Clamd` (:mod:`.engine`): a private clamd as a part of the core's
  test stack, with a signature database written by the test;
* :mod:`.samples`: EICAR, invented virus markers hidden in zip, base64,
  quoted-printable and nested messages, and :func:`signature_files`, the
  clamd database that detects them;
* :func:`instream` and :func:`clamd_command` (:mod:`.client`): the one
  INSTREAM client for tests, independent of the brain's own;
* :class:`FakeClamd` (:mod:`.fake`): a clamd that misbehaves on demand;
* the ``clamd_server`` pytest fixture (:mod:`.plugin`), which pytest loads
  by itself once this package is installed.

Nothing here imports pytest except :mod:`.plugin`, so benchmarks can use
the rest without it.
"""

from __future__ import annotations

from miltermonkey_av.testing.client import clamd_command, instream, read_reply, write_instream
from miltermonkey_av.testing.engine import Clamd
from miltermonkey_av.testing.fake import FakeClamd, read_instream
from miltermonkey_av.testing.samples import (
    EICAR,
    EICAR_DATABASE,
    EICAR_SIGNATURE,
    SAMPLES,
    Sample,
    sample,
    signature_files,
)

__all__ = [
    "EICAR",
    "EICAR_DATABASE",
    "EICAR_SIGNATURE",
    "SAMPLES",
    "Clamd",
    "FakeClamd",
    "Sample",
    "clamd_command",
    "instream",
    "read_instream",
    "read_reply",
    "sample",
    "signature_files",
    "write_instream",
]
