"""Reference values for a measured boot, and the check of a TCG boot event log against them.

A reference-value set (``aicert-reference-values/v1`` JSON, written by the guest image build)
says what a good boot of one guest image measures into PCR 0-9:

- PCR 9, from the Linux EFI stub: the kernel command line as the firmware passed it
  (``LOADED_IMAGE::LoadOptions``: SHA-256 of the UTF-16LE string and its trailing NUL) and
  the initrd (``Linux initrd``: SHA-256 of the file). Both are computed from the build's
  outputs, so they are predicted, not observed.
- PCR 4, from the firmware: the kernel as ``EV_EFI_BOOT_SERVICES_APPLICATION``. Under qemu's
  direct kernel boot the firmware measures the kernel after qemu patched its setup header,
  so this digest is observed on a boot of the image (``kernel_pcr4_digest_source``).
- PCR 0-7 (firmware code and configuration) and PCR 8: observed on a boot of the image on
  the same virtual machine shape (qemu version, OVMF build, memory, CPUs), flagged
  ``observed``.

``check_boot_log`` replays the log against the quoted PCR 0-9 and then compares each
component, raising :class:`PlatformError` that names the first component that differs:
"kernel command line", "initrd", "kernel", "firmware (PCR n)".

Only the standard library, pydantic and this package: the verifier's dependency rule.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from aicert.errors import EventLogError, PlatformError
from aicert.quote import verify_quote
from aicert.tcg_eventlog import (
    LINUX_EFI_INITRD_EVENT_ID,
    LINUX_EFI_LOAD_OPTIONS_EVENT_ID,
    TcgEvent,
    TcgEventLog,
    decode_tagged_event,
    parse_event_log,
)

__all__ = [
    "BOOT_PCRS",
    "FIRMWARE_PCRS",
    "PLATFORM_QUOTE_CONTEXT",
    "REFERENCE_VALUES_FORMAT",
    "BootChainReport",
    "ReferenceValueSet",
    "VmShape",
    "check_boot_log",
    "load_options_digest",
    "load_reference_values",
    "platform_quote_nonce",
    "verify_platform_quote",
]

REFERENCE_VALUES_FORMAT = "aicert-reference-values/v1"
BOOT_PCRS = tuple(range(10))
FIRMWARE_PCRS = tuple(range(8))
MAX_REFERENCE_FILE_SIZE = 1024 * 1024
# The extraData of a platform quote (a quote asked before the workload, to check the boot
# chain) is SHA-256 over this context and the orchestrator's challenge: never equal to a run
# nonce, so a platform quote cannot stand in for a certificate's quote.
PLATFORM_QUOTE_CONTEXT = b"aicert/platform-quote/v1\x00"

EV_EVENT_TAG = 0x00000006
EV_NO_ACTION = 0x00000003
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003

Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
BootPcrIndex = Annotated[str, StringConstraints(pattern=r"^[0-9]$")]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VmShape(_Model):
    """The virtual machine the firmware values were observed on: the same image on another
    qemu, OVMF build, memory size or CPU count measures other PCR 0-7 values."""

    qemu_version: str
    machine: str
    cpu: str
    smp: int = Field(ge=1, le=256)
    memory_mib: int = Field(ge=128, le=1024 * 1024)
    ovmf_code_sha256: Sha256Hex
    ovmf_vars_sha256: Sha256Hex


class ReferenceValueSet(_Model):
    """What a good boot of one guest image measures into PCR 0-9."""

    format: Literal["aicert-reference-values/v1"] = REFERENCE_VALUES_FORMAT
    id: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,127}$")]
    platform: Literal["qemu"]
    kernel_sha256: Sha256Hex  # the kernel file (provenance: not itself what PCR 4 carries)
    kernel_pcr4_digest: Sha256Hex | None = None  # the kernel's EV_EFI_BOOT_SERVICES_APPLICATION
    kernel_pcr4_digest_source: Literal["observed", "authenticode"] | None = None
    initrd_sha256: Sha256Hex
    command_line: Annotated[str, Field(max_length=4096)]  # as given to the kernel loader
    load_options: Annotated[str, Field(max_length=4096)]  # as the firmware passes it
    load_options_sha256: Sha256Hex  # PCR 9 "LOADED_IMAGE::LoadOptions", from load_options
    observed: bool = False  # pcrs (and an observed kernel digest) come from a real boot
    pcrs: dict[BootPcrIndex, Sha256Hex] = Field(default_factory=dict)
    vm: VmShape | None = None
    build: dict[str, Any] = Field(default_factory=dict)  # provenance only, never checked

    @model_validator(mode="after")
    def _consistent(self) -> ReferenceValueSet:
        if self.load_options_sha256 != load_options_digest(self.load_options).hex():
            raise ValueError("load_options_sha256 is not the digest of load_options")
        if (self.kernel_pcr4_digest is None) != (self.kernel_pcr4_digest_source is None):
            raise ValueError("kernel_pcr4_digest and kernel_pcr4_digest_source go together")
        return self

    def pcr_values(self) -> dict[int, bytes]:
        return {int(index): bytes.fromhex(value) for index, value in self.pcrs.items()}


def load_options_digest(load_options: str) -> bytes:
    """The PCR 9 ``LOADED_IMAGE::LoadOptions`` digest: SHA-256 of the UTF-16LE string with
    its trailing NUL, as Linux's EFI stub measures the options the firmware passed."""
    return hashlib.sha256(load_options.encode("utf-16-le") + b"\x00\x00").digest()


