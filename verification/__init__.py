"""AICert: verify AI model certificates offline.

    import aicert
    report = aicert.load("proof.json").verify(trusted_roots=["platform-ca.pem"])

The bare install is this verifier alone (cryptography, pydantic, rfc8785): checking a
certificate never needs Prefect, Docker or a TPM library.
"""

from aicert.errors import (
    AkMismatchError,
    ArtifactMismatchError,
    AttestStructureError,
    CertificateChainError,
    EventLogError,
    ExpectationError,
    MalformedCertificateError,
    NonceMismatchError,
    PcrDigestError,
    PcrSelectionError,
    PlatformError,
    PolicyError,
    QuoteSignatureError,
    StatementBindingError,
    StatementContentError,
    StatementSignatureError,
    TpmStructureError,
    VerificationError,
)
from aicert.model import Certificate, load
from aicert.platform_attestation import PlatformAttestation, verify_platform_attestation
from aicert.policy import VerificationPolicy, load_policy
from aicert.quote import verify_quote
from aicert.tcg_eventlog import TcgEventLog, parse_event_log
from aicert.verify import Check, VerificationReport

__all__ = [
    "AkMismatchError",
    "ArtifactMismatchError",
    "AttestStructureError",
    "Certificate",
    "CertificateChainError",
    "Check",
    "EventLogError",
    "ExpectationError",
    "MalformedCertificateError",
    "NonceMismatchError",
    "PcrDigestError",
    "PcrSelectionError",
    "PlatformAttestation",
    "PlatformError",
    "PolicyError",
    "QuoteSignatureError",
    "StatementBindingError",
    "StatementContentError",
    "StatementSignatureError",
    "TcgEventLog",
    "TpmStructureError",
    "VerificationError",
    "VerificationPolicy",
    "VerificationReport",
    "load",
    "load_policy",
    "parse_event_log",
    "verify_platform_attestation",
    "verify_quote",
]
