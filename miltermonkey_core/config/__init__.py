"""The configuration layer: the schema, checks with file-and-line errors, TOML and
start-script loading, and the effective configuration written back as TOML.

It sits above the brain contract and below everything that runs: it never
imports entry points, never touches the network, never starts anything.
"""

from miltermonkey_core.config.brain_options import build_brain_options
from miltermonkey_core.config.build import RawItem, RawTable, build_config
from miltermonkey_core.config.endpoint import Endpoint, parse_connection
from miltermonkey_core.config.load import embedded_default, load_any, load_config, loads
from miltermonkey_core.config.locator import TomlLocator
from miltermonkey_core.config.schema import (
    ALIASES,
    BRAIN_ALIASES,
    BRAIN_KEYS,
    BRAIN_TABLE,
    DAEMON_TABLE,
    ON_ERROR_POLICIES,
    BrainEntry,
    Config,
    DaemonConfig,
    effective_on_error,
    render_config,
    to_toml_value,
)
from miltermonkey_core.config.script import load_script
from miltermonkey_core.contract.options import parse_duration, parse_size

__all__ = [
    "ALIASES",
    "BRAIN_ALIASES",
    "BRAIN_KEYS",
    "BRAIN_TABLE",
    "DAEMON_TABLE",
    "ON_ERROR_POLICIES",
    "BrainEntry",
    "Config",
    "DaemonConfig",
    "Endpoint",
    "RawItem",
    "RawTable",
    "TomlLocator",
    "build_brain_options",
    "build_config",
    "effective_on_error",
    "embedded_default",
    "load_any",
    "load_config",
    "load_script",
    "loads",
    "parse_connection",
    "parse_duration",
    "parse_size",
    "render_config",
    "to_toml_value",
]
