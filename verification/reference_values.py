"""Reference values for a measured boot, and the check of a TCG boot event log against them.

A reference-value set (``aicert-reference-values/v1`` JSON, published with a guest image) says
what a good boot of one guest image measures into PCR 0-9. Its ``platform`` field says which
kind it is; :func:`load_reference_values` returns either.

``platform: "qemu"`` (:class:`ReferenceValueSet`, written by the qemu guest image build):

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

``platform: "azure"`` (:class:`AzureReferenceValueSet`, derived by the image publisher from
the first boot of a VM made from the gallery image version, see
``deployments/azure/README.md``): a Trusted Launch VM boots Microsoft's Hyper-V UEFI, then
shim, GRUB and the kernel from the image's disk, with Secure Boot on.

- Each checked PCR has a list of accepted SHA-256 values; every PCR 0-9 is either checked or
  listed in ``unchecked_pcrs`` with the reason, so none is ever skipped silently. PCR 4 (boot
  applications), 7 (Secure Boot policy), 8 (GRUB commands, kernel command line) and 9 (files
  GRUB read, kernel EFI stub) belong to the image and must be checked; PCR 0-3, 5 and 6 hold
  Microsoft's firmware and the VM's virtual hardware and disk, which change without the image
  changing.
- ``events``: the measured components of the checked PCRs (shim, GRUB and kernel
  Authenticode digests in PCR 4, Secure Boot variables and authorities in PCR 7, kernel
  command line in PCR 8/9, kernel and initrd files in PCR 9), each with its accepted
  digests, so that a mismatch names the component rather than only the PCR it lands in.

Both kinds list ``mok_events``: the only events a boot log may carry outside PCR 0-9 (shim's
``EV_IPL`` MokList / MokListX / MokListTrusted measurements into PCR 14, where the application's
replay starts), with their accepted digests; a qemu direct kernel boot has none.

``check_boot_log`` replays the log against the quoted PCR 0-9, refuses anything outside PCR 0-9
that the set does not list (:func:`check_events_outside_boot_pcrs`), and then compares each
component, raising :class:`PlatformError` that names the first component that differs:
"kernel command line", "initrd", "kernel", "boot loader (...)", "Secure Boot policy (PCR 7)",
"firmware (PCR n)".

``aicert-reference-values derive-azure ...`` derives an Azure set from a boot's event
log and PCR values, ``merge-azure`` joins sets observed on several VMs, and ``check`` judges a
log against a set (``--help`` of each).

Only the standard library, pydantic, cryptography and this package: the verifier's
dependency rule.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import hmac
import json
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, overload

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from aicert.appevents import (
    INPUTS_PCR,
    ShimMokVariable,
    check_application_pcrs_in_boot_log,
)
from aicert.chain import (
    PINNED_ROOT_FINGERPRINTS,
    leaf_public_key_matches,
    load_pem_certificates,
    verify_ak_chain,
)
from aicert.errors import AkMismatchError, EventLogError, PlatformError, VerificationError
from aicert.quote import public_key_from_ak, verify_quote
from aicert.tcg_eventlog import (
    EFI_GLOBAL_VARIABLE_GUID,
    LINUX_EFI_INITRD_EVENT_ID,
    LINUX_EFI_LOAD_OPTIONS_EVENT_ID,
    TcgEvent,
    TcgEventLog,
    decode_efi_variable,
    decode_image_load_event,
    decode_tagged_event,
    parse_event_log,
)

__all__ = [
    "AZURE_IMAGE_PCRS",
    "BOOT_PCRS",
    "DEFAULT_AZURE_UNCHECKED_REASONS",
    "FIRMWARE_PCRS",
    "PLATFORM_QUOTE_CONTEXT",
    "REFERENCE_VALUES_FORMAT",
    "REFERENCE_VALUES_SCHEMA_RESOURCE",
    "REFERENCE_VALUE_SET_TYPES",
    "AzureBootChainReport",
    "AzureImage",
    "AzureReferenceValueSet",
    "BootChainReport",
    "ExpectedEvent",
    "MeasuredEvent",
    "MokListEvent",
    "PlatformReferenceValues",
    "QemuReferenceValueSet",
    "ReferenceValueSet",
    "VmShape",
    "check_azure_boot_log",
    "check_boot_log",
    "check_events_outside_boot_pcrs",
    "classify_boot_events",
    "derive_azure_reference_values",
    "load_options_digest",
    "load_reference_values",
    "merge_azure_reference_values",
    "parse_pcr_values",
    "parse_reference_values",
    "platform_quote_nonce",
    "reference_values_json_schema",
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
EV_IPL = 0x0000000D
EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
EV_EFI_VARIABLE_AUTHORITY = 0x800000E0

Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
BootPcrIndex = Annotated[str, StringConstraints(pattern=r"^[0-9]$")]
ReferenceId = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,127}$")]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


AcceptedDigests = Annotated[list[Sha256Hex], Field(min_length=1, max_length=64)]


def _no_repeats(values: Sequence[str], where: str) -> None:
    if len(set(values)) != len(values):
        raise ValueError(f"{where}: a value is listed twice")


class MokListEvent(_Model):
    """An event a boot may log outside PCR 0-9: shim's ``EV_IPL`` measurement of one of its
    MOK lists into PCR 14 (event data: the variable's name and a NUL; digest: over the
    list's content, which the log does not carry), with the SHA-256 digests accepted.

    A reference-value set lists, in log order, every event a good boot logs outside PCR 0-9;
    the boot log of a certificate must carry exactly those (see
    :func:`check_events_outside_boot_pcrs`). PCR 14 is where the application's replay starts,
    so these digests decide that start: nothing else may be listed."""

    pcr: Literal[14] = 14
    variable: ShimMokVariable
    sha256: AcceptedDigests

    @model_validator(mode="after")
    def _consistent(self) -> MokListEvent:
        _no_repeats(self.sha256, f"mok_events {self.variable}")
        return self


MokEvents = Annotated[list[MokListEvent], Field(max_length=3)]


def _one_of_each_variable(events: Sequence[MokListEvent]) -> None:
    names = [event.variable for event in events]
    if len(set(names)) != len(names):
        raise ValueError(
            f"mok_events: a MOK list is listed twice ({names}); shim measures each once"
        )


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
    # The only events the boot log may carry outside PCR 0-9: none under qemu's direct kernel
    # boot (no shim); listed when an image boots through shim.
    mok_events: MokEvents = Field(default_factory=list)
    vm: VmShape | None = None
    build: dict[str, Any] = Field(default_factory=dict)  # provenance only, never checked

    @model_validator(mode="after")
    def _consistent(self) -> ReferenceValueSet:
        _one_of_each_variable(self.mok_events)
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


# --- Azure -----------------------------------------------------------------------------------

# The PCRs that belong to the image (boot applications, Secure Boot policy, GRUB's commands and
# the files it read): an Azure set must check them. The others hold Microsoft's firmware and
# the VM's virtual hardware and disk; a set checks them with every value observed, or lists
# them as unchecked with the reason.
AZURE_IMAGE_PCRS = (4, 7, 8, 9)
DEFAULT_AZURE_UNCHECKED_REASONS: dict[int, str] = {
    0: "firmware code and S-CRTM version of Microsoft's Hyper-V UEFI: changes when Azure "
    "updates the host firmware, not with the image",
    1: "firmware configuration and boot variables: depend on the VM size, its virtual "
    "hardware and the firmware version, not on the image",
    2: "UEFI drivers and option ROMs of the VM's virtual hardware: set by Azure",
    3: "configuration of those drivers: set by Azure",
    5: "GPT partition table and boot-manager events: the table follows the OS disk size and "
    "the first boot's partition growth",
    6: "host platform events: set by Azure's firmware",
}
SECURE_BOOT_COMPONENT = "Secure Boot policy (PCR 7)"
# Media file path device-path node (UEFI spec, "Media Device Path"): type 4, subtype 4.
_DEVICE_PATH_MEDIA, _DEVICE_PATH_FILE, _DEVICE_PATH_END = 0x04, 0x04, 0x7F
# Resource ids come back from Azure with either case in the fixed segments; the pattern spells
# both instead of using (?i), which JSON Schema's ECMA-262 regexes do not have.
GALLERY_IMAGE_VERSION_ID_PATTERN = (
    r"^(/[Ss]ubscriptions/[^/]+/[Rr]esource[Gg]roups/[^/]+/[Pp]roviders/"
    r"[Mm]icrosoft\.[Cc]ompute/[Gg]alleries/[^/]+|/[Cc]ommunity[Gg]alleries/[^/]+"
    r"|/[Ss]hared[Gg]alleries/[^/]+)/[Ii]mages/[^/]+/[Vv]ersions/[^/]+$"
)

EventKind = Literal[
    "boot_application",
    "secure_boot_variable",
    "secure_boot_authority",
    "kernel_command_line",
    "kernel_file",
    "initrd",
]
# Where each kind of component event is measured, the order the check visits them in, and the
# name an error uses when the reference lists none of that kind.
_KIND_PCRS: dict[str, frozenset[int]] = {
    "boot_application": frozenset({4}),
    "secure_boot_variable": frozenset({7}),
    "secure_boot_authority": frozenset({7}),
    "kernel_command_line": frozenset({8, 9}),
    "kernel_file": frozenset({9}),
    "initrd": frozenset({9}),
}
_KIND_ORDER = {kind: rank for rank, kind in enumerate(_KIND_PCRS)}
_KIND_COMPONENT = {
    "boot_application": "boot applications (PCR 4)",
    "secure_boot_variable": SECURE_BOOT_COMPONENT,
    "secure_boot_authority": SECURE_BOOT_COMPONENT,
    "kernel_command_line": "kernel command line",
    "kernel_file": "kernel",
    "initrd": "initrd",
}
_KIND_WHAT = {
    "boot_application": "boot applications (EV_EFI_BOOT_SERVICES_APPLICATION)",
    "secure_boot_variable": "Secure Boot variables (EV_EFI_VARIABLE_DRIVER_CONFIG)",
    "secure_boot_authority": "Secure Boot authorities (EV_EFI_VARIABLE_AUTHORITY)",
    "kernel_command_line": "kernel command line events",
    "kernel_file": "kernel file events",
    "initrd": "initrd events",
}
_AZURE_PCR_COMPONENTS = {
    4: "boot applications (PCR 4)",
    7: SECURE_BOOT_COMPONENT,
    8: "boot loader (PCR 8: GRUB commands and kernel command line)",
    9: "boot loader (PCR 9: files GRUB read, kernel EFI stub)",
}


class ExpectedEvent(_Model):
    """One measured component of a checked PCR: the event the reference boot logged there,
    and the digests accepted for it. ``component`` is the name an error uses; events of one
    ``kind`` in one PCR are compared in log order."""

    pcr: int = Field(ge=0, le=9)
    kind: EventKind
    component: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    description: Annotated[str, Field(max_length=4096)] = ""  # informational: path, name, text
    sha256: AcceptedDigests

    @model_validator(mode="after")
    def _consistent(self) -> ExpectedEvent:
        if self.pcr not in _KIND_PCRS[self.kind]:
            raise ValueError(f"{self.kind} events are not measured in PCR {self.pcr}")
        _no_repeats(self.sha256, f"{self.component} ({self.description})")
        return self


class AzureImage(_Model):
    """The Azure Compute Gallery image version the reference values belong to."""

    gallery_image_version_id: Annotated[
        str, StringConstraints(pattern=GALLERY_IMAGE_VERSION_ID_PATTERN, max_length=1024)
    ]
    security_type: Literal["TrustedLaunch", "ConfidentialVM"] = "TrustedLaunch"


class AzureReferenceValueSet(_Model):
    """What a good boot of one Azure gallery image version measures into PCR 0-9."""

    format: Literal["aicert-reference-values/v1"] = REFERENCE_VALUES_FORMAT
    id: ReferenceId
    platform: Literal["azure"]
    image: AzureImage
    pcrs: dict[BootPcrIndex, AcceptedDigests]  # checked PCR -> accepted values
    unchecked_pcrs: dict[
        BootPcrIndex, Annotated[str, StringConstraints(min_length=1, max_length=1024)]
    ] = Field(default_factory=dict)  # PCR -> why it is not checked
    events: Annotated[list[ExpectedEvent], Field(max_length=4096)] = Field(default_factory=list)
    # The only events the boot log may carry outside PCR 0-9: shim's MOK lists in PCR 14.
    mok_events: MokEvents = Field(default_factory=list)
    provenance: dict[str, Any] = Field(default_factory=dict)  # how it was derived; never checked

    @model_validator(mode="after")
    def _consistent(self) -> AzureReferenceValueSet:
        _one_of_each_variable(self.mok_events)
        checked = {int(index) for index in self.pcrs}
        unchecked = {int(index) for index in self.unchecked_pcrs}
        if both := sorted(checked & unchecked):
            raise ValueError(f"PCR {both} both checked (pcrs) and unchecked (unchecked_pcrs)")
        if missing := sorted(set(BOOT_PCRS) - checked - unchecked):
            raise ValueError(
                f"PCR {missing} neither checked (pcrs) nor in unchecked_pcrs with a reason: "
                "no boot PCR is left out silently"
            )
        for index in AZURE_IMAGE_PCRS:
            if index not in checked:
                raise ValueError(
                    f"PCR {index} ({_AZURE_PCR_COMPONENTS[index]}) must be checked: it holds "
                    "the image's own boot chain"
                )
        for index, reason in self.unchecked_pcrs.items():
            if not reason.strip():
                raise ValueError(f"unchecked_pcrs[{index}]: the reason is empty")
        for index, values in self.pcrs.items():
            _no_repeats(values, f"pcrs[{index}]")
        return self

    def checked_pcrs(self) -> tuple[int, ...]:
        return tuple(sorted(int(index) for index in self.pcrs))

    def accepted_pcr_values(self) -> dict[int, tuple[bytes, ...]]:
        return {
            int(index): tuple(bytes.fromhex(value) for value in values)
            for index, values in self.pcrs.items()
        }


QemuReferenceValueSet = ReferenceValueSet
PlatformReferenceValues = ReferenceValueSet | AzureReferenceValueSet
REFERENCE_VALUE_SET_TYPES = (ReferenceValueSet, AzureReferenceValueSet)
_REFERENCE_VALUES: TypeAdapter[PlatformReferenceValues] = TypeAdapter(
    Annotated[PlatformReferenceValues, Field(discriminator="platform")]
)


REFERENCE_VALUES_SCHEMA_RESOURCE = "schemas/aicert-reference-values-v1.schema.json"


def reference_values_json_schema() -> dict[str, Any]:
    """The JSON Schema of a reference-value set of either platform (published as
    ``schemas/aicert-reference-values-v1.schema.json``; a test keeps it in step)."""
    schema: dict[str, Any] = _REFERENCE_VALUES.json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "AICert boot reference-value set (aicert-reference-values/v1)"
    return schema


def parse_reference_values(
    data: bytes | str, source: str = "reference values"
) -> PlatformReferenceValues:
    """A reference-value set of either platform from its JSON; malformed content, or a set for
    an unknown platform, is a PlatformError naming ``source``."""
    if len(data) > MAX_REFERENCE_FILE_SIZE:
        raise PlatformError(f"{source}: over {MAX_REFERENCE_FILE_SIZE} bytes")
    try:
        return _REFERENCE_VALUES.validate_python(json.loads(data))
    except (ValueError, ValidationError) as exc:
        raise PlatformError(f"{source}: invalid: {exc}") from None


@overload
def load_reference_values(path: str | Path, platform: Literal["qemu"]) -> ReferenceValueSet: ...
@overload
def load_reference_values(
    path: str | Path, platform: Literal["azure"]
) -> AzureReferenceValueSet: ...
@overload
def load_reference_values(path: str | Path, platform: None = None) -> PlatformReferenceValues: ...
def load_reference_values(
    path: str | Path, platform: Literal["qemu", "azure"] | None = None
) -> PlatformReferenceValues:
    """A reference-value set from its JSON file, of the kind its ``platform`` field names;
    malformed content is a PlatformError. With ``platform``, a set for another platform is
    a PlatformError too."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_REFERENCE_FILE_SIZE + 1)
    except OSError as exc:
        raise PlatformError(f"reference values {path}: cannot read: {exc.strerror}") from None
    reference = parse_reference_values(data, f"reference values {path}")
    if platform is not None and reference.platform != platform:
        raise PlatformError(
            f"reference values {path}: set {reference.id!r} is for platform "
            f"{reference.platform!r}, not {platform!r}"
        )
    return reference


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


def _describe_boot_event(event: TcgEvent) -> str:
    data = event.data.rstrip(b"\x00")
    shown = (
        data.decode("ascii") if data.isascii() and data.isalnum() else f"{len(event.data)} bytes"
    )
    return f"boot event log: PCR {event.pcr} event #{event.index} ({event.event_type_name} {shown})"


def check_events_outside_boot_pcrs(log: TcgEventLog, reference: PlatformReferenceValues) -> None:
    """The boot log carries, outside PCR 0-9, exactly the events ``reference.mok_events``
    lists, in that order, each with an accepted SHA-256 digest.

    Every event counts, ``EV_NO_ACTION`` included, in any PCR from 10 up (PCR 16-23 are not
    quoted and PCR 10-13 are not replayed, so nothing else would ever judge them); an event
    the set does not list, one whose digest it does not accept, or one it lists that the log
    lacks is a ``PlatformError`` naming the PCR and the event index: the boot is not the
    reference boot. Only the SHA-256 digest is judged: it is the bank the quote covers, and
    the other banks' digests cannot be recomputed from the log (shim logs the name of a MOK
    list, not its content). Before that, anything in PCR 14/15 that is not shim's is an
    ``EventLogError`` (``check_application_pcrs_in_boot_log``): the application event log is
    the only source of application events, whatever a set lists.
    """
    check_application_pcrs_in_boot_log(log)
    allowed = list(reference.mok_events)
    outside = [event for event in log.events if event.pcr not in BOOT_PCRS]
    for position, event in enumerate(outside):
        where = _describe_boot_event(event)
        if position >= len(allowed):
            listed = ", ".join(f"PCR {e.pcr} {e.variable}" for e in allowed) or "nothing"
            raise PlatformError(
                f"{where}: reference values {reference.id} list {listed} outside PCR 0-9, "
                "and this event is not one of them"
            )
        want = allowed[position]
        expected_data = want.variable.encode("ascii") + b"\x00"
        if event.pcr != want.pcr or event.event_type != EV_IPL or event.data != expected_data:
            raise PlatformError(
                f"{where}: reference values {reference.id} expect shim's EV_IPL "
                f"{want.variable} in PCR {want.pcr} here"
            )
        digest = _sha256_digest(event).hex()
        if digest not in want.sha256:
            raise PlatformError(
                f"{where}: measured {digest}, not one of the {len(want.sha256)} digest(s) "
                f"reference values {reference.id} accept for {want.variable} "
                f"({', '.join(want.sha256)})"
            )
    if len(outside) < len(allowed):
        missing = ", ".join(e.variable for e in allowed[len(outside) :])
        raise PlatformError(
            f"boot event log: PCR {allowed[len(outside)].pcr}: shim's {missing} measurement(s), "
            f"which reference "
            f"values {reference.id} list, are not in the log"
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


def _check_qemu_boot_log(
    log: TcgEventLog, quoted_pcrs: Mapping[int, bytes], reference: ReferenceValueSet
) -> BootChainReport:
    """Check a boot event log against quoted PCR 0-9 and a reference-value set.

    The log must replay to the quoted PCR 0-9 (else EventLogError); then the command line,
    the initrd, the kernel and the firmware PCRs must equal the reference (else PlatformError
    naming that component). The quote itself is the caller's check (``verify_quote``).
    """
    _replay_against_quote(log, quoted_pcrs)
    check_events_outside_boot_pcrs(log, reference)
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
        found.append(
            MeasuredEvent(event.index, event.pcr, kind, description, _sha256_digest(event))
        )

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


@dataclass(frozen=True)
class AzureBootChainReport:
    """What a boot event log was found to attest against an Azure reference-value set."""

    reference_id: str
    image_version_id: str
    checked_pcrs: tuple[int, ...]
    unchecked_pcrs: tuple[tuple[int, str], ...]
    components: tuple[str, ...]
    events: int

    @property
    def note(self) -> str:
        checked = ", ".join(str(index) for index in self.checked_pcrs)
        text = (
            f"boot chain matches Azure reference values {self.reference_id} (image "
            f"{self.image_version_id}): PCR {checked} checked"
        )
        if self.components:
            text += f" ({', '.join(self.components)})"
        if self.unchecked_pcrs:
            text += "; NOT checked: " + "; ".join(
                f"PCR {index} ({reason})" for index, reason in self.unchecked_pcrs
            )
        return text


def _group(
    events: Iterable[ExpectedEvent | MeasuredEvent],
) -> dict[tuple[int, str], list[Any]]:
    groups: dict[tuple[int, str], list[Any]] = {}
    for event in events:
        groups.setdefault((event.pcr, event.kind), []).append(event)
    return groups


def _check_azure_components(
    measured: Sequence[MeasuredEvent], reference: AzureReferenceValueSet
) -> None:
    expected_groups = _group(reference.events)
    measured_groups = _group(measured)
    for key in sorted(
        set(expected_groups) | set(measured_groups),
        key=lambda key: (key[0], _KIND_ORDER[key[1]]),
    ):
        pcr, kind = key
        expected: list[ExpectedEvent] = expected_groups.get(key, [])
        found: list[MeasuredEvent] = measured_groups.get(key, [])
        if len(expected) != len(found):
            names = list(dict.fromkeys(event.component for event in expected))
            component = names[0] if len(names) == 1 else _KIND_COMPONENT[kind]
            listed = ", ".join(event.component for event in expected) or "none"
            logged = ", ".join(f"#{event.index} {event.description}".strip() for event in found)
            raise PlatformError(
                f"{component}: the log has {len(found)} {_KIND_WHAT[kind]} in PCR {pcr} "
                f"({logged or 'none'}), reference values {reference.id} list "
                f"{len(expected)} ({listed})"
            )
        for want, got in zip(expected, found, strict=True):
            if got.digest.hex() not in want.sha256:
                named = f"{want.description}: " if want.description else ""
                logged = (
                    f" (the log describes it as {got.description!r})"
                    if got.description != want.description
                    else ""
                )
                raise PlatformError(
                    f"{want.component}: {named}event #{got.index} in PCR {pcr} measured "
                    f"{got.digest.hex()}{logged}, not one of the {len(want.sha256)} digest(s) "
                    f"reference values {reference.id} accept ({', '.join(want.sha256)})"
                )


def _azure_pcr_component(index: int) -> str:
    return _AZURE_PCR_COMPONENTS.get(index, f"firmware (PCR {index})")


def check_azure_boot_log(
    log: TcgEventLog, quoted_pcrs: Mapping[int, bytes], reference: AzureReferenceValueSet
) -> AzureBootChainReport:
    """Check an Azure VM's boot event log against quoted PCR 0-9 and an Azure set.

    The log must replay to the quoted PCR 0-9 (else EventLogError). Then the component events
    of the checked PCRs must be those the reference lists, in number and order, each with an
    accepted digest, and every checked PCR must hold one of its accepted values (else
    PlatformError naming the component, or the PCR). PCRs in ``unchecked_pcrs`` are not
    compared, and the report's note lists them with the reasons.
    """
    _replay_against_quote(log, quoted_pcrs)
    check_events_outside_boot_pcrs(log, reference)
    checked = reference.checked_pcrs()
    measured = [event for event in classify_boot_events(log) if event.pcr in checked]
    # Components first, so that the error names what changed rather than the PCR it lands in.
    _check_azure_components(measured, reference)
    accepted = reference.accepted_pcr_values()
    for index in checked:
        quoted = bytes(quoted_pcrs[index])
        if not any(hmac.compare_digest(quoted, value) for value in accepted[index]):
            raise PlatformError(
                f"{_azure_pcr_component(index)}: quoted PCR {index} {quoted.hex()} is not one "
                f"of the {len(accepted[index])} value(s) reference values {reference.id} accept"
            )
    return AzureBootChainReport(
        reference_id=reference.id,
        image_version_id=reference.image.gallery_image_version_id,
        checked_pcrs=checked,
        unchecked_pcrs=tuple(
            (int(index), reason) for index, reason in sorted(reference.unchecked_pcrs.items())
        ),
        components=tuple(dict.fromkeys(event.component for event in reference.events)),
        events=len(log.events),
    )


# --- Producing Azure reference values (the image publisher's side) ---------------------------


def _require_secure_boot(log: TcgEventLog) -> None:
    for event in log.events:
        if event.pcr != 7 or event.event_type != EV_EFI_VARIABLE_DRIVER_CONFIG:
            continue
        try:
            variable = decode_efi_variable(event.data)
        except EventLogError:
            continue
        if variable.variable_name == EFI_GLOBAL_VARIABLE_GUID and variable.unicode_name == (
            "SecureBoot"
        ):
            if variable.variable_data != b"\x01":
                raise PlatformError(
                    f"{SECURE_BOOT_COMPONENT}: Secure Boot is off in this boot (SecureBoot = "
                    f"{variable.variable_data.hex() or 'empty'}, event #{event.index}): derive "
                    "reference values from a Trusted Launch VM with Secure Boot on"
                )
            return
    raise PlatformError(
        f"{SECURE_BOOT_COMPONENT}: the log measures no SecureBoot variable: not a UEFI "
        "Secure Boot boot"
    )


def _boot_application_name(path: str, position: int, count: int) -> str:
    name = path.rsplit("\\", 1)[-1].lower()
    if name.startswith("shim"):
        return "boot loader (shim)"
    if name.startswith("grub"):
        return "boot loader (GRUB)"
    # GRUB hands the kernel to the firmware from memory: no file path, and the last one.
    if position == count - 1 and position > 0 and (not path or "vmlinu" in name):
        return "kernel"
    return f"boot application ({path or 'no file path'})"


def _reference_mok_events(log: TcgEventLog) -> list[MokListEvent]:
    """Shim's MOK-list events of a reference boot, with their digests: what its set lets a
    boot log carry outside PCR 0-9. Anything else there is refused (EventLogError in PCR 14
    and 15, PlatformError elsewhere): a certificate's boot log could not carry it either."""
    check_application_pcrs_in_boot_log(log)
    events: list[MokListEvent] = []
    for event in log.events:
        if event.pcr in BOOT_PCRS:
            continue
        if event.pcr != INPUTS_PCR:
            raise PlatformError(
                f"{_describe_boot_event(event)}: a reference boot may log nothing outside PCR "
                "0-9 but shim's MOK lists in PCR 14"
            )
        variable = event.data.rstrip(b"\x00").decode("ascii")
        events.append(
            MokListEvent.model_validate(
                {"variable": variable, "sha256": [_sha256_digest(event).hex()]}
            )
        )
    return events


def _default_reference_id(image_version_id: str) -> str:
    parts = image_version_id.strip("/").split("/")
    words = [parts[-3], parts[-1]] if len(parts) >= 4 else parts[-1:]
    slug = re.sub(r"[^a-z0-9._-]+", "-", "-".join(words).lower()).strip("-._")
    return slug[:128] or "azure-image"


def derive_azure_reference_values(
    event_log: bytes | TcgEventLog,
    quoted_pcrs: Mapping[int, bytes],
    *,
    image_version_id: str,
    reference_id: str | None = None,
    security_type: Literal["TrustedLaunch", "ConfidentialVM"] = "TrustedLaunch",
    check_firmware_pcrs: Iterable[int] = (),
    provenance: Mapping[str, Any] | None = None,
) -> AzureReferenceValueSet:
    """The Azure reference-value set of one boot: what the image publisher runs on the event
    log and PCR 0-9 of a VM made from the new gallery image version.

    The log must replay to ``quoted_pcrs`` (else EventLogError) and show Secure Boot on (else
    PlatformError). PCR 4, 7, 8 and 9 are checked with their values in this boot, and each
    component event in them becomes an expected event; firmware PCRs in
    ``check_firmware_pcrs`` are checked with this boot's value, the others are listed as
    unchecked with the reasons of ``DEFAULT_AZURE_UNCHECKED_REASONS``. Join the sets of several
    VMs with :func:`merge_azure_reference_values` to accept each value they measured.
    """
    raw = event_log if isinstance(event_log, bytes | bytearray) else None
    log = parse_event_log(bytes(raw)) if raw is not None else event_log
    if not isinstance(log, TcgEventLog):
        raise TypeError(f"event_log must be bytes or a TcgEventLog, not {type(log).__name__}")
    _replay_against_quote(log, quoted_pcrs)
    _require_secure_boot(log)
    mok_events = _reference_mok_events(log)
    firmware = sorted(set(check_firmware_pcrs))
    if not set(firmware) <= set(DEFAULT_AZURE_UNCHECKED_REASONS):
        raise ValueError(
            f"check_firmware_pcrs: {firmware} are not all firmware PCRs "
            f"{sorted(DEFAULT_AZURE_UNCHECKED_REASONS)} (PCR 4, 7, 8, 9 are always checked)"
        )
    checked = sorted({*AZURE_IMAGE_PCRS, *firmware})
    measured = [event for event in classify_boot_events(log) if event.pcr in checked]
    applications = [event for event in measured if event.kind == "boot_application"]
    expected: list[ExpectedEvent] = []
    for event in measured:
        if event.kind == "boot_application":
            position = applications.index(event)
            component = _boot_application_name(event.description, position, len(applications))
        else:
            component = _KIND_COMPONENT[event.kind]
        expected.append(
            ExpectedEvent(
                pcr=event.pcr,
                kind=event.kind,
                component=component,
                description=event.description[:4096],
                sha256=[event.digest.hex()],
            )
        )
    derived: dict[str, Any] = {
        "derived_by": "aicert.reference_values derive-azure",
        "derived_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "boots": 1,
        "events": len(log.events),
    }
    if raw is not None:
        derived["event_log_sha256"] = hashlib.sha256(raw).hexdigest()
    return AzureReferenceValueSet(
        id=reference_id or _default_reference_id(image_version_id),
        platform="azure",
        image=AzureImage(gallery_image_version_id=image_version_id, security_type=security_type),
        pcrs={str(index): [bytes(quoted_pcrs[index]).hex()] for index in checked},
        unchecked_pcrs={
            str(index): reason
            for index, reason in DEFAULT_AZURE_UNCHECKED_REASONS.items()
            if index not in checked
        },
        events=expected,
        mok_events=mok_events,
        provenance={**derived, **dict(provenance or {})},
    )


def _union(lists: Iterable[Sequence[str]]) -> list[str]:
    return list(dict.fromkeys(value for values in lists for value in values))


def merge_azure_reference_values(
    sets: Sequence[AzureReferenceValueSet],
) -> AzureReferenceValueSet:
    """One set accepting every value the given sets (boots of the same image version on
    several VMs, sizes, regions or dates) accept. They must be for the same id and image, check
    the same PCRs and list the same components (else PlatformError: a boot that measured other
    components is not the same boot chain, and its set must be reviewed, not merged)."""
    if not sets:
        raise ValueError("no reference-value sets to merge")
    first = sets[0]

    def shape(reference: AzureReferenceValueSet) -> list[tuple[int, str, str]]:
        return [(event.pcr, event.kind, event.component) for event in reference.events]

    def mok_shape(reference: AzureReferenceValueSet) -> list[str]:
        return [event.variable for event in reference.mok_events]

    for other in sets[1:]:
        for what, mine, theirs in (
            ("id", first.id, other.id),
            ("image", first.image, other.image),
            ("checked PCRs", first.checked_pcrs(), other.checked_pcrs()),
            ("components", shape(first), shape(other)),
            ("MOK lists", mok_shape(first), mok_shape(other)),
        ):
            if mine != theirs:
                raise PlatformError(
                    f"reference values {first.id}: cannot merge sets with different {what} "
                    f"({mine} vs {theirs})"
                )
    events = [
        event.model_copy(update={"sha256": _union(same.sha256 for same in group)})
        for event, *rest in zip(*(reference.events for reference in sets), strict=True)
        for group in [[event, *rest]]
    ]
    return AzureReferenceValueSet(
        id=first.id,
        platform="azure",
        image=first.image,
        pcrs={index: _union(reference.pcrs[index] for reference in sets) for index in first.pcrs},
        unchecked_pcrs=dict(first.unchecked_pcrs),
        events=events,
        mok_events=[
            event.model_copy(update={"sha256": _union(same.sha256 for same in group)})
            for event, *rest in zip(*(reference.mok_events for reference in sets), strict=True)
            for group in [[event, *rest]]
        ],
        provenance={"merged_from": [reference.provenance for reference in sets]},
    )


# --- Either platform ---------------------------------------------------------------------------

BootReport = BootChainReport | AzureBootChainReport


@overload
def check_boot_log(
    log: TcgEventLog, quoted_pcrs: Mapping[int, bytes], reference: ReferenceValueSet
) -> BootChainReport: ...
@overload
def check_boot_log(
    log: TcgEventLog, quoted_pcrs: Mapping[int, bytes], reference: AzureReferenceValueSet
) -> AzureBootChainReport: ...
def check_boot_log(
    log: TcgEventLog, quoted_pcrs: Mapping[int, bytes], reference: PlatformReferenceValues
) -> BootReport:
    """Check a boot event log against quoted PCR 0-9 and a reference-value set of either
    platform (see :func:`check_azure_boot_log` for Azure).

    The log must replay to the quoted PCR 0-9 (else EventLogError) and carry nothing outside
    PCR 0-9 but the set's ``mok_events`` (see :func:`check_events_outside_boot_pcrs`:
    EventLogError for anything but shim's events in PCR 14/15, PlatformError otherwise); then
    the command line, the initrd, the kernel and the firmware PCRs must equal the reference
    (else PlatformError naming that component). The quote itself is the caller's check
    (``verify_quote``).
    """
    if isinstance(reference, AzureReferenceValueSet):
        return check_azure_boot_log(log, quoted_pcrs, reference)
    if not isinstance(reference, ReferenceValueSet):
        raise TypeError(f"not a reference-value set: {type(reference).__name__}")
    return _check_qemu_boot_log(log, quoted_pcrs, reference)


@overload
def verify_platform_quote(
    *,
    attest: bytes,
    signature: bytes,
    ak_public: bytes,
    challenge: bytes,
    pcrs: Mapping[int, bytes],
    boot_event_log: bytes | None,
    reference: ReferenceValueSet,
) -> BootChainReport: ...
@overload
def verify_platform_quote(
    *,
    attest: bytes,
    signature: bytes,
    ak_public: bytes,
    challenge: bytes,
    pcrs: Mapping[int, bytes],
    boot_event_log: bytes | None,
    reference: AzureReferenceValueSet,
) -> AzureBootChainReport: ...
def verify_platform_quote(
    *,
    attest: bytes,
    signature: bytes,
    ak_public: bytes,
    challenge: bytes,
    pcrs: Mapping[int, bytes],
    boot_event_log: bytes | None,
    reference: PlatformReferenceValues,
) -> BootReport:
    """Check a platform quote (asked with ``challenge`` before the workload) and its boot
    event log against ``reference``. The caller has already established that ``ak_public``
    is the machine's certified AK."""
    verify_quote(attest, signature, ak_public, platform_quote_nonce(challenge), pcrs)
    if boot_event_log is None:
        raise PlatformError(f"{reference.platform} platform: the machine sent no boot event log")
    return check_boot_log(parse_event_log(boot_event_log), pcrs, reference)


# --- Command line: aicert-reference-values ----------------------------------------

_PCRREAD_BANK = re.compile(r"^\s*([A-Za-z0-9_]+)\s*:\s*$")
_PCRREAD_VALUE = re.compile(r"^\s*([0-9]{1,2})\s*:\s*0x([0-9A-Fa-f]+)\s*$")
_MAX_INPUT_FILE_SIZE = 32 * 1024 * 1024


def parse_pcr_values(text: str) -> dict[int, bytes]:
    """SHA-256 PCR values from JSON (``{"0": "hex", ...}``, or that under a ``"sha256"`` key)
    or from the output of ``tpm2_pcrread sha256:0,1,...`` (its ``sha256:`` section). Raises
    ValueError naming what is wrong."""
    stripped = text.strip()
    values: dict[int, bytes] = {}
    if stripped.startswith("{"):
        data = json.loads(stripped)
        if isinstance(data, dict) and isinstance(data.get("sha256"), dict):
            data = data["sha256"]
        if not isinstance(data, dict):
            raise ValueError("PCR values: expected a JSON object of PCR index -> hex")
        for key, value in data.items():
            if not (isinstance(key, str) and key.isdigit() and isinstance(value, str)):
                raise ValueError(f'PCR values: entry {key!r}: expected "index": "hex"')
            values[int(key)] = _pcr_value(key, value)
    else:
        bank = None
        for line in text.splitlines():
            if header := _PCRREAD_BANK.match(line):
                bank = header.group(1).lower()
            elif (match := _PCRREAD_VALUE.match(line)) and bank == "sha256":
                values[int(match.group(1))] = _pcr_value(match.group(1), match.group(2))
    if not values:
        raise ValueError("PCR values: none found (JSON, or tpm2_pcrread output with sha256)")
    return values


def _pcr_value(index: str, value: str) -> bytes:
    try:
        raw = bytes.fromhex(value.lower().removeprefix("0x"))
    except ValueError:
        raise ValueError(f"PCR {index}: not hex: {value!r}") from None
    if len(raw) != 32:
        raise ValueError(f"PCR {index}: {len(raw)} bytes, a SHA-256 PCR has 32")
    return raw


def _read(path: Path, what: str) -> bytes:
    with path.open("rb") as handle:
        data = handle.read(_MAX_INPUT_FILE_SIZE + 1)
    if len(data) > _MAX_INPUT_FILE_SIZE:
        raise ValueError(f"{what} {path}: over {_MAX_INPUT_FILE_SIZE} bytes")
    return data


def _read_event_log(path: Path) -> bytes:
    data = _read(path, "event log")
    # The collection step of the README brings the log back base64-encoded: accept both.
    if data[:1].isalnum() and data.strip().isascii() and not data.startswith(b"\x00"):
        try:
            return base64.b64decode(b"".join(data.split()), validate=True)
        except binascii.Error:
            pass
    return data


def _write_json(reference: PlatformReferenceValues, output: Path | None) -> None:
    text = json.dumps(reference.model_dump(mode="json"), indent=2) + "\n"
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text, encoding="utf-8")


def _provenance(items: Sequence[str]) -> dict[str, str]:
    result: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--provenance {item!r}: use KEY=VALUE")
        result[key] = value
    return result


def _der_prefix(data: bytes) -> bytes:
    """The DER certificate at the start of an NV index's content (Azure zero pads it to the
    index size). Hand-written: cryptography refuses trailing bytes and the verifier may not
    import the guest runtime, which has the same four lines."""
    if len(data) < 2 or data[0] != 0x30:
        raise ValueError("AK certificate: not a DER SEQUENCE")
    if data[1] < 0x80:
        header, length = 2, data[1]
    else:
        count = data[1] & 0x7F
        if not 1 <= count <= 4 or len(data) < 2 + count:
            raise ValueError("AK certificate: bad DER length")
        header, length = 2 + count, int.from_bytes(data[2 : 2 + count], "big")
    end = header + length
    if end > len(data) or any(data[end:]):
        raise ValueError("AK certificate: truncated, or followed by something else than zeros")
    return data[:end]


def _check_ak_certificate(args: argparse.Namespace, ak_public: bytes) -> str:
    """The AK certificate (NV 0x01C101D0 content) chains to Microsoft's pinned vTPM root (or
    a ``--trust-root``) now, and certifies the key the quote is checked with; its subject."""
    leaf = x509.load_der_x509_certificate(_der_prefix(_read(args.ak_certificate, "AK cert")))
    intermediates = (
        load_pem_certificates(_read(args.intermediates, "intermediates"))
        if args.intermediates is not None
        else []
    )
    roots = [
        root for path in args.trust_root for root in load_pem_certificates(_read(path, "root"))
    ]
    chain = verify_ak_chain(
        [cert.public_bytes(Encoding.PEM) for cert in (leaf, *intermediates)],
        trusted_roots=roots,
        pinned_root_fingerprints=list(PINNED_ROOT_FINGERPRINTS.values()),
        at_time=datetime.now(UTC),
    )
    key, _ = public_key_from_ak(ak_public)
    if not leaf_public_key_matches(chain.leaf, key):
        raise AkMismatchError(f"{args.ak_public} is not the key of the AK certificate")
    return chain.root_subject


def _derive(args: argparse.Namespace) -> int:
    pcrs = parse_pcr_values(_read(args.pcrs, "PCR values").decode("utf-8", errors="replace"))
    missing = [index for index in BOOT_PCRS if index not in pcrs]
    if missing:
        raise ValueError(f"PCR values {args.pcrs}: PCR {missing} missing (need 0-9)")
    quote_files = (args.quote, args.signature, args.ak_public, args.nonce)
    checked: dict[str, Any] = {"quote_verified": False}
    if any(item is not None for item in quote_files):
        if any(item is None for item in quote_files):
            raise ValueError("--quote, --signature, --ak-public and --nonce go together")
        ak_public = _read(args.ak_public, "AK public key")
        if args.ak_certificate is not None:
            checked["ak_root"] = _check_ak_certificate(args, ak_public)
        # The PCR values are only as good as the quote that signs them: check it first.
        verify_quote(
            _read(args.quote, "quote"),
            _read(args.signature, "signature"),
            ak_public,
            bytes.fromhex(args.nonce),
            pcrs,
        )
        checked["quote_verified"] = True
    elif args.ak_certificate is not None:
        raise ValueError("--ak-certificate checks the quote's key: give the quote too")
    reference = derive_azure_reference_values(
        _read_event_log(args.event_log),
        pcrs,
        image_version_id=args.image_version,
        reference_id=args.reference_id,
        security_type=args.security_type,
        check_firmware_pcrs=args.check_firmware_pcr,
        provenance={**checked, **_provenance(args.provenance)},
    )
    _write_json(reference, args.output)
    return 0


def _merge(args: argparse.Namespace) -> int:
    _write_json(
        merge_azure_reference_values(
            [load_reference_values(path, platform="azure") for path in args.sets]
        ),
        args.output,
    )
    return 0


def _check(args: argparse.Namespace) -> int:
    pcrs = parse_pcr_values(_read(args.pcrs, "PCR values").decode("utf-8", errors="replace"))
    reference = load_reference_values(args.reference_values)
    report = check_boot_log(parse_event_log(_read_event_log(args.event_log)), pcrs, reference)
    print(report.note)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="aicert-reference-values",
        description="Derive, merge and check boot reference-value sets.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    derive = commands.add_parser(
        "derive-azure",
        help="derive an Azure set from one boot's event log and PCR 0-9 (prints JSON)",
    )
    derive.add_argument(
        "--event-log",
        type=Path,
        required=True,
        help="the VM's /sys/kernel/security/tpm0/binary_bios_measurements (raw or base64)",
    )
    derive.add_argument(
        "--pcrs",
        type=Path,
        required=True,
        help='PCR 0-9 of the same boot: JSON {"0": "hex", ...} or tpm2_pcrread output',
    )
    derive.add_argument(
        "--image-version", required=True, help="the gallery image version's resource id"
    )
    derive.add_argument(
        "--id", dest="reference_id", help="the set's id (default: <image>-<version>)"
    )
    derive.add_argument(
        "--security-type", choices=["TrustedLaunch", "ConfidentialVM"], default="TrustedLaunch"
    )
    derive.add_argument(
        "--check-firmware-pcr",
        type=int,
        action="append",
        default=[],
        metavar="N",
        help="also check firmware PCR N (0-3, 5, 6) with this boot's value; repeatable",
    )
    derive.add_argument(
        "--provenance",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recorded, never checked (e.g. vm_size=..., region=...); repeatable",
    )
    derive.add_argument("--quote", type=Path, help="tpm2_quote -m output over sha256:0-9")
    derive.add_argument("--signature", type=Path, help="tpm2_quote -s output")
    derive.add_argument("--ak-public", type=Path, help="tpm2_readpublic -o output of the AK")
    derive.add_argument("--nonce", help="the quote's qualifying data, hex")
    derive.add_argument(
        "--ak-certificate",
        type=Path,
        help="tpm2_nvread 0x01C101D0 output: must chain to Microsoft's vTPM root and certify "
        "--ak-public",
    )
    derive.add_argument(
        "--intermediates", type=Path, help="PEM intermediates of the AK certificate"
    )
    derive.add_argument(
        "--trust-root",
        type=Path,
        action="append",
        default=[],
        help="PEM root trusted besides Microsoft's pinned one (tests); repeatable",
    )
    derive.add_argument("--output", "-o", type=Path, help="write here instead of stdout")
    derive.set_defaults(run=_derive)
    merge = commands.add_parser(
        "merge-azure", help="one Azure set accepting every value of the given sets"
    )
    merge.add_argument("sets", type=Path, nargs="+")
    merge.add_argument("--output", "-o", type=Path)
    merge.set_defaults(run=_merge)
    check = commands.add_parser(
        "check", help="check an event log and its PCR 0-9 against a reference-value set"
    )
    check.add_argument("--event-log", type=Path, required=True)
    check.add_argument("--pcrs", type=Path, required=True)
    check.add_argument("--reference-values", type=Path, required=True)
    check.set_defaults(run=_check)
    schema = commands.add_parser("schema", help="print the JSON Schema of reference values")
    schema.set_defaults(
        run=lambda _args: (
            sys.stdout.write(
                json.dumps(reference_values_json_schema(), indent=2, sort_keys=True) + "\n"
            )
            and 0
        )
    )
    args = parser.parse_args(argv)
    try:
        result: int = args.run(args)
    except VerificationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return result


if __name__ == "__main__":
    sys.exit(main())
