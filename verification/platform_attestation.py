"""Raw cloud vTPM evidence checked with AICert's checks: ``verify_platform_attestation``.

Evidence gathered on a real cloud VM by other tools (go-tpm-tools' ``gotpm attest``,
tpm2-tools' ``tpm2_quote`` and ``tpm2_nvread``) is an AK certificate chain, a quote (the
TPMS_ATTEST and its TPMT_SIGNATURE), the nonce it was asked with, the PCR values it covers and
the boot event log. :func:`verify_platform_attestation` checks it as the certificate verifier
checks a certificate's attestation (steps 2, 3 and 4-5 of docs/verification-checks.md, and
the boot log of step 8), without a certificate around it:

1. the AK certificate chains to the platform's pinned roots (Google's two vTPM roots for
   ``gcp``, Microsoft's for ``azure``; Google's intermediates are shipped) or a caller's root,
   valid at ``at_time``;
2. when the AK's TPMT_PUBLIC is given, it is the certified key and a restricted signing key;
3. the quote is signed by the certified key, carries the nonce, and selects and digests
   exactly the given PCRs;
4. the boot event log, when given, replays to the quoted PCR 0-9; with a reference-value set
   it is judged against it, naming the component that differs.

Each failure raises the certificate verifier's exception for that check (all
``aicert.VerificationError``); a caller's mistake (a naive time, a wrong type) is a
``TypeError`` or ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from aicert.boot_events import replay_against_quote
from aicert.boot_log_check import BootReport, check_boot_log
from aicert.chain import (
    ChainVerification,
    issuer_key_purposes,
    leaf_public_key_matches,
    pinned_roots,
    shipped_intermediates,
    verify_ak_chain,
)
from aicert.errors import AkMismatchError, PlatformError, TpmStructureError
from aicert.quote import verify_quote
from aicert.reference_value_sets import PlatformReferenceValues
from aicert.tcg_eventlog import TcgEventLog, parse_event_log
from aicert.tpm_structures import TpmsAttest, parse_tpmt_public
from aicert.verify import TrustRoot, load_trust_roots

__all__ = ["CloudPlatform", "PlatformAttestation", "verify_platform_attestation"]

CloudPlatform = Literal["gcp", "azure"]
_CLOUD_PLATFORMS: tuple[CloudPlatform, ...] = ("gcp", "azure")


@dataclass(frozen=True)
class PlatformAttestation:
    """What :func:`verify_platform_attestation` established.

    Attributes:
        platform: the cloud the evidence was judged for.
        chain: the verified AK certificate chain (leaf to the root it chains to).
        quote: the verified quote's TPMS_ATTEST (its clock, firmware version, extraData).
        pcrs: the PCR values the quote covers (SHA-256 bank), by index.
        boot_log: the boot event log, parsed and replayed to the quoted PCR 0-9; None when
            none was given.
        boot: the boot judged against the reference values; None when none were given.
    """

    platform: CloudPlatform
    chain: ChainVerification
    quote: TpmsAttest
    pcrs: Mapping[int, bytes]
    boot_log: TcgEventLog | None
    boot: BootReport | None


def _checked_platform(platform: str) -> CloudPlatform:
    for known in _CLOUD_PLATFORMS:
        if platform == known:
            return known
    raise ValueError(f"platform must be one of {_CLOUD_PLATFORMS}, not {platform!r}")


def _checked_time(at_time: datetime | None) -> datetime:
    if at_time is None:
        return datetime.now(UTC)
    if not isinstance(at_time, datetime):
        raise TypeError(f"at_time must be a datetime, not {type(at_time).__name__}")
    if at_time.tzinfo is None or at_time.utcoffset() is None:
        raise ValueError("at_time must be timezone-aware")
    return at_time.astimezone(UTC)


def _check_ak_public(ak_public: bytes, chain: ChainVerification) -> bytes:
    """The AK's TPMT_PUBLIC is the certified key and a restricted signing key."""
    try:
        ak = parse_tpmt_public(ak_public)
    except TpmStructureError as exc:
        raise AkMismatchError(f"ak_public: {exc}") from None
    if not leaf_public_key_matches(chain.leaf, ak.to_cryptography_key()):
        raise AkMismatchError("ak_public is not the key in the AK certificate")
    if not ak.is_restricted_signing_key():
        raise AkMismatchError(
            "ak_public is not a restricted signing key (fixedTPM, fixedParent, "
            "sensitiveDataOrigin, restricted, sign): it could sign forged quotes"
        )
    return ak_public


