"""The qemu accelerator: the KVM probe (real OVMF under real qemu), the fall back to tcg of a VM
that dies of KVM, and the explicit choices (argument, block, CLI, ``$AICERT_QEMU_ACCEL``).

This machine's KVM (a nested ``kvm-pvm``) fails the probe: with the provider's CPU model qemu
aborts as the vCPU starts ("failed to set MSR 0x10a"), and with others OVMF dies at once in a
KVM emulation failure. Machines where the probe passes, or where it passes and a boot then
dies, are not at hand: their tests run qemu through ``stand_in_qemu``, a script put first on
PATH that behaves like that machine's qemu under ``-accel kvm`` (the error text is what this
machine's qemu prints) and is the real qemu otherwise.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from aicert.flows.blocks import QemuPlatform
from aicert.tasks.platforms.qemu import kvm
from aicert.tasks.platforms.qemu import provider as qemu_provider
from aicert.tasks.platforms.qemu.image import GuestImage
from aicert.tasks.platforms.qemu.kvm import (
    ACCEL_ENV,
    KvmVerdict,
    kvm_failure_in,
    kvm_verdict,
    probe_kvm,
)
from aicert.tasks.platforms.qemu.provider import QemuProvider
from aicert.tasks.platforms.qemu.vm import QEMU_BINARY, QemuProviderError

from .conftest import WALL_TIMES, QuotedBoot, boot_and_quote, process_gone, verify_against

# What qemu 7.2 printed here when OVMF died under KVM (cpu max,-arch-capabilities), cut after
# the first register lines; qemu then stays up with the guest paused.
KVM_INTERNAL_ERROR = """\
KVM internal error. Suberror: 1
extra data[0]: 0x0000000000000001
extra data[1]: 0xed742dd9e3db9b0f
extra data[2]: 0x0f00000001b8fffc
extra data[3]: 0x0000000000001000
extra data[4]: 0x0000000000000000
extra data[5]: 0x0000000000000000
extra data[6]: 0x0000000000000000
extra data[7]: 0x0000000000000000
emulation failure
EAX=00000000 EBX=00807000 ECX=00000001 EDX=00807154
ESI=00000000 EDI=00000000 EBP=0081fff0 ESP=0081fe70
EIP=fffced45 EFL=00000046 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=0
"""

# The stand-in qemu. Under -accel kvm, by MODE: "internal-error" prints the error above and
# hangs (a paused VM); "monitor" prints nothing and answers `info status` on the VM's monitor
# socket with the internal-error run state; "hang" prints nothing; "exit" fails at start;
# "tcg" runs the real qemu with tcg instead (a stand-in for a KVM that works). Otherwise it
# is the real qemu. Each kvm invocation appends "pid args" to RECORD.
STAND_IN = """\
import os, signal, socket, sys
REAL, MODE, RECORD, ERROR = {real!r}, {mode!r}, {record!r}, {error!r}
args = sys.argv[1:]
if any(a == "-accel" and b == "kvm" for a, b in zip(args, args[1:])):
    with open(RECORD, "a") as record:
        record.write(f"{{os.getpid()}} {{' '.join(args)}}\\n")
    if MODE == "internal-error":
        sys.stderr.write(ERROR)
        sys.stderr.flush()
        signal.pause()
    elif MODE == "monitor":
        path = next(a for a in args if a.startswith("unix:") and "monitor" in a)[5:]
        server = socket.socket(socket.AF_UNIX)
        server.bind(path.split(",")[0])
        server.listen(1)
        while True:
            connection, _ = server.accept()
            connection.sendall(b"QEMU 7.2.22 monitor\\r\\n(qemu) ")
            if b"info status" in connection.recv(4096):
                connection.sendall(b"VM status: paused (internal-error)\\r\\n(qemu) ")
            connection.close()
    elif MODE == "hang":
        signal.pause()
    elif MODE == "exit":
        sys.exit("qemu-system-x86_64: cannot start the machine")
    args[args.index("kvm")] = "tcg"
os.execv(REAL, [REAL, *args])
"""

StandIn = Callable[[str], Path]


@pytest.fixture
def stand_in_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> StandIn:
    """Put a stand-in ``qemu-system-x86_64`` (mode: see STAND_IN) first on PATH; returns the
    file its kvm invocations are recorded in."""
    real = shutil.which(QEMU_BINARY)
    assert real is not None

    def install(mode: str) -> Path:
        folder = tmp_path / "stand-in-bin"
        folder.mkdir()
        record = tmp_path / "kvm-invocations"
        script = folder / QEMU_BINARY
        body = STAND_IN.format(real=real, mode=mode, record=str(record), error=KVM_INTERNAL_ERROR)
        script.write_text(f"#!{sys.executable}\n{body}")
        script.chmod(0o755)
        monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
        return record

    return install


@pytest.fixture(autouse=True)
def fresh_accel_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No cached verdict and no $AICERT_QEMU_ACCEL; both restored afterwards."""
    monkeypatch.setattr(kvm, "_kvm_verdict", None)
    monkeypatch.delenv(ACCEL_ENV, raising=False)
    yield


