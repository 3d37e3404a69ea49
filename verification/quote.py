"""Verification of a TPM 2.0 quote: the signature over TPMS_ATTEST, then what it signs.

Works on evidence from any producer (this project's guest runtime, ``tpm2_quote``, cloud
vTPMs). The checks run in a fixed order and the first failure raises its own exception type
from ``aicert.errors``; nothing is trusted before the signature has verified, and the PCR
values are trusted only as far as the signed selection and digest bind them.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Final, TypeAlias

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from aicert.errors import (
    AkMismatchError,
    AttestStructureError,
    NonceMismatchError,
    PcrDigestError,
    PcrSelectionError,
    QuoteSignatureError,
    TpmStructureError,
)
from aicert.tpm_structures import (
    HASH_DIGEST_SIZES,
    HASHLIB_NAMES,
    TPM_ALG_ECDSA,
    TPM_ALG_NULL,
    TPM_ALG_RSAPSS,
    TPM_ALG_RSASSA,
    TPM_ALG_SHA3_256,
    TPM_ALG_SHA3_384,
    TPM_ALG_SHA3_512,
    TPM_ALG_SHA256,
    TPM_ALG_SHA384,
    TPM_ALG_SHA512,
    TPM_GENERATED_VALUE,
    TPM_ST_ATTEST_QUOTE,
    TpmlPcrSelection,
    TpmsAttest,
    TpmsQuoteInfo,
    TpmtPublic,
    TpmtSignature,
    parse_attest,
    parse_public,
    parse_signature,
)

AkPublicKey: TypeAlias = rsa.RSAPublicKey | ec.EllipticCurvePublicKey
AkPublic: TypeAlias = bytes | bytearray | memoryview | str | AkPublicKey

# Hash algorithms accepted for the quote signature and the PCR bank: SHA-256 or stronger.
# SHA-1 is refused (collisions are practical); SM3 is not available in ``cryptography``.
_SIGNATURE_HASHES: Final[dict[int, type[hashes.HashAlgorithm]]] = {
    TPM_ALG_SHA256: hashes.SHA256,
    TPM_ALG_SHA384: hashes.SHA384,
    TPM_ALG_SHA512: hashes.SHA512,
    TPM_ALG_SHA3_256: hashes.SHA3_256,
    TPM_ALG_SHA3_384: hashes.SHA3_384,
    TPM_ALG_SHA3_512: hashes.SHA3_512,
}
_PCR_BANKS: Final[dict[str, int]] = {
    "sha256": TPM_ALG_SHA256,
    "sha384": TPM_ALG_SHA384,
    "sha512": TPM_ALG_SHA512,
    "sha3_256": TPM_ALG_SHA3_256,
    "sha3_384": TPM_ALG_SHA3_384,
    "sha3_512": TPM_ALG_SHA3_512,
}
_SUPPORTED_CURVES: Final = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
_MIN_RSA_BITS: Final = 2048


def public_key_from_ak(ak_public: AkPublic) -> tuple[AkPublicKey, TpmtPublic | None]:
    """Turn an AK public, in any of the forms tools write, into a ``cryptography`` key.

    Accepts TPM2B_PUBLIC or TPMT_PUBLIC bytes (``tpm2_createak -u``, ``tpm2_readpublic -o``),
    a PEM SubjectPublicKeyInfo (str or bytes), or a ``cryptography`` RSA / EC public key.
    Returns the key and, when the input was a TPM structure, the parsed TPMT_PUBLIC.

    Raises ``TpmStructureError`` when the input cannot be parsed, ``AkMismatchError`` when the
    key is not an RSA (2048 bits or more) or NIST P-256/384/521 key, and ``TypeError`` for an
    argument of another Python type.
    """
    if isinstance(ak_public, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        return _checked_key(ak_public), None
    if isinstance(ak_public, str):
        try:
            ak_public = ak_public.encode("ascii")
        except UnicodeEncodeError:
            raise TpmStructureError("AK public: PEM text is not ASCII") from None
    if not isinstance(ak_public, bytes | bytearray | memoryview):
        raise TypeError(
            "ak_public must be TPM2B_PUBLIC/TPMT_PUBLIC bytes, PEM, or a cryptography "
            f"RSA/EC public key, not {type(ak_public).__name__}"
        )
    data = bytes(ak_public)
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, UnsupportedAlgorithm) as error:
            raise TpmStructureError(f"AK public: not a PEM public key ({error})") from None
        if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            raise AkMismatchError(f"AK public: {type(key).__name__} is not an RSA or EC key")
        return _checked_key(key), None
    public = parse_public(data)
    return _checked_key(public.to_cryptography_key()), public


def _checked_key(key: AkPublicKey) -> AkPublicKey:
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            raise AkMismatchError(
                f"AK public: RSA key of {key.key_size} bits, at least {_MIN_RSA_BITS} required"
            )
    elif not isinstance(key.curve, _SUPPORTED_CURVES):
        raise AkMismatchError(f"AK public: curve {key.curve.name} is not NIST P-256/384/521")
    return key


def verify_quote(
    attest: bytes,
    signature: bytes,
    ak_public: AkPublic,
    nonce: bytes,
    pcrs: Mapping[int, bytes],
    hash_alg: str = "sha256",
) -> TpmsAttest:
    """Verify a TPM2_Quote and return its parsed TPMS_ATTEST.

    ``attest`` is the TPMS_ATTEST (``tpm2_quote -m``), ``signature`` the TPMT_SIGNATURE
    (``tpm2_quote -s``, default format), ``nonce`` the expected ``extraData`` and ``pcrs`` the
    claimed values of the ``hash_alg`` bank, by PCR index. The quote must select exactly
    those PCRs of exactly that bank, and its ``pcrDigest`` must be the digest of the claimed
    values, so the values are as trustworthy as the AK.

    This checks the quote only: that the AK is a restricted signing key certified for this
    TPM is the caller's check (``TpmtPublic.is_restricted_signing_key`` and the AK
    certificate chain).
    """
    if not isinstance(nonce, bytes | bytearray | memoryview):
        raise TypeError(f"nonce must be bytes, not {type(nonce).__name__}")
    attest = bytes(attest)
    parsed_signature = _verify_signature_over(attest, bytes(signature), ak_public)
    parsed, quote_info = _parse_quote_attest(attest, bytes(nonce))
    claimed = _checked_claimed_pcrs(pcrs)
    signed_pcrs = _check_pcr_selection(quote_info.pcr_select, claimed, hash_alg)
    # The TPM computes pcrDigest with the signing scheme's hash, over the selected values in
    # selection order (ascending index within the single bank).
    expected_digest = hashlib.new(
        HASHLIB_NAMES[parsed_signature.hash_alg],
        b"".join(claimed[index] for index in signed_pcrs),
    ).digest()
    if not hmac.compare_digest(quote_info.pcr_digest, expected_digest):
        raise PcrDigestError("the signed pcrDigest is not the digest of the claimed PCR values")
    return parsed


def _verify_signature_over(attest: bytes, signature: bytes, ak_public: AkPublic) -> TpmtSignature:
    """The AK's signature over ``attest``, in an accepted scheme that matches the key."""
    parsed_signature = parse_signature(signature)
    signature_hash = _accepted_signature_hash(parsed_signature)
    key, public = public_key_from_ak(ak_public)
    _check_scheme_matches_key(parsed_signature, key, public)
    _verify_signature(parsed_signature, signature_hash, key, attest)
    return parsed_signature


