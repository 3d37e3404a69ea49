"""Fixtures of the qemu platform's tests: one guest image, one good boot, shared by the session.

The image is built (and observed once) in a persistent AICERT_HOME, so later sessions reuse
its Debian packages and wheels: ``$AICERT_QEMU_TEST_HOME`` or ``<tmp>/aicert-qemu-tests``.
Every change to the source tree (or the recipe, or the installed wheels) is another image,
observed again on its first boot; ``$AICERT_QEMU_TEST_IMAGE`` (an image id in that home)
reuses a built image instead of building, while the tree is being edited.
Every VM is real: OVMF + swtpm vTPM under qemu, with the accelerator the provider decides
(``$AICERT_QEMU_ACCEL``, else ``auto``: KVM only where its probe boots OVMF under it, so on a
machine where KVM half-works the VMs run under tcg instead of hanging). The wall times of the
build and the boots, and the accelerator of the good boot with its reason, are printed at the
end of the session.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import secrets
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from aicert.flows.assemble import assemble_certificate
from aicert.guest_runtime.api_models import Health, KeyMaterial, PlatformEvidence
from aicert.guest_runtime.config import parse_config
from aicert.model import AppEvent, Certificate
from aicert.reference_values import verify_platform_quote
from aicert.tasks.platforms.agent_client import AgentClient, AgentUnreachableError
from aicert.tasks.platforms.attestation import MachineAttestation, attest_machine
from aicert.tasks.platforms.base import EnrolledKey, Machine
from aicert.tasks.platforms.qemu.build import build_guest_image
from aicert.tasks.platforms.qemu.image import GuestImage, load_guest_image
from aicert.tasks.platforms.qemu.observe import observe_reference_values
from aicert.tasks.platforms.qemu.provider import QemuProvider

# A run that only asks for a platform quote: parsed by the agent, never executed.
QUOTE_ONLY_CONFIG: dict[str, Any] = {
    "name": "qemu-tests",
    "source": {"type": "git", "gitRepo": "https://invalid.invalid/none.git"},
    "command": ["true"],
}

WALL_TIMES: dict[str, float] = {}
# Which accelerator the session's VMs got, and why (the good boot's machine details).
ACCELERATOR: list[str] = []
# Certified runs whose guest agent stopped answering mid-run, with the VM's serial console.
AGENT_STALLS: list[str] = []
SERIAL_TAIL_BYTES = 12_000


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if WALL_TIMES:
        terminalreporter.section("qemu platform wall times")
        for name, seconds in WALL_TIMES.items():
            terminalreporter.write_line(f"{name}: {seconds:.1f} s")
    for reason in ACCELERATOR:
        terminalreporter.write_line(f"qemu accelerator of the good boot: {reason}")
    if AGENT_STALLS:
        terminalreporter.section("qemu guest agent stalls (run again on a fresh VM)")
        for report in AGENT_STALLS:
            terminalreporter.write_line(report)


@pytest.fixture(scope="session")
def qemu_home() -> Path:
    configured = os.environ.get("AICERT_QEMU_TEST_HOME")
    home = Path(configured) if configured else Path(tempfile.gettempdir()) / "aicert-qemu-tests"
    home.mkdir(parents=True, exist_ok=True)
    return home.resolve()


@pytest.fixture(scope="session")
def guest_image(qemu_home: Path) -> GuestImage:
    started = time.monotonic()
    reused = os.environ.get("AICERT_QEMU_TEST_IMAGE")
    image = load_guest_image(reused, qemu_home) if reused else build_guest_image(qemu_home)
    WALL_TIMES["guest image build"] = time.monotonic() - started
    if not image.reference.observed:
        started = time.monotonic()
        image = observe_reference_values(image.directory, qemu_home)
        WALL_TIMES["observation boot (first build only)"] = time.monotonic() - started
    return image


@dataclass(frozen=True)
class QuotedBoot:
    """What a booted VM's agent answered, up to a platform quote (the VM is gone); with
    ``certify``, also whether the orchestrator's check refused the machine, and the
    certificate of a whole run done on it anyway (driving the agent directly)."""

    machine: Machine
    boot_seconds: float
    health: Health
    start_events: list[AppEvent]
    key_material: KeyMaterial
    enrolled: EnrolledKey | None
    attestation: MachineAttestation | None  # attest_machine, when enrolled
    challenge: bytes
    evidence: PlatformEvidence
    refusal: Exception | None = None  # what attest_machine raised (certify only)
    certificate: Certificate | None = None

    @property
    def pcrs(self) -> dict[int, bytes]:
        return {int(index): bytes.fromhex(value) for index, value in self.evidence.pcrs.items()}


def boot_and_quote(
    provider: QemuProvider,
    label: str,
    *,
    enroll: bool = False,
    certify: dict[str, Any] | None = None,
) -> QuotedBoot:
    """Boot a VM, (enroll its AK,) start a run, ask a platform quote, tear the VM down.

    ``certify``: a run config whose inputs are staged for the VM; the run goes all the way to
    a certificate even when ``attest_machine`` refuses the machine (what a flow would not do:
    it is how a certificate from a tampered boot is made, to show the verifier refuses it)."""
    run_id = f"{label}-{secrets.token_hex(4)}"
    if certify is not None:
        provider.stage_inputs(run_id, parse_config(certify, source="test"))
        enroll = True
    machine = provider.boot(run_id)
    try:
        with _serial_console_on_failure(machine):
            return _quote_on(provider, machine, run_id, enroll, certify)
    finally:
        provider.teardown(machine)


def verify_against(boot: QuotedBoot, image: GuestImage) -> None:
    """Verify ``boot``'s platform quote and boot log against ``image``'s reference values."""
    verify_platform_quote(
        attest=boot.evidence.attest,
        signature=boot.evidence.signature,
        ak_public=boot.evidence.ak_public,
        challenge=boot.challenge,
        pcrs=boot.pcrs,
        boot_event_log=boot.evidence.boot_event_log,
        reference=image.reference,
    )


def process_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (or is a zombie)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state == "Z"


def serial_tail(serial_log: Path) -> str:
    """The end of a VM's serial console log ("" when there is none)."""
    if not serial_log.is_file():
        return ""
    return serial_log.read_bytes()[-SERIAL_TAIL_BYTES:].decode(errors="replace")


