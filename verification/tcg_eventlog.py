"""Parse and replay TCG PC Client boot event logs (crypto-agile, TPM 2.0 format).

The format is the one of the TCG PC Client Platform Firmware Profile (PFP) spec: a first
``TCG_PCR_EVENT`` in the old SHA-1 layout carrying the ``TCG_EfiSpecIDEvent`` header
("Spec ID Event03"), then ``TCG_PCR_EVENT2`` records, each with one digest per bank that the
header lists. This is what Linux exposes as ``/sys/kernel/security/tpm0/binary_bios_measurements``.

Hand-written on purpose: the verifier may depend only on cryptography, pydantic and the standard
library, and none of them parses these logs. The parser is strict and fails closed: every length
is checked against the bytes that remain before it is used, sizes and counts are capped, and any
malformed input raises :class:`EventLogError` naming the event number and the field; a parse
never raises ``IndexError``/``struct.error``/``UnicodeDecodeError`` and never loops without
consuming input.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes

from aicert.errors import EventLogError

__all__ = [
    "EFI_GLOBAL_VARIABLE_GUID",
    "EFI_IMAGE_SECURITY_DATABASE_GUID",
    "EVENT_TYPE_NAMES",
    "EV_NO_ACTION",
    "LINUX_EFI_INITRD_EVENT_ID",
    "LINUX_EFI_LOAD_OPTIONS_EVENT_ID",
    "MAX_EVENTS",
    "MAX_EVENT_DATA_SIZE",
    "MAX_LOG_SIZE",
    "EfiImageLoadEvent",
    "EfiVariableData",
    "LegacyEventLogError",
    "TaggedEvent",
    "TcgAlgorithm",
    "TcgEvent",
    "TcgEventLog",
    "TcgSpecIdEvent",
    "decode_efi_variable",
    "decode_image_load_event",
    "decode_tagged_event",
    "event_type_name",
    "parse_event_log",
]


class LegacyEventLogError(EventLogError):
    """The log is a legacy SHA-1-only (TPM 1.2 style) log, not a crypto-agile TPM 2.0 log."""


# Caps against malicious lengths. Real logs are 5-100 KiB with a few hundred events; the largest
# single events (Secure Boot db/dbx variables) are tens of KiB, bounded by the platform's NVRAM.
MAX_LOG_SIZE = 16 * 1024 * 1024
MAX_EVENTS = 100_000
MAX_EVENT_DATA_SIZE = 4 * 1024 * 1024
_MAX_ALGORITHMS = 16
_MAX_PCR_INDEX = 23

EV_NO_ACTION = 0x00000003

# TCG PC Client Platform Firmware Profile, "Event Types" table (PFP 1.05/1.06).
EVENT_TYPE_NAMES: dict[int, str] = {
    0x00000000: "EV_PREBOOT_CERT",
    0x00000001: "EV_POST_CODE",
    0x00000002: "EV_UNUSED",
    0x00000003: "EV_NO_ACTION",
    0x00000004: "EV_SEPARATOR",
    0x00000005: "EV_ACTION",
    0x00000006: "EV_EVENT_TAG",
    0x00000007: "EV_S_CRTM_CONTENTS",
    0x00000008: "EV_S_CRTM_VERSION",
    0x00000009: "EV_CPU_MICROCODE",
    0x0000000A: "EV_PLATFORM_CONFIG_FLAGS",
    0x0000000B: "EV_TABLE_OF_DEVICES",
    0x0000000C: "EV_COMPACT_HASH",
    0x0000000D: "EV_IPL",
    0x0000000E: "EV_IPL_PARTITION_DATA",
    0x0000000F: "EV_NONHOST_CODE",
    0x00000010: "EV_NONHOST_CONFIG",
    0x00000011: "EV_NONHOST_INFO",
    0x00000012: "EV_OMIT_BOOT_DEVICE_EVENTS",
    0x80000000: "EV_EFI_EVENT_BASE",
    0x80000001: "EV_EFI_VARIABLE_DRIVER_CONFIG",
    0x80000002: "EV_EFI_VARIABLE_BOOT",
    0x80000003: "EV_EFI_BOOT_SERVICES_APPLICATION",
    0x80000004: "EV_EFI_BOOT_SERVICES_DRIVER",
    0x80000005: "EV_EFI_RUNTIME_SERVICES_DRIVER",
    0x80000006: "EV_EFI_GPT_EVENT",
    0x80000007: "EV_EFI_ACTION",
    0x80000008: "EV_EFI_PLATFORM_FIRMWARE_BLOB",
    0x80000009: "EV_EFI_HANDOFF_TABLES",
    0x8000000A: "EV_EFI_PLATFORM_FIRMWARE_BLOB2",
    0x8000000B: "EV_EFI_HANDOFF_TABLES2",
    0x8000000C: "EV_EFI_VARIABLE_BOOT2",
    0x80000010: "EV_EFI_HCRTM_EVENT",
    0x800000E0: "EV_EFI_VARIABLE_AUTHORITY",
    0x800000E1: "EV_EFI_SPDM_FIRMWARE_BLOB",
    0x800000E2: "EV_EFI_SPDM_FIRMWARE_CONFIG",
    0x800000E3: "EV_EFI_SPDM_DEVICE_POLICY",
    0x800000E4: "EV_EFI_SPDM_DEVICE_AUTHORITY",
}

# EFI_GLOBAL_VARIABLE (SecureBoot, PK, KEK, Boot####, BootOrder) and
# EFI_IMAGE_SECURITY_DATABASE_GUID (db, dbx), as they appear in UEFI_VARIABLE_DATA.
EFI_GLOBAL_VARIABLE_GUID = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")
EFI_IMAGE_SECURITY_DATABASE_GUID = uuid.UUID("d719b2cb-3d3a-4596-a3bc-dad00e67656f")

# Tagged-event ids used by Linux's EFI stub (drivers/firmware/efi/libstub), PCR 9.
LINUX_EFI_INITRD_EVENT_ID = 0x8F3B22EC
LINUX_EFI_LOAD_OPTIONS_EVENT_ID = 0x8F3B22ED

_SPEC_ID_SIGNATURE = b"Spec ID Event03\x00"
_LEGACY_SPEC_ID_PREFIXES = (b"Spec ID Event00", b"Spec ID Event02")
_STARTUP_LOCALITY_SIGNATURE = b"StartupLocality\x00"
_SHA1_DIGEST_SIZE = 20


def _sm3(data: bytes) -> bytes:
    # hashlib's "sm3" depends on how OpenSSL was built; cryptography always ships it.
    h = hashes.Hash(hashes.SM3())
    h.update(data)
    return h.finalize()


def _hashlib(name: str) -> Callable[[bytes], bytes]:
    def digest(data: bytes) -> bytes:
        return hashlib.new(name, data).digest()

    return digest


@dataclass(frozen=True)
class _Bank:
    name: str
    digest_size: int
    hash: Callable[[bytes], bytes]


# TPM_ALG_ID -> bank (TCG Algorithm Registry).
_BANKS: dict[int, _Bank] = {
    0x0004: _Bank("sha1", 20, _hashlib("sha1")),
    0x000B: _Bank("sha256", 32, _hashlib("sha256")),
    0x000C: _Bank("sha384", 48, _hashlib("sha384")),
    0x000D: _Bank("sha512", 64, _hashlib("sha512")),
    0x0012: _Bank("sm3_256", 32, _sm3),
    0x0027: _Bank("sha3_256", 32, _hashlib("sha3_256")),
    0x0028: _Bank("sha3_384", 48, _hashlib("sha3_384")),
    0x0029: _Bank("sha3_512", 64, _hashlib("sha3_512")),
}
_BANK_BY_NAME: dict[str, _Bank] = {bank.name: bank for bank in _BANKS.values()}


def event_type_name(event_type: int) -> str:
    """The PFP name of an event type, or ``EV_UNKNOWN_0x........`` for unlisted (vendor) types."""
    return EVENT_TYPE_NAMES.get(event_type, f"EV_UNKNOWN_0x{event_type:08X}")


@dataclass(frozen=True)
class TcgAlgorithm:
    """One entry of the Spec ID event's digestSizes: a PCR bank the log carries."""

    algorithm_id: int
    name: str
    digest_size: int


