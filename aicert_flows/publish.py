"""Publishing a certificate: assemble it, verify the very bytes, write them where they go.

``store-certificate`` writes the file the user asked for (``output_bom``, atomically) and the
copy in the flow's result storage, then emits ``aicert.certificate.created``; nothing is
written anywhere unless the bytes verify. The flow-run artifacts are made by the flow itself
from the published bytes (``publish_artifacts``), so the artifacts page names the flow run.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from prefect import get_run_logger
from prefect.runtime import flow_run as current_flow_run
from pydantic import BaseModel

import aicert
from aicert.exports.verified import VerifiedCertificate
from aicert.flows.artifacts import CertificateLocation, create_certificate_artifacts
from aicert.flows.assemble import assemble_certificate, certificate_digest
from aicert.flows.events import CERTIFICATE_CREATED, RunKind, emit_run_event
from aicert.flows.output_target import OutputTargetError, check_output_target
from aicert.guest_runtime.api_models import Evidence
from aicert.model import PlatformKind, write_atomic
from aicert.reference_values import PlatformReferenceValues
from aicert.tasks.platforms.base import EnrolledKey
from aicert.tasks.task_factory import aicert_task


@aicert_task("assemble-certificate")
def assemble_and_write(
    evidence: Evidence,
    enrolled: EnrolledKey,
    project: str,
    provider_kind: PlatformKind,
    reference_values: str | None,
    run_dir: str,
) -> str:
    """Build the certificate from the evidence; write it (and the platform CA it needs) to
    ``run_dir``. Returns the certificate's path."""
    certificate = assemble_certificate(
        evidence=evidence,
        enrolled=enrolled,
        project=project,
        provider=provider_kind,
        reference_values=reference_values,
    )
    path = Path(run_dir) / "certificate.json"
    certificate.write(path)
    if enrolled.trusted_root_pem:
        write_atomic(Path(run_dir) / "platform-ca.pem", enrolled.trusted_root_pem.encode())
    return str(path)


ReferenceValues = PlatformReferenceValues | Iterable[PlatformReferenceValues] | None


def _verify_before_publishing(
    certificate_path: str,
    data: bytes,
    reference_values: ReferenceValues,
    model_path: str | None = None,
) -> VerifiedCertificate:
    """Verify the very bytes about to be published (fail closed: nothing is written anywhere
    unless they verify), with the platform CA kept beside ``certificate_path`` in the run's
    folder; ``model_path``: the outputs, re-hashed against the certificate."""
    certificate = aicert.Certificate.from_json_bytes(data, source=certificate_path)
    platform_ca = Path(certificate_path).with_name("platform-ca.pem")
    report = certificate.verify(
        trusted_roots=[platform_ca] if platform_ca.exists() else [],
        allow_dev_platform=certificate.platform.kind == "local",
        reference_values=reference_values,
        model=model_path,
    )
    return VerifiedCertificate.of(certificate, report, raw=data, file_name="certificate.json")


def _write_output_bom(output_bom: str, data: bytes, certificate_path: str) -> str:
    """Write the certificate to ``output_bom`` atomically; returns where it was written."""
    # Checked again: the target may have changed during the run. The run is certified either
    # way, so the message points at the verified certificate kept with the run.
    try:
        return str(write_atomic(check_output_target(Path(output_bom)), data))
    except (OutputTargetError, OSError) as exc:
        reason = exc.reason if isinstance(exc, OutputTargetError) else exc.strerror
        raise OutputTargetError(
            Path(output_bom),
            f"cannot write the certificate there ({reason}); the run is certified and "
            f"its verified certificate is {certificate_path}",
        ) from None


def _write_to_result_storage(run_id: str, data: bytes) -> str:
    """Store the certificate in the flow's default result storage; returns its URL."""
    from prefect.results import get_default_result_storage

    stored_at = get_default_result_storage().write_path(f"aicert/{run_id}/certificate.json", data)
    storage_url = str(stored_at)
    if "://" not in storage_url:
        storage_url = Path(storage_url).resolve().as_uri()
    return storage_url


class PublishedCertificate(BaseModel):
    """Where ``store-certificate`` published a certificate.

    Attributes:
        path: The file published (``output_bom``, else the run's own copy).
        sha256: The SHA-256 of its bytes (hex).
        storage_url: Its copy in the flow's result storage.
    """

    path: str
    sha256: str
    storage_url: str


@aicert_task("store-certificate")
def store_certificate(
    certificate_path: str,
    run_id: str,
    project: str,
    output_bom: str | None,
    outputs_path: str | None = None,
    reference_values: ReferenceValues = None,
    kind: RunKind = "training",
) -> PublishedCertificate:
    """Publish: the file at ``output_bom`` (atomically), result storage, the event.

    ``outputs_path``: the run's outputs folder on this host, when the platform keeps one; the
    event carries it so that a downstream flow (verify-and-promote) can re-hash the model.
    ``kind``: the event's ``aicert.run.kind`` label (which flow certified the run). The
    artifacts are the flow's own (see ``aicert.flows.artifacts``).
    """
    logger = get_run_logger()
    data = Path(certificate_path).read_bytes()
    digest = certificate_digest(data)
    verification = _verify_before_publishing(certificate_path, data, reference_values)
    published = certificate_path
    if output_bom:
        published = _write_output_bom(output_bom, data, certificate_path)
        logger.info("certificate written to %s", published)
    storage_url = _write_to_result_storage(run_id, data)
    emit_run_event(
        CERTIFICATE_CREATED,
        run_id=run_id,
        project=project,
        flow_run_id=str(current_flow_run.id),
        flow_run_name=str(current_flow_run.name),
        payload={
            "run_id": run_id,
            "project": project,
            "certificate_sha256": digest,
            "certificate_path": published,
            "storage_url": storage_url,
            "platform": verification.report.platform,
            "outputs_path": outputs_path,
            "flow_run_id": str(current_flow_run.id),
            "kind": kind,
        },
        kind=kind,
    )
    return PublishedCertificate(path=published, sha256=digest, storage_url=storage_url)


def publish_artifacts(
    certificate_path: str,
    published: PublishedCertificate,
    output_bom: str | None,
    model_path: str,
    reference_values: ReferenceValues,
) -> None:
    """The flow-run artifacts, from the published bytes verified again with the model
    re-hashed (so "Verified" lists the re-hash of the files the run produced)."""
    data = Path(published.path).read_bytes()
    verified = _verify_before_publishing(certificate_path, data, reference_values, model_path)
    location = CertificateLocation(
        path=published.path,
        storage_url=published.storage_url,
        output_bom=output_bom,
        sha256=published.sha256,
    )
    create_certificate_artifacts(verified, location)
