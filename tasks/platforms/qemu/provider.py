"""The ``qemu`` provider: a VM booted with OVMF and a swtpm vTPM, so the boot chain is measured.

Each run gets a fresh swtpm manufactured like the local platform's (EK certificate from the
project's EK CA, see ``LocalSwtpm.create``), served to qemu on a unix control socket, and a
VM booted from the guest image (``aicert.tasks.platforms.qemu.image``): OVMF measures itself, the
kernel and its setup into PCR 0-7, the kernel's EFI stub measures the command line and the
initrd into PCR 9, and the guest agent reaches the TPM through ``/dev/tpmrm0``. The agent's
port 8080 is forwarded to a free loopback port; qemu's user-mode network is restricted, so
the guest reaches nothing outside the VM.

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
second, a working KVM in about one).

A boot that still dies of KVM (the internal error in qemu's log, or the VM in run state
``internal-error`` on its monitor) is booted again under ``-accel tcg`` when the setting was
``auto``: ``machine_problem`` tears that VM and its vTPM process down, logs why, starts them
again (same vTPM state, fresh firmware variables; the failed attempt's logs kept as
``qemu-kvm.log`` and ``serial-kvm.log``) and records ``accel: tcg`` and ``kvm_failure`` in the
machine's details; later VMs of the process go straight to tcg. With an explicit ``kvm`` the
failure is reported at once, naming the cause. A VM that does not answer within
``boot_timeout_s`` is reported by ``machine_problem`` (and torn down by ``boot``), with the
tail of its serial console.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from aicert.guest_runtime.config import RunConfig
from aicert.guest_runtime.hostutil import stop_child
from aicert.reference_values import (
    ReferenceValueSet,
    VmShape,
)
from aicert.tasks.platforms.agent_client import AgentClient, AgentUnreachableError
from aicert.tasks.platforms.base import EnrolledKey, Machine, Provider
from aicert.tasks.platforms.enrollment import enroll_with_platform_ca
from aicert.tasks.platforms.qemu.image import (
    AGENT_PORT,
    GuestImage,
    load_guest_image,
)
from aicert.tasks.platforms.settings import aicert_home

log = logging.getLogger(__name__)

Accelerator = Literal["auto", "tcg", "kvm"]
ACCEL_ENV = "AICERT_QEMU_ACCEL"

QEMU_BINARY = "qemu-system-x86_64"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
MACHINE_TYPE = "q35"
CPU_MODEL = "max"
DEFAULT_MEMORY_MIB = 2048
DEFAULT_SMP = 2
DEFAULT_BOOT_TIMEOUT_S = 180.0
SWTPM_START_TIMEOUT_S = 10.0
HOSTFWD_ATTEMPTS = 4
KVM_DEVICE = Path("/dev/kvm")
# OVMF reaches its console in about a second under a working KVM (6 s under tcg here): a
# probe still silent after this long is a hang (qemu paused on an error it did not print).
KVM_PROBE_TIMEOUT_S = 5.0
KVM_PROBE_MEMORY_MIB = 256
KVM_LOG_BYTES = 64 * 1024
MONITOR_ANSWER_BYTES = 1 << 20
MONITOR_TIMEOUT_S = 2.0
LOG_TAIL_BYTES = 3000
INPUTS_DISK = "inputs.tar"
MONITOR_SOCKET = "monitor.sock"
QEMU_PIDFILE = "qemu.pid"
SWTPM_PIDFILE = "swtpm.pid"
# Where a VM's logs go when it is booted again with tcg (the details naming them, new names).
KVM_LOGS = {"qemu_log": "qemu-kvm.log", "serial_log": "serial-kvm.log"}
# Lines of the guest's serial console that mean it will never come up.
_FATAL_CONSOLE = re.compile(
    r"aicert-init: FAILED.*|Kernel panic.*|the guest agent exited.*|"
    r"BdsDxe: failed to load Boot\S+.*|No bootable option or device was found.*"
)
# What qemu prints when KVM cannot run the guest: the internal error (then the VM is paused,
# so qemu stays up and the guest hangs) or a vCPU it could not set up (then qemu aborts).
_KVM_FAILURE = re.compile(
    r"KVM internal error.*|emulation failure.*|error: failed to set MSR.*|"
    r"kvm_\w+: Assertion.*|Could not access KVM kernel module.*|failed to initialize kvm.*",
    re.IGNORECASE,
)


class QemuProviderError(RuntimeError):
    """The VM or its vTPM could not be started, or the VM did not boot."""


def _process_alive(pid: int, marker: str) -> bool:
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


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _terminate(pid: int, marker: str, grace_s: float = 5.0) -> None:
    if not _process_alive(pid, marker):
        _reap(pid)
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        _reap(pid)
        if not _process_alive(pid, marker):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _tail(path: Path, max_bytes: int = LOG_TAIL_BYTES) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - max_bytes))
            return handle.read().decode(errors="replace").strip()
    except OSError:
        return "(no log)"


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text()[:32].strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def qemu_version() -> str:
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

    def verdict(usable: bool, reason: str) -> KvmVerdict:
        return KvmVerdict(usable, reason, round(time.monotonic() - started, 3))

    binary = shutil.which(QEMU_BINARY)
    if binary is None:
        return verdict(False, f"{QEMU_BINARY} not found")
    if not device.exists():
        return verdict(False, f"{device} does not exist (no KVM in this kernel or container)")
    if not os.access(device, os.R_OK | os.W_OK):
        return verdict(False, f"no permission to use {device} (not in its group?)")
    if not OVMF_CODE.is_file() or not OVMF_VARS.is_file():
        return verdict(False, f"{OVMF_CODE} or {OVMF_VARS} is missing (apt-get install ovmf)")
    with tempfile.TemporaryDirectory(prefix="aicert-kvm-probe-") as folder:
        work = Path(folder)
        vars_copy, console, qemu_log = work / "vars.fd", work / "serial.log", work / "qemu.log"
        shutil.copyfile(OVMF_VARS, vars_copy)
        marker = f"aicert-kvm-probe-{os.getpid()}-{work.name}"
        command = _firmware_vm(binary, marker, "kvm", cpu, DEFAULT_SMP, KVM_PROBE_MEMORY_MIB)
        command += [
            "-drive",
            f"if=pflash,format=raw,unit=1,file={vars_copy}",
            "-serial",
            f"file:{console}",
        ]
        with qemu_log.open("wb") as output:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            deadline = started + timeout_s
            while True:
                # The error first: qemu may print it after the firmware wrote something.
                failure = kvm_failure_in(qemu_log)
                if failure is not None:
                    return verdict(False, failure)
                if console.is_file() and console.stat().st_size > 0:
                    return verdict(True, "OVMF reached its console under KVM")
                if process.poll() is not None:
                    return verdict(
                        False,
                        f"qemu exited ({process.returncode}) under KVM: "
                        f"{_tail(qemu_log, 500) or '(nothing on stderr)'}",
                    )
                if time.monotonic() > deadline:
                    return verdict(
                        False,
                        f"OVMF wrote nothing on its console within {timeout_s:g} s under KVM "
                        "(the guest hangs)",
                    )
                time.sleep(0.02)
        finally:
            # Our own child, not yet reaped: its Popen cannot name another process, so no
            # command-line check is needed (one missed a probe qemu once in CI).
            stop_child(process)


def _firmware_vm(
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


def _kvm_failed_in_a_boot(failure: str) -> None:
    """A KVM boot died although the probe passed: later VMs of the process use tcg."""
    global _kvm_verdict
    with _kvm_verdict_lock:
        _kvm_verdict = KvmVerdict(False, f"a VM died under KVM: {failure}", 0.0)


def ask_monitor(path: Path, command: str, timeout_s: float = 10.0) -> str:
    """Send one command to the qemu human monitor listening on ``path``; return its answer.

    Waits up to ``timeout_s`` for the socket (qemu makes it as it starts) and as long for
    each answer. Raises OSError (TimeoutError included) when the monitor does not answer."""
    deadline = time.monotonic() + timeout_s
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    with socket.socket(socket.AF_UNIX) as monitor:
        monitor.settimeout(timeout_s)
        monitor.connect(str(path))
        _read_until_prompt(monitor)  # the greeting
        monitor.sendall(command.encode() + b"\n")
        return _read_until_prompt(monitor).decode(errors="replace")


def _read_until_prompt(monitor: socket.socket) -> bytes:
    answer = b""
    while not answer.endswith(b"(qemu) "):
        chunk = monitor.recv(4096)
        if not chunk or len(answer) > MONITOR_ANSWER_BYTES:
            raise OSError("the qemu monitor closed or answered too much")
        answer += chunk
    return answer


class QemuProvider(Provider):
    kind = "qemu"

    def __init__(
        self,
        image: str | Path | None = None,
        home: Path | None = None,
        *,
        accel: Accelerator | None = None,
        memory_mib: int = DEFAULT_MEMORY_MIB,
        smp: int = DEFAULT_SMP,
        boot_timeout_s: float = DEFAULT_BOOT_TIMEOUT_S,
        kernel: Path | None = None,
        initrd: Path | None = None,
        command_line: str | None = None,
    ) -> None:
        """``image``: an image id, folder or manifest (default: the last one built).
        ``accel``: ``auto``, ``tcg`` or ``kvm``; None means ``$AICERT_QEMU_ACCEL``, else
        ``auto`` (see the module's docstring; an invalid value raises QemuProviderError).
        ``kernel``, ``initrd``, ``command_line`` boot something else than the image's own
        (tests of tampered boots); the reference values stay the image's."""
        self.home = (home or aicert_home()).resolve()
        self.image_ref = image
        self.accel_setting, self.accel_origin = accel_from(accel)
        self.memory_mib = memory_mib
        self.smp = smp
        self.boot_timeout_s = boot_timeout_s
        # The flow waits this long for the agent; machine_problem fails it sooner. Under auto
        # a KVM boot that dies is booted again with tcg, which gets a whole boot_timeout_s.
        fallback_s = boot_timeout_s if self.accel_setting == "auto" else 0.0
        self.agent_start_timeout_s = boot_timeout_s + fallback_s + 10.0
        self.kernel_override = kernel
        self.initrd_override = initrd
        self.command_line_override = command_line
        self._image: GuestImage | None = None

    # -- configuration -------------------------------------------------------------------------

    @property
    def accel(self) -> Literal["tcg", "kvm"]:
        """``auto``: KVM when ``probe_kvm`` saw OVMF run under it here, else tcg."""
        if self.accel_setting == "auto":
            return "kvm" if kvm_usable() else "tcg"
        return self.accel_setting

    def accel_reason(self) -> str:
        """Why ``accel`` is what it is, for the run's log and the machine's details."""
        if self.accel_setting != "auto":
            asked_by = "$" + ACCEL_ENV if self.accel_origin == ACCEL_ENV else "the argument"
            return f"{self.accel_setting}, asked by {asked_by}"
        verdict = kvm_verdict()
        return f"{self.accel} (auto; KVM probe: {verdict.reason})"

    @property
    def ek_ca_dir(self) -> Path:
        return self.home / "ek-ca"

    @property
    def platform_ca_dir(self) -> Path:
        return self.home / "platform-ca"

    def run_dir(self, run_id: str) -> Path:
        return self.home / "runs" / run_id

    @property
    def image(self) -> GuestImage:
        if self._image is None:
            self._image = load_guest_image(self.image_ref, self.home)
        return self._image

    def vm_shape(self) -> VmShape:
        """The VM this provider boots, as recorded with observed reference values."""
        return VmShape(
            qemu_version=qemu_version(),
            machine=MACHINE_TYPE,
            cpu=CPU_MODEL,
            smp=self.smp,
            memory_mib=self.memory_mib,
            ovmf_code_sha256=_sha256_file(OVMF_CODE),
            ovmf_vars_sha256=_sha256_file(OVMF_VARS),
        )

    def reference_values(self) -> str | None:
        return self.image.id

    def boot_reference(self) -> ReferenceValueSet:
        """The reference values of the image this provider boots (for the verifier)."""
        return self.image.reference

    def inputs_disk(self, run_id: str) -> Path:
        return self.run_dir(run_id) / INPUTS_DISK

    def stage_inputs(self, run_id: str, config: RunConfig) -> None:
        """The VM has no network: fetch its inputs here, into the tar it gets as a disk."""
        from aicert.tasks.platforms.staging import write_staged_inputs

        write_staged_inputs(config, self.inputs_disk(run_id), run_id=run_id)

    # -- provisioning --------------------------------------------------------------------------

    def provision(self, run_id: str) -> Machine:
        from aicert.tasks.platforms.swtpm import LocalSwtpm

        image = self.image
        for path in (OVMF_CODE, OVMF_VARS):
            if not path.is_file():
                raise QemuProviderError(f"{path} is missing (apt-get install ovmf)")
        if image.reference.vm is not None and image.reference.vm != self.vm_shape():
            raise QemuProviderError(
                f"guest image {image.id} was observed on {image.reference.vm}, this provider "
                f"boots {self.vm_shape()}: its firmware reference values would not match"
            )
        run_dir = self.run_dir(run_id)
        run_dir.mkdir(parents=True, exist_ok=True)
        # The vTPM is manufactured like the local platform's (EK certificate from the EK CA);
        # qemu, not the agent, talks to it, through a unix socket (short path: 108 bytes max).
        LocalSwtpm.create(run_dir / "tpm", self.ek_ca_dir)
        socket_dir = Path(tempfile.mkdtemp(prefix="aicert-vtpm-"))
        accel, accel_reason = self.accel, self.accel_reason()  # once: what this VM gets
        machine = Machine(
            provider="qemu",
            run_id=run_id,
            agent_url="",
            state_dir=str(run_dir),
            details={
                "image": image.id,
                "socket_dir": str(socket_dir),
                "serial_log": str(run_dir / "serial.log"),
                "qemu_log": str(run_dir / "qemu.log"),
                "accel": accel,
                "accel_asked": self.accel_setting,
                "accel_reason": accel_reason,
                "boot_timeout_s": self.boot_timeout_s,
            },
        )
        try:
            machine.details["swtpm_pid"] = self._start_swtpm(run_dir, socket_dir)
            self._start_qemu(machine, run_dir, socket_dir, accel)
        except BaseException:
            self.teardown(machine)
            raise
        log.info(
            "qemu VM for run %s started (pid %s, accelerator %s, image %s), agent at %s",
            run_id,
            machine.details["qemu_pid"],
            machine.details["accel_reason"],
            image.id,
            machine.agent_url,
        )
        return machine

    def _start_swtpm(self, run_dir: Path, socket_dir: Path) -> int:
        binary = shutil.which("swtpm")
        if binary is None:
            raise QemuProviderError("swtpm not found (apt-get install swtpm swtpm-tools)")
        control = socket_dir / "swtpm.sock"
        swtpm_log = run_dir / "swtpm.log"
        with swtpm_log.open("ab") as output:
            process = subprocess.Popen(
                [
                    binary,
                    "socket",
                    "--tpm2",
                    "--tpmstate",
                    f"dir={run_dir / 'tpm'}",
                    "--ctrl",
                    f"type=unixio,path={control}",
                    "--log",
                    f"file={swtpm_log},level=1",
                    # For a teardown from a record older than the last (re)start.
                    "--pid",
                    f"file={run_dir / SWTPM_PIDFILE}",
                    # Exit with qemu: a crashed orchestrator leaves no vTPM behind.
                    "--terminate",
                ],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + SWTPM_START_TIMEOUT_S
        while not control.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                _terminate(process.pid, "swtpm")
                raise QemuProviderError(f"the vTPM did not start:\n{_tail(swtpm_log)}")
            time.sleep(0.02)
        return process.pid

    def qemu_command(
        self,
        run_dir: Path,
        socket_dir: Path,
        port: int,
        name: str,
        accel: Literal["tcg", "kvm"] | None = None,
    ) -> list[str]:
        """The qemu command line of a VM (``accel``: default ``self.accel``)."""
        image = self.image
        vars_copy = run_dir / "OVMF_VARS.fd"
        if not vars_copy.exists():
            shutil.copyfile(OVMF_VARS, vars_copy)
        kernel = self.kernel_override or image.kernel
        initrd = self.initrd_override or image.initrd
        command_line = self.command_line_override or image.command_line
        return [
            *_firmware_vm(
                QEMU_BINARY, name, accel or self.accel, CPU_MODEL, self.smp, self.memory_mib
            ),
            "-drive",
            f"if=pflash,format=raw,unit=1,file={vars_copy}",
            "-kernel",
            str(kernel),
            "-initrd",
            str(initrd),
            "-append",
            command_line,
            "-chardev",
            f"socket,id=chrtpm,path={socket_dir / 'swtpm.sock'}",
            "-tpmdev",
            "emulator,id=tpm0,chardev=chrtpm",
            "-device",
            "tpm-tis,tpmdev=tpm0",
            # restrict=on: the guest reaches nothing (host or outside); the forward still works.
            "-netdev",
            f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:{AGENT_PORT}",
            *self._inputs_drive(run_dir),
            # No option ROM: OVMF's own virtio-net driver, no iPXE to load and measure.
            "-device",
            "virtio-net-pci,netdev=n0,romfile=",
            "-device",
            "virtio-rng-pci",
            "-serial",
            f"file:{run_dir / 'serial.log'}",
            # qemu's human monitor, for an operator diagnosing a VM that stopped answering
            # ("info registers -a", "info irq"); only the orchestrator's user reaches it, and
            # the host is not part of what a certificate trusts.
            "-monitor",
            f"unix:{socket_dir / MONITOR_SOCKET},server=on,wait=off",
            # For a teardown from a record older than a fall back to tcg (a new pid).
            "-pidfile",
            str(run_dir / QEMU_PIDFILE),
        ]

    @staticmethod
    def _inputs_drive(run_dir: Path) -> list[str]:
        """The staged inputs as a read-only raw virtio disk (the guest's /dev/vda)."""
        disk = run_dir / INPUTS_DISK
        if not disk.is_file():
            return []
        return ["-drive", f"file={disk},format=raw,if=virtio,readonly=on,media=disk"]

    def _start_qemu(
        self, machine: Machine, run_dir: Path, socket_dir: Path, accel: Literal["tcg", "kvm"]
    ) -> None:
        if shutil.which(QEMU_BINARY) is None:
            raise QemuProviderError(f"{QEMU_BINARY} not found (apt-get install qemu-system-x86)")
        name = f"aicert-{machine.run_id}"
        qemu_log = run_dir / "qemu.log"
        for _ in range(HOSTFWD_ATTEMPTS):
            port = _free_port()
            with qemu_log.open("wb") as output:
                process = subprocess.Popen(
                    self.qemu_command(run_dir, socket_dir, port, name, accel),
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            machine.details["qemu_pid"] = process.pid
            machine.details["qemu_marker"] = name
            machine.details["started_at"] = time.time()
            # The agent serves TLS with a key it measured; wait_until_ready pins it.
            machine.agent_url = f"https://127.0.0.1:{port}"
            # qemu binds the forwarded port at start: another process may have taken it.
            time.sleep(0.3)
            if process.poll() is None or "host forwarding" not in _tail(qemu_log):
                return
        raise QemuProviderError(f"qemu could not forward a port:\n{_tail(qemu_log)}")

    # -- state ---------------------------------------------------------------------------------

    def machine_problem(self, machine: Machine) -> str | None:
        """Why the VM will not come up, or None; a VM that died of KVM under ``auto`` is
        booted again with tcg here (``machine``'s details and agent URL change)."""
        details = machine.details
        if details.get("accel") == "kvm":
            failure = self._kvm_failure(machine)
            if failure is not None:
                if details.get("accel_asked") != "auto":
                    return (
                        f"KVM cannot run this VM: {failure} (accelerator kvm "
                        f"{str(details.get('accel_reason', '')).partition(', ')[2]}; auto "
                        "would boot it with tcg)"
                    )
                try:
                    self._boot_again_with_tcg(machine, failure)
                except QemuProviderError as exc:
                    return f"KVM failed ({failure}) and the tcg boot did not start: {exc}"
                return None
        serial = _tail(Path(details.get("serial_log", "/nonexistent")))
        qemu_pid = details.get("qemu_pid")
        if qemu_pid and not _process_alive(int(qemu_pid), str(details.get("qemu_marker"))):
            _reap(int(qemu_pid))
            qemu_log = _tail(Path(details.get("qemu_log", "/nonexistent")))
            return (
                f"the VM exited (qemu pid {qemu_pid}).\nqemu: {qemu_log or '(nothing)'}\n"
                f"serial console ends with:\n{serial}"
            )
        fatal = _FATAL_CONSOLE.search(serial)
        if fatal:
            return f"the VM will not come up ({fatal.group(0).strip()}); serial console:\n{serial}"
        swtpm_pid = details.get("swtpm_pid")
        if swtpm_pid and not _process_alive(int(swtpm_pid), "swtpm"):
            return f"the vTPM (swtpm pid {swtpm_pid}) exited"
        started = float(details.get("started_at", time.time()))
        timeout = float(details.get("boot_timeout_s", self.boot_timeout_s))
        if time.time() - started > timeout and not self._agent_answers(machine):
            return (
                f"the VM did not boot: no agent after {timeout:.0f} s; serial console ends "
                f"with:\n{serial or '(nothing: the firmware never started the kernel)'}"
            )
        return None

    @staticmethod
    def _kvm_failure(machine: Machine) -> str | None:
        """How KVM failed this VM, from qemu's log or its monitor's run state, or None."""
        details = machine.details
        failure = kvm_failure_in(Path(details.get("qemu_log", "/nonexistent")))
        if failure is not None:
            return failure
        monitor = Path(details.get("socket_dir", "/nonexistent")) / MONITOR_SOCKET
        if not monitor.exists():
            return None
        try:
            status = ask_monitor(monitor, "info status", timeout_s=MONITOR_TIMEOUT_S)
        except OSError:  # busy (an operator is on it) or gone: the log and the exit tell
            return None
        if "internal-error" in status:
            return "the VM stopped in run state internal-error (qemu monitor: info status)"
        return None

    def _boot_again_with_tcg(self, machine: Machine, failure: str) -> None:
        """Replace a VM that died of KVM by a tcg one: same run, same vTPM state."""
        details = machine.details
        run_dir, socket_dir = Path(machine.state_dir), Path(str(details["socket_dir"]))
        kept = {Path(str(details[key])): run_dir / name for key, name in KVM_LOGS.items()}
        log.warning(
            "KVM could not run the VM of run %s (%s): booting it again with tcg; the KVM "
            "attempt's logs are %s",
            machine.run_id,
            failure,
            " and ".join(str(path) for path in kept.values()),
        )
        _kvm_failed_in_a_boot(failure)
        _terminate(int(details["qemu_pid"]), str(details.get("qemu_marker", QEMU_BINARY)))
        # swtpm --terminate exits with qemu's connection; it must be gone before its socket
        # and state are taken by the new one.
        _terminate(int(details["swtpm_pid"]), str(socket_dir))
        for log_file, copy in kept.items():
            with contextlib.suppress(FileNotFoundError):
                log_file.replace(copy)
        # Fresh firmware variables: whatever the failed firmware wrote is not measured.
        (run_dir / "OVMF_VARS.fd").unlink(missing_ok=True)
        for name in ("swtpm.sock", MONITOR_SOCKET):
            (socket_dir / name).unlink(missing_ok=True)
        details.update(
            accel="tcg",
            accel_reason=f"tcg (auto; KVM probe passed but the VM died under KVM: {failure})",
            kvm_failure=failure,
        )
        machine.agent_certificate_pem = None
        details["swtpm_pid"] = self._start_swtpm(run_dir, socket_dir)
        self._start_qemu(machine, run_dir, socket_dir, "tcg")
        log.info(
            "VM of run %s started again with tcg (qemu pid %s), agent at %s",
            machine.run_id,
            details["qemu_pid"],
            machine.agent_url,
        )

    @staticmethod
    def _agent_answers(machine: Machine) -> bool:
        if not machine.agent_url:
            return False
        try:
            machine.probe_agent(timeout_s=3.0)
        except Exception:  # unreachable, or it answered but not as an agent: not up
            return False
        return True

    def wait_until_ready(self, machine: Machine, poll_s: float = 0.5) -> float:
        """Wait for the guest agent and pin its channel certificate on ``machine``; return the
        boot time in seconds (qemu start to the agent's first answer). Raises
        QemuProviderError with the reason when the VM dies or misses its boot deadline (the
        caller tears it down); a VM that dies of KVM under ``auto`` is booted with tcg."""
        while True:
            try:
                pinned, _ = machine.probe_agent(timeout_s=3.0)
                machine.agent_certificate_pem = pinned.agent_certificate_pem
                break
            except (AgentUnreachableError, OSError):
                problem = self.machine_problem(machine)
                if problem is not None:
                    raise QemuProviderError(problem) from None
                time.sleep(poll_s)
        # A fall back to tcg restarted the clock: the boot that answered is timed.
        boot_seconds = round(time.time() - float(machine.details["started_at"]), 1)
        machine.details["boot_seconds"] = boot_seconds
        log.info(
            "VM of run %s booted in %.1f s (%s): firmware, kernel, initrd, agent",
            machine.run_id,
            boot_seconds,
            machine.details.get("accel"),
        )
        return boot_seconds

    def boot(self, run_id: str) -> Machine:
        """Provision and wait for the agent; on any failure tear down and raise."""
        machine = self.provision(run_id)
        try:
            self.wait_until_ready(machine)
        except BaseException:
            self.teardown(machine)
            raise
        return machine

    # -- attestation ---------------------------------------------------------------------------

    def enroll_attestation_key(self, machine: Machine, client: AgentClient) -> EnrolledKey:
        return enroll_with_platform_ca(self.ek_ca_dir, self.platform_ca_dir, machine, client)

    # -- teardown ------------------------------------------------------------------------------

    def teardown(self, machine: Machine) -> None:
        details = machine.details
        run_dir = Path(machine.state_dir)
        marker = str(details.get("qemu_marker", QEMU_BINARY))
        # The pid files name the VM of a fall back to tcg that a stale record does not.
        for qemu_pid in (details.get("qemu_pid"), _read_pid(run_dir / QEMU_PIDFILE)):
            if qemu_pid:
                _terminate(int(qemu_pid), marker)
        socket_dir = details.get("socket_dir")
        for swtpm_pid in (details.get("swtpm_pid"), _read_pid(run_dir / SWTPM_PIDFILE)):
            if swtpm_pid:
                _terminate(int(swtpm_pid), str(socket_dir or "swtpm"))
        if socket_dir:
            shutil.rmtree(socket_dir, ignore_errors=True)
        # A copy of inputs fetched for the VM (the base image alone is hundreds of MB); the
        # certificate names them, and the run's outputs and logs stay.
        Path(machine.state_dir, INPUTS_DISK).unlink(missing_ok=True)

    def outputs_path(self, machine: Machine) -> Path | None:
        return None
