"""AK certificate chain validation (verification step 2) on real Azure CA certificates and on
generated chains shaped like Azure's and like the local platform CA's."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import FrozenInstanceError
from datetime import UTC, datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from aicert.chain import (
    AZURE_VTPM_ROOT_2023_SHA256,
    PINNED_ROOT_FINGERPRINTS,
    ChainVerification,
    ak_ca_extension_policy,
    fingerprint_sha256,
    leaf_public_key_matches,
    load_pem_certificates,
    verify_ak_chain,
)
from aicert.errors import CertificateChainError
from tests.data import TRUST_ROOTS

from .azure_like import (
    TCG_KP_AIK_CERTIFICATE,
    TCG_KP_EK_CERTIFICATE,
    Issued,
    LeafShape,
    ak_leaf,
    azure_like_intermediate,
    azure_like_root,
    key_usage,
    new_vm_id,
    rsa_key,
    self_signed_ca,
    tpm_directory_name_san,
)

ROOT_NOT_BEFORE = datetime(2023, 6, 1, 18, 8, 53, tzinfo=UTC)
ROOT_NOT_AFTER = datetime(2048, 6, 1, 18, 15, 41, tzinfo=UTC)
CA03_NOT_BEFORE = datetime(2025, 4, 24, 18, 1, 17, tzinfo=UTC)
CA03_NOT_AFTER = datetime(2027, 4, 24, 18, 1, 17, tzinfo=UTC)
AK_ISSUED = datetime(2025, 6, 1, tzinfo=UTC)  # the AK expires about 2026-12-01
QUOTE_TIME = datetime(2026, 1, 1, tzinfo=UTC)
AFTER_AK_EXPIRY = datetime(2027, 1, 15, tzinfo=UTC)  # CA-03 and root still valid
BEFORE_AK_ISSUED = datetime(2025, 5, 1, tzinfo=UTC)


def _real(name: str) -> x509.Certificate:
    certificates = load_pem_certificates((TRUST_ROOTS / name).read_bytes())
    assert len(certificates) == 1
    return certificates[0]


def _pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(Encoding.PEM).decode("ascii")


@pytest.fixture(scope="module")
def real_root() -> x509.Certificate:
    return _real("azure-virtual-tpm-root-ca-2023.pem")


@pytest.fixture(scope="module")
def real_ca03() -> x509.Certificate:
    return _real("global-virtual-tpm-ca-03.pem")


@pytest.fixture(scope="module")
def fake_root() -> Issued:
    return azure_like_root(not_before=ROOT_NOT_BEFORE, not_after=ROOT_NOT_AFTER)


@pytest.fixture(scope="module")
def fake_ca03(fake_root: Issued) -> Issued:
    return azure_like_intermediate(fake_root, not_before=CA03_NOT_BEFORE, not_after=CA03_NOT_AFTER)


@pytest.fixture(scope="module")
def azure_leaf(fake_ca03: Issued) -> Issued:
    return ak_leaf(fake_ca03, not_before=AK_ISSUED)


def _verify_pinned(
    chain: Sequence[Issued], root: Issued, at_time: datetime = QUOTE_TIME
) -> ChainVerification:
    return verify_ak_chain(
        [issued.pem for issued in chain],
        pinned_root_fingerprints=[fingerprint_sha256(root.certificate)],
        at_time=at_time,
    )


# Real Azure certificates -------------------------------------------------------------------


def test_real_root_fingerprint_is_the_pinned_constant(real_root: x509.Certificate) -> None:
    assert fingerprint_sha256(real_root) == AZURE_VTPM_ROOT_2023_SHA256
    assert PINNED_ROOT_FINGERPRINTS["azure"] == AZURE_VTPM_ROOT_2023_SHA256
    assert real_root.subject == real_root.issuer


def test_real_ca03_is_signed_by_real_root(
    real_root: x509.Certificate, real_ca03: x509.Certificate
) -> None:
    root_key = real_root.public_key()
    assert isinstance(root_key, RSAPublicKey)
    assert real_ca03.signature_hash_algorithm is not None
    # Raises InvalidSignature if CA-03 was not signed by this root's key.
    root_key.verify(
        real_ca03.signature,
        real_ca03.tbs_certificate_bytes,
        padding.PKCS1v15(),
        real_ca03.signature_hash_algorithm,
    )
    assert real_ca03.issuer == real_root.subject


def test_real_root_and_ca03_form_a_valid_path_under_our_ca_policy(
    real_root: x509.Certificate, real_ca03: x509.Certificate
) -> None:
    # CA-03's key is not ours, so it cannot issue a test leaf. cryptography's verifier accepts
    # CA-03 as the end entity when the EE policy allows a CA certificate (permit_all); the CA
    # policy on the root is the one verify_ak_chain uses.
    verifier = (
        PolicyBuilder()
        .store(Store([real_root]))
        .time(QUOTE_TIME)
        .extension_policies(
            ca_policy=ak_ca_extension_policy(), ee_policy=ExtensionPolicy.permit_all()
        )
        .build_client_verifier()
    )
    built = verifier.verify(real_ca03, []).chain
    assert [fingerprint_sha256(c) for c in built] == [
        fingerprint_sha256(real_ca03),
        AZURE_VTPM_ROOT_2023_SHA256,
    ]
    expired = (
        PolicyBuilder()
        .store(Store([real_root]))
        .time(CA03_NOT_AFTER + timedelta(days=1))
        .extension_policies(
            ca_policy=ak_ca_extension_policy(), ee_policy=ExtensionPolicy.permit_all()
        )
        .build_client_verifier()
    )
    with pytest.raises(VerificationError):
        expired.verify(real_ca03, [])


def test_real_ca03_is_refused_as_an_ak_leaf(
    real_root: x509.Certificate, real_ca03: x509.Certificate
) -> None:
    with pytest.raises(CertificateChainError, match="Global Virtual TPM CA - 03"):
        verify_ak_chain(
            [_pem(real_ca03), _pem(real_root)],
            pinned_root_fingerprints=[AZURE_VTPM_ROOT_2023_SHA256],
            at_time=QUOTE_TIME,
        )


def test_forged_leaf_claiming_real_ca03_as_issuer_is_refused(
    real_root: x509.Certificate, real_ca03: x509.Certificate
) -> None:
    # Same issuer name as the real CA-03, signed by a key that is not CA-03's.
    impostor = Issued(real_ca03, rsa_key(2048))
    forged = ak_leaf(impostor, not_before=AK_ISSUED)
    with pytest.raises(CertificateChainError, match="f1d2c3b4-a5e6-4f70-8192-a3b4c5d6e7f8"):
        verify_ak_chain(
            [forged.pem, _pem(real_ca03), _pem(real_root)],
            pinned_root_fingerprints=PINNED_ROOT_FINGERPRINTS.values(),
            at_time=QUOTE_TIME,
        )


# Generated Azure-like chains ---------------------------------------------------------------


def test_azure_like_chain_validates_inside_all_validity_periods(
    fake_root: Issued, fake_ca03: Issued, azure_leaf: Issued
) -> None:
    result = _verify_pinned([azure_leaf, fake_ca03, fake_root], fake_root)
    assert result.leaf == azure_leaf.certificate
    assert result.chain == (azure_leaf.certificate, fake_ca03.certificate, fake_root.certificate)
    assert result.root_subject == (
        "CN=Azure Virtual TPM Root Certificate Authority 2023,O=Microsoft Corporation,C=US"
    )
    assert result.root_fingerprint_sha256 == fingerprint_sha256(fake_root.certificate)
    assert result.not_before == AK_ISSUED
    assert result.not_after == azure_leaf.certificate.not_valid_after_utc
    assert result.not_after < CA03_NOT_AFTER
    with pytest.raises(FrozenInstanceError):
        result.root_subject = "changed"  # type: ignore[misc]


def test_root_may_be_left_out_when_given_as_trusted(
    fake_root: Issued, fake_ca03: Issued, azure_leaf: Issued
) -> None:
    result = verify_ak_chain(
        [azure_leaf.pem, fake_ca03.pem],
        trusted_roots=[fake_root.certificate],
        at_time=QUOTE_TIME,
    )
    assert result.chain[-1] == fake_root.certificate


def test_chain_fails_after_the_ak_expires(
    fake_root: Issued, fake_ca03: Issued, azure_leaf: Issued
) -> None:
    # The quote was made while the AK certificate was valid; "now" is after its expiry.
    assert _verify_pinned([azure_leaf, fake_ca03, fake_root], fake_root, QUOTE_TIME)
    with pytest.raises(CertificateChainError) as raised:
        _verify_pinned([azure_leaf, fake_ca03, fake_root], fake_root, AFTER_AK_EXPIRY)
    message = str(raised.value)
    assert "CN=f1d2c3b4-a5e6-4f70-8192-a3b4c5d6e7f8" in message
    assert "2027-01-15" in message


def test_chain_fails_before_the_ak_is_valid(
    fake_root: Issued, fake_ca03: Issued, azure_leaf: Issued
) -> None:
    with pytest.raises(CertificateChainError):
        _verify_pinned([azure_leaf, fake_ca03, fake_root], fake_root, BEFORE_AK_ISSUED)


def test_ak_validity_is_about_eighteen_months(azure_leaf: Issued) -> None:
    certificate = azure_leaf.certificate
    lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    assert timedelta(days=540) <= lifetime <= timedelta(days=550)
    last_valid = certificate.not_valid_after_utc
    assert last_valid < AFTER_AK_EXPIRY


def test_chain_fails_when_the_intermediate_has_expired(
    fake_root: Issued, fake_ca03: Issued
) -> None:
    leaf = ak_leaf(fake_ca03, not_before=datetime(2026, 6, 1, tzinfo=UTC))
    after_ca03 = CA03_NOT_AFTER + timedelta(days=1)
    assert leaf.certificate.not_valid_after_utc > after_ca03
    assert _verify_pinned([leaf, fake_ca03, fake_root], fake_root, CA03_NOT_AFTER)
    with pytest.raises(CertificateChainError, match="not valid at validation time"):
        _verify_pinned([leaf, fake_ca03, fake_root], fake_root, after_ca03)


def test_non_pinned_self_signed_root_is_refused_and_accepted_when_trusted(
    fake_root: Issued, fake_ca03: Issued, azure_leaf: Issued
) -> None:
    chain = [azure_leaf.pem, fake_ca03.pem, fake_root.pem]
    # The generated root has Azure's subject but not Azure's fingerprint.
    with pytest.raises(CertificateChainError, match="no trust anchor"):
        verify_ak_chain(
            chain, pinned_root_fingerprints=[AZURE_VTPM_ROOT_2023_SHA256], at_time=QUOTE_TIME
        )
    result = verify_ak_chain(
        chain,
        trusted_roots=[fake_root.certificate],
        pinned_root_fingerprints=[AZURE_VTPM_ROOT_2023_SHA256],
        at_time=QUOTE_TIME,
    )
    assert result.root_fingerprint_sha256 == fingerprint_sha256(fake_root.certificate)


def test_trusted_real_root_does_not_trust_a_lookalike_root(
    real_root: x509.Certificate, fake_root: Issued, fake_ca03: Issued, azure_leaf: Issued
) -> None:
    # Same subject as the real root, different key: the real root cannot anchor this chain.
    with pytest.raises(CertificateChainError, match="f1d2c3b4"):
        verify_ak_chain(
            [azure_leaf.pem, fake_ca03.pem, fake_root.pem],
            trusted_roots=[real_root],
            pinned_root_fingerprints=[AZURE_VTPM_ROOT_2023_SHA256],
            at_time=QUOTE_TIME,
        )


def test_no_trust_anchor_at_all_is_refused(fake_root: Issued, azure_leaf: Issued) -> None:
    with pytest.raises(CertificateChainError, match="no trust anchor"):
        verify_ak_chain([azure_leaf.pem, fake_root.pem], at_time=QUOTE_TIME)


def test_pinned_fingerprint_may_be_written_with_colons_and_uppercase(
    fake_root: Issued, fake_ca03: Issued, azure_leaf: Issued
) -> None:
    hex_digest = fingerprint_sha256(fake_root.certificate).upper()
    with_colons = ":".join(hex_digest[i : i + 2] for i in range(0, len(hex_digest), 2))
    result = verify_ak_chain(
        [azure_leaf.pem, fake_ca03.pem, fake_root.pem],
        pinned_root_fingerprints=[with_colons],
        at_time=QUOTE_TIME,
    )
    assert result.chain[-1] == fake_root.certificate


def test_malformed_pinned_fingerprint_is_refused(azure_leaf: Issued) -> None:
    with pytest.raises(CertificateChainError, match="not SHA-256 hex"):
        verify_ak_chain([azure_leaf.pem], pinned_root_fingerprints=["e6c5"], at_time=QUOTE_TIME)


def test_pinned_fingerprint_of_a_non_self_signed_certificate_is_no_anchor(
    fake_ca03: Issued, azure_leaf: Issued
) -> None:
    with pytest.raises(CertificateChainError, match="no trust anchor"):
        verify_ak_chain(
            [azure_leaf.pem, fake_ca03.pem],
            pinned_root_fingerprints=[fingerprint_sha256(fake_ca03.certificate)],
            at_time=QUOTE_TIME,
        )


def test_leaf_without_digital_signature_is_refused(fake_root: Issued, fake_ca03: Issued) -> None:
    shape = LeafShape(key_usage=key_usage("key_encipherment"))
    leaf = ak_leaf(fake_ca03, not_before=AK_ISSUED, shape=shape)
    with pytest.raises(CertificateChainError, match="digitalSignature"):
        _verify_pinned([leaf, fake_ca03, fake_root], fake_root)


def test_leaf_without_key_usage_is_accepted(fake_root: Issued, fake_ca03: Issued) -> None:
    leaf = ak_leaf(fake_ca03, not_before=AK_ISSUED, shape=LeafShape(key_usage=None))
    assert _verify_pinned([leaf, fake_ca03, fake_root], fake_root).leaf == leaf.certificate


def test_leaf_with_key_cert_sign_is_refused(fake_root: Issued, fake_ca03: Issued) -> None:
    shape = LeafShape(key_usage=key_usage("digital_signature", "key_cert_sign"))
    leaf = ak_leaf(fake_ca03, not_before=AK_ISSUED, shape=shape)
    with pytest.raises(CertificateChainError, match="keyCertSign"):
        _verify_pinned([leaf, fake_ca03, fake_root], fake_root)


def test_leaf_that_is_a_ca_is_refused(fake_root: Issued, fake_ca03: Issued) -> None:
    shape = LeafShape(basic_constraints=x509.BasicConstraints(ca=True, path_length=None))
    leaf = ak_leaf(fake_ca03, not_before=AK_ISSUED, shape=shape)
    with pytest.raises(CertificateChainError, match=r"basicConstraints\.cA"):
        _verify_pinned([leaf, fake_ca03, fake_root], fake_root)


def test_leaf_with_a_non_ak_extended_key_usage_is_refused(
    fake_root: Issued, fake_ca03: Issued
) -> None:
    shape = LeafShape(extended_key_usage=(ExtendedKeyUsageOID.CLIENT_AUTH,))
    leaf = ak_leaf(fake_ca03, not_before=AK_ISSUED, shape=shape)
    with pytest.raises(CertificateChainError, match=r"2\.23\.133\.8\.3"):
        _verify_pinned([leaf, fake_ca03, fake_root], fake_root)


def test_leaf_without_extended_key_usage_is_accepted(fake_root: Issued, fake_ca03: Issued) -> None:
    leaf = ak_leaf(fake_ca03, not_before=AK_ISSUED, shape=LeafShape(extended_key_usage=None))
    assert _verify_pinned([leaf, fake_ca03, fake_root], fake_root).leaf == leaf.certificate


def test_intermediate_whose_eku_excludes_ak_certificates_is_refused(fake_root: Issued) -> None:
    ek_only_ca = azure_like_intermediate(
        fake_root,
        common_name="Global Virtual TPM CA - 99",
        not_before=CA03_NOT_BEFORE,
        not_after=CA03_NOT_AFTER,
        extended_key_usage=[TCG_KP_EK_CERTIFICATE],
    )
    leaf = ak_leaf(ek_only_ca, not_before=AK_ISSUED)
    with pytest.raises(CertificateChainError, match="does not allow AK certificates"):
        _verify_pinned([leaf, ek_only_ca, fake_root], fake_root)


@pytest.mark.parametrize(
    ("san_critical", "empty_subject"),
    [(False, False), (True, False), (True, True)],
    ids=["san-non-critical", "san-critical", "san-critical-empty-subject"],
)
def test_azure_leaf_with_tpm_directory_name_san_is_accepted(
    fake_root: Issued, fake_ca03: Issued, san_critical: bool, empty_subject: bool
) -> None:
    shape = LeafShape(
        vm_id=new_vm_id(),
        san=tpm_directory_name_san(),
        san_critical=san_critical,
        empty_subject=empty_subject,
    )
    leaf = ak_leaf(fake_ca03, not_before=AK_ISSUED, shape=shape)
    result = _verify_pinned([leaf, fake_ca03, fake_root], fake_root)
    assert result.leaf == leaf.certificate


def test_web_pki_policy_would_refuse_the_azure_leaf(
    fake_root: Issued, fake_ca03: Issued, azure_leaf: Issued
) -> None:
    # Why the relaxed policies exist: cryptography's defaults refuse a genuine-looking AK
    # certificate that verify_ak_chain accepts.
    web_pki = PolicyBuilder().store(Store([fake_root.certificate])).time(QUOTE_TIME)
    with pytest.raises(VerificationError):
        web_pki.build_client_verifier().verify(azure_leaf.certificate, [fake_ca03.certificate])
    assert _verify_pinned([azure_leaf, fake_ca03, fake_root], fake_root)


def test_intermediates_out_of_order_still_build(fake_root: Issued) -> None:
    # Newer Azure chains: AK -> Azure Cloud Virtual TPM CA - NN -> CA 2025 -> root.
    ca_2025 = azure_like_intermediate(
        fake_root,
        common_name="Azure Cloud Virtual TPM CA 2025",
        not_before=datetime(2025, 1, 1, tzinfo=UTC),
        not_after=datetime(2035, 1, 1, tzinfo=UTC),
        path_length=1,
    )
    ca_nn = azure_like_intermediate(
        ca_2025,
        common_name="Azure Cloud Virtual TPM CA - 07",
        not_before=datetime(2025, 2, 1, tzinfo=UTC),
        not_after=datetime(2027, 2, 1, tzinfo=UTC),
    )
    leaf = ak_leaf(ca_nn, not_before=AK_ISSUED)
    result = _verify_pinned([leaf, fake_root, ca_2025, ca_nn], fake_root)
    assert result.chain == (
        leaf.certificate,
        ca_nn.certificate,
        ca_2025.certificate,
        fake_root.certificate,
    )
    assert result.not_before == AK_ISSUED
    assert result.not_after == leaf.certificate.not_valid_after_utc


def test_leaf_signed_by_a_different_key_than_its_issuer_is_refused(
    fake_root: Issued, fake_ca03: Issued
) -> None:
    forged = ak_leaf(fake_ca03, not_before=AK_ISSUED, signing_key=rsa_key(2048))
    with pytest.raises(CertificateChainError, match="f1d2c3b4"):
        _verify_pinned([forged, fake_ca03, fake_root], fake_root)


def test_missing_intermediate_is_refused(fake_root: Issued, azure_leaf: Issued) -> None:
    with pytest.raises(CertificateChainError):
        _verify_pinned([azure_leaf, fake_root], fake_root)


def test_naive_time_is_refused(fake_root: Issued, fake_ca03: Issued, azure_leaf: Issued) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        _verify_pinned([azure_leaf, fake_ca03, fake_root], fake_root, datetime(2026, 1, 1))


def test_time_in_another_timezone_is_the_same_instant(
    fake_root: Issued, fake_ca03: Issued, azure_leaf: Issued
) -> None:
    expiry = azure_leaf.certificate.not_valid_after_utc
    plus_two = timezone(timedelta(hours=2))
    just_before = (expiry - timedelta(minutes=30)).astimezone(plus_two)
    just_after = (expiry + timedelta(minutes=30)).astimezone(plus_two)
    assert _verify_pinned([azure_leaf, fake_ca03, fake_root], fake_root, just_before)
    with pytest.raises(CertificateChainError):
        _verify_pinned([azure_leaf, fake_ca03, fake_root], fake_root, just_after)


# Local platform CA -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ca() -> Issued:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "aicert"),
            x509.NameAttribute(NameOID.COMMON_NAME, "aicert local platform CA"),
        ]
    )
    return self_signed_ca(
        name,
        not_before=datetime(2025, 1, 1, tzinfo=UTC),
        not_after=datetime(2035, 1, 1, tzinfo=UTC),
        key=rsa_key(2048),
    )


def test_local_platform_ca_given_as_trusted_root(local_ca: Issued) -> None:
    # An ordinary self-signed CA issuing directly, with a leaf that has no AKI.
    shape = LeafShape(vm_id="aicert-run-1234", authority_key_identifier=False)
    leaf = ak_leaf(local_ca, not_before=datetime(2026, 1, 1, tzinfo=UTC), shape=shape)
    at = datetime(2026, 1, 2, tzinfo=UTC)
    result = verify_ak_chain([leaf.pem], trusted_roots=[local_ca.certificate], at_time=at)
    assert result.chain == (leaf.certificate, local_ca.certificate)
    assert result.root_subject == "CN=aicert local platform CA,O=aicert"
    # The Azure pin does not make the local CA trusted when it travels in the evidence.
    with pytest.raises(CertificateChainError, match="no trust anchor"):
        verify_ak_chain(
            [leaf.pem, local_ca.pem],
            pinned_root_fingerprints=PINNED_ROOT_FINGERPRINTS.values(),
            at_time=at,
        )


def test_local_leaf_not_signed_by_the_trusted_ca_is_refused(local_ca: Issued) -> None:
    other_ca = self_signed_ca(
        local_ca.certificate.subject,
        not_before=datetime(2025, 1, 1, tzinfo=UTC),
        not_after=datetime(2035, 1, 1, tzinfo=UTC),
        key=rsa_key(2048),
    )
    leaf = ak_leaf(other_ca, not_before=datetime(2026, 1, 1, tzinfo=UTC))
    with pytest.raises(CertificateChainError, match="f1d2c3b4"):
        verify_ak_chain(
            [leaf.pem, other_ca.pem],
            trusted_roots=[local_ca.certificate],
            at_time=datetime(2026, 1, 2, tzinfo=UTC),
        )


# PEM loading and key comparison ------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        "",
        "garbage",
        b"\x00\xff\xfe",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        "-----BEGIN CERTIFICATE-----\nnot base64 !!\n-----END CERTIFICATE-----\n",
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        "-----BEGIN CERTIFICATE-----\né\n-----END CERTIFICATE-----\n",
    ],
    ids=["empty", "text", "binary", "bad-der", "bad-base64", "not-a-certificate", "non-ascii"],
)
def test_garbage_pem_raises_certificate_chain_error(data: str | bytes) -> None:
    with pytest.raises(CertificateChainError):
        load_pem_certificates(data)
    with pytest.raises(CertificateChainError):
        verify_ak_chain(
            [data], pinned_root_fingerprints=[AZURE_VTPM_ROOT_2023_SHA256], at_time=QUOTE_TIME
        )


def test_garbage_intermediate_raises_certificate_chain_error(
    fake_root: Issued, azure_leaf: Issued
) -> None:
    with pytest.raises(CertificateChainError, match="not a PEM certificate"):
        verify_ak_chain(
            [azure_leaf.pem, "garbage", fake_root.pem],
            trusted_roots=[fake_root.certificate],
            at_time=QUOTE_TIME,
        )


def test_chain_entries_hold_exactly_one_certificate(
    fake_root: Issued, fake_ca03: Issued, azure_leaf: Issued
) -> None:
    bundled = azure_leaf.pem + fake_ca03.pem
    with pytest.raises(CertificateChainError, match="expected exactly one"):
        verify_ak_chain([bundled], trusted_roots=[fake_root.certificate], at_time=QUOTE_TIME)
    with pytest.raises(CertificateChainError, match="empty"):
        verify_ak_chain([], trusted_roots=[fake_root.certificate], at_time=QUOTE_TIME)
    with pytest.raises(CertificateChainError, match="not one string"):
        verify_ak_chain(azure_leaf.pem, trusted_roots=[fake_root.certificate], at_time=QUOTE_TIME)


def test_load_pem_certificates_reads_a_bundle(real_root: x509.Certificate) -> None:
    bundle = (TRUST_ROOTS / "global-virtual-tpm-ca-03.pem").read_text() + _pem(real_root)
    certificates = load_pem_certificates(bundle)
    assert [c.subject.rfc4514_string() for c in certificates] == [
        "CN=Global Virtual TPM CA - 03",
        "CN=Azure Virtual TPM Root Certificate Authority 2023,O=Microsoft Corporation,C=US",
    ]


def test_leaf_public_key_matches(azure_leaf: Issued, fake_ca03: Issued) -> None:
    assert leaf_public_key_matches(azure_leaf.certificate, azure_leaf.private_key.public_key())
    assert not leaf_public_key_matches(azure_leaf.certificate, fake_ca03.private_key.public_key())
    assert (
        TCG_KP_AIK_CERTIFICATE
        in azure_leaf.certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    )
