"""Azure boots without an event log (Trusted Launch gives the guest zero bytes), judged by PCRs.

Every certificate here is real: a swtpm extended with a real shim boot (PCR 0-9, and shim's
MOK lists in PCR 14) and then a run's events, quoted over PCR 0-15. The certificate then
carries an empty boot log, as the agent reads it on Trusted Launch; the reference values pin
the PCRs of that boot (``pcr_boots``, as ``record-azure`` records them from the reference
boot). Each new check is shown by changing exactly that thing and seeing exactly its error.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aicert.appevents import INPUTS_PCR, application_pcr_start
from aicert.errors import BootPcrValueError, Pcr14StartError, PlatformError
from aicert.reference_values import (
    AzureReferenceValueSet,
    derive_azure_reference_values,
    load_reference_values,
    main,
    record_azure_pcr_boot,
)
from tests.verification.reference_values.eventlogs import (
    IMAGE_VERSION_ID,
    MAIN_LOG,
    REFERENCE_ID,
    read_log,
    replayed_pcrs,
)
from tests.verification.verify.factory import (
    CertificateFactory,
    MadeCertificate,
    TpmRig,
    sha256_hex,
    tampered,
)
from tests.verification.verify.test_boot_log_forgery import channel_key_event

pytestmark = [pytest.mark.swtpm]

FAMILY = "Standard_DSv5"
PCR_NOTE = "boot chain checked by PCR values, not by a replayed log"


def reference_boot_pcrs() -> dict[int, bytes]:
    """PCR 0-9 and 14 of the reference boot before the agent's first event."""
    raw = read_log(MAIN_LOG)
    return {**replayed_pcrs(raw), INPUTS_PCR: application_pcr_start(raw)[INPUTS_PCR]}


@pytest.fixture(scope="module")
def factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CertificateFactory]:
    workdir = tmp_path_factory.mktemp("logless")
    rig = TpmRig.create(workdir / "tpm", workdir / "ek-ca", workdir / "platform-ca")
    try:
        yield CertificateFactory(rig)
    finally:
        rig.close()


def without_log(made: MadeCertificate) -> MadeCertificate:
    """The certificate as a Trusted Launch VM's agent makes it: the boot log is zero bytes."""

    def mutate(document: dict[str, Any]) -> None:
        document["boot_event_log"] = ""

    return tampered(made, mutate)


def azure_certificate(
    factory: CertificateFactory, extend_before: dict[int, bytes] | None = None
) -> MadeCertificate:
    return factory.make_certificate(
        platform="azure",
        events=lambda log: [channel_key_event(), *log],
        boot_event_log=read_log(MAIN_LOG),
        extend_before=extend_before,
        reference_values=REFERENCE_ID,
    )


@pytest.fixture(scope="module")
def logged(factory: CertificateFactory) -> MadeCertificate:
    return azure_certificate(factory)


@pytest.fixture(scope="module")
def logless(logged: MadeCertificate) -> MadeCertificate:
    return without_log(logged)


@pytest.fixture(scope="module")
def reference() -> AzureReferenceValueSet:
    """The image's set derived from its logged boot, with the PCRs of a boot on FAMILY."""
    raw = read_log(MAIN_LOG)
    derived = derive_azure_reference_values(
        raw, replayed_pcrs(raw), image_version_id=IMAGE_VERSION_ID, reference_id=REFERENCE_ID
    )
    return record_azure_pcr_boot(reference_boot_pcrs(), vm_family=FAMILY, reference=derived)


def edited(reference: AzureReferenceValueSet, **boot: Any) -> AzureReferenceValueSet:
    """``reference`` with its one recorded boot's fields replaced (PCRs the set checks are
    accepted in ``pcrs`` too, so only the recorded boot decides)."""
    document = reference.model_dump(mode="json")
    document["pcr_boots"][0].update(boot)
    for index, value in boot.get("pcrs", {}).items():
        if index in document["pcrs"] and value not in document["pcrs"][index]:
            document["pcrs"][index].append(value)
    return AzureReferenceValueSet.model_validate(document)


# -- the honest certificates -----------------------------------------------------------------


def test_logless_certificate_verifies_by_pcr_values(
    logless: MadeCertificate, reference: AzureReferenceValueSet
) -> None:
    assert logless.certificate.boot_event_log == b""
    report = logless.verify(reference_values=[reference])
    assert report.boot_chain_attested
    assert report.platform_note.startswith(PCR_NOTE)
    assert f"VM family {FAMILY}" in report.platform_note
    assert "PCR 4, 7, 8, 9 equal" in report.platform_note
    assert "NOT checked: PCR 0 (" in report.platform_note
    assert len(report.outputs) == 2


def test_a_certificate_with_its_log_is_still_replayed(
    logged: MadeCertificate, reference: AzureReferenceValueSet
) -> None:
    report = logged.verify(reference_values=[reference])
    assert report.platform_note.startswith("boot chain matches Azure reference values")
    assert PCR_NOTE not in report.platform_note


# -- each new check, tampered -------------------------------------------------------------------


def test_a_pcr_that_differs_is_named_with_both_values(
    logless: MadeCertificate, reference: AzureReferenceValueSet
) -> None:
    other = "ab" * 32
    quoted = logless.certificate.attestation.quote.pcr_values()[4]
    with pytest.raises(BootPcrValueError) as caught:
        logless.verify(reference_values=[edited(reference, pcrs={**_pins(reference), "4": other})])
    assert caught.value.mismatches == ((4, quoted, bytes.fromhex(other)),)
    assert caught.value.vm_family == FAMILY
    assert f"PCR 4 (boot applications (PCR 4)): quoted {quoted.hex()}, reference {other}" in str(
        caught.value
    )


