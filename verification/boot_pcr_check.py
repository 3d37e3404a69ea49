"""The check of an Azure boot that handed over no event log, by its quoted PCR values.

Azure Trusted Launch VMs expose ``/sys/kernel/security/tpm0/binary_bios_measurements`` with
zero bytes: the PCRs are real, but there is nothing to replay. An Azure reference-value set
may then give the exact PCR values of reference boots of the image per VM family
(``AzureReferenceValueSet.pcr_boots``, recorded by ``aicert reference-values record-azure``).
Without a log:

- the quoted PCRs must equal, one by one, the values of one of those boots
  (:func:`match_azure_pcr_boot`; else ``BootPcrValueError`` naming each PCR that differs, with
  both values, against the closest boot);
- PCR 14 starts, for the application replay, at that boot's ``pcr14_start`` exactly
  (:func:`boot_application_start`): a start the reference does not explain could hide
  application events, as a boot log carrying them would (``test_boot_log_forgery.py``);
- the report says the boot chain was checked by PCR values, not by a replayed log
  (:class:`AzurePcrBootReport`).

Where a log is present it is replayed and judged as before (:mod:`aicert.boot_log_check`).
Only the standard library and this package: the verifier's dependency rule.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from aicert.appevents import INPUTS_PCR, OUTPUTS_PCR, application_pcr_start
from aicert.errors import BootPcrValueError, PlatformError
from aicert.reference_value_sets import (
    AZURE_PCR_COMPONENTS,
    AzurePcrBoot,
    AzureReferenceValueSet,
    PlatformReferenceValues,
)

__all__ = [
    "AzurePcrBootReport",
    "boot_application_start",
    "check_azure_boot_pcrs",
    "match_azure_pcr_boot",
    "unchecked_note",
]

_RESET = bytes(32)


@dataclass(frozen=True)
class AzurePcrBootReport:
    """What the quoted PCRs of a boot without an event log were found to attest."""

    reference_id: str
    image_version_id: str
    vm_family: str
    checked_pcrs: tuple[int, ...]
    unchecked_pcrs: tuple[tuple[int, str], ...]
    pcr14_start: str

    @property
    def note(self) -> str:
        """One line for a person: how the boot chain was checked, and what was not."""
        checked = ", ".join(str(index) for index in self.checked_pcrs)
        text = (
            f"boot chain checked by PCR values, not by a replayed log (the VM's boot event "
            f"log is empty): PCR {checked} equal those of a reference boot of Azure reference "
            f"values {self.reference_id} (image {self.image_version_id}, VM family "
            f"{self.vm_family}); PCR 14 started at the reference value "
            f"{self.pcr14_start[:16]}..."
        )
        return text + unchecked_note(self.unchecked_pcrs)


def unchecked_note(unchecked: tuple[tuple[int, str], ...]) -> str:
    """The end of an Azure report's note: the PCRs left unchecked, with the reasons."""
    if not unchecked:
        return ""
    return "; NOT checked: " + "; ".join(f"PCR {index} ({reason})" for index, reason in unchecked)


def _component(index: int) -> str:
    return AZURE_PCR_COMPONENTS.get(index, f"firmware (PCR {index})")


def _differences(
    quoted_pcrs: Mapping[int, bytes], boot: AzurePcrBoot
) -> tuple[tuple[int, bytes, bytes], ...]:
    return tuple(
        (index, bytes(quoted_pcrs.get(index, b"")), expected)
        for index, expected in sorted(boot.pcr_values().items())
        if not hmac.compare_digest(bytes(quoted_pcrs.get(index, b"")), expected)
    )


def match_azure_pcr_boot(
    quoted_pcrs: Mapping[int, bytes], reference: AzureReferenceValueSet
) -> AzurePcrBoot:
    """The reference boot (``reference.pcr_boots``) whose every pinned PCR the quote holds.

    Raises:
        PlatformError: the set records no boot without a log (nothing can judge the PCRs).
        BootPcrValueError: no recorded boot matches; names each PCR that differs from the
            closest one (fewest differences), with the quoted and the reference value.
    """
    if not reference.pcr_boots:
        raise PlatformError(
            f"azure platform: the boot event log is empty, and reference values "
            f"{reference.id} record no PCR values for such boots (pcr_boots: record them "
            "with `aicert reference-values record-azure`)"
        )
    closest: tuple[AzurePcrBoot, tuple[tuple[int, bytes, bytes], ...]] | None = None
    for boot in reference.pcr_boots:
        differences = _differences(quoted_pcrs, boot)
        if not differences:
            return boot
        if closest is None or len(differences) < len(closest[1]):
            closest = (boot, differences)
    assert closest is not None  # pcr_boots is not empty
    boot, differences = closest
    listed = "; ".join(
        f"PCR {index} ({_component(index)}): quoted {quoted.hex() or '(absent)'}, reference "
        f"{expected.hex()}"
        for index, quoted, expected in differences
    )
    raise BootPcrValueError(
        f"boot chain (no event log, checked by PCR values): {len(differences)} PCR(s) differ "
        f"from the reference boot on VM family {boot.vm_family} of reference values "
        f"{reference.id} (the closest of {len(reference.pcr_boots)}): {listed}",
        reference_id=reference.id,
        vm_family=boot.vm_family,
        mismatches=differences,
    )


def check_azure_boot_pcrs(
    quoted_pcrs: Mapping[int, bytes], reference: AzureReferenceValueSet
) -> AzurePcrBootReport:
    """Judge a boot without an event log by its quoted PCRs (see :func:`match_azure_pcr_boot`
    for what is raised); the report names the PCRs checked and those the set leaves out."""
    boot = match_azure_pcr_boot(quoted_pcrs, reference)
    pinned = {int(index) for index in boot.pcrs}
    return AzurePcrBootReport(
        reference_id=reference.id,
        image_version_id=reference.image.gallery_image_version_id,
        vm_family=boot.vm_family,
        checked_pcrs=tuple(sorted(pinned)),
        unchecked_pcrs=tuple(
            (int(index), reason)
            for index, reason in sorted(reference.unchecked_pcrs.items())
            if int(index) not in pinned
        ),
        pcr14_start=boot.pcr14_start,
    )


def boot_application_start(
    boot_event_log: bytes | None,
    quoted_pcrs: Mapping[int, bytes],
    reference: PlatformReferenceValues | None,
) -> dict[int, bytes]:
    """PCR 14 and 15 when the OS handed over to the agent.

    With a boot event log: what it extended there (``application_pcr_start``). Without one
    (None or zero bytes) and an Azure set: PCR 14 at the matching reference boot's
    ``pcr14_start`` and PCR 15 at reset (``BootPcrValueError`` when no boot matches). Without
    either: the reset values.
    """
    if boot_event_log or not isinstance(reference, AzureReferenceValueSet):
        return application_pcr_start(boot_event_log or None)
    boot = match_azure_pcr_boot(quoted_pcrs, reference)
    return {INPUTS_PCR: bytes.fromhex(boot.pcr14_start), OUTPUTS_PCR: _RESET}
