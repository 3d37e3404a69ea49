"""verify_quote and the parsers on synthetic structures: TPMS_ATTEST, TPMT_SIGNATURE and
TPMT_PUBLIC marshalled by hand here and signed with ``cryptography`` keys, so that each check
can be reached alone (a changed structure is re-signed, so only the check under test fails)."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aicert.errors import (
    AkMismatchError,
    AttestStructureError,
    NonceMismatchError,
    PcrDigestError,
    PcrSelectionError,
    QuoteSignatureError,
    TpmStructureError,
    VerificationError,
)
from aicert.quote import public_key_from_ak, verify_quote
from aicert.tpm_structures import (
    TPM_ALG_ECC,
    TPM_ALG_ECDAA,
    TPM_ALG_ECDSA,
    TPM_ALG_HMAC,
    TPM_ALG_NULL,
    TPM_ALG_RSA,
    TPM_ALG_RSAPSS,
    TPM_ALG_RSASSA,
    TPM_ALG_SHA1,
    TPM_ALG_SHA256,
    TPM_ALG_SHA384,
    TPM_ECC_NIST_P256,
    TPM_ECC_NIST_P384,
    TPM_GENERATED_VALUE,
    TPM_ST_ATTEST_CERTIFY,
    TPM_ST_ATTEST_QUOTE,
    TpmsAttest,
    TpmsRsaParms,
    parse_attest,
    parse_pcr_selection,
    parse_public,
    parse_signature,
)

# fixedTPM | fixedParent | sensitiveDataOrigin | userWithAuth | restricted | sign
AK_ATTRIBUTES = 0x00050072
NONCE = bytes(range(16))
PCRS = {
    0: bytes(32),
    14: hashlib.sha256(b"inputs").digest(),
    15: hashlib.sha256(b"outputs").digest(),
}
SIGNER_NAME = b"\x00\x0b" + hashlib.sha256(b"signer").digest()

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
P256_KEY = ec.generate_private_key(ec.SECP256R1())
P384_KEY = ec.generate_private_key(ec.SECP384R1())

_HASHES: dict[int, type[hashes.HashAlgorithm]] = {
    TPM_ALG_SHA1: hashes.SHA1,
    TPM_ALG_SHA256: hashes.SHA256,
    TPM_ALG_SHA384: hashes.SHA384,
}
_HASHLIB = {TPM_ALG_SHA1: "sha1", TPM_ALG_SHA256: "sha256", TPM_ALG_SHA384: "sha384"}


# --- Marshalling (big-endian, TPM 2.0 Part 2) ---------------------------------------------------


def tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def pcr_selection(banks: list[tuple[int, tuple[int, ...]]], size_of_select: int = 3) -> bytes:
    out = struct.pack(">I", len(banks))
    for hash_alg, pcrs in banks:
        bitmap = bytearray(size_of_select)
        for index in pcrs:
            bitmap[index // 8] |= 1 << (index % 8)
        out += struct.pack(">HB", hash_alg, size_of_select) + bytes(bitmap)
    return out


def pcr_digest(values: dict[int, bytes], hash_alg: int = TPM_ALG_SHA256) -> bytes:
    concatenated = b"".join(values[index] for index in sorted(values))
    return hashlib.new(_HASHLIB[hash_alg], concatenated).digest()


def marshal_attest(
    *,
    magic: int = TPM_GENERATED_VALUE,
    attest_type: int = TPM_ST_ATTEST_QUOTE,
    extra_data: bytes = NONCE,
    banks: list[tuple[int, tuple[int, ...]]] | None = None,
    digest: bytes | None = None,
    attested: bytes | None = None,
) -> bytes:
    header = struct.pack(">IH", magic, attest_type) + tpm2b(SIGNER_NAME) + tpm2b(extra_data)
    clock_info = struct.pack(">QIIB", 123456, 7, 2, 1)
    firmware = struct.pack(">Q", 0x2019102300163636)
    if attested is None:
        if banks is None:
            banks = [(TPM_ALG_SHA256, tuple(sorted(PCRS)))]
        attested = pcr_selection(banks) + tpm2b(pcr_digest(PCRS) if digest is None else digest)
    return header + clock_info + firmware + attested


def sign(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    data: bytes,
    sig_alg: int | None = None,
    hash_alg: int = TPM_ALG_SHA256,
    pss_salt: int | None = None,
) -> bytes:
    """A TPMT_SIGNATURE over ``data``, as a TPM would make it."""
    hash_algorithm = _HASHES[hash_alg]()
    if isinstance(key, rsa.RSAPrivateKey):
        sig_alg = TPM_ALG_RSASSA if sig_alg is None else sig_alg
        scheme: padding.AsymmetricPadding = padding.PKCS1v15()
        if sig_alg == TPM_ALG_RSAPSS:
            salt = padding.PSS.DIGEST_LENGTH if pss_salt is None else pss_salt
            scheme = padding.PSS(mgf=padding.MGF1(hash_algorithm), salt_length=salt)
        body = tpm2b(key.sign(data, scheme, hash_algorithm))
    else:
        sig_alg = TPM_ALG_ECDSA if sig_alg is None else sig_alg
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hash_algorithm)))
        size = (key.curve.key_size + 7) // 8
        body = tpm2b(r.to_bytes(size, "big")) + tpm2b(s.to_bytes(size, "big"))
    return struct.pack(">HH", sig_alg, hash_alg) + body


def marshal_public(
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
    *,
    scheme: int | None = None,
    scheme_hash: int = TPM_ALG_SHA256,
    attributes: int = AK_ATTRIBUTES,
    exponent: int = 0,
    curve_id: int | None = None,
) -> bytes:
    """A TPMT_PUBLIC for ``key`` with the AK template of tpm2_createak."""
    if isinstance(key, rsa.RSAPublicKey):
        modulus = key.public_numbers().n.to_bytes(key.key_size // 8, "big")
        scheme = TPM_ALG_RSASSA if scheme is None else scheme
        return (
            struct.pack(">HHI", TPM_ALG_RSA, TPM_ALG_SHA256, attributes)
            + tpm2b(b"")
            + struct.pack(">HHHHI", TPM_ALG_NULL, scheme, scheme_hash, key.key_size, exponent)
            + tpm2b(modulus)
        )
    numbers = key.public_numbers()
    size = (key.curve.key_size + 7) // 8
    if curve_id is None:
        curve_id = {256: TPM_ECC_NIST_P256, 384: TPM_ECC_NIST_P384}[key.curve.key_size]
    scheme = TPM_ALG_ECDSA if scheme is None else scheme
    return (
        struct.pack(">HHI", TPM_ALG_ECC, TPM_ALG_SHA256, attributes)
        + tpm2b(b"")
        + struct.pack(">HHHHH", TPM_ALG_NULL, scheme, scheme_hash, curve_id, TPM_ALG_NULL)
        + tpm2b(numbers.x.to_bytes(size, "big"))
        + tpm2b(numbers.y.to_bytes(size, "big"))
    )


def pem(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def verify_signed(
    attest: bytes,
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = P256_KEY,
    **kwargs: object,
) -> TpmsAttest:
    """verify_quote on ``attest`` signed correctly by ``key`` with its TPMT_PUBLIC."""
    arguments: dict[str, object] = {
        "attest": attest,
        "signature": sign(key, attest),
        "ak_public": marshal_public(key.public_key()),
        "nonce": NONCE,
        "pcrs": PCRS,
    }
    arguments.update(kwargs)
    return verify_quote(**arguments)  # type: ignore[arg-type]


# --- Accepted -----------------------------------------------------------------------------------

SigningCase = tuple[rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, int, int, int | None]
SIGNING_CASES: dict[str, SigningCase] = {
    "rsassa-sha256": (RSA_KEY, TPM_ALG_RSASSA, TPM_ALG_SHA256, None),
    "rsapss-sha256-salt-digest": (RSA_KEY, TPM_ALG_RSAPSS, TPM_ALG_SHA256, None),
    "rsapss-sha256-salt-max": (RSA_KEY, TPM_ALG_RSAPSS, TPM_ALG_SHA256, 256 - 32 - 2),
    "rsassa-sha384": (RSA_KEY, TPM_ALG_RSASSA, TPM_ALG_SHA384, None),
    "ecdsa-p256-sha256": (P256_KEY, TPM_ALG_ECDSA, TPM_ALG_SHA256, None),
    "ecdsa-p384-sha384": (P384_KEY, TPM_ALG_ECDSA, TPM_ALG_SHA384, None),
}


@pytest.mark.parametrize("case", SIGNING_CASES)
def test_synthetic_quote_verifies_in_every_key_form(case: str) -> None:
    key, sig_alg, hash_alg, salt = SIGNING_CASES[case]
    # The TPM hashes the PCR values with the signing scheme's hash.
    attest = marshal_attest(digest=pcr_digest(PCRS, hash_alg))
    signature = sign(key, attest, sig_alg, hash_alg, salt)
    tpmt = marshal_public(key.public_key(), scheme=sig_alg, scheme_hash=hash_alg)
    for ak_public in (tpmt, tpm2b(tpmt), pem(key.public_key()), key.public_key()):
        result = verify_quote(attest, signature, ak_public, NONCE, PCRS)
        assert result.extra_data == NONCE
        assert result.raw == attest


def test_sha384_bank() -> None:
    values = {index: hashlib.sha384(bytes([index])).digest() for index in (0, 7)}
    attest = marshal_attest(
        banks=[(TPM_ALG_SHA384, (0, 7))],
        digest=hashlib.sha256(values[0] + values[7]).digest(),
    )
    verify_signed(attest, pcrs=values, hash_alg="sha384")
    with pytest.raises(PcrSelectionError):
        verify_signed(attest, pcrs=values)  # asked for the sha256 bank


def test_wider_pcr_bitmap_is_read_by_bits() -> None:
    attested = pcr_selection([(TPM_ALG_SHA256, (0, 14, 15))], size_of_select=4)
    attest = marshal_attest(attested=attested + tpm2b(pcr_digest(PCRS)))
    verify_signed(attest)


def test_quote_over_high_pcr() -> None:
    values = {23: hashlib.sha256(b"x").digest()}
    attest = marshal_attest(banks=[(TPM_ALG_SHA256, (23,))], digest=pcr_digest(values))
    verify_signed(attest, pcrs=values)


# --- Attest checks, each alone ------------------------------------------------------------------


def test_wrong_magic() -> None:
    with pytest.raises(AttestStructureError, match="magic"):
        verify_signed(marshal_attest(magic=0xFF544348))


def test_wrong_attest_type_with_quote_body() -> None:
    with pytest.raises(AttestStructureError, match="type"):
        verify_signed(marshal_attest(attest_type=TPM_ST_ATTEST_CERTIFY))


def test_certify_structure_is_not_a_quote() -> None:
    certify_info = tpm2b(SIGNER_NAME) + tpm2b(SIGNER_NAME)
    attest = marshal_attest(attest_type=TPM_ST_ATTEST_CERTIFY, attested=certify_info)
    assert parse_attest(attest).quote is None
    with pytest.raises(AttestStructureError, match="type"):
        verify_signed(attest)


def test_nonce_mismatch() -> None:
    with pytest.raises(NonceMismatchError):
        verify_signed(marshal_attest(extra_data=NONCE[:-1] + b"\xff"))


def test_empty_nonce_only_matches_empty_extra_data() -> None:
    with pytest.raises(NonceMismatchError):
        verify_signed(marshal_attest(), nonce=b"")


def test_two_banks_refused() -> None:
    banks = [(TPM_ALG_SHA256, (0, 14, 15)), (TPM_ALG_SHA384, ())]
    with pytest.raises(PcrSelectionError, match="exactly one"):
        verify_signed(marshal_attest(banks=banks))


def test_same_bank_twice_refused() -> None:
    banks = [(TPM_ALG_SHA256, (0, 14)), (TPM_ALG_SHA256, (15,))]
    with pytest.raises(PcrSelectionError, match="exactly one"):
        verify_signed(marshal_attest(banks=banks))


def test_no_bank_refused() -> None:
    with pytest.raises(PcrSelectionError):
        verify_signed(marshal_attest(banks=[]))


def test_empty_selection_refused() -> None:
    attest = marshal_attest(banks=[(TPM_ALG_SHA256, ())], digest=hashlib.sha256(b"").digest())
    with pytest.raises(PcrSelectionError, match="no PCR"):
        verify_signed(attest, pcrs={})


def test_sha1_bank_refused() -> None:
    values = {index: bytes(20) for index in PCRS}
    attest = marshal_attest(banks=[(TPM_ALG_SHA1, tuple(PCRS))], digest=pcr_digest(values))
    with pytest.raises(PcrSelectionError, match="SHA-1"):
        verify_signed(attest, pcrs=values, hash_alg="sha1")
    with pytest.raises(PcrSelectionError):
        verify_signed(attest, pcrs=values)


def test_unknown_bank_name_refused() -> None:
    with pytest.raises(PcrSelectionError, match="unknown"):
        verify_signed(marshal_attest(), hash_alg="md5")


def test_claimed_value_of_wrong_length() -> None:
    short = {**PCRS, 14: PCRS[14][:20]}
    attest = marshal_attest(digest=pcr_digest(short))
    with pytest.raises(PcrSelectionError, match="bytes"):
        verify_signed(attest, pcrs=short)


def test_claimed_pcr_index_not_an_integer() -> None:
    with pytest.raises(PcrSelectionError):
        verify_signed(marshal_attest(), pcrs={"0": PCRS[0], 14: PCRS[14], 15: PCRS[15]})
    with pytest.raises(PcrSelectionError):
        verify_signed(marshal_attest(), pcrs={**PCRS, 15: PCRS[15].hex()})


def test_pcr_digest_mismatch() -> None:
    with pytest.raises(PcrDigestError):
        verify_signed(marshal_attest(digest=bytes(32)))


def test_pcr_digest_of_bank_hash_instead_of_signature_hash() -> None:
    # Signed with SHA-384 (P-384): the TPM's pcrDigest is SHA-384, a SHA-256 one is wrong.
    attest = marshal_attest(digest=pcr_digest(PCRS, TPM_ALG_SHA256))
    signature = sign(P384_KEY, attest, TPM_ALG_ECDSA, TPM_ALG_SHA384)
    with pytest.raises(PcrDigestError):
        verify_quote(attest, signature, P384_KEY.public_key(), NONCE, PCRS)


def test_checks_run_in_order() -> None:
    # Everything wrong at once: the first check in the documented order reports.
    everything_wrong = marshal_attest(magic=0, extra_data=b"x", digest=bytes(32))
    with pytest.raises(AttestStructureError):
        verify_signed(everything_wrong)
    nonce_and_digest_wrong = marshal_attest(extra_data=b"x", digest=bytes(32))
    with pytest.raises(NonceMismatchError):
        verify_signed(nonce_and_digest_wrong, pcrs={1: bytes(32)})
    selection_and_digest_wrong = marshal_attest(digest=bytes(32))
    with pytest.raises(PcrSelectionError):
        verify_signed(selection_and_digest_wrong, pcrs={1: bytes(32)})
    # A bad signature is reported before anything in the attest is looked at.
    with pytest.raises(QuoteSignatureError):
        verify_quote(
            everything_wrong,
            sign(P256_KEY, marshal_attest()),
            P256_KEY.public_key(),
            NONCE,
            PCRS,
        )


# --- Signature checks ---------------------------------------------------------------------------


def test_sha1_signature_refused() -> None:
    attest = marshal_attest(digest=pcr_digest(PCRS, TPM_ALG_SHA1))
    signature = sign(RSA_KEY, attest, TPM_ALG_RSASSA, TPM_ALG_SHA1)
    with pytest.raises(QuoteSignatureError, match="SHA-256 or stronger"):
        verify_quote(attest, signature, RSA_KEY.public_key(), NONCE, PCRS)


@pytest.mark.parametrize(
    "signature",
    [
        struct.pack(">H", TPM_ALG_NULL),
        struct.pack(">HH", TPM_ALG_HMAC, TPM_ALG_SHA256) + bytes(32),
        struct.pack(">HH", TPM_ALG_ECDAA, TPM_ALG_SHA256) + tpm2b(b"\x01") + tpm2b(b"\x01"),
    ],
    ids=["null", "hmac", "ecdaa"],
)
def test_other_signature_algorithms_refused(signature: bytes) -> None:
    parse_signature(signature)  # well-formed
    with pytest.raises(QuoteSignatureError, match="refused"):
        verify_quote(marshal_attest(), signature, P256_KEY.public_key(), NONCE, PCRS)


def test_ecdsa_signature_with_rsa_key() -> None:
    attest = marshal_attest()
    with pytest.raises(QuoteSignatureError, match="key type"):
        verify_quote(attest, sign(P256_KEY, attest), RSA_KEY.public_key(), NONCE, PCRS)


def test_rsa_signature_with_ecc_key() -> None:
    attest = marshal_attest()
    with pytest.raises(QuoteSignatureError, match="key type"):
        verify_quote(attest, sign(RSA_KEY, attest), P256_KEY.public_key(), NONCE, PCRS)


def test_signature_scheme_not_the_aks_scheme() -> None:
    attest = marshal_attest(digest=pcr_digest(PCRS, TPM_ALG_SHA384))
    signature = sign(RSA_KEY, attest, TPM_ALG_RSASSA, TPM_ALG_SHA384)
    # The TPMT_PUBLIC says RSASSA/SHA-256: a TPM cannot have made this signature with it.
    tpmt = marshal_public(RSA_KEY.public_key(), scheme=TPM_ALG_RSASSA, scheme_hash=TPM_ALG_SHA256)
    with pytest.raises(QuoteSignatureError, match="scheme"):
        verify_quote(attest, signature, tpmt, NONCE, PCRS)
    pss_tpmt = marshal_public(RSA_KEY.public_key(), scheme=TPM_ALG_RSAPSS)
    with pytest.raises(QuoteSignatureError, match="scheme"):
        verify_quote(attest, sign(RSA_KEY, attest), pss_tpmt, NONCE, PCRS)


def test_signature_by_another_key() -> None:
    attest = marshal_attest()
    signature = sign(OTHER_RSA_KEY, attest)
    with pytest.raises(QuoteSignatureError, match="does not verify"):
        verify_quote(attest, signature, RSA_KEY.public_key(), NONCE, PCRS)


def test_ecdsa_signature_with_zero_r() -> None:
    signature = struct.pack(">HH", TPM_ALG_ECDSA, TPM_ALG_SHA256) + tpm2b(b"") + tpm2b(b"\x01")
    with pytest.raises(QuoteSignatureError):
        verify_quote(marshal_attest(), signature, P256_KEY.public_key(), NONCE, PCRS)


# --- AK public forms ----------------------------------------------------------------------------


def test_rsa_exponent_zero_means_65537() -> None:
    public = parse_public(marshal_public(RSA_KEY.public_key(), exponent=0))
    assert isinstance(public.parameters, TpmsRsaParms) and public.parameters.exponent == 0
    key = public.to_cryptography_key()
    assert isinstance(key, rsa.RSAPublicKey) and key.public_numbers().e == 65537
    explicit = parse_public(marshal_public(RSA_KEY.public_key(), exponent=65537))
    assert explicit.to_cryptography_key().public_numbers() == key.public_numbers()  # type: ignore[union-attr]


def test_name_is_name_alg_and_digest_of_tpmt_public() -> None:
    tpmt = marshal_public(P256_KEY.public_key())
    assert parse_public(tpmt).name() == b"\x00\x0b" + hashlib.sha256(tpmt).digest()


def test_restricted_signing_attributes() -> None:
    public_key = P256_KEY.public_key()
    assert parse_public(marshal_public(public_key)).is_restricted_signing_key()
    for missing_bit in (1, 4, 5, 16, 18):  # fixedTPM, fixedParent, sDO, restricted, sign
        attributes = AK_ATTRIBUTES & ~(1 << missing_bit)
        public = parse_public(marshal_public(public_key, attributes=attributes))
        assert not public.is_restricted_signing_key(), missing_bit
    with_decrypt = parse_public(marshal_public(public_key, attributes=AK_ATTRIBUTES | 1 << 17))
    assert not with_decrypt.is_restricted_signing_key()


def test_point_not_on_curve() -> None:
    tpmt = bytearray(marshal_public(P256_KEY.public_key()))
    tpmt[-1] ^= 1
    with pytest.raises(TpmStructureError, match=r"unique\.ecc"):
        public_key_from_ak(bytes(tpmt))


def test_unsupported_curve() -> None:
    tpmt = marshal_public(P256_KEY.public_key(), curve_id=0x0010)  # BN P-256
    with pytest.raises(TpmStructureError, match="curveID"):
        public_key_from_ak(tpmt)


def test_rsa_modulus_length_must_match_key_bits() -> None:
    tpmt = bytearray(marshal_public(RSA_KEY.public_key()))
    key_bits_offset = 2 + 2 + 4 + 2 + 2 + 2 + 2
    struct.pack_into(">H", tpmt, key_bits_offset, 1024)
    with pytest.raises(TpmStructureError, match="keyBits"):
        public_key_from_ak(bytes(tpmt))


def test_weak_or_unsupported_keys_refused() -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    with pytest.raises(AkMismatchError, match="2048"):
        public_key_from_ak(small)
    with pytest.raises(AkMismatchError, match="not an RSA or EC"):
        public_key_from_ak(pem(ed25519.Ed25519PrivateKey.generate().public_key()))
    p224 = ec.generate_private_key(ec.SECP224R1()).public_key()
    with pytest.raises(AkMismatchError, match="curve"):
        public_key_from_ak(pem(p224))


def test_bad_pem_refused() -> None:
    with pytest.raises(TpmStructureError, match="PEM"):
        public_key_from_ak("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    with pytest.raises(TpmStructureError, match="ASCII"):
        public_key_from_ak("-----BEGIN PUBLIC KEY-----\u00e9")


def test_wrong_python_types_are_type_errors() -> None:
    attest = marshal_attest()
    with pytest.raises(TypeError):
        verify_quote(attest, sign(P256_KEY, attest), 12345, NONCE, PCRS)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        verify_quote(attest, sign(P256_KEY, attest), P256_KEY.public_key(), NONCE.hex(), PCRS)  # type: ignore[arg-type]


def test_non_key_types_refused_by_parse_public() -> None:
    keyedhash = struct.pack(">HHI", 0x0008, TPM_ALG_SHA256, 0) + tpm2b(b"") + b"\x00\x10"
    with pytest.raises(TpmStructureError, match="type"):
        parse_public(keyedhash + tpm2b(b""))


# --- Bounds: truncation and trailing bytes ------------------------------------------------------


def test_attest_truncated_at_every_offset() -> None:
    attest = marshal_attest()
    for length in range(len(attest)):
        truncated = attest[:length]
        with pytest.raises(TpmStructureError):
            parse_attest(truncated)
        # Re-signed, so the signature passes and the parse is what fails.
        with pytest.raises(TpmStructureError):
            verify_signed(truncated)


def test_signature_truncated_at_every_offset() -> None:
    attest = marshal_attest()
    for key in (RSA_KEY, P256_KEY):
        signature = sign(key, attest)
        for length in range(len(signature)):
            with pytest.raises(TpmStructureError):
                verify_quote(attest, signature[:length], key.public_key(), NONCE, PCRS)


def test_public_truncated_at_every_offset() -> None:
    attest = marshal_attest()
    for key in (RSA_KEY, P256_KEY):
        signature = sign(key, attest)
        for public in (marshal_public(key.public_key()), tpm2b(marshal_public(key.public_key()))):
            for length in range(len(public)):
                with pytest.raises(TpmStructureError):
                    verify_quote(attest, signature, public[:length], NONCE, PCRS)


def test_pcr_selection_truncated_at_every_offset() -> None:
    selection = pcr_selection([(TPM_ALG_SHA256, (0, 14, 15)), (TPM_ALG_SHA1, (1,))])
    assert parse_pcr_selection(selection).selections[1].pcrs == (1,)
    for length in range(len(selection)):
        with pytest.raises(TpmStructureError):
            parse_pcr_selection(selection[:length])


def test_trailing_bytes_refused() -> None:
    with pytest.raises(TpmStructureError, match="trailing"):
        verify_signed(marshal_attest() + b"\x00")
    attest = marshal_attest()
    with pytest.raises(TpmStructureError, match="trailing"):
        verify_quote(attest, sign(P256_KEY, attest) + b"\x00", P256_KEY.public_key(), NONCE, PCRS)
    with pytest.raises(TpmStructureError):
        verify_quote(
            attest,
            sign(P256_KEY, attest),
            marshal_public(P256_KEY.public_key()) + b"\x00",
            NONCE,
            PCRS,
        )
    with pytest.raises(TpmStructureError, match="trailing"):
        parse_pcr_selection(pcr_selection([(TPM_ALG_SHA256, (0,))]) + b"\x00")


def test_oversized_lengths_refused() -> None:
    with pytest.raises(TpmStructureError, match="exceeds"):
        parse_pcr_selection(struct.pack(">I", 1000))
    with pytest.raises(TpmStructureError, match="exceeds"):
        parse_pcr_selection(struct.pack(">IHB", 1, TPM_ALG_SHA256, 200) + bytes(200))
    with pytest.raises(TpmStructureError, match="extraData"):
        parse_attest(marshal_attest(extra_data=bytes(100)))
    with pytest.raises(TpmStructureError, match="sig"):
        parse_signature(struct.pack(">HH", TPM_ALG_RSASSA, TPM_ALG_SHA256) + tpm2b(bytes(600)))


def test_clock_safe_must_be_yes_or_no() -> None:
    attest = bytearray(marshal_attest())
    safe_offset = 4 + 2 + 2 + len(SIGNER_NAME) + 2 + len(NONCE) + 8 + 4 + 4
    assert attest[safe_offset] == 1
    attest[safe_offset] = 2
    with pytest.raises(TpmStructureError, match="safe"):
        parse_attest(bytes(attest))


# --- Fuzzing: nothing but VerificationError escapes ---------------------------------------------

_FUZZ_SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
_PARSERS: list[Callable[[bytes], object]] = [
    parse_attest,
    parse_signature,
    parse_public,
    parse_pcr_selection,
]


@st.composite
def mutated(draw: st.DrawFn, original: bytes) -> bytes:
    """``original`` with a few random byte flips, overwrites, insertions, deletions or a cut."""
    data = bytearray(original)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        operation = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if not data:
            operation = "insert"
        index = draw(st.integers(min_value=0, max_value=max(len(data) - 1, 0)))
        if operation == "flip":
            data[index] ^= 1 << draw(st.integers(min_value=0, max_value=7))
        elif operation == "set":
            data[index] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF]))
        elif operation == "insert":
            data[index:index] = draw(st.binary(min_size=1, max_size=3))
        elif operation == "delete":
            del data[index]
        else:
            del data[index:]
    return bytes(data)


VALID_ATTEST = marshal_attest()
VALID_RSA_PUBLIC = marshal_public(RSA_KEY.public_key())
VALID_ECC_PUBLIC = marshal_public(P256_KEY.public_key())


@_FUZZ_SETTINGS
@given(data=st.binary(max_size=600), parser_index=st.integers(0, len(_PARSERS) - 1))
def test_parsers_on_random_bytes(data: bytes, parser_index: int) -> None:
    try:
        _PARSERS[parser_index](data)
    except TpmStructureError:
        pass


@_FUZZ_SETTINGS
@given(attest=st.binary(max_size=300), signature=st.binary(max_size=300))
def test_verify_quote_on_random_bytes(attest: bytes, signature: bytes) -> None:
    try:
        verify_quote(attest, signature, VALID_ECC_PUBLIC, NONCE, PCRS)
    except VerificationError:
        pass


@_FUZZ_SETTINGS
@given(attest=mutated(VALID_ATTEST))
def test_mutated_attest_resigned(attest: bytes) -> None:
    # Re-signed, so the mutation reaches the parser and the checks after the signature.
    try:
        verify_signed(attest)
    except VerificationError:
        pass


@_FUZZ_SETTINGS
@given(
    signature=mutated(sign(RSA_KEY, VALID_ATTEST)),
    public=mutated(VALID_RSA_PUBLIC),
)
def test_mutated_rsa_signature_and_public(signature: bytes, public: bytes) -> None:
    try:
        verify_quote(VALID_ATTEST, signature, public, NONCE, PCRS)
    except VerificationError:
        pass


@_FUZZ_SETTINGS
@given(
    signature=mutated(sign(P256_KEY, VALID_ATTEST)),
    public=mutated(VALID_ECC_PUBLIC),
)
def test_mutated_ecc_signature_and_public(signature: bytes, public: bytes) -> None:
    try:
        verify_quote(VALID_ATTEST, signature, public, NONCE, PCRS)
    except VerificationError:
        pass


@_FUZZ_SETTINGS
@given(public=mutated(tpm2b(VALID_ECC_PUBLIC)))
def test_mutated_tpm2b_public(public: bytes) -> None:
    try:
        public_key_from_ak(public)
    except VerificationError:
        pass
