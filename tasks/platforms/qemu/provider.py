"""The ``qemu`` provider: a VM booted with OVMF and a swtpm vTPM, so the boot chain is measured.

Each run gets a fresh swtpm manufactured like the local platform's (EK certificate from the
project's EK CA, see ``LocalSwtpm.create``), served to qemu on a unix control socket, and a
VM booted from the guest image (``aicert.tasks.platforms.qemu.image``): OVMF measures itself, the
kernel and its setup into PCR 0-7, the kernel's EFI stub measures the command line and the
initrd into PCR 9, and the guest agent reaches the TPM through ``/dev/tpmrm0``. The agent's
port 8080 is forwarded to a free loopback port; qemu's user-mode network is restricted, so
the guest reaches nothing outside the VM. Each VM also gets the run's staged inputs as a
read-only disk and a blank scratch disk of its own (``scratch``), outside the measured boot,
both deleted at teardown.

The accelerator is chosen as ``kvm``'s docstring says (``auto``: KVM only where its probe saw
OVMF run under it). A boot that still dies of KVM (the internal error in qemu's log, or the
VM in run state ``internal-error`` on its monitor) is booted again under ``-accel tcg`` when
the setting was ``auto``: ``machine_problem`` tears that VM and its vTPM process down, logs
why, starts them again (same vTPM state, fresh firmware variables; the failed attempt's logs
kept as ``qemu-kvm.log`` and ``serial-kvm.log``) and records ``accel: tcg`` and
``kvm_failure`` in the machine's details; later VMs of the process go straight to tcg. With
an explicit ``kvm`` the failure is reported at once, naming the cause. A VM that does not
answer within ``boot_timeout_s`` is reported by ``machine_problem`` (and torn down by
``boot``), with the tail of its serial console.

The VM's processes and firmware are ``vm``'s, the accelerator's choice ``kvm``'s and the qemu
monitor ``monitor``'s.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Literal

from aicert.guest_runtime.config import RunConfig
from aicert.hashing import sha256_file
from aicert.reference_values import ReferenceValueSet, VmShape
from aicert.tasks.platforms.agent_client import AgentUnreachableError
from aicert.tasks.platforms.base import Machine, Provider
from aicert.tasks.platforms.local.provider import ProjectTpmMixin
from aicert.tasks.platforms.processes import (
    free_port,
    log_tail,
    process_alive,
    read_pid,
    reap,
    terminate,
)
from aicert.tasks.platforms.qemu.image import GuestImage, load_guest_image
from aicert.tasks.platforms.qemu.kvm import (
    ACCEL_ENV,
    Accelerator,
    accel_from,
    kvm_failed_in_a_boot,
    kvm_failure_in,
    kvm_usable,
    kvm_verdict,
)
from aicert.tasks.platforms.qemu.monitor import ask_monitor
from aicert.tasks.platforms.qemu.recipe import AGENT_PORT
from aicert.tasks.platforms.qemu.scratch import (
    create_scratch_disk,
    inputs_drive,
    remove_scratch_disk,
    scratch_drive,
    scratch_size,
)
from aicert.tasks.platforms.qemu.vm import (
    CPU_MODEL,
    MACHINE_TYPE,
    OVMF_CODE,
    OVMF_VARS,
    QEMU_BINARY,
    QemuProviderError,
    firmware_vm,
    qemu_version,
)
from aicert.tasks.platforms.settings import aicert_home

log = logging.getLogger(__name__)

DEFAULT_MEMORY_MIB = 2048
DEFAULT_SMP = 2
DEFAULT_BOOT_TIMEOUT_S = 180.0
SWTPM_START_TIMEOUT_S = 10.0
HOSTFWD_ATTEMPTS = 4
MONITOR_TIMEOUT_S = 2.0
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


class QemuProvider(ProjectTpmMixin, Provider):
    """VMs booted from a guest image with a fresh vTPM each (see the module docstring)."""

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
        scratch_gib: float | None = None,
    ) -> None:
        """``image``: an image id, folder or manifest (default: the last one built).
        ``accel``: ``auto``, ``tcg`` or ``kvm``; None means ``$AICERT_QEMU_ACCEL``, else
        ``auto`` (see the module's docstring; an invalid value raises QemuProviderError).
        ``kernel``, ``initrd``, ``command_line`` boot something else than the image's own
        (tests of tampered boots); the reference values stay the image's. ``scratch_gib``:
        the size of each run's scratch disk (``scratch``'s docstring; None: derived from
        the staged inputs)."""
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
        self.scratch_gib = scratch_gib
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
    def image(self) -> GuestImage:
        """The guest image this provider boots (loaded and checked on first use)."""
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
            ovmf_code_sha256=sha256_file(OVMF_CODE)[0],
            ovmf_vars_sha256=sha256_file(OVMF_VARS)[0],
        )

    def reference_values(self) -> str | None:
        """The id of the image's reference-value set."""
        return self.image.id

    def boot_reference(self) -> ReferenceValueSet:
        """The reference values of the image this provider boots (for the verifier)."""
        return self.image.reference

    def inputs_disk(self, run_id: str) -> Path:
        """The staged inputs of a run: the VM's read-only disk."""
        return self.run_dir(run_id) / INPUTS_DISK

    def stage_inputs(self, run_id: str, config: RunConfig) -> None:
        """The VM has no network: fetch its inputs here, into the tar it gets as a disk."""
        from aicert.guest_runtime.wheel_cache import DependencyCache
        from aicert.tasks.platforms.staging import write_staged_inputs

        write_staged_inputs(
            config,
            self.inputs_disk(run_id),
            run_id=run_id,
            dependency_cache=DependencyCache.for_home(self.home),
        )

    # -- provisioning --------------------------------------------------------------------------

    def provision(self, run_id: str) -> Machine:
        """Start the run's vTPM and VM (not waiting for the agent: ``wait_until_ready``).

        Raises:
            QemuProviderError: the scratch disk's size cannot hold the staged inputs, OVMF
                is missing, the image was observed on another VM shape, or the vTPM or qemu
                did not start (both are then torn down).
        """
        from aicert.tasks.platforms.swtpm import LocalSwtpm

        run_dir = self.run_dir(run_id)
        inputs = self.inputs_disk(run_id)
        # First: a size that cannot hold the inputs is the caller's setting, not the host's.
        scratch_bytes = scratch_size(
            inputs.stat().st_size if inputs.is_file() else 0, self.scratch_gib
        )
        image = self.image
        for path in (OVMF_CODE, OVMF_VARS):
            if not path.is_file():
                raise QemuProviderError(f"{path} is missing (apt-get install ovmf)")
        if image.reference.vm is not None and image.reference.vm != self.vm_shape():
            raise QemuProviderError(
                f"guest image {image.id} was observed on {image.reference.vm}, this provider "
                f"boots {self.vm_shape()}: its firmware reference values would not match"
            )
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
                "scratch_bytes": scratch_bytes,
            },
        )
        try:
            create_scratch_disk(run_dir, scratch_bytes)
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
                terminate(process.pid, "swtpm")
                raise QemuProviderError(f"the vTPM did not start:\n{log_tail(swtpm_log)}")
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
            *firmware_vm(
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
            *scratch_drive(run_dir),
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
        """The staged inputs as a read-only raw virtio disk (the guest's /dev/vda, found by
        its serial)."""
        disk = run_dir / INPUTS_DISK
        if not disk.is_file():
            return []
        return inputs_drive(disk)

    def _start_qemu(
        self, machine: Machine, run_dir: Path, socket_dir: Path, accel: Literal["tcg", "kvm"]
    ) -> None:
        if shutil.which(QEMU_BINARY) is None:
            raise QemuProviderError(f"{QEMU_BINARY} not found (apt-get install qemu-system-x86)")
        name = f"aicert-{machine.run_id}"
        qemu_log = run_dir / "qemu.log"
        for _ in range(HOSTFWD_ATTEMPTS):
            port = free_port()
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
            if process.poll() is None or "host forwarding" not in log_tail(qemu_log):
                return
        raise QemuProviderError(f"qemu could not forward a port:\n{log_tail(qemu_log)}")

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
        serial = log_tail(Path(details.get("serial_log", "/nonexistent")))
        qemu_pid = details.get("qemu_pid")
        if qemu_pid and not process_alive(int(qemu_pid), str(details.get("qemu_marker"))):
            reap(int(qemu_pid))
            qemu_log = log_tail(Path(details.get("qemu_log", "/nonexistent")))
            return (
                f"the VM exited (qemu pid {qemu_pid}).\nqemu: {qemu_log or '(nothing)'}\n"
                f"serial console ends with:\n{serial}"
            )
        fatal = _FATAL_CONSOLE.search(serial)
        if fatal:
            return f"the VM will not come up ({fatal.group(0).strip()}); serial console:\n{serial}"
        swtpm_pid = details.get("swtpm_pid")
        if swtpm_pid and not process_alive(int(swtpm_pid), "swtpm"):
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
        kvm_failed_in_a_boot(failure)
        terminate(int(details["qemu_pid"]), str(details.get("qemu_marker", QEMU_BINARY)))
        # swtpm --terminate exits with qemu's connection; it must be gone before its socket
        # and state are taken by the new one.
        terminate(int(details["swtpm_pid"]), str(socket_dir))
        for log_file, copy in kept.items():
            with contextlib.suppress(FileNotFoundError):
                log_file.replace(copy)
        # Fresh firmware variables: whatever the failed firmware wrote is not measured; a
        # blank scratch disk: the tcg guest starts from nothing the failed one wrote.
        (run_dir / "OVMF_VARS.fd").unlink(missing_ok=True)
        create_scratch_disk(run_dir, int(details["scratch_bytes"]))
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

    # -- teardown ------------------------------------------------------------------------------

    def teardown(self, machine: Machine) -> None:
        """Stop the VM and its vTPM (also those of a fall back to tcg), remove the sockets
        the staged inputs and the scratch disk; the run's logs stay."""
        details = machine.details
        run_dir = Path(machine.state_dir)
        marker = str(details.get("qemu_marker", QEMU_BINARY))
        # The pid files name the VM of a fall back to tcg that a stale record does not.
        for qemu_pid in (details.get("qemu_pid"), read_pid(run_dir / QEMU_PIDFILE)):
            if qemu_pid:
                terminate(int(qemu_pid), marker)
        socket_dir = details.get("socket_dir")
        for swtpm_pid in (details.get("swtpm_pid"), read_pid(run_dir / SWTPM_PIDFILE)):
            if swtpm_pid:
                terminate(int(swtpm_pid), str(socket_dir or "swtpm"))
        if socket_dir:
            shutil.rmtree(socket_dir, ignore_errors=True)
        # A copy of inputs fetched for the VM (the base image alone is hundreds of MB); the
        # certificate names them, and the run's outputs and logs stay.
        Path(machine.state_dir, INPUTS_DISK).unlink(missing_ok=True)
        remove_scratch_disk(run_dir)

    def outputs_path(self, machine: Machine) -> Path | None:
        """None: the outputs are downloaded from the agent (they live in the VM)."""
        return None