def test_every_pcr_that_differs_is_named(
    logless: MadeCertificate, reference: AzureReferenceValueSet
) -> None:
    changed = {**_pins(reference), "7": "01" * 32, "9": "02" * 32}
    with pytest.raises(BootPcrValueError, match=r"2 PCR\(s\) differ") as caught:
        logless.verify(reference_values=[edited(reference, pcrs=changed)])
    assert [index for index, _, _ in caught.value.mismatches] == [7, 9]


def test_a_pinned_firmware_pcr_is_checked_too(
    logless: MadeCertificate, reference: AzureReferenceValueSet
) -> None:
    with pytest.raises(BootPcrValueError, match=r"PCR 0 \(firmware \(PCR 0\)\)"):
        logless.verify(
            reference_values=[edited(reference, pcrs={**_pins(reference), "0": "03" * 32})]
        )


def test_pcr14_start_differing_from_the_reference_is_refused(
    factory: CertificateFactory, reference: AzureReferenceValueSet
) -> None:
    """The machine's PCR 14 held one more event before the agent's first (an application
    event the log does not show): the boot PCRs match, the start does not."""
    hidden = bytes.fromhex(sha256_hex(b"an application event hidden before the agent"))
    made = without_log(azure_certificate(factory, extend_before={INPUTS_PCR: hidden}))
    with pytest.raises(Pcr14StartError, match="did not start at the reference value"):
        made.verify(reference_values=[reference])


def test_pcr14_start_of_the_reference_is_exact(
    logless: MadeCertificate, reference: AzureReferenceValueSet
) -> None:
    with pytest.raises(Pcr14StartError, match="reference boot's PCR 14 start 0404"):
        logless.verify(reference_values=[edited(reference, pcr14_start="04" * 32)])


def test_a_first_event_moved_out_of_the_log_is_refused(
    logless: MadeCertificate, reference: AzureReferenceValueSet
) -> None:
    """The log-less form of the boot-log forgery: the channel-key event dropped from the
    application log would make the machine look as if the agent had measured no key."""

    def mutate(document: dict[str, Any]) -> None:
        document["event_log"] = document["event_log"][1:]

    with pytest.raises(Pcr14StartError):
        tampered(logless, mutate).verify(reference_values=[reference])


def test_a_set_without_recorded_boots_cannot_judge_a_logless_boot(
    logless: MadeCertificate, reference: AzureReferenceValueSet
) -> None:
    bare = reference.model_copy(update={"pcr_boots": []})
    with pytest.raises(PlatformError, match="record no PCR values for such boots") as caught:
        logless.verify(reference_values=[bare])
    assert type(caught.value) is PlatformError


def _pins(reference: AzureReferenceValueSet) -> dict[str, str]:
    return dict(reference.pcr_boots[0].pcrs)


# -- recording --------------------------------------------------------------------------------


def test_record_makes_a_set_from_pcrs_alone() -> None:
    pcrs = reference_boot_pcrs()
    made = record_azure_pcr_boot(
        pcrs, vm_family=FAMILY, image_version_id=IMAGE_VERSION_ID, pin_firmware_pcrs=[0]
    )
    assert made.checked_pcrs() == (0, 4, 7, 8, 9)
    assert made.events == []
    (boot,) = made.pcr_boots
    assert boot.pcr14_start == pcrs[INPUTS_PCR].hex()
    assert boot.pcr_values() == {index: pcrs[index] for index in (0, 4, 7, 8, 9)}


def test_record_refuses_a_boot_of_another_image(reference: AzureReferenceValueSet) -> None:
    other = {**reference_boot_pcrs(), 8: bytes(32)}
    with pytest.raises(PlatformError, match=r"PCR 8 0{64} is not a value pcrs accept"):
        record_azure_pcr_boot(other, vm_family=FAMILY, reference=reference)


def test_record_needs_pcr14() -> None:
    pcrs = reference_boot_pcrs()
    del pcrs[INPUTS_PCR]
    with pytest.raises(ValueError, match=r"PCR \[14\] missing"):
        record_azure_pcr_boot(pcrs, vm_family=FAMILY, image_version_id=IMAGE_VERSION_ID)


def test_record_azure_and_check_commands(tmp_path: Path, reference: AzureReferenceValueSet) -> None:
    pcrs_file = tmp_path / "pcrs.json"
    pcrs_file.write_text(json.dumps({str(i): v.hex() for i, v in reference_boot_pcrs().items()}))
    existing = tmp_path / "set.json"
    existing.write_text(reference.model_copy(update={"pcr_boots": []}).model_dump_json())
    output = tmp_path / "recorded.json"
    argv = ["record-azure", "--pcrs", str(pcrs_file), "--vm-family", "Standard_DCasv5"]
    assert main([*argv, "--reference-values", str(existing), "-o", str(output)]) == 0
    recorded = load_reference_values(output, platform="azure")
    assert [boot.vm_family for boot in recorded.pcr_boots] == ["Standard_DCasv5"]
    empty_log = tmp_path / "binary_bios_measurements"
    empty_log.write_bytes(b"")
    check = ["check", "--event-log", str(empty_log), "--pcrs", str(pcrs_file)]
    assert main([*check, "--reference-values", str(output)]) == 0
    assert main([*check, "--reference-values", str(existing)]) == 1  # no recorded boot
