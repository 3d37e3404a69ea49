"""Fixtures of the qemu platform's tests: one guest image, one good boot, shared by the session.

The image is built (and observed once) in a persistent AICERT_HOME, so later sessions reuse
its Debian packages and wheels: ``$AICERT_QEMU_TEST_HOME`` or ``<tmp>/aicert-qemu-tests``.
Every VM is real: OVMF + swtpm vTPM under qemu software emulation. The wall times of the
build and the boots are printed at the end of the session.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from aicert.flows.providers.attestation import MachineAttestation, attest_machine
from aicert.flows.providers.base import EnrolledKey, Machine
from aicert.flows.providers.qemu import QemuProvider
from aicert.flows.qemu_image import GuestImage, build_guest_image, observe_reference_values
from aicert.guest_runtime.api_models import Health, KeyMaterial, PlatformEvidence
from aicert.model import AppEvent

# A run that only asks for a platform quote: parsed by the agent, never executed.
QUOTE_ONLY_CONFIG: dict[str, Any] = {
    "name": "qemu-tests",
    "source": {"type": "git", "gitRepo": "https://invalid.invalid/none.git"},
    "command": ["true"],
}

WALL_TIMES: dict[str, float] = {}


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if WALL_TIMES:
        terminalreporter.section("qemu platform wall times")
        for name, seconds in WALL_TIMES.items():
            terminalreporter.write_line(f"{name}: {seconds:.1f} s")


@pytest.fixture(scope="session")
def qemu_home() -> Path:
    configured = os.environ.get("AICERT_QEMU_TEST_HOME")
    home = Path(configured) if configured else Path(tempfile.gettempdir()) / "aicert-qemu-tests"
    home.mkdir(parents=True, exist_ok=True)
    return home.resolve()


@pytest.fixture(scope="session")
def guest_image(qemu_home: Path) -> GuestImage:
    started = time.monotonic()
    image = build_guest_image(qemu_home)
    WALL_TIMES["guest image build"] = time.monotonic() - started
    if not image.reference.observed:
        started = time.monotonic()
        image = observe_reference_values(image.directory, qemu_home)
        WALL_TIMES["observation boot (first build only)"] = time.monotonic() - started
    return image


@dataclass(frozen=True)
class QuotedBoot:
    """What a booted VM's agent answered, up to a platform quote (the VM is gone)."""

    machine: Machine
    boot_seconds: float
    health: Health
    start_events: list[AppEvent]
    key_material: KeyMaterial
    enrolled: EnrolledKey | None
    attestation: MachineAttestation | None  # attest_machine, when enrolled
    challenge: bytes
    evidence: PlatformEvidence

    @property
    def pcrs(self) -> dict[int, bytes]:
        return {int(index): bytes.fromhex(value) for index, value in self.evidence.pcrs.items()}


def boot_and_quote(provider: QemuProvider, label: str, *, enroll: bool = False) -> QuotedBoot:
    """Boot a VM, start a run, (enroll its AK,) ask a platform quote, tear the VM down."""
    run_id = f"{label}-{secrets.token_hex(4)}"
    machine = provider.boot(run_id)
    try:
        with machine.client(timeout_s=60.0) as client:
            health = client.health()
            material = client.key_material()
            enrolled = provider.enroll_attestation_key(machine, client) if enroll else None
            attestation = (
                attest_machine(machine, client, enrolled, provider.boot_reference())
                if enrolled
                else None
            )
            events = client.start_run(run_id, secrets.token_bytes(32), QUOTE_ONLY_CONFIG)
            challenge = secrets.token_bytes(32)
            evidence = client.platform_quote(challenge)
    finally:
        provider.teardown(machine)
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
    )


@pytest.fixture(scope="session")
def good_boot(guest_image: GuestImage, qemu_home: Path) -> QuotedBoot:
    started = time.monotonic()
    boot = boot_and_quote(QemuProvider(guest_image.directory, qemu_home), "good", enroll=True)
    WALL_TIMES["good boot: qemu start to agent answering"] = boot.boot_seconds
    WALL_TIMES["good boot: boot, start run, enroll AK, platform quote, teardown"] = (
        time.monotonic() - started
    )
    return boot
