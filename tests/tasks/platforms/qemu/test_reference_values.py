"""Reference values and the boot-log check, on the real event log of the session's good boot.

Each manifest variant changes one component, and the check must name exactly that one.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest

from aicert.errors import EventLogError, NonceMismatchError, PlatformError
from aicert.reference_values import (
    ReferenceValueSet,
    check_boot_log,
    load_options_digest,
    load_reference_values,
    platform_quote_nonce,
    verify_platform_quote,
)
from aicert.tasks.platforms.qemu.image import GuestImage
from aicert.tcg_eventlog import (
    LINUX_EFI_INITRD_EVENT_ID,
    LINUX_EFI_LOAD_OPTIONS_EVENT_ID,
    decode_tagged_event,
    parse_event_log,
)

from .conftest import QuotedBoot

EV_EVENT_TAG = 0x6
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003


def _log_and_pcrs(boot: QuotedBoot) -> tuple[bytes, dict[int, bytes]]:
    assert boot.evidence.boot_event_log is not None
    return boot.evidence.boot_event_log, boot.pcrs


def _event2(pcr: int, event_type: int, digest: bytes, data: bytes) -> bytes:
    """A TCG_PCR_EVENT2 record of a SHA-256-only log."""
    return (
        struct.pack("<III", pcr, event_type, 1)
        + struct.pack("<H", 0x000B)
        + digest
        + struct.pack("<I", len(data))
        + data
    )


def _replayed(raw_log: bytes, quoted: dict[int, bytes]) -> dict[int, bytes]:
    """The quoted PCRs with PCR 0-9 replaced by the replay of ``raw_log`` (an attacker who
    could forge a quote over an edited log; the reference check must still refuse it)."""
    replayed = parse_event_log(raw_log).replay()["sha256"]
    return {**quoted, **{i: replayed.get(i, bytes(32)) for i in range(10)}}


def test_good_boot_matches_the_manifest(good_boot: QuotedBoot, guest_image: GuestImage) -> None:
    raw_log, pcrs = _log_and_pcrs(good_boot)
    report = check_boot_log(parse_event_log(raw_log), pcrs, guest_image.reference)
    assert report.reference_id == guest_image.id
    assert report.initrd_sha256 == guest_image.reference.initrd_sha256
    assert report.kernel_pcr4_digest == guest_image.reference.kernel_pcr4_digest
    assert report.events > 20


def test_pcr9_carries_the_predicted_initrd_and_command_line(
    good_boot: QuotedBoot, guest_image: GuestImage
) -> None:
    raw_log, _ = _log_and_pcrs(good_boot)
    tagged = {
        decode_tagged_event(event.data).tagged_event_id: event.digests["sha256"]
        for event in parse_event_log(raw_log).events
        if event.pcr == 9
    }
    initrd = hashlib.sha256(guest_image.initrd.read_bytes()).digest()
    assert tagged[LINUX_EFI_INITRD_EVENT_ID] == initrd
    # OVMF hands the kernel the -append string plus " initrd=initrd", as UTF-16LE + NUL.
    expected = guest_image.reference.command_line + " initrd=initrd"
    assert tagged[LINUX_EFI_LOAD_OPTIONS_EVENT_ID] == load_options_digest(expected)


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("initrd_sha256", "ab" * 32, r"^initrd: measured SHA-256"),
        ("kernel_pcr4_digest", "cd" * 32, r"^kernel: measured digest"),
    ],
)
def test_manifest_with_another_component_names_it(
    good_boot: QuotedBoot, guest_image: GuestImage, field: str, value: str, named: str
) -> None:
    raw_log, pcrs = _log_and_pcrs(good_boot)
    other = guest_image.reference.model_copy(update={field: value})
    with pytest.raises(PlatformError, match=named):
        check_boot_log(parse_event_log(raw_log), pcrs, other)


def test_manifest_with_another_command_line_names_the_command_line(
    good_boot: QuotedBoot, guest_image: GuestImage
) -> None:
    raw_log, pcrs = _log_and_pcrs(good_boot)
    reference = guest_image.reference
    load_options = reference.command_line + " debug initrd=initrd"
    other = ReferenceValueSet.model_validate(
        {
            **reference.model_dump(),
            "command_line": reference.command_line + " debug",
            "load_options": load_options,
            "load_options_sha256": load_options_digest(load_options).hex(),
        }
    )
    with pytest.raises(PlatformError, match=r"^kernel command line: measured digest"):
        check_boot_log(parse_event_log(raw_log), pcrs, other)


@pytest.mark.parametrize("pcr", [0, 1, 7])
def test_manifest_with_other_firmware_names_the_pcr(
    good_boot: QuotedBoot, guest_image: GuestImage, pcr: int
) -> None:
    raw_log, pcrs = _log_and_pcrs(good_boot)
    reference = guest_image.reference
    other = reference.model_copy(update={"pcrs": {**reference.pcrs, str(pcr): "ef" * 32}})
    with pytest.raises(PlatformError, match=rf"^firmware \(PCR {pcr}\)"):
        check_boot_log(parse_event_log(raw_log), pcrs, other)


def test_unobserved_manifest_is_refused(good_boot: QuotedBoot, guest_image: GuestImage) -> None:
    raw_log, pcrs = _log_and_pcrs(good_boot)
    unobserved = guest_image.reference.model_copy(update={"observed": False, "pcrs": {}})
    with pytest.raises(PlatformError, match=r"^firmware: reference values .* no observed"):
        check_boot_log(parse_event_log(raw_log), pcrs, unobserved)


def test_log_that_does_not_replay_to_the_quote_is_refused(
    good_boot: QuotedBoot, guest_image: GuestImage
) -> None:
    raw_log, pcrs = _log_and_pcrs(good_boot)
    with pytest.raises(EventLogError, match=r"replays PCR 9"):
        check_boot_log(parse_event_log(raw_log), {**pcrs, 9: bytes(32)}, guest_image.reference)


def test_extra_event_in_pcr9_is_refused(good_boot: QuotedBoot, guest_image: GuestImage) -> None:
    raw_log, pcrs = _log_and_pcrs(good_boot)
    tag = struct.pack("<II", 0x1234, 4) + b"evil"
    edited = raw_log + _event2(9, EV_EVENT_TAG, hashlib.sha256(b"evil").digest(), tag)
    with pytest.raises(PlatformError, match=r"^kernel measurements \(PCR 9\): unexpected"):
        check_boot_log(parse_event_log(edited), _replayed(edited, pcrs), guest_image.reference)


def test_second_boot_application_is_refused(good_boot: QuotedBoot, guest_image: GuestImage) -> None:
    raw_log, pcrs = _log_and_pcrs(good_boot)
    image_load = struct.pack("<QQQQ", 0, 0, 0, 0)
    edited = raw_log + _event2(
        4, EV_EFI_BOOT_SERVICES_APPLICATION, hashlib.sha256(b"shim").digest(), image_load
    )
    with pytest.raises(PlatformError, match=r"^kernel: 2 boot applications"):
        check_boot_log(parse_event_log(edited), _replayed(edited, pcrs), guest_image.reference)


def test_platform_quote_verifies_only_with_its_challenge(
    good_boot: QuotedBoot, guest_image: GuestImage
) -> None:
    evidence = good_boot.evidence
    kwargs = {
        "attest": evidence.attest,
        "signature": evidence.signature,
        "ak_public": evidence.ak_public,
        "pcrs": good_boot.pcrs,
        "boot_event_log": evidence.boot_event_log,
        "reference": guest_image.reference,
    }
    verify_platform_quote(challenge=good_boot.challenge, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(NonceMismatchError):
        verify_platform_quote(challenge=bytes(32), **kwargs)  # type: ignore[arg-type]
    with pytest.raises(PlatformError, match="no boot event log"):
        verify_platform_quote(
            challenge=good_boot.challenge,
            **{**kwargs, "boot_event_log": None},  # type: ignore[arg-type]
        )


def test_platform_quote_nonce_is_never_the_challenge() -> None:
    challenge = bytes(range(32))
    assert platform_quote_nonce(challenge) != challenge
    assert len(platform_quote_nonce(challenge)) == 32


def test_load_options_digest_is_utf16le_with_nul() -> None:
    expected = hashlib.sha256("a b".encode("utf-16-le") + b"\0\0").digest()
    assert load_options_digest("a b") == expected


def test_load_reference_values_round_trip(guest_image: GuestImage) -> None:
    loaded = load_reference_values(guest_image.manifest)
    assert loaded == guest_image.reference
    assert loaded.observed and set(loaded.pcrs) == {str(i) for i in range(10)}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", "invalid"),
        (b'{"format": "aicert-reference-values/v2"}', "invalid"),
        (b"x" * (1024 * 1024 + 1), "over"),
    ],
)
def test_load_reference_values_refuses_bad_files(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "reference-values.json"
    path.write_bytes(content)
    with pytest.raises(PlatformError, match=message):
        load_reference_values(path)


def test_reference_values_refuse_unknown_fields(guest_image: GuestImage, tmp_path: Path) -> None:
    data = json.loads(guest_image.manifest.read_text())
    data["allow_any_kernel"] = True
    path = tmp_path / "reference-values.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PlatformError, match="allow_any_kernel"):
        load_reference_values(path)
    with pytest.raises(PlatformError, match="cannot read"):
        load_reference_values(tmp_path / "missing.json")
    data.pop("allow_any_kernel")
    assert ReferenceValueSet.model_validate(data) == guest_image.reference
    # The command line digest must be the one of the command line it stands next to.
    data["load_options"] += " debug"
    path.write_text(json.dumps(data))
    with pytest.raises(PlatformError, match="load_options_sha256 is not the digest"):
        load_reference_values(path)
