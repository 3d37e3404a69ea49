"""A run's lifecycle rules: steps only in order, none after a failed measuring step."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from aicert.guest_runtime.config import parse_config
from aicert.guest_runtime.errors import StepOrderError
from aicert.guest_runtime.run_state import RunState, measuring_step, require, tree_size

CONFIG = {"source": {"gitRepo": "https://example.org/repo.git"}}


def new_run(tmp_path: Path) -> RunState:
    return RunState("run-1", b"n" * 32, parse_config(CONFIG), tmp_path, datetime.now(UTC))


def test_a_step_is_allowed_only_at_its_place(tmp_path: Path) -> None:
    run = new_run(tmp_path)
    assert require(run, "run-1", "started") is run
    with pytest.raises(StepOrderError, match="the run is at 'started', expected one of trained"):
        require(run, "run-1", "trained")
    with pytest.raises(StepOrderError, match="no run 'other'"):
        require(run, "other", "started")
    with pytest.raises(StepOrderError, match="no run"):
        require(None, "run-1", "started")


def test_a_failed_measuring_step_ends_the_run_but_not_its_observation(tmp_path: Path) -> None:
    run = new_run(tmp_path)
    with pytest.raises(OSError), measuring_step(run):
        raise OSError("disk gone")
    assert run.failure == "OSError: disk gone" and run.finished
    with pytest.raises(StepOrderError, match="failed and cannot go on"):
        require(run, "run-1", "started")
    assert require(run, "run-1", "started", observing=True) is run


def test_tree_size_counts_regular_files_only(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"12345")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"123")
    (tmp_path / "link").symlink_to(tmp_path / "a")
    assert tree_size(tmp_path) == 8
