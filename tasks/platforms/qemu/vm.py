"""The qemu processes of the ``qemu`` platform: the binary, the firmware, pids and logs.

What the provider and the KVM probe share: the machine every VM is (q35, OVMF, the CPU
model) and the start of its qemu command line. The processes are watched and stopped with
:mod:`aicert.tasks.platforms.processes`, as every platform's are.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

QEMU_BINARY = "qemu-system-x86_64"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
MACHINE_TYPE = "q35"
CPU_MODEL = "max"


class QemuProviderError(RuntimeError):
    """The VM or its vTPM could not be started, or the VM did not boot."""


def qemu_version() -> str:
    """The installed qemu's version.

    Raises:
        QemuProviderError: qemu is not installed or its version is unreadable.
    """
    binary = shutil.which(QEMU_BINARY)
    if binary is None:
        raise QemuProviderError(f"{QEMU_BINARY} not found (apt-get install qemu-system-x86 ovmf)")
    output = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, check=False, timeout=30
    ).stdout
    match = re.search(r"version (\S+)", output)
    if match is None:
        raise QemuProviderError(f"cannot read the qemu version from {output[:200]!r}")
    return match.group(1)


def firmware_vm(
    binary: str, name: str, accel: str, cpu: str, smp: int, memory_mib: int
) -> list[str]:
    """The start of a qemu command line: the provider's machine and OVMF firmware (its
    variables are the caller's copy), no default devices, no display, no reboot."""
    return [
        binary,
        "-name",
        name,
        "-machine",
        MACHINE_TYPE,
        "-accel",
        accel,
        "-cpu",
        cpu,
        "-smp",
        str(smp),
        "-m",
        str(memory_mib),
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-drive",
        f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
    ]
