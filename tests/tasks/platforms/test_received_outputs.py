"""The outputs receiver's rules that need no agent: which events are certified outputs, and
which archive members are refused before anything is written (the streamed download itself
is tested against a real agent in ``tests/guest_runtime/agent/test_large_outputs.py``)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from aicert.appevents import OutputFileEvent, ResultEvent, ResultsFileEvent
from aicert.tasks.platforms.received_outputs import (
    CertifiedFile,
    OutputMismatchError,
    OutputsReceiver,
    UnsafeOutputMember,
    certified_outputs,
)

DIGEST = "ab" * 32


def test_certified_outputs_are_the_output_and_results_files() -> None:
    events = [
        OutputFileEvent(path="model.bin", size=3, sha256=DIGEST).to_event(),
        ResultsFileEvent(
            path="metrics.json", size=10, sha256="cd" * 32, metrics={"accuracy": 0.9}
        ).to_event(),
        ResultEvent(exit_code=0, duration_ms=5, finished_at="2026-01-01T00:00:00Z").to_event(),
    ]
    assert certified_outputs(events) == {
        "model.bin": CertifiedFile(DIGEST, 3),
        "metrics.json": CertifiedFile("cd" * 32, 10),
    }


def _archive(*members: tuple[tarfile.TarInfo, bytes]) -> tarfile.TarFile:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for member, data in members:
            archive.addfile(member, io.BytesIO(data) if member.isfile() else None)
    buffer.seek(0)
    return tarfile.open(fileobj=buffer, mode="r|")


def _receive_all(receiver: OutputsReceiver, archive: tarfile.TarFile) -> None:
    for member in archive:
        receiver.receive(archive, member)


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    member = tarfile.TarInfo(name)
    member.size = len(data)
    return member, data


@pytest.mark.parametrize("name", ["../escape.bin", "/etc/evil", "outputs/../../x"])
def test_a_member_outside_the_destination_is_refused(tmp_path: Path, name: str) -> None:
    receiver = OutputsReceiver(tmp_path / "in", None, None)
    (tmp_path / "in").mkdir()
    with pytest.raises(UnsafeOutputMember, match="leaves the destination"):
        _receive_all(receiver, _archive(_file(name, b"x")))
    assert not (tmp_path / "escape.bin").exists()


def test_a_link_member_is_refused(tmp_path: Path) -> None:
    link = tarfile.TarInfo("outputs/passwd")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    receiver = OutputsReceiver(tmp_path, None, None)
    with pytest.raises(UnsafeOutputMember, match="is not a file or folder"):
        _receive_all(receiver, _archive((link, b"")))


def test_a_file_through_a_link_already_there_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "outputs").symlink_to(tmp_path / "elsewhere")
    receiver = OutputsReceiver(tmp_path / "in", None, None)
    with pytest.raises(UnsafeOutputMember, match="goes through a link"):
        _receive_all(receiver, _archive(_file("outputs/model.bin", b"x")))
    assert not any((tmp_path / "elsewhere").iterdir())


def test_the_digest_is_checked_on_arrival(tmp_path: Path) -> None:
    receiver = OutputsReceiver(tmp_path, {"model.bin": CertifiedFile(DIGEST, 3)}, None)
    with pytest.raises(OutputMismatchError, match=r"^outputs/model\.bin: arrived with SHA-256"):
        _receive_all(receiver, _archive(_file("outputs/model.bin", b"abc")))
    assert not (tmp_path / "outputs" / "model.bin").exists()


def test_logs_are_not_held_to_the_certified_outputs(tmp_path: Path) -> None:
    receiver = OutputsReceiver(tmp_path, {}, None)
    _receive_all(receiver, _archive(_file("logs/training.log", b"epoch 1\n")))
    receiver.finish()
    assert receiver.names == ["logs/training.log"]
