"""Real boot event logs for the reference-value tests, and edits of them that stay consistent.

None of the shared logs comes from Azure or Hyper-V. The main input is
``keylime-binary_bios_measurements-secureboot.bin``: the boot path of an Azure Trusted Launch
VM (UEFI with Secure Boot on, shim, GRUB, a Linux kernel verified by shim, its command line
and initrd measured by GRUB) on a RHEL 9 machine. An edit re-serializes the log with other
digests, and ``replayed_pcrs`` gives the PCR 0-9 such a boot would have quoted, so the log
still replays: a consistent boot of something else, which only the reference values refuse.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from dataclasses import replace

from aicert.reference_values import ReferenceValueSet, load_options_digest
from aicert.tcg_eventlog import TcgEvent, TcgEventLog, parse_event_log
from tests.data import EVENTLOGS

EXPECTED: dict[str, dict] = json.loads((EVENTLOGS / "expected.json").read_text())
MAIN_LOG = "keylime-binary_bios_measurements-secureboot.bin"
# The shared logs with UEFI Secure Boot on and a shim/GRUB (or GRUB) chain to Linux.
SECURE_BOOT_LOGS = (MAIN_LOG, "rhel8-uefi.bin", "cos-85-amd-sev.bin")
SECURE_BOOT_OFF_LOGS = (
    "gdc-host.bin",
    "keylime-binary_bios_measurements.bin",
    "ubuntu-2104-no-secure-boot.bin",
)
IMAGE_VERSION_ID = (
    "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-aicert-images/"
    "providers/Microsoft.Compute/galleries/aicert_gallery/images/aicert-guest-tl/versions/1.0.0"
)
REFERENCE_ID = "aicert-guest-tl-1.0.0"

EV_IPL = 0x0000000D
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003


def read_log(name: str = MAIN_LOG) -> bytes:
    return (EVENTLOGS / name).read_bytes()


def expected_pcrs(name: str = MAIN_LOG) -> dict[int, bytes]:
    """PCR 0-9 (SHA-256) of a shared log as ``expected.json`` records them (independent of
    this project's replay), zeros for the PCRs it never extended."""
    recorded = EXPECTED[name]["pcrs"]["sha256"]
    return {index: bytes.fromhex(recorded.get(str(index), "00" * 32)) for index in range(10)}


def replayed_pcrs(raw: bytes) -> dict[int, bytes]:
    replayed = parse_event_log(raw).replay()["sha256"]
    return {index: replayed.get(index, bytes(32)) for index in range(10)}


def _header_length(raw: bytes) -> int:
    # TCG_PCR_EVENT: PCRIndex, EventType, SHA-1 digest, EventSize, Event.
    return 32 + int.from_bytes(raw[28:32], "little")


def serialize(raw: bytes, log: TcgEventLog, events: list[TcgEvent]) -> bytes:
    """``raw``'s header followed by ``events`` as TCG_PCR_EVENT2 records."""
    records = [raw[: _header_length(raw)]]
    for event in events:
        digests = b"".join(
            struct.pack("<H", alg.algorithm_id) + event.digests[alg.name]
            for alg in log.spec_id.algorithms
        )
        records.append(
            struct.pack("<III", event.pcr, event.event_type, len(log.spec_id.algorithms))
            + digests
            + struct.pack("<I", len(event.data))
            + event.data
        )
    return b"".join(records)


def _digests(log: TcgEventLog, content: bytes) -> dict[str, bytes]:
    return {alg.name: hashlib.new(alg.name, content).digest() for alg in log.spec_id.algorithms}


def edited(raw: bytes, edit: Callable[[TcgEventLog, list[TcgEvent]], list[TcgEvent]]) -> bytes:
    log = parse_event_log(raw)
    return serialize(raw, log, edit(log, list(log.events)))


def with_other_digest(raw: bytes, index: int, content: bytes = b"another component") -> bytes:
    """Event ``index`` measured as something else (all banks), the rest unchanged."""

    def edit(log: TcgEventLog, events: list[TcgEvent]) -> list[TcgEvent]:
        position = next(i for i, event in enumerate(events) if event.index == index)
        events[position] = replace(events[position], digests=_digests(log, content))
        return events

    return edited(raw, edit)


def with_event_inserted(
    raw: bytes, before_index: int, pcr: int, event_type: int, data: bytes, content: bytes
) -> bytes:
    def edit(log: TcgEventLog, events: list[TcgEvent]) -> list[TcgEvent]:
        position = next(i for i, event in enumerate(events) if event.index == before_index)
        extra = TcgEvent(0, pcr, event_type, _digests(log, content), data)
        return [*events[:position], extra, *events[position:]]

    return edited(raw, edit)


def without_event(raw: bytes, index: int) -> bytes:
    return edited(raw, lambda _log, events: [e for e in events if e.index != index])


def find_event(raw: bytes, predicate: Callable[[TcgEvent], bool]) -> TcgEvent:
    return next(event for event in parse_event_log(raw).events if predicate(event))


def ipl_text_startswith(prefix: bytes, pcr: int) -> Callable[[TcgEvent], bool]:
    return lambda e: e.pcr == pcr and e.event_type == EV_IPL and e.data.startswith(prefix)


def minimal_qemu_set(reference_id: str) -> ReferenceValueSet:
    """A qemu set with placeholder values (no observed boot): enough where only its id, its
    platform or its (empty) ``mok_events`` matter."""
    return ReferenceValueSet(
        id=reference_id,
        platform="qemu",
        kernel_sha256="00" * 32,
        initrd_sha256="00" * 32,
        command_line="console=ttyS0",
        load_options="console=ttyS0 initrd=initrd",
        load_options_sha256=load_options_digest("console=ttyS0 initrd=initrd").hex(),
    )
