"""The initramfs of the ``qemu`` guest image: the guest's own files, its .pyc, the cpio.

The guest's scripts are package data (``guest/``), filled in here: ``init.sh`` becomes
``/init`` (its ``@NAME@`` placeholders take the recipe's values), ``wait_for_engine.py``
becomes ``/etc/aicert/wait-for-engine.py``. Python files are compiled with the guest's
interpreter into hash-based ``.pyc`` (no timestamps), and the cpio is written here with
sorted entries, fixed mtimes, uid/gid 0 and a gzip header without time or name: the same
root gives the same bytes.
"""

from __future__ import annotations

import glob
import gzip
import os
import shutil
import stat
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import IO, cast

from aicert.hashing import sha256_file
from aicert.tasks.platforms.qemu.image import GuestImageError
from aicert.tasks.platforms.qemu.recipe import (
    AGENT_PORT,
    DOCKER_DATA_ROOT,
    DOCKER_READY_MESSAGE,
    DOCKER_READY_TIMEOUT_S,
    DOCKER_SOCKET,
    DOCKERD_ARGUMENTS,
    DOCKERD_LOG,
    ENGINE_BINARIES,
    GUEST_ADDRESS,
    GUEST_DNS,
    GUEST_GATEWAY,
    GUEST_SITE_PACKAGES,
    GUEST_WORK_ROOT,
    PRUNED_PATHS,
    SCRATCH_BINARIES,
    SCRATCH_MOUNT,
    WAIT_FOR_ENGINE_PATH,
    ProgressCallback,
    run_step,
)
from aicert.tasks.platforms.qemu.scratch import INPUTS_SERIAL, SCRATCH_SERIAL

# The package data the guest's files come from.
GUEST_FILES = "guest"
INIT_TEMPLATE = "init.sh"
WAIT_FOR_ENGINE_SOURCE = "wait_for_engine.py"
_CPIO_TRAILER = "TRAILER!!!"


def guest_file(name: str) -> str:
    """The text of ``guest/<name>``, a file shipped with this package."""
    package = resources.files("aicert.tasks.platforms.qemu")
    return (package / GUEST_FILES / name).read_text(encoding="utf-8")


def init_script() -> str:
    """The guest's /init: ``guest/init.sh`` with its placeholders filled in."""
    values = {
        "ADDRESS": GUEST_ADDRESS,
        "GATEWAY": GUEST_GATEWAY,
        "PORT": str(AGENT_PORT),
        "WORK_ROOT": GUEST_WORK_ROOT,
        "DATA_ROOT": DOCKER_DATA_ROOT,
        "DOCKERD_ARGUMENTS": " ".join(DOCKERD_ARGUMENTS),
        "DOCKERD_LOG": DOCKERD_LOG,
        "WAIT_FOR_ENGINE": WAIT_FOR_ENGINE_PATH,
        "READY_TIMEOUT": str(DOCKER_READY_TIMEOUT_S),
        "SOCKET": DOCKER_SOCKET,
        "READY_MESSAGE": DOCKER_READY_MESSAGE,
        "SCRATCH_MOUNT": SCRATCH_MOUNT,
        "SCRATCH_SERIAL": SCRATCH_SERIAL,
        "INPUTS_SERIAL": INPUTS_SERIAL,
    }
    script = guest_file(INIT_TEMPLATE)
    for name, value in values.items():
        script = script.replace(f"@{name}@", value)
    if "@" in script.replace("$@", ""):
        raise GuestImageError(f"{INIT_TEMPLATE} has a placeholder with no value")
    return script


def _prune(root: Path) -> None:
    """Delete ``PRUNED_PATHS`` from the root; check the engine's binaries and the scratch
    disk's formatter are there."""
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
    for relative in SCRATCH_BINARIES:
        if not (root / relative).exists():
            raise GuestImageError(f"{relative} is missing from the Debian root (e2fsprogs)")


def configure_root(root: Path, modules: list[str]) -> None:
    """Write the guest's own files into the root (``/init``, the module list, the engine
    wait, host name and resolver) and prune what nothing in the guest uses.

    Raises:
        GuestImageError: an engine binary is missing from the root.
    """
    init = root / "init"
    init.write_text(init_script())
    init.chmod(0o755)
    config = root / "etc" / "aicert"
    config.mkdir(parents=True, exist_ok=True)
    (config / "modules").write_text("".join(f"{module}\n" for module in modules))
    (root / WAIT_FOR_ENGINE_PATH).write_text(guest_file(WAIT_FOR_ENGINE_SOURCE))
    # mmdebstrap copies these from the build host: replace them with the guest's own.
    (root / "etc" / "hostname").write_text("aicert-guest\n")
    (root / "etc" / "hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\taicert-guest\n")
    (root / "etc" / "resolv.conf").write_text(f"nameserver {GUEST_DNS}\n")
    _prune(root)


def compile_python(root: Path, progress: ProgressCallback | None) -> None:
    """Compile every Python file with the guest's interpreter into unchecked-hash .pyc: no
    timestamps inside (reproducible), and never stale although the cpio resets mtimes."""
    if progress:
        progress("compiling Python files (guest interpreter, hash-based .pyc)")
    folders = ["/usr/lib/python3", "/usr/lib/python3.11", "/usr/share/python3"]
    compileall = ["/usr/bin/python3", "-m", "compileall", "-q", "-f", "-j", "0"]
    compileall += ["--invalidation-mode", "unchecked-hash", *folders, "/" + GUEST_SITE_PACKAGES]
    run_step(["chroot", str(root), *compileall], progress, "compileall")


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


def _entry_data(
    root: Path, relative: str, info: os.stat_result
) -> tuple[int, bytes, tuple[int, int]]:
    """(size, inline data, device numbers) of one entry; a regular file's data is streamed."""
    mode = info.st_mode
    if stat.S_ISREG(mode):
        return info.st_size, b"", (0, 0)
    if stat.S_ISLNK(mode):
        target = os.readlink(root / relative).encode()
        return len(target), target, (0, 0)
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return 0, b"", (os.major(info.st_rdev), os.minor(info.st_rdev))
    if stat.S_ISDIR(mode):
        return 0, b"", (0, 0)
    raise GuestImageError(f"{relative}: cannot put a socket or FIFO in the initramfs")


def _copy_file(path: Path, output: IO[bytes], size: int, relative: str) -> None:
    written = 0
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            output.write(chunk)
            written += len(chunk)
    if written != size:
        raise GuestImageError(f"{relative} changed while it was archived")


def write_cpio(root: Path, output: IO[bytes], mtime: int) -> int:
    """Write ``root`` as a newc cpio archive: sorted, uid/gid 0, every mtime ``mtime``, no
    hard links. Returns the number of entries.

    Hand-written because GNU cpio cannot set a fixed mtime, uid and gid for every entry."""
    count = 0
    for inode, (relative, info) in enumerate(_tree_entries(root), start=1):
        size, data, rdev = _entry_data(root, relative, info)
        nlink = 2 if stat.S_ISDIR(info.st_mode) else 1
        output.write(_cpio_header(relative.encode(), inode, info.st_mode, nlink, mtime, size, rdev))
        if stat.S_ISREG(info.st_mode):
            _copy_file(root / relative, output, size, relative)
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
            write_cpio(root, cast(IO[bytes], gz), mtime)
    os.replace(temporary, destination)
    return sha256_file(destination)[0]