@contextlib.contextmanager
def _serial_console_on_failure(machine: Machine) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        console = serial_tail(Path(machine.details.get("serial_log", "/nonexistent")))
        exc.add_note(f"serial console of {machine.run_id} ends with:\n{console}")
        raise


def _quote_on(
    provider: QemuProvider,
    machine: Machine,
    run_id: str,
    enroll: bool,
    certify: dict[str, Any] | None,
) -> QuotedBoot:
    refusal: Exception | None = None
    certificate: Certificate | None = None
    with machine.client(timeout_s=300.0) as client:
        health = client.health()
        material = client.key_material()
        enrolled = provider.enroll_attestation_key(machine, client) if enroll else None
        attestation = None
        if enrolled is not None:
            try:
                attestation = attest_machine(machine, client, enrolled, provider.boot_reference())
            except Exception as exc:
                if certify is None:
                    raise
                refusal = exc
        events = client.start_run(run_id, secrets.token_bytes(32), certify or QUOTE_ONLY_CONFIG)
        challenge = secrets.token_bytes(32)
        evidence = client.platform_quote(challenge)
        if certify is not None:
            assert enrolled is not None
            certificate = _finish_run(client, run_id, enrolled, provider)
    return QuotedBoot(
        machine=machine,
        boot_seconds=float(machine.details["boot_seconds"]),
        health=health,
        start_events=events,
        key_material=material,
        enrolled=enrolled,
        attestation=attestation,
        challenge=challenge,
        evidence=evidence,
        refusal=refusal,
        certificate=certificate,
    )


