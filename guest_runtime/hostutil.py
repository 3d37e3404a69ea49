"""Small host helpers shared by the guest runtime and the host side (locks, subprocesses, the
``with`` protocol of things that start and stop)."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import subprocess
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

_log = logging.getLogger(__name__)

ProgressCallback = Callable[[str], None]
"""Where long work reports progress: one line of text per call (hashing, downloads,
builds, training logs)."""


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created if missing), across processes."""
    with path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def run_streaming(
    argv: list[str],
    progress: ProgressCallback | None,
    *,
    env: Mapping[str, str] | None = None,
    error: type[Exception] = RuntimeError,
    tail_lines: int = 20,
    what: str | None = None,
) -> None:
    """Run ``argv``, passing each output line to ``progress``; on a non-zero exit raise
    ``error`` with the last ``tail_lines`` lines of output."""
    tail: list[str] = []
    with subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        env={**os.environ, **(env or {})},
    ) as proc:
        assert proc.stdout is not None
        for raw_line in proc.stdout:
            line = raw_line.rstrip("\n")
            tail = [*tail[-(tail_lines - 1) :], line]
            if progress is not None:
                progress(line)
        returncode = proc.wait()
    if returncode != 0:
        name = what or Path(argv[0]).name
        raise error(f"{name} exited with {returncode}; last output:\n" + "\n".join(tail))


def stop_child(process: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
    """Stop and reap a child this process started: SIGTERM, then SIGKILL after ``grace_s``.

    Through the ``Popen``: a child not yet reaped cannot be confused with another process, so
    no pid or command-line check is needed. Does nothing for a child that already ended.
    """
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=grace_s)


class StartStop:
    """Mixin: ``with obj:`` calls ``obj.start()`` and, on leaving, always ``obj.stop()``.

    When the block raised, a ``stop`` that fails too is logged, not raised: it must not hide
    the error that is already propagating. ``start`` does nothing by default (an object that
    its constructor opened).
    """

    def start(self) -> object:
        """Start what the object manages (a subclass may return what it started, e.g. a URL);
        nothing by default."""
        return None

    def stop(self) -> None:
        """Stop what the object manages (idempotent in every subclass)."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is None:
            self.stop()
            return
        try:
            self.stop()
        except Exception as stop_error:
            _log.warning(
                "stopping %s after an error also failed: %s", type(self).__name__, stop_error
            )
