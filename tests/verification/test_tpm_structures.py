"""The TPM structure parsers on real tpm2-tools output (swtpm), field by field."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from aicert.errors import TpmStructureError
from aicert.tpm_structures import (
    TPM_ALG_AES,
    TPM_ALG_ECDSA,
    TPM_ALG_NULL,
    TPM_ALG_RSA,
    TPM_ALG_RSAPSS,
    TPM_ALG_RSASSA,
    TPM_ALG_SHA1,
    TPM_ALG_SHA256,
    TPM_ECC_NIST_P256,
    TPM_GENERATED_VALUE,
    TPM_ST_ATTEST_QUOTE,
    TPMA_OBJECT_DECRYPT,
    TPMA_OBJECT_RESTRICTED,
    TPMA_OBJECT_SIGN_ENCRYPT,
    TpmsEccParms,
    TpmsEccPoint,
    TpmsRsaParms,
    parse_attest,
    parse_pcr_selection,
    parse_public,
    parse_signature,
    parse_tpm2b_public,
    parse_tpmt_public,
)

if TYPE_CHECKING:
    from .conftest import TpmEvidence, TpmQuote

_SPKI = serialization.PublicFormat.SubjectPublicKeyInfo
_DER = serialization.Encoding.DER


@pytest.mark.parametrize("label", ["rsassa", "rsapss", "ecdsa", "rsassa_sha1"])
def test_ak_name_matches_tpm2_createak(tpm_evidence: TpmEvidence, label: str) -> None:
    ak = tpm_evidence.aks[label]
    public = parse_public(ak.tss_public)
    assert len(ak.name) == 34
    assert public.name() == ak.name
    assert public.name() == b"\x00\x0b" + hashlib.sha256(ak.tss_public[2:]).digest()


@pytest.mark.parametrize("label", ["rsassa", "rsapss", "ecdsa", "rsassa_sha1"])
def test_tpm2_createak_makes_restricted_signing_keys(tpm_evidence: TpmEvidence, label: str) -> None:
    public = parse_public(tpm_evidence.aks[label].tss_public)
    assert public.is_restricted_signing_key()
    assert public.object_attributes & TPMA_OBJECT_SIGN_ENCRYPT
    assert not public.object_attributes & TPMA_OBJECT_DECRYPT


def test_ek_is_not_a_signing_key(tpm_evidence: TpmEvidence) -> None:
    ek = parse_public(tpm_evidence.ek_public)
    assert not ek.is_restricted_signing_key()
    # The TCG default EK template: RSA-2048 restricted decryption key with AES-128-CFB.
    assert ek.type == TPM_ALG_RSA
    assert ek.object_attributes & TPMA_OBJECT_RESTRICTED
    assert ek.object_attributes & TPMA_OBJECT_DECRYPT
    assert not ek.object_attributes & TPMA_OBJECT_SIGN_ENCRYPT
    assert isinstance(ek.parameters, TpmsRsaParms)
    assert ek.parameters.symmetric.algorithm == TPM_ALG_AES
    assert ek.parameters.symmetric.key_bits == 128
    assert ek.parameters.scheme.scheme == TPM_ALG_NULL
    assert len(ek.auth_policy) == 32


@pytest.mark.parametrize(
    ("label", "scheme"), [("rsassa", TPM_ALG_RSASSA), ("rsapss", TPM_ALG_RSAPSS)]
)
def test_rsa_ak_fields(tpm_evidence: TpmEvidence, label: str, scheme: int) -> None:
    ak = tpm_evidence.aks[label]
    public = parse_public(ak.tss_public)
    assert public.type == TPM_ALG_RSA
    assert public.name_alg == TPM_ALG_SHA256
    assert isinstance(public.parameters, TpmsRsaParms)
    assert public.parameters.scheme.scheme == scheme
    assert public.parameters.scheme.hash_alg == TPM_ALG_SHA256
    assert public.parameters.symmetric.algorithm == TPM_ALG_NULL
    assert public.parameters.key_bits == 2048
    assert public.parameters.exponent == 0  # meaning 65537
    assert isinstance(public.unique, bytes) and len(public.unique) == 256
    key = public.to_cryptography_key()
    assert isinstance(key, rsa.RSAPublicKey)
    assert key.public_numbers().e == 65537
    pem_key = serialization.load_pem_public_key(ak.pem_public)
    assert key.public_bytes(_DER, _SPKI) == pem_key.public_bytes(_DER, _SPKI)


def test_ecc_ak_fields(tpm_evidence: TpmEvidence) -> None:
    ak = tpm_evidence.aks["ecdsa"]
    public = parse_public(ak.tss_public)
    assert isinstance(public.parameters, TpmsEccParms)
    assert public.parameters.curve_id == TPM_ECC_NIST_P256
    assert public.parameters.scheme.scheme == TPM_ALG_ECDSA
    assert public.parameters.scheme.hash_alg == TPM_ALG_SHA256
    assert public.parameters.kdf.scheme == TPM_ALG_NULL
    assert isinstance(public.unique, TpmsEccPoint)
    assert len(public.unique.x) == len(public.unique.y) == 32
    key = public.to_cryptography_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    pem_key = serialization.load_pem_public_key(ak.pem_public)
    assert key.public_bytes(_DER, _SPKI) == pem_key.public_bytes(_DER, _SPKI)


def test_public_forms_agree_and_round_trip(tpm_evidence: TpmEvidence) -> None:
    tss = tpm_evidence.aks["rsassa"].tss_public
    from_tpm2b = parse_tpm2b_public(tss)
    from_tpmt = parse_tpmt_public(tss[2:])
    assert from_tpm2b == from_tpmt == parse_public(tss) == parse_public(tss[2:])
    assert from_tpm2b.marshal() == tss[2:]
    assert from_tpm2b.marshal_tpm2b() == tss


def test_public_trailing_bytes_refused(tpm_evidence: TpmEvidence) -> None:
    tss = tpm_evidence.aks["ecdsa"].tss_public
    with pytest.raises(TpmStructureError, match="trailing"):
        parse_tpmt_public(tss[2:] + b"\x00")
    with pytest.raises(TpmStructureError, match="TPM2B_PUBLIC"):
        parse_tpm2b_public(tss + b"\x00")
    with pytest.raises(TpmStructureError):
        parse_public(tss + b"\x00")


def _quote_fields_ok(quote: TpmQuote, bank: int) -> None:
    attest = parse_attest(quote.attest)
    assert attest.magic == TPM_GENERATED_VALUE
    assert attest.type == TPM_ST_ATTEST_QUOTE
    assert attest.extra_data == quote.nonce
    # qualifiedSigner is a Name: nameAlg SHA-256 + 32-byte digest.
    assert attest.qualified_signer[:2] == b"\x00\x0b" and len(attest.qualified_signer) == 34
    assert attest.clock_info.reset_count >= 0 and attest.clock_info.safe is True
    assert attest.quote is not None
    (selection,) = attest.quote.pcr_select.selections
    assert selection.hash_alg == bank
    assert selection.pcrs == (0, 14, 15)
    assert len(attest.quote.pcr_digest) == 32
    assert attest.raw == quote.attest
    # The quote-info part is a TPML_PCR_SELECTION then the TPM2B digest.
    selection_bytes = attest.attested[: -(2 + len(attest.quote.pcr_digest))]
    assert parse_pcr_selection(selection_bytes) == attest.quote.pcr_select


def test_attest_fields(tpm_evidence: TpmEvidence) -> None:
    _quote_fields_ok(tpm_evidence.quotes["rsassa"], TPM_ALG_SHA256)
    _quote_fields_ok(tpm_evidence.quotes["sha1_bank"], TPM_ALG_SHA1)


def test_attest_trailing_bytes_refused(tpm_evidence: TpmEvidence) -> None:
    with pytest.raises(TpmStructureError, match="trailing"):
        parse_attest(tpm_evidence.quotes["rsassa"].attest + b"\x00")


@pytest.mark.parametrize(
    ("label", "sig_alg", "hash_alg"),
    [
        ("rsassa", TPM_ALG_RSASSA, TPM_ALG_SHA256),
        ("rsapss", TPM_ALG_RSAPSS, TPM_ALG_SHA256),
        ("sha1_signature", TPM_ALG_RSASSA, TPM_ALG_SHA1),
    ],
)
def test_rsa_signature_fields(
    tpm_evidence: TpmEvidence, label: str, sig_alg: int, hash_alg: int
) -> None:
    signature = parse_signature(tpm_evidence.quotes[label].signature)
    assert (signature.sig_alg, signature.hash_alg) == (sig_alg, hash_alg)
    assert len(signature.rsa_signature) == 256
    assert signature.ecc_r == signature.ecc_s == b""


def test_ecdsa_signature_fields(tpm_evidence: TpmEvidence) -> None:
    signature = parse_signature(tpm_evidence.quotes["ecdsa"].signature)
    assert (signature.sig_alg, signature.hash_alg) == (TPM_ALG_ECDSA, TPM_ALG_SHA256)
    assert 0 < len(signature.ecc_r) <= 32 and 0 < len(signature.ecc_s) <= 32
    assert signature.rsa_signature == b""


def test_signature_trailing_bytes_refused(tpm_evidence: TpmEvidence) -> None:
    with pytest.raises(TpmStructureError, match="trailing"):
        parse_signature(tpm_evidence.quotes["ecdsa"].signature + b"\x00")


@pytest.mark.parametrize("label", ["rsassa", "ecdsa"])
def test_truncated_real_structures_refused(tpm_evidence: TpmEvidence, label: str) -> None:
    quote = tpm_evidence.quotes[label]
    for parser, data in (
        (parse_attest, quote.attest),
        (parse_signature, quote.signature),
        (parse_public, quote.ak.tss_public),
        (parse_public, quote.ak.tss_public[2:]),
    ):
        for length in range(len(data)):
            with pytest.raises(TpmStructureError):
                parser(data[:length])
