"""An ``azure`` certificate through ``verify_certificate``, with a real TPM quote.

A swtpm plays the VM's vTPM: it is extended with every event of a real boot event log (PCR
0-9, as the firmware, shim and GRUB would) and then with the application events of a run, and
quotes PCR 0-15; the certificate carries that log. The AK is certified by the project's
platform CA, passed as a trusted root (Microsoft's vTPM root is not ours to sign with). The
reference-value set is derived from the same log, as the image publisher would.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from aicert.appevents import event_digest
from aicert.errors import PlatformError
from aicert.flows.assemble import assemble_certificate
from aicert.guest_runtime.api_models import Evidence
from aicert.reference_values import (
    AzureReferenceValueSet,
    load_reference_values,
    main,
)
from aicert.tasks.platforms.base import EnrolledKey
from aicert.tcg_eventlog import parse_event_log
from tests.verification.verify.factory import MadeCertificate, RunParams, TpmRig

from .eventlogs import (
    EV_EFI_BOOT_SERVICES_APPLICATION,
    IMAGE_VERSION_ID,
    REFERENCE_ID,
    minimal_qemu_set,
    read_log,
    replayed_pcrs,
    with_other_digest,
)

pytestmark = [pytest.mark.swtpm]
EV_NO_ACTION = 0x3
QUOTED_PCRS = tuple(range(16))


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TpmRig]:
    workdir = tmp_path_factory.mktemp("azure-vtpm")
    rig = TpmRig.create(workdir / "tpm", workdir / "ek-ca", workdir / "platform-ca")
    try:
        yield rig
    finally:
        rig.close()


def _boot_and_run(rig: TpmRig, boot_log: bytes, reference_id: str) -> MadeCertificate:
    """Power-cycle, measure ``boot_log`` (PCR 0-9 and shim's PCR 14), measure a run, quote,
    assemble."""
    params = RunParams.new(platform="azure")
    tpm = rig.power_cycle()
    for event in parse_event_log(boot_log).events:
        # All of the boot's events, PCR 14 included: shim measures its MOK lists there, so
        # the run's events extend what the boot left (application_pcr_start).
        if event.event_type != EV_NO_ACTION:
            tpm.pcr_extend(event.pcr, event.digests["sha256"])
    events = params.events()
    for app_event in events:
        tpm.pcr_extend(app_event.pcr, event_digest(app_event))
    quote = tpm.quote(rig.ak, QUOTED_PCRS, params.nonce)
    evidence = Evidence(
        attest=quote.attest,
        signature=quote.signature,
        pcrs={str(index): value.hex() for index, value in sorted(quote.pcrs.items())},
        nonce=params.nonce,
        ak_public=rig.ak.public_bytes,
        event_log=events,
        boot_event_log=boot_log,
        started_at=params.started_at.isoformat(),
        finished_at=params.finished_at.isoformat(),
        exit_code=params.exit_code,
        duration_ms=params.duration_ms,
    )
    certificate = assemble_certificate(
        evidence=evidence,
        enrolled=EnrolledKey(
            ak_certificate_chain=rig.chain,
            ek_certificate_pem=rig.ek_certificate_pem,
            trusted_root_pem=rig.ca.certificate_pem,
        ),
        project=params.project,
        provider="azure",
        reference_values=reference_id,
    )
    return MadeCertificate(certificate, params, rig.ca.certificate_pem)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> AzureReferenceValueSet:
    folder = tmp_path_factory.mktemp("publisher")
    (folder / "binary_bios_measurements").write_bytes(read_log())
    pcrs = replayed_pcrs(read_log())
    (folder / "pcrs.json").write_text(
        "{" + ", ".join(f'"{i}": "{v.hex()}"' for i, v in pcrs.items()) + "}"
    )
    argv = ["derive-azure", "--event-log", str(folder / "binary_bios_measurements")]
    argv += ["--pcrs", str(folder / "pcrs.json"), "--image-version", IMAGE_VERSION_ID]
    assert main([*argv, "--id", REFERENCE_ID, "-o", str(folder / "rv.json")]) == 0
    return load_reference_values(folder / "rv.json", platform="azure")


@pytest.fixture(scope="module")
def good(rig: TpmRig) -> MadeCertificate:
    return _boot_and_run(rig, read_log(), REFERENCE_ID)


def test_azure_certificate_verifies_against_its_reference_values(
    good: MadeCertificate, reference: AzureReferenceValueSet
) -> None:
    report = good.verify(reference_values=[reference])
    assert report.platform == "azure"
    assert report.boot_chain_attested
    assert report.platform_note.startswith(
        f"boot chain matches Azure reference values {REFERENCE_ID}"
    )
    assert "NOT checked: PCR 0 (firmware code" in report.platform_note
    platform_check = next(check for check in report.checks if check.name == "platform")
    assert platform_check.detail == report.platform_note


def test_reference_values_for_another_image_are_refused(
    good: MadeCertificate, reference: AzureReferenceValueSet
) -> None:
    other = reference.model_copy(update={"id": "aicert-guest-tl-2.0.0"})
    with pytest.raises(
        PlatformError,
        match=rf"names reference values '{REFERENCE_ID}', and none of the given sets "
        r"\(aicert-guest-tl-2.0.0\)",
    ):
        good.verify(reference_values=other)


def test_reference_values_for_another_platform_are_refused(
    good: MadeCertificate, guest_qemu_set: object
) -> None:
    with pytest.raises(PlatformError, match=r"are for platform 'qemu', not 'azure'"):
        good.verify(reference_values=[guest_qemu_set])


def test_azure_certificate_without_reference_values_is_refused(good: MadeCertificate) -> None:
    with pytest.raises(PlatformError, match=r"no reference-value set was given"):
        good.verify()


def test_azure_certificate_of_another_kernel_names_the_kernel(
    rig: TpmRig, reference: AzureReferenceValueSet
) -> None:
    kernel = [
        e
        for e in parse_event_log(read_log()).events
        if e.pcr == 4 and e.event_type == EV_EFI_BOOT_SERVICES_APPLICATION
    ][-1]
    made = _boot_and_run(rig, with_other_digest(read_log(), kernel.index), REFERENCE_ID)
    with pytest.raises(PlatformError, match=r"^kernel: event #\d+ in PCR 4 measured"):
        made.verify(reference_values=[reference])


@pytest.fixture
def guest_qemu_set() -> object:
    """A qemu set that happens to carry the Azure set's id."""
    return minimal_qemu_set(REFERENCE_ID)


MOKLIST_EVENT = 30  # EV_IPL "MokList" in PCR 14 of the main log: shim measures it at boot


def test_shim_measurements_in_pcr14_are_the_runs_starting_point(
    good: MadeCertificate, reference: AzureReferenceValueSet
) -> None:
    boot = parse_event_log(good.certificate.boot_event_log or b"")
    assert [event.data for event in boot.events if event.pcr == 14][:1] == [b"MokList\x00"]
    # The run's events extend what shim left in PCR 14: the replay starts there.
    report = good.verify(reference_values=[reference])
    assert report.pcrs[14] != bytes(32).hex()


def test_boot_pcr14_event_edited_breaks_the_application_replay(
    good: MadeCertificate, reference: AzureReferenceValueSet
) -> None:
    from aicert.errors import EventLogError

    tampered = good.certificate.model_copy(
        update={
            "boot_event_log": with_other_digest(
                good.certificate.boot_event_log or b"", MOKLIST_EVENT
            )
        }
    )
    with pytest.raises(EventLogError, match="application event log replays PCR 14"):
        MadeCertificate(tampered, good.params, good.trust_root_pem).verify(
            reference_values=[reference]
        )
