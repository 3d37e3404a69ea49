"""SHA-256 of files and folders, shared by the guest (measuring) and the verifier (re-hashing).

Standard library only: the verifier may depend on nothing else.

Files are read in large chunks into one reused buffer (no whole-file load). A folder's files are
hashed in parallel threads: ``hashlib`` releases the GIL while it hashes a large buffer, so the
threads use several cores. A single large file is hashed by one thread, start to end.

Trees are walked without following symlinks out of the root: a symlink is accepted only when it
points to a regular file inside the root (its target's content is hashed under the link's path);
any other symlink, and any special file (fifo, socket, device), raises ``UnsafePathError``.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import threading
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CHUNK_SIZE",
    "FileDigest",
    "ProgressCallback",
    "UnsafePathError",
    "hash_tree",
    "sha256_file",
    "tree_sha256",
]

# 8 MiB: large enough that per-read overhead is negligible at ~1.5 GB/s per core, small enough
# that a few threads' buffers cost little memory.
CHUNK_SIZE = 8 * 1024 * 1024

ProgressCallback = Callable[[int], None]

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class UnsafePathError(ValueError):
    """A path cannot be hashed safely (symlink escape or to a folder, special file, bad name)."""


@dataclass(frozen=True, slots=True)
class FileDigest:
    """One file of a tree: its relative POSIX path, size in bytes and SHA-256 (lowercase hex)."""

    path: str
    size: int
    sha256: str


def _hash_open_file(
    fd: int, display_path: str, progress: ProgressCallback | None
) -> tuple[str, int]:
    """Hash the regular file open at ``fd`` (which this function closes)."""
    with open(fd, "rb", buffering=0, closefd=True) as stream:
        info = os.fstat(stream.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise UnsafePathError(f"not a regular file: {display_path}")
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(stream.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        # A small file gets a small buffer: zero-filling 8 MiB per tiny file would dominate.
        buffer = bytearray(max(1, min(CHUNK_SIZE, info.st_size + 1)))
        view = memoryview(buffer)
        digest = hashlib.sha256()
        size = 0
        while True:
            count = stream.readinto(view)
            if not count:
                break
            digest.update(view[:count])
            size += count
            if progress is not None:
                progress(count)
        return digest.hexdigest(), size


def _open_flags(*, follow_symlinks: bool) -> int:
    # O_NONBLOCK: opening a fifo must not hang; the fstat check then refuses it.
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    return flags


def sha256_file(
    path: str | os.PathLike[str], progress: ProgressCallback | None = None
) -> tuple[str, int]:
    """Return ``(sha256_hex, size)`` of a regular file, streamed in ``CHUNK_SIZE`` reads.

    ``progress`` receives the number of bytes read after each chunk (increments, summing to the
    size). A symlink given as ``path`` is followed; a special file raises ``UnsafePathError``.
    """
    fd = os.open(path, _open_flags(follow_symlinks=True))
    return _hash_open_file(fd, os.fspath(path), progress)


def _relative_posix(parts: Sequence[str]) -> str:
    path = "/".join(parts)
    # Names that cannot be written unambiguously in the tree digest's lines are refused.
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafePathError(f"file name is not valid UTF-8: {path!r}") from None
    if "\n" in path or "\r" in path:
        raise UnsafePathError(f"file name contains a line break: {path!r}")
    return path


def _is_excluded(parts: Sequence[str], exclude: Collection[str]) -> bool:
    return parts[-1] in exclude or "/".join(parts) in exclude


def _collect(root: Path, exclude: Collection[str]) -> list[tuple[str, Path, int]]:
    """Walk ``root``; return ``(relative path, path to open, expected size)`` for each file."""
    found: list[tuple[str, Path, int]] = []
    pending: list[tuple[Path, tuple[str, ...]]] = [(root, ())]
    while pending:
        folder, folder_parts = pending.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                parts = (*folder_parts, entry.name)
                if _is_excluded(parts, exclude):
                    continue
                relative = _relative_posix(parts)
                info = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(info.st_mode):
                    pending.append((Path(entry.path), parts))
                elif stat.S_ISREG(info.st_mode):
                    found.append((relative, Path(entry.path), info.st_size))
                elif stat.S_ISLNK(info.st_mode):
                    target = _symlink_target_inside(root, Path(entry.path))
                    found.append((relative, target, target.stat().st_size))
                else:
                    raise UnsafePathError(f"special file (fifo, socket or device): {relative}")
    return found


def _symlink_target_inside(root: Path, link: Path) -> Path:
    """The fully resolved target of ``link`` if it is a regular file inside ``root``."""
    try:
        target = link.resolve(strict=True)
    except (OSError, RuntimeError) as exc:  # dangling or a loop
        raise UnsafePathError(f"symlink cannot be resolved: {link}: {exc}") from exc
    if not target.is_relative_to(root):
        raise UnsafePathError(f"symlink points outside the root: {link} -> {target}")
    mode = target.stat(follow_symlinks=False).st_mode
    if stat.S_ISDIR(mode):
        raise UnsafePathError(f"symlink points to a folder: {link} -> {target}")
    if not stat.S_ISREG(mode):
        raise UnsafePathError(f"symlink points to a special file: {link} -> {target}")
    return target


def hash_tree(
    root: Path,
    *,
    exclude: Collection[str] = (),
    progress: ProgressCallback | None = None,
    workers: int | None = None,
) -> list[FileDigest]:
    """Hash every file under ``root``; return the digests sorted by path.

    ``exclude`` holds names (matched at any depth, e.g. ``".git"``) or relative POSIX paths
    (e.g. ``"data/cache"``); a matching folder is skipped with everything under it.
    Paths in the result are relative to ``root``, ``/``-separated. Empty folders do not appear.
    ``progress`` receives byte increments; calls are serialised, so it needs no locking.
    ``workers`` defaults to the number of usable cores.

    Raises ``UnsafePathError`` (naming the path) for a symlink that points outside ``root``, to a
    folder, or nowhere, for a special file, and for a name that is not UTF-8 or has a line break.
    """
    resolved_root = Path(root).resolve(strict=True)
    if not resolved_root.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")
    files = _collect(resolved_root, exclude)

    report: ProgressCallback | None = None
    if progress is not None:
        lock = threading.Lock()
        user_progress = progress

        def report(count: int) -> None:
            with lock:
                user_progress(count)

    def hash_one(item: tuple[str, Path, int]) -> FileDigest:
        relative, open_path, _size = item
        # Every component was resolved or checked by the walk; O_NOFOLLOW refuses a file swapped
        # for a symlink since, and the fstat inside refuses one swapped for a special file.
        fd = os.open(open_path, _open_flags(follow_symlinks=False))
        sha256, size = _hash_open_file(fd, relative, report)
        return FileDigest(path=relative, size=size, sha256=sha256)

    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        workers = workers or os.cpu_count() or 1
    # Largest first: the long files start early and the pool does not end on one big straggler.
    files.sort(key=lambda item: item[2], reverse=True)
    if workers <= 1 or len(files) <= 1:
        digests = [hash_one(item) for item in files]
    else:
        with ThreadPoolExecutor(max_workers=min(workers, len(files))) as pool:
            digests = list(pool.map(hash_one, files))
    digests.sort(key=lambda digest: digest.path)
    return digests


def tree_sha256(digests: Sequence[FileDigest]) -> str:
    """The SHA-256 of a tree, as recorded in certificates (lowercase hex).

    Definition: sort the files by path (Unicode code point order, which is also the byte
    order of their UTF-8 encoding, as ``LC_ALL=C sort`` gives), write one line per file::

        <sha256 lowercase hex><2 spaces><size in decimal><2 spaces><relative POSIX path>\\n

    and hash the UTF-8 bytes of the concatenated lines. An empty tree hashes the empty string.
    Paths are relative to the tree's root, ``/``-separated, without a leading ``./``.

    From a checkout without symlinks, with coreutils::

        find . -name .git -prune -o -type f -printf '%P\\0' | LC_ALL=C sort -z |
          while IFS= read -r -d '' p; do
            printf '%s  %s  %s\\n' "$(sha256sum < "$p" | cut -c1-64)" "$(stat -c %s -- "$p")" "$p"
          done | sha256sum

    Example (a file ``hello.txt`` holding ``hello\\n`` and an empty ``empty``):

    >>> tree_sha256([
    ...     FileDigest("hello.txt", 6,
    ...                "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"),
    ...     FileDigest("empty", 0,
    ...                "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
    ... ])
    '2cdb20691ab15bf426e6bc74359c2a5152e170dffd4592ade5e23c3a188bace6'

    Raises ``ValueError`` for a malformed entry (bad hex, negative size, a path that is absolute,
    has a line break or ``.``/``..`` components) or a duplicate path.
    """
    ordered = sorted(digests, key=lambda digest: digest.path)
    hasher = hashlib.sha256()
    previous: str | None = None
    for digest in ordered:
        _check_digest_entry(digest)
        if digest.path == previous:
            raise ValueError(f"duplicate path in tree: {digest.path}")
        previous = digest.path
        hasher.update(f"{digest.sha256}  {digest.size}  {digest.path}\n".encode())
    return hasher.hexdigest()


def _check_digest_entry(digest: FileDigest) -> None:
    if not _SHA256_HEX.fullmatch(digest.sha256):
        raise ValueError(f"not a lowercase SHA-256 hex digest: {digest.sha256!r} ({digest.path})")
    if isinstance(digest.size, bool) or not isinstance(digest.size, int) or digest.size < 0:
        raise ValueError(f"bad size {digest.size!r} for {digest.path}")
    path = digest.path
    if (
        not path
        or path.startswith("/")
        or "\n" in path
        or "\r" in path
        or any(part in ("", ".", "..") for part in path.split("/"))
    ):
        raise ValueError(f"not a relative POSIX path: {path!r}")