def _parse_quote_attest(attest: bytes, nonce: bytes) -> tuple[TpmsAttest, TpmsQuoteInfo]:
    """``attest`` as a TPM-generated quote whose extraData is ``nonce``, and its quote part."""
    parsed = parse_attest(attest)
    if parsed.magic != TPM_GENERATED_VALUE:
        raise AttestStructureError(
            f"TPMS_ATTEST.magic is 0x{parsed.magic:08x}, not TPM_GENERATED_VALUE: "
            "the signed data was not generated by a TPM"
        )
    if parsed.type != TPM_ST_ATTEST_QUOTE or parsed.quote is None:
        raise AttestStructureError(
            f"TPMS_ATTEST.type is 0x{parsed.type:04x}, not TPM_ST_ATTEST_QUOTE"
        )
    if not hmac.compare_digest(parsed.extra_data, nonce):
        raise NonceMismatchError("the quote's extraData is not the expected nonce")
    return parsed, parsed.quote


def _check_pcr_selection(
    pcr_select: TpmlPcrSelection, claimed: Mapping[int, bytes], hash_alg: str
) -> tuple[int, ...]:
    """The quote selects exactly the claimed PCRs of exactly the ``hash_alg`` bank, and each
    claimed value has that bank's size; the signed PCR indices in selection order."""
    bank = _pcr_bank(hash_alg)
    selections = pcr_select.selections
    if len(selections) != 1:
        raise PcrSelectionError(
            f"the quote selects {len(selections)} PCR banks; exactly one ({hash_alg}) is required"
        )
    selection = selections[0]
    if selection.hash_alg != bank:
        raise PcrSelectionError(
            f"the quote selects the bank 0x{selection.hash_alg:04x}, not {hash_alg}"
        )
    signed_pcrs = selection.pcrs
    if not signed_pcrs:
        raise PcrSelectionError("the quote selects no PCR")
    # The claimed PCR indices must be exactly the signed ones: relabelling a quoted PCR
    # (CVE-2024-29039) is caught here, before any value is compared.
    if set(signed_pcrs) != set(claimed):
        raise PcrSelectionError(
            f"the claimed PCRs {sorted(claimed)} are not the signed selection {list(signed_pcrs)}"
        )
    digest_size = HASH_DIGEST_SIZES[bank]
    for index in signed_pcrs:
        if len(claimed[index]) != digest_size:
            raise PcrSelectionError(
                f"claimed PCR {index} has {len(claimed[index])} bytes, the {hash_alg} bank "
                f"has {digest_size}"
            )
    return tuple(signed_pcrs)


