"""Azure reference values: derived from real boot event logs, then each component changed in a
log that still replays to its (recomputed) PCRs must be refused with that component's name.

See ``eventlogs.py`` for the logs: none is from Azure; the main one has Azure Trusted Launch's
boot path (Secure Boot, shim, GRUB, Linux).
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import pytest

from aicert.errors import EventLogError, PlatformError
from aicert.reference_values import (
    AZURE_IMAGE_PCRS,
    DEFAULT_AZURE_UNCHECKED_REASONS,
    AzureBootChainReport,
    AzureReferenceValueSet,
    check_boot_log,
    classify_boot_events,
    derive_azure_reference_values,
    load_reference_values,
    main,
    merge_azure_reference_values,
    parse_pcr_values,
    parse_reference_values,
)
from aicert.tcg_eventlog import decode_efi_variable, parse_event_log

from .eventlogs import (
    EV_EFI_BOOT_SERVICES_APPLICATION,
    EXPECTED,
    IMAGE_VERSION_ID,
    MAIN_LOG,
    REFERENCE_ID,
    SECURE_BOOT_LOGS,
    SECURE_BOOT_OFF_LOGS,
    expected_pcrs,
    find_event,
    ipl_text_startswith,
    read_log,
    replayed_pcrs,
    serialize,
    with_event_inserted,
    with_other_digest,
    without_event,
)

EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
EV_EFI_VARIABLE_AUTHORITY = 0x800000E0
EV_S_CRTM_VERSION = 0x00000008


def derive(raw: bytes | None = None, **kwargs: Any) -> AzureReferenceValueSet:
    raw = read_log() if raw is None else raw
    kwargs.setdefault("image_version_id", IMAGE_VERSION_ID)
    kwargs.setdefault("reference_id", REFERENCE_ID)
    return derive_azure_reference_values(raw, replayed_pcrs(raw), **kwargs)


def check(raw: bytes, reference: AzureReferenceValueSet) -> AzureBootChainReport:
    """Judge ``raw`` as a boot that quoted exactly what it replays to."""
    return check_boot_log(parse_event_log(raw), replayed_pcrs(raw), reference)


@pytest.fixture(scope="module")
def reference() -> AzureReferenceValueSet:
    return derive_azure_reference_values(
        read_log(),
        expected_pcrs(),  # the values recorded with the log, not this project's replay
        image_version_id=IMAGE_VERSION_ID,
        reference_id=REFERENCE_ID,
    )


# -- deriving ---------------------------------------------------------------------------------


def test_reparsed_logs_are_byte_identical() -> None:
    """The edit helper's serializer is exact, so edited logs differ only where edited."""
    for name, entry in EXPECTED.items():
        if entry["expect"] == "pcrs":
            raw = read_log(name)
            log = parse_event_log(raw)
            assert serialize(raw, log, list(log.events)) == raw, name


