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

``aicert reference-values derive-azure ...`` (also installed as ``aicert-reference-values``)
derives an Azure set from a boot's event log and PCR values, ``merge-azure`` joins sets
observed on several VMs, and ``check`` judges a log against a set (``--help`` of each).

This module is the public face of that work, which lives in four modules:
:mod:`aicert.reference_value_sets` (the data model, its JSON Schema and loading),
:mod:`aicert.boot_events` (a boot log's replay and component events),
:mod:`aicert.boot_log_check` (the check, and the platform-quote check) and
:mod:`aicert.reference_derivation` (deriving and merging sets); the commands are
:mod:`aicert.reference_values_cli`. Import from here.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from aicert.boot_events import MeasuredEvent, classify_boot_events
from aicert.boot_log_check import (
    PLATFORM_QUOTE_CONTEXT,
    AzureBootChainReport,
    BootChainReport,
    BootReport,
    check_azure_boot_log,
    check_boot_log,
    check_events_outside_boot_pcrs,
    platform_quote_nonce,
    verify_platform_quote,
)
from aicert.reference_derivation import (
    derive_azure_reference_values,
    merge_azure_reference_values,
    parse_pcr_values,
    record_azure_pcr_boot,
)
from aicert.reference_value_sets import (
    AZURE_IMAGE_PCRS,
    BOOT_PCRS,
    DEFAULT_AZURE_UNCHECKED_REASONS,
    FIRMWARE_PCRS,
    REFERENCE_VALUE_SET_TYPES,
    REFERENCE_VALUES_FORMAT,
    REFERENCE_VALUES_SCHEMA_RESOURCE,
    AzureImage,
    AzurePcrBoot,
    AzureReferenceValueSet,
    ExpectedEvent,
    MokListEvent,
    PlatformReferenceValues,
    QemuReferenceValueSet,
    ReferenceValueSet,
    VmShape,
    load_options_digest,
    load_reference_values,
    parse_reference_values,
    reference_values_json_schema,
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
    "AzurePcrBoot",
    "AzureReferenceValueSet",
    "BootChainReport",
    "BootReport",
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
    "main",
    "merge_azure_reference_values",
    "parse_pcr_values",
    "parse_reference_values",
    "platform_quote_nonce",
    "record_azure_pcr_boot",
    "reference_values_json_schema",
    "verify_platform_quote",
]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``aicert-reference-values`` (the same commands as ``aicert reference-values``).

    Args:
        argv: the command and its options, without the program name (default: the process's
            arguments).

    Returns:
        The exit code: 0 success, 1 the boot or quote does not verify, 2 bad input.
    """
    # Imported on use: the guest agent and the orchestrator import this module for the data
    # model and the checks, and need not load the command line's Typer and Rich.
    from aicert.reference_values_cli import main as run_commands

    return run_commands(argv)


if __name__ == "__main__":
    sys.exit(main())
