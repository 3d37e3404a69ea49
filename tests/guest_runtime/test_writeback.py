"""write_behind: the background syncfs of a phase's filesystem (guest_runtime/writeback.py)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from aicert.guest_runtime import writeback
from aicert.guest_runtime.writeback import write_behind


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _wait_for(test: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if test():
            return True
        time.sleep(0.01)
    return False


def test_syncs_the_folders_filesystem_while_the_with_runs(tmp_path: Path) -> None:
    assert writeback._SYNCFS is not None, "this Linux libc has syncfs"
    with write_behind(tmp_path) as flusher:
        assert flusher is not None
        (tmp_path / "data.bin").write_bytes(os.urandom(4 * 1024 * 1024))
        assert _wait_for(lambda: flusher.syncs >= 2)
    flusher.join(timeout=10)
    assert not flusher.is_alive()
    stopped_at = flusher.syncs
    time.sleep(3 * writeback.PAUSE_S)
    assert flusher.syncs == stopped_at, "no sync once the with has ended"


def test_the_folder_descriptor_is_closed_once_stopped(tmp_path: Path) -> None:
    before = _open_fds()
    with write_behind(tmp_path) as flusher:
        assert flusher is not None
        assert len(_open_fds() - before) == 1
    flusher.join(timeout=10)
    assert _open_fds() == before


def test_a_failing_syncfs_stops_the_thread_and_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []

    def failing(fd: int) -> int:
        calls.append(fd)
        return -1

    monkeypatch.setattr(writeback, "_SYNCFS", failing)
    before = _open_fds()
    with caplog.at_level("WARNING", logger=writeback.__name__), write_behind(tmp_path) as flusher:
        assert flusher is not None
        flusher.join(timeout=10)
        assert not flusher.is_alive()
    assert len(calls) == 1 and flusher.syncs == 0
    assert "syncfs failed" in caplog.text
    assert _open_fds() == before


def test_nothing_is_done_without_syncfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writeback, "_SYNCFS", None)
    threads = threading.active_count()
    with write_behind(tmp_path) as flusher:
        assert flusher is None
        assert threading.active_count() == threads


def test_a_missing_folder_turns_it_off_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level("WARNING", logger=writeback.__name__),
        write_behind(tmp_path / "missing") as flusher,
    ):
        assert flusher is None
    assert "missing" in caplog.text


def test_an_error_in_the_phase_still_stops_the_thread(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="phase failed"), write_behind(tmp_path) as flusher:
        assert flusher is not None
        raise RuntimeError("phase failed")
    flusher.join(timeout=10)
    assert not flusher.is_alive()


def test_aicert_write_behind_0_turns_it_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(writeback.DISABLE_VARIABLE, "0")
    threads = threading.active_count()
    with write_behind(tmp_path) as flusher:
        assert flusher is None
        assert threading.active_count() == threads
    monkeypatch.setenv(writeback.DISABLE_VARIABLE, "1")
    with write_behind(tmp_path) as flusher:
        assert flusher is not None
