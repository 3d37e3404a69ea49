"""AICert's Prefect integration: the ``certify-training`` flow, providers, blocks, builder CLI.

Prefect finds the block types (``AicertRunConfig``, ``LocalPlatform``, ``QemuPlatform``)
through the ``prefect.collections`` entry point, which names ``aicert.flows.blocks`` itself:
a server registers them at start-up. This package re-exports them, but only on first access
(PEP 562): ``aicert.flows.cli`` lives here, every ``aicert`` command (``aicert verify``
included) loads it through the ``aicert.cli`` entry point, and importing the blocks imports
Prefect (about a second and a half). ``dir()`` lists them, so that ``inspect.getmembers``,
and with it ``prefect block register -m aicert.flows``, still finds them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aicert.flows.blocks import AicertRunConfig, LocalPlatform, QemuPlatform

__all__ = ["AicertRunConfig", "LocalPlatform", "QemuPlatform"]


def __getattr__(name: str) -> type[AicertRunConfig | LocalPlatform | QemuPlatform]:
    if name in __all__:
        from aicert.flows import blocks

        block_type: type[AicertRunConfig | LocalPlatform | QemuPlatform] = getattr(blocks, name)
        return block_type
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
