"""The parts of a boot event log the reference-value check reads: its replay against the quoted
PCR 0-9, and its component events (:func:`classify_boot_events`: boot applications, Secure Boot
variables and authorities, kernel command line, kernel and initrd files).

Used by the check of a certificate's boot log (:mod:`aicert.boot_log_check`) and by the
derivation of a reference-value set from a reference boot (:mod:`aicert.reference_derivation`),
so that both read a log the same way.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from aicert.errors import EventLogError
from aicert.reference_value_sets import BOOT_PCRS, EventKind
from aicert.tcg_eventlog import (
    LINUX_EFI_INITRD_EVENT_ID,
    LINUX_EFI_LOAD_OPTIONS_EVENT_ID,
    TcgEvent,
    TcgEventLog,
    decode_efi_variable,
    decode_image_load_event,
    decode_tagged_event,
)

EV_EVENT_TAG = 0x00000006
EV_NO_ACTION = 0x00000003
EV_IPL = 0x0000000D
EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
EV_EFI_VARIABLE_AUTHORITY = 0x800000E0
# Media file path device-path node (UEFI spec, "Media Device Path"): type 4, subtype 4.
_DEVICE_PATH_MEDIA, _DEVICE_PATH_FILE, _DEVICE_PATH_END = 0x04, 0x04, 0x7F


def sha256_digest(event: TcgEvent) -> bytes:
    """The SHA-256 digest of ``event``.

    Raises:
        EventLogError: the event has none (the caller checks the log's banks first).
    """
    digest = event.digests.get("sha256")
    if digest is None:  # the parser guarantees one digest per bank; the bank is checked first
        raise EventLogError(f"event #{event.index}: no SHA-256 digest")
    return digest


def replay_against_quote(log: TcgEventLog, quoted_pcrs: Mapping[int, bytes]) -> None:
    """The log's SHA-256 bank replays to the quoted value of each of PCR 0-9.

    Raises:
        EventLogError: the log has no SHA-256 bank, the quote lacks a boot PCR, or a PCR
            replays to another value.
    """
    if "sha256" not in log.banks:
        raise EventLogError(f"the boot event log has no SHA-256 bank (banks: {log.banks})")
    replayed = log.replay()["sha256"]
    for index in BOOT_PCRS:
        if index not in quoted_pcrs:
            raise EventLogError(f"the quote does not cover PCR {index}")
        expected = replayed.get(index, bytes(32))
        if not hmac.compare_digest(expected, bytes(quoted_pcrs[index])):
            raise EventLogError(
                f"the boot event log replays PCR {index} to {expected.hex()}, "
                f"but the quote says {bytes(quoted_pcrs[index]).hex()}"
            )


def describe_boot_event(event: TcgEvent) -> str:
    """``event`` as an error names it: PCR, index, type and its data when that is a name."""
    data = event.data.rstrip(b"\x00")
    shown = (
        data.decode("ascii") if data.isascii() and data.isalnum() else f"{len(event.data)} bytes"
    )
    return f"boot event log: PCR {event.pcr} event #{event.index} ({event.event_type_name} {shown})"


@dataclass(frozen=True)
class MeasuredEvent:
    """A component event found in a boot event log (see :func:`classify_boot_events`)."""

    index: int
    pcr: int
    kind: EventKind
    description: str
    digest: bytes


def _device_path_file(device_path: bytes) -> str:
    """The file path nodes of a UEFI device path ("" when it has none), e.g.
    ``\\EFI\\ubuntu\\shimx64.efi``: informational, to name a boot application."""
    parts: list[str] = []
    position = 0
    while position + 4 <= len(device_path):
        node_type, sub_type = device_path[position], device_path[position + 1]
        length = int.from_bytes(device_path[position + 2 : position + 4], "little")
        if node_type == _DEVICE_PATH_END or length < 4 or position + length > len(device_path):
            break
        if node_type == _DEVICE_PATH_MEDIA and sub_type == _DEVICE_PATH_FILE:
            try:
                node = device_path[position + 4 : position + length].decode("utf-16-le")
            except UnicodeDecodeError:
                node = "?"
            parts.append(node.rstrip("\x00"))
        position += length
    segments = [part.strip("\\") for part in parts if part.strip("\\")]
    return "\\" + "\\".join(segments) if segments else ""


def _event_text(data: bytes) -> str:
    return data.rstrip(b"\x00").decode("utf-8", errors="replace")


def _variable_name(event: TcgEvent) -> str:
    try:
        return decode_efi_variable(event.data).unicode_name
    except EventLogError:
        return "(undecodable UEFI_VARIABLE_DATA)"


def classify_boot_events(log: TcgEventLog) -> list[MeasuredEvent]:
    """The component events of a shim + GRUB + Linux boot, in log order.

    PCR 4 boot applications; PCR 7 Secure Boot variables and authorities; the kernel command
    line (GRUB's ``kernel_cmdline`` in PCR 8, the EFI stub's ``LOADED_IMAGE::LoadOptions`` in
    PCR 9); the kernel and initrd files GRUB read (PCR 9, matched with the paths of its
    ``linux`` / ``initrd`` commands in PCR 8) and the EFI stub's ``Linux initrd``. Event data
    is not what the digest covers for most of these, so it only picks and names events: the
    check that matters is the PCR values, which the reference also holds.
    """
    found: list[MeasuredEvent] = []
    kernel_paths: set[str] = set()
    initrd_paths: set[str] = set()

    def add(event: TcgEvent, kind: EventKind, description: str) -> None:
        found.append(MeasuredEvent(event.index, event.pcr, kind, description, sha256_digest(event)))

    for event in log.events:
        if event.event_type == EV_NO_ACTION or event.pcr not in BOOT_PCRS:
            continue
        if event.pcr == 4 and event.event_type == EV_EFI_BOOT_SERVICES_APPLICATION:
            try:
                image = decode_image_load_event(event.data, log.spec_id.uintn_bytes)
                path = _device_path_file(image.device_path)
            except EventLogError:
                path = ""
            add(event, "boot_application", path)
        elif event.pcr == 7 and event.event_type == EV_EFI_VARIABLE_DRIVER_CONFIG:
            add(event, "secure_boot_variable", f"variable {_variable_name(event)}")
        elif event.pcr == 7 and event.event_type == EV_EFI_VARIABLE_AUTHORITY:
            add(event, "secure_boot_authority", f"authority {_variable_name(event)}")
        elif event.pcr == 8 and event.event_type == EV_IPL:
            text = _event_text(event.data)
            if text.startswith(("kernel_cmdline", "grub_kernel_cmdline")):
                add(event, "kernel_command_line", text)
                continue
            # GRUB 2.06+ logs "grub_cmd: linux PATH ARGS", older ones "grub_cmd linux ...".
            words = text.removeprefix("grub_cmd").lstrip(":").split()
            if len(words) > 1 and words[0] in ("linux", "linuxefi", "linux16"):
                kernel_paths.add(words[1])
            elif len(words) > 1 and words[0] in ("initrd", "initrdefi", "initrd16"):
                initrd_paths.update(words[1:])
        elif event.pcr == 9 and event.event_type == EV_EVENT_TAG:
            try:
                tag = decode_tagged_event(event.data)
            except EventLogError:
                continue
            if tag.tagged_event_id == LINUX_EFI_LOAD_OPTIONS_EVENT_ID:
                add(event, "kernel_command_line", "LOADED_IMAGE::LoadOptions (kernel EFI stub)")
            elif tag.tagged_event_id == LINUX_EFI_INITRD_EVENT_ID:
                add(event, "initrd", "Linux initrd (kernel EFI stub)")
        elif event.pcr == 9 and event.event_type == EV_IPL:
            text = _event_text(event.data)
            if text in kernel_paths or text == "grub_linuxefi Kernel":
                add(event, "kernel_file", text)
            elif text in initrd_paths or text == "grub_linuxefi Initrd":
                add(event, "initrd", text)
    return found
