"""Reference values of a Google Compute Engine image: derived from one boot's event log.

A Shielded VM (vTPM, Secure Boot, integrity monitoring) boots Google's virtual UEFI firmware,
then the image's shim, GRUB and kernel, and hands the guest the TCG boot event log
(``/sys/kernel/security/tpm0/binary_bios_measurements``). The image publisher boots a VM from
the new image, reads that log and PCR 0-9 (the PCRs quoted by the VM's AK, or read with
``tpm2_pcrread``), and derives a :class:`GcpReferenceValueSet` with
:func:`derive_gcp_reference_values`: exactly what ``derive_azure_reference_values`` derives
(PCR 4, 7, 8, 9 checked with every component event in them; the firmware PCRs listed as
unchecked with Google's reasons, or checked when asked), under the image's Compute Engine
name. The certificate check is the Azure one (:func:`aicert.boot_log_check.check_boot_log`).

Only the standard library, pydantic and this package: the verifier's dependency rule.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from aicert.reference_derivation import derive_azure_reference_values
from aicert.reference_value_sets import GcpImage, GcpReferenceValueSet
from aicert.tcg_eventlog import TcgEventLog

__all__ = ["DEFAULT_GCP_UNCHECKED_REASONS", "derive_gcp_reference_values"]

DEFAULT_GCP_UNCHECKED_REASONS: dict[int, str] = {
    0: "firmware code and S-CRTM version of Google's virtual UEFI: changes when Compute Engine "
    "updates the host firmware, not with the image",
    1: "firmware configuration and boot variables: depend on the machine type, its virtual "
    "hardware and the firmware version, not on the image",
    2: "UEFI drivers and option ROMs of the VM's virtual hardware: set by Compute Engine",
    3: "configuration of those drivers: set by Compute Engine",
    5: "GPT partition table and boot-manager events: the table follows the boot disk size and "
    "the first boot's partition growth",
    6: "host platform events: set by Google's firmware",
}
# The Azure derivation validates an Azure gallery id; the set is re-typed with the GCE image
# right after, so this name never reaches a reference-value set.
_PLACEHOLDER_GALLERY_ID = (
    "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/unused/providers/"
    "Microsoft.Compute/galleries/unused/images/unused/versions/0"
)


def _default_reference_id(image: str) -> str:
    return image.rstrip("/").rsplit("/", 1)[-1][:128]


def derive_gcp_reference_values(
    event_log: bytes | TcgEventLog,
    quoted_pcrs: Mapping[int, bytes],
    *,
    image: str,
    reference_id: str | None = None,
    confidential_compute: bool = False,
    check_firmware_pcrs: Iterable[int] = (),
    provenance: Mapping[str, Any] | None = None,
) -> GcpReferenceValueSet:
    """The reference-value set of one boot of a Compute Engine image.

    Args:
        event_log: the boot's TCG event log (bytes, or parsed).
        quoted_pcrs: the boot's PCR 0-9 (SHA-256 bank), which the log must replay to.
        image: the image, ``projects/<project>/global/images/<name>``.
        reference_id: the set's id (default: the image's name).
        confidential_compute: the VM was a Confidential VM rather than a Shielded VM.
        check_firmware_pcrs: firmware PCRs (0-3, 5, 6) to check with this boot's values too.
        provenance: how the boot was made (recorded, never checked).

    Returns:
        The set: PCR 4, 7, 8, 9 and ``check_firmware_pcrs`` checked, the others listed as
        unchecked with Google's reasons.

    Raises:
        EventLogError: the log does not parse or replay to ``quoted_pcrs``.
        PlatformError: the boot had Secure Boot off, or logged something outside PCR 0-9
            but shim's MOK lists.
        ValueError: ``check_firmware_pcrs`` names a PCR that is not a firmware PCR, or
            ``image`` or ``reference_id`` is malformed.
    """
    derived = derive_azure_reference_values(
        event_log,
        quoted_pcrs,
        image_version_id=_PLACEHOLDER_GALLERY_ID,
        reference_id=reference_id or _default_reference_id(image),
        check_firmware_pcrs=check_firmware_pcrs,
    )
    data = derived.model_dump(mode="json", exclude={"platform", "image", "unchecked_pcrs"})
    data["provenance"] = {
        **data["provenance"],
        "derived_by": "aicert.gcp_reference.derive_gcp_reference_values",
        **dict(provenance or {}),
    }
    return GcpReferenceValueSet.model_validate(
        {
            **data,
            "platform": "gcp",
            "image": GcpImage(image=image, confidential_compute=confidential_compute),
            "unchecked_pcrs": {
                str(index): reason
                for index, reason in DEFAULT_GCP_UNCHECKED_REASONS.items()
                if str(index) not in derived.pcrs
            },
        }
    )
