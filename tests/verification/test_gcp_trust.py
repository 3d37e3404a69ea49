"""Google Cloud's vTPM AK trust: Google's roots pinned by fingerprint, its intermediates
shipped, a real GCE AK certificate accepted, and nothing pinned across platforms."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from aicert.chain import (
    GCP_EK_AK_CA_ROOT_SHA256,
    GCP_TPM_EK_ROOT_1_SHA256,
    fingerprint_sha256,
    issuer_key_purposes,
    pinned_roots,
    shipped_intermediates,
    verify_ak_chain,
)
from aicert.errors import CertificateChainError
from aicert.model import PLATFORM_KINDS
from tests.data import DATA, TRUST_ROOTS
from tests.verification.azure_like import rsa_key
from tests.verification.gcp_like import GoogleLikeCa

AT = datetime(2026, 6, 1, tzinfo=UTC)
REAL_AK = (DATA / "gcp" / "gce-ak-certificate.pem").read_text()


def _pem(path_name: str) -> str:
    return (TRUST_ROOTS / path_name).read_text()


def _certificate(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode())


def test_gcp_is_a_platform_kind() -> None:
    assert "gcp" in PLATFORM_KINDS


def test_pinned_fingerprints_are_googles_published_roots() -> None:
    assert fingerprint_sha256(_certificate(_pem("gcp-tpm-ek-root-1.pem"))) == (
        GCP_TPM_EK_ROOT_1_SHA256
    )
    assert fingerprint_sha256(_certificate(_pem("gcp-ek-ak-ca-root.pem"))) == (
        GCP_EK_AK_CA_ROOT_SHA256
    )
    assert set(pinned_roots("gcp")) == {GCP_TPM_EK_ROOT_1_SHA256, GCP_EK_AK_CA_ROOT_SHA256}


def test_shipped_intermediates_are_googles_public_ones() -> None:
    shipped = {fingerprint_sha256(_certificate(pem)) for pem in shipped_intermediates("gcp")}
    published = {
        fingerprint_sha256(_certificate(_pem(name)))
        for name in (
            "gcp-tpm-ek-intermediate-2.pem",
            "gcp-tpm-ek-intermediate-3.pem",
            "gcp-ek-ak-ca-intermediate-v3.pem",
        )
    }
    assert shipped == published
    assert shipped_intermediates("azure") == ()


def test_no_roots_pinned_for_project_ca_platforms() -> None:
    assert pinned_roots("local") == ()
    assert pinned_roots("qemu") == ()


def test_real_gce_ak_certificate_chains_to_the_pinned_root() -> None:
    # The certificate alone (as GCE's NV index holds it) plus the shipped intermediates and
    # the root, which travels in the evidence and is trusted by its pinned fingerprint.
    chain = verify_ak_chain(
        [REAL_AK, *shipped_intermediates("gcp"), _pem("gcp-ek-ak-ca-root.pem")],
        pinned_root_fingerprints=pinned_roots("gcp"),
        at_time=AT,
        issuer_purposes=issuer_key_purposes("gcp"),
    )
    assert chain.root_fingerprint_sha256 == GCP_EK_AK_CA_ROOT_SHA256
    assert "EK/AK CA Intermediate" in chain.chain[1].subject.rfc4514_string()


def test_googles_ek_only_issuers_are_refused_under_the_default_issuer_rule() -> None:
    # Google's CAs list only tcg-kp-EKCertificate; only a gcp chain accepts that on an issuer.
    with pytest.raises(CertificateChainError, match="does not allow AK certificates"):
        verify_ak_chain(
            [REAL_AK, *shipped_intermediates("gcp"), _pem("gcp-ek-ak-ca-root.pem")],
            pinned_root_fingerprints=pinned_roots("gcp"),
            at_time=AT,
        )


def test_real_gce_ak_certificate_is_refused_under_azures_pin() -> None:
    with pytest.raises(CertificateChainError, match="no trust anchor"):
        verify_ak_chain(
            [REAL_AK, *shipped_intermediates("gcp"), _pem("gcp-ek-ak-ca-root.pem")],
            pinned_root_fingerprints=pinned_roots("azure"),
            at_time=AT,
        )


def test_real_gce_ak_certificate_without_its_intermediate_is_refused() -> None:
    with pytest.raises(CertificateChainError, match="does not chain"):
        verify_ak_chain(
            [REAL_AK, _pem("gcp-ek-ak-ca-root.pem")],
            pinned_root_fingerprints=pinned_roots("gcp"),
            at_time=AT,
            issuer_purposes=issuer_key_purposes("gcp"),
        )


def test_google_shaped_chain_under_an_unpinned_root_is_refused() -> None:
    ca = GoogleLikeCa.create(datetime(2024, 1, 1, tzinfo=UTC))
    leaf = ca.ak_certificate(rsa_key().public_key(), not_before=datetime(2024, 5, 1, tzinfo=UTC))
    pems = [c.public_bytes(Encoding.PEM).decode() for c in (leaf, ca.intermediate.certificate)]
    root = ca.root.certificate.public_bytes(Encoding.PEM).decode()
    # Same names as Google's, another key: only the pin tells them apart.
    with pytest.raises(CertificateChainError, match="does not chain"):
        verify_ak_chain(
            [*pems, root, _pem("gcp-ek-ak-ca-root.pem")],
            pinned_root_fingerprints=pinned_roots("gcp"),
            at_time=AT,
            issuer_purposes=issuer_key_purposes("gcp"),
        )
    # The leaf policy accepts Google's leaf shape when its root is trusted.
    chain = verify_ak_chain(
        pems,
        trusted_roots=[ca.root.certificate],
        at_time=AT,
        issuer_purposes=issuer_key_purposes("gcp"),
    )
    assert chain.leaf == leaf