def _recorded_pids(record: Path) -> list[int]:
    return [int(line.split()[0]) for line in record.read_text().splitlines()]


# -- the probe -------------------------------------------------------------------------------


def test_probe_refuses_a_qemu_that_reports_an_emulation_failure(stand_in_qemu: StandIn) -> None:
    """Stand-in for a machine where KVM sets the vCPU up and OVMF then dies: qemu prints the
    internal error and hangs, the guest paused."""
    record = stand_in_qemu("internal-error")
    verdict = probe_kvm()
    assert not verdict.usable
    assert verdict.reason == "KVM internal error. Suberror: 1; emulation failure"
    assert verdict.seconds < 3.0  # seen at once, not at the timeout
    (pid,) = _recorded_pids(record)
    assert process_gone(pid), "the probe left its qemu running"


def test_probe_refuses_a_guest_that_hangs_silently(stand_in_qemu: StandIn) -> None:
    record = stand_in_qemu("hang")
    verdict = probe_kvm(timeout_s=1.0)
    assert not verdict.usable
    assert "wrote nothing on its console within 1 s" in verdict.reason
    assert 1.0 <= verdict.seconds < 4.0
    assert all(process_gone(pid) for pid in _recorded_pids(record))


def test_probe_refuses_a_qemu_that_exits(stand_in_qemu: StandIn) -> None:
    stand_in_qemu("exit")
    verdict = probe_kvm()
    assert not verdict.usable
    assert verdict.reason.startswith("qemu exited (1) under KVM")
    assert "cannot start the machine" in verdict.reason


def test_probe_accepts_ovmf_reaching_its_console(stand_in_qemu: StandIn) -> None:
    """Stand-in for a working KVM: the real qemu and OVMF, under tcg (about 6 s to the
    console here, hence the longer timeout); the probe must see the console's first bytes."""
    record = stand_in_qemu("tcg")
    verdict = probe_kvm(timeout_s=60.0)
    WALL_TIMES["KVM probe stand-in (OVMF under tcg) to the console"] = verdict.seconds
    assert verdict == KvmVerdict(True, "OVMF reached its console under KVM", verdict.seconds)
    (pid,) = _recorded_pids(record)
    assert process_gone(pid)


def test_probe_refuses_a_missing_kvm_device(tmp_path: Path) -> None:
    verdict = probe_kvm(device=tmp_path / "kvm")
    assert not verdict.usable
    assert verdict.reason.endswith("kvm does not exist (no KVM in this kernel or container)")


def test_probe_refuses_a_kvm_device_it_may_not_use() -> None:
    """A device node readable and writable by its group only (like /dev/kvm, root:kvm 0660),
    probed by a user outside that group: as root the probe runs as nobody (root may open
    anything)."""
    folder = Path(tempfile.mkdtemp(prefix="aicert-kvm-perm-"))
    try:
        folder.chmod(0o755)
        device = folder / "kvm"
        device.touch()
        device.chmod(stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IWGRP)
        code = (
            "from pathlib import Path; from aicert.tasks.platforms.qemu.kvm import probe_kvm; "
            f"print(probe_kvm(device=Path({str(device)!r})).reason)"
        )
        command = [sys.executable, "-c", code]
        if os.geteuid() == 0:
            command = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *command]
        else:  # the owner is us: take our own bits away instead
            device.chmod(0)
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == f"no permission to use {device} (not in its group?)"


def test_probe_refuses_when_qemu_is_not_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert probe_kvm() == KvmVerdict(False, f"{QEMU_BINARY} not found", 0.0)


def test_probe_verdict_is_cached_for_the_process() -> None:
    first = kvm_verdict()
    started = time.monotonic()
    assert kvm_verdict() is first
    assert time.monotonic() - started < 0.01


