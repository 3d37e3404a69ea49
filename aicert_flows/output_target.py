"""Where the certificate goes (``aicert run --output-bom``): checked before anything runs.

A run takes minutes to hours; finding out only at its end that the certificate cannot be
written there (a folder, a read-only or immutable file, a read-only mount) wastes all of it.
``check_output_target`` refuses such a target at once, and is asked again just before the
certificate is published, because the target can change during the run.

A read-only file is refused rather than replaced, even for root (for whom the permission bits
do not stop a rename over it): its mode says that its owner wants it kept.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import struct
import tempfile
from pathlib import Path

# <linux/fs.h>: FS_IOC_GETFLAGS = _IOR('f', 1, long); the kernel reads and writes an int.
_FS_IOC_GETFLAGS = 0x80086601
_FS_IMMUTABLE_FL = 0x00000010
_FS_APPEND_FL = 0x00000020
_ANY_WRITE_BIT = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH


class OutputTargetError(ValueError):
    """The certificate cannot be written at the path given; the message says why."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def _inode_flags(path: Path) -> int:
    """The file's attribute flags (``lsattr``), 0 where the file system has none."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:
        return 0  # unreadable: the access checks that follow report it
    try:
        answer = fcntl.ioctl(fd, _FS_IOC_GETFLAGS, bytes(8))
        return int(struct.unpack("i", answer[:4])[0])
    except OSError:
        return 0  # ENOTTY / EOPNOTSUPP: the file system keeps no such flags
    finally:
        os.close(fd)


def _refuse_unwritable(path: Path, what: str) -> None:
    """Refuse ``path`` (an existing file or folder) unless this process may write it."""
    with contextlib.suppress(OSError):
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            raise OutputTargetError(path, f"{what} is on a read-only file system")
    flags = _inode_flags(path)
    if flags & _FS_IMMUTABLE_FL:
        raise OutputTargetError(path, f"{what} is immutable (chattr +i)")
    if flags & _FS_APPEND_FL:
        raise OutputTargetError(path, f"{what} is append-only (chattr +a)")
    mode = path.stat().st_mode
    if not mode & _ANY_WRITE_BIT:
        keep = "" if stat.S_ISDIR(mode) else ": refused rather than replaced"
        raise OutputTargetError(path, f"{what} is read-only (mode {stat.S_IMODE(mode):04o}){keep}")
    if not os.access(path, os.W_OK):
        raise OutputTargetError(path, f"{what} is not writable by this user")


def check_output_target(path: Path) -> Path:
    """Check that a certificate can be written (atomically: a new file, then a rename) at
    ``path``; return the resolved path it will be written to.

    Refused: an existing folder or non-regular file, a read-only, immutable or append-only
    file, and a folder (the nearest existing one; missing ones are created at the end) that
    is read-only, immutable, on a read-only file system, or not writable by this user. The
    folder is probed by creating and removing a hidden empty file in it.

    Raises:
        OutputTargetError: naming the path and why it cannot be written.
    """
    target = Path(path).expanduser().resolve()  # the certificate is written to the resolved path
    if target.is_dir():
        raise OutputTargetError(target, "is a folder; give a file path such as proof.json")
    if target.exists():
        if not stat.S_ISREG(target.stat().st_mode):
            raise OutputTargetError(target, "exists and is not a regular file")
        _refuse_unwritable(target, "the existing file")
    folder = target.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise OutputTargetError(target, f"{folder} is not a folder")
    try:
        _refuse_unwritable(folder, f"its folder {folder}")
    except OutputTargetError as exc:
        raise OutputTargetError(target, exc.reason) from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".aicert-write-probe-", dir=folder)
    except OSError as exc:
        raise OutputTargetError(
            target, f"cannot create a file in its folder {folder}: {exc.strerror}"
        ) from None
    os.close(fd)
    Path(probe).unlink(missing_ok=True)
    return target
