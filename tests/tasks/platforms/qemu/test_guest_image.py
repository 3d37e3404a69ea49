"""The guest image recipe: reproducible, normalized, small, and what its manifest says."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from aicert.reference_values import load_options_digest
from aicert.tasks.platforms.qemu.build import assemble_image, default_inputs, prepare_inputs
from aicert.tasks.platforms.qemu.image import GuestImage, image_id_for
from aicert.tasks.platforms.qemu.initramfs import write_cpio
from aicert.tasks.platforms.qemu.provider import QemuProvider
from aicert.tasks.platforms.qemu.recipe import (
    DOCKERD_ARGUMENTS,
    GUEST_KERNEL_MODULES,
    KERNEL_COMMAND_LINE,
)
from aicert.tasks.platforms.qemu.wheels import guest_python_pins

from .conftest import WALL_TIMES

# 121 MB with the Docker engine; its unpruned CLIs and tools would add about 45 MB.
MAX_INITRD_BYTES = 130 * 1000 * 1000


@dataclass(frozen=True)
class CpioEntry:
    name: str
    mode: int
    uid: int
    gid: int
    mtime: int
    rdev: tuple[int, int]
    data: bytes


def read_cpio(archive: bytes) -> Iterator[CpioEntry]:
    """The entries of a newc archive (an independent reader of what write_cpio writes)."""
    offset = 0
    while True:
        assert archive[offset : offset + 6] == b"070701", f"bad magic at {offset}"
        fields = [int(archive[offset + 6 + 8 * i : offset + 14 + 8 * i], 16) for i in range(13)]
        name_end = offset + 110 + fields[11]
        name = archive[offset + 110 : name_end - 1].decode()
        start = name_end + (-name_end % 4)
        size = fields[6]
        if name == "TRAILER!!!":
            return
        yield CpioEntry(
            name=name,
            mode=fields[1],
            uid=fields[2],
            gid=fields[3],
            mtime=fields[5],
            rdev=(fields[9], fields[10]),
            data=archive[start : start + size],
        )
        offset = start + size + (-size % 4)


@pytest.fixture(scope="module")
def initrd_entries(guest_image: GuestImage) -> dict[str, CpioEntry]:
    return {
        entry.name: entry for entry in read_cpio(gzip.decompress(guest_image.initrd.read_bytes()))
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_manifest_describes_the_image_files(guest_image: GuestImage, qemu_home: Path) -> None:
    reference = guest_image.reference
    assert reference.kernel_sha256 == _sha256(guest_image.kernel)
    assert reference.initrd_sha256 == _sha256(guest_image.initrd)
    assert reference.command_line == KERNEL_COMMAND_LINE
    assert reference.load_options == KERNEL_COMMAND_LINE + " initrd=initrd"
    assert reference.load_options_sha256 == load_options_digest(reference.load_options).hex()
    assert reference.id == image_id_for(
        reference.kernel_sha256, reference.initrd_sha256, reference.command_line
    )
    assert reference.observed and reference.kernel_pcr4_digest_source == "observed"
    assert reference.vm == QemuProvider(guest_image.directory, qemu_home).vm_shape()
    assert reference.build["kernel_package"].startswith("linux-image-")
    assert "python3" in reference.build["debian_packages"]


def test_rebuild_from_the_same_inputs_gives_the_same_digests(
    guest_image: GuestImage, qemu_home: Path, tmp_path: Path
) -> None:
    inputs = default_inputs()
    debian, wheels = prepare_inputs(inputs, qemu_home)
    started = time.monotonic()
    kernel, initrd, _ = assemble_image(inputs, debian, wheels, tmp_path / "rebuild")
    WALL_TIMES["initrd rebuild from cached inputs"] = time.monotonic() - started
    assert kernel == guest_image.reference.kernel_sha256
    assert initrd == guest_image.reference.initrd_sha256


def test_image_is_small(guest_image: GuestImage) -> None:
    assert guest_image.initrd.stat().st_size < MAX_INITRD_BYTES


def test_initrd_entries_are_normalized(
    initrd_entries: dict[str, CpioEntry], guest_image: GuestImage
) -> None:
    epoch = guest_image.reference.build["source_date_epoch"]
    names = list(initrd_entries)
    assert names == sorted(names, key=lambda name: name.split("/"))
    assert {entry.mtime for entry in initrd_entries.values()} == {epoch}
    assert {(entry.uid, entry.gid) for entry in initrd_entries.values()} == {(0, 0)}


def test_initrd_holds_the_agent_and_its_init(initrd_entries: dict[str, CpioEntry]) -> None:
    init = initrd_entries["init"]
    assert stat.S_ISREG(init.mode) and init.mode & 0o111
    script = init.data.decode()
    commands = script.replace("\\\n", " ").splitlines()
    background = [" ".join(line.split()) for line in commands if line.rstrip().endswith("&")]
    # Two processes started and kept: the Docker engine (unix socket only) and the agent, on
    # the TPM device, on port 8080.
    assert background == [
        f"dockerd {' '.join(DOCKERD_ARGUMENTS)} < /dev/null > /run/dockerd.log 2>&1 &",
        "/usr/bin/python3 -m aicert.guest_runtime.server --tcti device:/dev/tpmrm0 "
        "--platform qemu --host 0.0.0.0 --port 8080 --work-root /var/lib/aicert/work "
        '--tls "$@" &',
    ]
    # The staged inputs disk, when the provider attached one (found by its serial); TLS always.
    assert 'inputs=$(disk_with_serial aicert-inputs) && set -- --staged-inputs "$inputs"' in script
    # The scratch disk: formatted, mounted on the work root's parent, the engine's storage
    # bound onto it.
    assert 'mount -t ext4 -o noinit_itable "$scratch" /var/lib/aicert' in script
    assert "mount --bind /var/lib/aicert/docker /var/lib/docker" in script
    assert "usr/sbin/mkfs.ext4" in initrd_entries
    assert "--host 0.0.0.0 --port 8080" in script
    assert "mount -t securityfs securityfs /sys/kernel/security" in script
    console = initrd_entries["dev/console"]
    assert stat.S_ISCHR(console.mode) and console.rdev == (5, 1)
    site = "usr/local/lib/python3.11/dist-packages/"
    for module in ("aicert/guest_runtime/server.py", "tpm2_pytss/__init__.py", "uvicorn/main.py"):
        assert site + module in initrd_entries
    modules = initrd_entries["etc/aicert/modules"].data.decode().split()
    loaded = {Path(path).stem.replace("-", "_") for path in modules}
    assert set(GUEST_KERNEL_MODULES) <= loaded
    assert all(path.lstrip("/") in initrd_entries for path in modules)


def test_initrd_holds_only_what_runs_in_the_guest(initrd_entries: dict[str, CpioEntry]) -> None:
    """The verifier and the guest runtime, not the orchestrator's tasks and flows."""
    package = "usr/local/lib/python3.11/dist-packages/aicert/"
    assert package + "verify.py" in initrd_entries
    assert package + "guest_runtime/agent.py" in initrd_entries
    subpackages = {
        name[len(package) :].split("/")[0] for name in initrd_entries if name.startswith(package)
    }
    assert not subpackages & {"tasks", "flows", "exports"}, sorted(subpackages)
    records = [name for name in initrd_entries if name.endswith(".dist-info/RECORD")]
    record = next(initrd_entries[name].data.decode() for name in records if "/aicert-" in name)
    assert "aicert/guest_runtime/agent.py," in record
    assert "aicert/tasks/" not in record and "aicert/flows/" not in record


