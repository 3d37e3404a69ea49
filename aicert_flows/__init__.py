"""AICert's Prefect integration: the ``certify-training`` and ``certify-evaluation`` flows, the
blocks, ``verify-and-promote``.

The public names are exported here, ``from aicert.flows import certify_training,
LocalPlatform``, but imported only on first access (PEP 562): ``aicert.flows.cli`` lives in
this package, every ``aicert`` command (``aicert verify`` included) loads it through the
``aicert.cli`` entry point, and the flows and blocks import Prefect (about a second and a
half). ``dir()`` lists them, so that ``inspect.getmembers``, and with it ``prefect block
register -m aicert.flows``, finds all five block types (``AzurePlatform`` only with the
``azure`` extra installed, ``GcpPlatform`` only with the ``gcp`` one; without it the name is
absent, not an import error). A Prefect server finds the same blocks through the
``prefect.collections`` entry point, which names ``aicert.flows.blocks`` itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aicert.guest_runtime import lazy_exports

if TYPE_CHECKING:
    from aicert.flows.azure_platform import AzurePlatform
    from aicert.flows.blocks import AicertRunConfig, LocalPlatform, PlatformBlock, QemuPlatform
    from aicert.flows.evaluation import certify_evaluation
    from aicert.flows.flows import CERTIFICATE_CREATED, CERTIFICATE_FAILED, certify_training
    from aicert.flows.gcp_platform import GcpPlatform
    from aicert.flows.promote import (
        MODEL_PROMOTED,
        MODEL_REJECTED,
        PromotionError,
        verify_and_promote,
    )

# Public name -> the module of this package that defines it.
_EXPORTS = {
    "certify_training": "flows",
    "certify_evaluation": "evaluation",
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
    "GcpPlatform": "gcp_platform",
}

__all__ = [
    "CERTIFICATE_CREATED",
    "CERTIFICATE_FAILED",
    "MODEL_PROMOTED",
    "MODEL_REJECTED",
    "AicertRunConfig",
    "AzurePlatform",
    "GcpPlatform",
    "LocalPlatform",
    "PlatformBlock",
    "PromotionError",
    "QemuPlatform",
    "certify_evaluation",
    "certify_training",
    "verify_and_promote",
]


# AzurePlatform and GcpPlatform need their extras (prefect-azure, prefect-gcp): left out of
# dir() without them.
__getattr__, __dir__ = lazy_exports(
    __name__, _EXPORTS, optional={"AzurePlatform": "prefect_azure", "GcpPlatform": "prefect_gcp"}
)
