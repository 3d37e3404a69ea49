"""Copy + SHA-256 in one pass: the digest is that of the bytes the target holds, on the kernel
copy path and on the stream path it falls back to; memory and threads are released."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from aicert.guest_runtime import copyhash
from aicert.guest_runtime.copyhash import copy_and_hash, copy_file_and_hash

# More than the stream path's buffers hold together (so buffers are reused) and more than
# one kernel copy step, and not a multiple of any chunk.
SIZE = copyhash.COPY_STEP + copyhash.STREAM_BUFFERS * copyhash.STREAM_CHUNK + 12345


@pytest.fixture(scope="module")
def content() -> bytes:
    return os.urandom(SIZE)


@pytest.fixture
def source(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "source.bin"
    path.write_bytes(content)
    return path


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _copyhash_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("copyhash")]


def test_a_file_is_copied_by_the_kernel_and_hashed(
    source: Path, tmp_path: Path, content: bytes
) -> None:
    target = tmp_path / "target.bin"
    counts: list[int] = []
    with source.open("rb", buffering=0) as reader:
        digest, size = copy_file_and_hash(reader, target, on_bytes=counts.append)
    assert (digest, size) == (_digest(content), SIZE)
    assert target.read_bytes() == content
    # Kernel copy steps, not stream chunks: this was the copy_file_range path.
    assert counts[0] == copyhash.COPY_STEP and sum(counts) == SIZE
    assert _copyhash_threads() == []


def test_a_range_is_copied_from_the_readers_position(
    source: Path, tmp_path: Path, content: bytes
) -> None:
    target = tmp_path / "target.bin"
    with source.open("rb") as reader:  # buffered: its descriptor is ahead of tell()
        reader.read(100)
        digest, size = copy_file_and_hash(reader, target, length=5000)
    assert (digest, size) == (_digest(content[100:5100]), 5000)
    assert target.read_bytes() == content[100:5100]


def test_an_existing_target_is_replaced(source: Path, tmp_path: Path, content: bytes) -> None:
    target = tmp_path / "target.bin"
    target.write_bytes(b"y" * (SIZE + 1000))
    with source.open("rb", buffering=0) as reader:
        assert copy_file_and_hash(reader, target) == (_digest(content), SIZE)
    assert target.read_bytes() == content


def test_a_file_the_kernel_cannot_size_is_read_for_real(tmp_path: Path) -> None:
    """/proc files report size 0: copy_file_range copies nothing, the stream path reads it."""
    expected = Path("/proc/version").read_bytes()
    assert expected
    target = tmp_path / "version"
    with open("/proc/version", "rb", buffering=0) as reader:
        assert copy_file_and_hash(reader, target) == (_digest(expected), len(expected))
    assert target.read_bytes() == expected


@pytest.fixture
def pipe_reader(content: bytes) -> Iterator[io.FileIO]:
    """The read end of a pipe a thread fills with ``content``."""
    read_fd, write_fd = os.pipe()

    def fill() -> None:
        with open(write_fd, "wb") as writer:
            writer.write(content)

    filler = threading.Thread(target=fill)
    filler.start()
    with open(read_fd, "rb", buffering=0) as reader:
        assert isinstance(reader, io.FileIO)
        yield reader
    filler.join()


def test_a_pipe_falls_back_to_the_stream_path(
    pipe_reader: io.FileIO, tmp_path: Path, content: bytes
) -> None:
    """copy_file_range refuses a pipe; the bytes still arrive, hashed, in stream chunks."""
    target = tmp_path / "target.bin"
    counts: list[int] = []
    digest, size = copy_file_and_hash(pipe_reader, target, on_bytes=counts.append)
    assert (digest, size) == (_digest(content), SIZE)
    assert target.read_bytes() == content
    assert max(counts) <= copyhash.STREAM_CHUNK


def test_a_stream_is_copied_and_hashed(tmp_path: Path, content: bytes) -> None:
    target = tmp_path / "target.bin"
    counts: list[int] = []
    with target.open("wb", buffering=0) as writer:
        digest, size = copy_and_hash(io.BytesIO(content), writer, on_bytes=counts.append)
    assert (digest, size) == (_digest(content), SIZE)
    assert target.read_bytes() == content
    assert max(counts) == copyhash.STREAM_CHUNK and sum(counts) == SIZE
    assert _copyhash_threads() == []


def test_an_empty_stream_hashes_the_empty_string(tmp_path: Path) -> None:
    target = tmp_path / "target.bin"
    with target.open("wb", buffering=0) as writer:
        assert copy_and_hash(io.BytesIO(b""), writer) == (_digest(b""), 0)
    assert target.read_bytes() == b""


def test_a_full_disk_raises_and_leaves_no_thread(source: Path) -> None:
    """/dev/full: the kernel copy is refused (a device), the stream write fails ENOSPC."""
    with source.open("rb", buffering=0) as reader, pytest.raises(OSError) as failure:
        copy_file_and_hash(reader, Path("/dev/full"))
    assert failure.value.errno == errno.ENOSPC
    assert _copyhash_threads() == []
