"""MilterMonkey's test kit: real mail software and a strict MTA side, for tests and benchmarks.

One module per job, imported by its own path (this package re-exports
nothing, so that importing one piece does not start the others):

* :mod:`.process`: processes, pid files, ports, commands, file ownership;
  :class:`~.process.StackError`, :func:`~.process.free_port`;
* :mod:`.part`: :class:`~.part.StackPart`, the base of every daemon started
  for a test, and :func:`~.part.require_or_skip`;
* :mod:`.postfix`, :mod:`.sink`, :mod:`.sendmail`: a private Postfix, its
  ``smtp-sink`` next hop (with :func:`~.sink.parse_dump`), a private Sendmail;
* :mod:`.smtp`: :func:`~.smtp.send_mail`, an SMTP client that reports instead
  of raising;
* the wire protocol (packets, constants) is the daemon's own,
  :mod:`miltermonkey_core.milter.protocol`;
* :mod:`.replies`, :mod:`.connection`, :mod:`.cleanup`, :mod:`.client`: the
  MTA side of the milter protocol, from a milter's replies through single
  protocol steps and Postfix's edit replay to whole sessions
  (:func:`~.client.run_session`);
* :mod:`.daemon`: :class:`~.daemon.MonkeyProcess`, a real MilterMonkey daemon;
* :mod:`.fakeserver`: loopback peers that misbehave on purpose.

The engines (clamd, spamd) are the brains' business: their parts, samples
and test clients live in ``miltermonkey_av.testing`` and
``miltermonkey_spam.testing``; this package never imports a brain.
"""
