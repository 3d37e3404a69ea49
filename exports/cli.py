"""``aicert export``: a verified certificate as a CycloneDX 1.6 ML-BOM or a SLSA provenance.

    aicert export proof.json --format cyclonedx -o model.cdx.json --trust-root platform-ca.pem
    aicert export proof.json --format slsa -o model.intoto.json --reference-values rv.json

The certificate is verified first, with the trust options of ``aicert verify``
(``--trust-root``, ``--reference-values``, ``--allow-dev-platform``); only a certificate that
verified is exported. Exit codes, as ``aicert verify``: 0 exported, 1 not verified (nothing is
written), 2 bad input (an unreadable certificate, trust root or reference-value set, or an
output path that cannot be written, named in the message).

The command joins ``aicert`` through the ``aicert.cli`` entry-point group (:func:`register`).
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from aicert.cli import (
    AllowDevPlatformOption,
    ReferenceValuesOption,
    TrustRootOption,
    error_console,
    fail,
    load_trust_options,
)
from aicert.errors import MalformedCertificateError, VerificationError
from aicert.model import write_atomic
from aicert.slsa_provenance import provenance_statement, statement_json

from .verified import VerifiedCertificate


class ExportFormat(StrEnum):
    """The formats ``aicert export`` writes."""

    CYCLONEDX = "cyclonedx"
    SLSA = "slsa"


def export_document(verified: VerifiedCertificate, export_format: ExportFormat) -> bytes:
    """The export of a verified certificate in ``export_format``, as the bytes of its file.

    Args:
        verified: the verified certificate.
        export_format: CycloneDX 1.6 JSON, or the SLSA provenance statement (canonical JSON).
    """
    if export_format is ExportFormat.SLSA:
        reference_values = verified.certificate.platform.reference_values
        return statement_json(provenance_statement(verified.measured, reference_values))
    # Imported here: only this format needs cyclonedx-python-lib (the `export` extra).
    from .cyclonedx import bom_json

    return bom_json(verified).encode("utf-8")


def export(
    certificate: Annotated[Path, typer.Argument(help="The certificate (proof) JSON file.")],
    export_format: Annotated[
        ExportFormat,
        typer.Option("--format", "-f", help="cyclonedx (1.6 ML-BOM) or slsa (provenance v1)."),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="The file to write.")],
    trust_root: TrustRootOption = None,
    reference_values: ReferenceValuesOption = None,
    allow_dev_platform: AllowDevPlatformOption = False,
) -> None:
    """Verify a certificate, then write it as a CycloneDX ML-BOM or a SLSA provenance."""
    roots, references = load_trust_options(trust_root, reference_values)
    try:
        verified = VerifiedCertificate.verify_file(
            certificate,
            trusted_roots=roots,
            reference_values=references,
            allow_dev_platform=allow_dev_platform,
        )
    except MalformedCertificateError as exc:
        fail(exc, as_json=False, code=2)
    except VerificationError as exc:
        fail(exc, as_json=False, code=1)
    document = export_document(verified, export_format)
    try:
        # A temporary file renamed into place: a reader never sees half an export.
        write_atomic(output, document)
    except OSError as exc:
        error_console.print(f"[red]cannot write {output}: {exc.strerror or exc}[/red]")
        raise typer.Exit(2) from None
    typer.echo(
        f"exported {certificate} (run {verified.report.run_id}, verified) as "
        f"{export_format.value} to {output}"
    )


def register(app: typer.Typer) -> None:
    """Add ``export`` to the ``aicert`` app (the ``aicert.cli`` entry point).

    Args:
        app: the ``aicert`` Typer app.
    """
    app.command(name="export")(export)
