"""Building the engine a configuration describes: the one place chains are assembled.

The daemon builds every configuration generation with :func:`build_engine`,
``miltermonkey try`` its offline run, and the test kit its in-process runs
with :func:`chain_of`, so all three judge mail with brains configured the
same way: the same options, policies, timeouts and circuit breakers.
"""

from __future__ import annotations

from miltermonkey_core.config.brain_options import build_brain_options
from miltermonkey_core.config.schema import BrainEntry, Config, effective_on_error
from miltermonkey_core.contract.brain import Brain
from miltermonkey_core.contract.monkey import Monkey
from miltermonkey_core.engine.breaker import CircuitBreaker
from miltermonkey_core.engine.cache import MemoryCache, ScanCache
from miltermonkey_core.engine.chain import BrainSlot, Chain
from miltermonkey_core.engine.conditions import compile_conditions
from miltermonkey_core.engine.session import Engine, EngineSettings
from miltermonkey_core.errors import BrainLoadError, SecretError
from miltermonkey_core.milterkey.secrets import load_secrets
from miltermonkey_core.milterkey.service import KeyService
from miltermonkey_core.plugins import (
    brain_version,
    load_brain_class,
    new_plugin_manager,
    register,
)


def _slot(entry: BrainEntry, brain: Brain, monkey: Monkey, on_error: str,
          version: str = "0") -> BrainSlot:
    return BrainSlot(
        name=entry.name,
        use=entry.use,
        brain=brain,
        monkey=monkey,
        on_error=on_error,
        timeout=entry.timeout,
        on_timeout=entry.on_timeout or None,
        evaluation=entry.evaluation,
        skip_if_key=entry.skip_if_key,
        expiration=entry.expiration,
        breaker=CircuitBreaker(entry.breaker_failures, entry.breaker_window,
                               entry.breaker_cooldown),
        conditions=compile_conditions(entry.when),
        version=version,
    )


def build_chain(config: Config, monkey: Monkey) -> Chain:
    """Load, configure and register the brains ``config`` lists, in its order.

    Option errors are raised as ConfigError naming the brain's table.  A
    brain that fails to start closes the ones already started.
    """
    pm = new_plugin_manager()
    slots: list[BrainSlot] = []
    try:
        for entry in config.brains:
            cls = load_brain_class(entry.use)
            options = build_brain_options(cls, entry, config)
            bmonkey = monkey.for_brain(entry.name)
            try:
                brain = cls(options, bmonkey, entry.name)
            except Exception as e:
                raise BrainLoadError(
                    f"brain {entry.name!r} ({entry.use}) failed to start: "
                    f"{type(e).__name__}: {e}"
                ) from e
            register(pm, brain, entry.name)
            slots.append(_slot(entry, brain, bmonkey,
                               effective_on_error(entry, cls, config.daemon),
                               brain_version(entry.use)))
    except BaseException:
        for s in slots:
            s.brain.close_brain()
        raise
    return Chain(slots, pm)


def build_engine(config: Config, cache: ScanCache | bool | None = True) -> Engine:
    """The engine for ``config``: brains built, policies, timeouts and breakers set.

    ``cache``: the scan cache to use (the daemon keeps one across reloads),
    ``True`` for a new one as the configuration says, ``False``/None for none.
    """
    d = config.daemon
    monkey = Monkey.from_config(d, config)
    key = KeyService.from_config(config) if d.milter_key else None
    chain = build_chain(config, monkey)
    # Not ``cache or None``: an empty MemoryCache has a length of 0 and is falsy.
    scan_cache = make_cache(config) if cache is True else None if cache is False else cache
    return Engine(chain, monkey,
                  EngineSettings(spool_threshold=d.spool_threshold, tmpdir=d.tmpdir,
                                 max_message_size=d.max_message_size,
                                 overlap=d.overlap), key=key,
                  cache=scan_cache)


def make_cache(config: Config) -> ScanCache | None:
    """The scan cache ``config`` asks for; a shared one needs a secret to sign entries."""
    d = config.daemon
    if d.cache == "off":
        return None
    if d.cache == "memory":
        return MemoryCache(d.cache_max_entries, d.cache_max_bytes)
    secret_file = d.cache_secret_file or (d.miltersecretfile if d.milter_key else None)
    if secret_file is None:
        raise config.error("a shared scan cache signs its entries: set cache_secret_file, "
                           "or milter_key = true with miltersecretfile", key="cache")
    try:
        secrets = load_secrets(secret_file, d.user)
    except SecretError as e:
        raise config.error(f"cannot read the cache secret: {e}", key="cache") from None
    secret = secrets.get(d.key_id or "", next(iter(secrets.values())))
    # redis-py is only needed, and only imported, when a Redis cache is configured.
    from miltermonkey_core.engine.cache_redis import RedisCache  # noqa: PLC0415 - optional dependency

    return RedisCache(d.cache, secret, trusted=secrets.values())


def chain_of(*brains: Brain) -> Chain:
    """A chain of brain instances in the given order, for unit tests of brains.

    Without a configuration each brain runs plainly: policy ``tempfail``, no
    timeout, no circuit breaker, so a test sees the brain's own behaviour.
    """
    pm = new_plugin_manager()
    slots = []
    for b in brains:
        register(pm, b, b.name)
        slots.append(BrainSlot(name=b.name, use=b.name, brain=b, monkey=b.monkey))
    return Chain(slots, pm)
