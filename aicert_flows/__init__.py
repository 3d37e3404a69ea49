"""AICert's Prefect integration: the ``certify-training`` flow, providers, blocks, builder CLI.

This package is the ``prefect.collections`` entry point, so Prefect imports it to find the
block types (``AicertRunConfig``, ``LocalPlatform``, ``QemuPlatform``): a server registers
them at start-up and ``prefect block register -m aicert.flows`` registers them on demand.
But ``aicert.flows.cli`` lives here too and ``aicert verify`` must not pay about a second
and a half for importing Prefect. So the blocks are defined at import only when Prefect is
already loaded (it is whenever Prefect itself imports this package); otherwise they are
imported on first access (PEP 562), and ``dir()`` lists them so that
``inspect.getmembers`` still finds them.
"""

from __future__ import annotations

import sys
from typing import Any

_BLOCKS = ("AicertRunConfig", "LocalPlatform", "QemuPlatform")

if "prefect" in sys.modules:
    from aicert.flows.blocks import AicertRunConfig, LocalPlatform, QemuPlatform


def __getattr__(name: str) -> Any:
    if name in _BLOCKS:
        from aicert.flows import blocks

        return getattr(blocks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_BLOCKS})


__all__ = ["AicertRunConfig", "LocalPlatform", "QemuPlatform"]