def test_derived_set_checks_the_image_pcrs_and_names_the_rest(
    reference: AzureReferenceValueSet,
) -> None:
    assert reference.platform == "azure"
    assert reference.id == REFERENCE_ID
    assert reference.image.gallery_image_version_id == IMAGE_VERSION_ID
    assert reference.image.security_type == "TrustedLaunch"
    assert reference.checked_pcrs() == AZURE_IMAGE_PCRS
    assert {int(i) for i in reference.unchecked_pcrs} == {0, 1, 2, 3, 5, 6}
    assert all(reason.strip() for reason in reference.unchecked_pcrs.values())
    recorded = EXPECTED[MAIN_LOG]["pcrs"]["sha256"]
    assert reference.pcrs == {str(i): [recorded[str(i)]] for i in AZURE_IMAGE_PCRS}
    applications = [e for e in reference.events if e.kind == "boot_application"]
    assert [(e.component, e.description) for e in applications] == [
        ("boot loader (shim)", "\\EFI\\redhat\\shimx64.efi"),
        ("boot loader (GRUB)", "\\EFI\\redhat\\grubx64.efi"),
        ("kernel", ""),  # GRUB hands the kernel over from memory: no file path
    ]
    variables = [e.description for e in reference.events if e.kind == "secure_boot_variable"]
    assert variables == [f"variable {n}" for n in ("SecureBoot", "PK", "KEK", "db", "dbx")]
    authorities = [e.description for e in reference.events if e.kind == "secure_boot_authority"]
    assert authorities == ["authority db", "authority SbatLevel", "authority vendor_db"]
    (command_line,) = [e for e in reference.events if e.kind == "kernel_command_line"]
    assert command_line.pcr == 8
    assert "root=/dev/mapper/rhel_rhel--9-root" in command_line.description
    # GRUB measures the command line text after "kernel_cmdline: ": the text is the digest's.
    text = command_line.description.removeprefix("kernel_cmdline: ").encode()
    assert command_line.sha256 == [hashlib.sha256(text).hexdigest()]
    assert [(e.pcr, e.component) for e in reference.events if e.pcr == 9] == [
        (9, "kernel"),
        (9, "initrd"),
    ]
    assert reference.provenance["event_log_sha256"] == hashlib.sha256(read_log()).hexdigest()


def test_kernel_digest_in_pcr4_is_the_third_boot_application(
    reference: AzureReferenceValueSet,
) -> None:
    applications = [
        e
        for e in parse_event_log(read_log()).events
        if e.pcr == 4 and e.event_type == EV_EFI_BOOT_SERVICES_APPLICATION
    ]
    (kernel,) = [e for e in reference.events if e.component == "kernel" and e.pcr == 4]
    assert len(applications) == 3
    assert kernel.sha256 == [applications[2].digests["sha256"].hex()]


@pytest.mark.parametrize("name", SECURE_BOOT_LOGS)
def test_a_boot_matches_the_set_derived_from_it(name: str) -> None:
    raw = read_log(name)
    reference = derive_azure_reference_values(
        raw, expected_pcrs(name), image_version_id=IMAGE_VERSION_ID
    )
    report = check_boot_log(parse_event_log(raw), expected_pcrs(name), reference)
    assert report.reference_id == "aicert-guest-tl-1.0.0"  # default: <image>-<version>
    assert report.checked_pcrs == (4, 7, 8, 9)
    assert "kernel" in report.components
    assert "kernel command line" in report.components


def test_report_note_lists_every_unchecked_pcr_with_its_reason(
    reference: AzureReferenceValueSet,
) -> None:
    note = check(read_log(), reference).note
    assert note.startswith(f"boot chain matches Azure reference values {REFERENCE_ID}")
    assert IMAGE_VERSION_ID in note
    assert "PCR 4, 7, 8, 9 checked" in note
    for index in (0, 1, 2, 3, 5, 6):
        assert f"PCR {index} ({DEFAULT_AZURE_UNCHECKED_REASONS[index]})" in note
    assert "NOT checked" in note


@pytest.mark.parametrize("name", SECURE_BOOT_OFF_LOGS)
def test_a_boot_without_secure_boot_gives_no_reference_values(name: str) -> None:
    raw = read_log(name)
    with pytest.raises(PlatformError, match=r"^Secure Boot policy \(PCR 7\): Secure Boot is off"):
        derive_azure_reference_values(raw, replayed_pcrs(raw), image_version_id=IMAGE_VERSION_ID)


def test_deriving_needs_a_log_that_replays_to_the_pcrs() -> None:
    pcrs = {**expected_pcrs(), 8: bytes(32)}
    with pytest.raises(EventLogError, match=r"replays PCR 8"):
        derive_azure_reference_values(read_log(), pcrs, image_version_id=IMAGE_VERSION_ID)
    with pytest.raises(EventLogError, match=r"does not cover PCR 9"):
        derive_azure_reference_values(
            read_log(),
            {i: v for i, v in expected_pcrs().items() if i != 9},
            image_version_id=IMAGE_VERSION_ID,
        )


