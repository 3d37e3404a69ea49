"""The guest image of the ``qemu`` platform: a Debian kernel and an initramfs with the agent.

``build_guest_image`` makes, offline from Debian packages and the host's Python wheels:

- ``vmlinuz``: Debian bookworm's cloud kernel (``linux-image-cloud-amd64``), unchanged;
- ``initrd.img``: a gzip'ed newc cpio of a Debian minbase root (python3, libtss2, busybox,
  Debian's Docker engine without its CLIs) with the ``aicert`` package and its guest
  dependencies installed, the few kernel modules the VM needs, and ``/init``, which mounts
  proc/sys/securityfs/cgroup2, configures the virtio NIC for qemu's user-mode network
  (10.0.2.15/24, gateway 10.0.2.2), starts dockerd on its unix socket only (no container
  networking, overlay2 on tmpfs) and runs the guest agent on port 8080 with
  ``--platform qemu --tcti device:/dev/tpmrm0``: nothing else runs or listens on the network;
- ``reference-values.json``: the reference-value set (``aicert.reference_values``) with the
  kernel, initrd and command line digests; ``observe_reference_values`` boots the image once
  and adds the PCR 0-9 values and the kernel's PCR 4 digest, flagged ``observed``.

Reproducible: the Debian root comes from ``mmdebstrap`` with ``SOURCE_DATE_EPOCH`` (bit-for-
bit identical for the same package versions), Python files are compiled with hash-based
``.pyc`` (no timestamps), and the cpio is written here with sorted entries, fixed mtimes,
uid/gid 0 and a gzip header without time or name. The package lists are fetched once and
kept (``cache/``), so a rebuild from the same inputs gives the same digests.

Images are kept in ``$AICERT_HOME/guest-images/<image id>/``; ``latest`` names the last one.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import importlib.metadata
import json
import os
import re
import secrets
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Annotated, Any

import typer
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from aicert.errors import PlatformError
from aicert.guest_runtime.hostutil import file_lock, run_streaming
from aicert.reference_values import (
    REFERENCE_VALUES_FORMAT,
    ReferenceValueSet,
    load_options_digest,
    load_reference_values,
)
from aicert.tasks.platforms.settings import aicert_home

ProgressCallback = Callable[[str], None]

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
GUEST_WORK_ROOT = "/var/lib/aicert/work"
# Subpackages of aicert that only the orchestrator runs (Prefect flows and tasks).
ORCHESTRATOR_PACKAGES = ("flows", "tasks")
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
# Distributions of aicert's dependencies that only its command line uses (never the agent).
CLI_ONLY_DISTRIBUTIONS = frozenset(
    {"typer", "rich", "pygments", "markdown-it-py", "mdurl", "shellingham"}
)

IMAGE_KERNEL = "vmlinuz"
IMAGE_INITRD = "initrd.img"
IMAGE_MANIFEST = "reference-values.json"
LATEST_FILE = "latest"
BUILD_LOCK = ".build.lock"
IMAGE_ID_PATTERN = re.compile(r"^qemu-[0-9a-f]{16}$")

_CPIO_TRAILER = "TRAILER!!!"


class GuestImageError(RuntimeError):
    """The guest image could not be built, found or observed."""


@dataclasses.dataclass(frozen=True)
class GuestImage:
    """A built image: its files and its reference-value set."""

    directory: Path
    reference: ReferenceValueSet

    @property
    def id(self) -> str:
        return self.reference.id

    @property
    def kernel(self) -> Path:
        return self.directory / IMAGE_KERNEL

    @property
    def initrd(self) -> Path:
        return self.directory / IMAGE_INITRD

    @property
    def manifest(self) -> Path:
        return self.directory / IMAGE_MANIFEST

    @property
    def command_line(self) -> str:
        return self.reference.command_line


def guest_images_dir(home: Path | None = None) -> Path:
    return (home or aicert_home()) / "guest-images"


def load_guest_image(image: str | Path | None = None, home: Path | None = None) -> GuestImage:
    """An image by id, by folder or manifest path, or (None) the last one built."""
    root = guest_images_dir(home)
    if image is None:
        try:
            image = (root / LATEST_FILE).read_text(encoding="utf-8").strip()
        except OSError:
            raise GuestImageError(
                f"no guest image in {root}: build one with `aicert image build-guest`"
            ) from None
    candidate = Path(image)
    if isinstance(image, str) and IMAGE_ID_PATTERN.match(image):
        candidate = root / image
    if candidate.is_file():
        candidate = candidate.parent
    manifest = candidate / IMAGE_MANIFEST
    if not manifest.is_file():
        raise GuestImageError(f"{candidate} holds no guest image ({IMAGE_MANIFEST} missing)")
    reference = load_reference_values(manifest, platform="qemu")
    built = GuestImage(candidate.resolve(), reference)
    for path, expected in (
        (built.kernel, reference.kernel_sha256),
        (built.initrd, reference.initrd_sha256),
    ):
        if not path.is_file():
            raise GuestImageError(f"{path} is missing")
        if _sha256_file(path) != expected:
            raise GuestImageError(f"{path} does not match its manifest (modified after build?)")
    return built


# --- inputs ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BuildInputs:
    """Everything an image is made from, besides the Debian packages' versions (fixed by the
    cached root, see ``_debian_root``) and the wheels (fixed by the pins)."""

    project_root: Path
    mirror: str
    security_mirror: str | None
    source_date_epoch: int
    python_pins: tuple[str, ...]

    def debian_key(self) -> str:
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
        return _digest_of({"pins": self.python_pins, "python": sys.version_info[:2]})

    def apt_sources(self) -> list[str]:
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
    """The source tree the running ``aicert`` was installed from (an editable install)."""
    import aicert

    root = Path(aicert.__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise GuestImageError(
            f"{root} is not an aicert source tree: give the project root explicitly"
        )
    return root


def guest_python_pins() -> tuple[str, ...]:
    """``name==version`` of every distribution ``aicert[guest]`` needs, as installed here.

    The guest gets exactly the versions the orchestrator runs and was tested with."""
    environment = default_environment()
    pins: dict[str, str] = {}
    pending: list[tuple[str, frozenset[str]]] = [("aicert", frozenset({"guest"}))]
    while pending:
        name, extras = pending.pop()
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            raise GuestImageError(f"{name} is not installed here: install aicert[guest]") from None
        key = canonicalize_name(distribution.metadata["Name"])
        if key in CLI_ONLY_DISTRIBUTIONS:
            continue
        if key != "aicert":
            pins[key] = distribution.version
        for line in distribution.requires or []:
            requirement = Requirement(line)
            wanted = [{**environment, "extra": extra} for extra in (extras or {""})]
            if requirement.marker is not None and not any(
                requirement.marker.evaluate(env) for env in wanted
            ):
                continue
            child = canonicalize_name(requirement.name)
            if child in {"aicert", *CLI_ONLY_DISTRIBUTIONS}:
                continue
            if child in pins and not requirement.extras:
                continue
            pending.append((child, frozenset(requirement.extras)))
    return tuple(f"{name}=={version}" for name, version in sorted(pins.items()))


def default_inputs(
    project_root: Path | None = None,
    mirror: str | None = None,
    security_mirror: str | None = DEFAULT_SECURITY_MIRROR,
) -> BuildInputs:
    from aicert.tasks.platforms.base_image import find_debian_mirror

    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", DEFAULT_SOURCE_DATE_EPOCH))
    return BuildInputs(
        project_root=(project_root or default_project_root()).resolve(),
        mirror=mirror or find_debian_mirror(),
        security_mirror=security_mirror,
        source_date_epoch=epoch,
        python_pins=guest_python_pins(),
    )


# --- stages ------------------------------------------------------------------------------------


def _run(argv: list[str], progress: ProgressCallback | None, what: str) -> None:
    env = {"DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C.UTF-8"}
    run_streaming(argv, progress, env=env, error=GuestImageError, what=what)


def _debian_root(inputs: BuildInputs, cache: Path, progress: ProgressCallback | None) -> Path:
    """The Debian root as a tar (mmdebstrap) and the kernel packages next to it, cached.

    The cache pins the package versions: the mirror moves on (security updates), a rebuild
    from the cache does not. Delete the folder (or ``refresh=True``) to take newer packages.
    """
    folder = cache / f"debian-{inputs.debian_key()}"
    done = folder / "complete"
    if done.is_file():
        return folder
    for tool in ("mmdebstrap", "apt-get"):
        if shutil.which(tool) is None:
            raise GuestImageError(f"{tool} is not installed (apt-get install mmdebstrap)")
    if folder.exists():
        shutil.rmtree(folder)
    kernel_dir = folder / "kernel"
    kernel_dir.mkdir(parents=True)
    # The customize hook runs with the new root's apt configuration, so the kernel comes from
    # the same package lists as the root: the metapackage and the versioned image it names.
    download_kernel = (
        f"cd {kernel_dir} && "
        f"versioned=$(APT_CONFIG=$MMDEBSTRAP_APT_CONFIG apt-cache depends {KERNEL_PACKAGE}"
        " | awk '/Depends: linux-image-/{print $2; exit}') && "
        f"APT_CONFIG=$MMDEBSTRAP_APT_CONFIG apt-get download -q {KERNEL_PACKAGE} $versioned"
    )
    argv = [
        "mmdebstrap",
        "--variant=minbase",
        "--mode=root",
        "--format=tar",
        "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
        "--include=" + ",".join(GUEST_PACKAGES),
        *[f"--dpkgopt=path-exclude={pattern}" for pattern in DPKG_PATH_EXCLUDES],
        f"--customize-hook={download_kernel}",
        DEBIAN_SUITE,
        str(folder / "root.tar"),
        *inputs.apt_sources(),
    ]
    env_epoch = {"SOURCE_DATE_EPOCH": str(inputs.source_date_epoch)}
    if progress:
        progress("debian root: mmdebstrap " + " ".join(GUEST_PACKAGES))
    run_streaming(
        argv,
        progress,
        env={"DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C.UTF-8", **env_epoch},
        error=GuestImageError,
        what="mmdebstrap",
    )
    if len(list(kernel_dir.glob("linux-image-*.deb"))) != 2:
        raise GuestImageError(f"the kernel packages were not downloaded into {kernel_dir}")
    done.write_text("ok\n")
    return folder


def _wheels(inputs: BuildInputs, cache: Path, progress: ProgressCallback | None) -> Path:
    """Wheels of the pinned guest dependencies (the host's pip configuration), cached."""
    folder = cache / f"wheels-{inputs.wheels_key()}"
    done = folder / "complete"
    if done.is_file():
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--wheel-dir",
            str(folder),
            *inputs.python_pins,
        ],
        progress,
        "pip wheel",
    )
    done.write_text("\n".join(inputs.python_pins) + "\n")
    return folder


