"""The agent's results file: parsed strictly before PCR 15 is touched, measured as an
``aicert.output.results-file`` event with its metrics, refused (no certificate) otherwise."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from aicert.appevents import ResultsFileEvent
from aicert.guest_runtime.config import parse_config
from aicert.guest_runtime.errors import ResultsFileError
from aicert.guest_runtime.output_measurement import _results_event
from aicert.guest_runtime.run_state import RunState
from aicert.hashing import FileDigest, hash_tree

CONFIG = {
    "source": {"type": "git", "gitRepo": "https://example.invalid/eval.git", "tag": "v1"},
    "results": "metrics.json",
}


def run_with(
    tmp_path: Path, files: dict[str, bytes], results: str | None = "metrics.json"
) -> tuple[RunState, list[FileDigest]]:
    config = parse_config({**CONFIG, "results": results})
    run = RunState(
        run_id="eval-1",
        nonce=b"n" * 16,
        config=config,
        workspace=tmp_path,
        started_at=datetime.now(UTC),
    )
    run.outputs_dir.mkdir()
    for name, content in files.items():
        (run.outputs_dir / name).write_bytes(content)
    return run, hash_tree(run.outputs_dir)


def test_results_file_measured_with_its_metrics(tmp_path: Path) -> None:
    run, digests = run_with(tmp_path, {"metrics.json": b'{"accuracy": 0.93}', "m.bin": b"x"})
    event = _results_event(run, digests)
    assert isinstance(event, ResultsFileEvent)
    assert event.metrics == {"accuracy": 0.93} and event.path == "metrics.json"
    assert event.to_event().type == "aicert.output.results-file"


def test_no_results_declared_measures_none(tmp_path: Path) -> None:
    run, digests = run_with(tmp_path, {"metrics.json": b"not json"}, results=None)
    assert _results_event(run, digests) is None
    assert "results" not in run.config.measured_form()


def test_missing_results_file_refused(tmp_path: Path) -> None:
    run, digests = run_with(tmp_path, {"m.bin": b"x"})
    with pytest.raises(ResultsFileError, match=r"left no metrics\.json"):
        _results_event(run, digests)


def test_malformed_results_file_refused(tmp_path: Path) -> None:
    run, digests = run_with(tmp_path, {"metrics.json": b'{"accuracy": "high"}'})
    with pytest.raises(ResultsFileError, match="not a number"):
        _results_event(run, digests)


def test_results_path_must_be_relative() -> None:
    with pytest.raises(ValueError, match="results"):
        parse_config({**CONFIG, "results": "../metrics.json"})
