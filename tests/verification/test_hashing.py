"""File and tree hashing shared by the guest and the verifier (no Docker needed)."""

from __future__ import annotations

import doctest
import hashlib
import os
import socket
import subprocess
from pathlib import Path

import pytest

from aicert import hashing
from aicert.hashing import (
    CHUNK_SIZE,
    FileDigest,
    UnsafePathError,
    hash_tree,
    sha256_file,
    tree_sha256,
)

EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
ABC_SHA256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_sha256_file_known_vectors(tmp_path: Path) -> None:
    assert sha256_file(write(tmp_path / "empty", b"")) == (EMPTY_SHA256, 0)
    assert sha256_file(write(tmp_path / "abc", b"abc")) == (ABC_SHA256, 3)


def test_sha256_file_multi_chunk_and_progress_sums_to_size(tmp_path: Path) -> None:
    data = os.urandom(1024) * (2 * CHUNK_SIZE // 1024) + b"tail bytes"
    path = write(tmp_path / "big.bin", data)
    increments: list[int] = []
    digest, size = sha256_file(path, progress=increments.append)
    assert (digest, size) == (hashlib.sha256(data).hexdigest(), len(data))
    assert sum(increments) == len(data)
    assert len(increments) == 3


def test_sha256_file_refuses_fifo_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(UnsafePathError, match="pipe"):
        sha256_file(fifo)


def test_hash_tree_sorted_posix_paths_and_digests(tmp_path: Path) -> None:
    files = {
        "b": b"b",
        "a/c": b"c",
        "a.txt": b"abc",
        "A": b"",
        "a/deep/x y.bin": b"\x00" * 5000,
    }
    for relative, data in files.items():
        write(tmp_path / relative, data)
    (tmp_path / "empty-folder").mkdir()
    digests = hash_tree(tmp_path)
    # Code point order of the whole path: "A" < "a.txt" < "a/c" ('.' < '/') < "b".
    assert [d.path for d in digests] == ["A", "a.txt", "a/c", "a/deep/x y.bin", "b"]
    for digest in digests:
        data = files[digest.path]
        assert digest == FileDigest(digest.path, len(data), hashlib.sha256(data).hexdigest())
    assert digests[1].sha256 == ABC_SHA256
    assert digests[0].sha256 == EMPTY_SHA256


def test_hash_tree_excludes_names_at_any_depth_and_relative_paths(tmp_path: Path) -> None:
    write(tmp_path / "train.py", b"print(1)\n")
    write(tmp_path / ".git" / "HEAD", b"ref: refs/heads/main\n")
    write(tmp_path / "vendor" / ".git" / "config", b"x")
    write(tmp_path / "data" / "cache" / "blob", b"x")
    write(tmp_path / "data" / "keep", b"k")
    digests = hash_tree(tmp_path, exclude={".git", "data/cache"})
    assert [d.path for d in digests] == ["data/keep", "train.py"]


def test_hash_tree_empty_folder(tmp_path: Path) -> None:
    assert hash_tree(tmp_path) == []
    assert tree_sha256([]) == EMPTY_SHA256


def test_hash_tree_progress_sums_to_total_size(tmp_path: Path) -> None:
    sizes = [0, 1, CHUNK_SIZE + 7, 12345, 3 * 1024 * 1024]
    for index, size in enumerate(sizes):
        write(tmp_path / f"f{index}", os.urandom(size))
    increments: list[int] = []
    digests = hash_tree(tmp_path, progress=increments.append, workers=4)
    assert sum(increments) == sum(sizes) == sum(d.size for d in digests)


def test_hash_tree_same_result_single_and_multi_threaded(tmp_path: Path) -> None:
    for index in range(20):
        write(tmp_path / f"dir{index % 3}" / f"file{index}", os.urandom(1000 * index))
    assert hash_tree(tmp_path, workers=1) == hash_tree(tmp_path, workers=8)


def test_symlink_out_of_root_refused(tmp_path: Path) -> None:
    outside = write(tmp_path / "outside.txt", b"secret")
    root = tmp_path / "root"
    write(root / "ok.txt", b"ok")
    (root / "leak").symlink_to(outside)
    with pytest.raises(UnsafePathError, match="leak"):
        hash_tree(root)


def test_relative_symlink_escaping_through_dotdot_refused(tmp_path: Path) -> None:
    write(tmp_path / "outside.txt", b"secret")
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "leak").symlink_to("../../outside.txt")
    with pytest.raises(UnsafePathError, match="leak"):
        hash_tree(root)


def test_symlink_to_folder_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    write(tmp_path / "real" / "f", b"f")
    (tmp_path / "alias").symlink_to(tmp_path / "real", target_is_directory=True)
    with pytest.raises(UnsafePathError, match="alias"):
        hash_tree(tmp_path)


