"""The verifier's exceptions: one type per failure, all under ``VerificationError``.

A caller that only wants "valid or not" catches ``VerificationError``; a caller that
wants to know *what* failed catches the subclass. Nothing else escapes the verifier.
"""

from __future__ import annotations


class VerificationError(Exception):
    """Base class: the certificate or evidence does not prove what it claims."""


class MalformedCertificateError(VerificationError):
    """The certificate file is not valid ``aicert/v1`` JSON (schema, size, encoding)."""


class TpmStructureError(VerificationError):
    """A TPM structure (TPMS_ATTEST, TPMT_PUBLIC, TPMT_SIGNATURE, ...) cannot be parsed."""


class CertificateChainError(VerificationError):
    """The AK certificate does not chain to a trusted root, is expired, or has wrong usage."""


class AkMismatchError(VerificationError):
    """The AK public key differs from the certified one, or is not a restricted signing key."""


class QuoteSignatureError(VerificationError):
    """The quote signature does not verify with the AK, or uses a refused algorithm."""


class AttestStructureError(VerificationError):
    """TPMS_ATTEST is not a TPM-generated quote (magic or type wrong)."""


class NonceMismatchError(VerificationError):
    """The quote's extraData is not the run's nonce."""


class PcrSelectionError(VerificationError):
    """The signed PCR selection differs from the PCRs the certificate claims."""


class PcrDigestError(VerificationError):
    """The signed pcrDigest is not the digest of the claimed PCR values."""


class EventLogError(VerificationError):
    """An event log is malformed, or its replay does not give the quoted PCRs."""


class PlatformError(VerificationError):
    """The platform (boot chain, reference values, dev platform policy) is not acceptable."""


class BootPcrValueError(PlatformError):
    """Without a boot event log, quoted boot PCRs differ from every reference boot's values.

    Attributes:
        reference_id: the reference-value set.
        vm_family: the reference boot compared with (the one with the fewest differences).
        mismatches: each differing PCR as (index, quoted value, reference value).
    """

    def __init__(
        self,
        message: str,
        *,
        reference_id: str,
        vm_family: str,
        mismatches: tuple[tuple[int, bytes, bytes], ...],
    ) -> None:
        super().__init__(message)
        self.reference_id = reference_id
        self.vm_family = vm_family
        self.mismatches = mismatches


class Pcr14StartError(EventLogError):
    """Without a boot event log, the application log does not replay to the quoted PCR 14
    from the reference boot's PCR 14 start: the machine's PCR 14 did not start at the
    reference value (an unexplained start could hide application events), or the
    application events were edited."""


class ExpectationError(VerificationError):
    """An input the caller expected is missing from, or differs in, the certificate."""


class ArtifactMismatchError(VerificationError):
    """A model file or folder does not match the certified outputs."""


class StatementBindingError(VerificationError):
    """The signed statements differ from the envelopes whose digests PCR 15 measured
    (one stripped, added, reordered or changed)."""


class StatementContentError(VerificationError):
    """A signed statement's payload is not the statement the replayed event log gives."""


class StatementSignatureError(VerificationError):
    """A signed statement's DSSE signature does not verify with the certified AK."""


class LineageError(VerificationError):
    """A lineage link (a certified input's ``certifiedBy``) does not hold; each cause below
    is its own subclass, and every message names the link (the input's destination)."""


class LineageMissingParentError(LineageError):
    """``require_lineage``: a link's parent certificate was not supplied, so the link is
    unverified."""


class LineageCertificateDigestError(LineageError):
    """A supplied parent has the link's run id but not the certificate SHA-256 the child
    bound (an edited or different certificate of that run)."""


class LineageParentError(LineageError):
    """A parent certificate does not verify with the child's trust policy (its own
    ``VerificationError`` is the ``__cause__``)."""


class LineageOutputError(LineageError):
    """The parent does not certify the linked output path, or certifies it with another
    digest than the file the child measured."""


class LineageCycleError(LineageError):
    """A certificate is its own ancestor."""


class LineageDepthError(LineageError):
    """The lineage is deeper than ``aicert.lineage.MAX_LINEAGE_DEPTH`` links."""


class LineageUnusedParentError(LineageError):
    """A supplied parent is the parent of no link (the wrong parent was given)."""


class MetricMissingError(VerificationError):
    """A metric threshold names a metric the certificate's results file does not carry."""


class MetricThresholdError(VerificationError):
    """A certified metric fails the caller's threshold (the metric and both values named)."""


class PolicyError(VerificationError):
    """The certificate verified but fails the caller's verification policy; every failed
    rule is named (``failures``, one sentence per rule, each starting with the rule's key)."""

    def __init__(self, failures: list[str]) -> None:
        self.failures = tuple(failures)
        super().__init__(
            f"the policy is not met ({len(self.failures)} rule(s) failed): "
            + "; ".join(self.failures)
        )
