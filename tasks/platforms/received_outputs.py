"""Receiving a run's outputs archive from a machine that keeps them (qemu, Azure, gcp).

The agent sends ``outputs/`` and ``logs/`` as a tar stream (``guest_runtime.archive``).
Each regular file is written to disk and hashed with SHA-256 in the same pass
(``guest_runtime.copyhash.copy_and_hash``: a few buffers, the hash in a second thread), so a
weights file of several GB costs a few MiB of memory and one read. The
files under ``outputs/`` are then held to what the agent measured into PCR 15 before it
quoted (the certificate's outputs): same size, same digest, none missing, none added. A
file that changed on the way (a tampering proxy, a broken disk, an agent that sends other
bytes than it measured) is refused by name and deleted; the logs are not certified and are
taken as they come.
"""

from __future__ import annotations

import logging
import tarfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from aicert.appevents import OutputFileEvent, ResultsFileEvent
from aicert.guest_runtime.copyhash import copy_and_hash
from aicert.guest_runtime.hostutil import ProgressCallback
from aicert.model import AppEvent

log = logging.getLogger(__name__)

RECEIVE_CHUNK = 1024 * 1024
PROGRESS_EVERY_S = 5.0
OUTPUTS_PREFIX = "outputs/"
_OUTPUT_TYPES: dict[str, type[OutputFileEvent]] = {
    OutputFileEvent.TYPE: OutputFileEvent,
    ResultsFileEvent.TYPE: ResultsFileEvent,
}


@dataclass(frozen=True)
class CertifiedFile:
    """An output file as the agent measured it."""

    sha256: str
    size: int


def certified_outputs(events: Sequence[AppEvent]) -> dict[str, CertifiedFile]:
    """The output files measured by the outputs step's ``events``, by path under
    ``outputs/`` (the other events are ignored)."""
    certified: dict[str, CertifiedFile] = {}
    for event in events:
        model = _OUTPUT_TYPES.get(event.type)
        if model is not None:
            measured = model.model_validate(event.data)
            certified[measured.path] = CertifiedFile(measured.sha256, measured.size)
    return certified


class OutputMismatchError(RuntimeError):
    """An output file that arrived is not the one certified (or was not certified, or did
    not arrive); ``path`` names it, under ``outputs/``."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        super().__init__(f"outputs/{path}: {problem}")


class UnsafeOutputMember(tarfile.TarError):
    """A member of the outputs archive that is not a plain file or folder inside it."""


def _target(destination: Path, name: str) -> Path:
    """Where member ``name`` lands: under ``destination``, never through a link."""
    parts = PurePosixPath(name).parts
    if not parts or name.startswith("/") or any(part in ("..", "") for part in parts):
        raise UnsafeOutputMember(f"{name!r} leaves the destination")
    target = destination.joinpath(*parts)
    for parent in (target, *target.parents):
        if parent == destination:
            break
        if parent.is_symlink():
            raise UnsafeOutputMember(f"{name!r} goes through a link")
    return target


@dataclass
class OutputsReceiver:
    """Writes and checks the members of one outputs archive, in the order they come."""

    destination: Path
    certified: Mapping[str, CertifiedFile] | None
    progress: ProgressCallback | None
    names: list[str] = field(default_factory=list)
    received_bytes: int = 0
    _last_report: float = field(default_factory=time.monotonic)
    _started: float = field(default_factory=time.monotonic)

    @property
    def _expected_bytes(self) -> int | None:
        if self.certified is None:
            return None
        return sum(file.size for file in self.certified.values())

    def receive(self, archive: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        """Write ``member`` (a folder or a regular file) under the destination; a certified
        output is checked as it is written.

        Raises:
            UnsafeOutputMember: not a folder or regular file, or outside the destination.
            OutputMismatchError: an output that is not what was certified.
        """
        target = _target(self.destination, member.name)
        if member.isdir():
            target.mkdir(parents=True, exist_ok=True)
            return
        if not member.isfile():
            raise UnsafeOutputMember(f"{member.name!r} is not a file or folder")
        expected = self._expected(member)
        target.parent.mkdir(parents=True, exist_ok=True)
        reader = archive.extractfile(member)
        assert reader is not None  # a regular file has data
        # Written and hashed in one pass, the hash in a second thread (copyhash).
        with target.open("wb", buffering=0) as output:
            sha256, _ = copy_and_hash(reader, output, on_bytes=self._advance)
        target.chmod(member.mode & 0o755 | 0o600)
        if expected is not None and sha256 != expected.sha256:
            target.unlink()
            raise OutputMismatchError(
                member.name.removeprefix(OUTPUTS_PREFIX),
                f"arrived with SHA-256 {sha256}, the certified digest is "
                f"{expected.sha256} (the file was changed after it was measured or on the "
                "way; deleted)",
            )
        self.names.append(member.name)

    def _expected(self, member: tarfile.TarInfo) -> CertifiedFile | None:
        if self.certified is None or not member.name.startswith(OUTPUTS_PREFIX):
            return None
        path = member.name.removeprefix(OUTPUTS_PREFIX)
        expected = self.certified.get(path)
        if expected is None:
            raise OutputMismatchError(path, "arrived but is not among the certified outputs")
        if member.size != expected.size:
            raise OutputMismatchError(
                path, f"arrives with {member.size} bytes, the certified size is {expected.size}"
            )
        return expected

    def _advance(self, count: int) -> None:
        self.received_bytes += count
        now = time.monotonic()
        if self.progress is None or now - self._last_report < PROGRESS_EVERY_S:
            return
        self._last_report = now
        total = self._expected_bytes
        of_total = f" of {total / 1e6:.0f}" if total else ""
        rate = self.received_bytes / max(now - self._started, 1e-6) / 1e6
        self.progress(
            f"downloading outputs: {self.received_bytes / 1e6:.0f}{of_total} MB "
            f"({rate:.0f} MB/s, hashed on arrival)"
        )

    def finish(self) -> None:
        """Check every certified output arrived; report the total.

        Raises:
            OutputMismatchError: a certified output did not arrive.
        """
        if self.certified is not None:
            arrived = {
                name.removeprefix(OUTPUTS_PREFIX)
                for name in self.names
                if name.startswith(OUTPUTS_PREFIX)
            }
            for path in sorted(set(self.certified) - arrived):
                raise OutputMismatchError(path, "was certified but did not arrive")
        if self.progress is not None:
            seconds = time.monotonic() - self._started
            checked = ", each checked against its certified digest" if self.certified else ""
            self.progress(
                f"downloaded {len(self.names)} files ({self.received_bytes / 1e6:.1f} MB) in "
                f"{seconds:.1f} s{checked}"
            )
