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