def test_firmware_pcrs_can_be_checked_on_request() -> None:
    reference = derive(check_firmware_pcrs=[0, 2])
    assert reference.checked_pcrs() == (0, 2, 4, 7, 8, 9)
    assert "0" not in reference.unchecked_pcrs
    with pytest.raises(ValueError, match=r"not all firmware PCRs"):
        derive(check_firmware_pcrs=[4])


# -- a consistent boot of something else: the error names the component --------------------


def _boot_application(raw: bytes, position: int) -> int:
    events = [
        e
        for e in parse_event_log(raw).events
        if e.pcr == 4 and e.event_type == EV_EFI_BOOT_SERVICES_APPLICATION
    ]
    return events[position].index


@pytest.mark.parametrize(
    ("position", "component"),
    [(0, r"boot loader \(shim\)"), (1, r"boot loader \(GRUB\)"), (2, "kernel")],
)
def test_another_boot_application_is_named(
    reference: AzureReferenceValueSet, position: int, component: str
) -> None:
    raw = with_other_digest(read_log(), _boot_application(read_log(), position))
    with pytest.raises(PlatformError, match=rf"^{component}: .*in PCR 4 measured"):
        check(raw, reference)


def test_another_kernel_file_read_by_grub_is_named_kernel(
    reference: AzureReferenceValueSet,
) -> None:
    kernel_file = find_event(read_log(), ipl_text_startswith(b"(hd0,gpt2)/vmlinuz", pcr=9))
    raw = with_other_digest(read_log(), kernel_file.index)
    with pytest.raises(PlatformError, match=r"^kernel: \(hd0,gpt2\)/vmlinuz.* in PCR 9 measured"):
        check(raw, reference)


@pytest.mark.parametrize("variable", ["SecureBoot", "PK", "KEK", "db", "dbx"])
def test_another_secure_boot_variable_is_named(
    reference: AzureReferenceValueSet, variable: str
) -> None:
    event = find_event(
        read_log(),
        lambda e: (
            e.event_type == EV_EFI_VARIABLE_DRIVER_CONFIG
            and decode_efi_variable(e.data).unicode_name == variable
        ),
    )
    raw = with_other_digest(read_log(), event.index)
    with pytest.raises(
        PlatformError, match=rf"^Secure Boot policy \(PCR 7\): variable {variable}: event"
    ):
        check(raw, reference)


def test_another_secure_boot_authority_is_named(reference: AzureReferenceValueSet) -> None:
    event = find_event(
        read_log(), lambda e: e.pcr == 7 and e.event_type == EV_EFI_VARIABLE_AUTHORITY
    )
    raw = with_other_digest(read_log(), event.index)
    with pytest.raises(PlatformError, match=r"^Secure Boot policy \(PCR 7\): authority db"):
        check(raw, reference)


def test_another_kernel_command_line_is_named(reference: AzureReferenceValueSet) -> None:
    event = find_event(read_log(), ipl_text_startswith(b"kernel_cmdline: ", pcr=8))
    raw = with_other_digest(read_log(), event.index, b"root=/dev/sda1 init=/bin/sh")
    with pytest.raises(PlatformError, match=r"^kernel command line: kernel_cmdline: .* PCR 8"):
        check(raw, reference)


def test_a_missing_kernel_command_line_event_is_named(reference: AzureReferenceValueSet) -> None:
    event = find_event(read_log(), ipl_text_startswith(b"kernel_cmdline: ", pcr=8))
    with pytest.raises(
        PlatformError, match=r"^kernel command line: the log has 0 kernel command line events"
    ):
        check(without_event(read_log(), event.index), reference)


def test_another_initrd_is_named(reference: AzureReferenceValueSet) -> None:
    event = find_event(read_log(), ipl_text_startswith(b"(hd0,gpt2)/initramfs", pcr=9))
    with pytest.raises(PlatformError, match=r"^initrd: \(hd0,gpt2\)/initramfs"):
        check(with_other_digest(read_log(), event.index), reference)