@dataclass(frozen=True)
class TcgSpecIdEvent:
    """The TCG_EfiSpecIDEvent ("Spec ID Event03") header of a crypto-agile log."""

    platform_class: int
    spec_version_minor: int
    spec_version_major: int
    spec_errata: int
    uintn_size: int  # raw header value: 1 = UINTN is 32-bit, 2 = UINTN is 64-bit
    algorithms: tuple[TcgAlgorithm, ...]
    vendor_info: bytes

    @property
    def uintn_bytes(self) -> int:
        """Size in bytes of a firmware UINTN (needed to decode UEFI_IMAGE_LOAD_EVENT)."""
        return 4 if self.uintn_size == 1 else 8


@dataclass(frozen=True)
class TcgEvent:
    """One TCG_PCR_EVENT2 record.

    ``index`` is the sequence number in the log, counting the Spec ID header as event 0 (as
    tpm2_eventlog does), so the first TcgEvent has index 1. ``digests`` holds one digest per
    bank of the log.
    """

    index: int
    pcr: int
    event_type: int
    digests: dict[str, bytes]
    data: bytes

    @property
    def event_type_name(self) -> str:
        return event_type_name(self.event_type)


@dataclass(frozen=True)
class TcgEventLog:
    """A parsed crypto-agile event log. ``events`` excludes the Spec ID header (see ``spec_id``)."""

    spec_id: TcgSpecIdEvent
    events: tuple[TcgEvent, ...]
    startup_locality: int | None

    @property
    def banks(self) -> tuple[str, ...]:
        """Bank names present in the log, in the header's order (e.g. ``("sha1", "sha256")``)."""
        return tuple(alg.name for alg in self.spec_id.algorithms)

    def replay(self) -> dict[str, dict[int, bytes]]:
        """Recompute the final PCR values: bank name -> PCR index -> value.

        Each PCR starts at zeros (PCR 0 at 00..00LL when a StartupLocality event gives locality
        LL, per the PC Client spec) and is extended as H(value || digest). EV_NO_ACTION events
        are not extended. Only PCRs with at least one extended event are returned, plus PCR 0
        when a StartupLocality event exists.
        """
        result: dict[str, dict[int, bytes]] = {}
        for alg in self.spec_id.algorithms:
            bank = _BANK_BY_NAME[alg.name]
            values: dict[int, bytes] = {}
            if self.startup_locality is not None:
                values[0] = bytes(bank.digest_size - 1) + bytes([self.startup_locality])
            for event in self.events:
                if event.event_type == EV_NO_ACTION:
                    continue
                current = values.get(event.pcr, bytes(bank.digest_size))
                values[event.pcr] = bank.hash(current + event.digests[alg.name])
            result[alg.name] = dict(sorted(values.items()))
        return result