def _accepted_signature_hash(signature: TpmtSignature) -> hashes.HashAlgorithm:
    if signature.sig_alg not in (TPM_ALG_RSASSA, TPM_ALG_RSAPSS, TPM_ALG_ECDSA):
        raise QuoteSignatureError(
            f"signature algorithm 0x{signature.sig_alg:04x} refused: RSASSA, RSAPSS or ECDSA "
            "required"
        )
    hash_class = _SIGNATURE_HASHES.get(signature.hash_alg)
    if hash_class is None:
        raise QuoteSignatureError(
            f"signature hash algorithm 0x{signature.hash_alg:04x} refused: SHA-256 or "
            "stronger required"
        )
    return hash_class()


def _check_scheme_matches_key(
    signature: TpmtSignature, key: AkPublicKey, public: TpmtPublic | None
) -> None:
    is_rsa_signature = signature.sig_alg in (TPM_ALG_RSASSA, TPM_ALG_RSAPSS)
    if is_rsa_signature != isinstance(key, rsa.RSAPublicKey):
        raise QuoteSignatureError(
            f"signature algorithm 0x{signature.sig_alg:04x} does not fit the AK's key type"
        )
    # A TPM signs with a key's own scheme when it has one: anything else is not its output.
    if public is not None:
        scheme = public.parameters.scheme
        if scheme.scheme != TPM_ALG_NULL and (scheme.scheme, scheme.hash_alg) != (
            signature.sig_alg,
            signature.hash_alg,
        ):
            raise QuoteSignatureError(
                f"signature scheme 0x{signature.sig_alg:04x}/0x{signature.hash_alg:04x} is not "
                f"the AK's scheme 0x{scheme.scheme:04x}/0x{scheme.hash_alg:04x}"
            )


def _verify_signature(
    signature: TpmtSignature, hash_algorithm: hashes.HashAlgorithm, key: AkPublicKey, data: bytes
) -> None:
    try:
        if isinstance(key, rsa.RSAPublicKey):
            scheme: padding.AsymmetricPadding
            if signature.sig_alg == TPM_ALG_RSAPSS:
                # TPMs use either the maximum salt or the digest length (FIPS mode): AUTO
                # reads the salt length from the signature and accepts both.
                scheme = padding.PSS(mgf=padding.MGF1(hash_algorithm), salt_length=padding.PSS.AUTO)
            else:
                scheme = padding.PKCS1v15()
            key.verify(signature.rsa_signature, data, scheme, hash_algorithm)
        else:
            der = encode_dss_signature(
                int.from_bytes(signature.ecc_r, "big"), int.from_bytes(signature.ecc_s, "big")
            )
            key.verify(der, data, ec.ECDSA(hash_algorithm))
    except (InvalidSignature, ValueError):
        raise QuoteSignatureError("the quote signature does not verify with the AK") from None


def _pcr_bank(hash_alg: str) -> int:
    name = hash_alg.lower().replace("-", "")
    if name == "sha1":
        raise PcrSelectionError("the SHA-1 PCR bank is refused: SHA-256 or stronger required")
    bank = _PCR_BANKS.get(name)
    if bank is None:
        raise PcrSelectionError(f"unknown PCR bank {hash_alg!r}")
    return bank


def _checked_claimed_pcrs(pcrs: Mapping[int, bytes]) -> dict[int, bytes]:
    claimed: dict[int, bytes] = {}
    for index, value in pcrs.items():
        if isinstance(index, bool) or not isinstance(index, int):
            raise PcrSelectionError(f"claimed PCR index {index!r} is not an integer")
        if not isinstance(value, bytes | bytearray | memoryview):
            raise PcrSelectionError(f"claimed PCR {index} value is not bytes")
        claimed[index] = bytes(value)
    return claimed
