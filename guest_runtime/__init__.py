"""The guest runtime: the agent that runs on the attested machine (TPM, measuring, containers).

``RUNTIME_VERSION`` is the version the agent reports (and measures); the run configuration
(``RunConfig``, ``load_config``, ``parse_config``, ``ConfigError``) and the agent
(``CertificationAgent``, its errors ``AgentError``) are exported on first access (PEP 562):
every module of the agent imports this package, and the configuration needs PyYAML, the
agent the TPM library. ``lazy_exports`` makes such hooks; ``aicert.tasks`` and
``aicert.flows`` use it too (this package imports no other part, so both may import it).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aicert.guest_runtime.agent import CertificationAgent
    from aicert.guest_runtime.config import ConfigError, RunConfig, load_config, parse_config
    from aicert.guest_runtime.errors import AgentError

try:
    RUNTIME_VERSION = version("aicert")
except PackageNotFoundError:  # running from a source tree without installation
    RUNTIME_VERSION = "0.0.0+source"

__all__ = [
    "RUNTIME_VERSION",
    "AgentError",
    "CertificationAgent",
    "ConfigError",
    "RunConfig",
    "lazy_exports",
    "load_config",
    "parse_config",
]


def lazy_exports(
    package: str, exports: Mapping[str, str], *, optional: Mapping[str, str] | None = None
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """A package's PEP 562 ``__getattr__`` and ``__dir__``: public names imported on first use.

    Args:
        package: The package's ``__name__``.
        exports: Public name -> the module of the package that defines it.
        optional: Public name -> the top-level module of the optional extra it needs. Without
            that extra the name is left out of ``dir()`` and reading it raises
            ``AttributeError`` naming the extra, so ``inspect.getmembers`` (``prefect block
            register -m``) skips it instead of failing.

    Returns:
        The ``__getattr__`` and ``__dir__`` functions to assign at the package's top.
    """
    needs = dict(optional or {})

    def __getattr__(name: str) -> object:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        try:
            return getattr(import_module(f"{package}.{module}"), name)
        except ModuleNotFoundError as missing:
            if name not in needs:
                raise
            message = f"{package}.{name} needs {needs[name]}, not installed: {missing}"
            raise AttributeError(message) from missing

    def __dir__() -> list[str]:
        available = (n for n in exports if n not in needs or find_spec(needs[n]) is not None)
        return sorted({*vars(sys.modules[package]), *available})

    return __getattr__, __dir__


__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "RunConfig": "config",
        "ConfigError": "config",
        "load_config": "config",
        "parse_config": "config",
        "CertificationAgent": "agent",
        "AgentError": "errors",
    },
)
