"""The verification task, for downstream flows that must check a certificate before use."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from prefect.logging import get_run_logger

import aicert
from aicert.reference_values import PlatformReferenceValues
from aicert.tasks.task_factory import aicert_task


@aicert_task("verify-certificate")
def verify_certificate(
    certificate_path: str,
    *,
    trusted_roots: Sequence[str] = (),
    expected_inputs: Mapping[str, str] | None = None,
    allow_dev_platform: bool = False,
    model_path: str | None = None,
    reference_values: PlatformReferenceValues | Iterable[PlatformReferenceValues] | None = None,
) -> dict[str, Any]:
    """Verify a certificate file with the SDK; fail the task with the verifier's error.

    Args:
        certificate_path: The certificate file.
        trusted_roots: PEM files of trusted platform CAs (the local/qemu platform CA).
        expected_inputs: Input name, URI or path -> the SHA-256 (a source: the git commit)
            the run must have measured for it.
        allow_dev_platform: Accept ``local`` certificates, which attest no boot chain.
        model_path: The outputs folder, re-hashed against the certified outputs.
        reference_values: The reference-value set(s) the boot chain must match (qemu, Azure).

    Returns:
        The verification report as a dict (what was checked, what is bound).
    """
    logger = get_run_logger()
    report = aicert.load(certificate_path).verify(
        trusted_roots=list(trusted_roots),
        expected_inputs=expected_inputs,
        allow_dev_platform=allow_dev_platform,
        model=model_path,
        reference_values=reference_values,
    )
    for check in report.checks:
        logger.info("verified %s: %s", check.name, check.detail)
    return report.to_dict()
