"""The flow-run artifacts of a certified run: what a Prefect user reads on the run's page.

Created by the flow itself (not inside a task), so the artifacts page names the flow run:

- ``aicert-<project>-certificate`` (markdown): the run, the platform (a warning box on the
  ``local`` development platform), every input and output with its full SHA-256, and what
  was verified, the model re-hash included;
- ``aicert-<project>-bom`` (table): the certified inputs and outputs, few columns so that the
  SHA-256 column is shown whole;
- ``aicert-<project>-certificate-file`` (link): where the certificate really is: a remote
  result storage (``s3://``...), else the path the user asked for (``output_bom``), else the
  local result storage;
- ``aicert-<project>-cyclonedx`` and ``aicert-<project>-slsa`` (markdown): the exports of
  the verified certificate (``aicert export``), also written next to it in result storage.

Every value shown comes from the verifier's report of the published bytes, never from the
flow's own bookkeeping.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from aicert.exports.cli import ExportFormat, ExportUnavailableError, export_document
from aicert.exports.verified import VerifiedCertificate
from aicert.model import InputRecord
from aicert.verify import VerificationReport

# How long an export shown inline may be; the full file is in result storage either way.
MAX_INLINE_EXPORT_CHARS = 200_000
EXPORT_SUFFIXES = {
    ExportFormat.CYCLONEDX: "cdx.json",
    ExportFormat.SLSA: "slsa.json",  # the TPM-signed DSSE envelope
    ExportFormat.MODEL_SIGNING: "model.sig",  # the OpenSSF model signing bundle
}


def artifact_key(project: str, kind: str) -> str:
    """A stable artifact key, reduced to what Prefect accepts (``^[a-z0-9-]*$``).

    Args:
        project: The run's project.
        kind: What the artifact holds (``certificate``, ``bom``...).

    Returns:
        ``aicert-<project>-<kind>``, lower case, other characters replaced by ``-``.
    """
    return re.sub(r"[^a-z0-9-]", "-", f"aicert-{project}-{kind}".lower())[:100]


@dataclass(frozen=True)
class CertificateLocation:
    """Where a published certificate lives.

    Attributes:
        path: The file the flow published (``output_bom``, else the run's own copy).
        storage_url: Its copy in the flow's result storage.
        output_bom: The path the user asked for, if any.
        sha256: The SHA-256 of its bytes (hex).
    """

    path: str
    storage_url: str
    output_bom: str | None
    sha256: str

    def best_link(self) -> tuple[str, str]:
        """The address a reader should follow, and a text saying what it is."""
        if not self.storage_url.startswith("file://"):
            return self.storage_url, f"certificate.json in result storage ({self.sha256[:12]})"
        if self.output_bom:
            where = Path(self.output_bom).resolve()
            return where.as_uri(), f"{self.output_bom} ({self.sha256[:12]})"
        return self.storage_url, f"certificate.json in local result storage ({self.sha256[:12]})"


def _inline(text: str) -> str:
    """``text`` inside a Markdown list item's bold: no line break, no emphasis marker."""
    return text.replace("*", "\\*").replace("|", "\\|").replace("\n", " ")


def input_label(item: InputRecord) -> str:
    """How an input is named to people: a source by its repository URL (not the folder it
    was cloned to), anything else by its name; the version when there is one."""
    if item.kind == "source" and item.uri:
        return f"{item.uri} @ {item.version}" if item.version else item.uri
    return f"{item.name} {item.version}" if item.version else item.name


def _hash(value: str) -> str:
    """A full SHA-256 in two halves, so that a narrow column wraps it instead of clipping."""
    return f"`{value[:32]}` `{value[32:]}`"


def _size(size: int | None) -> str:
    return "" if size is None else f" ({size:,} B)"


def _platform_lines(report: VerificationReport) -> list[str]:
    if report.boot_chain_attested:
        return [f"- **Platform**: {report.platform}, boot chain attested"]
    # One paragraph: Prefect's Markdown renders each line of a quote on its own line, and
    # knows no GitHub "[!WARNING]" alerts.
    return [
        f"> ⚠️ **Development platform ({report.platform}): no firmware, boot chain or OS was "
        "attested.** This certificate verifies only with `allow_dev_platform=True`; do not "
        "treat it as evidence of where the model was trained."
    ]


def certificate_markdown(report: VerificationReport, location: CertificateLocation) -> str:
    """The certificate artifact's Markdown.

    Args:
        report: The verification report of the published bytes (with the model re-hash).
        location: Where the certificate was published.

    Returns:
        The Markdown text.
    """
    lines = [
        f"# AICert certificate: {report.project}",
        "",
        *_platform_lines(report),
        "",
        f"- **Run**: `{report.run_id}`, exit code {report.exit_code}, "
        f"{report.duration_ms / 1000:.1f} s of training",
        f"- **Attestation key**: chains to {report.ak_root_subject}, chain valid until "
        f"{report.ak_chain_expires_at:%Y-%m-%d}",
        f"- **Certificate**: `{location.path}` (SHA-256 {_hash(location.sha256)})",
        "",
        "## Inputs (PCR 14)",
        "",
    ]
    # Lists, not tables: a table as wide as its longest path clips its last column.
    lines += [
        f"- {item.kind} **{_inline(input_label(item))}**{_size(item.size)}: "
        f"{_hash(item.digest['sha256'])}"
        for item in report.inputs
    ]
    lines += ["", "## Outputs (PCR 15)", ""]
    lines += [
        f"- **{_inline(output.path)}**{_size(output.size)}: {_hash(output.digest['sha256'])}"
        for output in report.outputs
    ]
    lines += ["", "## Verified", ""]
    lines += [f"- **{check.name}**: {check.detail}" for check in report.checks]
    return "\n".join(lines) + "\n"


def bom_rows(report: VerificationReport) -> list[dict[str, str]]:
    """The bill-of-materials table: one row per certified input and output."""
    rows = [
        {"item": f"input: {item.kind}", "name": input_label(item), "sha256": item.digest["sha256"]}
        for item in report.inputs
    ]
    rows += [
        {"item": "output", "name": output.path, "sha256": output.digest["sha256"]}
        for output in report.outputs
    ]
    return rows


def _write_export(storage_dir: str, verified: VerifiedCertificate, fmt: ExportFormat) -> str:
    """The export in ``fmt``, written beside the certificate in result storage; its text."""
    from prefect.results import get_default_result_storage

    document = export_document(verified, fmt)
    relative = f"{storage_dir}/certificate.{EXPORT_SUFFIXES[fmt]}"
    get_default_result_storage().write_path(relative, document)
    return document.decode("utf-8")


def create_export_artifacts(verified: VerifiedCertificate, storage_dir: str) -> list[str]:
    """The CycloneDX, SLSA and model signing exports of ``verified`` as artifacts (and files
    in result storage beside the certificate). Returns the formats exported; a format whose library
    is not installed (CycloneDX needs the ``export`` extra), or that the certificate cannot
    give (a certificate without the TPM-signed SLSA envelope), is logged and left out."""
    done: list[str] = []
    project = verified.report.project
    for fmt in EXPORT_SUFFIXES:
        try:
            text = _write_export(storage_dir, verified, fmt)
        except (ImportError, ExportUnavailableError) as exc:
            logging.getLogger(__name__).warning("no %s export: %s", fmt.value, exc)
            continue
        shown = text if len(text) <= MAX_INLINE_EXPORT_CHARS else text[:MAX_INLINE_EXPORT_CHARS]
        create_markdown_artifact(
            key=artifact_key(project, fmt.value),
            markdown=f"# {fmt.value} export of run `{verified.report.run_id}`\n\n"
            f"```json\n{shown}\n```\n",
            description=f"The verified certificate as {fmt.value} ({len(text):,} characters)",
        )
        done.append(fmt.value)
    return done


def create_certificate_artifacts(
    verified: VerifiedCertificate, location: CertificateLocation
) -> None:
    """The certificate's summary, its bill of materials, the link to it and its exports.

    Args:
        verified: The published certificate, verified (with the model re-hash).
        location: Where it was published.
    """
    report = verified.report
    create_markdown_artifact(
        key=artifact_key(report.project, "certificate"),
        markdown=certificate_markdown(report, location),
        description=f"AICert certificate of run {report.run_id}",
    )
    create_table_artifact(
        key=artifact_key(report.project, "bom"),
        table=bom_rows(report),
        description="Certified inputs (PCR 14) and outputs (PCR 15)",
    )
    link, text = location.best_link()
    create_link_artifact(
        key=artifact_key(report.project, "certificate-file"),
        link=link,
        link_text=text,
        description=f"Where the certificate of run {report.run_id} is stored",
    )
    create_export_artifacts(verified, f"aicert/{report.run_id}")