def test_another_grub_command_names_the_boot_loader_pcr(
    reference: AzureReferenceValueSet,
) -> None:
    event = find_event(read_log(), ipl_text_startswith(b"grub_cmd: set timeout=5", pcr=8))
    raw = with_other_digest(read_log(), event.index, b"set timeout=0")
    with pytest.raises(PlatformError, match=r"^boot loader \(PCR 8: GRUB commands"):
        check(raw, reference)


def test_an_extra_boot_application_is_refused(reference: AzureReferenceValueSet) -> None:
    image_load = struct.pack("<QQQQ", 0, 4096, 0, 0)
    raw = with_event_inserted(
        read_log(),
        _boot_application(read_log(), 2),
        4,
        EV_EFI_BOOT_SERVICES_APPLICATION,
        image_load,
        b"a second-stage loader",
    )
    with pytest.raises(
        PlatformError,
        match=r"^boot applications \(PCR 4\): the log has 4 boot applications .* list 3 "
        r"\(boot loader \(shim\), boot loader \(GRUB\), kernel\)",
    ):
        check(raw, reference)


def test_a_firmware_change_is_outside_the_unchecked_pcrs(
    reference: AzureReferenceValueSet,
) -> None:
    """Azure updated the host firmware: PCR 0 changes. A set that leaves PCR 0 unchecked
    accepts the boot and says so; a set that checks PCR 0 names it."""
    crtm = find_event(read_log(), lambda e: e.event_type == EV_S_CRTM_VERSION)
    raw = with_other_digest(read_log(), crtm.index, b"Hyper-V UEFI Release v4.2")
    assert replayed_pcrs(raw)[0] != expected_pcrs()[0]
    assert "PCR 0 (firmware code" in check(raw, reference).note
    with pytest.raises(PlatformError, match=r"^firmware \(PCR 0\): quoted PCR 0 [0-9a-f]{64} is"):
        check(raw, derive(check_firmware_pcrs=[0]))


# -- PCR values outside the accepted sets ---------------------------------------------------


@pytest.mark.parametrize(
    ("pcr", "component"),
    [
        (4, r"boot applications \(PCR 4\)"),
        (7, r"Secure Boot policy \(PCR 7\)"),
        (8, r"boot loader \(PCR 8: GRUB commands and kernel command line\)"),
        (9, r"boot loader \(PCR 9: files GRUB read, kernel EFI stub\)"),
        (2, r"firmware \(PCR 2\)"),
    ],
)
def test_a_pcr_value_outside_the_accepted_set_names_the_pcr(pcr: int, component: str) -> None:
    reference = derive(check_firmware_pcrs=[2])
    other = reference.model_copy(update={"pcrs": {**reference.pcrs, str(pcr): ["ab" * 32]}})
    with pytest.raises(PlatformError, match=rf"^{component}: quoted PCR {pcr} .* not one of"):
        check(read_log(), other)


def test_any_accepted_value_passes() -> None:
    reference = derive()
    pcrs = {**reference.pcrs, "8": ["ab" * 32, *reference.pcrs["8"]]}
    check(read_log(), reference.model_copy(update={"pcrs": pcrs}))


def test_a_log_that_does_not_replay_is_refused(reference: AzureReferenceValueSet) -> None:
    with pytest.raises(EventLogError, match=r"replays PCR 4"):
        check_boot_log(parse_event_log(read_log()), {**expected_pcrs(), 4: bytes(32)}, reference)


# -- several boots: merged sets ---------------------------------------------------------------


def test_merged_sets_accept_each_observed_firmware_value() -> None:
    crtm = find_event(read_log(), lambda e: e.event_type == EV_S_CRTM_VERSION)
    updated = with_other_digest(read_log(), crtm.index, b"Hyper-V UEFI Release v4.2")
    merged = merge_azure_reference_values(
        [derive(check_firmware_pcrs=[0]), derive(updated, check_firmware_pcrs=[0])]
    )
    assert len(merged.pcrs["0"]) == 2
    assert len(merged.pcrs["4"]) == 1
    assert merged.events == derive(check_firmware_pcrs=[0]).events  # same components
    check(read_log(), merged)
    check(updated, merged)
    third = with_other_digest(read_log(), crtm.index, b"Hyper-V UEFI Release v5.0")
    with pytest.raises(PlatformError, match=r"^firmware \(PCR 0\)"):
        check(third, merged)
    assert len(merged.provenance["merged_from"]) == 2


