"""Certified inputs on the host: each ``certifiedBy`` parent verified before the run starts.

A resource with ``certifiedBy`` names the certificate that produced it. Before the run is
sent, the orchestrator reads that certificate (a path or an http(s) URL), verifies it with the
run's own trust policy (the platform's trusted root, ``allow_dev_platform`` on the local
platform, the boot reference values), finds the named output, and pins the resource to that
output's SHA-256. The resolved link (the parent's certificate SHA-256 and run id) goes into
the configuration the agent measures; the agent then refuses a file whose digest differs, and
binds the link in an ``aicert.input.certified-resource`` event that any verifier re-checks
(``aicert.lineage``). The agent itself holds no trust policy, so this is where a parent that
does not verify stops the run.
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from prefect.logging import get_run_logger

from aicert.errors import VerificationError
from aicert.guest_runtime.config import Resource, RunConfig
from aicert.lineage import certificate_sha256
from aicert.model import MAX_CERTIFICATE_BYTES, Certificate
from aicert.reference_value_sets import PlatformReferenceValues
from aicert.tasks.task_factory import RetryPolicy, aicert_task

# Fetching a parent certificate over http(s): bounded like a certificate file.
FETCH_TIMEOUT_S = 60


class CertifiedInputError(RuntimeError):
    """A certified input's parent certificate cannot be read, does not verify, or does not
    certify the named output as the pinned digest; the message names the resource."""


def read_parent_certificate(reference: str) -> bytes:
    """The bytes of a parent certificate: an http(s) URL, or a path (the config loader made
    a relative one absolute). At most ``MAX_CERTIFICATE_BYTES``.

    Raises:
        OSError: it cannot be read or fetched, or is larger than a certificate may be.
    """
    if re.match(r"^https?://", reference):
        with urllib.request.urlopen(reference, timeout=FETCH_TIMEOUT_S) as response:  # noqa: S310
            data: bytes = response.read(MAX_CERTIFICATE_BYTES + 1)
    else:
        with Path(reference).open("rb") as handle:
            data = handle.read(MAX_CERTIFICATE_BYTES + 1)
    if len(data) > MAX_CERTIFICATE_BYTES:
        raise OSError(f"larger than {MAX_CERTIFICATE_BYTES} bytes, not a certificate")
    return data


def _resolve(
    resource: Resource,
    trusted_roots: Sequence[str],
    allow_dev_platform: bool,
    reference_values: PlatformReferenceValues | None,
) -> Resource:
    """The resource pinned to its verified parent's output, with the link resolved."""
    link = resource.certified_by
    assert link is not None
    where = f"resources[{resource.destination_path}]: certifiedBy {link.certificate}"
    try:
        data = read_parent_certificate(link.certificate)
    except OSError as exc:
        raise CertifiedInputError(f"{where}: cannot read it: {exc}") from exc
    try:
        parent = Certificate.from_json_bytes(data, source=link.certificate)
        parent.verify(
            trusted_roots=trusted_roots,
            allow_dev_platform=allow_dev_platform,
            reference_values=reference_values,
        )
    except VerificationError as exc:  # MalformedCertificateError included
        raise CertifiedInputError(
            f"{where}: the parent certificate does not verify with this run's trust policy "
            f"({type(exc).__name__}: {exc}); training will not start"
        ) from exc
    output = next((o for o in parent.outputs if o.path == link.output), None)
    if output is None:
        raise CertifiedInputError(
            f"{where}: run {parent.run.id} certifies no output {link.output}; "
            "training will not start"
        )
    digest = output.digest["sha256"]
    if resource.sha256 is not None and resource.sha256 != digest:
        raise CertifiedInputError(
            f"{where}: the config pins sha256 {resource.sha256}, run {parent.run.id} "
            f"certifies {link.output} as {digest}; training will not start"
        )
    resolved = link.model_copy(
        update={"certificate_sha256": certificate_sha256(parent), "run_id": parent.run.id}
    )
    return resource.model_copy(update={"sha256": digest, "certified_by": resolved})


def resolve_certified_inputs(
    config: RunConfig,
    *,
    trusted_roots: Sequence[str],
    allow_dev_platform: bool,
    reference_values: PlatformReferenceValues | None = None,
) -> RunConfig:
    """The configuration with every ``certifiedBy`` resource verified and pinned.

    Args:
        config: the validated configuration (certificate paths already absolute).
        trusted_roots: the run's trusted AK roots (PEM), as the run's own certificate is
            verified with.
        allow_dev_platform: accept a local-platform parent (the local platform's policy).
        reference_values: the boot reference values the run's platform is judged by.

    Raises:
        CertifiedInputError: naming the resource whose parent failed.
    """
    if not any(resource.certified_by is not None for resource in config.resources):
        return config
    resources = [
        resource
        if resource.certified_by is None
        else _resolve(resource, trusted_roots, allow_dev_platform, reference_values)
        for resource in config.resources
    ]
    return config.model_copy(update={"resources": resources})


@aicert_task("verify-certified-inputs", retry=RetryPolicy(delays_s=()))
def verify_certified_inputs(
    config: RunConfig,
    trusted_roots: list[str],
    allow_dev_platform: bool,
    reference_values: PlatformReferenceValues | None = None,
) -> RunConfig:
    """Verify each certified input's parent certificate with the run's trust policy and pin
    the input to the certified output (see the module docstring); not retried: a parent that
    does not verify will not verify on a second try."""
    resolved = resolve_certified_inputs(
        config,
        trusted_roots=trusted_roots,
        allow_dev_platform=allow_dev_platform,
        reference_values=reference_values,
    )
    logger = get_run_logger()
    for resource in resolved.resources:
        if resource.certified_by is not None:
            logger.info(
                "%s: certified by run %s as %s (%s)",
                resource.destination_path,
                resource.certified_by.run_id,
                resource.certified_by.output,
                resource.sha256,
            )
    return resolved
