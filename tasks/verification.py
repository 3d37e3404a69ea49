"""The verification task, for downstream flows that must check a certificate before use."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from prefect.logging import get_run_logger
from pydantic import BaseModel, JsonValue

import aicert
from aicert.policy import VerificationPolicy
from aicert.reference_values import PlatformReferenceValues
from aicert.tasks.task_factory import aicert_task


class CheckResult(BaseModel):
    """One check the verifier passed.

    Attributes:
        name: The check (``quote-signature``, ``model``...).
        detail: What it established, in words.
    """

    name: str
    detail: str


class CertificateVerification(BaseModel):
    """What ``verify-certificate`` returns: ``VerificationReport.to_dict()`` as a model
    (times as ISO 8601 text, inputs and outputs as their JSON form).

    Attributes:
        verified: Always true (a failed verification raises instead).
        run_id: The certified run's id.
        project: Its project.
        platform: ``local``, ``qemu`` or ``azure``.
        boot_chain_attested: Whether a measured boot was checked against reference values.
        platform_note: What the platform check established, in words.
        ak_root_subject: The trust root the AK certificate chains to.
        ak_root_fingerprint_sha256: That root's SHA-256 fingerprint.
        ak_chain_expires_at: When the AK chain expires.
        verified_at_time: The time the chain was judged at.
        nonce: The run's nonce (hex).
        runtime_version: The agent's version.
        exit_code: The training's exit code.
        duration_ms: The training's duration.
        finished_at: When the run finished.
        inputs: The certified inputs.
        outputs: The certified outputs (``path``, ``size``, ``digest``).
        pcrs: The quoted PCR values by index.
        checks: Every check passed, in order.
        metrics: The certified metrics of the run's results file (name -> value).
        lineage: The certified inputs' links, each with its verified parent's tree.
    """

    verified: bool
    run_id: str
    project: str
    platform: str
    boot_chain_attested: bool
    platform_note: str
    ak_root_subject: str
    ak_root_fingerprint_sha256: str
    ak_chain_expires_at: str
    verified_at_time: str
    nonce: str
    runtime_version: str
    exit_code: int
    duration_ms: int
    finished_at: str
    inputs: list[dict[str, JsonValue]]
    outputs: list[dict[str, JsonValue]]
    pcrs: dict[str, str]
    checks: list[CheckResult]
    metrics: dict[str, float] = {}
    lineage: list[dict[str, JsonValue]] = []


@aicert_task("verify-certificate")
def verify_certificate(
    certificate_path: str,
    *,
    trusted_roots: Sequence[str] = (),
    expected_inputs: Mapping[str, str] | None = None,
    allow_dev_platform: bool = False,
    model_path: str | None = None,
    reference_values: PlatformReferenceValues | Iterable[PlatformReferenceValues] | None = None,
    parents: Sequence[str] = (),
    policy: VerificationPolicy | None = None,
) -> CertificateVerification:
    """Verify a certificate file with the SDK; fail the task with the verifier's error.

    Args:
        certificate_path: The certificate file.
        trusted_roots: PEM files of trusted platform CAs (the local/qemu platform CA).
        expected_inputs: Input name, URI or path -> the SHA-256 (a source: the git commit)
            the run must have measured for it.
        allow_dev_platform: Accept ``local`` certificates, which attest no boot chain.
        model_path: The outputs folder, re-hashed against the certified outputs.
        reference_values: The reference-value set(s) the boot chain must match (qemu, Azure).
        parents: Certificate files of the certified inputs' lineage (each verified alike).
        policy: A verification policy the verified report must meet (``aicert.policy``).

    Returns:
        The verification report (what was checked, what is bound).
    """
    logger = get_run_logger()
    report = aicert.load(certificate_path).verify(
        trusted_roots=list(trusted_roots),
        expected_inputs=expected_inputs,
        allow_dev_platform=allow_dev_platform,
        model=model_path,
        reference_values=reference_values,
        parents=list(parents),
        policy=policy,
    )
    for check in report.checks:
        logger.info("verified %s: %s", check.name, check.detail)
    return CertificateVerification.model_validate(report.to_dict())
