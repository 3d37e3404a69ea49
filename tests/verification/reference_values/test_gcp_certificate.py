"""A ``gcp`` certificate through ``verify_certificate``, with a real TPM quote.

A swtpm plays a Shielded VM's vTPM: it is extended with every event of a real GCE boot event
log (``cos-85-amd-sev.bin``, Container-Optimized OS on Compute Engine) and then with the
application events of a run, and quotes PCR 0-15. Its AK is certified by a chain of Google's
shape (``EK/AK CA Root`` -> ``EK/AK CA Intermediate``, CAs listing only the EK purpose) whose
generated root the verifier is given as a trusted root. The reference values are derived
from the same log, as the image publisher would.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from aicert.errors import CertificateChainError, PlatformError
from aicert.gcp_reference import derive_gcp_reference_values
from aicert.reference_value_sets import GcpReferenceValueSet
from aicert.tcg_eventlog import parse_event_log
from aicert.tpm_structures import parse_tpmt_public
from tests.verification.gcp_like import GoogleLikeCa
from tests.verification.verify.factory import CertificateFactory, MadeCertificate, TpmRig

from .eventlogs import read_log, replayed_pcrs, with_other_digest

pytestmark = [pytest.mark.swtpm]
GCE_LOG = "cos-85-amd-sev.bin"
IMAGE = "projects/aicert-images/global/images/aicert-guest-1-0-0"
REFERENCE_ID = "aicert-guest-1-0-0"


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TpmRig]:
    workdir = tmp_path_factory.mktemp("gce-vtpm")
    rig = TpmRig.create(workdir / "tpm", workdir / "ek-ca", workdir / "platform-ca")
    try:
        yield rig
    finally:
        rig.close()


@pytest.fixture(scope="module")
def google_ca() -> GoogleLikeCa:
    return GoogleLikeCa.create(datetime(2022, 7, 8, tzinfo=UTC))


class GoogleCertifiedFactory(CertificateFactory):
    """The factory's certificates, with the rig's AK certified by a Google-shaped chain."""

    def __init__(self, rig: TpmRig, ca: GoogleLikeCa) -> None:
        super().__init__(rig)
        ak_key = parse_tpmt_public(rig.ak.public_bytes).to_cryptography_key()
        leaf = ca.ak_certificate(ak_key, not_before=datetime(2024, 5, 7, tzinfo=UTC))
        # GCE's NV index holds the leaf only; the orchestrator adds the intermediate.
        rig.chain = [leaf.public_bytes(Encoding.PEM).decode(), ca.intermediate.pem]
        self.ca = ca

    @property
    def trust_root_pem(self) -> str:
        return self.ca.root.pem


def _boot_and_run(rig: TpmRig, ca: GoogleLikeCa, boot_log: bytes) -> MadeCertificate:
    """Measure ``boot_log`` and a run from reset PCRs, quote PCR 0-15, assemble."""
    return GoogleCertifiedFactory(rig, ca).make_certificate(
        boot_event_log=boot_log, reference_values=REFERENCE_ID, platform="gcp"
    )


@pytest.fixture(scope="module")
def reference() -> GcpReferenceValueSet:
    log = read_log(GCE_LOG)
    return derive_gcp_reference_values(
        log, replayed_pcrs(log), image=IMAGE, reference_id=REFERENCE_ID
    )


@pytest.fixture(scope="module")
def good(rig: TpmRig, google_ca: GoogleLikeCa) -> MadeCertificate:
    return _boot_and_run(rig, google_ca, read_log(GCE_LOG))


def test_gcp_certificate_verifies_against_its_reference_values(
    good: MadeCertificate, reference: GcpReferenceValueSet
) -> None:
    report = good.verify(reference_values=[reference])
    assert report.platform == "gcp"
    assert report.boot_chain_attested
    assert report.platform_note.startswith(
        f"boot chain matches Google Cloud reference values {REFERENCE_ID} (image {IMAGE})"
    )
    assert "NOT checked: PCR 0 (firmware code and S-CRTM version of Google's" in (
        report.platform_note
    )
    key_check = next(check for check in report.checks if check.name == "ak-public-key")
    assert "Google's provisioning" in key_check.detail


def test_gcp_certificate_without_reference_values_is_refused(good: MadeCertificate) -> None:
    with pytest.raises(PlatformError, match="no reference-value set was given"):
        good.verify()


def test_gcp_certificate_without_a_boot_log_is_refused(
    good: MadeCertificate, reference: GcpReferenceValueSet
) -> None:
    # Unlike Azure Trusted Launch, GCE always hands the guest its log: none is a refusal.
    logless = good.certificate.model_copy(update={"boot_event_log": None})
    with pytest.raises(PlatformError, match="gcp platform: the certificate has no boot event log"):
        MadeCertificate(logless, good.params, good.trust_root_pem).verify(
            reference_values=[reference]
        )


def test_gcp_certificate_of_another_boot_is_refused(
    rig: TpmRig, google_ca: GoogleLikeCa, reference: GcpReferenceValueSet
) -> None:
    boot_application = next(
        event.index
        for event in parse_event_log(read_log(GCE_LOG)).events
        if event.pcr == 4 and event.event_type == 0x80000003
    )
    made = _boot_and_run(rig, google_ca, with_other_digest(read_log(GCE_LOG), boot_application))
    with pytest.raises(PlatformError, match=r"event #\d+ in PCR 4 measured"):
        made.verify(reference_values=[reference])


def test_gcp_certificate_is_not_trusted_under_another_root(
    good: MadeCertificate, reference: GcpReferenceValueSet
) -> None:
    with pytest.raises(CertificateChainError, match="no trust anchor"):
        good.verify(reference_values=[reference], trusted_roots=[])


def test_azure_reference_values_do_not_judge_a_gcp_boot(
    good: MadeCertificate, reference: GcpReferenceValueSet
) -> None:
    from aicert.reference_value_sets import AzureReferenceValueSet

    azure = AzureReferenceValueSet.model_validate(
        {
            **reference.model_dump(mode="json", exclude={"platform", "image"}),
            "platform": "azure",
            "image": {"gallery_image_version_id": "/communityGalleries/g/images/i/versions/1"},
        }
    )
    with pytest.raises(PlatformError, match="are for platform 'azure', not 'gcp'"):
        good.verify(reference_values=[azure])
