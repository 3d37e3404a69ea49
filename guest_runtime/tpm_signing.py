"""Sign external bytes with the attestation key, the TPM hashing them itself.

The AK is a restricted signing key: TPM2_Sign refuses a digest unless a validation ticket
proves that the TPM computed it over data that does not begin with TPM_GENERATED_VALUE
(0xff544347, the magic every TPMS_ATTEST starts with). So the data goes through a hash
sequence (TPM2_HashSequenceStart, TPM2_SequenceUpdate in TPM2B_MAX_BUFFER chunks,
TPM2_SequenceComplete in the owner hierarchy, which returns a TPMT_TK_HASHCHECK ticket) and
TPM2_Sign gets that ticket. For data that begins with TPM_GENERATED_VALUE the TPM returns a
NULL ticket and TPM2_Sign fails: that refusal is what keeps the AK's quotes unforgeable,
and this module deliberately leaves it to the TPM rather than checking in Python. The TPM
judges the first SequenceUpdate block alone, so data shorter than TPM_GENERATED_VALUE (under
4 bytes) gets no ticket either: it cannot show that it does not begin with the magic.

The signature comes back in the encoding every other tool expects: DER ``SEQUENCE {r, s}``
for ECDSA, the PKCS#1 v1.5 signature bytes for RSASSA.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from tpm2_pytss import TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG
from tpm2_pytss.types import TPMT_SIG_SCHEME, TPMT_SIGNATURE, TPMT_TK_HASHCHECK

from aicert.guest_runtime.tpm import AttestationKey, Tpm, TpmError

# TPM2B_MAX_BUFFER holds MAX_DIGEST_BUFFER bytes, 1024 in the TCG PC Client profile.
SEQUENCE_CHUNK_SIZE = 1024


def tpm_sign(tpm: Tpm, ak: AttestationKey, data: bytes) -> bytes:
    """Sign ``data`` with ``ak``, the TPM computing the SHA-256 digest it signs.

    Args:
        tpm: An open TPM connection; the AK is loaded under its EK if it is not already.
        ak: The restricted signing key (ECC P-256 ECDSA-SHA256 or RSA-2048 RSASSA-SHA256).
        data: The bytes to sign, 4 bytes or more (fed to the TPM in 1 KiB blocks).

    Returns:
        The signature over SHA-256(``data``): DER ``SEQUENCE {r, s}`` for an ECDSA key,
        the PKCS#1 v1.5 signature for an RSASSA key.

    Raises:
        TpmError: The TPM refused (``rc`` TPM_RC_TICKET for data that begins with
            TPM_GENERATED_VALUE or is shorter than 4 bytes) or is unreachable.
    """
    digest, ticket = _tpm_digest(tpm, data)
    handle = tpm.ak_handle(ak)
    with tpm.operation("sign") as esapi:
        signature = esapi.sign(handle, digest, TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL), ticket)
    return standard_signature_encoding(signature)


def _tpm_digest(tpm: Tpm, data: bytes) -> tuple[bytes, TPMT_TK_HASHCHECK]:
    """SHA-256(``data``) computed by the TPM, with its hash check ticket (owner hierarchy).

    A sequence object is a transient object: on a raw swtpm (no resource manager) one left
    behind by a failed update would hold one of the TPM's few object slots, so it is flushed
    unless SequenceComplete consumed it.
    """
    with tpm.operation("hash sequence start") as esapi:
        sequence = esapi.hash_sequence_start(b"", TPM2_ALG.SHA256)
    completed = False
    try:
        with tpm.operation("hash sequence update") as esapi:
            for start in range(0, len(data), SEQUENCE_CHUNK_SIZE):
                esapi.sequence_update(sequence, data[start : start + SEQUENCE_CHUNK_SIZE])
        with tpm.operation("hash sequence complete") as esapi:
            digest, ticket = esapi.sequence_complete(sequence, b"", hierarchy=ESYS_TR.OWNER)
        completed = True
    finally:
        if not completed:
            _flush_after_failure(tpm, sequence)
    return bytes(digest), ticket


def _flush_after_failure(tpm: Tpm, sequence: ESYS_TR) -> None:
    # Best effort: the error that got us here is the one worth reporting.
    try:
        tpm.esapi.flush_context(sequence)
    except (TSS2_Exception, TpmError):
        pass


def standard_signature_encoding(signature: TPMT_SIGNATURE) -> bytes:
    """A TPMT_SIGNATURE in the encoding X.509 and DSSE verifiers expect.

    Args:
        signature: What TPM2_Sign returned.

    Returns:
        DER ``SEQUENCE {r, s}`` for ECDSA, the raw PKCS#1 v1.5 signature for RSASSA.

    Raises:
        TpmError: Another signature scheme.
    """
    if signature.sigAlg == TPM2_ALG.ECDSA:
        ecdsa = signature.signature.ecdsa
        r = int.from_bytes(bytes(ecdsa.signatureR), "big")
        s = int.from_bytes(bytes(ecdsa.signatureS), "big")
        return encode_dss_signature(r, s)
    if signature.sigAlg == TPM2_ALG.RSASSA:
        return bytes(signature.signature.rsassa.sig)
    raise TpmError("sign", f"unexpected signature scheme 0x{int(signature.sigAlg):04x}")


__all__ = ["SEQUENCE_CHUNK_SIZE", "standard_signature_encoding", "tpm_sign"]
