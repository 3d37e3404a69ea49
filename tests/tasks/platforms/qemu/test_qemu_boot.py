"""Real boots under OVMF + swtpm + qemu (the provider's accelerator: tcg where KVM fails its
probe): the good image, a tampered command line, a tampered initrd, and VMs that never come
up."""

from __future__ import annotations

import gzip
import os
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from aicert.chain import leaf_public_key_matches, verify_ak_chain
from aicert.errors import PlatformError
from aicert.tasks.platforms.base import Machine
from aicert.tasks.platforms.qemu.image import GuestImage
from aicert.tasks.platforms.qemu.monitor import ask_monitor
from aicert.tasks.platforms.qemu.provider import MONITOR_SOCKET, QemuProvider
from aicert.tasks.platforms.qemu.vm import QemuProviderError
from aicert.tpm_structures import parse_tpmt_public

from .conftest import WALL_TIMES, QuotedBoot, certified_boot, process_gone, verify_against

NEVER_BOOTS_BOUND_S = 90.0


def test_vm_boots_and_the_agent_answers(good_boot: QuotedBoot) -> None:
    assert good_boot.health.platform == "qemu"
    assert good_boot.health.status == "ok"
    assert [event.type for event in good_boot.start_events] == [
        "aicert.runtime",
        "aicert.input.config",
    ]
    assert good_boot.boot_seconds > 0  # bounded by the provider's boot timeout


def test_vm_is_torn_down_after_use(good_boot: QuotedBoot) -> None:
    details = good_boot.machine.details
    assert process_gone(int(details["qemu_pid"]))
    assert process_gone(int(details["swtpm_pid"]))
    assert not Path(details["socket_dir"]).exists()


def test_attestation_key_is_certified_by_the_platform_ca(good_boot: QuotedBoot) -> None:
    enrolled = good_boot.enrolled
    assert enrolled is not None and enrolled.trusted_root_pem is not None
    assert enrolled.ek_certificate_pem is not None
    root = x509.load_pem_x509_certificate(enrolled.trusted_root_pem.encode())
    chain = verify_ak_chain(
        enrolled.ak_certificate_chain, trusted_roots=[root], at_time=datetime.now(UTC)
    )
    ak = parse_tpmt_public(good_boot.evidence.ak_public)
    assert leaf_public_key_matches(chain.leaf, ak.to_cryptography_key())
    assert ak.is_restricted_signing_key()


def test_platform_quote_and_boot_log_verify(good_boot: QuotedBoot, guest_image: GuestImage) -> None:
    # What the provider checks before sending a workload (AK certified, quote, boot log) ...
    attestation = good_boot.attestation
    assert attestation is not None
    assert attestation.boot_chain is not None and guest_image.id in attestation.boot_chain
    # The agent's TLS key is the machine's first PCR 14 event, and the one the client pinned.
    assert attestation.channel_key_sha256 is not None
    assert good_boot.machine.agent_certificate_pem is not None
    assert good_boot.evidence.channel_key is not None
    assert good_boot.evidence.channel_key["public_key_sha256"] == attestation.channel_key_sha256
    # ... and the same check on the quote the test asked itself.
    verify_against(good_boot, guest_image)
    observed = guest_image.reference.pcr_values()
    assert {i: good_boot.pcrs[i] for i in range(10)} == observed
    # Not a local-platform TPM: the firmware measured something into PCR 0-7.
    assert all(good_boot.pcrs[i] != bytes(32) for i in range(8))


def _assert_refused_and_certificate_fails(
    boot: QuotedBoot, guest_image: GuestImage, component: str
) -> None:
    """The flow's check refuses the machine before the run; a certificate of a run done on
    it anyway (the agent driven directly) fails verification on exactly that component."""
    assert isinstance(boot.refusal, PlatformError), boot.refusal
    assert str(boot.refusal).startswith(component), boot.refusal
    assert boot.certificate is not None and boot.enrolled is not None
    roots = [boot.enrolled.trusted_root_pem or ""]
    with pytest.raises(PlatformError, match=rf"^{component}"):
        boot.certificate.verify(trusted_roots=roots, reference_values=guest_image.reference)
    # Everything else about that certificate holds: only the boot chain is wrong.
    with pytest.raises(PlatformError, match="no reference-value set was given"):
        boot.certificate.verify(trusted_roots=roots)


def test_tampered_command_line_fails_on_the_command_line(
    guest_image: GuestImage, qemu_home: Path, tiny_run_config: dict[str, Any]
) -> None:
    extra_word = guest_image.command_line + " nokaslr"
    provider = QemuProvider(guest_image.directory, qemu_home, command_line=extra_word)
    started = time.monotonic()
    boot = certified_boot(provider, "tampered-cmdline", tiny_run_config)
    WALL_TIMES["tampered command line boot + certified run"] = time.monotonic() - started
    with pytest.raises(PlatformError, match=r"^kernel command line: measured digest"):
        verify_against(boot, guest_image)
    _assert_refused_and_certificate_fails(boot, guest_image, "kernel command line")


