"""The reference-value sets of a measured boot: their data model, JSON Schema and loading.

A reference-value set (``aicert-reference-values/v1`` JSON, published with a guest image) says
what a good boot of one guest image measures into PCR 0-9. Its ``platform`` field says which
kind it is; :func:`load_reference_values` returns either.

``platform: "qemu"`` (:class:`ReferenceValueSet`, written by the qemu guest image build): the
kernel command line and initrd the Linux EFI stub measures into PCR 9 (predicted from the
build's outputs), the kernel the firmware measures into PCR 4 and the PCR 0-9 values, both
observed on a boot of the image on the same virtual machine shape (:class:`VmShape`).

``platform: "azure"`` (:class:`AzureReferenceValueSet`, derived by the image publisher from
the first boot of a VM made from the gallery image version): for each checked PCR a list of
accepted values, every other boot PCR listed in ``unchecked_pcrs`` with the reason, and the
measured components of the checked PCRs (:class:`ExpectedEvent`) with their accepted digests;
optionally ``pcr_boots`` (:class:`AzurePcrBoot`): the exact PCR values of reference boots per
VM family, with PCR 14's value before the agent's first event, which judge a boot whose event
log is empty (Trusted Launch hands the guest a zero-byte log).

``platform: "gcp"`` (:class:`GcpReferenceValueSet`, derived from the boot event log of a
Shielded VM made from the Compute Engine image by ``aicert.gcp_reference``): the Azure kind's
model (checked PCRs with accepted values, unchecked PCRs with reasons, expected component
events) for another image name; GCE always hands the guest its boot event log, so a gcp set
has no ``pcr_boots``.

All kinds list ``mok_events`` (:class:`MokListEvent`): the only events a boot log may carry
outside PCR 0-9.

The check of a boot log against a set is :mod:`aicert.boot_log_check`; the derivation of Azure
sets is :mod:`aicert.reference_derivation`. Only the standard library, pydantic and this
package: the verifier's dependency rule.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, overload

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from aicert.appevents import ShimMokVariable
from aicert.errors import PlatformError

REFERENCE_VALUES_FORMAT = "aicert-reference-values/v1"
BOOT_PCRS = tuple(range(10))
FIRMWARE_PCRS = tuple(range(8))
MAX_REFERENCE_FILE_SIZE = 1024 * 1024

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
        """The observed PCR values, by index."""
        return {int(index): bytes.fromhex(value) for index, value in self.pcrs.items()}


def load_options_digest(load_options: str) -> bytes:
    """The PCR 9 ``LOADED_IMAGE::LoadOptions`` digest: SHA-256 of the UTF-16LE string with
    its trailing NUL, as Linux's EFI stub measures the options the firmware passed."""
    return hashlib.sha256(load_options.encode("utf-16-le") + b"\x00\x00").digest()


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
# Where each kind of component event is measured (in the order the check visits them), and the
# name an error uses when the reference lists none of that kind.
EVENT_KIND_PCRS: dict[str, frozenset[int]] = {
    "boot_application": frozenset({4}),
    "secure_boot_variable": frozenset({7}),
    "secure_boot_authority": frozenset({7}),
    "kernel_command_line": frozenset({8, 9}),
    "kernel_file": frozenset({9}),
    "initrd": frozenset({9}),
}
EVENT_KIND_COMPONENT = {
    "boot_application": "boot applications (PCR 4)",
    "secure_boot_variable": SECURE_BOOT_COMPONENT,
    "secure_boot_authority": SECURE_BOOT_COMPONENT,
    "kernel_command_line": "kernel command line",
    "kernel_file": "kernel",
    "initrd": "initrd",
}
AZURE_PCR_COMPONENTS = {
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
        if self.pcr not in EVENT_KIND_PCRS[self.kind]:
            raise ValueError(f"{self.kind} events are not measured in PCR {self.pcr}")
        _no_repeats(self.sha256, f"{self.component} ({self.description})")
        return self


class AzureImage(_Model):
    """The Azure Compute Gallery image version the reference values belong to."""

    gallery_image_version_id: Annotated[
        str, StringConstraints(pattern=GALLERY_IMAGE_VERSION_ID_PATTERN, max_length=1024)
    ]
    security_type: Literal["TrustedLaunch", "ConfidentialVM"] = "TrustedLaunch"


VmFamily = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]