class _Reader:
    """Bounds-checked little-endian cursor; every failure is an EventLogError with context."""

    __slots__ = ("_data", "event_number", "pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.pos = 0
        self.event_number = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self.pos

    def _need(self, size: int, field: str) -> None:
        if size > self.remaining:
            raise EventLogError(
                f"event #{self.event_number}: {field}: truncated "
                f"(needs {size} bytes at offset {self.pos}, {self.remaining} left)"
            )

    def take(self, size: int, field: str) -> bytes:
        self._need(size, field)
        chunk = self._data[self.pos : self.pos + size]
        self.pos += size
        return chunk

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u16(self, field: str) -> int:
        return int.from_bytes(self.take(2, field), "little")

    def u32(self, field: str) -> int:
        return int.from_bytes(self.take(4, field), "little")

    def error(self, field: str, message: str) -> EventLogError:
        return EventLogError(f"event #{self.event_number}: {field}: {message}")


def _parse_spec_id(data: bytes) -> TcgSpecIdEvent:
    reader = _Reader(data)
    reader.take(16, "Spec ID signature")
    platform_class = reader.u32("Spec ID platformClass")
    spec_version_minor = reader.u8("Spec ID specVersionMinor")
    spec_version_major = reader.u8("Spec ID specVersionMajor")
    spec_errata = reader.u8("Spec ID specErrata")
    uintn_size = reader.u8("Spec ID uintnSize")
    if uintn_size not in (1, 2):
        raise reader.error("Spec ID uintnSize", f"must be 1 or 2, got {uintn_size}")
    count = reader.u32("Spec ID numberOfAlgorithms")
    if not 1 <= count <= _MAX_ALGORITHMS:
        raise reader.error(
            "Spec ID numberOfAlgorithms", f"must be 1..{_MAX_ALGORITHMS}, got {count}"
        )
    algorithms: list[TcgAlgorithm] = []
    for i in range(count):
        alg_id = reader.u16(f"Spec ID digestSizes[{i}].algorithmId")
        size = reader.u16(f"Spec ID digestSizes[{i}].digestSize")
        bank = _BANKS.get(alg_id)
        if bank is None:
            raise reader.error(
                f"Spec ID digestSizes[{i}].algorithmId", f"unknown hash algorithm 0x{alg_id:04x}"
            )
        if size != bank.digest_size:
            raise reader.error(
                f"Spec ID digestSizes[{i}].digestSize",
                f"{bank.name} digests are {bank.digest_size} bytes, header says {size}",
            )
        if any(a.algorithm_id == alg_id for a in algorithms):
            raise reader.error(f"Spec ID digestSizes[{i}].algorithmId", f"{bank.name} listed twice")
        algorithms.append(TcgAlgorithm(alg_id, bank.name, size))
    vendor_info_size = reader.u8("Spec ID vendorInfoSize")
    vendor_info = reader.take(vendor_info_size, "Spec ID vendorInfo")
    if reader.remaining:
        raise reader.error("Spec ID event data", f"{reader.remaining} unexpected trailing bytes")
    return TcgSpecIdEvent(
        platform_class=platform_class,
        spec_version_minor=spec_version_minor,
        spec_version_major=spec_version_major,
        spec_errata=spec_errata,
        uintn_size=uintn_size,
        algorithms=tuple(algorithms),
        vendor_info=vendor_info,
    )


def _parse_header(reader: _Reader) -> TcgSpecIdEvent:
    """Parse event #0, the SHA-1-format TCG_PCR_EVENT that must carry "Spec ID Event03"."""
    pcr = reader.u32("PCRIndex")
    event_type = reader.u32("EventType")
    digest = reader.take(_SHA1_DIGEST_SIZE, "Digest")
    size = reader.u32("EventSize")
    if pcr > _MAX_PCR_INDEX or size > min(reader.remaining, MAX_EVENT_DATA_SIZE):
        # Not even a well-formed SHA-1 record: garbage rather than an old-format log.
        raise reader.error(
            "header",
            "not a TCG event log (first record is not a valid TCG_PCR_EVENT: "
            f"PCRIndex {pcr}, EventSize {size}, {reader.remaining} bytes left)",
        )
    data = reader.take(size, "Event")
    if event_type != EV_NO_ACTION or not data.startswith(_SPEC_ID_SIGNATURE):
        if data.startswith(_LEGACY_SPEC_ID_PREFIXES) or event_type != EV_NO_ACTION:
            raise LegacyEventLogError(
                "legacy SHA-1-only event log (TPM 1.2 format, no 'Spec ID Event03' header): "
                "only crypto-agile TPM 2.0 logs are supported"
            )
        raise reader.error("Event", "EV_NO_ACTION header does not carry 'Spec ID Event03'")
    if pcr != 0:
        raise reader.error("PCRIndex", f"Spec ID event must be in PCR 0, got {pcr}")
    if digest != bytes(_SHA1_DIGEST_SIZE):
        raise reader.error("Digest", "Spec ID event digest must be all zeros")
    return _parse_spec_id(data)


def _parse_event2(reader: _Reader, algorithms: dict[int, TcgAlgorithm], index: int) -> TcgEvent:
    pcr = reader.u32("PCRIndex")
    event_type = reader.u32("EventType")
    if pcr > _MAX_PCR_INDEX and event_type != EV_NO_ACTION:
        raise reader.error("PCRIndex", f"{pcr} is not a PCR (0-{_MAX_PCR_INDEX})")
    count = reader.u32("Digests.count")
    if count != len(algorithms):
        raise reader.error(
            "Digests.count", f"{count} digests, the Spec ID header lists {len(algorithms)} banks"
        )
    digests: dict[str, bytes] = {}
    for i in range(count):
        alg_id = reader.u16(f"Digests[{i}].hashAlg")
        alg = algorithms.get(alg_id)
        if alg is None:
            raise reader.error(
                f"Digests[{i}].hashAlg", f"algorithm 0x{alg_id:04x} is not in the Spec ID header"
            )
        if alg.name in digests:
            raise reader.error(f"Digests[{i}].hashAlg", f"{alg.name} digest listed twice")
        digests[alg.name] = reader.take(alg.digest_size, f"Digests[{i}].digest ({alg.name})")
    size = reader.u32("EventSize")
    if size > MAX_EVENT_DATA_SIZE:
        raise reader.error("EventSize", f"{size} exceeds the {MAX_EVENT_DATA_SIZE}-byte cap")
    data = reader.take(size, "Event")
    return TcgEvent(index=index, pcr=pcr, event_type=event_type, digests=digests, data=data)


def _startup_locality(event: TcgEvent, seen: int | None, pcr0_extended: bool) -> int | None:
    """The locality a StartupLocality event gives, None for any other event; checks placement."""
    if event.event_type != EV_NO_ACTION or not event.data.startswith(_STARTUP_LOCALITY_SIGNATURE):
        return None
    where = f"event #{event.index}: StartupLocality"
    if len(event.data) != len(_STARTUP_LOCALITY_SIGNATURE) + 1:
        raise EventLogError(f"{where}: event data must be 17 bytes, got {len(event.data)}")
    if event.pcr != 0:
        raise EventLogError(f"{where}: must be logged in PCR 0, got PCR {event.pcr}")
    if seen is not None:
        raise EventLogError(f"{where}: more than one StartupLocality event")
    if pcr0_extended:
        raise EventLogError(f"{where}: appears after PCR 0 was already extended")
    locality = event.data[-1]
    if locality > 4:
        raise EventLogError(f"{where}: locality must be 0-4, got {locality}")
    return locality


def parse_event_log(data: bytes) -> TcgEventLog:
    """Parse a crypto-agile TCG PC Client event log (e.g. binary_bios_measurements).

    Raises LegacyEventLogError for a SHA-1-only TPM 1.2 log and EventLogError for anything
    malformed: empty, truncated, inconsistent with its header, oversized, trailing garbage.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"event log must be bytes, not {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise EventLogError("event log is empty")
    if len(data) > MAX_LOG_SIZE:
        raise EventLogError(f"event log is {len(data)} bytes, over the {MAX_LOG_SIZE}-byte cap")
    reader = _Reader(data)
    spec_id = _parse_header(reader)
    algorithms = {alg.algorithm_id: alg for alg in spec_id.algorithms}
    events: list[TcgEvent] = []
    startup_locality: int | None = None
    pcr0_extended = False
    while reader.remaining:
        index = len(events) + 1
        if index > MAX_EVENTS:
            raise EventLogError(f"event #{index}: more than {MAX_EVENTS} events")
        reader.event_number = index
        event = _parse_event2(reader, algorithms, index)
        locality = _startup_locality(event, startup_locality, pcr0_extended)
        if locality is not None:
            startup_locality = locality
        if event.pcr == 0 and event.event_type != EV_NO_ACTION:
            pcr0_extended = True
        events.append(event)
    return TcgEventLog(spec_id=spec_id, events=tuple(events), startup_locality=startup_locality)


# --- Decoders of event data, for reference-value checks -------------------------------------
#
# Real firmware and boot loaders log these structures with junk after the declared lengths
# (rhel8-uefi.bin: 8 zero bytes after an image's device path; cos-85-amd-sev.bin: 6 bytes after
# a VARIABLE_AUTHORITY certificate). The decoders therefore accept bytes after the structure and
# return them as ``trailing_data`` (a caller that wants strictness checks it is empty); a
# declared length that runs past the data is always an error.


@dataclass(frozen=True)
class EfiVariableData:
    """UEFI_VARIABLE_DATA (EV_EFI_VARIABLE_DRIVER_CONFIG / _BOOT / _BOOT2 / _AUTHORITY)."""

    variable_name: uuid.UUID
    unicode_name: str
    variable_data: bytes
    trailing_data: bytes = b""


@dataclass(frozen=True)
class EfiImageLoadEvent:
    """UEFI_IMAGE_LOAD_EVENT (EV_EFI_BOOT_SERVICES_APPLICATION / _DRIVER, RUNTIME_SERVICES)."""

    image_location_in_memory: int
    image_length_in_memory: int
    image_link_time_address: int
    device_path: bytes
    trailing_data: bytes = b""


@dataclass(frozen=True)
class TaggedEvent:
    """TCG_PCClientTaggedEvent (EV_EVENT_TAG)."""

    tagged_event_id: int
    tagged_event_data: bytes
    trailing_data: bytes = b""


def decode_efi_variable(data: bytes) -> EfiVariableData:
    """Decode UEFI_VARIABLE_DATA (VariableName GUID, UnicodeName, VariableData)."""
    data = bytes(data)
    header = 16 + 8 + 8
    if len(data) < header:
        raise EventLogError(
            f"UEFI_VARIABLE_DATA: truncated header ({len(data)} bytes, needs {header})"
        )
    guid = uuid.UUID(bytes_le=data[:16])
    name_length, data_length = struct.unpack_from("<QQ", data, 16)
    # The lengths are untrusted 64-bit values: compare them with what is there before slicing.
    remaining = len(data) - header
    if name_length > remaining // 2 or data_length > remaining - 2 * name_length:
        raise EventLogError(
            f"UEFI_VARIABLE_DATA: UnicodeNameLength {name_length} and VariableDataLength "
            f"{data_length} run past the {remaining} bytes that follow the header"
        )
    name_end = header + 2 * name_length
    data_end = name_end + data_length
    try:
        name = data[header:name_end].decode("utf-16-le")
    except UnicodeDecodeError as exc:
        raise EventLogError(f"UEFI_VARIABLE_DATA: UnicodeName is not UTF-16LE: {exc}") from None
    return EfiVariableData(
        variable_name=guid,
        unicode_name=name,
        variable_data=data[name_end:data_end],
        trailing_data=data[data_end:],
    )


def decode_image_load_event(data: bytes, uintn_bytes: int = 8) -> EfiImageLoadEvent:
    """Decode UEFI_IMAGE_LOAD_EVENT. ``uintn_bytes`` is ``log.spec_id.uintn_bytes`` (4 or 8)."""
    if uintn_bytes not in (4, 8):
        raise ValueError(f"uintn_bytes must be 4 or 8, got {uintn_bytes}")
    data = bytes(data)
    uintn = "I" if uintn_bytes == 4 else "Q"
    layout = struct.Struct(f"<Q{uintn}{uintn}{uintn}")
    if len(data) < layout.size:
        raise EventLogError(
            f"UEFI_IMAGE_LOAD_EVENT: truncated header ({len(data)} bytes, needs {layout.size})"
        )
    location, length, link_address, path_length = layout.unpack_from(data)
    if path_length > len(data) - layout.size:
        raise EventLogError(
            f"UEFI_IMAGE_LOAD_EVENT: LengthOfDevicePath {path_length} runs past the "
            f"{len(data) - layout.size} bytes that follow the header"
        )
    path_end = layout.size + path_length
    return EfiImageLoadEvent(
        image_location_in_memory=location,
        image_length_in_memory=length,
        image_link_time_address=link_address,
        device_path=data[layout.size : path_end],
        trailing_data=data[path_end:],
    )


def decode_tagged_event(data: bytes) -> TaggedEvent:
    """Decode TCG_PCClientTaggedEvent (e.g. Linux's "LOADED_IMAGE::LoadOptions" in PCR 9)."""
    data = bytes(data)
    if len(data) < 8:
        raise EventLogError(f"TCG_PCClientTaggedEvent: truncated header ({len(data)} bytes)")
    event_id, size = struct.unpack_from("<II", data)
    if size > len(data) - 8:
        raise EventLogError(
            f"TCG_PCClientTaggedEvent: taggedEventDataSize {size} runs past the "
            f"{len(data) - 8} bytes that follow the header"
        )
    return TaggedEvent(
        tagged_event_id=event_id,
        tagged_event_data=data[8 : 8 + size],
        trailing_data=data[8 + size :],
    )
