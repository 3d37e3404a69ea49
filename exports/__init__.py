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

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aicert.exports.cli import ExportFormat, export_document
    from aicert.exports.cyclonedx import CycloneDxExportError, bom_json, build_bom
    from aicert.exports.verified import VerifiedCertificate

# Public name -> its module. Imported on first access (PEP 562): every ``aicert`` command
# loads ``aicert.exports.cli`` through the ``aicert.cli`` entry point, and the CycloneDX
# library takes a while to import.
_EXPORTS = {
    "VerifiedCertificate": "verified",
    "build_bom": "cyclonedx",
    "bom_json": "cyclonedx",
    "CycloneDxExportError": "cyclonedx",
    "ExportFormat": "cli",
    "export_document": "cli",
}

__all__ = [
    "CycloneDxExportError",
    "ExportFormat",
    "VerifiedCertificate",
    "bom_json",
    "build_bom",
    "export_document",
]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