def _project_wheel(inputs: BuildInputs, work: Path, progress: ProgressCallback | None) -> Path:
    """The aicert wheel, built from a clean copy of the source tree (no build/ or egg-info
    left in the repository, no stray __pycache__ in the wheel)."""
    source = work / "aicert-source"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(inputs.project_root / name, source / name)
    for folder in ("verification", "guest_runtime", "tasks", "aicert_flows"):
        shutil.copytree(inputs.project_root / folder, source / folder, ignore=ignore)
    wheels = work / "aicert-wheel"
    constraints = work / "build-constraints.txt"
    constraints.write_text("\n".join(BUILD_BACKEND_PINS) + "\n")
    run_streaming(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--wheel-dir",
            str(wheels),
            str(source),
        ],
        progress,
        # Also read by the pip that installs the isolated build environment.
        env={"PIP_CONSTRAINT": str(constraints)},
        error=GuestImageError,
        what="pip wheel (aicert)",
    )
    return wheels


def _extract_root(root_tar: Path, root: Path) -> None:
    root.mkdir()
    completed = subprocess.run(
        ["tar", "--numeric-owner", "-xpf", str(root_tar), "-C", str(root)],
        capture_output=True,
        check=False,
    )
    if completed.returncode != 0:
        raise GuestImageError(f"tar -x of {root_tar} failed: {completed.stderr.decode()[-500:]}")


