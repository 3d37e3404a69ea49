"""Copy bytes into a new file while hashing them with SHA-256, at about the speed of hashing.

A plain loop reads a chunk, hashes it, writes it, then reads the next: the costs add up, and
a fresh ``bytes`` per read costs more again. Here copying and hashing overlap in two threads
(``hashlib`` releases the GIL on large buffers; reads, writes and kernel copies release it in
the kernel), so a copy takes about as long as the slower of the two, and the buffers are
reused and small enough to stay in the CPU's cache.

- ``copy_file_and_hash``: from an open file into a new file. The kernel copies
  (``os.copy_file_range``: no pass through Python) while a second thread hashes the target's
  bytes just behind it, read back from the page cache. What is hashed is what the target
  holds, whatever happened to the source meanwhile. Where the kernel cannot copy between the
  two (another filesystem on an old kernel, a block device), it falls back to
  ``copy_and_hash``.
- ``copy_and_hash``: from any stream with ``readinto`` (an ``http.client.HTTPResponse``, a
  ``tarfile`` member): the caller's thread reads and writes each buffer while a second thread
  hashes it; a buffer is refilled only once it was both written and hashed, so the hashed
  bytes are the written bytes.

Memory is bounded whatever the size: ``STREAM_BUFFERS`` x ``STREAM_CHUNK`` for a stream,
``HASH_CHUNK`` for a file copy.
"""

from __future__ import annotations

import errno
import hashlib
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Protocol

__all__ = [
    "COPY_STEP",
    "HASH_CHUNK",
    "STREAM_BUFFERS",
    "STREAM_CHUNK",
    "Readable",
    "copy_and_hash",
    "copy_file_and_hash",
]

# 256 KiB x 16: a chunk stays in a core's cache between the read, the write and the hash
# (4 MiB chunks made the same copy cost about a third more CPU), and 16 of them let the
# reader run ahead of the hasher by 4 MiB.
STREAM_CHUNK = 256 * 1024
STREAM_BUFFERS = 16
# A kernel copy step: the hasher follows step by step, so it is never more than this behind.
COPY_STEP = 16 * 1024 * 1024
# The hasher's reads of the copied bytes (page cache into a cache-sized buffer).
HASH_CHUNK = 1024 * 1024
# What copy_file_range raises when the kernel cannot copy between these two files.
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF}

ByteCounter = Callable[[int], None]


class Readable(Protocol):
    """A binary stream that reads into a caller's buffer."""

    def readinto(self, buffer: memoryview, /) -> int | None:
        """Read up to ``len(buffer)`` bytes into ``buffer``; 0 at the end."""
        ...


class _Limited:
    """At most ``length`` bytes of ``source`` (a ``Readable``)."""

    def __init__(self, source: Readable, length: int) -> None:
        self._source, self._left = source, length

    def readinto(self, buffer: memoryview, /) -> int | None:
        if self._left <= 0:
            return 0
        count = self._source.readinto(buffer[: self._left])
        self._left -= count or 0
        return count


class _StreamHasher(threading.Thread):
    """Hashes the buffers it is handed, in order, and hands each one back once hashed."""

    def __init__(self, views: list[memoryview], free: queue.SimpleQueue[int]) -> None:
        super().__init__(name="copyhash-stream", daemon=True)
        self.digest = hashlib.sha256()
        self.todo: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self._views, self._free = views, free

    def run(self) -> None:
        while (item := self.todo.get()) is not None:
            index, count = item
            self.digest.update(self._views[index][:count])
            self._free.put(index)


def _write_all(target: BinaryIO, data: memoryview) -> None:
    """Write all of ``data`` (an unbuffered file may take part of it per call)."""
    while data:
        written = target.write(data)
        if written is None:  # only a non-blocking stream does this; a file does not
            raise BlockingIOError("copy_and_hash: the target would block")
        data = data[written:]


def copy_and_hash(
    source: Readable,
    target: BinaryIO,
    *,
    on_bytes: ByteCounter | None = None,
    chunk_size: int = STREAM_CHUNK,
) -> tuple[str, int]:
    """Copy ``source`` to ``target`` until the end of ``source``; hash what is written.

    Args:
        source: read with ``readinto`` until it returns 0.
        target: an open binary file (unbuffered is best: the chunks are large already).
        on_bytes: receives the size of each chunk once written (in the caller's thread).
        chunk_size: bytes per read.

    Returns:
        (sha256 hex of the bytes written, their count).

    Raises:
        OSError: reading or writing failed (what was written so far stays in ``target``:
            the caller removes it).
    """
    views = [memoryview(bytearray(chunk_size)) for _ in range(STREAM_BUFFERS)]
    free: queue.SimpleQueue[int] = queue.SimpleQueue()
    for index in range(STREAM_BUFFERS):
        free.put(index)
    hasher = _StreamHasher(views, free)
    hasher.start()
    size = 0
    try:
        while True:
            index = free.get()
            count = source.readinto(views[index])
            if count is None:  # only a non-blocking stream does this
                raise BlockingIOError("copy_and_hash: the source would block")
            if not count:
                break
            hasher.todo.put((index, count))
            _write_all(target, views[index][:count])
            size += count
            if on_bytes is not None:
                on_bytes(count)
    finally:
        hasher.todo.put(None)
        hasher.join()
    return hasher.digest.hexdigest(), size