def _boot(
    event_log: bytes | None,
    pcrs: Mapping[int, bytes],
    reference: PlatformReferenceValues | None,
    platform: CloudPlatform,
) -> tuple[TcgEventLog | None, BootReport | None]:
    if not event_log:
        if reference is not None:
            raise PlatformError(
                f"{platform} platform: reference values were given but no boot event log"
            )
        return None, None
    log = parse_event_log(event_log)
    if reference is None:
        replay_against_quote(log, pcrs)
        return log, None
    if reference.platform != platform:
        raise PlatformError(
            f"{platform} platform: the reference values {reference.id!r} are for platform "
            f"{reference.platform!r}"
        )
    return log, check_boot_log(log, pcrs, reference)


def verify_platform_attestation(
    ak_certificate_chain: Sequence[str | bytes],
    attest: bytes,
    signature: bytes,
    nonce: bytes,
    pcrs: Mapping[int, bytes],
    event_log: bytes | None = None,
    platform: CloudPlatform = "gcp",
    *,
    ak_public: bytes | None = None,
    trusted_roots: Iterable[TrustRoot] = (),
    at_time: datetime | None = None,
    reference_values: PlatformReferenceValues | None = None,
) -> PlatformAttestation:
    """Check raw vTPM evidence from a cloud VM: AK chain, quote and boot event log.

    Args:
        ak_certificate_chain: the AK certificate first (GCE: NV 0x01c10000 RSA or
            0x01c10002 ECC; Azure: NV 0x01C101D0), then any intermediates, PEM each.
        attest: the quote's TPMS_ATTEST (``tpm2_quote -m``).
        signature: its TPMT_SIGNATURE (``tpm2_quote -s``).
        nonce: the nonce the quote was asked with (its extraData).
        pcrs: the SHA-256 PCR values the quote covers, by index (all of PCR 0-9 with a log).
        event_log: the TCG boot event log (``binary_bios_measurements``); None or empty
            for none.
        platform: ``"gcp"`` or ``"azure"``: which cloud's pinned roots the chain must reach.
        ak_public: the AK's TPMT_PUBLIC, to check its attributes too; without it the
            certificate's key checks the signature and the attributes are the cloud's word.
        trusted_roots: roots trusted besides the pinned ones (tests, private clouds).
        at_time: when to judge the chain's validity (timezone-aware; default: now).
        reference_values: a set of the same platform that judges the boot log.

    Returns:
        The verified chain, the parsed quote, the PCR values, the replayed boot log and the
        boot report.

    Raises:
        CertificateChainError: the chain reaches no pinned or trusted root at ``at_time``.
        AkMismatchError: ``ak_public`` is not the certified key or not a restricted
            signing key.
        QuoteSignatureError, AttestStructureError, NonceMismatchError, PcrSelectionError,
            PcrDigestError: the quote does not verify (see ``aicert.verify_quote``).
        EventLogError: the boot log does not parse or replay to the quoted PCR 0-9.
        PlatformError: the boot differs from the reference values (naming the component),
            or reference values were given without a log.
        TypeError, ValueError: a caller's mistake (an unknown platform, a naive time).
    """
    kind = _checked_platform(platform)
    judge_time = _checked_time(at_time)
    roots = load_trust_roots(trusted_roots)
    if isinstance(ak_certificate_chain, str | bytes):
        raise TypeError("ak_certificate_chain must be a list of PEM certificates (leaf first)")
    chain = verify_ak_chain(
        [*ak_certificate_chain, *shipped_intermediates(kind)],
        trusted_roots=roots,
        pinned_root_fingerprints=pinned_roots(kind),
        at_time=judge_time,
        issuer_purposes=issuer_key_purposes(kind),
    )
    key = _check_ak_public(ak_public, chain) if ak_public is not None else chain.leaf.public_key()
    claimed = {int(index): bytes(value) for index, value in pcrs.items()}
    quote = verify_quote(attest, signature, key, nonce, claimed)
    boot_log, boot = _boot(event_log, claimed, reference_values, kind)
    return PlatformAttestation(
        platform=kind, chain=chain, quote=quote, pcrs=claimed, boot_log=boot_log, boot=boot
    )