def test_python_files_are_compiled_without_timestamps(
    initrd_entries: dict[str, CpioEntry],
) -> None:
    compiled = [entry for name, entry in initrd_entries.items() if name.endswith(".pyc")]
    assert len(compiled) > 1000
    # PEP 552 flags word: 0b01 = hash-based, not checked against the source.
    assert {int.from_bytes(entry.data[4:8], "little") for entry in compiled} == {1}


def test_python_pins_are_the_guest_dependencies() -> None:
    names = {pin.split("==")[0] for pin in guest_python_pins()}
    assert {"tpm2-pytss", "fastapi", "uvicorn", "cryptography", "pydantic", "docker"} <= names
    assert "prefect" not in names and "aicert" not in names
    assert not {"rich", "typer", "pygments"} & names  # the verifier CLI's, not the agent's


def _tree(root: Path, order: list[str], mtime: int) -> Path:
    for name in order:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"content of {name}\n")
        os.utime(path, (mtime, mtime))
    (root / "link").symlink_to("a/b.txt")
    return root


def test_cpio_depends_on_names_and_contents_only(tmp_path: Path) -> None:
    first = _tree(tmp_path / "one", ["a/b.txt", "c.txt", "a/a.txt"], 1_000_000)
    second = _tree(tmp_path / "two", ["c.txt", "a/a.txt", "a/b.txt"], 2_000_000)
    archives = []
    for root in (first, second):
        buffer = io.BytesIO()
        assert write_cpio(root, buffer, mtime=42) == 5
        archives.append(buffer.getvalue())
    assert archives[0] == archives[1]
    entries = list(read_cpio(archives[0]))
    assert [entry.name for entry in entries] == ["a", "a/a.txt", "a/b.txt", "c.txt", "link"]
    assert entries[-1].data == b"a/b.txt"
    (second / "c.txt").write_text("changed\n")
    changed = io.BytesIO()
    write_cpio(second, changed, mtime=42)
    assert changed.getvalue() != archives[0]
