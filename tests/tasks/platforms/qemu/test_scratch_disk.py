"""The qemu run's scratch disk on the orchestrator's side: its size, the sparse file made per
run, the qemu arguments that attach it, its removal at teardown (also from a crash hook's
record); and the guest's side of a disk too small for the staged inputs.

No VM boots here: the certified run of ``test_qemu_certify`` boots one that uses the disk.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from aicert.guest_runtime.staged_inputs import (
    MANIFEST,
    STAGED_INPUTS_FORMAT,
    StagedInputsError,
    unpack_staged_inputs,
)
from aicert.tasks.platforms.base import Machine
from aicert.tasks.platforms.qemu.provider import QemuProvider
from aicert.tasks.platforms.qemu.scratch import (
    GIB,
    INPUTS_SERIAL,
    SCRATCH_ALLOWANCE_BYTES,
    SCRATCH_DISK,
    SCRATCH_MAX_BYTES,
    SCRATCH_SERIAL,
    create_scratch_disk,
    inputs_drive,
    scratch_drive,
    scratch_size,
)
from aicert.tasks.platforms.qemu.vm import QemuProviderError


def test_without_inputs_the_default_size_is_the_allowance() -> None:
    assert scratch_size(0) == SCRATCH_ALLOWANCE_BYTES


def test_default_size_is_twice_the_inputs_plus_the_allowance() -> None:
    inputs = 5 * GIB
    assert scratch_size(inputs) == 2 * inputs + SCRATCH_ALLOWANCE_BYTES


def test_default_size_is_capped() -> None:
    assert scratch_size(SCRATCH_MAX_BYTES // 2) == SCRATCH_MAX_BYTES


def test_a_given_size_is_used_rounded_to_a_mebibyte() -> None:
    assert scratch_size(0, scratch_gib=3) == 3 * GIB
    assert scratch_size(0, scratch_gib=0.0001) == 1024 * 1024


@pytest.mark.parametrize("gib", [0, -1, SCRATCH_MAX_BYTES / GIB + 1])
def test_a_size_out_of_bounds_is_refused(gib: float) -> None:
    with pytest.raises(QemuProviderError, match=r"scratch_gib: .* is not a size between"):
        scratch_size(0, scratch_gib=gib)


def test_a_size_that_cannot_hold_the_inputs_is_refused() -> None:
    with pytest.raises(QemuProviderError, match=r"scratch_gib: a 1\.00 GiB scratch disk cannot"):
        scratch_size(2 * GIB, scratch_gib=1)


def test_the_disk_is_sparse_and_blank(tmp_path: Path) -> None:
    size = 64 * GIB
    disk = create_scratch_disk(tmp_path, size)
    assert disk == tmp_path / SCRATCH_DISK
    info = disk.stat()
    assert info.st_size == size
    assert info.st_blocks * 512 < 1024 * 1024  # no host space taken before the guest writes


def test_a_disk_left_by_an_earlier_boot_is_replaced_blank(tmp_path: Path) -> None:
    disk = create_scratch_disk(tmp_path, 1024 * 1024)
    disk.write_bytes(b"written by the failed boot" + bytes(100))
    create_scratch_disk(tmp_path, 1024 * 1024)
    assert disk.read_bytes() == bytes(1024 * 1024)


def test_qemu_gets_it_writable_with_its_serial(tmp_path: Path) -> None:
    create_scratch_disk(tmp_path, 1024 * 1024)
    drive, device = scratch_drive(tmp_path)[1], scratch_drive(tmp_path)[3]
    assert drive.startswith(f"file={tmp_path / SCRATCH_DISK},format=raw,")
    assert "readonly" not in drive
    assert f"serial={SCRATCH_SERIAL}" in device
    assert f"serial={INPUTS_SERIAL}" in inputs_drive(tmp_path / "inputs.tar")[3]
    assert "readonly=on" in inputs_drive(tmp_path / "inputs.tar")[1]


def test_a_missing_disk_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(QemuProviderError, match=f"scratch disk {tmp_path / SCRATCH_DISK} is"):
        scratch_drive(tmp_path)


def test_provision_refuses_a_size_below_the_inputs_before_starting_anything(
    tmp_path: Path,
) -> None:
    provider = QemuProvider(home=tmp_path, scratch_gib=0.01)
    run_id = "too-small"
    inputs = provider.inputs_disk(run_id)
    inputs.parent.mkdir(parents=True)
    with inputs.open("wb") as handle:
        handle.truncate(100 * 1024 * 1024)
    with pytest.raises(QemuProviderError, match=r"cannot hold the run.s 0\.10 GiB of staged"):
        provider.provision(run_id)
    assert sorted(path.name for path in inputs.parent.iterdir()) == ["inputs.tar"]


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "runs" / "torn-down"
    folder.mkdir(parents=True)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_teardown_removes_the_disk_and_the_inputs_keeps_the_logs(
    tmp_path: Path, run_dir: Path
) -> None:
    """The teardown a crash hook or ``aicert`` cleanup does: from the saved Machine alone."""
    create_scratch_disk(run_dir, 8 * GIB)
    (run_dir / "inputs.tar").write_bytes(b"inputs")
    (run_dir / "serial.log").write_text("console\n")
    machine = Machine(provider="qemu", run_id="torn-down", agent_url="", state_dir=str(run_dir))
    provider = QemuProvider(home=tmp_path)
    provider.teardown(machine)
    assert sorted(path.name for path in run_dir.iterdir()) == ["serial.log"]
    provider.teardown(machine)  # a second teardown (the hook after the flow's) is harmless


def _staged_tar(path: Path) -> Path:
    manifest = json.dumps({"format": STAGED_INPUTS_FORMAT}).encode()
    with tarfile.open(path, "w") as archive:
        member = tarfile.TarInfo(MANIFEST)
        member.size = len(manifest)
        archive.addfile(member, io.BytesIO(manifest))
    return path


def test_the_guest_refuses_inputs_larger_than_the_room_left(tmp_path: Path) -> None:
    """A scratch disk too small for the inputs: refused before anything is read, naming it."""
    device = _staged_tar(tmp_path / "inputs.tar")
    free = shutil.disk_usage(tmp_path).free
    # Sparse: a "device" larger than the room left, as a too small scratch disk sees it.
    os.truncate(device, free + GIB)
    with pytest.raises(StagedInputsError, match=r"scratch disk: .* GB free, the staged inputs"):
        unpack_staged_inputs(device, tmp_path / "unpacked", lambda _: [])
    assert not any((tmp_path / "unpacked").iterdir())


def test_the_guest_unpacks_inputs_that_fit(tmp_path: Path) -> None:
    device = _staged_tar(tmp_path / "inputs.tar")
    unpacked = unpack_staged_inputs(device, tmp_path / "unpacked", lambda _: [])
    assert unpacked.manifest == {"format": STAGED_INPUTS_FORMAT}