def certified_boot(provider: QemuProvider, label: str, config: dict[str, Any]) -> QuotedBoot:
    """``boot_and_quote`` with a whole certified run. Under tcg the guest agent has, rarely,
    stopped answering TLS handshakes mid-run with the guest's CPUs busy (cause not found yet:
    deployments/qemu/README.md); such a run is done once more on a fresh VM, and the stalled
    VM's console (with the agent's thread stacks, dumped when its event loop stops) is
    reported at the end of the session. Any other failure, or a second stall, fails."""
    try:
        return boot_and_quote(provider, label, certify=config)
    except AgentUnreachableError as exc:
        AGENT_STALLS.append(f"{label}: {exc}\n" + "\n".join(getattr(exc, "__notes__", [])))
    return boot_and_quote(provider, label, certify=config)


def _finish_run(
    client: AgentClient, run_id: str, enrolled: EnrolledKey, provider: QemuProvider
) -> Certificate:
    client.measure_inputs(run_id)
    client.build_image(run_id)
    client.start_training(run_id)
    status = client.follow_training(run_id, lambda _: None, poll_wait_s=5.0)
    assert status.state == "succeeded", status
    client.measure_outputs(run_id)
    return assemble_certificate(
        evidence=client.quote(run_id),
        enrolled=enrolled,
        project="qemu-tests",
        provider="qemu",
        reference_values=provider.reference_values(),
    )


@pytest.fixture(scope="session")
def good_boot(guest_image: GuestImage, qemu_home: Path) -> QuotedBoot:
    started = time.monotonic()
    boot = boot_and_quote(QemuProvider(guest_image.directory, qemu_home), "good", enroll=True)
    ACCELERATOR.append(str(boot.machine.details["accel_reason"]))
    WALL_TIMES["good boot: qemu start to agent answering"] = boot.boot_seconds
    WALL_TIMES["good boot: boot, enroll AK, platform quote, start run, teardown"] = (
        time.monotonic() - started
    )
    return boot


# -- a tiny workload for certified runs on tampered VMs ------------------------------------------

# busybox and what its dynamic linking needs, taken from the guest image's own initrd: a
# container image of a few MB that loads in seconds under emulation.
TINY_IMAGE = "aicert-test/busybox:qemu"
TINY_IMAGE_FILES = (
    "usr/bin/busybox",
    "usr/lib/x86_64-linux-gnu/libc.so.6",
    "usr/lib/x86_64-linux-gnu/libresolv.so.2",
    "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
)


@pytest.fixture(scope="session")
def tiny_run_config(
    guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """A run config: a one-file git repository, the tiny image, one output file."""
    import docker

    from tests.tasks.platforms.qemu.test_guest_image import read_cpio

    wanted = set(TINY_IMAGE_FILES)
    files = {
        entry.name: entry.data
        for entry in read_cpio(gzip.decompress(guest_image.initrd.read_bytes()))
        if entry.name in wanted
    }
    assert set(files) == wanted, wanted - set(files)
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for name, data in sorted(files.items()):
            member = tarfile.TarInfo(name)
            member.size, member.mode = len(data), 0o755
            tar.addfile(member, io.BytesIO(data))
        for link, target in (
            ("bin", "usr/bin"),
            ("lib64", "usr/lib/x86_64-linux-gnu"),
        ):
            member = tarfile.TarInfo(link)
            member.type, member.linkname = tarfile.SYMTYPE, target
            tar.addfile(member)
    client = docker.from_env()
    try:
        client.api.import_image_from_data(
            archive.getvalue(), repository=TINY_IMAGE.split(":")[0], tag=TINY_IMAGE.split(":")[1]
        )
    finally:
        client.close()

    repo = tmp_path_factory.mktemp("tiny-repo")
    (repo / "README").write_text("a one-file project for certified runs on tampered VMs\n")
    for args in (
        ["init", "--quiet", "--initial-branch=main"],
        ["add", "README"],
        ["-c", "user.name=t", "-c", "user.email=t@t.invalid", "commit", "--quiet", "-m", "x"],
    ):
        subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)
    return {
        "name": "qemu-tests",
        "source": {"type": "git", "gitRepo": str(repo)},
        "image": TINY_IMAGE,
        "command": ["busybox", "sh", "-c", "echo weights > /workspace/outputs/model.bin"],
        "limits": {"cpus": 1, "memory": "128m", "timeoutSeconds": 300},
    }
