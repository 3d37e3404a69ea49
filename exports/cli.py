"""``aicert export``: a verified certificate as a CycloneDX 1.6 ML-BOM, an OpenSSF model
signing bundle, or a SLSA provenance (signed by the TPM, or the statement alone).

    aicert export proof.json --format cyclonedx -o model.cdx.json --trust-root platform-ca.pem
    aicert export proof.json --format model-signing -o model/model.sig --trust-root ca.pem
    aicert export proof.json --format slsa -o model.intoto.jsonl --reference-values rv.json
    aicert export proof.json --format slsa-statement -o model.intoto.json ...

``model-signing`` and ``slsa`` write what the TPM signed inside the machine (the certificate's
``signed_statements``, checked by the verification): the Sigstore bundle that ``model_signing
verify certificate`` reads, its verification material the certificate's AK chain, and the
DSSE envelope of the SLSA statement. ``slsa-statement`` is the unsigned statement derived from
the verified certificate (it also names the reference-value set that judged the boot, which
the machine did not know).

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

from aicert.canonical import canonical_json
from aicert.chain import load_pem_certificates
from aicert.cli import (
    AllowDevPlatformOption,
    ReferenceValuesOption,
    TrustRootOption,
    error_console,
    fail,
    load_trust_options,
)
from aicert.errors import MalformedCertificateError, VerificationError
from aicert.model import SignedStatement, StatementKind, write_atomic
from aicert.model_signing_format import ModelSigningFormatError, model_signing_bundle
from aicert.signed_statements import signed_statement
from aicert.slsa_provenance import provenance_statement, statement_json

from .verified import VerifiedCertificate


class ExportFormat(StrEnum):
    """The formats ``aicert export`` writes."""

    CYCLONEDX = "cyclonedx"
    MODEL_SIGNING = "model-signing"
    SLSA = "slsa"
    SLSA_STATEMENT = "slsa-statement"


class ExportUnavailableError(ValueError):
    """The certificate carries no signed statement of the kind the format writes."""


def _signed(verified: VerifiedCertificate, kind: StatementKind) -> SignedStatement:
    statement = signed_statement(verified.certificate, kind)
    if statement is None:
        raise ExportUnavailableError(
            f"{verified.file_name} carries no TPM-signed {kind} statement (a certificate "
            "made before the agent signed statements, or, for model-signing, an RSA AK such "
            "as Azure's); --format slsa-statement exports the unsigned SLSA statement"
        )
    return statement


def export_document(verified: VerifiedCertificate, export_format: ExportFormat) -> bytes:
    """The export of a verified certificate in ``export_format``, as the bytes of its file.

    Args:
        verified: the verified certificate.
        export_format: CycloneDX 1.6 JSON; the model_signing Sigstore bundle (``model.sig``);
            the TPM-signed DSSE envelope of the SLSA statement; or the SLSA statement alone
            (canonical JSON).

    Raises:
        ExportUnavailableError: ``model-signing`` or ``slsa`` of a certificate that carries
            no such signed statement.
    """
    if export_format is ExportFormat.SLSA_STATEMENT:
        reference_values = verified.certificate.platform.reference_values
        return statement_json(provenance_statement(verified.measured, reference_values))
    if export_format is ExportFormat.SLSA:
        envelope = _signed(verified, "slsa-provenance").envelope
        return canonical_json(envelope.model_dump(mode="json"))
    if export_format is ExportFormat.MODEL_SIGNING:
        envelope = _signed(verified, "model-signing").envelope
        # The verification material is the AK chain the verifier just checked, leaf first.
        chain = [
            certificate
            for pem in verified.certificate.attestation.ak.certificate_chain
            for certificate in load_pem_certificates(pem)
        ]
        try:
            return model_signing_bundle(envelope.payload, envelope.signatures[0].sig, chain)
        except ModelSigningFormatError as exc:  # an RSA AK: the tool cannot verify it
            raise ExportUnavailableError(f"{verified.file_name}: {exc}") from None
    # Imported here: only this format needs cyclonedx-python-lib (the `export` extra).
    from .cyclonedx import bom_json

    return bom_json(verified).encode("utf-8")


def export(
    certificate: Annotated[Path, typer.Argument(help="The certificate (proof) JSON file.")],
    export_format: Annotated[
        ExportFormat,
        typer.Option(
            "--format",
            "-f",
            help="cyclonedx (1.6 ML-BOM), model-signing (OpenSSF bundle), slsa (provenance v1 "
            "signed by the TPM, DSSE) or slsa-statement (the statement alone).",
        ),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="The file to write.")],
    trust_root: TrustRootOption = None,
    reference_values: ReferenceValuesOption = None,
    allow_dev_platform: AllowDevPlatformOption = False,
) -> None:
    """Verify a certificate, then write it as a CycloneDX ML-BOM, a model_signing bundle or
    a SLSA provenance."""
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
    try:
        document = export_document(verified, export_format)
    except ExportUnavailableError as exc:
        error_console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
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
