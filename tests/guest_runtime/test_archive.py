"""The agent's tar handling: the streamed outputs archive and safe extraction, with and
without tarfile's extraction filters (the qemu guest's Python 3.11.2 has none)."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from aicert.guest_runtime.archive import UnsafeArchiveMember, extract_member, stream_tar


@pytest.fixture(params=["filters", "fallback"])
def extraction(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "fallback":
        monkeypatch.delattr(tarfile, "data_filter")
    return str(request.param)


def _archive(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for member, data in members:
            if data is not None:
                member.size = len(data)
            archive.addfile(member, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, **fields: object) -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type = kind
    for key, value in fields.items():
        setattr(member, key, value)
    return member


def _extract_all(data: bytes, destination: Path) -> None:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as archive:
        for member in archive:
            extract_member(archive, member, destination)


def test_files_folders_modes_and_inner_symlinks_are_kept(extraction: str, tmp_path: Path) -> None:
    data = _archive(
        (_member("src", tarfile.DIRTYPE, mode=0o755), None),
        (_member("src/run.sh", mode=0o4755), b"#!/bin/sh\n"),
        (_member("src/data.csv", mode=0o666), b"x,y\n"),
        (_member("src/link", tarfile.SYMTYPE, linkname="data.csv"), None),
    )
    _extract_all(data, tmp_path)
    run = (tmp_path / "src" / "run.sh").stat()
    assert run.st_mode & stat.S_IXUSR and not run.st_mode & stat.S_ISUID  # exec kept, set-id not
    assert not (tmp_path / "src" / "data.csv").stat().st_mode & stat.S_IWOTH
    assert os.readlink(tmp_path / "src" / "link") == "data.csv"


@pytest.mark.parametrize(
    "member",
    [
        _member("../escape.txt"),
        _member("src/out", tarfile.SYMTYPE, linkname="../../etc/passwd"),
        _member("src/abs", tarfile.SYMTYPE, linkname="/etc/passwd"),
        _member("src/fifo", tarfile.FIFOTYPE),
        _member("src/dev", tarfile.CHRTYPE, devmajor=1, devminor=3),
    ],
    ids=["dotdot", "symlink-out", "symlink-absolute", "fifo", "device"],
)
def test_unsafe_members_are_refused(
    extraction: str, tmp_path: Path, member: tarfile.TarInfo
) -> None:
    data = _archive((member, b"x" if member.isfile() else None))
    destination = tmp_path / "dest"
    destination.mkdir()
    with pytest.raises(tarfile.TarError) as caught:
        _extract_all(data, destination)
    if extraction == "fallback":
        assert isinstance(caught.value, UnsafeArchiveMember)
    assert not (tmp_path / "escape.txt").exists()
    assert list(destination.rglob("*")) == []


def test_absolute_names_stay_inside(extraction: str, tmp_path: Path) -> None:
    data = _archive((_member("/etc/escape.txt"), b"x"))
    destination = tmp_path / "dest"
    destination.mkdir()
    if extraction == "filters":  # tarfile's data filter strips the leading slash
        _extract_all(data, destination)
        assert (destination / "etc" / "escape.txt").read_bytes() == b"x"
    else:  # the fallback refuses it
        with pytest.raises(UnsafeArchiveMember, match="leaves the destination"):
            _extract_all(data, destination)


def test_streamed_tar_round_trips(extraction: str, tmp_path: Path) -> None:
    outputs = tmp_path / "run" / "outputs"
    (outputs / "nested").mkdir(parents=True)
    (outputs / "model.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))  # > one chunk
    (outputs / "nested" / "empty.txt").write_bytes(b"")
    (outputs / "skipped").symlink_to("model.bin")  # not a regular file: not sent
    logs = tmp_path / "run" / "logs"
    logs.mkdir()
    (logs / "training.log").write_text("epoch 1\n")

    data = b"".join(stream_tar({"outputs": outputs, "logs": logs, "absent": tmp_path / "none"}))
    assert len(data) % tarfile.BLOCKSIZE == 0
    destination = tmp_path / "downloaded"
    _extract_all(data, destination)
    assert (destination / "outputs" / "model.bin").read_bytes() == (
        outputs / "model.bin"
    ).read_bytes()
    assert (destination / "outputs" / "nested" / "empty.txt").read_bytes() == b""
    assert (destination / "logs" / "training.log").read_text() == "epoch 1\n"
    assert not (destination / "outputs" / "skipped").exists()
    assert not (destination / "absent").exists()
