"""AICert's Prefect integration: the ``certify-training`` flow, the blocks, ``verify-and-promote``.

The public names are exported here, ``from aicert.flows import certify_training,
LocalPlatform``, but imported only on first access (PEP 562): ``aicert.flows.cli`` lives in
this package, every ``aicert`` command (``aicert verify`` included) loads it through the
``aicert.cli`` entry point, and the flows and blocks import Prefect (about a second and a
half). ``dir()`` lists them, so that ``inspect.getmembers``, and with it ``prefect block
register -m aicert.flows``, finds all four block types (``AzurePlatform`` only with the
``azure`` extra installed; without it the name is absent, not an import error). A Prefect
server finds the same blocks through the ``prefect.collections`` entry point, which names
``aicert.flows.blocks`` itself.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aicert.flows.azure_platform import AzurePlatform
    from aicert.flows.blocks import AicertRunConfig, LocalPlatform, PlatformBlock, QemuPlatform
    from aicert.flows.flows import CERTIFICATE_CREATED, CERTIFICATE_FAILED, certify_training
    from aicert.flows.promote import (
        MODEL_PROMOTED,
        MODEL_REJECTED,
        PromotionError,
        verify_and_promote,
    )

# Public name -> the module of this package that defines it.
_EXPORTS = {
    "certify_training": "flows",
    "CERTIFICATE_CREATED": "flows",
    "CERTIFICATE_FAILED": "flows",
    "verify_and_promote": "promote",
    "PromotionError": "promote",
    "MODEL_PROMOTED": "promote",
    "MODEL_REJECTED": "promote",
    "AicertRunConfig": "blocks",
    "PlatformBlock": "blocks",
    "LocalPlatform": "blocks",
    "QemuPlatform": "blocks",
    "AzurePlatform": "azure_platform",
}
# Names whose module needs an optional extra (prefect-azure): left out of dir() without it.
_OPTIONAL = {"AzurePlatform"}

__all__ = [
    "CERTIFICATE_CREATED",
    "CERTIFICATE_FAILED",
    "MODEL_PROMOTED",
    "MODEL_REJECTED",
    "AicertRunConfig",
    "AzurePlatform",
    "LocalPlatform",
    "PlatformBlock",
    "PromotionError",
    "QemuPlatform",
    "certify_training",
    "verify_and_promote",
]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        return getattr(import_module(f"{__name__}.{module}"), name)
    except ModuleNotFoundError as missing:
        if name not in _OPTIONAL:
            raise
        # AttributeError, so that inspect.getmembers (prefect block register) skips it.
        raise AttributeError(
            f"{__name__}.{name} needs the azure extra (pip install 'aicert[azure]'): {missing}"
        ) from missing


def __dir__() -> list[str]:
    return sorted({*globals(), *(name for name in _EXPORTS if _available(name))})


def _available(name: str) -> bool:
    """Whether a name's module can be imported (an optional extra may be missing)."""
    if name not in _OPTIONAL:
        return True
    from importlib.util import find_spec

    return find_spec("prefect_azure") is not None