def _tamper_one_byte(initrd: Path, member: bytes, destination: Path) -> None:
    """``initrd`` with the first byte of file ``member``'s contents changed (the archive stays
    a valid gzip'ed cpio, so the VM still boots)."""
    archive = bytearray(gzip.decompress(initrd.read_bytes()))
    offset = 0
    while True:
        assert archive[offset : offset + 6] == b"070701", "not a newc cpio"
        fields = [int(archive[offset + 6 + 8 * i : offset + 14 + 8 * i], 16) for i in range(13)]
        size, name_size = fields[6], fields[11]
        name_end = offset + 110 + name_size
        data = name_end + (-name_end % 4)
        if archive[offset + 110 : name_end - 1] == member:
            assert size > 0
            archive[data] ^= 0x01
            break
        assert archive[offset + 110 : name_end - 1] != b"TRAILER!!!", f"{member!r} not found"
        offset = data + size + (-size % 4)
    destination.write_bytes(gzip.compress(bytes(archive), compresslevel=1, mtime=0))


def test_tampered_initrd_fails_on_the_initrd(
    guest_image: GuestImage, qemu_home: Path, tmp_path: Path, tiny_run_config: dict[str, Any]
) -> None:
    tampered = tmp_path / "initrd.img"
    _tamper_one_byte(guest_image.initrd, b"etc/hostname", tampered)
    provider = QemuProvider(guest_image.directory, qemu_home, initrd=tampered)
    started = time.monotonic()
    boot = certified_boot(provider, "tampered-initrd", tiny_run_config)
    WALL_TIMES["tampered initrd boot + certified run"] = time.monotonic() - started
    with pytest.raises(PlatformError, match=r"^initrd: measured SHA-256"):
        verify_against(boot, guest_image)
    _assert_refused_and_certificate_fails(boot, guest_image, "initrd")


def _assert_torn_down(machine: Machine) -> None:
    details = machine.details
    assert process_gone(int(details["qemu_pid"])), "qemu still runs"
    assert process_gone(int(details["swtpm_pid"])), "the vTPM still runs"
    assert not Path(details["socket_dir"]).exists()


def test_garbage_kernel_is_reported_and_torn_down(
    guest_image: GuestImage, qemu_home: Path, tmp_path: Path
) -> None:
    garbage = tmp_path / "vmlinuz"
    garbage.write_bytes(os.urandom(4 << 20))
    provider = QemuProvider(guest_image.directory, qemu_home, kernel=garbage, boot_timeout_s=60)
    machine = provider.provision(f"garbage-kernel-{secrets.token_hex(4)}")
    started = time.monotonic()
    try:
        with pytest.raises(QemuProviderError, match="the VM exited") as failure:
            provider.wait_until_ready(machine)
    finally:
        provider.teardown(machine)
    elapsed = time.monotonic() - started
    WALL_TIMES["garbage kernel: reported after"] = elapsed
    assert elapsed < NEVER_BOOTS_BOUND_S
    assert "qemu" in str(failure.value)
    _assert_torn_down(machine)


def test_guest_that_never_answers_is_reported_at_its_deadline(
    guest_image: GuestImage, qemu_home: Path
) -> None:
    # A real kernel and initrd whose init waits forever on the console: no agent, no exit.
    stuck = guest_image.command_line.replace("rdinit=/init", "rdinit=/usr/bin/cat")
    provider = QemuProvider(guest_image.directory, qemu_home, command_line=stuck, boot_timeout_s=20)
    started = time.monotonic()
    machine = provider.provision(f"never-answers-{secrets.token_hex(4)}")
    try:
        with pytest.raises(QemuProviderError, match="did not boot: no agent after 20 s"):
            provider.wait_until_ready(machine)
    finally:
        provider.teardown(machine)
    elapsed = time.monotonic() - started
    WALL_TIMES["stuck guest: reported and torn down after"] = elapsed
    assert elapsed < NEVER_BOOTS_BOUND_S
    _assert_torn_down(machine)


def test_teardown_needs_only_the_machine_details(guest_image: GuestImage, qemu_home: Path) -> None:
    provider = QemuProvider(guest_image.directory, qemu_home, boot_timeout_s=60)
    machine = provider.provision(f"teardown-{secrets.token_hex(4)}")
    try:
        assert provider.machine_problem(machine) is None
        # The operator's monitor (deployments/qemu/README.md) answers while the VM runs.
        monitor = Path(machine.details["socket_dir"]) / MONITOR_SOCKET
        assert "VM status: running" in ask_monitor(monitor, "info status")
        crossed = Machine.model_validate_json(machine.model_dump_json())
        other = QemuProvider(guest_image.directory, qemu_home)
        other.teardown(crossed)
        other.teardown(crossed)
        _assert_torn_down(machine)
        assert provider.machine_problem(machine) is not None
    finally:
        provider.teardown(machine)
