"""The qemu processes of the ``qemu`` platform: the binary, the firmware, pids and logs.

What the provider and the KVM probe share: the machine every VM is (q35, OVMF, the CPU
model), the start of its qemu command line, and the helpers that watch, stop and read the
processes a provider started in an earlier call (or an earlier orchestrator): by pid, checked
against a marker in the command line so that a reused pid is never signalled.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

QEMU_BINARY = "qemu-system-x86_64"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
MACHINE_TYPE = "q35"
CPU_MODEL = "max"
LOG_TAIL_BYTES = 3000


class QemuProviderError(RuntimeError):
    """The VM or its vTPM could not be started, or the VM did not boot."""


def process_alive(pid: int, marker: str) -> bool:
    """True when ``pid`` runs and its command line contains ``marker`` (no pid reuse)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return marker in cmdline and state != "Z"


def reap(pid: int) -> None:
    """Collect ``pid``'s exit status if it is our exited child (no zombie left)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def terminate(pid: int, marker: str, grace_s: float = 5.0) -> None:
    """SIGTERM ``pid`` if it still runs ``marker``, then SIGKILL after ``grace_s``."""
    if not process_alive(pid, marker):
        reap(pid)
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        reap(pid)
        if not process_alive(pid, marker):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def log_tail(path: Path, max_bytes: int = LOG_TAIL_BYTES) -> str:
    """The last ``max_bytes`` of a log, decoded, or "(no log)"."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - max_bytes))
            return handle.read().decode(errors="replace").strip()
    except OSError:
        return "(no log)"


def read_pid(path: Path) -> int | None:
    """The pid in a pid file, or None when there is none."""
    try:
        text = path.read_text()[:32].strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def free_port() -> int:
    """A loopback TCP port free now (another process may take it before qemu binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


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
