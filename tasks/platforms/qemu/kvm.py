"""Choosing the accelerator of a ``qemu`` platform VM: KVM only where it really runs guest code.

The accelerator: ``accel`` (the argument, a ``QemuPlatform`` block's field or ``aicert run
--qemu-accel``) when given, else ``$AICERT_QEMU_ACCEL``, else ``auto``; any other value than
``auto``, ``tcg`` or ``kvm`` is an error. ``auto`` uses KVM only when ``probe_kvm`` saw guest
code run under it: the real OVMF firmware, booted with no disk under ``-accel kvm`` with the
provider's CPU model, must write to its serial console within ``KVM_PROBE_TIMEOUT_S``. It
answers no when /dev/kvm is missing or not ours, when qemu aborts as the vCPU starts ("failed
to set MSR"), when qemu reports ``KVM internal error`` / ``emulation failure`` (the guest
hangs, paused) and when nothing comes out in time. A paused VM that only survives a moment
is not enough: on some machines KVM sets up the vCPU and then fails on OVMF's first
instructions. The verdict is cached for the process (a failure answers in well under a
second, a working KVM in about one); a VM that dies of KVM later turns it to no
(``kvm_failed_in_a_boot``).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from aicert.guest_runtime.hostutil import stop_child
from aicert.tasks.platforms.processes import log_tail
from aicert.tasks.platforms.qemu.vm import (
    CPU_MODEL,
    OVMF_CODE,
    OVMF_VARS,
    QEMU_BINARY,
    QemuProviderError,
    firmware_vm,
)

log = logging.getLogger(__name__)

Accelerator = Literal["auto", "tcg", "kvm"]
ACCEL_ENV = "AICERT_QEMU_ACCEL"
KVM_DEVICE = Path("/dev/kvm")
# OVMF reaches its console in about a second under a working KVM (6 s under tcg here): a
# probe still silent after this long is a hang (qemu paused on an error it did not print).
KVM_PROBE_TIMEOUT_S = 5.0
KVM_PROBE_MEMORY_MIB = 256
KVM_LOG_BYTES = 64 * 1024
# The probe's vCPUs: the provider's default (KVM may take one count and not another).
PROBE_SMP = 2
# What qemu prints when KVM cannot run the guest: the internal error (then the VM is paused,
# so qemu stays up and the guest hangs) or a vCPU it could not set up (then qemu aborts).
_KVM_FAILURE = re.compile(
    r"KVM internal error.*|emulation failure.*|error: failed to set MSR.*|"
    r"kvm_\w+: Assertion.*|Could not access KVM kernel module.*|failed to initialize kvm.*",
    re.IGNORECASE,
)


def accel_from(argument: str | None) -> tuple[Accelerator, str]:
    """The accelerator asked for, and who asked: ``argument`` (a block's field, the CLI)
    when given, else ``$AICERT_QEMU_ACCEL`` when set and not empty, else ``auto``.

    Raises:
        QemuProviderError: the argument or the variable is not auto, tcg or kvm.
    """
    if argument is not None:
        return _valid_accel(argument, "accel"), "argument"
    configured = os.environ.get(ACCEL_ENV, "")
    if configured.strip():
        return _valid_accel(configured, ACCEL_ENV), ACCEL_ENV
    return "auto", "default"


def _valid_accel(value: str, origin: str) -> Accelerator:
    choices: tuple[Accelerator, ...] = get_args(Accelerator)
    for choice in choices:
        if value.strip().lower() == choice:
            return choice
    raise QemuProviderError(
        f"{origin}={value[:40]!r} is not a qemu accelerator: choose one of {', '.join(choices)}"
    )


@dataclass(frozen=True)
class KvmVerdict:
    """What the KVM probe found.

    Attributes:
        usable: OVMF ran under KVM up to its console.
        reason: Why (the first line of qemu's complaint, or how far the firmware got).
        seconds: How long the probe took.
    """

    usable: bool
    reason: str
    seconds: float


def _why_no_probe(device: Path) -> str | None:
    """Why KVM cannot even be tried here (no qemu, no device, no permission, no OVMF)."""
    if shutil.which(QEMU_BINARY) is None:
        return f"{QEMU_BINARY} not found"
    if not device.exists():
        return f"{device} does not exist (no KVM in this kernel or container)"
    if not os.access(device, os.R_OK | os.W_OK):
        return f"no permission to use {device} (not in its group?)"
    if not OVMF_CODE.is_file() or not OVMF_VARS.is_file():
        return f"{OVMF_CODE} or {OVMF_VARS} is missing (apt-get install ovmf)"
    return None


def _start_probe_vm(work: Path, cpu: str) -> subprocess.Popen[bytes]:
    """Start OVMF under KVM with no disk, its console and qemu's log in ``work``."""
    vars_copy = work / "vars.fd"
    shutil.copyfile(OVMF_VARS, vars_copy)
    marker = f"aicert-kvm-probe-{os.getpid()}-{work.name}"
    command = firmware_vm(QEMU_BINARY, marker, "kvm", cpu, PROBE_SMP, KVM_PROBE_MEMORY_MIB)
    command += ["-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}"]
    command += ["-serial", f"file:{work / 'serial.log'}"]
    with (work / "qemu.log").open("wb") as output:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _watch_probe_vm(
    process: subprocess.Popen[bytes], work: Path, deadline: float, timeout_s: float
) -> tuple[bool, str]:
    """Watch the probe VM until it shows whether KVM runs it: (usable, why)."""
    console, qemu_log = work / "serial.log", work / "qemu.log"
    while True:
        # The error first: qemu may print it after the firmware wrote something.
        failure = kvm_failure_in(qemu_log)
        if failure is not None:
            return False, failure
        if console.is_file() and console.stat().st_size > 0:
            return True, "OVMF reached its console under KVM"
        if process.poll() is not None:
            complaint = log_tail(qemu_log, 500) or "(nothing on stderr)"
            return False, f"qemu exited ({process.returncode}) under KVM: {complaint}"
        if time.monotonic() > deadline:
            return False, (
                f"OVMF wrote nothing on its console within {timeout_s:g} s under KVM "
                "(the guest hangs)"
            )
        time.sleep(0.02)


def probe_kvm(
    cpu: str = CPU_MODEL,
    timeout_s: float = KVM_PROBE_TIMEOUT_S,
    device: Path = KVM_DEVICE,
) -> KvmVerdict:
    """Boot the provider's OVMF firmware under KVM, with no disk, and watch it run.

    KVM is usable when the firmware writes to its serial console (its boot manager's first
    output: SEC, PEI and DXE ran as guest code) within ``timeout_s``. It is not when
    ``device`` is missing or not readable and writable, when qemu exits (e.g. it aborts as
    the vCPU starts: "failed to set MSR"), when qemu's log reports a KVM internal error or an
    emulation failure (it then stays up, the guest paused), or when the console stays empty
    (a hang). Not cached: ``kvm_verdict`` is.

    Args:
        cpu: The qemu CPU model (the provider's by default; KVM may take one and not another).
        timeout_s: How long the firmware may take to reach its console.
        device: The KVM device node.

    Returns:
        The verdict, its reason and the probe's duration.
    """
    started = time.monotonic()
    started = time.monotonic()
    reason = _why_no_probe(device)
    if reason is not None:
        return KvmVerdict(False, reason, round(time.monotonic() - started, 3))
    with tempfile.TemporaryDirectory(prefix="aicert-kvm-probe-") as folder:
        process = _start_probe_vm(Path(folder), cpu)
        try:
            usable, reason = _watch_probe_vm(process, Path(folder), started + timeout_s, timeout_s)
        finally:
            # Our own child, not yet reaped: its Popen cannot name another process, so no
            # command-line check is needed (one missed a probe qemu once in CI).
            stop_child(process)
    return KvmVerdict(usable, reason, round(time.monotonic() - started, 3))


def kvm_failure_in(qemu_log: Path) -> str | None:
    """The lines of qemu's log saying KVM could not run the guest, joined, or None."""
    try:
        with qemu_log.open("rb") as handle:
            text = handle.read(KVM_LOG_BYTES).decode(errors="replace")
    except OSError:
        return None
    lines = [match.group(0).strip() for match in _KVM_FAILURE.finditer(text)]
    return "; ".join(dict.fromkeys(lines))[:500] or None


_kvm_verdict: KvmVerdict | None = None
_kvm_verdict_lock = threading.Lock()


def kvm_verdict() -> KvmVerdict:
    """``probe_kvm`` once per process (or what a failed KVM boot taught it since)."""
    global _kvm_verdict
    with _kvm_verdict_lock:
        if _kvm_verdict is None:
            _kvm_verdict = probe_kvm()
            log.info(
                "KVM probe: %s in %.2f s (%s)",
                "usable" if _kvm_verdict.usable else "not usable",
                _kvm_verdict.seconds,
                _kvm_verdict.reason,
            )
        return _kvm_verdict


def kvm_usable() -> bool:
    """Whether ``auto`` picks KVM in this process (see ``probe_kvm``)."""
    return kvm_verdict().usable


def kvm_failed_in_a_boot(failure: str) -> None:
    """A KVM boot died although the probe passed: later VMs of the process use tcg."""
    global _kvm_verdict
    with _kvm_verdict_lock:
        _kvm_verdict = KvmVerdict(False, f"a VM died under KVM: {failure}", 0.0)
