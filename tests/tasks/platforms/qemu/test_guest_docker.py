"""The Docker engine inside the qemu guest: in the image (without what it never runs), started
by /init on its unix socket only before the agent, and running a real container in a VM.

The container check boots the real image with a second cpio appended to its initrd (the
kernel unpacks both; later files win): the same /init plus a step, between "docker engine
ready" and the agent's start, that imports a busybox image made from the guest's own files
and runs it through the engine's socket, the way the agent's docker SDK does. Its findings
go to the serial console, which the test reads. A raw virtio disk stands in for the run's
inputs. The image itself is not changed: the check's boot fails its boot-chain check, which
it does not do.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import secrets
import stat
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from aicert.guest_runtime.api_models import Health
from aicert.tasks.platforms.qemu.image import GuestImage
from aicert.tasks.platforms.qemu.initramfs import write_cpio
from aicert.tasks.platforms.qemu.provider import QemuProvider
from aicert.tasks.platforms.qemu.recipe import (
    DOCKER_DATA_ROOT,
    DOCKER_READY_MESSAGE,
    DOCKER_SOCKET,
    DOCKERD_ARGUMENTS,
    SCRATCH_MOUNT,
)

from .conftest import WALL_TIMES, QuotedBoot
from .test_guest_image import read_cpio

READY_LINE = f"aicert-init: {DOCKER_READY_MESSAGE}"
AGENT_LINE = "aicert-init: starting the guest agent"
AGENT_PORT = 8080

# What the agent needs of the engine: dockerd, the containerd it starts, the v2 shim, runc,
# docker-init (--init), apparmor_parser (dockerd loads its docker-default profile with it).
ENGINE_FILES = (
    "usr/sbin/dockerd",
    "usr/bin/containerd",
    "usr/bin/containerd-shim-runc-v2",
    "usr/sbin/runc",
    "usr/bin/tini-static",
    "usr/sbin/apparmor_parser",
)
# What docker.io and its dependencies install that the engine never runs, listed here rather
# than taken from the recipe so that a change to its prune list shows.
NEVER_RUN = (
    "usr/bin/docker",
    "usr/bin/ctr",
    "usr/bin/dnet",
    "usr/sbin/ovrouter",
    "usr/bin/containerd-shim",
    "usr/bin/containerd-shim-runc-v1",
    "usr/sbin/docker-proxy",
    "usr/bin/tini",
    "usr/sbin/iptables",
    "usr/sbin/xtables-nft-multi",
    "usr/sbin/xtables-legacy-multi",
    "usr/share/bash-completion/completions/docker",
    "usr/share/docker.io/contrib/check-config.sh",
)

# The check run by the test's /init inside the guest (the guest's python3 and docker SDK).
GUEST_CHECK = r"""
import io
import json
import os
import sys
import tarfile
import time
import traceback

import docker

# busybox and what its dynamic linking needs, from the guest's own root.
BUSYBOX_FILES = (
    "usr/bin/busybox",
    "usr/lib/x86_64-linux-gnu/libc.so.6",
    "usr/lib/x86_64-linux-gnu/libresolv.so.2",
    "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
)
CONTAINER_SCRIPT = (
    "echo container-ran; echo apparmor=$(busybox cat /proc/self/attr/current); "
    "echo interfaces=$(busybox ls /sys/class/net); echo cgroup=$(busybox cat /proc/self/cgroup)"
)


def report(line):
    print("aicert-test: " + line, flush=True)


def listeners():
    found = []
    for protocol in ("tcp", "tcp6", "udp", "udp6"):
        with open(f"/proc/net/{protocol}") as table:
            for row in table.read().splitlines()[1:]:
                fields = row.split()
                if protocol.startswith("tcp") and fields[3] != "0A":  # not LISTEN
                    continue
                found.append(f"{protocol}:{int(fields[1].rsplit(':', 1)[1], 16)}")
    return sorted(found)


def busybox_image():
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for name in BUSYBOX_FILES:
            tar.add("/" + name, arcname=name)
        for link, target in (("bin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")):
            entry = tarfile.TarInfo(link)
            entry.type, entry.linkname = tarfile.SYMTYPE, target
            tar.addfile(entry)
        entry = tarfile.TarInfo("usr/lib64/ld-linux-x86-64.so.2")
        entry.type, entry.linkname = tarfile.SYMTYPE, "../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
        tar.addfile(entry)
    return archive.getvalue()


def check_engine():
    report("listeners before the agent: " + json.dumps(listeners()))
    with open("/sys/block/vda/ro") as flag, tarfile.open("/dev/vda") as inputs:
        marker = inputs.extractfile("marker.txt").read().decode().strip()
        report(f"input disk: ro={flag.read().strip()} marker={marker}")
    client = docker.DockerClient(base_url="unix://@SOCKET@", timeout=300)
    info = client.info()
    report(f"engine: driver={info['Driver']} cgroup={info['CgroupVersion']}")
    started = time.monotonic()
    client.api.import_image_from_data(busybox_image(), repository="aicert-test/busybox", tag="1")
    output = client.containers.run(
        "aicert-test/busybox:1",
        ["busybox", "sh", "-c", CONTAINER_SCRIPT],
        network_mode="none",
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        read_only=True,
        pids_limit=64,
        mem_limit="64m",
        remove=True,
    )
    for line in output.decode().splitlines():
        report("container: " + line)
    report(f"container done in {time.monotonic() - started:.1f} s")