def test_kvm_failure_lines_are_read_from_qemus_log(tmp_path: Path) -> None:
    log = tmp_path / "qemu.log"
    log.write_text("qemu-system-x86_64: warning: host doesn't support pni\n" + KVM_INTERNAL_ERROR)
    assert kvm_failure_in(log) == "KVM internal error. Suberror: 1; emulation failure"
    log.write_text(
        "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69\nqemu-system-x86_64: "
        "../../target/i386/kvm/kvm.c:3183: kvm_buf_set_msrs: Assertion `ret == n' failed.\n"
    )
    assert kvm_failure_in(log) == (
        "error: failed to set MSR 0x10a to 0x69; kvm_buf_set_msrs: Assertion `ret == n' failed."
    )
    log.write_text("qemu-system-x86_64: terminating on signal 15\n")
    assert kvm_failure_in(log) is None
    assert kvm_failure_in(tmp_path / "missing.log") is None


# -- the probe against real boots on this machine --------------------------------------------


def test_probe_verdict_agrees_with_a_real_boot_under_kvm(
    guest_image: GuestImage, qemu_home: Path
) -> None:
    """The real probe, then the guest image booted with an explicit kvm: it comes up exactly
    when the probe said KVM works (here it does not: qemu aborts as the vCPU starts)."""
    verdict = kvm_verdict()
    WALL_TIMES[f"KVM probe on this machine ({'usable' if verdict.usable else 'not usable'})"] = (
        verdict.seconds
    )
    assert verdict.seconds < kvm.KVM_PROBE_TIMEOUT_S + 6.0  # its bound, and the teardown's
    provider = QemuProvider(guest_image.directory, qemu_home, accel="kvm", boot_timeout_s=120)
    started = time.monotonic()
    if verdict.usable:
        boot = boot_and_quote(provider, "kvm-agrees")
        assert boot.machine.details["accel"] == "kvm"
        return
    with pytest.raises(QemuProviderError, match="KVM cannot run this VM") as failure:
        provider.boot(f"kvm-agrees-{os.getpid()}")
    assert time.monotonic() - started < 30.0  # named at once, not at the boot deadline
    assert "asked by the argument" in str(failure.value)


# -- a VM that dies of KVM -------------------------------------------------------------------


