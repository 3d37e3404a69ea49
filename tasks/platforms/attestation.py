"""Attesting a machine before the run is sent: the orchestrator's side of the platform quote.

Once the provider certified the machine's AK, the orchestrator asks a quote of PCR 0-15 over
a fresh challenge and checks, before it sends the run:

- the quote is signed by the certified AK and its extraData is the challenge's
  (``platform_quote_nonce``: never a run's nonce);
- PCR 14 holds exactly the channel key the orchestrator pinned on first contact (remote
  platforms: the agent measured its TLS key before serving) or nothing (local), and PCR 15
  nothing: the machine is fresh and the channel ends in the attested machine;
- with a reference-value set (qemu, Azure), the boot event log replays to the quoted PCR 0-9
  and matches the reference values (firmware, kernel, initrd, command line); an Azure boot
  whose log is empty is judged by its quoted PCR values instead (``aicert.boot_pcr_check``).

The checks are the verifier's own functions (the quote's through ``platform_quote``, shared
with the qemu image's observation boot); this module only chooses what to expect.
"""

from __future__ import annotations

import hmac

from cryptography import x509
from pydantic import BaseModel, ConfigDict

from aicert.appevents import (
    INPUTS_PCR,
    OUTPUTS_PCR,
    ChannelKeyEvent,
    event_digest,
    extend,
)
from aicert.boot_log_check import check_boot_evidence
from aicert.boot_pcr_check import boot_application_start
from aicert.chain import leaf_public_key_matches
from aicert.errors import AkMismatchError
from aicert.reference_values import PlatformReferenceValues
from aicert.tasks.platforms.agent_client import AgentClient
from aicert.tasks.platforms.base import EnrolledKey, Machine
from aicert.tasks.platforms.platform_quote import fresh_challenge, verified_platform_pcrs
from aicert.tpm_structures import parse_tpmt_public

ZERO_PCR = bytes(32)


class MachineAttestationError(RuntimeError):
    """The machine is not the attested, fresh machine the orchestrator expects."""


class ChannelBindingError(MachineAttestationError):
    """PCR 14 does not hold the channel key the orchestrator talks to."""


class MachineAttestation(BaseModel):
    """What the platform quote showed about the machine before the run was sent."""

    model_config = ConfigDict(extra="forbid")

    channel_key_sha256: str | None
    boot_chain: str | None
    pcrs: dict[str, str]


def expected_channel_pcr(
    certificate_pem: str | None, boot_start: bytes = ZERO_PCR
) -> tuple[bytes, ChannelKeyEvent | None]:
    """PCR 14 of a fresh machine whose agent serves TLS with ``certificate_pem`` (or none),
    from ``boot_start``: what the boot left in PCR 14 (``application_pcr_start``)."""
    if certificate_pem is None:
        return boot_start, None
    event = ChannelKeyEvent.for_certificate(certificate_pem.encode())
    return extend(boot_start, event_digest(event.to_event())), event


def attest_machine(
    machine: Machine,
    client: AgentClient,
    enrolled: EnrolledKey,
    reference: PlatformReferenceValues | None = None,
) -> MachineAttestation:
    """Run the checks in the module docstring; raise the verifier's errors (quote, event
    log, platform) or ``MachineAttestationError``."""
    challenge = fresh_challenge()
    evidence = client.platform_quote(challenge)
    leaf = x509.load_pem_x509_certificate(enrolled.ak_certificate_chain[0].encode())
    ak = parse_tpmt_public(evidence.ak_public)
    if not leaf_public_key_matches(leaf, ak.to_cryptography_key()):
        raise AkMismatchError("the platform quote is not signed by the certified AK")
    pcrs = verified_platform_pcrs(evidence, challenge)

    # Shim may have measured its MOK lists into PCR 14 during the boot: that is the start
    # (an Azure boot with an empty log: the reference boot's PCR 14, if its PCRs match one).
    start = boot_application_start(evidence.boot_event_log, pcrs, reference)
    expected, channel_event = expected_channel_pcr(machine.agent_certificate_pem, start[INPUTS_PCR])
    if not hmac.compare_digest(pcrs.get(INPUTS_PCR, b""), expected):
        if channel_event is None:
            raise MachineAttestationError(
                f"PCR {INPUTS_PCR} is not in its reset state: the machine was used before"
            )
        raise ChannelBindingError(
            f"PCR {INPUTS_PCR} does not hold the channel key this orchestrator is connected "
            f"to ({channel_event.public_key_sha256[:16]}...): the TLS peer is not the "
            f"attested machine, or the machine was used before (agent reports "
            f"{evidence.channel_key})"
        )
    if not hmac.compare_digest(pcrs.get(OUTPUTS_PCR, b""), start[OUTPUTS_PCR]):
        raise MachineAttestationError(
            f"PCR {OUTPUTS_PCR} is not in its reset state: the machine was used before"
        )

    boot_chain = None
    if reference is not None:
        if evidence.boot_event_log is None and reference.platform != "azure":
            raise MachineAttestationError(
                f"{machine.provider} platform: the machine sent no boot event log"
            )
        # An Azure boot without a log (Trusted Launch: zero bytes) is judged by its PCRs.
        boot_chain = check_boot_evidence(evidence.boot_event_log, pcrs, reference).note
    return MachineAttestation(
        channel_key_sha256=channel_event.public_key_sha256 if channel_event else None,
        boot_chain=boot_chain,
        pcrs={str(index): value.hex() for index, value in sorted(pcrs.items())},
    )
