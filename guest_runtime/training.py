"""The training step: the job runs in its sandbox in a thread, its logs kept for long polling.

The run moves to "training" when the thread starts and to "trained" when the job ended, however
it ended; what went wrong is kept in ``RunState.training_error`` (reported through
``training_status``, never lost), and the outputs and logs stay for the builder either way.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime

from aicert.guest_runtime.errors import StepOrderError
from aicert.guest_runtime.run_state import RunState

log = logging.getLogger(__name__)


def start_training(run: RunState, lock: threading.RLock) -> None:
    """Move ``run`` to "training" and run its job in a daemon thread; ``lock`` is the agent's,
    taken when the job ends to move the run to "trained"."""
    run.step = "training"
    thread = threading.Thread(
        target=_train, args=(run, lock), name=f"training-{run.run_id}", daemon=True
    )
    run.training_thread = thread
    thread.start()


def stop_training(run: RunState | None) -> None:
    """Kill the run's training container, if one runs (the agent is shutting down)."""
    if run is None or run.step != "training":
        return
    import docker

    from aicert.guest_runtime.container import RUN_LABEL

    try:
        client = docker.from_env(timeout=30)
        try:
            for container in client.containers.list(filters={"label": f"{RUN_LABEL}={run.run_id}"}):
                container.kill()
                log.warning("killed training container %s of run %s", container.name, run.run_id)
        finally:
            client.close()
    except docker.errors.DockerException as exc:
        log.error("could not stop the training container of run %s: %s", run.run_id, exc)


def _append_log(run: RunState, line: str) -> None:
    with run.log_condition:
        run.log_lines.append(line)
        run.log_condition.notify_all()


def _train(run: RunState, lock: threading.RLock) -> None:
    from aicert.guest_runtime.container import (
        SandboxSpec,
        describe_ending,
        run_training_container,
    )
    from aicert.guest_runtime.writeback import write_behind

    try:
        assert run.source_dir is not None and run.training_image_id is not None
        spec = SandboxSpec.for_run(
            run.config,
            image=run.training_image_id,
            run_id=run.run_id,
            source_dir=run.source_dir,
            workspace=run.workspace,
            log_path=run.log_path,
        )
        # The job's outputs reach the disk while it runs, not in the engine's sync at its exit.
        with write_behind(run.workspace):
            result = run_training_container(spec, lambda line: _append_log(run, line))
        run.exit_code = result.exit_code
        run.duration_ms = result.duration_ms
        run.timed_out = result.timed_out
        run.finished_at = datetime.now(UTC)
        run.training_error = describe_ending(
            result, memory_limit=spec.memory_limit, timeout_s=spec.timeout_s
        )
    except Exception as exc:  # reported through training_status, never lost
        log.exception("training container failed")
        run.training_error = f"the training container could not run: {exc}"
        run.finished_at = datetime.now(UTC)
    finally:
        with lock:
            run.step = "trained"
        with run.log_condition:
            run.log_condition.notify_all()


def training_status(run: RunState) -> dict[str, object]:
    """The fields of ``api_models.TrainingStatus`` for a run whose training started."""
    if run.step == "training":
        state = "running"
    else:
        state = "failed" if run.training_error is not None else "succeeded"
    return {
        "state": state,
        "exit_code": run.exit_code,
        "duration_ms": run.duration_ms,
        "timed_out": run.timed_out,
        "error": run.training_error,
        "log_lines": len(run.log_lines),
    }


def read_logs(run: RunState, offset: int, wait_s: float) -> tuple[list[str], int, bool]:
    """Lines from ``offset``; waits up to ``wait_s`` for new ones (long polling).

    Returns:
        (the lines, the next offset, whether the job ended and every line was read).
    """
    deadline = time.monotonic() + max(0.0, wait_s)
    with run.log_condition:
        while len(run.log_lines) <= offset and run.step == "training":
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            run.log_condition.wait(remaining)
        lines = run.log_lines[offset:]
        finished = run.step != "training"
    next_offset = offset + len(lines)
    return lines, next_offset, finished and next_offset >= len(run.log_lines)


def outputs_archive(run: RunState) -> Iterator[bytes]:
    """The run's ``outputs/`` and ``logs/`` as a tar stream, once training is over (also after
    a failed training: its outputs and logs are kept for the builder)."""
    from aicert.guest_runtime.archive import stream_tar

    if run.step == "training":
        raise StepOrderError(f"run {run.run_id}: training is still running")
    return stream_tar({"outputs": run.outputs_dir, "logs": run.log_path.parent})