class _TargetHasher(threading.Thread):
    """Hashes the target file's bytes as the kernel copy reports them written."""

    def __init__(self, fd: int) -> None:
        super().__init__(name="copyhash-file", daemon=True)
        self.digest = hashlib.sha256()
        self.error: OSError | None = None
        self._fd = fd
        self._copied = 0
        self._finished = False
        self._abandoned = False
        self._changed = threading.Condition()

    def advance(self, count: int) -> None:
        """``count`` more bytes are in the target."""
        with self._changed:
            self._copied += count
            self._changed.notify()

    def finish(self, *, abandon: bool = False) -> None:
        """No more bytes will come; returns once every copied byte is hashed (``abandon``:
        at once, the copy failed and its hash will not be used)."""
        with self._changed:
            self._finished, self._abandoned = True, abandon
            self._changed.notify()
        self.join()

    def run(self) -> None:
        view = memoryview(bytearray(HASH_CHUNK))
        hashed = 0
        try:
            while True:
                with self._changed:
                    while hashed == self._copied and not self._finished:
                        self._changed.wait()
                    copied = self._copied
                    if self._abandoned or hashed == copied:
                        return  # finished, and everything is hashed (or not wanted)
                while hashed < copied:
                    piece = view[: min(HASH_CHUNK, copied - hashed)]
                    count = os.preadv(self._fd, [piece], hashed)
                    if count == 0:
                        raise OSError(errno.EIO, f"the copy ends at {hashed} bytes, not {copied}")
                    self.digest.update(view[:count])
                    hashed += count
        except OSError as exc:
            self.error = exc


def _copy_range(
    source_fd: int,
    target_fd: int,
    length: int | None,
    hasher: _TargetHasher,
    on_bytes: ByteCounter | None,
) -> int | None:
    """``copy_file_range`` step by step, telling ``hasher`` of each step; the bytes copied,
    or None (nothing copied) when the kernel cannot copy between the two files."""
    size = 0
    while length is None or size < length:
        step = COPY_STEP if length is None else min(COPY_STEP, length - size)
        try:
            count = os.copy_file_range(source_fd, target_fd, step)
        except OSError as exc:
            if size == 0 and exc.errno in _NO_KERNEL_COPY:
                return None
            raise
        if count == 0:
            # At the start, 0 may also mean a file whose size the kernel does not know
            # (/proc, some FUSE): the stream copy then reads it for real.
            return None if size == 0 else size
        size += count
        hasher.advance(count)
        if on_bytes is not None:
            on_bytes(count)
    return size


def _kernel_copy(
    source_fd: int, target_fd: int, length: int | None, on_bytes: ByteCounter | None
) -> tuple[str, int] | None:
    """Copy with ``copy_file_range`` while a thread hashes the target; None (nothing copied)
    when the kernel cannot copy between the two files or copies nothing at first."""
    hasher = _TargetHasher(target_fd)
    hasher.start()
    try:
        size = _copy_range(source_fd, target_fd, length, hasher, on_bytes)
    except BaseException:
        hasher.finish(abandon=True)
        raise
    hasher.finish()
    if size is None:
        return None
    if hasher.error is not None:
        raise hasher.error
    return hasher.digest.hexdigest(), size


def copy_file_and_hash(
    source: BinaryIO,
    target: Path,
    *,
    length: int | None = None,
    on_bytes: ByteCounter | None = None,
) -> tuple[str, int]:
    """Copy ``source`` from its position (to its end, or ``length`` bytes) into a new file
    ``target``, replacing any file there; hash the bytes the target holds.

    Args:
        source: an open binary file, block device or pipe; the copy starts at its position
            (``tell()``) and leaves it anywhere (a pipe: unbuffered, nothing read ahead).
        target: the file to create.
        length: the most bytes to copy; None: to the end of ``source``.
        on_bytes: receives the size of each piece once copied (in the caller's thread).

    Returns:
        (sha256 hex of the target's bytes, their count).

    Raises:
        OSError: reading or writing failed (the partial target stays: the caller removes it).
    """
    source_fd = source.fileno()
    if source.seekable():
        # The copy works on the descriptor: a buffered reader's descriptor may be ahead of it.
        os.lseek(source_fd, source.tell(), os.SEEK_SET)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(source_fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
    with open(os.open(target, flags, 0o666), "r+b", buffering=0) as writer:
        if hasattr(os, "copy_file_range"):
            copied = _kernel_copy(source_fd, writer.fileno(), length, on_bytes)
            if copied is not None:
                return copied
        with open(source_fd, "rb", buffering=0, closefd=False) as raw:
            reader: Readable = raw if length is None else _Limited(raw, length)
            return copy_and_hash(reader, writer, on_bytes=on_bytes)
