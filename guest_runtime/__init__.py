"""The guest runtime: the agent that runs on the attested machine (TPM, measuring, containers).

``RUNTIME_VERSION`` is the version the agent reports (and measures); the run configuration
(``RunConfig``, ``load_config``, ``parse_config``, ``ConfigError``) and the agent
(``CertificationAgent``, its errors ``AgentError``) are exported on first access (PEP 562):
every module of the agent imports this package, and the configuration needs PyYAML, the
agent the TPM library.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aicert.guest_runtime.agent import CertificationAgent
    from aicert.guest_runtime.config import ConfigError, RunConfig, load_config, parse_config
    from aicert.guest_runtime.errors import AgentError

try:
    RUNTIME_VERSION = version("aicert")
except PackageNotFoundError:  # running from a source tree without installation
    RUNTIME_VERSION = "0.0.0+source"

# Public name -> its module.
_EXPORTS = {
    "RunConfig": "config",
    "ConfigError": "config",
    "load_config": "config",
    "parse_config": "config",
    "CertificationAgent": "agent",
    "AgentError": "errors",
}

__all__ = [
    "RUNTIME_VERSION",
    "AgentError",
    "CertificationAgent",
    "ConfigError",
    "RunConfig",
    "load_config",
    "parse_config",
]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
