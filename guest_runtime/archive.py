"""The run's outputs and logs as a streamed tar, for platforms whose files stay on the machine.

``tarfile`` writes a member's data in one ``addfile`` call, which would hold a multi-GB
weights file in a generator's buffer; so members are framed here: ``TarInfo.tobuf`` for
the header (tarfile's own PAX encoding), then the file in chunks, then the padding to 512
bytes, and two zero blocks at the end. Only regular files and folders are sent (the
measured outputs are regular files: symlinks and special files are refused by the measuring
step anyway).
"""

from __future__ import annotations

import copy
import os
import stat
import tarfile
from collections.abc import Iterator, Mapping
from pathlib import Path

BLOCK = tarfile.BLOCKSIZE
CHUNK = 1024 * 1024


def _member(name: str, info: os.stat_result, kind: bytes) -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type = kind
    member.mode = stat.S_IMODE(info.st_mode)
    member.mtime = int(info.st_mtime)
    member.size = info.st_size if kind == tarfile.REGTYPE else 0
    return member


def stream_tar(folders: Mapping[str, Path]) -> Iterator[bytes]:
    """A tar of each ``folders`` value under its key's name, walked in sorted order."""
    for prefix, root in folders.items():
        if not root.is_dir():
            continue
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            relative = Path(folder).relative_to(root)
            base = f"{prefix}/{relative.as_posix()}".removesuffix("/.")
            yield _member(base, os.lstat(folder), tarfile.DIRTYPE).tobuf(tarfile.PAX_FORMAT)
            for name in sorted(files):
                path = Path(folder) / name
                info = os.lstat(path)
                if not stat.S_ISREG(info.st_mode):
                    continue
                member = _member(f"{base}/{name}", info, tarfile.REGTYPE)
                yield member.tobuf(tarfile.PAX_FORMAT)
                remaining = member.size
                with path.open("rb") as handle:
                    while remaining > 0:
                        chunk = handle.read(min(CHUNK, remaining))
                        if not chunk:
                            # Shrunk while sent: pad, so the archive stays well-formed and
                            # the receiver's hash check reports the file.
                            chunk = bytes(min(CHUNK, remaining))
                        remaining -= len(chunk)
                        yield chunk
                if member.size % BLOCK:
                    yield bytes(BLOCK - member.size % BLOCK)
    yield bytes(2 * BLOCK)


class UnsafeArchiveMember(tarfile.TarError):
    """A member that would land outside the destination, or is not a file, folder or symlink."""


def extract_member(archive: tarfile.TarFile, member: tarfile.TarInfo, destination: Path) -> None:
    """Extract ``member`` under ``destination`` with the rules of tarfile's ``data`` filter.

    Hand-written fallback because Debian bookworm's Python (3.11.2, the qemu guest's) predates
    the extraction filters (3.11.4): no absolute names or ``..`` escapes, symlinks only to
    targets inside ``destination``, no hard links or special files, no set-id bits, owned by
    the extracting user."""
    if hasattr(tarfile, "data_filter"):
        archive.extract(member, destination, filter="data")
        return
    root = destination.resolve()
    target = (root / member.name).resolve()
    if member.name.startswith("/") or not target.is_relative_to(root):
        raise UnsafeArchiveMember(f"{member.name!r} leaves the destination")
    if member.issym():
        link = (target.parent / member.linkname).resolve()
        if member.linkname.startswith("/") or not link.is_relative_to(root):
            raise UnsafeArchiveMember(f"{member.name!r} links out of the destination")
    elif not (member.isfile() or member.isdir()):
        raise UnsafeArchiveMember(f"{member.name!r} is not a file, folder or symlink")
    member = copy.copy(member)
    member.mode = (member.mode if member.mode is not None else 0o644) & 0o755
    member.uid = member.gid = os.getuid()
    member.uname = member.gname = ""
    archive.extract(member, destination)
