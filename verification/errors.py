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
