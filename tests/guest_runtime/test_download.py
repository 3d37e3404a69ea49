"""Downloads: hashed while streamed, never left partial, not retried when retrying cannot help."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from aicert.guest_runtime.download import download
from aicert.guest_runtime.errors import DownloadError


def test_a_file_url_is_copied_and_hashed(tmp_path: Path) -> None:
    source = tmp_path / "data.bin"
    source.write_bytes(b"x" * 1000)
    target = tmp_path / "out" / "data.bin"
    target.parent.mkdir()
    chunks: list[int] = []
    digest, size = download(source.as_uri(), target, on_bytes=chunks.append)
    assert (digest, size) == (hashlib.sha256(b"x" * 1000).hexdigest(), 1000)
    assert target.read_bytes() == b"x" * 1000 and sum(chunks) == 1000
    assert not target.with_name("data.bin.part").exists()


def test_a_missing_file_fails_at_once_and_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "data.bin"
    messages: list[str] = []
    with pytest.raises(DownloadError, match="cannot download"):
        download((tmp_path / "missing").as_uri(), target, progress=messages.append)
    assert messages == []  # a file:// failure is not retried
    assert list(tmp_path.iterdir()) == []
