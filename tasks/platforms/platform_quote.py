"""The host's check of a platform quote: the one step the orchestrator and the image build share.

Before a run is sent (``attestation.attest_machine``) and when a qemu guest image's boot is
observed (``qemu.observe``), the host asks the machine's agent for a quote of PCR 0-15 over a
fresh challenge and checks it with the verifier's own functions: signed by the AK the agent
sent, over ``platform_quote_nonce(challenge)`` (never a run's nonce) and the PCR values it
reports. What the PCR values must be is each caller's business.
"""

from __future__ import annotations

import secrets

from aicert.guest_runtime.api_models import PlatformEvidence
from aicert.quote import verify_quote
from aicert.reference_values import platform_quote_nonce

# The challenge's length: a SHA-256's worth of randomness.
CHALLENGE_BYTES = 32


def fresh_challenge() -> bytes:
    """A new random challenge for a platform quote."""
    return secrets.token_bytes(CHALLENGE_BYTES)


def verified_platform_pcrs(evidence: PlatformEvidence, challenge: bytes) -> dict[int, bytes]:
    """The PCR values of ``evidence``, once its quote is shown to answer ``challenge``.

    Args:
        evidence: The agent's answer to ``AgentClient.platform_quote(challenge)``.
        challenge: The challenge it was asked with.

    Returns:
        The quoted PCR values by index.

    Raises:
        aicert.errors.VerificationError: the quote is not signed by ``evidence.ak_public``,
            not over this challenge's nonce, or not over these PCR values (the verifier's
            ``verify_quote`` errors).
    """
    pcrs = {int(index): bytes.fromhex(value) for index, value in evidence.pcrs.items()}
    verify_quote(
        evidence.attest,
        evidence.signature,
        evidence.ak_public,
        platform_quote_nonce(challenge),
        pcrs,
    )
    return pcrs
