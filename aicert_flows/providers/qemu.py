"""The ``qemu`` provider: a VM booted with OVMF and a swtpm vTPM, so the boot chain is measured.

Each run gets a fresh swtpm manufactured like the local platform's (EK certificate from the
project's EK CA, see ``LocalSwtpm.create``), served to qemu on a unix control socket, and a
VM booted from the guest image (``aicert.flows.qemu_image``): OVMF measures itself, the
kernel and its setup into PCR 0-7, the kernel's EFI stub measures the command line and the
initrd into PCR 9, and the guest agent reaches the TPM through ``/dev/tpmrm0``. The agent's
port 8080 is forwarded to a free loopback port; qemu's user-mode network is restricted, so
the guest reaches nothing outside the VM.

Software emulation (``-accel tcg``) is the default: KVM fails on these machines. A VM that
does not answer within ``boot_timeout_s`` is reported by ``machine_problem`` (and torn down
by ``boot``), with the tail of its serial console.
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
import time
from pathlib import Path
from typing import Literal

from aicert.flows.providers.base import EnrolledKey, Machine, Provider
from aicert.flows.providers.enrollment import enroll_with_platform_ca
from aicert.flows.qemu_image import (
    AGENT_PORT,
    GuestImage,
    load_guest_image,
)
from aicert.flows.settings import aicert_home
from aicert.guest_runtime.client import AgentClient, AgentUnreachableError
from aicert.guest_runtime.config import RunConfig
from aicert.reference_values import (
    ReferenceValueSet,
    VmShape,
)

log = logging.getLogger(__name__)

Accelerator = Literal["auto", "tcg", "kvm"]

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
KVM_PROBE_S = 2.0
LOG_TAIL_BYTES = 3000
INPUTS_DISK = "inputs.tar"
MONITOR_SOCKET = "monitor.sock"
# Lines of the guest's serial console that mean it will never come up.
_FATAL_CONSOLE = re.compile(
    r"aicert-init: FAILED.*|Kernel panic.*|the guest agent exited.*|"
    r"BdsDxe: failed to load Boot\S+.*|No bootable option or device was found.*"
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


_kvm_usable: bool | None = None


def kvm_usable() -> bool:
    """Whether qemu can run a VM with KVM here. /dev/kvm being there is not enough: on these
    machines qemu aborts as the vCPU starts ("failed to set MSR"), so a paused VM is started
    and must survive a moment. Cached for the process."""
    global _kvm_usable
    if _kvm_usable is None:
        _kvm_usable = False
        binary = shutil.which(QEMU_BINARY)
        if binary is not None and os.access("/dev/kvm", os.R_OK | os.W_OK):
            probe = [binary, "-machine", MACHINE_TYPE, "-accel", "kvm", "-cpu", CPU_MODEL]
            probe += ["-nodefaults", "-display", "none", "-S", "-m", "64"]
            try:
                subprocess.run(probe, capture_output=True, timeout=KVM_PROBE_S, check=False)
            except subprocess.TimeoutExpired:
                _kvm_usable = True  # still running: the vCPU was set up (run() killed it)
    return _kvm_usable


class QemuProvider(Provider):
    kind = "qemu"

    def __init__(
        self,
        image: str | Path | None = None,
        home: Path | None = None,
        *,
        accel: Accelerator = "auto",
        memory_mib: int = DEFAULT_MEMORY_MIB,
        smp: int = DEFAULT_SMP,
        boot_timeout_s: float = DEFAULT_BOOT_TIMEOUT_S,
        kernel: Path | None = None,
        initrd: Path | None = None,
        command_line: str | None = None,
    ) -> None:
        """``image``: an image id, folder or manifest (default: the last one built).
        ``kernel``, ``initrd``, ``command_line`` boot something else than the image's own
        (tests of tampered boots); the reference values stay the image's."""
        self.home = (home or aicert_home()).resolve()
        self.image_ref = image
        self.accel_setting: Accelerator = accel
        self.memory_mib = memory_mib
        self.smp = smp
        self.boot_timeout_s = boot_timeout_s
        # The flow waits this long for the agent; machine_problem fails it sooner.
        self.agent_start_timeout_s = boot_timeout_s + 10.0
        self.kernel_override = kernel
        self.initrd_override = initrd
        self.command_line_override = command_line
        self._image: GuestImage | None = None

    # -- configuration -------------------------------------------------------------------------

    @property
    def accel(self) -> Literal["tcg", "kvm"]:
        """``auto``: KVM when it works here, else software emulation."""
        if self.accel_setting == "auto":
            return "kvm" if kvm_usable() else "tcg"
        return self.accel_setting

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
        from aicert.flows.providers.staging import write_staged_inputs

        write_staged_inputs(config, self.inputs_disk(run_id), run_id=run_id)

    # -- provisioning --------------------------------------------------------------------------

    def provision(self, run_id: str) -> Machine:
        from aicert.guest_runtime.swtpm import LocalSwtpm

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
                "accel": self.accel,
                "boot_timeout_s": self.boot_timeout_s,
            },
        )
        try:
            machine.details["swtpm_pid"] = self._start_swtpm(run_dir, socket_dir)
            self._start_qemu(machine, run_dir, socket_dir)
        except BaseException:
            self.teardown(machine)
            raise
        log.info(
            "qemu VM for run %s started (pid %s, %s, image %s), agent at %s",
            run_id,
            machine.details["qemu_pid"],
            self.accel,
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

    def qemu_command(self, run_dir: Path, socket_dir: Path, port: int, name: str) -> list[str]:
        image = self.image
        vars_copy = run_dir / "OVMF_VARS.fd"
        if not vars_copy.exists():
            shutil.copyfile(OVMF_VARS, vars_copy)
        kernel = self.kernel_override or image.kernel
        initrd = self.initrd_override or image.initrd
        command_line = self.command_line_override or image.command_line
        return [
            QEMU_BINARY,
            "-name",
            name,
            "-machine",
            MACHINE_TYPE,
            "-accel",
            self.accel,
            "-cpu",
            CPU_MODEL,
            "-smp",
            str(self.smp),
            "-m",
            str(self.memory_mib),
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-drive",
            f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
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
        ]

    @staticmethod
    def _inputs_drive(run_dir: Path) -> list[str]:
        """The staged inputs as a read-only raw virtio disk (the guest's /dev/vda)."""
        disk = run_dir / INPUTS_DISK
        if not disk.is_file():
            return []
        return ["-drive", f"file={disk},format=raw,if=virtio,readonly=on,media=disk"]

    def _start_qemu(self, machine: Machine, run_dir: Path, socket_dir: Path) -> None:
        if shutil.which(QEMU_BINARY) is None:
            raise QemuProviderError(f"{QEMU_BINARY} not found (apt-get install qemu-system-x86)")
        name = f"aicert-{machine.run_id}"
        qemu_log = run_dir / "qemu.log"
        for _ in range(HOSTFWD_ATTEMPTS):
            port = _free_port()
            with qemu_log.open("wb") as output:
                process = subprocess.Popen(
                    self.qemu_command(run_dir, socket_dir, port, name),
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
        details = machine.details
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
        caller tears it down)."""
        started = float(machine.details["started_at"])
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
        boot_seconds = round(time.time() - started, 1)
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
        qemu_pid = details.get("qemu_pid")
        if qemu_pid:
            _terminate(int(qemu_pid), str(details.get("qemu_marker", QEMU_BINARY)))
        socket_dir = details.get("socket_dir")
        swtpm_pid = details.get("swtpm_pid")
        if swtpm_pid:
            _terminate(int(swtpm_pid), str(socket_dir or "swtpm"))
        if socket_dir:
            shutil.rmtree(socket_dir, ignore_errors=True)
        # A copy of inputs fetched for the VM (the base image alone is hundreds of MB); the
        # certificate names them, and the run's outputs and logs stay.
        Path(machine.state_dir, INPUTS_DISK).unlink(missing_ok=True)

    def outputs_path(self, machine: Machine) -> Path | None:
        return None
