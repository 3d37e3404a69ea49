"""The scratch disk of a qemu run: where the guest keeps what does not fit in its memory.

The guest's root file system is its initramfs, in RAM (2 GiB by default), so the unpacked
inputs, the Docker engine's images and the run's workspace and outputs go to a disk made
for each run instead: a sparse raw file in the run's folder (it takes host space only as
the guest writes), attached as a virtio disk the guest finds by its serial
(``SCRATCH_SERIAL``), formats with ``mkfs.ext4`` and mounts on ``SCRATCH_MOUNT``
(``guest/init.sh``). It is deleted at teardown, with the staged inputs.

It is not part of the measured boot: the firmware, kernel, initrd and command line are
measured as before, and the disk is blank when the guest starts (a disk that is not blank is
formatted anyway). What the guest later puts on it is what the agent measures, as before:
the staged inputs are hashed and checked by the agent after they are unpacked there.

Its size: ``scratch_gib`` when the provider is given one, else twice the staged inputs (the
tar, then the unpacked files and the engine's copy of the image) plus
``SCRATCH_ALLOWANCE_BYTES`` for the training image, workspace and outputs, at most
``SCRATCH_MAX_BYTES``. A size that cannot even hold the staged
inputs is refused before the VM starts; the agent refuses to unpack inputs that do not fit
in the space the guest's file system has left.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from aicert.tasks.platforms.qemu.vm import QemuProviderError

log = logging.getLogger(__name__)

GIB = 1024**3
SCRATCH_DISK = "scratch.img"
# What the guest's init looks for (virtio-blk serials are at most 20 bytes).
SCRATCH_SERIAL = "aicert-scratch"
INPUTS_SERIAL = "aicert-inputs"
# A PCI slot of its own, after the ones qemu assigns in order (the staged inputs' disk, when
# there is one, stays the guest's first virtio disk, /dev/vda).
SCRATCH_PCI_SLOT = "0x10"
SCRATCH_ALLOWANCE_BYTES = 8 * GIB
SCRATCH_MAX_BYTES = 2048 * GIB


def scratch_size(inputs_bytes: int, scratch_gib: float | None = None) -> int:
    """The size of a run's scratch disk, in bytes (a multiple of 1 MiB).

    Args:
        inputs_bytes: The size of the run's staged inputs (0 without any).
        scratch_gib: The size asked for, in GiB; None derives it from ``inputs_bytes``.

    Raises:
        QemuProviderError: ``scratch_gib`` is not a positive size within the bounds, or is
            too small to hold the staged inputs.
    """
    if scratch_gib is None:
        wanted = 2 * inputs_bytes + SCRATCH_ALLOWANCE_BYTES
        size = min(wanted, SCRATCH_MAX_BYTES)
        if size < wanted:
            log.warning(
                "scratch disk: %.1f GiB would suit %.1f GB of staged inputs; capped at %.0f "
                "GiB (give scratch_gib to choose)",
                wanted / GIB,
                inputs_bytes / 1e9,
                SCRATCH_MAX_BYTES / GIB,
            )
    else:
        if not 0 < scratch_gib <= SCRATCH_MAX_BYTES / GIB:
            raise QemuProviderError(
                f"scratch_gib: {scratch_gib} is not a size between 0 and "
                f"{SCRATCH_MAX_BYTES // GIB} GiB"
            )
        size = int(scratch_gib * GIB)
    size = -(-size // (1024 * 1024)) * 1024 * 1024
    if size <= inputs_bytes:
        raise QemuProviderError(
            f"scratch_gib: a {size / GIB:.2f} GiB scratch disk cannot hold the run's "
            f"{inputs_bytes / GIB:.2f} GiB of staged inputs (give at least twice that, or "
            "leave it unset)"
        )
    return size


def create_scratch_disk(run_dir: Path, size: int) -> Path:
    """A blank sparse raw disk of ``size`` bytes in ``run_dir`` (an old one is replaced:
    nothing of an earlier boot reaches the guest). Warns when the host has less free space
    than the disk could fill."""
    disk = run_dir / SCRATCH_DISK
    disk.unlink(missing_ok=True)
    with disk.open("xb") as handle:
        os.truncate(handle.fileno(), size)
    free = shutil.disk_usage(run_dir).free
    if free < size:
        log.warning(
            "scratch disk %s: %.1f GiB, but the host has %.1f GiB free: a run that fills it "
            "fails with I/O errors in the guest",
            disk,
            size / GIB,
            free / GIB,
        )
    return disk


def scratch_drive(run_dir: Path) -> list[str]:
    """The qemu arguments that attach ``run_dir``'s scratch disk (writable, its own slot).

    Raises:
        QemuProviderError: the disk was not created.
    """
    disk = run_dir / SCRATCH_DISK
    if not disk.is_file():
        raise QemuProviderError(f"scratch disk {disk} is missing (made by provision)")
    return [
        "-drive",
        f"file={disk},format=raw,if=none,id=scratch,discard=unmap",
        "-device",
        f"virtio-blk-pci,drive=scratch,serial={SCRATCH_SERIAL},addr={SCRATCH_PCI_SLOT}",
    ]


def inputs_drive(disk: Path) -> list[str]:
    """The qemu arguments that attach the staged inputs read-only, with their serial."""
    return [
        "-drive",
        f"file={disk},format=raw,if=none,id=inputs,readonly=on",
        "-device",
        f"virtio-blk-pci,drive=inputs,serial={INPUTS_SERIAL}",
    ]


def remove_scratch_disk(run_dir: Path) -> None:
    """Delete a run's scratch disk (nothing happens when there is none)."""
    (run_dir / SCRATCH_DISK).unlink(missing_ok=True)
