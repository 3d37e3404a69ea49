"""The run's outputs into PCR 15: every output file, then the result of the training job.

The whole outputs folder is walked and checked (no symlink out of it, no special file, not
too many files, at least ``outputs.minFiles``) before the first extend: a run that fails the
checks leaves PCR 15 untouched and gets no certificate.
"""

from __future__ import annotations

import hashlib

from aicert.appevents import OutputFileEvent, ResultEvent, ResultsFileEvent
from aicert.guest_runtime.errors import (
    MissingOutputsError,
    ResultsFileError,
    TooManyOutputsError,
    TrainingFailedError,
    UnsafeOutputError,
)
from aicert.guest_runtime.run_state import Measurer, RunState
from aicert.hashing import FileDigest, UnsafePathError
from aicert.metrics import MAX_RESULTS_BYTES, parse_metrics
from aicert.model import MAX_OUTPUT_FILES


def refuse_failed_training(run: RunState) -> None:
    """TrainingFailedError when the job did not succeed: its outputs are not certified."""
    if run.training_error is not None:
        raise TrainingFailedError(
            f"run {run.run_id}: {run.training_error}; outputs and logs are kept in "
            f"{run.workspace}, no certificate is produced"
        )


def _checked_outputs(measurer: Measurer, run: RunState) -> list[FileDigest]:
    """The digests of every output file, once the folder passed every check."""
    kept = f"outputs and logs are kept in {run.workspace}"
    try:
        digests = measurer.hash_tree(run.outputs_dir, "hashing outputs")
    except UnsafePathError as exc:
        raise UnsafeOutputError(f"outputs: {exc}; no certificate is produced, {kept}") from exc
    outputs_path = run.config.outputs_path
    if len(digests) > MAX_OUTPUT_FILES:
        raise TooManyOutputsError(
            f"outputs: the run left {len(digests)} files in {outputs_path}, a certificate "
            f"lists at most {MAX_OUTPUT_FILES} (pack many small files into shards or an "
            f"archive); no certificate is produced, {kept}"
        )
    required = run.config.min_output_files
    if len(digests) < required:
        raise MissingOutputsError(
            f"outputs: the run left {len(digests)} file(s) in {outputs_path}, "
            f"outputs.minFiles requires at least {required}; no certificate is produced, {kept}"
        )
    return digests


def _results_event(run: RunState, digests: list[FileDigest]) -> ResultsFileEvent | None:
    """The ``results`` file's event (its metrics parsed strictly), checked before PCR 15 is
    touched; None when the config declares no results file."""
    name = run.config.results
    if name is None:
        return None
    kept = f"no certificate is produced, outputs and logs are kept in {run.workspace}"
    digest = next((d for d in digests if d.path == name), None)
    if digest is None:
        raise ResultsFileError(f"results: the run left no {name} in its outputs; {kept}")
    path = run.outputs_dir / name
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_RESULTS_BYTES + 1)
        metrics = parse_metrics(data)
    except (OSError, ValueError) as exc:
        raise ResultsFileError(f"results: {name}: {exc}; {kept}") from exc
    # The parsed bytes must be the hashed ones (the job has ended; nothing writes there).
    if hashlib.sha256(data).hexdigest() != digest.sha256:
        raise ResultsFileError(f"results: {name} changed while it was measured; {kept}")
    return ResultsFileEvent(
        path=digest.path, size=digest.size, sha256=digest.sha256, metrics=metrics
    )


def measure_outputs(measurer: Measurer, run: RunState) -> None:
    """Each output file, then the job's result, into PCR 15."""
    measurer.progress(f"hashing outputs in {run.outputs_dir}")
    digests = _checked_outputs(measurer, run)
    results = _results_event(run, digests)
    for digest in digests:
        if results is not None and digest.path == results.path:
            measurer.measure(run, results)
        else:
            measurer.measure(
                run, OutputFileEvent(path=digest.path, size=digest.size, sha256=digest.sha256)
            )
    assert run.finished_at is not None and run.exit_code is not None
    measurer.measure(
        run,
        ResultEvent(
            exit_code=run.exit_code,
            duration_ms=run.duration_ms or 0,
            finished_at=run.finished_at.isoformat(),
        ),
    )
