"""One run's state on the agent and the rules of its lifecycle.

A run moves through ``STEP_ORDER`` one step at a time. ``require`` refuses a step asked for
out of order, and ``measuring_step`` marks a run failed for good when a step that extends
PCR 14/15 fails part-way (a retry would measure twice). ``Measurer`` is what every measuring
step uses: the PCR extend with the certificate's event limit, and hashing with progress.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from aicert.appevents import EventData, event_digest
from aicert.guest_runtime.config import RunConfig
from aicert.guest_runtime.errors import EventLimitError, StepOrderError
from aicert.guest_runtime.hostutil import ProgressCallback
from aicert.guest_runtime.staged_inputs import UnpackedInputs
from aicert.hashing import FileDigest, hash_tree
from aicert.model import MAX_EVENTS, AppEvent, SignedStatement

if TYPE_CHECKING:  # the agent's modules import without libtss2 (the orchestrator's checks)
    from aicert.guest_runtime.tpm import Tpm

log = logging.getLogger(__name__)

Step = Literal["started", "inputs", "built", "training", "trained", "measured", "quoted"]
STEP_ORDER: tuple[Step, ...] = (
    "started",
    "inputs",
    "built",
    "training",
    "trained",
    "measured",
    "quoted",
)
TRAINING_STARTED: tuple[Step, ...] = STEP_ORDER[STEP_ORDER.index("training") :]


@dataclass
class WorkProgress:
    """What the agent is doing right now, for progress displays (hashing, downloads)."""

    phase: str = "idle"
    done_bytes: int = 0
    total_bytes: int | None = None
    message: str = ""

    def begin(self, phase: str, total_bytes: int | None) -> None:
        """Start a long operation of ``total_bytes`` (None: unknown yet)."""
        self.phase, self.done_bytes, self.total_bytes = phase, 0, total_bytes

    def advance(self, count: int) -> None:
        """Count ``count`` more bytes done."""
        self.done_bytes += count

    def set_total(self, total_bytes: int | None) -> None:
        """The total, once known (a download's Content-Length)."""
        self.total_bytes = total_bytes

    def end(self) -> None:
        """Back to idle between long operations."""
        self.phase, self.total_bytes = "idle", None

    def snapshot(self) -> dict[str, object]:
        """The fields of ``api_models.ProgressReport``."""
        return {
            "phase": self.phase,
            "done_bytes": self.done_bytes,
            "total_bytes": self.total_bytes,
            "message": self.message,
        }


def tree_size(root: Path) -> int:
    """Bytes in the regular files under ``root`` (symlinks not followed): a progress total."""
    total = 0
    for folder, _dirs, files in os.walk(root):
        for name in files:
            try:
                info = os.lstat(os.path.join(folder, name))
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode):
                total += info.st_size
    return total


def training_image_tag(run_id: str) -> str:
    """The tag of a run's training image; teardown removes it once the run is over."""
    return f"aicert/training:{run_id.lower()}"


@dataclass
class RunState:
    """Everything the agent knows about its one run, from start to quote."""

    run_id: str
    nonce: bytes
    config: RunConfig
    workspace: Path
    started_at: datetime
    step: Step = "started"
    events: list[AppEvent] = field(default_factory=list)
    base_image_id: str | None = None
    training_image_id: str | None = None
    source_dir: Path | None = None
    exit_code: int | None = None
    duration_ms: int | None = None
    timed_out: bool = False
    training_error: str | None = None
    finished_at: datetime | None = None
    log_lines: list[str] = field(default_factory=list)
    log_condition: threading.Condition = field(default_factory=threading.Condition)
    training_thread: threading.Thread | None = None
    staged: UnpackedInputs | None = None
    # The statements the AK signed after the outputs were measured (returned with the quote).
    signed_statements: list[SignedStatement] = field(default_factory=list)
    # Set when a measuring step failed part-way: PCR 14/15 may hold some of its events, so
    # the run can never be certified and no later step may run (a retry would measure twice).
    failure: str | None = None

    @property
    def resources_dir(self) -> Path:
        """Where the resources are fetched (mounted read-only in the container)."""
        return self.workspace / "resources"

    @property
    def outputs_dir(self) -> Path:
        """The container's writable outputs folder, measured into PCR 15."""
        return self.workspace / "outputs"

    @property
    def log_path(self) -> Path:
        """The training job's output, line by line."""
        return self.workspace / "logs" / "training.log"

    @property
    def finished(self) -> bool:
        """True once nothing more can happen in this run (quoted, or failed)."""
        return self.step == "quoted" or self.training_error is not None or self.failure is not None


def require(run: RunState | None, run_id: str, *allowed: Step, observing: bool = False) -> RunState:
    """``run``, if it is ``run_id`` at one of the ``allowed`` steps; else StepOrderError.

    ``observing`` (status and logs) is allowed on a failed run too.
    """
    if run is None or run.run_id != run_id:
        raise StepOrderError(f"no run {run_id!r} on this agent")
    if run.failure is not None and not observing:
        raise StepOrderError(
            f"run {run_id} failed and cannot go on ({run.failure}); "
            "start a new run on a fresh machine"
        )
    if run.step not in allowed:
        raise StepOrderError(
            f"run {run_id}: step not allowed now (the run is at {run.step!r}, "
            f"expected one of {', '.join(allowed)})"
        )
    return run


@contextmanager
def measuring_step(run: RunState) -> Iterator[None]:
    """Any failure inside ends the run for good (see ``RunState.failure``)."""
    try:
        yield
    except BaseException as exc:
        run.failure = f"{type(exc).__name__}: {exc}"
        raise


@dataclass
class Measurer:
    """Extends the TPM's PCRs with a run's events and reports the progress of long work."""

    tpm: Tpm
    work: WorkProgress
    progress: ProgressCallback

    def measure(self, run: RunState, data: EventData) -> AppEvent:
        """Extend the event's PCR with ``data`` and append the event to the run's log."""
        if len(run.events) >= MAX_EVENTS:
            # A certificate the verifier would refuse is not worth a PCR extend.
            raise EventLimitError(
                f"more than {MAX_EVENTS} measured events (inputs and outputs): a certificate "
                "holds at most that many; no certificate is produced"
            )
        event = data.to_event()
        self.tpm.pcr_extend(event.pcr, event_digest(event))
        run.events.append(event)
        return event

    def hash_tree(self, root: Path, phase: str) -> list[FileDigest]:
        """``hash_tree(root)``, its progress shown as ``phase``."""
        self.work.begin(phase, tree_size(root))
        try:
            return hash_tree(root, progress=self.work.advance)
        finally:
            self.work.end()
