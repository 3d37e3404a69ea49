"""The Debian side of the ``qemu`` guest image: the minbase root and the kernel.

``debian_root`` makes the root with ``mmdebstrap`` (``SOURCE_DATE_EPOCH``: bit-for-bit
identical for the same package versions) and downloads the kernel packages next to it, from
the same package lists; both are cached, which pins the package versions. ``install_kernel``
puts the kernel in the image folder and the modules the VM needs, in load order, in the root.
"""

from __future__ import annotations

import shlex
import shutil
import struct
import subprocess
from pathlib import Path

from aicert.tasks.platforms.qemu.image import IMAGE_KERNEL, GuestImageError
from aicert.tasks.platforms.qemu.recipe import (
    DEBIAN_SUITE,
    DPKG_PATH_EXCLUDES,
    GUEST_KERNEL_MODULES,
    GUEST_PACKAGES,
    KERNEL_PACKAGE,
    BuildInputs,
    ProgressCallback,
    run_step,
)


def kernel_download_hook(kernel_dir: Path) -> str:
    """The mmdebstrap customize hook that downloads the kernel into ``kernel_dir``.

    It runs with the new root's apt configuration, so the kernel comes from the same package
    lists as the root: the metapackage and the versioned image it names. A shell command
    (``tests/tasks/platforms/qemu/test_guest_scripts.py`` runs shellcheck on it).
    """
    apt = 'APT_CONFIG="$MMDEBSTRAP_APT_CONFIG"'
    return (
        f"cd {shlex.quote(str(kernel_dir))} && "
        f"versioned=$({apt} apt-cache depends {KERNEL_PACKAGE}"
        " | awk '/Depends: linux-image-/{print $2; exit}') && "
        f'{apt} apt-get download -q {KERNEL_PACKAGE} "$versioned"'
    )


def debian_root(inputs: BuildInputs, cache: Path, progress: ProgressCallback | None) -> Path:
    """The Debian root as a tar (mmdebstrap) and the kernel packages next to it, cached.

    The cache pins the package versions: the mirror moves on (security updates), a rebuild
    from the cache does not. Delete the folder (or ``refresh=True``) to take newer packages.

    Raises:
        GuestImageError: mmdebstrap is missing or failed, or the kernel was not downloaded.
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
    argv = [
        "mmdebstrap",
        "--variant=minbase",
        "--mode=root",
        "--format=tar",
        "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
        "--include=" + ",".join(GUEST_PACKAGES),
        *[f"--dpkgopt=path-exclude={pattern}" for pattern in DPKG_PATH_EXCLUDES],
        f"--customize-hook={kernel_download_hook(kernel_dir)}",
        DEBIAN_SUITE,
        str(folder / "root.tar"),
        *inputs.apt_sources(),
    ]
    if progress:
        progress("debian root: mmdebstrap " + " ".join(GUEST_PACKAGES))
    run_step(argv, progress, "mmdebstrap", {"SOURCE_DATE_EPOCH": str(inputs.source_date_epoch)})
    if len(list(kernel_dir.glob("linux-image-*.deb"))) != 2:
        raise GuestImageError(f"the kernel packages were not downloaded into {kernel_dir}")
    done.write_text("ok\n")
    return folder


def extract_root(root_tar: Path, root: Path) -> None:
    """Unpack the cached root tar into ``root`` (a new folder), owners and modes kept.

    Raises:
        GuestImageError: tar failed.
    """
    root.mkdir()
    completed = subprocess.run(
        ["tar", "--numeric-owner", "-xpf", str(root_tar), "-C", str(root)],
        capture_output=True,
        check=False,
    )
    if completed.returncode != 0:
        raise GuestImageError(f"tar -x of {root_tar} failed: {completed.stderr.decode()[-500:]}")


def installed_packages(root: Path) -> dict[str, str]:
    """The Debian packages installed in ``root`` and their versions, by name."""
    packages: dict[str, str] = {}
    status = (root / "var" / "lib" / "dpkg" / "status").read_text(encoding="utf-8")
    for stanza in status.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in stanza.splitlines() if ": " in line and line[0] != " "
        )
        if "Package" in fields and fields.get("Status", "").endswith(" installed"):
            packages[fields["Package"]] = fields.get("Version", "")
    return dict(sorted(packages.items()))


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


def _modules_in_load_order(by_name: dict[str, Path], package: str) -> list[str]:
    """``GUEST_KERNEL_MODULES`` and what they depend on, each after its dependencies."""
    ordered: list[str] = []

    def visit(name: str, trail: tuple[str, ...]) -> None:
        if name in ordered:
            return
        if name in trail:
            raise GuestImageError(f"kernel module dependency cycle: {' -> '.join(trail)}")
        module = by_name.get(name)
        if module is None:
            raise GuestImageError(f"kernel module {name} is not in {package}")
        for dependency in filter(None, _elf_modinfo(module).get("depends", "").split(",")):
            visit(dependency.replace("-", "_"), (*trail, name))
        ordered.append(name)

    for name in GUEST_KERNEL_MODULES:
        visit(name, ())
    return ordered


def _unpack_kernel_package(debian: Path, work: Path) -> tuple[Path, Path]:
    """dpkg-deb -x of the one versioned kernel package: (its .deb, the unpacked folder)."""
    debs = sorted((debian / "kernel").glob("linux-image-[0-9]*.deb"))
    if len(debs) != 1:
        raise GuestImageError(f"expected one versioned kernel package in {debian / 'kernel'}")
    unpacked = work / "kernel"
    completed = subprocess.run(
        ["dpkg-deb", "-x", str(debs[0]), str(unpacked)], capture_output=True, check=False
    )
    if completed.returncode != 0:
        raise GuestImageError(f"dpkg-deb -x {debs[0]}: {completed.stderr.decode()[-500:]}")
    return debs[0], unpacked


def install_kernel(
    debian: Path, root: Path, image_dir: Path, work: Path
) -> tuple[str, str, list[str]]:
    """Put the kernel in the image folder and the needed modules in the root.

    Returns:
        The kernel package, its version and the modules' paths in the guest, in load order.

    Raises:
        GuestImageError: the kernel package or a module is missing or unreadable.
    """
    deb, unpacked = _unpack_kernel_package(debian, work)
    package, version = deb.name.split("_")[:2]
    kernels = sorted((unpacked / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise GuestImageError(f"{deb.name} holds {len(kernels)} kernels")
    release = kernels[0].name.removeprefix("vmlinuz-")
    shutil.copyfile(kernels[0], image_dir / IMAGE_KERNEL)
    module_root = unpacked / "lib" / "modules" / release
    by_name = {module.stem.replace("-", "_"): module for module in module_root.rglob("*.ko")}
    relative_paths: list[str] = []
    for name in _modules_in_load_order(by_name, deb.name):
        relative = by_name[name].relative_to(unpacked)
        destination = root / "usr" / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(by_name[name], destination)
        relative_paths.append("/" + str(Path("usr") / relative))
    return package, version, relative_paths
