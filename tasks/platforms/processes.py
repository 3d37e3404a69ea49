"""The processes a provider starts on this host (swtpm, the agent, qemu), watched and stopped
by pid from any later call or process.

A provider records the pids of what it started in its ``Machine``; a teardown may run in
another orchestrator process much later, when the pid may belong to someone else. Every
helper here therefore takes a *marker*, a string the process's command line must contain, and
never signals a process whose command line lacks it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Sequence
from pathlib import Path

LOG_TAIL_BYTES = 3000
"""How much of a log's end an error message quotes."""


def process_alive(pid: int, marker: str) -> bool:
    """True when ``pid`` runs (not a zombie) and its command line contains ``marker``.

    Args:
        pid: the process id.
        marker: a string the process's command line must contain (no pid reuse).
    """
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return marker in cmdline and state != "Z"


def reap(pid: int) -> None:
    """Collect ``pid``'s exit status if it is our exited child (no zombie left)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def terminate_all(processes: Sequence[tuple[int, str]], grace_s: float = 5.0) -> None:
    """SIGTERM each ``(pid, marker)`` process still running at once, wait up to ``grace_s``
    for all of them, SIGKILL what is left.

    Args:
        processes: the pids with the marker each one's command line must contain.
        grace_s: how long the processes may take to exit after SIGTERM.
    """
    alive = [(pid, marker) for pid, marker in processes if process_alive(pid, marker)]
    for pid, _ in processes:
        reap(pid)
    for pid, _ in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while alive and time.monotonic() < deadline:
        for pid, _ in alive:
            reap(pid)
        alive = [(pid, marker) for pid, marker in alive if process_alive(pid, marker)]
        if alive:
            time.sleep(0.02)
    for pid, _ in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def terminate(pid: int, marker: str, grace_s: float = 5.0) -> None:
    """:func:`terminate_all` of one process."""
    terminate_all([(pid, marker)], grace_s)


def log_tail(path: Path, max_bytes: int = LOG_TAIL_BYTES) -> str:
    """The last ``max_bytes`` of a log, decoded, or "(no log)"."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - max_bytes))
            return handle.read().decode(errors="replace").strip()
    except OSError:
        return "(no log)"


def read_pid(path: Path) -> int | None:
    """The pid in a pid file, or None when there is none."""
    try:
        text = path.read_text()[:32].strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def free_port() -> int:
    """A loopback TCP port free now (another process may take it before it is bound)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
