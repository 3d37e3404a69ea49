"""``aicert.verify_platform_attestation`` on raw vTPM evidence of a GCE-shaped machine.

A swtpm plays the VM's vTPM: it is extended with every event of a real GCE boot event log
(Container-Optimized OS on a Confidential VM, ``cos-85-amd-sev.bin``) and quotes PCR 0-15 with
an AK certified by a chain of Google's shape (``EK/AK CA Root`` -> ``EK/AK CA Intermediate`` ->
the AK, the CAs listing only the EK purpose, as Google's do); the generated root is passed as
a trusted root (Google's is not ours to sign with). The evidence is what go-tpm-tools or
tpm2-tools hand over: chain, TPMS_ATTEST, TPMT_SIGNATURE, nonce, PCR values, event log. Each
tamper raises its own error. tpm2-tools' own quotes (``tpm2_quote``) verify the same way.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, load_pem_public_key

from aicert import (
    AkMismatchError,
    CertificateChainError,
    EventLogError,
    NonceMismatchError,
    PcrDigestError,
    PcrSelectionError,
    PlatformError,
    QuoteSignatureError,
    verify_platform_attestation,
)
from aicert.gcp_reference import derive_gcp_reference_values
from aicert.reference_value_sets import GcpReferenceValueSet
from aicert.tpm_structures import parse_tpmt_public
from tests.verification.conftest import TpmQuote
from tests.verification.gcp_like import GoogleLikeCa
from tests.verification.reference_values.eventlogs import read_log, replayed_pcrs, with_other_digest
from tests.verification.verify.factory import TpmRig

pytestmark = [pytest.mark.swtpm]
GCE_LOG = "cos-85-amd-sev.bin"
EV_NO_ACTION = 0x3
ISSUED = datetime(2024, 5, 7, tzinfo=UTC)
AT = datetime(2026, 6, 1, tzinfo=UTC)
IMAGE = "projects/cos-cloud/global/images/cos-85-13310-1041-9"


@dataclass(frozen=True)
class Evidence:
    """Raw evidence, as a tool on the VM would collect it."""

    chain: list[str]
    root_pem: str
    attest: bytes
    signature: bytes
    nonce: bytes
    pcrs: dict[int, bytes]
    event_log: bytes
    ak_public: bytes

    def verify(self, **changes: object) -> object:
        arguments: dict[str, object] = {
            "ak_certificate_chain": self.chain,
            "attest": self.attest,
            "signature": self.signature,
            "nonce": self.nonce,
            "pcrs": self.pcrs,
            "event_log": self.event_log,
            "platform": "gcp",
            "trusted_roots": [self.root_pem],
            "at_time": AT,
        }
        arguments.update(changes)
        return verify_platform_attestation(**arguments)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def ca() -> GoogleLikeCa:
    return GoogleLikeCa.create(datetime(2022, 7, 8, tzinfo=UTC))


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TpmRig]:
    workdir = tmp_path_factory.mktemp("gce-vtpm")
    rig = TpmRig.create(workdir / "tpm", workdir / "ek-ca", workdir / "platform-ca")
    try:
        yield rig
    finally:
        rig.close()


@pytest.fixture(scope="module")
def evidence(rig: TpmRig, ca: GoogleLikeCa) -> Evidence:
    boot_log = read_log(GCE_LOG)
    tpm = rig.measure([], boot_event_log=boot_log)
    nonce = secrets.token_bytes(32)
    quote = tpm.quote(rig.ak, tuple(range(16)), nonce)
    ak_key = parse_tpmt_public(rig.ak.public_bytes).to_cryptography_key()
    leaf = ca.ak_certificate(ak_key, not_before=ISSUED)
    return Evidence(
        chain=[
            leaf.public_bytes(Encoding.PEM).decode(),
            ca.intermediate.pem,
        ],
        root_pem=ca.root.pem,
        attest=quote.attest,
        signature=quote.signature,
        nonce=nonce,
        pcrs=dict(quote.pcrs),
        event_log=boot_log,
        ak_public=rig.ak.public_bytes,
    )


@pytest.fixture(scope="module")
def reference() -> GcpReferenceValueSet:
    log = read_log(GCE_LOG)
    return derive_gcp_reference_values(log, replayed_pcrs(log), image=IMAGE)


def test_gce_evidence_verifies_with_its_boot_log(evidence: Evidence) -> None:
    result = evidence.verify(ak_public=evidence.ak_public)
    assert result.platform == "gcp"
    assert "CN=EK/AK CA Root" in result.chain.root_subject
    assert result.boot_log is not None and len(result.boot_log.events) > 10
    assert result.boot is None
    assert result.pcrs == evidence.pcrs


def test_gce_evidence_is_judged_against_the_images_reference_values(
    evidence: Evidence, reference: GcpReferenceValueSet
) -> None:
    result = evidence.verify(reference_values=reference)
    assert result.boot is not None
    assert result.boot.note.startswith("boot chain matches Google Cloud reference values")
    assert IMAGE in result.boot.note


def test_leaf_without_its_intermediate_is_refused(evidence: Evidence) -> None:
    # The generated intermediate is not one of Google's shipped ones: without it the leaf
    # has no issuer.
    with pytest.raises(CertificateChainError):
        evidence.verify(ak_certificate_chain=evidence.chain[:1])


def test_untrusted_root_is_refused(evidence: Evidence) -> None:
    with pytest.raises(CertificateChainError, match="no trust anchor"):
        evidence.verify(trusted_roots=[])


def test_azure_platform_does_not_accept_googles_issuer_purposes(evidence: Evidence) -> None:
    with pytest.raises(CertificateChainError, match="does not allow AK certificates"):
        evidence.verify(platform="azure")


def test_other_key_as_ak_public_is_refused(evidence: Evidence, rig: TpmRig) -> None:
    other = rig.tpm.create_ak()
    with pytest.raises(AkMismatchError, match="not the key in the AK certificate"):
        evidence.verify(ak_public=other.public_bytes)


def test_malformed_ak_public_is_refused(evidence: Evidence) -> None:
    with pytest.raises(AkMismatchError, match="ak_public"):
        evidence.verify(ak_public=evidence.ak_public[:-3])


def test_flipped_signature_bit_is_refused(evidence: Evidence) -> None:
    signature = bytearray(evidence.signature)
    signature[-1] ^= 1
    with pytest.raises(QuoteSignatureError):
        evidence.verify(signature=bytes(signature))


def test_other_nonce_is_refused(evidence: Evidence) -> None:
    with pytest.raises(NonceMismatchError):
        evidence.verify(nonce=secrets.token_bytes(32))


def test_edited_pcr_value_is_refused(evidence: Evidence) -> None:
    pcrs = {**evidence.pcrs, 4: bytes(32)}
    with pytest.raises(PcrDigestError):
        evidence.verify(pcrs=pcrs)


def test_fewer_pcrs_than_quoted_is_refused(evidence: Evidence) -> None:
    pcrs = {index: value for index, value in evidence.pcrs.items() if index != 15}
    with pytest.raises(PcrSelectionError):
        evidence.verify(pcrs=pcrs)


def test_edited_boot_log_does_not_replay(evidence: Evidence) -> None:
    with pytest.raises(EventLogError, match="PCR"):
        evidence.verify(event_log=with_other_digest(evidence.event_log, 5))


def test_other_boot_is_refused_by_the_reference_values(
    evidence: Evidence, reference: GcpReferenceValueSet
) -> None:
    other_log = read_log("rhel8-uefi.bin")
    other = derive_gcp_reference_values(other_log, replayed_pcrs(other_log), image=IMAGE)
    with pytest.raises(PlatformError):
        evidence.verify(reference_values=other)


def test_reference_values_of_another_platform_are_refused(
    evidence: Evidence, reference: GcpReferenceValueSet
) -> None:
    from aicert.reference_value_sets import AzureReferenceValueSet

    azure = AzureReferenceValueSet.model_validate(
        {
            **reference.model_dump(mode="json", exclude={"platform", "image"}),
            "platform": "azure",
            "image": {
                "gallery_image_version_id": "/communityGalleries/g/images/i/versions/1",
            },
        }
    )
    with pytest.raises(PlatformError, match="for platform 'azure'"):
        evidence.verify(reference_values=azure)


def test_caller_mistakes_are_type_and_value_errors(evidence: Evidence) -> None:
    with pytest.raises(ValueError, match="platform"):
        evidence.verify(platform="local")
    with pytest.raises(ValueError, match="timezone"):
        evidence.verify(at_time=datetime(2026, 1, 1))
    with pytest.raises(TypeError, match="list of PEM"):
        evidence.verify(ak_certificate_chain=evidence.chain[0])


def test_tpm2_tools_quote_verifies(tpm2_quote: TpmQuote, ca: GoogleLikeCa) -> None:
    """A quote made by tpm2_quote, with the AK's PEM from tpm2_createak, checks the same way
    (PCR 0, 14, 15 quoted, no event log)."""
    if tpm2_quote.bank != "sha256":
        pytest.skip("only the SHA-256 bank is read")
    key = load_pem_public_key(tpm2_quote.ak.pem_public)
    leaf = ca.ak_certificate(key, not_before=ISSUED)  # type: ignore[arg-type]
    chain = [leaf.public_bytes(Encoding.PEM).decode(), ca.intermediate.pem]
    result = verify_platform_attestation(
        chain,
        tpm2_quote.attest,
        tpm2_quote.signature,
        tpm2_quote.nonce,
        tpm2_quote.pcrs,
        trusted_roots=[ca.root.pem],
        at_time=AT,
    )
    assert result.boot_log is None
    with pytest.raises(NonceMismatchError):
        verify_platform_attestation(
            chain,
            tpm2_quote.attest,
            tpm2_quote.signature,
            bytes([tpm2_quote.nonce[0] ^ 1]) + tpm2_quote.nonce[1:],
            tpm2_quote.pcrs,
            trusted_roots=[ca.root.pem],
            at_time=AT,
        )