def test_a_vm_that_dies_of_kvm_under_auto_is_booted_again_with_tcg(
    guest_image: GuestImage,
    qemu_home: Path,
    stand_in_qemu: StandIn,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Stand-in for the field report (the probe passes, then OVMF dies in a KVM emulation
    failure and the VM hangs): the probe's verdict is set to usable, and the stand-in qemu
    prints the internal error and hangs under kvm; under tcg it is the real qemu."""
    record = stand_in_qemu("internal-error")
    monkeypatch.setattr(kvm, "_kvm_verdict", KvmVerdict(True, "stand-in: the probe passed", 0))
    provider = QemuProvider(guest_image.directory, qemu_home)
    assert provider.accel == "kvm"
    caplog.set_level(logging.INFO, logger=qemu_provider.__name__)
    started = time.monotonic()
    boot = boot_and_quote(provider, "kvm-fallback")
    WALL_TIMES["KVM internal error, then tcg: qemu start to agent answering"] = (
        time.monotonic() - started
    )
    details, run_dir = boot.machine.details, Path(boot.machine.state_dir)
    assert details["accel"] == "tcg"
    assert details["accel_asked"] == "auto"
    assert details["kvm_failure"] == "KVM internal error. Suberror: 1; emulation failure"
    assert details["accel_reason"].startswith("tcg (auto; KVM probe passed but the VM died")
    assert "KVM internal error. Suberror: 1" in (run_dir / "qemu-kvm.log").read_text()
    assert "KVM internal error" not in (run_dir / "qemu.log").read_text()
    (kvm_pid,) = _recorded_pids(record)  # one KVM attempt, and it was torn down
    assert process_gone(kvm_pid)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("booting it again with tcg" in message for message in warnings), warnings
    # The tcg VM is a good one: its firmware and boot measurements are the reference's.
    verify_against(boot, guest_image)
    # Later VMs of the process go straight to tcg.
    assert not kvm.kvm_usable()
    assert QemuProvider(guest_image.directory, qemu_home).accel == "tcg"


def test_an_explicit_kvm_vm_in_internal_error_is_reported_naming_the_cause(
    guest_image: GuestImage, qemu_home: Path, stand_in_qemu: StandIn
) -> None:
    """Stand-in for a VM stopped in run state internal-error with nothing on stderr: only
    its monitor (``info status``) tells; with accel=kvm that is an error, not a fall back."""
    record = stand_in_qemu("monitor")
    provider = QemuProvider(guest_image.directory, qemu_home, accel="kvm", boot_timeout_s=120)
    machine = provider.provision(f"kvm-internal-error-{os.getpid()}")
    started = time.monotonic()
    try:
        with pytest.raises(QemuProviderError) as failure:
            provider.wait_until_ready(machine)
    finally:
        provider.teardown(machine)
    assert time.monotonic() - started < 30.0
    assert str(failure.value) == (
        "KVM cannot run this VM: the VM stopped in run state internal-error (qemu monitor: "
        "info status) (accelerator kvm asked by the argument; auto would boot it with tcg)"
    )
    assert machine.details["accel"] == "kvm"
    (pid,) = _recorded_pids(record)
    assert process_gone(pid)
    assert not Path(machine.details["socket_dir"]).exists()


# -- the explicit choices --------------------------------------------------------------------


def test_env_chooses_the_accelerator_without_a_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    for value, expected in (("tcg", "tcg"), ("kvm", "kvm"), (" TCG ", "tcg")):
        monkeypatch.setenv(ACCEL_ENV, value)
        provider = QemuProvider()
        assert (provider.accel, provider.accel_origin) == (expected, ACCEL_ENV)
        assert provider.accel_reason() == f"{expected}, asked by ${ACCEL_ENV}"
    assert kvm._kvm_verdict is None  # nothing was probed


def test_env_auto_or_empty_means_the_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kvm, "_kvm_verdict", KvmVerdict(False, "stand-in verdict", 0))
    for value in ("auto", ""):
        monkeypatch.setenv(ACCEL_ENV, value)
        provider = QemuProvider()
        assert provider.accel_setting == "auto"
        assert provider.accel == "tcg"
        assert provider.accel_reason() == "tcg (auto; KVM probe: stand-in verdict)"


def test_env_with_an_invalid_value_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ACCEL_ENV, "hvf")
    with pytest.raises(QemuProviderError) as failure:
        QemuProvider()
    assert str(failure.value) == (
        f"{ACCEL_ENV}='hvf' is not a qemu accelerator: choose one of auto, tcg, kvm"
    )
    with pytest.raises(QemuProviderError, match="accel='fast' is not a qemu accelerator"):
        QemuProvider(accel="fast")  # type: ignore[arg-type]


def test_argument_and_block_beat_the_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ACCEL_ENV, "kvm")
    assert QemuProvider(accel="tcg").accel == "tcg"
    block_provider = QemuPlatform(accel="tcg").provider()
    assert isinstance(block_provider, QemuProvider) and block_provider.accel == "tcg"
    unset = QemuPlatform().provider()  # the block's empty field defers to the variable
    assert isinstance(unset, QemuProvider)
    assert (unset.accel, unset.accel_origin) == ("kvm", ACCEL_ENV)


def test_cli_qemu_accel_beats_the_env_and_is_validated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``aicert run --qemu-accel``: its value reaches the provider the flow builds (the run
    stops at the missing config, before any flow); invalid or on another provider: exit 2."""
    from aicert.cli import _register_plugin_commands, app

    _register_plugin_commands()
    runner = CliRunner()
    monkeypatch.setenv(ACCEL_ENV, "kvm")
    missing = str(tmp_path / "missing.yaml")
    result = runner.invoke(
        app, ["run", "--config", missing, "--provider", "qemu", "--qemu-accel", "tcg"]
    )
    assert result.exit_code == 2, result.output
    assert os.environ[ACCEL_ENV] == "tcg"
    assert QemuProvider(tmp_path).accel == "tcg"
    result = runner.invoke(app, ["run", "--provider", "qemu", "--qemu-accel", "hvf"])
    assert result.exit_code == 2
    words = " ".join(result.output.replace("\u2502", " ").split())  # out of rich's box
    assert "'--qemu-accel': Value error, 'hvf' is not one of 'auto', 'tcg', 'kvm'" in words
    result = runner.invoke(app, ["run", "--provider", "local", "--qemu-accel", "tcg"])
    assert result.exit_code == 2
    assert "--qemu-accel applies to --provider qemu" in result.output


def test_the_suites_vms_use_the_providers_decision(good_boot: QuotedBoot) -> None:
    """The fixtures' VMs are booted with the provider's own decision (``auto`` unless
    $AICERT_QEMU_ACCEL says otherwise): on a machine whose KVM fails the probe, under tcg,
    rather than every boot timing out."""
    details = good_boot.machine.details
    if details["accel_asked"] == "auto":
        assert details["accel"] == ("kvm" if kvm_verdict().usable else "tcg")
        assert details["accel_reason"].startswith(f"{details['accel']} (auto; KVM probe: ")
    else:
        assert details["accel"] == details["accel_asked"]