def report_agent_listeners():
    deadline = time.monotonic() + 300
    while f"tcp:{@PORT@}" not in listeners() and time.monotonic() < deadline:
        time.sleep(1)
    report("listeners with the agent: " + json.dumps(listeners()))


try:
    check_engine() if sys.argv[1] == "engine" else report_agent_listeners()
except Exception:
    report("check failed: " + traceback.format_exc().replace("\n", " | "))
""".replace("@SOCKET@", DOCKER_SOCKET).replace("@PORT@", str(AGENT_PORT))

GUEST_CHECK_PATH = "aicert-test/check_engine.py"
INPUT_MARKER = "inputs-" + secrets.token_hex(4)


@dataclass(frozen=True)
class EntryInfo:
    mode: int
    link: str | None


@dataclass(frozen=True)
class InitrdListing:
    files: dict[str, EntryInfo]
    init: str


@pytest.fixture(scope="module")
def initrd_listing(guest_image: GuestImage) -> InitrdListing:
    files: dict[str, EntryInfo] = {}
    init = ""
    for entry in read_cpio(gzip.decompress(guest_image.initrd.read_bytes())):
        link = entry.data.decode() if stat.S_ISLNK(entry.mode) else None
        files[entry.name] = EntryInfo(entry.mode, link)
        if entry.name == "init":
            init = entry.data.decode()
    return InitrdListing(files, init)


@pytest.fixture(scope="module")
def initrd_files(initrd_listing: InitrdListing) -> dict[str, EntryInfo]:
    return initrd_listing.files


@pytest.fixture(scope="module")
def init_text(initrd_listing: InitrdListing) -> str:
    return initrd_listing.init


def test_image_holds_the_engine(initrd_files: dict[str, EntryInfo]) -> None:
    for name in ENGINE_FILES:
        assert name in initrd_files, f"{name} is not in the initrd"
        mode = initrd_files[name].mode
        assert stat.S_ISREG(mode) and mode & 0o111, f"{name} is not an executable file"
    # dockerd's --init binary; and the modules overlay2 and the input disk need.
    assert initrd_files["usr/bin/docker-init"].link == "tini-static"
    modules = [Path(name).name for name in initrd_files if name.endswith(".ko")]
    assert {"overlay.ko", "virtio_blk.ko"} <= set(modules)


def test_image_leaves_out_what_the_engine_never_runs(
    initrd_files: dict[str, EntryInfo],
) -> None:
    assert not [name for name in NEVER_RUN if name in initrd_files]
    assert not [name for name in initrd_files if re.fullmatch(r"usr/sbin/.*tables.*", name)]
    assert not [name for name in initrd_files if name.startswith("usr/share/zsh/")]


def test_init_starts_the_engine_on_its_socket_only(init_text: str) -> None:
    hosts = [argument for argument in DOCKERD_ARGUMENTS if argument.startswith("--host")]
    assert hosts == [f"--host=unix://{DOCKER_SOCKET}"]
    for flag in (
        "--bridge=none",
        "--iptables=false",
        "--ip6tables=false",
        "--ip-forward=false",
        "--storage-driver=overlay2",
        f"--data-root={DOCKER_DATA_ROOT}",
    ):
        assert flag in DOCKERD_ARGUMENTS
    assert "tcp://" not in init_text
    # In this order: cgroup2, the run's scratch disk formatted and mounted, the engine's
    # storage bound onto it (not RAM), dockerd, the bounded wait, the agent.
    steps = [
        "mount -t cgroup2",
        "mkfs.ext4 ",
        f'mount -t ext4 -o noinit_itable "$scratch" {SCRATCH_MOUNT}',
        f"mount --bind {SCRATCH_MOUNT}/docker {DOCKER_DATA_ROOT}",
        f"dockerd {' '.join(DOCKERD_ARGUMENTS)}",
        'fail "the docker engine did not come up',
        f'say "{DOCKER_READY_MESSAGE}',
        "python3 -m aicert.guest_runtime.server",
    ]
    positions = [init_text.find(step) for step in steps]
    assert -1 not in positions, dict(zip(steps, positions, strict=True))
    assert positions == sorted(positions)


def test_engine_is_ready_before_the_agent_starts(good_boot: QuotedBoot) -> None:
    serial = Path(good_boot.machine.details["serial_log"]).read_text(errors="replace")
    assert READY_LINE in serial, serial[-2000:]
    assert serial.index(READY_LINE) < serial.index(AGENT_LINE)
    assert "FAILED" not in serial
    assert good_boot.health.status == "ok"


# --- a container in a booted VM -----------------------------------------------------------------


class _ProviderWithInputDisk(QemuProvider):
    """The provider's VM plus a raw read-only virtio disk (the guest's /dev/vda)."""

    def __init__(self, disk: Path, image: GuestImage, home: Path, initrd: Path) -> None:
        super().__init__(image.directory, home, initrd=initrd)
        self.disk = disk

    def qemu_command(
        self,
        run_dir: Path,
        socket_dir: Path,
        port: int,
        name: str,
        accel: Literal["tcg", "kvm"] | None = None,
    ) -> list[str]:
        return [
            *super().qemu_command(run_dir, socket_dir, port, name, accel),
            "-drive",
            f"file={self.disk},format=raw,if=virtio,readonly=on,media=disk",
        ]


def _initrd_with_check(image: GuestImage, init: str, work: Path) -> Path:
    """The image's initrd plus a cpio with a /init that runs GUEST_CHECK before the agent."""
    agent_start = f'say "{AGENT_LINE.removeprefix("aicert-init: ")}'
    assert init.count(agent_start) == 1
    checked = init.replace(
        agent_start,
        f"python3 /{GUEST_CHECK_PATH} engine > /dev/console 2>&1\n"
        f"python3 /{GUEST_CHECK_PATH} agent > /dev/console 2>&1 &\n" + agent_start,
    )
    overlay = work / "overlay"
    (overlay / "aicert-test").mkdir(parents=True)
    (overlay / "init").write_text(checked)
    (overlay / "init").chmod(0o755)
    (overlay / GUEST_CHECK_PATH).write_text(GUEST_CHECK)
    appended = io.BytesIO()
    with gzip.GzipFile(fileobj=appended, mode="wb", compresslevel=1, mtime=0) as compressed:
        write_cpio(overlay, compressed, mtime=0)  # type: ignore[arg-type]
    initrd = work / "initrd-with-check.img"
    initrd.write_bytes(image.initrd.read_bytes() + appended.getvalue())
    return initrd


