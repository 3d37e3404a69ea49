"""Write a phase's new data to disk while the phase runs, not all at once after it.

The Docker engine syncs the whole filesystem that holds ``/var/lib/docker`` each time it
unmounts a container's overlay: once in ``docker create`` (the init layer) and once when the
job exits (moby/moby#47630; overlayfs's ``sync_fs`` reaches the upper filesystem). Whatever the
run wrote just before, the resources it copied in or the outputs the job wrote, is then
written to disk inside those calls, on the run's critical path: 2 GiB of inputs made
``docker create`` take 2.8 s here (a ~700 MB/s disk), 1 GiB of outputs kept the job's exit
1.4 s from being seen.

``write_behind(folder)`` asks the kernel to write the dirty data of ``folder``'s filesystem
(``syncfs``) again and again in a background thread for as long as the ``with`` lasts, so the
disk writes overlap the copying, hashing or training that produces the data and the engine's
sync finds little left. It never waits for the writes at its end: the engine's sync does
that. Only the disk's own bandwidth is used, and only for data that had to reach the disk
anyway; without ``syncfs`` (not Linux) it does nothing. No maintained library exposes
``syncfs`` (``os`` has ``sync`` and ``fsync`` only), hence ``ctypes``.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["DISABLE_VARIABLE", "PAUSE_S", "write_behind"]

_log = logging.getLogger(__name__)

# Between two syncs: long enough that an idle filesystem costs nothing, short enough that
# the disk rarely waits while data is dirty.
PAUSE_S = 0.1
# ``AICERT_WRITE_BEHIND=0`` in the agent's environment turns it off: where the workspace is
# on another file system than the engine's storage, the engine's sync never touches it.
DISABLE_VARIABLE = "AICERT_WRITE_BEHIND"


def _load_syncfs() -> Callable[[int], int] | None:
    """libc's ``syncfs(fd)``, or None where there is none."""
    try:
        function = ctypes.CDLL(None, use_errno=True).syncfs
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int
    return function


_SYNCFS = _load_syncfs()


class _Flusher(threading.Thread):
    """Calls ``syncfs`` on one open folder until told to stop, then closes it."""

    def __init__(self, fd: int, syncfs: Callable[[int], int]) -> None:
        super().__init__(name="write-behind", daemon=True)
        self.stopping = threading.Event()
        self.syncs = 0
        self._fd = fd
        self._syncfs = syncfs

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                if self._syncfs(self._fd) != 0:
                    errno = ctypes.get_errno()
                    _log.warning("write-behind stopped: syncfs failed (%s)", os.strerror(errno))
                    return
                self.syncs += 1
                self.stopping.wait(PAUSE_S)
        finally:
            os.close(self._fd)


@contextlib.contextmanager
def write_behind(folder: Path) -> Iterator[_Flusher | None]:
    """While the ``with`` runs, keep writing ``folder``'s filesystem's dirty data to disk.

    Args:
        folder: an existing folder on the filesystem the phase writes to.

    Yields:
        The background flusher (its ``syncs`` counts the passes), or None where ``syncfs``
        is missing, ``AICERT_WRITE_BEHIND`` is ``0`` or ``folder`` cannot be opened (nothing
        is done then).

    Example:
        >>> with write_behind(Path("/tmp")):
        ...     pass
    """
    if _SYNCFS is None or os.environ.get(DISABLE_VARIABLE, "1") == "0":
        yield None
        return
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        _log.warning("write-behind off: cannot open %s (%s)", folder, exc)
        yield None
        return
    flusher = _Flusher(fd, _SYNCFS)
    flusher.start()
    try:
        yield flusher
    finally:
        # Not joined: a sync in progress finishes on its own; the engine's next sync waits
        # for the rest anyway.
        flusher.stopping.set()
