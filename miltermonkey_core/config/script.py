"""Reading the seed's way of configuring: a short start script that ends in ``spank()``.

The 2005 daemon was started by a Perl script whose ``use`` lines named the
daemon options and the brains in the order they run.  Admins who kept such
scripts can keep the shape::

    #!/usr/bin/env python3
    from miltermonkey_core.script import brain, monkey, spank
    monkey(connection="inet:6609@127.0.0.1")
    brain("av", relay_mode=False)
    brain("spam")
    spank()

``monkey`` and ``brain`` only record, with the line of each call, so that
``spank`` can check everything exactly as a TOML file is checked and point a
mistake at the call that made it.  :func:`load_script` runs such a script
with ``spank`` stopping it instead of starting the daemon, which is how
``miltermonkey check-config``/``show-config``/``run -c script.py`` read it.
Starting the daemon is the front end's job (:mod:`miltermonkey_core.script`,
where scripts import ``spank`` from); this module only records and checks.
"""

from __future__ import annotations

import builtins
import inspect
import pathlib
import threading
import traceback
from collections.abc import Mapping
from typing import Any

import attrs

from miltermonkey_core.config.build import RawItem, RawTable, build_config
from miltermonkey_core.config.schema import Config
from miltermonkey_core.errors import ConfigError

__all__ = ["brain", "collect", "finish", "load_script", "monkey", "reset"]


@attrs.define
class _Recorder:
    """What the script has said so far, in order, with where it said it."""

    daemon: list[RawItem] = attrs.field(factory=list)
    daemon_line: int | None = None
    brains: list[RawTable] = attrs.field(factory=list)
    path: str | None = None
    #: Set by :func:`load_script`: spank() hands the Config back instead of running.
    capture: bool = False
    installed: Mapping[str, Any] | None = None


class _Spanked(BaseException):
    """Unwinds a script loaded by :func:`load_script` at its ``spank()``.

    A BaseException, so a script's own ``except Exception`` cannot swallow it.
    """

    def __init__(self, config: Config) -> None:
        super().__init__("spank")
        self.config = config


_lock = threading.RLock()
_recorder = _Recorder()


def _caller() -> tuple[str, int]:
    """File and line of the script line that called monkey() or brain()."""
    frame = inspect.currentframe()
    # _caller <- monkey/brain <- the script
    caller = frame.f_back.f_back if frame and frame.f_back else None
    if caller is None:  # pragma: no cover - CPython always has frames
        return "<script>", 0
    return caller.f_code.co_filename, caller.f_lineno


def monkey(**daemon_options: Any) -> None:
    """Record daemon options, as the seed's ``use Sendmail::Milter::Monkey (...)`` did."""
    path, line = _caller()
    with _lock:
        _recorder.path = _recorder.path or path
        if _recorder.daemon_line is None:
            _recorder.daemon_line = line
        _recorder.daemon.extend(RawItem(k, v, line) for k, v in daemon_options.items())


def brain(use: str, /, **options: Any) -> None:
    """Record a brain and its options; brains run in the order of these calls.

    Besides the brain's own options, the common ``[[brain]]`` keys apply:
    ``name``, ``on_error``, ``timeout``, ``evaluation``, ``skip_if_key``,
    ``expiration`` and the rest of ``BRAIN_KEYS``.
    """
    path, line = _caller()
    with _lock:
        _recorder.path = _recorder.path or path
        items = (RawItem("use", use, line), *(RawItem(k, v, line) for k, v in options.items()))
        _recorder.brains.append(RawTable(items, line))


def collect() -> Config:
    """Check what has been recorded and return it as a Config."""
    with _lock:
        return build_config(
            RawTable(tuple(_recorder.daemon), _recorder.daemon_line),
            list(_recorder.brains),
            path=_recorder.path,
            source="script",
            installed=_recorder.installed,
        )


def reset() -> None:
    """Forget everything recorded (for tests and for running two scripts in one process)."""
    global _recorder  # noqa: PLW0603 - the module is the builder, as in the seed
    with _lock:
        _recorder = _Recorder()


def finish(installed: Mapping[str, Any] | None) -> Config:
    """What ``spank()`` does before it runs anything: check the recorded configuration.

    Inside :func:`load_script` this unwinds the script with the Config
    (nothing runs); run directly, it returns the Config for the front end to
    serve.  A mistake ends a directly run script with a one-line
    ``miltermonkey: file:line: key: message`` and exit status 1, not a
    traceback.
    """
    with _lock:
        capture = _recorder.capture
        if not capture:
            _recorder.installed = installed
        try:
            config = collect()
        except ConfigError as e:
            if capture:
                raise
            raise SystemExit(f"miltermonkey: {e}") from None
    if capture:
        raise _Spanked(config)
    return config


def _script_line(tb: Any, path: str) -> int | None:
    """The deepest line of the traceback that is in the script itself."""
    line = None
    for frame in traceback.extract_tb(tb):
        if frame.filename == path:
            line = frame.lineno
    return line


def load_script(path: str | pathlib.Path, *, installed: Mapping[str, Any] | None = None) -> Config:
    """Run a start script up to its ``spank()`` and return the Config it builds.

    Anything the script itself gets wrong (a syntax error, a NameError)
    becomes a ConfigError at the script's line.  A script without
    ``spank()`` gives the Config of what it recorded.
    """
    global _recorder  # noqa: PLW0603 - swapped for the duration of the run
    name = str(path)
    try:
        source = pathlib.Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read: {e}", path=name) from None
    try:
        code = compile(source, name, "exec")
    except SyntaxError as e:
        raise ConfigError(f"Python syntax error: {e.msg}", path=name, line=e.lineno) from None
    with _lock:
        saved = _recorder
        _recorder = _Recorder(path=name, capture=True, installed=installed)
        namespace: dict[str, Any] = {"__name__": "__main__", "__file__": name,
                                     "__builtins__": builtins}
        try:
            try:
                exec(code, namespace)  # noqa: S102 - the admin's own start script
            except _Spanked as done:
                return done.config
            except ConfigError:
                raise
            except SystemExit as e:
                raise ConfigError(f"the script exited ({e.code}) before spank()",
                                  path=name, line=_script_line(e.__traceback__, name)) from None
            except Exception as e:
                raise ConfigError(f"the script raised {type(e).__name__}: {e}",
                                  path=name, line=_script_line(e.__traceback__, name)) from None
            # No spank(): a script that only configures is still readable.
            return collect()
        finally:
            _recorder = saved
