"""The observation boot of a ``qemu`` guest image: what its measured boot really puts in PCR 0-9.

The build predicts the kernel, initrd and command line digests; the firmware's measurements
(PCR 0-7) and the kernel's PCR 4 digest are only known by booting. ``observe_reference_values``
boots the image once, asks a platform quote, checks it (``platform_quote``) and that the boot
log replays to it and matches the prediction, then records the values, flagged ``observed``,
with the VM shape they hold for.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

from aicert.reference_values import ReferenceValueSet, VmShape, check_boot_log
from aicert.tasks.platforms.platform_quote import fresh_challenge, verified_platform_pcrs
from aicert.tasks.platforms.qemu.image import (
    GuestImage,
    GuestImageError,
    load_guest_image,
    write_reference_values,
)
from aicert.tasks.platforms.qemu.provider import QemuProvider
from aicert.tasks.platforms.qemu.recipe import ProgressCallback
from aicert.tcg_eventlog import TcgEventLog, parse_event_log

BOOT_APPLICATION = "EV_EFI_BOOT_SERVICES_APPLICATION"


def with_observed_values(
    reference: ReferenceValueSet,
    pcrs: dict[int, bytes],
    kernel_pcr4_digest: bytes,
    vm: VmShape,
) -> ReferenceValueSet:
    """``reference`` plus the PCR 0-9 values and PCR 4 kernel digest seen on a real boot."""
    return reference.model_copy(
        update={
            "observed": True,
            "pcrs": {str(index): pcrs[index].hex() for index in range(10)},
            "kernel_pcr4_digest": kernel_pcr4_digest.hex(),
            "kernel_pcr4_digest_source": "observed",
            "vm": vm,
        }
    )


def _kernel_pcr4_digest(boot_log: TcgEventLog) -> bytes:
    """The PCR 4 digest of the one boot application (the kernel's EFI stub)."""
    applications = [
        event
        for event in boot_log.events
        if event.pcr == 4 and event.event_type_name == BOOT_APPLICATION
    ]
    if len(applications) != 1:
        raise GuestImageError(f"{len(applications)} boot applications in PCR 4, expected 1")
    return applications[0].digests["sha256"]


def _quoted_boot(
    provider: QemuProvider, progress: ProgressCallback | None
) -> tuple[dict[int, bytes], TcgEventLog, float | None]:
    """Boot one VM, ask a platform quote, tear it down: (verified PCRs, boot log, boot s)."""
    machine = provider.boot("observe-" + secrets.token_hex(6))
    try:
        if progress:
            progress(f"booted in {machine.details.get('boot_seconds')} s; asking a platform quote")
        challenge = fresh_challenge()
        with machine.client(timeout_s=60.0) as client:
            material = client.key_material()
            evidence = client.platform_quote(challenge)
    finally:
        provider.teardown(machine)
    if evidence.ak_public != material.ak_public or evidence.boot_event_log is None:
        raise GuestImageError("the observation boot returned inconsistent evidence")
    pcrs = verified_platform_pcrs(evidence, challenge)
    return pcrs, parse_event_log(evidence.boot_event_log), machine.details.get("boot_seconds")


def observe_reference_values(
    image: str | Path | None = None,
    home: Path | None = None,
    *,
    provider: QemuProvider | None = None,
    progress: ProgressCallback | None = None,
) -> GuestImage:
    """Boot the image once and record what its boot measured: PCR 0-9 and the kernel's PCR 4
    digest, flagged ``observed``, with the VM shape they hold for.

    The observation is checked before it is kept: the quote must verify, the log must replay
    to the quoted PCRs, and the predicted PCR 9 digests (initrd, command line) must be the
    ones measured.

    Raises:
        GuestImageError: the boot's evidence is inconsistent or does not match the build.
        QemuProviderError: the VM did not boot.
    """
    built = load_guest_image(image, home)
    if provider is None:
        provider = QemuProvider(built.directory, home)
    started = time.monotonic()
    pcrs, boot_log, boot_seconds = _quoted_boot(provider, progress)
    reference = with_observed_values(
        built.reference, pcrs, _kernel_pcr4_digest(boot_log), provider.vm_shape()
    )
    try:
        check_boot_log(boot_log, pcrs, reference)
    except Exception as exc:
        raise GuestImageError(f"the observed boot does not match the build: {exc}") from exc
    reference = reference.model_copy(
        update={
            "build": {
                **reference.build,
                "observed_boot_seconds": boot_seconds,
                "observed_with": f"qemu -accel {provider.accel}",
            }
        }
    )
    write_reference_values(reference, built.manifest)
    if progress:
        progress(f"observed PCR 0-9 of {built.id} in {time.monotonic() - started:.0f} s")
    return GuestImage(built.directory, reference)