class AzurePcrBoot(_Model):
    """The PCR values of a reference boot of the image on one VM family, for boots whose
    event log is empty: Trusted Launch hands the guest a zero-byte ``binary_bios_measurements``,
    so nothing can be replayed and the quoted PCRs are compared with these values directly.

    ``pcrs`` pins every PCR the set checks (each value one the set's ``pcrs`` accepts), and may
    pin others (firmware PCRs, which vary with the VM family). ``pcr14_start`` is PCR 14 before
    the agent's first event (shim's MOK-list measurements, or zeros): without a log the
    application replay starts there, exactly, since an unexplained start could hide
    application events. Recorded by ``aicert reference-values record-azure``."""

    vm_family: VmFamily  # e.g. the VM size's family (Standard_DSv5), as the recorder names it
    pcrs: dict[BootPcrIndex, Sha256Hex]
    pcr14_start: Sha256Hex
    provenance: dict[str, Any] = Field(default_factory=dict)  # how it was recorded; never checked

    def pcr_values(self) -> dict[int, bytes]:
        """The pinned PCR values, by index."""
        return {int(index): bytes.fromhex(value) for index, value in self.pcrs.items()}


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
    # Boots without an event log: the quoted PCRs are checked against these values instead.
    pcr_boots: Annotated[list[AzurePcrBoot], Field(max_length=64)] = Field(default_factory=list)
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
                    f"PCR {index} ({AZURE_PCR_COMPONENTS[index]}) must be checked: it holds "
                    "the image's own boot chain"
                )
        for index, reason in self.unchecked_pcrs.items():
            if not reason.strip():
                raise ValueError(f"unchecked_pcrs[{index}]: the reason is empty")
        for index, values in self.pcrs.items():
            _no_repeats(values, f"pcrs[{index}]")
        for position, boot in enumerate(self.pcr_boots):
            self._check_pcr_boot(position, boot)
        return self

    def _check_pcr_boot(self, position: int, boot: AzurePcrBoot) -> None:
        where = f"pcr_boots[{position}] ({boot.vm_family})"
        if missing := sorted(set(self.pcrs) - set(boot.pcrs), key=int):
            raise ValueError(f"{where}: does not pin checked PCR {', '.join(missing)}")
        for index, value in boot.pcrs.items():
            if index in self.pcrs and value not in self.pcrs[index]:
                raise ValueError(f"{where}: PCR {index} {value} is not a value pcrs accept")

    def checked_pcrs(self) -> tuple[int, ...]:
        """The PCRs the set checks, in ascending order."""
        return tuple(sorted(int(index) for index in self.pcrs))

    def accepted_pcr_values(self) -> dict[int, tuple[bytes, ...]]:
        """The accepted values of each checked PCR, by index."""
        return {
            int(index): tuple(bytes.fromhex(value) for value in values)
            for index, values in self.pcrs.items()
        }

    def image_name(self) -> str:
        """The image the set belongs to, as reports name it."""
        return self.image.gallery_image_version_id


# projects/<project>/global/images/<image>, as the Compute Engine API names an image (a full
# https://compute.googleapis.com/compute/v1/ self link is accepted too).
GCE_IMAGE_PATTERN = (
    r"^(https://(www|compute)\.googleapis\.com/compute/v1/)?"
    r"projects/[a-z][a-z0-9-]{4,61}[a-z0-9]/global/images/[a-z]([-a-z0-9]{0,61}[a-z0-9])?$"
)


class GcpImage(_Model):
    """The Compute Engine image the reference values belong to."""

    image: Annotated[str, StringConstraints(pattern=GCE_IMAGE_PATTERN, max_length=1024)]
    confidential_compute: bool = False  # a Confidential VM (AMD SEV) rather than a Shielded VM


class GcpReferenceValueSet(AzureReferenceValueSet):
    """What a good boot of one Compute Engine image measures into PCR 0-9 (a Shielded VM:
    vTPM, Secure Boot, integrity monitoring). The Azure set's model and checks; GCE always
    hands the guest its boot event log, so ``pcr_boots`` must stay empty."""

    platform: Literal["gcp"]  # type: ignore[assignment]  # the subclass's own kind
    image: GcpImage  # type: ignore[assignment]

    @model_validator(mode="after")
    def _logged_boots_only(self) -> GcpReferenceValueSet:
        if self.pcr_boots:
            raise ValueError(
                "pcr_boots: a GCE VM always hands the guest its boot event log, so a gcp set "
                "judges boots by their log only"
            )
        return self

    def image_name(self) -> str:
        """The Compute Engine image the set belongs to."""
        return self.image.image


QemuReferenceValueSet = ReferenceValueSet
PlatformReferenceValues = ReferenceValueSet | AzureReferenceValueSet | GcpReferenceValueSet
REFERENCE_VALUE_SET_TYPES = (ReferenceValueSet, AzureReferenceValueSet, GcpReferenceValueSet)
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
def load_reference_values(path: str | Path, platform: Literal["gcp"]) -> GcpReferenceValueSet: ...
@overload
def load_reference_values(path: str | Path, platform: None = None) -> PlatformReferenceValues: ...
def load_reference_values(
    path: str | Path, platform: Literal["qemu", "azure", "gcp"] | None = None
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