def _install_python(
    inputs: BuildInputs,
    root: Path,
    wheels: Path,
    project_wheels: Path,
    progress: ProgressCallback | None,
) -> None:
    target = root / GUEST_SITE_PACKAGES
    target.mkdir(parents=True, exist_ok=True)
    version = importlib.metadata.version("aicert")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--no-warn-script-location",
            "--find-links",
            str(wheels),
            "--find-links",
            str(project_wheels),
            "--target",
            str(target),
            f"aicert=={version}",
            *inputs.python_pins,
        ],
        progress,
        "pip install --target",
    )
    # The orchestrator's code has no business in the guest; leaving it out also keeps the
    # image (and its reference values) unchanged by orchestrator-side edits.
    for package in ORCHESTRATOR_PACKAGES:
        shutil.rmtree(target / "aicert" / package)
    for record in target.glob("aicert-*.dist-info/RECORD"):
        prefixes = tuple(f"aicert/{package}/" for package in ORCHESTRATOR_PACKAGES)
        kept = [
            line
            for line in record.read_text(encoding="utf-8").splitlines(keepends=True)
            if not line.startswith(prefixes)
        ]
        record.write_text("".join(kept), encoding="utf-8")
    # Console scripts carry the build host's interpreter path; the guest runs modules.
    shutil.rmtree(target / "bin", ignore_errors=True)
    for direct_url in target.glob("*.dist-info/direct_url.json"):
        direct_url.unlink()
    # Debug symbols of locally built extensions (tpm2-pytss) embed build paths and weigh MBs.
    libraries = sorted(str(path) for path in target.rglob("*.so"))
    if shutil.which("strip") is None:
        # Skipping it would give another image than a host that has it.
        raise GuestImageError("strip is not installed (apt-get install binutils)")
    _run(["strip", "--strip-debug", *libraries], progress, "strip")


