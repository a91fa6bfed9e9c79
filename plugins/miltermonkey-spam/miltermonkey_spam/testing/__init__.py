"""Test helpers of the spam brain: a real spamd, GTUBE and ham, a small SPAMC client.

For this package's own tests, the core's, and any brain or benchmark that
needs a spam engine:

* :class:`Spamd` (:mod:`.engine`): a private spamd as a part of the core's
  test stack;
* :mod:`.samples`: :data:`GTUBE`, and :func:`spam` / :func:`ham` messages;
* :func:`spamc_request` and :func:`check` (:mod:`.client`): the one SPAMC
  client for tests, independent of the brain's own;
* :class:`FakeSpamd` (:mod:`.fake`): a spamd that misbehaves on demand;
* the ``spamd_server`` pytest fixture (:mod:`.plugin`), which pytest loads
  by itself once this package is installed.

Nothing here imports pytest except :mod:`.plugin`, so benchmarks can use
the rest without it.
"""

from __future__ import annotations

from miltermonkey_spam.testing.client import SpamdTestError, check, spamc_request
from miltermonkey_spam.testing.engine import Spamd
from miltermonkey_spam.testing.fake import FakeSpamd
from miltermonkey_spam.testing.samples import GTUBE, ham, spam

__all__ = [
    "GTUBE",
    "FakeSpamd",
    "Spamd",
    "SpamdTestError",
    "check",
    "ham",
    "spam",
    "spamc_request",
]