def test_dangling_symlink_refused(tmp_path: Path) -> None:
    (tmp_path / "nowhere").symlink_to(tmp_path / "missing")
    with pytest.raises(UnsafePathError, match="nowhere"):
        hash_tree(tmp_path)


def test_symlink_to_file_inside_root_hashed_under_link_path(tmp_path: Path) -> None:
    write(tmp_path / "weights" / "model.bin", b"weights")
    (tmp_path / "latest.bin").symlink_to("weights/model.bin")
    digests = {d.path: d for d in hash_tree(tmp_path)}
    expected = hashlib.sha256(b"weights").hexdigest()
    assert digests["latest.bin"] == FileDigest("latest.bin", 7, expected)
    assert digests["weights/model.bin"].sha256 == expected


def test_fifo_in_tree_refused(tmp_path: Path) -> None:
    write(tmp_path / "a.txt", b"a")
    os.mkfifo(tmp_path / "queue")
    with pytest.raises(UnsafePathError, match="queue"):
        hash_tree(tmp_path)


def test_socket_in_tree_refused(tmp_path: Path) -> None:
    # AF_UNIX paths are limited to ~107 bytes: bind by a short relative name.
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        with socket.socket(socket.AF_UNIX) as server:
            server.bind("sock")
            with pytest.raises(UnsafePathError, match="sock"):
                hash_tree(tmp_path)
    finally:
        os.chdir(cwd)


def test_symlink_to_fifo_inside_root_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "queue")
    (tmp_path / "link").symlink_to("queue")
    with pytest.raises(UnsafePathError):
        hash_tree(tmp_path)


def test_file_name_with_line_break_refused(tmp_path: Path) -> None:
    write(tmp_path / "evil\nname", b"x")
    with pytest.raises(UnsafePathError, match="line break"):
        hash_tree(tmp_path)


def test_tree_sha256_definition_and_order_independence() -> None:
    hello = FileDigest("hello.txt", 6, hashlib.sha256(b"hello\n").hexdigest())
    empty = FileDigest("empty", 0, EMPTY_SHA256)
    expected_lines = f"{EMPTY_SHA256}  0  empty\n{hello.sha256}  6  hello.txt\n"
    expected = hashlib.sha256(expected_lines.encode()).hexdigest()
    assert tree_sha256([hello, empty]) == tree_sha256([empty, hello]) == expected
    # The value documented in the docstring, pinned: a change here breaks old certificates.
    assert expected == "2cdb20691ab15bf426e6bc74359c2a5152e170dffd4592ade5e23c3a188bace6"


def test_tree_sha256_docstring_example_runs() -> None:
    results = doctest.testmod(hashing, raise_on_error=False)
    assert results.attempted >= 1
    assert results.failed == 0


@pytest.mark.parametrize(
    "bad",
    [
        FileDigest("x", 1, "A" * 64),
        FileDigest("x", 1, "ab"),
        FileDigest("x", -1, EMPTY_SHA256),
        FileDigest("/etc/passwd", 1, EMPTY_SHA256),
        FileDigest("a/../b", 1, EMPTY_SHA256),
        FileDigest("./a", 1, EMPTY_SHA256),
        FileDigest("a\nb", 1, EMPTY_SHA256),
        FileDigest("", 1, EMPTY_SHA256),
    ],
)
def test_tree_sha256_rejects_malformed_entries(bad: FileDigest) -> None:
    with pytest.raises(ValueError):
        tree_sha256([bad])


def test_tree_sha256_rejects_duplicate_paths() -> None:
    entry = FileDigest("a", 0, EMPTY_SHA256)
    with pytest.raises(ValueError, match="duplicate"):
        tree_sha256([entry, entry])


def _documented_shell_recipe() -> str:
    doc = tree_sha256.__doc__ or ""
    block = doc.split("with coreutils::\n\n", 1)[1].split("\n\n", 1)[0]
    return "\n".join(line.removeprefix("        ") for line in block.splitlines())


def test_documented_shell_recipe_gives_the_same_digest(tmp_path: Path) -> None:
    write(tmp_path / "train.py", b"print('hi')\n")
    write(tmp_path / "data" / "a b.csv", b"1,2\n")
    write(tmp_path / "data.txt", b"x")
    write(tmp_path / "Z", b"")
    write(tmp_path / "\u00e9t\u00e9" / "f", b"unicode path")
    write(tmp_path / ".git" / "HEAD", b"ignored")
    expected = tree_sha256(hash_tree(tmp_path, exclude={".git"}))
    completed = subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + _documented_shell_recipe()],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert completed.stdout.split()[0] == expected