def test_sets_of_different_boot_chains_are_not_merged() -> None:
    kernel_cmdline = find_event(read_log(), ipl_text_startswith(b"kernel_cmdline: ", pcr=8))
    with pytest.raises(PlatformError, match=r"cannot merge sets with different components"):
        merge_azure_reference_values(
            [derive(), derive(without_event(read_log(), kernel_cmdline.index))]
        )
    with pytest.raises(PlatformError, match=r"cannot merge sets with different id"):
        merge_azure_reference_values([derive(), derive(reference_id="other-image-2.0.0")])
    with pytest.raises(PlatformError, match=r"cannot merge sets with different checked PCRs"):
        merge_azure_reference_values([derive(), derive(check_firmware_pcrs=[0])])


# -- the format ------------------------------------------------------------------------------


def test_json_round_trip_and_platform_choice(
    reference: AzureReferenceValueSet, tmp_path: Path
) -> None:
    path = tmp_path / "reference-values.json"
    path.write_text(json.dumps(reference.model_dump(mode="json")))
    loaded = load_reference_values(path)
    assert isinstance(loaded, AzureReferenceValueSet)
    assert loaded == reference
    assert load_reference_values(path, platform="azure") == reference
    with pytest.raises(PlatformError, match=r"is for platform 'azure', not 'qemu'"):
        load_reference_values(path, platform="qemu")


def _document(reference: AzureReferenceValueSet) -> dict[str, Any]:
    result: dict[str, Any] = reference.model_dump(mode="json")
    return result


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["unchecked_pcrs"].pop("3"), r"PCR \[3\] neither checked"),
        (lambda d: d["unchecked_pcrs"].update({"4": "trust me"}), r"both checked"),
        (
            lambda d: d["unchecked_pcrs"].update({"7": "dbx changes"}) or d["pcrs"].pop("7"),
            r"PCR 7 \(Secure Boot policy \(PCR 7\)\) must be checked",
        ),
        (lambda d: d["unchecked_pcrs"].update({"0": "   "}), r"reason is empty"),
        (lambda d: d["pcrs"].update({"9": []}), r"at least 1 item"),
        (lambda d: d["pcrs"].update({"9": ["ab" * 32, "ab" * 32]}), r"listed twice"),
        (lambda d: d["events"][0].update({"pcr": 4}), r"not measured in PCR 4"),
        (lambda d: d.update({"allow_any_kernel": True}), r"allow_any_kernel"),
        (lambda d: d["image"].update({"gallery_image_version_id": "ubuntu"}), r"pattern"),
        (lambda d: d.update({"platform": "aws"}), r"does not match any of the expected tags"),
    ],
)
def test_malformed_sets_are_refused(
    reference: AzureReferenceValueSet, edit: Any, message: str
) -> None:
    document = _document(reference)
    edit(document)
    with pytest.raises(PlatformError, match=message):
        parse_reference_values(json.dumps(document))


def test_community_and_shared_gallery_ids_are_image_references() -> None:
    for image in (
        "/CommunityGalleries/aicert-1a2b/Images/aicert-guest-tl/Versions/1.0.0",
        "/SharedGalleries/00000000-0000-0000-0000-000000000000-AICERT/Images/tl/Versions/2.0.1",
    ):
        assert derive(image_version_id=image).image.gallery_image_version_id == image


def test_classification_ignores_other_pcrs_and_no_action_events() -> None:
    kinds = {(e.pcr, e.kind) for e in classify_boot_events(parse_event_log(read_log()))}
    assert kinds == {
        (4, "boot_application"),
        (7, "secure_boot_variable"),
        (7, "secure_boot_authority"),
        (8, "kernel_command_line"),
        (9, "kernel_file"),
        (9, "initrd"),
    }