def _elf_modinfo(module: Path) -> dict[str, str]:
    """The ``.modinfo`` section of a kernel module (NUL-separated ``key=value`` strings).

    Hand-written because the kernel package ships no modules.dep (depmod runs in its
    postinst) and the build must not depend on kmod's tools being on the host."""
    data = module.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise GuestImageError(f"{module}: not a 64-bit little-endian ELF file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        base = shoff + index * shentsize
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", data, base)
        return name, offset, size

    _, names_offset, _ = section(shstrndx)
    for index in range(shnum):
        name_offset, offset, size = section(index)
        end = data.index(b"\0", names_offset + name_offset)
        if data[names_offset + name_offset : end] == b".modinfo":
            info: dict[str, str] = {}
            for entry in data[offset : offset + size].split(b"\0"):
                key, _, value = entry.decode(errors="replace").partition("=")
                if key and key not in info:
                    info[key] = value
            return info
    raise GuestImageError(f"{module}: no .modinfo section")


def _install_kernel(
    debian: Path, root: Path, image_dir: Path, work: Path
) -> tuple[str, str, list[str]]:
    """Put the kernel in the image folder and the needed modules in the root.

    Returns the kernel package, its version and the modules in load order."""
    debs = sorted((debian / "kernel").glob("linux-image-[0-9]*.deb"))
    if len(debs) != 1:
        raise GuestImageError(f"expected one versioned kernel package in {debian / 'kernel'}")
    unpacked = work / "kernel"
    completed = subprocess.run(
        ["dpkg-deb", "-x", str(debs[0]), str(unpacked)], capture_output=True, check=False
    )
    if completed.returncode != 0:
        raise GuestImageError(f"dpkg-deb -x {debs[0]}: {completed.stderr.decode()[-500:]}")
    package, version = debs[0].name.split("_")[:2]
    kernels = sorted((unpacked / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise GuestImageError(f"{debs[0].name} holds {len(kernels)} kernels")
    release = kernels[0].name.removeprefix("vmlinuz-")
    shutil.copyfile(kernels[0], image_dir / IMAGE_KERNEL)
    module_root = unpacked / "lib" / "modules" / release
    by_name: dict[str, Path] = {}
    for module in module_root.rglob("*.ko"):
        by_name[module.stem.replace("-", "_")] = module
    ordered: list[str] = []

    def visit(name: str, trail: tuple[str, ...]) -> None:
        if name in ordered:
            return
        if name in trail:
            raise GuestImageError(f"kernel module dependency cycle: {' -> '.join(trail)}")
        module = by_name.get(name)
        if module is None:
            raise GuestImageError(f"kernel module {name} is not in {debs[0].name}")
        for dependency in filter(None, _elf_modinfo(module).get("depends", "").split(",")):
            visit(dependency.replace("-", "_"), (*trail, name))
        ordered.append(name)

    for name in GUEST_KERNEL_MODULES:
        visit(name, ())
    relative_paths: list[str] = []
    for name in ordered:
        relative = by_name[name].relative_to(unpacked)
        destination = root / "usr" / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(by_name[name], destination)
        relative_paths.append("/" + str(Path("usr") / relative))
    return package, version, relative_paths


# The Docker engine of the guest: reachable through its unix socket only (no TCP), no
# container networking (no bridge, veth, iptables rules or forwarding: containers run with
# network none), overlay2 on a tmpfs data root. It starts its own containerd, whose root
# and state fall under the data root and /run (both tmpfs).
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
# Run by /init until the engine answers GET /_ping on its socket: one interpreter start
# (busybox has no HTTP client for unix sockets). Exits non-zero, saying why, when dockerd
# exits or the bound passes. Arguments: dockerd's pid, the bound in seconds, the socket.
WAIT_FOR_ENGINE = """\
import socket
import sys
import time

pid, bound, path = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
deadline = time.monotonic() + bound
while time.monotonic() < deadline:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            running = stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        running = False
    if not running:
        sys.exit("dockerd exited")
    try:
        with socket.socket(socket.AF_UNIX) as engine:
            engine.settimeout(5)
            engine.connect(path)
            engine.sendall(b"GET /_ping HTTP/1.0\\r\\n\\r\\n")
            if engine.recv(64).split(b"\\r\\n")[0].split()[1:2] == [b"200"]:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.2)
sys.exit(f"no answer on {path} after {bound:.0f} s")
"""

INIT_SCRIPT = """#!/bin/sh
# AICert guest init (qemu platform): mount what the agent needs, configure the network of
# qemu's user-mode NIC, start the Docker engine the agent runs the training in, and run the
# guest agent; nothing else is started. When the agent exits, the VM powers off (qemu then
# exits, and the provider reports it).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1

say() { echo "aicert-init: $*" > /dev/console; }
fail() { say "FAILED: $*"; busybox poweroff -f; }

# runc jails a container with pivot_root(2), which refuses to move the initramfs (rootfs
# has no parent mount). Re-root on a bind mount of it: the same files, nothing copied, and
# a root pivot_root accepts.
if [ "$1" != "--rerooted" ]; then
  mount --bind / /mnt || fail "bind-mount the root on /mnt"
  cd /mnt && mount --move . / || fail "move the root's bind mount to /"
  exec chroot . /init --rerooted
fi

mount -t proc proc /proc || fail "mount /proc"
mount -t sysfs sysfs /sys || fail "mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "mount /dev"
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts || fail "mount /dev/pts"
mount -t tmpfs -o mode=1777 tmpfs /dev/shm || fail "mount /dev/shm"
mount -t securityfs securityfs /sys/kernel/security || fail "mount securityfs"
mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup || fail "mount cgroup2"
mount -t tmpfs -o mode=0755 tmpfs /run || fail "mount /run"
mount -t tmpfs -o mode=1777 tmpfs /tmp || fail "mount /tmp"

while read -r module; do
  busybox insmod "$module" || fail "insmod $module"
done < /etc/aicert/modules

busybox hostname aicert-guest
busybox ip link set lo up || fail "loopback"
busybox ip link set eth0 up || fail "no eth0 (virtio-net)"
busybox ip addr add @ADDRESS@ dev eth0 || fail "address"
busybox ip route add default via @GATEWAY@ || fail "route"
[ -c /dev/tpmrm0 ] || fail "no /dev/tpmrm0 (vTPM)"

mkdir -p @DATA_ROOT@
mount -t tmpfs -o mode=0711 tmpfs @DATA_ROOT@ || fail "mount the engine's tmpfs"
dockerd @DOCKERD_ARGUMENTS@ < /dev/null > @DOCKERD_LOG@ 2>&1 &
if ! python3 /@WAIT_FOR_ENGINE@ $! @READY_TIMEOUT@ @SOCKET@ > /dev/console 2>&1; then
  tail -n 5 @DOCKERD_LOG@ > /dev/console
  fail "the docker engine did not come up (its log: @DOCKERD_LOG@)"
fi
say "@READY_MESSAGE@ (uptime $(cut -d ' ' -f 1 /proc/uptime) s)"

mkdir -p @WORK_ROOT@
# The run's inputs, staged by the orchestrator, come as a read-only raw disk (a tar).
staged=""
[ -b /dev/vda ] && staged="--staged-inputs /dev/vda"
say "starting the guest agent on port @PORT@"
# --tls: a fresh channel key, measured into PCR 14 before the agent serves anything.
/usr/bin/python3 -m aicert.guest_runtime.server --tcti device:/dev/tpmrm0 --platform qemu \\
  --host 0.0.0.0 --port @PORT@ --work-root @WORK_ROOT@ --tls $staged &
agent=$!
wait "$agent"
say "the guest agent exited with status $?; powering off"
busybox poweroff -f
"""


def init_script() -> str:
    """The guest's /init, filled in."""
    return (
        INIT_SCRIPT.replace("@ADDRESS@", GUEST_ADDRESS)
        .replace("@GATEWAY@", GUEST_GATEWAY)
        .replace("@PORT@", str(AGENT_PORT))
        .replace("@WORK_ROOT@", GUEST_WORK_ROOT)
        .replace("@DATA_ROOT@", DOCKER_DATA_ROOT)
        .replace("@DOCKERD_ARGUMENTS@", " ".join(DOCKERD_ARGUMENTS))
        .replace("@DOCKERD_LOG@", DOCKERD_LOG)
        .replace("@WAIT_FOR_ENGINE@", WAIT_FOR_ENGINE_PATH)
        .replace("@READY_TIMEOUT@", str(DOCKER_READY_TIMEOUT_S))
        .replace("@SOCKET@", DOCKER_SOCKET)
        .replace("@READY_MESSAGE@", DOCKER_READY_MESSAGE)
    )


def _configure_root(root: Path, modules: list[str]) -> None:
    init = root / "init"
    init.write_text(init_script())
    init.chmod(0o755)
    config = root / "etc" / "aicert"
    config.mkdir(parents=True, exist_ok=True)
    (config / "modules").write_text("".join(f"{module}\n" for module in modules))
    (root / WAIT_FOR_ENGINE_PATH).write_text(WAIT_FOR_ENGINE)
    # mmdebstrap copies these from the build host: replace them with the guest's own.
    (root / "etc" / "hostname").write_text("aicert-guest\n")
    (root / "etc" / "hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\taicert-guest\n")
    (root / "etc" / "resolv.conf").write_text(f"nameserver {GUEST_DNS}\n")
    for pattern in PRUNED_PATHS:
        # glob.glob, not Path.glob: it also matches dangling symlinks (the alternatives).
        for relative in sorted(glob.glob(pattern, root_dir=root)):
            path = root / relative
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    for relative in ENGINE_BINARIES:
        if not (root / relative).is_file():
            raise GuestImageError(f"{relative} is missing from the Debian root (docker.io)")


def _compile_python(root: Path, progress: ProgressCallback | None) -> None:
    """Compile every Python file with the guest's interpreter into unchecked-hash .pyc: no
    timestamps inside (reproducible), and never stale although the cpio resets mtimes."""
    if progress:
        progress("compiling Python files (guest interpreter, hash-based .pyc)")
    _run(
        [
            "chroot",
            str(root),
            "/usr/bin/python3",
            "-m",
            "compileall",
            "-q",
            "-f",
            "-j",
            "0",
            "--invalidation-mode",
            "unchecked-hash",
            "/usr/lib/python3",
            "/usr/lib/python3.11",
            "/usr/share/python3",
            "/" + GUEST_SITE_PACKAGES,
        ],
        progress,
        "compileall",
    )


# --- cpio --------------------------------------------------------------------------------------


def _tree_entries(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """(relative path, lstat) of everything below ``root``, depth first, each folder's entries
    sorted by name: the order depends on names only, and parents come before children."""
    pending = [Path(name) for name in sorted(os.listdir(root), reverse=True)]
    while pending:
        relative = pending.pop()
        info = os.lstat(root / relative)
        yield str(relative), info
        if stat.S_ISDIR(info.st_mode):
            children = sorted(os.listdir(root / relative), reverse=True)
            pending.extend(relative / name for name in children)


def _cpio_header(
    name: bytes, inode: int, mode: int, nlink: int, mtime: int, size: int, rdev: tuple[int, int]
) -> bytes:
    fields = (
        inode,
        mode,
        0,  # uid
        0,  # gid
        nlink,
        mtime,
        size,
        0,  # devmajor
        0,  # devminor
        rdev[0],
        rdev[1],
        len(name) + 1,
        0,  # check
    )
    header = b"070701" + b"".join(f"{value:08x}".encode() for value in fields)
    record = header + name + b"\0"
    return record + b"\0" * (-len(record) % 4)


def write_cpio(root: Path, output: IO[bytes], mtime: int) -> int:
    """Write ``root`` as a newc cpio archive: sorted, uid/gid 0, every mtime ``mtime``, no
    hard links. Returns the number of entries.

    Hand-written because GNU cpio cannot set a fixed mtime, uid and gid for every entry."""
    count = 0
    for inode, (relative, info) in enumerate(_tree_entries(root), start=1):
        name = relative.encode()
        mode = info.st_mode
        rdev = (0, 0)
        data = b""
        if stat.S_ISREG(mode):
            size = info.st_size
        elif stat.S_ISLNK(mode):
            data = os.readlink(root / relative).encode()
            size = len(data)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            rdev = (os.major(info.st_rdev), os.minor(info.st_rdev))
            size = 0
        elif stat.S_ISDIR(mode):
            size = 0
        else:
            raise GuestImageError(f"{relative}: cannot put a socket or FIFO in the initramfs")
        nlink = 2 if stat.S_ISDIR(mode) else 1
        output.write(_cpio_header(name, inode, mode, nlink, mtime, size, rdev))
        if stat.S_ISREG(mode):
            written = 0
            with (root / relative).open("rb") as handle:
                while chunk := handle.read(1 << 20):
                    output.write(chunk)
                    written += len(chunk)
            if written != size:
                raise GuestImageError(f"{relative} changed while it was archived")
        else:
            output.write(data)
        output.write(b"\0" * (-size % 4))
        count += 1
    output.write(_cpio_header(_CPIO_TRAILER.encode(), 0, 0, 1, 0, 0, (0, 0)))
    return count


def pack_initrd(root: Path, destination: Path, mtime: int) -> str:
    """gzip -1 of the cpio of ``root`` (no name, mtime 0 in the gzip header); its SHA-256."""
    temporary = destination.with_name(destination.name + ".tmp")
    with temporary.open("wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=1, mtime=0) as gz:
            write_cpio(root, gz, mtime)  # type: ignore[arg-type]
    os.replace(temporary, destination)
    return _sha256_file(destination)


# --- the build -------------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _installed_packages(root: Path) -> dict[str, str]:
    packages: dict[str, str] = {}
    status = (root / "var" / "lib" / "dpkg" / "status").read_text(encoding="utf-8")
    for stanza in status.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in stanza.splitlines() if ": " in line and line[0] != " "
        )
        if "Package" in fields and fields.get("Status", "").endswith(" installed"):
            packages[fields["Package"]] = fields.get("Version", "")
    return dict(sorted(packages.items()))


def image_id_for(kernel_sha256: str, initrd_sha256: str, command_line: str) -> str:
    material = f"{kernel_sha256}\n{initrd_sha256}\n{command_line}\n".encode()
    return "qemu-" + hashlib.sha256(material).hexdigest()[:16]


def assemble_image(
    inputs: BuildInputs,
    debian: Path,
    wheels: Path,
    destination: Path,
    progress: ProgressCallback | None = None,
) -> tuple[str, str, dict[str, Any]]:
    """Make ``vmlinuz`` and ``initrd.img`` in ``destination`` from cached inputs.

    Returns (kernel SHA-256, initrd SHA-256, provenance for the manifest)."""
    destination.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="aicert-guest-") as scratch:
        work = Path(scratch)
        root = work / "root"
        if progress:
            progress("assembling the guest root")
        _extract_root(debian / "root.tar", root)
        project_wheels = _project_wheel(inputs, work, progress)
        _install_python(inputs, root, wheels, project_wheels, progress)
        package, version, modules = _install_kernel(debian, root, destination, work)
        _configure_root(root, modules)
        _compile_python(root, progress)
        if progress:
            progress("packing the initramfs (sorted newc cpio, gzip -1)")
        initrd_sha256 = pack_initrd(root, destination / IMAGE_INITRD, inputs.source_date_epoch)
        provenance = {
            "recipe_version": RECIPE_VERSION,
            "source_date_epoch": inputs.source_date_epoch,
            "apt_sources": inputs.apt_sources(),
            "kernel_package": f"{package}={version}",
            "kernel_modules": modules,
            "debian_packages": _installed_packages(root),
            "python_packages": list(inputs.python_pins),
            "aicert_version": importlib.metadata.version("aicert"),
        }
    return _sha256_file(destination / IMAGE_KERNEL), initrd_sha256, provenance


def _existing_reference(manifest: Path) -> ReferenceValueSet | None:
    """The reference values already kept for an image, if readable (an older recipe's
    manifest is not: the image folder is then replaced)."""
    if not manifest.is_file():
        return None
    try:
        return load_reference_values(manifest, platform="qemu")
    except PlatformError:
        return None


def _build_lock(images: Path) -> Path:
    images.mkdir(parents=True, exist_ok=True)
    return images / BUILD_LOCK


def prepare_inputs(
    inputs: BuildInputs,
    home: Path | None = None,
    progress: ProgressCallback | None = None,
    *,
    refresh: bool = False,
) -> tuple[Path, Path]:
    """The cached Debian root (with the kernel packages) and wheels for ``inputs``, fetched
    on first use: (debian folder, wheels folder)."""
    cache = guest_images_dir(home) / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    if refresh:
        shutil.rmtree(cache / f"debian-{inputs.debian_key()}", ignore_errors=True)
    return _debian_root(inputs, cache, progress), _wheels(inputs, cache, progress)


def build_guest_image(
    home: Path | None = None,
    *,
    inputs: BuildInputs | None = None,
    progress: ProgressCallback | None = None,
    refresh: bool = False,
) -> GuestImage:
    """Build the guest image (reusing cached Debian packages and wheels) and write its
    reference-value set with the predicted digests; ``observe_reference_values`` adds the
    observed PCR values. ``refresh`` fetches the Debian packages again (newer versions)."""
    inputs = inputs or default_inputs()
    images = guest_images_dir(home)
    started = time.monotonic()
    with file_lock(_build_lock(images)):
        debian, wheels = prepare_inputs(inputs, home, progress, refresh=refresh)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=images))
        try:
            kernel_sha256, initrd_sha256, provenance = assemble_image(
                inputs, debian, wheels, staging, progress
            )
            image_id = image_id_for(kernel_sha256, initrd_sha256, KERNEL_COMMAND_LINE)
            provenance["build_seconds"] = round(time.monotonic() - started, 1)
            reference = ReferenceValueSet(
                format=REFERENCE_VALUES_FORMAT,
                id=image_id,
                platform="qemu",
                kernel_sha256=kernel_sha256,
                initrd_sha256=initrd_sha256,
                command_line=KERNEL_COMMAND_LINE,
                load_options=KERNEL_COMMAND_LINE + OVMF_INITRD_OPTION,
                load_options_sha256=load_options_digest(
                    KERNEL_COMMAND_LINE + OVMF_INITRD_OPTION
                ).hex(),
                build=provenance,
            )
            final = images / image_id
            existing = _existing_reference(final / IMAGE_MANIFEST)
            if existing is not None:
                # The same image again (reproducible): keep its observed values.
                reference = existing.model_copy(update={"build": provenance})
            else:
                shutil.rmtree(final, ignore_errors=True)
                staging.rename(final)
                final.chmod(0o755)
            write_reference_values(reference, final / IMAGE_MANIFEST)
            (images / LATEST_FILE).write_text(image_id + "\n", encoding="utf-8")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if progress:
        progress(
            f"guest image {image_id}: initrd {initrd_sha256[:16]}... "
            f"({(final / IMAGE_INITRD).stat().st_size / 1e6:.0f} MB), "
            f"{time.monotonic() - started:.0f} s"
        )
    return GuestImage(final.resolve(), reference)


def write_reference_values(reference: ReferenceValueSet, path: Path) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(reference.model_dump_json(indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def with_observed_values(
    reference: ReferenceValueSet,
    pcrs: dict[int, bytes],
    kernel_pcr4_digest: bytes,
    vm: Any,
) -> ReferenceValueSet:
    """``reference`` plus the PCR 0-9 values and PCR 4 kernel digest seen on a real boot."""
    return reference.model_copy(
        update={
            "observed": True,
            "pcrs": {str(index): pcrs[index].hex() for index in range(10)},
            "kernel_pcr4_digest": kernel_pcr4_digest.hex(),
            "kernel_pcr4_digest_source": "observed",
            "vm": vm,
        }
    )


def observe_reference_values(
    image: str | Path | None = None,
    home: Path | None = None,
    *,
    provider: Any = None,
    progress: ProgressCallback | None = None,
) -> GuestImage:
    """Boot the image once and record what its boot measured: PCR 0-9 and the kernel's PCR 4
    digest, flagged ``observed``, with the VM shape they hold for.

    The observation is checked before it is kept: the quote must verify, the log must replay
    to the quoted PCRs, and the predicted PCR 9 digests (initrd, command line) must be the
    ones measured."""
    from aicert.quote import verify_quote
    from aicert.reference_values import check_boot_log, platform_quote_nonce
    from aicert.tasks.platforms.qemu.provider import QemuProvider
    from aicert.tcg_eventlog import parse_event_log

    built = load_guest_image(image, home)
    if provider is None:
        provider = QemuProvider(built.directory, home)
    run_id = "observe-" + secrets.token_hex(6)
    started = time.monotonic()
    machine = provider.boot(run_id)
    try:
        if progress:
            progress(f"booted in {machine.details.get('boot_seconds')} s; asking a platform quote")
        challenge = secrets.token_bytes(32)
        with machine.client(timeout_s=60.0) as client:
            material = client.key_material()
            evidence = client.platform_quote(challenge)
    finally:
        provider.teardown(machine)
    if evidence.ak_public != material.ak_public or evidence.boot_event_log is None:
        raise GuestImageError("the observation boot returned inconsistent evidence")
    pcrs = {int(index): bytes.fromhex(value) for index, value in evidence.pcrs.items()}
    verify_quote(
        evidence.attest,
        evidence.signature,
        evidence.ak_public,
        platform_quote_nonce(challenge),
        pcrs,
    )
    boot_log = parse_event_log(evidence.boot_event_log)
    applications = [
        event
        for event in boot_log.events
        if event.pcr == 4 and event.event_type_name == "EV_EFI_BOOT_SERVICES_APPLICATION"
    ]
    if len(applications) != 1:
        raise GuestImageError(f"{len(applications)} boot applications in PCR 4, expected 1")
    reference = with_observed_values(
        built.reference, pcrs, applications[0].digests["sha256"], provider.vm_shape()
    )
    try:
        check_boot_log(boot_log, pcrs, reference)
    except Exception as exc:
        raise GuestImageError(f"the observed boot does not match the build: {exc}") from exc
    reference = reference.model_copy(
        update={
            "build": {
                **reference.build,
                "observed_boot_seconds": machine.details.get("boot_seconds"),
                "observed_with": f"qemu -accel {provider.accel}",
            }
        }
    )
    write_reference_values(reference, built.manifest)
    if progress:
        progress(f"observed PCR 0-9 of {built.id} in {time.monotonic() - started:.0f} s")
    return GuestImage(built.directory, reference)


def build_guest_command(
    observe: Annotated[
        bool, typer.Option(help="Boot the image once to record its PCR 0-9 values.")
    ] = True,
    refresh: Annotated[
        bool, typer.Option(help="Fetch the Debian packages again (take newer versions).")
    ] = False,
    project_root: Annotated[
        Path | None, typer.Option(help="The aicert source tree to install in the guest.")
    ] = None,
    memory_mib: Annotated[
        int,
        typer.Option(
            help="Guest memory of the VMs that will boot it (part of the observed VM shape; "
            "layers, inputs and outputs live in RAM: give large workloads more)."
        ),
    ] = 2048,
    cpus: Annotated[int, typer.Option(help="Virtual CPUs of the VMs that will boot it.")] = 2,
) -> None:
    """Build the qemu guest image (kernel + initramfs with the agent) and its reference values."""
    from rich.console import Console

    from aicert.tasks.platforms.qemu.provider import QemuProvider

    console = Console()
    with console.status("building the guest image...") as status:

        def progress(line: str) -> None:
            status.update(f"guest image: {line[:100]}")

        try:
            image = build_guest_image(
                inputs=default_inputs(project_root), progress=progress, refresh=refresh
            )
            provider = QemuProvider(image.directory, memory_mib=memory_mib, smp=cpus)
            shape_differs = image.reference.vm is not None and image.reference.vm != (
                provider.vm_shape()
            )
            if observe and (not image.reference.observed or shape_differs):
                status.update("guest image: booting it once to observe PCR 0-9 (about 50 s)")
                image = observe_reference_values(
                    image.directory, provider=provider, progress=progress
                )
        except (GuestImageError, RuntimeError) as exc:
            console.print(f"[bold red]guest image build failed[/bold red]: {exc}")
            raise typer.Exit(1) from None
    reference = image.reference
    console.print(f"[green]guest image ready[/green] {image.id} in {image.directory}")
    console.print(f"  kernel  sha256 {reference.kernel_sha256}")
    console.print(f"  initrd  sha256 {reference.initrd_sha256}")
    console.print(f"  command line   {reference.command_line!r}")
    state = "observed" if reference.observed else "not observed (--observe to boot it once)"
    console.print(f"  PCR 0-9        {state}")
    console.print(f"  reference values: {image.manifest}")
