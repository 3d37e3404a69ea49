"""Plain functions of the orchestrator: run ids, nonces, certificate assembly, summaries."""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime

from aicert.appevents import interpret
from aicert.guest_runtime.api_models import Evidence
from aicert.model import (
    FORMAT,
    Attestation,
    AttestationKey,
    Certificate,
    EndorsementKey,
    Platform,
    PlatformKind,
    Quote,
    RunInfo,
)
from aicert.tasks.platforms.base import EnrolledKey

NONCE_BYTES = 32


def new_run_id(project: str) -> str:
    """A run id unique to this run: the project, the UTC time and 32 random bits."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{project}-{stamp}-{secrets.token_hex(4)}"


def new_nonce() -> bytes:
    """A fresh random nonce, measured into PCR 14 at the run's start (the quote's freshness)."""
    return secrets.token_bytes(NONCE_BYTES)


PLATFORM_DESCRIPTIONS: dict[str, str] = {
    "local": "software TPM (swtpm) on the build host; no boot chain attested",
    "qemu": "qemu VM with OVMF firmware and a swtpm vTPM; boot chain measured",
    "azure": "Azure Trusted Launch / Confidential VM with vTPM",
    "gcp": "Google Compute Engine Shielded VM with vTPM, Secure Boot and integrity monitoring",
}


def assemble_certificate(
    *,
    evidence: Evidence,
    enrolled: EnrolledKey,
    project: str,
    provider: PlatformKind,
    reference_values: str | None = None,
) -> Certificate:
    """Build the ``aicert/v1`` certificate from the agent's evidence (nothing is trusted here:
    the verifier re-derives everything it shows from the quote and the event log)."""
    measured = interpret(evidence.event_log)
    run = RunInfo(
        id=measured.runtime.run_id,
        project=project,
        provider=provider,
        started_at=datetime.fromisoformat(evidence.started_at),
        finished_at=datetime.fromisoformat(evidence.finished_at),
        exit_code=measured.result.exit_code,
        duration_ms=measured.result.duration_ms,
        runtime_version=measured.runtime.runtime_version,
    )
    return Certificate(
        format=FORMAT,
        run=run,
        inputs=measured.input_records(),
        outputs=measured.output_records(),
        event_log=list(evidence.event_log),
        boot_event_log=evidence.boot_event_log,
        platform=Platform(
            kind=provider,
            reference_values=reference_values,
            description=PLATFORM_DESCRIPTIONS[provider],
        ),
        attestation=Attestation(
            quote=Quote(attest=evidence.attest, signature=evidence.signature, pcrs=evidence.pcrs),
            nonce=evidence.nonce,
            ak=AttestationKey(
                public=evidence.ak_public, certificate_chain=enrolled.ak_certificate_chain
            ),
            ek=EndorsementKey(certificate=enrolled.ek_certificate_pem),
        ),
        # The envelopes as the agent signed them; their Sigstore bundle's verification
        # material is attestation.ak.certificate_chain, added when one is exported.
        signed_statements=list(evidence.signed_statements) or None,
    )


def certificate_digest(data: bytes) -> str:
    """The SHA-256 (hex) of a certificate file's bytes, as events and the registry name it."""
    return hashlib.sha256(data).hexdigest()
