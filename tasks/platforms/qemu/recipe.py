"""What the ``qemu`` guest image is made of: the recipe's pins and the build's inputs.

Every constant that decides an image's content lives here (Debian suite and packages, the
kernel and its modules, the kernel command line, the guest's network and Docker engine
settings, what is pruned from the root), with ``BuildInputs``: the mirrors, the source tree,
``SOURCE_DATE_EPOCH`` and the Python pins one build uses. Bump ``RECIPE_VERSION`` when
anything here changes what an image contains.

Cheap to import (the provider reads ``AGENT_PORT``): the pins are resolved in
``aicert.tasks.platforms.qemu.wheels``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

from aicert.guest_runtime.hostutil import ProgressCallback, run_streaming
from aicert.tasks.platforms.qemu.image import GuestImageError

# Bump when anything below changes what an image contains.
RECIPE_VERSION = "2"
# 2024-01-01T00:00:00Z: the time every file of the initramfs carries.
DEFAULT_SOURCE_DATE_EPOCH = 1704067200
DEBIAN_SUITE = "bookworm"
DEBIAN_COMPONENTS = "main"
DEFAULT_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
GUEST_PACKAGES = (
    "python3",
    "busybox",
    "ca-certificates",
    "libtss2-esys-3.0.2-0",
    "libtss2-fapi1",
    "libtss2-mu0",
    "libtss2-rc0",
    "libtss2-sys1",
    "libtss2-tctildr0",
    "libtss2-tcti-device0",
    # The engine that runs the training container (it pulls containerd, runc and tini), and
    # apparmor_parser: the kernel has AppArmor on, so dockerd confines every container with
    # its docker-default profile and refuses to start one it cannot load the profile for.
    "docker.io",
    "apparmor",
)
KERNEL_PACKAGE = "linux-image-cloud-amd64"
# Loaded by /init in dependency order; everything the VM needs that the cloud kernel does
# not build in (its TPM TIS/CRB drivers, securityfs, devtmpfs, cgroup2 with every controller,
# namespaces, seccomp and tmpfs xattrs are built in). overlay: the engine's overlay2 storage;
# virtio_blk: the run's read-only input disk. Containers have no network (--bridge=none,
# --iptables=false), so no veth, bridge or netfilter module.
GUEST_KERNEL_MODULES = ("virtio_pci", "virtio_net", "virtio_rng", "virtio_blk", "overlay")
# What the kernel gets from qemu's -append. OVMF adds " initrd=initrd" (it passes -initrd as
# a file named "initrd") before starting the kernel, and that is what PCR 9 measures.
KERNEL_COMMAND_LINE = "console=ttyS0 quiet panic=-1 rdinit=/init"
OVMF_INITRD_OPTION = " initrd=initrd"
AGENT_PORT = 8080
GUEST_ADDRESS = "10.0.2.15/24"
GUEST_GATEWAY = "10.0.2.2"
GUEST_DNS = "10.0.2.3"
GUEST_SITE_PACKAGES = "usr/local/lib/python3.11/dist-packages"
# Where the guest mounts the run's scratch disk (``scratch``): the work root and the
# engine's storage are on it.
SCRATCH_MOUNT = "/var/lib/aicert"
GUEST_WORK_ROOT = f"{SCRATCH_MOUNT}/work"
# The packages the guest runs: the verifier and the agent. Every other part of the project
# (the orchestrator's tasks and flows, the exports) is left out of the guest.
GUEST_PACKAGES_OF_AICERT = ("aicert", "aicert.guest_runtime")
# The build backend of the aicert wheel, pinned so the wheel's metadata does not change with
# setuptools releases.
BUILD_BACKEND_PINS = ("setuptools==80.9.0",)
# Files in the Debian root that nothing in the guest uses: dpkg path-excludes (packages
# still ship files under /lib, which merged-/usr maps to /usr/lib: both spellings), then
# files removed after installation (glob patterns; Perl, Essential for dpkg's scripts;
# udev's hardware database, pulled in by tpm-udev). About 35 MB of 230 before the engine.
DPKG_PATH_EXCLUDES = (
    "/usr/share/man/*",
    "/usr/share/doc/*",
    "/usr/share/locale/*",
    "/usr/share/info/*",
    "/usr/share/lintian/*",
    "/usr/share/bash-completion/*",
    "/usr/share/zsh/*",
    "/usr/share/fish/*",
    "/lib/udev/hwdb.d/*",
    "/usr/lib/udev/hwdb.d/*",
)
# The Docker engine is driven through its API socket only (the agent uses the docker SDK),
# and containers never get a network. What the engine never runs goes, 119 MB of the 263 MB
# that docker.io, containerd, runc, tini and iptables install (144 MB stay): the docker and
# ctr CLIs, libnetwork's dnet/ovrouter test tools, the legacy shims (dockerd 20.10 starts
# io.containerd.runc.v2), docker-proxy (published ports only), dynamic tini (docker-init is
# tini-static), the engine's contrib scripts, and iptables (dockerd runs with
# --iptables=false; with no iptables in the guest it cannot add rules either).
ENGINE_PRUNED_PATHS = (
    "usr/bin/docker",
    "usr/bin/ctr",
    "usr/bin/dnet",
    "usr/sbin/ovrouter",
    "usr/bin/containerd-shim",
    "usr/bin/containerd-shim-runc-v1",
    "usr/sbin/docker-proxy",
    "usr/bin/tini",
    "usr/share/docker.io",
    "usr/bin/iptables-xml",
    "usr/sbin/*tables*",
    "usr/sbin/nfnl_osf",
    "usr/lib/x86_64-linux-gnu/xtables",
    "etc/alternatives/*tables*",
)
PRUNED_PATHS = (
    "usr/lib/udev/hwdb.bin",
    "usr/bin/perl",
    "usr/bin/perl5.36.0",
    "usr/lib/x86_64-linux-gnu/perl-base",
    "var/cache/debconf/templates.dat-old",
    *ENGINE_PRUNED_PATHS,
)
# What the agent drives: the engine, the containerd it starts, its shim and runtime.
ENGINE_BINARIES = (
    "usr/sbin/dockerd",
    "usr/bin/containerd",
    "usr/bin/containerd-shim-runc-v2",
    "usr/sbin/runc",
    "usr/bin/tini-static",
    "usr/sbin/apparmor_parser",
)

# What /init formats the run's scratch disk with (e2fsprogs: Priority required in Debian, so
# in every root; ext4 itself is built into the cloud kernel).
SCRATCH_BINARIES = ("usr/sbin/mke2fs", "usr/sbin/mkfs.ext4")


# The Docker engine of the guest: reachable through its unix socket only (no TCP), no
# container networking (no bridge, veth, iptables rules or forwarding: containers run with
# network none), overlay2 on a data root on the run's scratch disk. It starts its own
# containerd, whose root falls under the data root and its state under /run (a tmpfs).
DOCKER_SOCKET = "/var/run/docker.sock"
DOCKER_DATA_ROOT = "/var/lib/docker"
DOCKERD_LOG = "/run/dockerd.log"
DOCKERD_ARGUMENTS = (
    f"--host=unix://{DOCKER_SOCKET}",
    f"--data-root={DOCKER_DATA_ROOT}",
    "--exec-root=/run/docker",
    "--pidfile=/run/docker.pid",
    "--storage-driver=overlay2",
    "--bridge=none",
    "--iptables=false",
    "--ip6tables=false",
    "--ip-forward=false",
    "--ip-masq=false",
    "--userland-proxy=false",
)
# The bound on the engine's start: it answers 4-7 s after it starts under tcg on 2 vCPUs.
DOCKER_READY_TIMEOUT_S = 60
DOCKER_READY_MESSAGE = "docker engine ready"
WAIT_FOR_ENGINE_PATH = "etc/aicert/wait-for-engine.py"


@dataclasses.dataclass(frozen=True)
class BuildInputs:
    """Everything an image is made from, besides the Debian packages' versions (fixed by the
    cached root, see ``debian.debian_root``) and the wheels (fixed by the pins).

    Attributes:
        project_root: The aicert source tree whose wheel the guest gets.
        mirror: The Debian mirror (``deb`` URL).
        security_mirror: The Debian security mirror, or None for none.
        source_date_epoch: The time every file of the initramfs carries.
        python_pins: ``name==version`` of every guest dependency.
    """

    project_root: Path
    mirror: str
    security_mirror: str | None
    source_date_epoch: int
    python_pins: tuple[str, ...]

    def debian_key(self) -> str:
        """The cache key of the Debian root made from these inputs."""
        return _digest_of(
            {
                "recipe": RECIPE_VERSION,
                "suite": DEBIAN_SUITE,
                "mirrors": self.apt_sources(),
                "packages": sorted(GUEST_PACKAGES),
                "kernel": KERNEL_PACKAGE,
                "excludes": DPKG_PATH_EXCLUDES,
                "source_date_epoch": self.source_date_epoch,
            }
        )

    def wheels_key(self) -> str:
        """The cache key of the guest dependencies' wheels."""
        return _digest_of({"pins": self.python_pins, "python": sys.version_info[:2]})

    def apt_sources(self) -> list[str]:
        """The ``deb`` lines the Debian root is installed from."""
        sources = [
            f"deb {self.mirror} {DEBIAN_SUITE} {DEBIAN_COMPONENTS}",
            f"deb {self.mirror} {DEBIAN_SUITE}-updates {DEBIAN_COMPONENTS}",
        ]
        if self.security_mirror:
            sources.append(
                f"deb {self.security_mirror} {DEBIAN_SUITE}-security {DEBIAN_COMPONENTS}"
            )
        return sources


def _digest_of(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def default_project_root() -> Path:
    """The source tree the running ``aicert`` was installed from (an editable install).

    Raises:
        GuestImageError: ``aicert`` is not installed from a source tree.
    """
    import aicert

    root = Path(aicert.__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise GuestImageError(
            f"{root} is not an aicert source tree: give the project root explicitly"
        )
    return root


def run_step(
    argv: list[str],
    progress: ProgressCallback | None,
    what: str,
    env: dict[str, str] | None = None,
) -> None:
    """Run one build command non-interactively, its output lines to ``progress``.

    Args:
        argv: The command.
        progress: Receives each output line.
        what: The command's name in an error.
        env: Variables added to the build's environment.

    Raises:
        GuestImageError: the command failed (its last lines are in the message).
    """
    environment = {"DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C.UTF-8", **(env or {})}
    run_streaming(argv, progress, env=environment, error=GuestImageError, what=what)