def _input_disk(path: Path) -> Path:
    data = f"{INPUT_MARKER}\n".encode()
    with tarfile.open(path, "w") as tar:
        entry = tarfile.TarInfo("marker.txt")
        entry.size = len(data)
        tar.addfile(entry, io.BytesIO(data))
    return path


@dataclass(frozen=True)
class CheckedBoot:
    boot_seconds: float
    health: Health
    serial: str

    def reports(self, prefix: str) -> list[str]:
        marker = f"aicert-test: {prefix}"
        return [
            line.split(marker, 1)[1].strip() for line in self.serial.splitlines() if marker in line
        ]


@pytest.fixture(scope="module")
def checked_boot(
    guest_image: GuestImage,
    init_text: str,
    qemu_home: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> CheckedBoot:
    work = tmp_path_factory.mktemp("engine-check")
    provider = _ProviderWithInputDisk(
        _input_disk(work / "inputs.tar"),
        guest_image,
        qemu_home,
        _initrd_with_check(guest_image, init_text, work),
    )
    started = time.monotonic()
    machine = provider.boot(f"engine-check-{secrets.token_hex(4)}")
    serial_log = Path(machine.details["serial_log"])
    try:
        with machine.client(timeout_s=60.0) as client:
            health = client.health()
        # The listener report comes within a second of the agent's socket opening.
        deadline = time.monotonic() + 30
        while "listeners with the agent" not in serial_log.read_text(errors="replace"):
            assert time.monotonic() < deadline, "no listener report from the guest"
            time.sleep(0.5)
    finally:
        provider.teardown(machine)
    WALL_TIMES["engine check boot: qemu start to agent answering"] = machine.details["boot_seconds"]
    WALL_TIMES["engine check boot: boot, container, teardown"] = time.monotonic() - started
    return CheckedBoot(
        float(machine.details["boot_seconds"]), health, serial_log.read_text(errors="replace")
    )


def test_engine_runs_a_container_without_network(checked_boot: CheckedBoot) -> None:
    assert not checked_boot.reports("check failed"), checked_boot.reports("check failed")
    assert checked_boot.reports("engine:") == ["driver=overlay2 cgroup=2"]
    container = checked_boot.reports("container:")
    assert container[0] == "container-ran", checked_boot.serial[-3000:]
    # Confined by dockerd's AppArmor profile, in its own cgroup namespace, loopback only.
    assert "apparmor=docker-default (enforce)" in container
    assert "interfaces=lo" in container
    assert "cgroup=0::/" in container


def test_input_disk_is_read_only_virtio(checked_boot: CheckedBoot) -> None:
    assert checked_boot.reports("input disk:") == [f"ro=1 marker={INPUT_MARKER}"]


def test_nothing_but_the_agent_listens(checked_boot: CheckedBoot) -> None:
    assert checked_boot.reports("listeners before the agent:") == ["[]"]
    assert [json.loads(line) for line in checked_boot.reports("listeners with the agent:")] == [
        [f"tcp:{AGENT_PORT}"]
    ]


def test_agent_answers_after_the_engine_started(checked_boot: CheckedBoot) -> None:
    assert checked_boot.health.status == "ok" and checked_boot.health.platform == "qemu"
    assert checked_boot.serial.index(READY_LINE) < checked_boot.serial.index(AGENT_LINE)
