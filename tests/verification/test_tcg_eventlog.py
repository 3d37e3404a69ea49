"""Tests of the TCG PC Client boot event log parser and replay (aicert.tcg_eventlog).

Real logs from tests/data/eventlogs with their expected PCR values, a cross-check
against tpm2-tools' tpm2_eventlog as an independent producer, synthetic logs built here, and
truncation / mutation / hypothesis fuzzing that only ever allows EventLogError.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
import shutil
import struct
import subprocess
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aicert.tcg_eventlog as tcg
from aicert.errors import EventLogError
from aicert.tcg_eventlog import (
    EFI_GLOBAL_VARIABLE_GUID,
    EFI_IMAGE_SECURITY_DATABASE_GUID,
    LINUX_EFI_INITRD_EVENT_ID,
    LINUX_EFI_LOAD_OPTIONS_EVENT_ID,
    LegacyEventLogError,
    TcgEvent,
    TcgEventLog,
    decode_efi_variable,
    decode_image_load_event,
    decode_tagged_event,
    parse_event_log,
)
from tests.data import EVENTLOGS

EXPECTED: dict[str, dict] = json.loads((EVENTLOGS / "expected.json").read_text())
VALID_LOGS = sorted(name for name, e in EXPECTED.items() if e["expect"] == "pcrs")
ERROR_LOGS = sorted(name for name, e in EXPECTED.items() if e["expect"] == "error")

ALG_SHA1, ALG_SHA256, ALG_SHA384 = 0x0004, 0x000B, 0x000C
ALG_ID_BY_NAME = {"sha1": ALG_SHA1, "sha256": ALG_SHA256, "sha384": ALG_SHA384, "sha512": 0x000D}
EV_NO_ACTION, EV_SEPARATOR, EV_S_CRTM_VERSION = 0x3, 0x4, 0x8
EV_EFI_ACTION = 0x80000007
# Well-known: a PCR extended only with EV_SEPARATOR (data 00000000) in each bank.
SEPARATOR_ONLY_PCR = {
    "sha1": "b2a83b0ebf2f8374299a5b2bdfc31ea955ad7236",
    "sha256": "3d458cfe55cc03ea1f443f1562beec8df51c75e14a9fcf9a7234a13f198e7969",
}


def read_log(name: str) -> bytes:
    return (EVENTLOGS / name).read_bytes()


# --- builders for synthetic logs ----------------------------------------------------------------


def sha1_format_event(pcr: int, event_type: int, digest: bytes, data: bytes) -> bytes:
    return struct.pack("<II", pcr, event_type) + digest + struct.pack("<I", len(data)) + data


def spec_id_data(
    algorithms: list[tuple[int, int]],
    *,
    signature: bytes = b"Spec ID Event03\x00",
    platform_class: int = 0,
    uintn_size: int = 2,
    count: int | None = None,
    vendor_info: bytes = b"",
) -> bytes:
    fixed = struct.pack(
        "<IBBBBI",
        platform_class,
        0,
        2,
        0,
        uintn_size,
        len(algorithms) if count is None else count,
    )
    sizes = b"".join(struct.pack("<HH", alg, size) for alg, size in algorithms)
    return signature + fixed + sizes + bytes([len(vendor_info)]) + vendor_info


def header(algorithms: list[tuple[int, int]], **kwargs: object) -> bytes:
    return sha1_format_event(0, EV_NO_ACTION, bytes(20), spec_id_data(algorithms, **kwargs))


def event2(pcr: int, event_type: int, digests: list[tuple[int, bytes]], data: bytes) -> bytes:
    body = b"".join(struct.pack("<H", alg) + digest for alg, digest in digests)
    return (
        struct.pack("<III", pcr, event_type, len(digests))
        + body
        + struct.pack("<I", len(data))
        + data
    )


def measured(pcr: int, event_type: int, data: bytes, banks: tuple[str, ...]) -> bytes:
    """An event whose digests are the hashes of its data, in every bank."""
    digests = [(ALG_ID_BY_NAME[b], hashlib.new(b, data).digest()) for b in banks]
    return event2(pcr, event_type, digests, data)


SHA1_SHA256 = [(ALG_SHA1, 20), (ALG_SHA256, 32)]
BANKS = ("sha1", "sha256")


def startup_locality_event(locality: int, *, pcr: int = 0, data: bytes | None = None) -> bytes:
    payload = b"StartupLocality\x00" + bytes([locality]) if data is None else data
    return event2(pcr, EV_NO_ACTION, [(ALG_SHA1, bytes(20)), (ALG_SHA256, bytes(32))], payload)


def serialize_event(event: TcgEvent) -> bytes:
    digests = [(ALG_ID_BY_NAME[name], digest) for name, digest in event.digests.items()]
    return event2(event.pcr, event.event_type, digests, event.data)


def header_size(log: TcgEventLog) -> int:
    spec = log.spec_id
    return 32 + 28 + 4 * len(spec.algorithms) + 1 + len(spec.vendor_info)


def event_boundaries(log: TcgEventLog) -> list[int]:
    """Offsets at which each event ends (the first is the end of the Spec ID header)."""
    offsets = [header_size(log)]
    for event in log.events:
        offsets.append(offsets[-1] + len(serialize_event(event)))
    return offsets


def parse_or_event_log_error(data: bytes) -> TcgEventLog | None:
    """Parse within a time bound; only EventLogError may escape (anything else fails the test)."""
    start = time.perf_counter()
    try:
        log = parse_event_log(data)
        log.replay()
    except EventLogError:
        log = None
    assert time.perf_counter() - start < 1.0
    return log


# --- real logs: expected values -----------------------------------------------------------------


def test_expected_json_covers_every_log_file() -> None:
    on_disk = {p.name for p in EVENTLOGS.glob("*.bin")}
    assert on_disk == set(EXPECTED)
    assert len(VALID_LOGS) == 6
    assert len(ERROR_LOGS) == 2


@pytest.mark.parametrize("name", VALID_LOGS)
def test_real_log_replays_to_expected_pcrs(name: str) -> None:
    expected = EXPECTED[name]
    log = parse_event_log(read_log(name))
    replayed = {
        bank: {str(pcr): value.hex() for pcr, value in pcrs.items()}
        for bank, pcrs in log.replay().items()
    }
    # Exactly: every bank and PCR listed, with nothing more.
    assert replayed == expected["pcrs"]
    assert set(log.banks) == set(expected["pcrs"])
    assert (log.startup_locality is not None) == expected["startup_locality_affects_pcr0"]


@pytest.mark.parametrize("name", ERROR_LOGS)
def test_malformed_real_log_raises_event_log_error(name: str) -> None:
    with pytest.raises(EventLogError):
        parse_event_log(read_log(name))


def test_empty_log_message() -> None:
    with pytest.raises(EventLogError, match="empty"):
        parse_event_log(b"")


def test_bogus_log_is_not_reported_as_legacy() -> None:
    with pytest.raises(EventLogError, match="not a TCG event log") as caught:
        parse_event_log(read_log("keylime-binary_bios_measurements-bogus.bin"))
    assert type(caught.value) is EventLogError


@pytest.mark.parametrize("name", VALID_LOGS)
def test_real_log_round_trips_byte_for_byte(name: str) -> None:
    raw = read_log(name)
    log = parse_event_log(raw)
    rebuilt = raw[: header_size(log)] + b"".join(serialize_event(e) for e in log.events)
    assert rebuilt == raw
    assert [e.index for e in log.events] == list(range(1, len(log.events) + 1))
    assert all(set(e.digests) == set(log.banks) for e in log.events)


def test_spec_id_header_fields() -> None:
    keylime = parse_event_log(read_log("keylime-binary_bios_measurements.bin"))
    spec = keylime.spec_id
    assert (spec.platform_class, spec.spec_version_major, spec.spec_version_minor) == (0, 2, 0)
    assert spec.spec_errata == 0
    assert (spec.uintn_size, spec.uintn_bytes) == (2, 8)
    assert [(a.algorithm_id, a.name, a.digest_size) for a in spec.algorithms] == [
        (ALG_SHA1, "sha1", 20),
        (ALG_SHA256, "sha256", 32),
    ]
    assert spec.vendor_info == b""
    assert keylime.banks == ("sha1", "sha256")
    assert keylime.startup_locality == 3

    gdc = parse_event_log(read_log("gdc-host.bin"))
    assert gdc.spec_id.platform_class == 1  # a server
    assert gdc.banks == ("sha256",)
    rhel = parse_event_log(read_log("rhel8-uefi.bin"))
    assert rhel.banks == ("sha1", "sha256", "sha384")
    assert rhel.startup_locality is None


def test_startup_locality_sets_pcr0_start_value() -> None:
    raw = read_log("gdc-host.bin")
    log = parse_event_log(raw)
    assert log.startup_locality == 3
    locality_event = log.events[0]
    assert locality_event.event_type_name == "EV_NO_ACTION"
    assert locality_event.data == b"StartupLocality\x00\x03"
    value = bytes(31) + b"\x03"
    for event in log.events:
        if event.pcr == 0 and event.event_type != EV_NO_ACTION:
            value = hashlib.sha256(value + event.digests["sha256"]).digest()
    assert log.replay()["sha256"][0] == value


def test_events_and_type_names_of_a_real_log() -> None:
    log = parse_event_log(read_log("gdc-host.bin"))
    names = {e.event_type_name for e in log.events}
    assert {
        "EV_NO_ACTION",
        "EV_S_CRTM_CONTENTS",
        "EV_S_CRTM_VERSION",
        "EV_EFI_VARIABLE_DRIVER_CONFIG",
        "EV_EFI_BOOT_SERVICES_APPLICATION",
        "EV_EFI_BOOT_SERVICES_DRIVER",
        "EV_EVENT_TAG",
        "EV_SEPARATOR",
        "EV_IPL",
        "EV_EFI_ACTION",
        "EV_POST_CODE",
    } <= names
    first = log.events[1]
    assert (first.index, first.pcr, first.event_type) == (2, 0, 0x7)
    assert first.event_type_name == "EV_S_CRTM_CONTENTS"
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.pcr = 5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        log.events = ()  # type: ignore[misc]


def test_event_type_name_table() -> None:
    assert tcg.event_type_name(0x80000003) == "EV_EFI_BOOT_SERVICES_APPLICATION"
    assert tcg.event_type_name(0x6) == "EV_EVENT_TAG"
    assert tcg.event_type_name(0x3) == "EV_NO_ACTION"
    assert tcg.event_type_name(0x8) == "EV_S_CRTM_VERSION"
    assert tcg.event_type_name(0x80000001) == "EV_EFI_VARIABLE_DRIVER_CONFIG"
    assert tcg.event_type_name(0x4) == "EV_SEPARATOR"
    assert tcg.event_type_name(0x800000E0) == "EV_EFI_VARIABLE_AUTHORITY"
    assert tcg.event_type_name(0x80000010) == "EV_EFI_HCRTM_EVENT"
    assert tcg.event_type_name(0x12345678) == "EV_UNKNOWN_0x12345678"


# --- independent producer: tpm2-tools' tpm2_eventlog ---------------------------------------------


def run_tpm2_eventlog(path: Path) -> str:
    tool = shutil.which("tpm2_eventlog")
    assert tool is not None, "tpm2_eventlog (tpm2-tools) must be installed"
    result = subprocess.run(
        [tool, str(path)], capture_output=True, text=True, timeout=60, check=True
    )
    return result.stdout


def tpm2_eventlog_pcrs(output: str) -> dict[str, dict[int, str]]:
    """The final "pcrs:" section; BaseLoader keeps "0x..." values as strings."""
    match = re.search(r"^pcrs:\s*$", output, flags=re.MULTILINE)
    assert match is not None, "tpm2_eventlog printed no pcrs: section"
    section = yaml.load(output[match.start() :], Loader=yaml.BaseLoader)["pcrs"]
    return {
        bank: {int(pcr): value.lower().removeprefix("0x") for pcr, value in values.items()}
        for bank, values in section.items()
    }


# The -bogus file segfaults tpm2-tools 5.4: only the valid logs are fed to it.
@pytest.mark.parametrize("name", VALID_LOGS)
def test_replay_matches_tpm2_eventlog(name: str) -> None:
    output = run_tpm2_eventlog(EVENTLOGS / name)
    theirs = tpm2_eventlog_pcrs(output)["sha256"]
    ours = parse_event_log(read_log(name)).replay()["sha256"]
    # PCR 0 is left out: tpm2-tools 5.4 ignores StartupLocality.
    theirs_1_23 = {pcr: value for pcr, value in theirs.items() if 1 <= pcr <= 23}
    ours_1_23 = {pcr: value.hex() for pcr, value in ours.items() if 1 <= pcr <= 23}
    assert ours_1_23 == theirs_1_23
    assert len(ours_1_23) >= 9


@pytest.mark.parametrize("name", ["gdc-host.bin", "rhel8-uefi.bin"])
def test_event_sequence_matches_tpm2_eventlog(name: str) -> None:
    output = run_tpm2_eventlog(EVENTLOGS / name)
    their_types = re.findall(r"^  EventType: (\S+)$", output, flags=re.MULTILINE)
    their_pcrs = [int(p) for p in re.findall(r"^  PCRIndex: (\d+)$", output, flags=re.MULTILINE)]
    log = parse_event_log(read_log(name))
    # tpm2_eventlog lists the Spec ID header as event 0.
    assert their_types == ["EV_NO_ACTION"] + [e.event_type_name for e in log.events]
    assert their_pcrs == [0] + [e.pcr for e in log.events]


# --- decoders on real events ---------------------------------------------------------------------


def test_decode_secure_boot_variables() -> None:
    log = parse_event_log(read_log("keylime-binary_bios_measurements-secureboot.bin"))
    config = [e for e in log.events if e.event_type_name == "EV_EFI_VARIABLE_DRIVER_CONFIG"]
    variables = [decode_efi_variable(e.data) for e in config]
    assert [v.unicode_name for v in variables] == ["SecureBoot", "PK", "KEK", "db", "dbx"]
    assert [v.variable_name for v in variables] == [EFI_GLOBAL_VARIABLE_GUID] * 3 + [
        EFI_IMAGE_SECURITY_DATABASE_GUID
    ] * 2
    assert variables[0].variable_data == b"\x01"  # Secure Boot enabled
    assert all(v.trailing_data == b"" for v in variables)
    assert all(len(v.variable_data) > 500 for v in variables[1:])
    for event in config:
        assert event.pcr == 7
        # PCR 7 variable events measure the whole UEFI_VARIABLE_DATA.
        assert event.digests["sha256"] == hashlib.sha256(event.data).digest()


def test_decode_variable_authority_with_trailing_junk() -> None:
    # cos-85's boot loader logged 6 junk bytes after the certificate: decoded, and exposed.
    log = parse_event_log(read_log("cos-85-amd-sev.bin"))
    authority = [e for e in log.events if e.event_type_name == "EV_EFI_VARIABLE_AUTHORITY"]
    decoded = [decode_efi_variable(e.data) for e in authority]
    assert {v.unicode_name for v in decoded} == {"db"}
    assert decoded[0].trailing_data == b""
    assert decoded[1].trailing_data == b"\x00\x00\x00\x00\x00\xaf"
    assert decoded[1].variable_data[:2] == b"\x30\x82"  # a DER certificate


def test_decode_linux_tagged_events() -> None:
    log = parse_event_log(read_log("gdc-host.bin"))
    tagged = [
        decode_tagged_event(e.data) for e in log.events if e.event_type_name == "EV_EVENT_TAG"
    ]
    assert [(t.tagged_event_id, t.tagged_event_data) for t in tagged] == [
        (LINUX_EFI_LOAD_OPTIONS_EVENT_ID, b"LOADED_IMAGE::LoadOptions\x00"),
        (LINUX_EFI_INITRD_EVENT_ID, b"Linux initrd\x00"),
    ]
    assert all(e.pcr == 9 for e in log.events if e.event_type_name == "EV_EVENT_TAG")


def test_decode_image_load_events() -> None:
    log = parse_event_log(read_log("rhel8-uefi.bin"))
    apps = [e for e in log.events if e.event_type_name == "EV_EFI_BOOT_SERVICES_APPLICATION"]
    images = [decode_image_load_event(e.data, log.spec_id.uintn_bytes) for e in apps]
    assert all(image.image_length_in_memory > 0 for image in images)
    # The second is grubx64.efi on the ESP: a file-path device path node naming it, then
    # 8 bytes that the firmware logged after the declared device path.
    grub = images[1]
    assert "grubx64.efi" in grub.device_path.decode("utf-16-le", errors="replace")
    assert len(grub.device_path) == 56
    assert grub.trailing_data == bytes(8)
    assert images[0].trailing_data == b""


# --- decoders on malformed input -----------------------------------------------------------------


def efi_variable(name: str, value: bytes, *, name_length: int | None = None) -> bytes:
    encoded = name.encode("utf-16-le")
    length = len(encoded) // 2 if name_length is None else name_length
    return (
        EFI_GLOBAL_VARIABLE_GUID.bytes_le + struct.pack("<QQ", length, len(value)) + encoded + value
    )


def test_decode_efi_variable_synthetic() -> None:
    decoded = decode_efi_variable(efi_variable("SecureBoot", b"\x01"))
    assert decoded.variable_name == uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")
    assert (decoded.unicode_name, decoded.variable_data) == ("SecureBoot", b"\x01")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        bytes(31),
        efi_variable("PK", b"x")[:-1],  # VariableData truncated
        efi_variable("PK", b"", name_length=2**63),  # absurd length
        efi_variable("PK", b"", name_length=2**64 - 1),
        EFI_GLOBAL_VARIABLE_GUID.bytes_le + struct.pack("<QQ", 0, 2**64 - 1),
        EFI_GLOBAL_VARIABLE_GUID.bytes_le + struct.pack("<QQ", 1, 0) + b"\x00\xd8",  # surrogate
    ],
)
def test_decode_efi_variable_rejects_malformed(data: bytes) -> None:
    with pytest.raises(EventLogError, match="UEFI_VARIABLE_DATA"):
        decode_efi_variable(data)


def test_decode_image_load_event_32_bit_uintn() -> None:
    data = struct.pack("<QIII", 0x1000, 0x2000, 0, 4) + b"\x7f\xff\x04\x00"
    image = decode_image_load_event(data, uintn_bytes=4)
    assert (image.image_location_in_memory, image.image_length_in_memory) == (0x1000, 0x2000)
    assert image.device_path == b"\x7f\xff\x04\x00"
    with pytest.raises(ValueError, match="uintn_bytes"):
        decode_image_load_event(data, uintn_bytes=2)


@pytest.mark.parametrize(
    "data",
    [b"", bytes(31), struct.pack("<QQQQ", 0, 0, 0, 1), struct.pack("<QQQQ", 0, 0, 0, 2**64 - 1)],
)
def test_decode_image_load_event_rejects_malformed(data: bytes) -> None:
    with pytest.raises(EventLogError, match="UEFI_IMAGE_LOAD_EVENT"):
        decode_image_load_event(data)


@pytest.mark.parametrize(
    "data", [b"", b"\xed\x22\x3b", struct.pack("<II", 1, 1), struct.pack("<II", 1, 2**32 - 1)]
)
def test_decode_tagged_event_rejects_malformed(data: bytes) -> None:
    with pytest.raises(EventLogError, match="TCG_PCClientTaggedEvent"):
        decode_tagged_event(data)


# --- synthetic logs ------------------------------------------------------------------------------


def test_synthetic_log_known_replay() -> None:
    separator = b"\x00\x00\x00\x00"
    raw = (
        header(SHA1_SHA256)
        + measured(3, EV_SEPARATOR, separator, BANKS)
        + measured(6, EV_SEPARATOR, separator, BANKS)
    )
    log = parse_event_log(raw)
    assert log.banks == BANKS
    assert [(e.index, e.pcr, e.event_type_name) for e in log.events] == [
        (1, 3, "EV_SEPARATOR"),
        (2, 6, "EV_SEPARATOR"),
    ]
    replayed = log.replay()
    for bank in BANKS:
        assert {pcr: v.hex() for pcr, v in replayed[bank].items()} == {
            3: SEPARATOR_ONLY_PCR[bank],
            6: SEPARATOR_ONLY_PCR[bank],
        }


def test_synthetic_log_extends_in_order_and_skips_no_action() -> None:
    raw = (
        header(SHA1_SHA256)
        + measured(4, EV_EFI_ACTION, b"first", BANKS)
        + measured(4, EV_NO_ACTION, b"not extended", BANKS)
        + measured(4, EV_EFI_ACTION, b"second", BANKS)
        + event2(0xFFFFFFFF, EV_NO_ACTION, [(ALG_SHA1, bytes(20)), (ALG_SHA256, bytes(32))], b"")
    )
    log = parse_event_log(raw)
    assert len(log.events) == 4
    for bank in BANKS:
        value = bytes(hashlib.new(bank).digest_size)
        for data in (b"first", b"second"):
            value = hashlib.new(bank, value + hashlib.new(bank, data).digest()).digest()
        # EV_NO_ACTION (even at PCR index 0xFFFFFFFF) adds no PCR.
        assert log.replay()[bank] == {4: value}


def test_synthetic_startup_locality_only() -> None:
    log = parse_event_log(header(SHA1_SHA256) + startup_locality_event(3))
    assert log.startup_locality == 3
    assert log.replay() == {"sha1": {0: bytes(19) + b"\x03"}, "sha256": {0: bytes(31) + b"\x03"}}


def test_synthetic_startup_locality_then_pcr0_event() -> None:
    raw = header(SHA1_SHA256) + startup_locality_event(4) + measured(0, 0x8, b"v1", BANKS)
    replayed = parse_event_log(raw).replay()
    for bank in BANKS:
        start = bytes(hashlib.new(bank).digest_size - 1) + b"\x04"
        assert (
            replayed[bank][0]
            == hashlib.new(bank, start + hashlib.new(bank, b"v1").digest()).digest()
        )


def test_accepts_bytearray_and_memoryview() -> None:
    raw = read_log("rhel8-uefi.bin")
    expected = parse_event_log(raw).replay()
    assert parse_event_log(bytearray(raw)).replay() == expected
    assert parse_event_log(memoryview(raw)).replay() == expected
    with pytest.raises(TypeError):
        parse_event_log("not bytes")  # type: ignore[arg-type]


def test_sm3_and_sha512_banks_replay() -> None:
    algorithms = [(0x0012, 32), (0x000D, 64)]
    d_sm3, d_512 = bytes(range(32)), bytes(range(64))
    log = parse_event_log(
        header(algorithms) + event2(8, 0xD, [(0x0012, d_sm3), (0x000D, d_512)], b"")
    )
    assert log.banks == ("sm3_256", "sha512")
    replayed = log.replay()
    assert replayed["sha512"][8] == hashlib.sha512(bytes(64) + d_512).digest()
    # GB/T 32905 SM3 of 64 bytes; compared with OpenSSL's implementation via hashlib.
    assert replayed["sm3_256"][8] == hashlib.new("sm3", bytes(32) + d_sm3).digest()


# --- legacy and malformed logs -------------------------------------------------------------------


def test_legacy_sha1_log_raises_legacy_error() -> None:
    legacy = sha1_format_event(0, EV_S_CRTM_VERSION, hashlib.sha1(b"v").digest(), b"v") + (
        sha1_format_event(4, EV_SEPARATOR, hashlib.sha1(bytes(4)).digest(), bytes(4))
    )
    with pytest.raises(LegacyEventLogError, match="legacy SHA-1-only") as caught:
        parse_event_log(legacy)
    assert isinstance(caught.value, EventLogError)
    assert "Spec ID Event03" in str(caught.value)


def test_tpm12_spec_id_header_raises_legacy_error() -> None:
    tpm12 = sha1_format_event(0, EV_NO_ACTION, bytes(20), b"Spec ID Event00\x00" + bytes(8))
    with pytest.raises(LegacyEventLogError):
        parse_event_log(tpm12)


def spec_id_header_variant(**kwargs: object) -> bytes:
    return header(SHA1_SHA256, **kwargs)


SEP = b"\x00\x00\x00\x00"
GOOD_DIGESTS = [(ALG_SHA1, hashlib.sha1(SEP).digest()), (ALG_SHA256, hashlib.sha256(SEP).digest())]

# (name, log bytes, regex the message must match). Each must raise exactly EventLogError.
MALFORMED: list[tuple[str, bytes, str]] = [
    ("truncated header", header(SHA1_SHA256)[:20], r"event #0: Digest: truncated"),
    (
        "no-action header without Spec ID",
        sha1_format_event(0, EV_NO_ACTION, bytes(20), b"something else"),
        r"event #0: Event: .*Spec ID Event03",
    ),
    (
        "header in PCR 1",
        sha1_format_event(1, EV_NO_ACTION, bytes(20), spec_id_data(SHA1_SHA256)),
        r"event #0: PCRIndex",
    ),
    (
        "header digest not zero",
        sha1_format_event(0, EV_NO_ACTION, b"\x01" * 20, spec_id_data(SHA1_SHA256)),
        r"event #0: Digest",
    ),
    ("uintnSize 3", spec_id_header_variant(uintn_size=3), r"uintnSize"),
    ("zero algorithms", header([]), r"numberOfAlgorithms"),
    ("absurd algorithm count", spec_id_header_variant(count=0xFFFFFFFF), r"numberOfAlgorithms"),
    ("algorithm count past data", spec_id_header_variant(count=5), r"digestSizes\[2\].*truncated"),
    ("unknown algorithm", header([(0x0099, 32)]), r"unknown hash algorithm 0x0099"),
    ("wrong digest size", header([(ALG_SHA256, 20)]), r"sha256 digests are 32 bytes"),
    ("duplicate algorithm", header([(ALG_SHA256, 32), (ALG_SHA256, 32)]), r"listed twice"),
    (
        "vendor info past data",
        sha1_format_event(0, EV_NO_ACTION, bytes(20), spec_id_data(SHA1_SHA256)[:-1] + b"\x05"),
        r"vendorInfo: truncated",
    ),
    (
        "spec id trailing bytes",
        sha1_format_event(0, EV_NO_ACTION, bytes(20), spec_id_data(SHA1_SHA256) + b"xx"),
        r"trailing bytes",
    ),
    (
        "digest count too small",
        header(SHA1_SHA256) + event2(4, EV_SEPARATOR, GOOD_DIGESTS[:1], SEP),
        r"event #1: Digests.count: 1 digests, the Spec ID header lists 2",
    ),
    (
        "absurd digest count",
        header(SHA1_SHA256) + struct.pack("<III", 4, EV_SEPARATOR, 0xFFFFFFFF),
        r"event #1: Digests.count",
    ),
    (
        "algorithm not in header",
        header(SHA1_SHA256)
        + event2(4, EV_SEPARATOR, [GOOD_DIGESTS[0], (ALG_SHA384, bytes(48))], SEP),
        r"event #1: Digests\[1\].hashAlg: algorithm 0x000c is not in the Spec ID header",
    ),
    (
        "duplicate digest",
        header(SHA1_SHA256) + event2(4, EV_SEPARATOR, [GOOD_DIGESTS[1], GOOD_DIGESTS[1]], SEP),
        r"event #1: Digests\[1\].hashAlg: sha256 digest listed twice",
    ),
    (
        "truncated digest",
        header(SHA1_SHA256) + event2(4, EV_SEPARATOR, GOOD_DIGESTS, SEP)[:40],
        r"event #1: Digests\[1\].digest \(sha256\): truncated",
    ),
    (
        "event size past data",
        header(SHA1_SHA256) + event2(4, EV_SEPARATOR, GOOD_DIGESTS, SEP)[:-4] + b"\xff\xff",
        r"event #1: EventSize|event #1: Event: truncated",
    ),
    (
        "absurd event size",
        header(SHA1_SHA256) + event2(4, EV_SEPARATOR, GOOD_DIGESTS, b"")[:-4] + b"\xff" * 4,
        r"event #1: EventSize: 4294967295 exceeds",
    ),
    (
        "pcr 24",
        header(SHA1_SHA256) + event2(24, EV_SEPARATOR, GOOD_DIGESTS, SEP),
        r"event #1: PCRIndex: 24 is not a PCR",
    ),
    (
        "second event garbage",
        header(SHA1_SHA256) + event2(4, EV_SEPARATOR, GOOD_DIGESTS, SEP) + b"garbage",
        r"event #2: ",
    ),
    (
        "trailing zero padding",
        header(SHA1_SHA256) + event2(4, EV_SEPARATOR, GOOD_DIGESTS, SEP) + bytes(64),
        r"event #2: Digests.count",
    ),
    (
        "startup locality twice",
        header(SHA1_SHA256) + startup_locality_event(3) + startup_locality_event(3),
        r"event #2: StartupLocality: more than one",
    ),
    (
        "startup locality after pcr0",
        header(SHA1_SHA256) + measured(0, 0x8, b"v", BANKS) + startup_locality_event(3),
        r"event #2: StartupLocality: appears after PCR 0",
    ),
    (
        "startup locality in pcr 1",
        header(SHA1_SHA256) + startup_locality_event(3, pcr=1),
        r"event #1: StartupLocality: must be logged in PCR 0",
    ),
    (
        "startup locality 7",
        header(SHA1_SHA256) + startup_locality_event(7),
        r"event #1: StartupLocality: locality must be 0-4",
    ),
    (
        "startup locality bad length",
        header(SHA1_SHA256) + startup_locality_event(0, data=b"StartupLocality\x00\x03\x00"),
        r"event #1: StartupLocality: event data must be 17 bytes",
    ),
]


@pytest.mark.parametrize(
    ("raw", "pattern"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed_log_raises_event_log_error(raw: bytes, pattern: str) -> None:
    with pytest.raises(EventLogError, match=pattern) as caught:
        parse_event_log(raw)
    assert type(caught.value) is EventLogError


def test_log_size_cap() -> None:
    with pytest.raises(EventLogError, match=r"over the .*-byte cap"):
        parse_event_log(header(SHA1_SHA256) + bytes(tcg.MAX_LOG_SIZE))


def test_event_count_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = header(SHA1_SHA256) + measured(4, EV_SEPARATOR, SEP, BANKS) * 11
    assert len(parse_event_log(raw).events) == 11
    monkeypatch.setattr(tcg, "MAX_EVENTS", 10)
    with pytest.raises(EventLogError, match=r"event #11: more than 10 events"):
        parse_event_log(raw)


def test_event_data_size_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = header(SHA1_SHA256) + measured(4, EV_EFI_ACTION, b"x" * 101, BANKS)
    monkeypatch.setattr(tcg, "MAX_EVENT_DATA_SIZE", 100)
    with pytest.raises(EventLogError, match=r"event #1: EventSize: 101 exceeds the 100-byte cap"):
        parse_event_log(raw)


# --- truncation and mutation of real logs --------------------------------------------------------


@pytest.mark.parametrize("name", VALID_LOGS)
def test_real_log_cut_at_every_event_boundary_and_random_points(name: str) -> None:
    raw = read_log(name)
    full = parse_event_log(raw)
    boundaries = event_boundaries(full)
    assert boundaries[-1] == len(raw)
    for count, end in enumerate(boundaries):
        # A cut at an event boundary is a valid, shorter log: exactly the first events.
        prefix = parse_event_log(raw[:end])
        assert prefix.events == full.events[:count]
    rng = random.Random(f"cut-{name}")
    inside = [b + d for b in boundaries[:-1] for d in (1, 4, 12)]
    inside += rng.sample(range(1, len(raw)), 200)
    for end in inside:
        if end in boundaries:
            continue
        start = time.perf_counter()
        with pytest.raises(EventLogError):
            parse_event_log(raw[:end])
        assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("name", VALID_LOGS)
def test_real_log_random_byte_flips(name: str) -> None:
    raw = read_log(name)
    rng = random.Random(f"flip-{name}")
    for _ in range(300):
        mutated = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(len(mutated))] ^= rng.randint(1, 255)
        parse_or_event_log_error(bytes(mutated))


# --- hypothesis ----------------------------------------------------------------------------------

FUZZ_SETTINGS = settings(
    max_examples=300,
    deadline=timedelta(seconds=2),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
REAL_LOG = read_log("keylime-binary_bios_measurements.bin")
REAL_HEADER = REAL_LOG[: header_size(parse_event_log(REAL_LOG))]


@FUZZ_SETTINGS
@given(st.binary(max_size=4096))
def test_hypothesis_random_bytes(data: bytes) -> None:
    parse_or_event_log_error(data)


@FUZZ_SETTINGS
@given(st.binary(max_size=4096))
def test_hypothesis_valid_header_then_random_bytes(tail: bytes) -> None:
    parse_or_event_log_error(REAL_HEADER + tail)


@FUZZ_SETTINGS
@given(st.data())
def test_hypothesis_mutations_of_a_real_log(data: st.DataObject) -> None:
    mutated = bytearray(REAL_LOG)
    for _ in range(data.draw(st.integers(1, 6), label="mutations")):
        position = data.draw(st.integers(0, len(mutated) - 1), label="position")
        operation = data.draw(st.sampled_from(["replace", "delete", "insert"]), label="op")
        chunk = data.draw(st.binary(min_size=1, max_size=8), label="bytes")
        if operation == "replace":
            mutated[position : position + len(chunk)] = chunk
        elif operation == "delete":
            del mutated[position : position + len(chunk)]
        else:
            mutated[position:position] = chunk
        if not mutated:
            mutated = bytearray(b"\x00")
    parse_or_event_log_error(bytes(mutated))