def test_efi_stub_measurements_are_components() -> None:
    """gdc-host.bin (Ubuntu, GRUB 2.12, Linux 6.9) has the kernel EFI stub's PCR 9 events."""
    events = classify_boot_events(parse_event_log(read_log("gdc-host.bin")))
    described = [(e.pcr, e.kind, e.description) for e in events if e.pcr == 9]
    assert (9, "kernel_command_line", "LOADED_IMAGE::LoadOptions (kernel EFI stub)") in described
    assert (9, "initrd", "Linux initrd (kernel EFI stub)") in described
    assert (9, "kernel_file", "/vmlinuz-6.9.0-rc7+") in described


# -- PCR value files and the command line ----------------------------------------------------


def test_pcr_values_from_json_and_tpm2_pcrread_text() -> None:
    pcrs = expected_pcrs()
    as_json = json.dumps({str(i): v.hex() for i, v in pcrs.items()})
    assert parse_pcr_values(as_json) == pcrs
    assert parse_pcr_values(json.dumps({"sha256": json.loads(as_json)})) == pcrs
    with pytest.raises(ValueError, match=r"PCR 3: 31 bytes"):
        parse_pcr_values(json.dumps({"3": "ab" * 31}))
    with pytest.raises(ValueError, match=r"none found"):
        parse_pcr_values("sha1:\n  0 : 0x" + "00" * 20 + "\n")


def _files(tmp_path: Path, raw: bytes | None = None) -> tuple[Path, Path]:
    raw = read_log() if raw is None else raw
    log_path = tmp_path / "binary_bios_measurements"
    log_path.write_bytes(raw)
    pcrs_path = tmp_path / "pcrs.json"
    pcrs_path.write_text(json.dumps({str(i): v.hex() for i, v in replayed_pcrs(raw).items()}))
    return log_path, pcrs_path


def test_command_line_derive_merge_and_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log_path, pcrs_path = _files(tmp_path)
    derived = tmp_path / "rv.json"
    argv = ["derive-azure", "--event-log", str(log_path), "--pcrs", str(pcrs_path)]
    argv += ["--image-version", IMAGE_VERSION_ID, "--provenance", "vm_size=Standard_D4s_v5"]
    assert main([*argv, "--output", str(derived)]) == 0
    reference = load_reference_values(derived, platform="azure")
    assert reference.id == REFERENCE_ID
    assert reference.provenance["vm_size"] == "Standard_D4s_v5"
    assert reference.provenance["quote_verified"] is False
    # The README's collection step brings the log back base64-encoded.
    encoded = tmp_path / "eventlog.b64"
    encoded.write_bytes(base64.b64encode(read_log()))
    assert main([*argv[:2], str(encoded), *argv[3:]]) == 0
    assert json.loads(capsys.readouterr().out)["pcrs"] == reference.model_dump()["pcrs"]
    merged = tmp_path / "merged.json"
    assert main(["merge-azure", str(derived), str(derived), "-o", str(merged)]) == 0
    assert load_reference_values(merged, platform="azure").pcrs == reference.pcrs
    check_argv = ["check", "--event-log", str(log_path), "--pcrs", str(pcrs_path)]
    assert main([*check_argv, "--reference-values", str(merged)]) == 0
    assert "NOT checked" in capsys.readouterr().out
    kernel = _boot_application(read_log(), 2)
    (tmp_path / "tampered").mkdir()
    tampered_log, tampered_pcrs = _files(
        tmp_path / "tampered", with_other_digest(read_log(), kernel)
    )
    tampered_argv = ["check", "--event-log", str(tampered_log), "--pcrs", str(tampered_pcrs)]
    assert main([*tampered_argv, "--reference-values", str(merged)]) == 1
    assert capsys.readouterr().err.startswith("error: kernel: ")
    assert main([*argv[:4], str(tmp_path / "missing.json"), *argv[5:]]) == 2
