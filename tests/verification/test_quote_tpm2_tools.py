"""verify_quote on real quotes made by tpm2-tools on a swtpm, and a tamper matrix where each
test changes exactly one thing and expects exactly one exception type."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from cryptography.hazmat.primitives import serialization

from aicert.errors import (
    NonceMismatchError,
    PcrDigestError,
    PcrSelectionError,
    QuoteSignatureError,
)
from aicert.quote import public_key_from_ak, verify_quote
from aicert.tpm_structures import TPM_ALG_SHA256, TPM_ST_ATTEST_QUOTE

if TYPE_CHECKING:
    from .conftest import AkFiles, TpmEvidence, TpmQuote


def _flip_bit(data: bytes, index: int, bit: int = 0) -> bytes:
    mutable = bytearray(data)
    mutable[index] ^= 1 << bit
    return bytes(mutable)


def _verify(quote: TpmQuote, **changes: object) -> object:
    arguments: dict[str, object] = {
        "attest": quote.attest,
        "signature": quote.signature,
        "ak_public": quote.ak.tss_public,
        "nonce": quote.nonce,
        "pcrs": quote.pcrs,
    }
    arguments.update(changes)
    return verify_quote(**arguments)  # type: ignore[arg-type]


# --- Accepted -----------------------------------------------------------------------------------


def test_real_quote_verifies_with_tss_public(tpm2_quote: TpmQuote) -> None:
    attest = verify_quote(
        tpm2_quote.attest,
        tpm2_quote.signature,
        tpm2_quote.ak.tss_public,
        tpm2_quote.nonce,
        tpm2_quote.pcrs,
    )
    assert attest.type == TPM_ST_ATTEST_QUOTE
    assert attest.extra_data == tpm2_quote.nonce
    assert attest.quote is not None
    assert attest.quote.pcr_select.selections[0].hash_alg == TPM_ALG_SHA256
    assert attest.quote.pcr_select.selections[0].pcrs == (0, 14, 15)


def test_real_quote_verifies_with_tpmt_public(tpm2_quote: TpmQuote) -> None:
    # TPM2B_PUBLIC minus its u16 size prefix is the bare TPMT_PUBLIC.
    _verify(tpm2_quote, ak_public=tpm2_quote.ak.tss_public[2:])


def test_real_quote_verifies_with_pem_bytes_and_text(tpm2_quote: TpmQuote) -> None:
    _verify(tpm2_quote, ak_public=tpm2_quote.ak.pem_public)
    _verify(tpm2_quote, ak_public=tpm2_quote.ak.pem_public.decode("ascii"))


def test_real_quote_verifies_with_cryptography_key(tpm2_quote: TpmQuote) -> None:
    key = serialization.load_pem_public_key(tpm2_quote.ak.pem_public)
    _verify(tpm2_quote, ak_public=key)


def test_tss_public_and_pem_are_the_same_key(tpm2_quote: TpmQuote) -> None:
    from_tss, public = public_key_from_ak(tpm2_quote.ak.tss_public)
    from_pem, no_public = public_key_from_ak(tpm2_quote.ak.pem_public)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    assert from_tss.public_bytes(der, spki) == from_pem.public_bytes(der, spki)
    assert public is not None and no_public is None


def test_claimed_pcrs_order_in_dict_does_not_matter(tpm2_quote: TpmQuote) -> None:
    reordered = dict(sorted(tpm2_quote.pcrs.items(), reverse=True))
    _verify(tpm2_quote, pcrs=reordered)


# --- Tamper matrix ------------------------------------------------------------------------------


@pytest.mark.parametrize("position", ["first", "middle", "last"])
def test_one_bit_of_attest_changed(tpm2_quote: TpmQuote, position: str) -> None:
    index = {"first": 0, "middle": len(tpm2_quote.attest) // 2, "last": -1}[position]
    with pytest.raises(QuoteSignatureError):
        _verify(tpm2_quote, attest=_flip_bit(tpm2_quote.attest, index))


def test_one_bit_of_signature_value_changed(tpm2_quote: TpmQuote) -> None:
    # The last byte is inside the RSA signature or the ECDSA s value.
    with pytest.raises(QuoteSignatureError):
        _verify(tpm2_quote, signature=_flip_bit(tpm2_quote.signature, -1))


def test_claimed_pcr_value_changed(tpm2_quote: TpmQuote) -> None:
    pcrs = dict(tpm2_quote.pcrs)
    pcrs[14] = _flip_bit(pcrs[14], 0)
    with pytest.raises(PcrDigestError):
        _verify(tpm2_quote, pcrs=pcrs)


def test_pcrs_relabelled(tpm2_quote: TpmQuote) -> None:
    # CVE-2024-29039: the same values in the same order, so the pcrDigest still matches,
    # but presented as other PCRs (the quote of PCR 0 passed off as PCR 14, ...).
    values = tpm2_quote.pcrs
    relabelled = {14: values[0], 15: values[14], 16: values[15]}
    with pytest.raises(PcrSelectionError):
        _verify(tpm2_quote, pcrs=relabelled)


def test_pcr_swapped_labels(tpm2_quote: TpmQuote) -> None:
    values = tpm2_quote.pcrs
    swapped = {0: values[14], 14: values[0], 15: values[15]}
    with pytest.raises(PcrDigestError):
        _verify(tpm2_quote, pcrs=swapped)


def test_claimed_pcrs_subset(tpm2_quote: TpmQuote) -> None:
    subset = {index: tpm2_quote.pcrs[index] for index in (0, 14)}
    with pytest.raises(PcrSelectionError):
        _verify(tpm2_quote, pcrs=subset)


def test_claimed_pcrs_superset(tpm2_quote: TpmQuote) -> None:
    superset = {**tpm2_quote.pcrs, 13: bytes(32)}
    with pytest.raises(PcrSelectionError):
        _verify(tpm2_quote, pcrs=superset)


def test_nonce_differs(tpm2_quote: TpmQuote) -> None:
    with pytest.raises(NonceMismatchError):
        _verify(tpm2_quote, nonce=_flip_bit(tpm2_quote.nonce, 0))


def test_another_aks_key(tpm2_quote: TpmQuote, other_ak: AkFiles) -> None:
    for form in (other_ak.tss_public, other_ak.pem_public):
        with pytest.raises(QuoteSignatureError):
            _verify(tpm2_quote, ak_public=form)


def test_ak_of_another_type(tpm_evidence: TpmEvidence) -> None:
    rsa_quote = tpm_evidence.quotes["rsassa"]
    with pytest.raises(QuoteSignatureError):
        _verify(rsa_quote, ak_public=tpm_evidence.aks["ecdsa"].tss_public)


def test_rsassa_signature_checked_against_rsapss_ak(tpm_evidence: TpmEvidence) -> None:
    # Same TPM, RSA both, but the RSAPSS AK did not sign this quote.
    with pytest.raises(QuoteSignatureError):
        _verify(tpm_evidence.quotes["rsassa"], ak_public=tpm_evidence.aks["rsapss"].pem_public)


# --- SHA-1 refused ------------------------------------------------------------------------------


def test_sha1_signature_refused(tpm_evidence: TpmEvidence) -> None:
    quote = tpm_evidence.quotes["sha1_signature"]
    for form in (quote.ak.tss_public, quote.ak.pem_public):
        with pytest.raises(QuoteSignatureError, match="SHA-256 or stronger"):
            _verify(quote, ak_public=form)


def test_sha1_pcr_bank_refused_when_asked_for(tpm_evidence: TpmEvidence) -> None:
    quote = tpm_evidence.quotes["sha1_bank"]
    assert quote.bank == "sha1" and len(quote.pcrs[14]) == 20
    with pytest.raises(PcrSelectionError, match="SHA-1"):
        verify_quote(
            quote.attest, quote.signature, quote.ak.tss_public, quote.nonce, quote.pcrs, "sha1"
        )


def test_sha1_pcr_bank_refused_as_sha256(tpm_evidence: TpmEvidence) -> None:
    quote = tpm_evidence.quotes["sha1_bank"]
    with pytest.raises(PcrSelectionError, match="bank"):
        _verify(quote)