def platform_quote_nonce(challenge: bytes) -> bytes:
    """The extraData of a platform quote over ``challenge`` (see PLATFORM_QUOTE_CONTEXT)."""
    return hashlib.sha256(PLATFORM_QUOTE_CONTEXT + bytes(challenge)).digest()


def load_reference_values(path: str | Path) -> ReferenceValueSet:
    """A reference-value set from its JSON file; malformed content is a PlatformError."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_REFERENCE_FILE_SIZE + 1)
    except OSError as exc:
        raise PlatformError(f"reference values {path}: cannot read: {exc.strerror}") from None
    if len(data) > MAX_REFERENCE_FILE_SIZE:
        raise PlatformError(f"reference values {path}: over {MAX_REFERENCE_FILE_SIZE} bytes")
    try:
        return ReferenceValueSet.model_validate(json.loads(data))
    except (ValueError, ValidationError) as exc:
        raise PlatformError(f"reference values {path}: invalid: {exc}") from None


@dataclass(frozen=True)
class BootChainReport:
    """What a boot event log was found to attest."""

    reference_id: str
    kernel_pcr4_digest: str
    initrd_sha256: str
    load_options_sha256: str
    events: int

    @property
    def note(self) -> str:
        return (
            f"boot chain matches reference values {self.reference_id}: firmware PCR 0-7, "
            f"kernel {self.kernel_pcr4_digest[:16]}..., initrd {self.initrd_sha256[:16]}..., "
            "kernel command line"
        )


def _sha256_digest(event: TcgEvent) -> bytes:
    digest = event.digests.get("sha256")
    if digest is None:  # the parser guarantees one digest per bank; the bank is checked first
        raise EventLogError(f"event #{event.index}: no SHA-256 digest")
    return digest


def _replay_against_quote(log: TcgEventLog, quoted_pcrs: Mapping[int, bytes]) -> None:
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


def _check_pcr9(log: TcgEventLog, reference: ReferenceValueSet) -> None:
    load_options: list[bytes] = []
    initrds: list[bytes] = []
    for event in log.events:
        if event.pcr != 9 or event.event_type == EV_NO_ACTION:
            continue
        tag = decode_tagged_event(event.data) if event.event_type == EV_EVENT_TAG else None
        if tag is not None and tag.tagged_event_id == LINUX_EFI_LOAD_OPTIONS_EVENT_ID:
            load_options.append(_sha256_digest(event))
        elif tag is not None and tag.tagged_event_id == LINUX_EFI_INITRD_EVENT_ID:
            initrds.append(_sha256_digest(event))
        else:
            raise PlatformError(
                f"kernel measurements (PCR 9): unexpected {event.event_type_name} event "
                f"#{event.index}: a boot of the reference image logs only the command line "
                "and the initrd there"
            )
    expected_options = bytes.fromhex(reference.load_options_sha256)
    if len(load_options) != 1:
        raise PlatformError(
            f"kernel command line: {len(load_options)} LOADED_IMAGE::LoadOptions events in "
            "PCR 9, expected exactly 1"
        )
    if not hmac.compare_digest(load_options[0], expected_options):
        raise PlatformError(
            f"kernel command line: measured digest {load_options[0].hex()} differs from the "
            f"reference {expected_options.hex()} ({reference.load_options!r})"
        )
    expected_initrd = bytes.fromhex(reference.initrd_sha256)
    if len(initrds) != 1:
        raise PlatformError(
            f"initrd: {len(initrds)} 'Linux initrd' events in PCR 9, expected exactly 1"
        )
    if not hmac.compare_digest(initrds[0], expected_initrd):
        raise PlatformError(
            f"initrd: measured SHA-256 {initrds[0].hex()} differs from the reference "
            f"{reference.initrd_sha256}"
        )


def _check_kernel(log: TcgEventLog, reference: ReferenceValueSet) -> bytes:
    if reference.kernel_pcr4_digest is None:
        raise PlatformError(
            f"kernel: reference values {reference.id} have no PCR 4 kernel digest "
            "(boot the image once to observe it)"
        )
    applications = [
        event
        for event in log.events
        if event.pcr == 4 and event.event_type == EV_EFI_BOOT_SERVICES_APPLICATION
    ]
    if len(applications) != 1:
        raise PlatformError(
            f"kernel: {len(applications)} boot applications measured in PCR 4, "
            "expected exactly the kernel"
        )
    measured = _sha256_digest(applications[0])
    if not hmac.compare_digest(measured, bytes.fromhex(reference.kernel_pcr4_digest)):
        raise PlatformError(
            f"kernel: measured digest {measured.hex()} differs from the reference "
            f"{reference.kernel_pcr4_digest} ({reference.kernel_pcr4_digest_source})"
        )
    return measured


def _pcr_component(index: int) -> str:
    if index in FIRMWARE_PCRS:
        return f"firmware (PCR {index})"
    if index == 8:
        return "boot loader (PCR 8)"
    return "kernel measurements (PCR 9)"


def check_boot_log(
    log: TcgEventLog, quoted_pcrs: Mapping[int, bytes], reference: ReferenceValueSet
) -> BootChainReport:
    """Check a boot event log against quoted PCR 0-9 and a reference-value set.

    The log must replay to the quoted PCR 0-9 (else EventLogError); then the command line,
    the initrd, the kernel and the firmware PCRs must equal the reference (else PlatformError
    naming that component). The quote itself is the caller's check (``verify_quote``).
    """
    _replay_against_quote(log, quoted_pcrs)
    if not reference.observed or set(reference.pcrs) != {str(i) for i in BOOT_PCRS}:
        raise PlatformError(
            f"firmware: reference values {reference.id} hold no observed PCR 0-9 values "
            "(boot the image once to observe them)"
        )
    # Components first, so that the error names what changed rather than the PCR it lands in.
    _check_pcr9(log, reference)
    kernel = _check_kernel(log, reference)
    expected = reference.pcr_values()
    for index in BOOT_PCRS:
        if not hmac.compare_digest(bytes(quoted_pcrs[index]), expected[index]):
            raise PlatformError(
                f"{_pcr_component(index)}: quoted {bytes(quoted_pcrs[index]).hex()}, the "
                f"reference values {reference.id} observed {expected[index].hex()}"
            )
    return BootChainReport(
        reference_id=reference.id,
        kernel_pcr4_digest=kernel.hex(),
        initrd_sha256=reference.initrd_sha256,
        load_options_sha256=reference.load_options_sha256,
        events=len(log.events),
    )


def verify_platform_quote(
    *,
    attest: bytes,
    signature: bytes,
    ak_public: bytes,
    challenge: bytes,
    pcrs: Mapping[int, bytes],
    boot_event_log: bytes | None,
    reference: ReferenceValueSet,
) -> BootChainReport:
    """Check a platform quote (asked with ``challenge`` before the workload) and its boot
    event log against ``reference``. The caller has already established that ``ak_public``
    is the machine's certified AK."""
    verify_quote(attest, signature, ak_public, platform_quote_nonce(challenge), pcrs)
    if boot_event_log is None:
        raise PlatformError(f"{reference.platform} platform: the machine sent no boot event log")
    return check_boot_log(parse_event_log(boot_event_log), pcrs, reference)
