"""Exports of a verified AICert certificate to the formats the ecosystem reads.

A separate part (``pip install aicert[export]``) so that the verifier keeps its five small
dependencies: it reads certificates only through the verifier (``aicert``).

- :mod:`aicert.exports.verified`: ``VerifiedCertificate``, a certificate paired with the report
  of its verification; every export starts from one, so an unverified certificate exports
  nothing.
- :mod:`aicert.exports.cyclonedx`: a CycloneDX 1.6 ML-BOM (cyclonedx-python-lib).
- :mod:`aicert.exports.cli`: ``aicert export --format cyclonedx|slsa``.

The SLSA provenance statement is built by the verifier itself (:mod:`aicert.slsa_provenance`):
the guest agent will sign the same statement with the TPM, and the verifier rebuild it.
docs/exports.md describes both formats field by field.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aicert.exports.verified import VerifiedCertificate

if TYPE_CHECKING:
    from aicert.exports.cli import ExportFormat, export_document
    from aicert.exports.cyclonedx import CycloneDxExportError, bom_json, build_bom

__all__ = [
    "CycloneDxExportError",
    "ExportFormat",
    "VerifiedCertificate",
    "bom_json",
    "build_bom",
    "export_document",
]

# Imported on first access (PEP 562): the CycloneDX library takes a while to import, and the
# command module needs Typer. (This part may import only the verifier, so it does not share
# aicert.guest_runtime.lazy_exports with the others.)
_CYCLONEDX = {"CycloneDxExportError", "bom_json", "build_bom"}
_COMMAND = {"ExportFormat", "export_document"}


def __getattr__(name: str) -> object:
    if name in _CYCLONEDX:
        from aicert.exports import cyclonedx

        return getattr(cyclonedx, name)
    if name in _COMMAND:
        from aicert.exports import cli

        return getattr(cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
