"""Statements the TPM signs inside the attested machine, and their check by the verifier.

After the outputs and the result are measured into PCR 15, the guest agent builds two
statements from its own event log, with the functions of this module:

- ``model-signing``: the OpenSSF model signing statement of the output files
  (:mod:`aicert.model_signing_format`), which ``model_signing verify certificate`` accepts
  once wrapped in a Sigstore bundle with the AK certificate chain (ECDSA AKs only: the tool
  verifies no other key type);
- ``slsa-provenance``: the in-toto Statement v1 with the SLSA Provenance v1 predicate
  (:mod:`aicert.slsa_provenance`), without ``internalParameters.referenceValues``: which
  reference-value set will judge the boot is the verifier's choice, unknown inside the
  machine.

The AK signs each DSSE pre-authentication encoding (``tpm_signing.tpm_sign``, the TPM
hashing the bytes itself) and the agent measures one ``aicert.output.signed-statements``
event holding the SHA-256 of each envelope before the quote. The envelopes travel in the
certificate's ``signed_statements``.

:func:`verify_signed_statements` is the verifier's step: each payload is byte for byte the
statement the replayed log gives (``StatementContentError``), each signature verifies with
the certified AK (``StatementSignatureError``), and the envelopes are exactly those whose
digests PCR 15 measured, no more, no fewer, in order (``StatementBindingError``). Content and
signature are judged before the binding so that each forgery is named for what it changed:
an edited statement is refused as edited, not merely as unmeasured.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from aicert.appevents import MeasuredRun, SignedStatementsEvent, StatementDigest
from aicert.canonical import canonical_json
from aicert.errors import (
    StatementBindingError,
    StatementContentError,
    StatementSignatureError,
)
from aicert.hashing import FileDigest
from aicert.model import (
    Certificate,
    DsseEnvelope,
    DsseSignature,
    SignedStatement,
    StatementKind,
)
from aicert.model_signing_format import (
    DSSE_PAYLOAD_TYPE,
    ModelSigningFormatError,
    dsse_pae,
    model_statement,
)
from aicert.slsa_provenance import provenance_statement, statement_json

AkPublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


def model_name(measured: MeasuredRun) -> str:
    """The model_signing subject's name: the project name, or the run id (informative only:
    ``model_signing`` compares digests, not this name)."""
    return measured.project or measured.runtime.run_id


def model_signing_payload(measured: MeasuredRun) -> bytes:
    """The model_signing statement of the measured output files, as the DSSE payload.

    Args:
        measured: the run the event log proves.

    Raises:
        ModelSigningFormatError: an output sits where the signature file goes (``model.sig``),
            so no bundle the tool accepts can describe these outputs.
    """
    files = [FileDigest(path=o.path, size=o.size, sha256=o.sha256) for o in measured.outputs]
    return model_statement(model_name(measured), files).payload


def slsa_payload(measured: MeasuredRun) -> bytes:
    """The SLSA provenance statement signed inside the machine, as the DSSE payload.

    Args:
        measured: the run the event log proves.
    """
    return statement_json(provenance_statement(measured, None))


def statement_payload(kind: StatementKind, measured: MeasuredRun) -> bytes:
    """The payload of the statement of ``kind`` for ``measured``.

    Args:
        kind: which statement.
        measured: the run the event log proves.

    Raises:
        ModelSigningFormatError: see :func:`model_signing_payload`.
    """
    if kind == "model-signing":
        return model_signing_payload(measured)
    return slsa_payload(measured)


def ak_keyid(key: AkPublicKey) -> str:
    """The key id an envelope names the AK by: SHA-256 (hex) of its DER SubjectPublicKeyInfo.

    DSSE leaves key ids to the application and does not sign them; tools that match
    signatures to keys by id (securesystemslib) are given this one with the AK's key.

    Args:
        key: the AK's public key.
    """
    spki = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def dsse_envelope(payload: bytes, signature: bytes, keyid: str) -> DsseEnvelope:
    """The DSSE envelope of an in-toto payload signed by the AK.

    Args:
        payload: the statement's bytes.
        signature: the AK's signature over ``dsse_pae(payload)``.
        keyid: :func:`ak_keyid` of the AK.
    """
    return DsseEnvelope(
        payloadType=DSSE_PAYLOAD_TYPE,
        payload=payload,
        signatures=[DsseSignature(keyid=keyid, sig=signature)],
    )


def envelope_sha256(envelope: DsseEnvelope) -> str:
    """SHA-256 (hex) of the envelope's RFC 8785 canonical JSON: what PCR 15 binds.

    Args:
        envelope: the envelope.
    """
    return hashlib.sha256(canonical_json(envelope.model_dump(mode="json"))).hexdigest()


def signed_statements_event(statements: Sequence[SignedStatement]) -> SignedStatementsEvent:
    """The PCR 15 event that binds ``statements`` (kind and envelope digest, in order).

    Args:
        statements: the signed statements, at most one of each kind, in kind order.
    """
    return SignedStatementsEvent(
        statements=[
            StatementDigest(kind=statement.kind, sha256=envelope_sha256(statement.envelope))
            for statement in statements
        ]
    )


def verify_dsse_signature(envelope: DsseEnvelope, key: AkPublicKey) -> None:
    """The envelope's one signature verifies over its PAE with ``key`` (SHA-256: ECDSA for
    an ECC AK, PKCS#1 v1.5 for an RSA AK, the AK's only schemes).

    Args:
        envelope: the envelope.
        key: the certified AK's public key.

    Raises:
        StatementSignatureError: it does not.
    """
    pae = dsse_pae(envelope.payload, envelope.payloadType)
    signature = envelope.signatures[0].sig
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, pae, ec.ECDSA(hashes.SHA256()))
        else:
            key.verify(signature, pae, padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, ValueError):
        raise StatementSignatureError(
            "a signed statement's DSSE signature does not verify with the certified AK"
        ) from None


def _check_content(statement: SignedStatement, measured: MeasuredRun) -> None:
    if statement.envelope.payloadType != DSSE_PAYLOAD_TYPE:
        raise StatementContentError(
            f"the {statement.kind} envelope's payloadType is "
            f"{statement.envelope.payloadType!r}, not {DSSE_PAYLOAD_TYPE!r}"
        )
    try:
        expected = statement_payload(statement.kind, measured)
    except ModelSigningFormatError as exc:
        raise StatementContentError(
            f"the measured outputs have no {statement.kind} statement: {exc}"
        ) from None
    if not hmac.compare_digest(statement.envelope.payload, expected):
        raise StatementContentError(
            f"the signed {statement.kind} statement is not the one the replayed event log "
            "gives: it says something the log does not"
        )


def _check_binding(
    statements: Sequence[SignedStatement], event: SignedStatementsEvent | None
) -> None:
    measured = [] if event is None else list(event.statements)
    carried = [statement.kind for statement in statements]
    if carried != [digest.kind for digest in measured]:
        raise StatementBindingError(
            f"the certificate carries signed statements {carried}, the event log measured "
            f"{[digest.kind for digest in measured]}: one was stripped or added"
        )
    for statement, digest in zip(statements, measured, strict=True):
        if not hmac.compare_digest(envelope_sha256(statement.envelope), digest.sha256):
            raise StatementBindingError(
                f"the {statement.kind} envelope is not the one whose digest PCR 15 measured"
            )


def verify_signed_statements(
    certificate: Certificate, measured: MeasuredRun, ak_key: AkPublicKey
) -> str:
    """Check the certificate's signed statements against the replayed log and the AK.

    Args:
        certificate: the certificate (its quote and event log already verified).
        measured: what its replayed event log proves.
        ak_key: the certified AK's public key.

    Returns:
        What was checked, for the report.

    Raises:
        StatementContentError: a payload is not the statement the log gives.
        StatementSignatureError: a signature does not verify with the AK.
        StatementBindingError: the envelopes are not those PCR 15 measured.
    """
    statements = certificate.signed_statements or []
    for statement in statements:
        _check_content(statement, measured)
        verify_dsse_signature(statement.envelope, ak_key)
    _check_binding(statements, measured.signed_statements)
    if not statements:
        return "none: the event log measured no signed statements"
    kinds = ", ".join(statement.kind for statement in statements)
    return (
        f"{kinds}: each payload is the statement the replayed log gives, its DSSE signature "
        "verifies with the certified AK, and its envelope's digest is the one PCR 15 measured"
    )


def signed_statement(certificate: Certificate, kind: StatementKind) -> SignedStatement | None:
    """The certificate's signed statement of ``kind``, None if it carries none.

    Args:
        certificate: the certificate.
        kind: which statement.
    """
    for statement in certificate.signed_statements or []:
        if statement.kind == kind:
            return statement
    return None


__all__ = [
    "AkPublicKey",
    "ak_keyid",
    "dsse_envelope",
    "envelope_sha256",
    "model_name",
    "model_signing_payload",
    "signed_statement",
    "signed_statements_event",
    "slsa_payload",
    "statement_payload",
    "verify_dsse_signature",
    "verify_signed_statements",
]
