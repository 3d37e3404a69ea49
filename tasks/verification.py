"""The verification task, for downstream flows that must check a certificate before use."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

import aicert


@task(name="verify-certificate", cache_policy=NO_CACHE)
def verify_certificate(
    certificate_path: str,
    *,
    trusted_roots: Sequence[str] = (),
    expected_inputs: Mapping[str, str] | None = None,
    allow_dev_platform: bool = False,
    model_path: str | None = None,
    reference_values: Any | None = None,
) -> dict[str, Any]:
    """Verify a certificate file with the SDK; fail the task with the verifier's error.

    ``model_path``: the outputs folder, re-hashed against the certified outputs.
    ``reference_values``: the reference-value set(s) the boot chain must match (qemu, Azure).
    Returns the verification report as a dict (what was checked, what is bound).
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
