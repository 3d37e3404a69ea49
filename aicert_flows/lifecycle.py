"""What a certification run leaves on this host while it runs, and how to remove it when the
process that started the run is gone.

Each flow run keeps a record in ``$AICERT_HOME/active/<flow run id>.json`` (``ActiveRun``): the
run, its platform, its machine (agent and swtpm pids and ports, the VM's pid, the training
container's name) and the process that owns it (pid, start time, boot and host, so that a
reused pid is never taken for the owner). ``cleanup_abandoned_runs`` tears down the runs whose
owner is gone and removes their records; ``aicert cleanup`` and the start of every
``certify-training`` flow run call it. A run whose owner is alive is never touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Self

from pydantic import BaseModel, ConfigDict

from aicert.model import PlatformKind, write_atomic
from aicert.tasks.platforms.base import Machine
from aicert.tasks.platforms.settings import aicert_home

BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
# Executables a run starts on this host; a sweep by run folder kills nothing else (an
# editor or a ``tail -f`` on the run's log must survive a cleanup).
RUN_EXECUTABLES = ("swtpm", "qemu-system-")
AGENT_MARKER = "aicert.guest_runtime.server"
SWEEP_GRACE_S = 5.0
# A record file is a few kilobytes; anything much bigger is not one of ours.
MAX_RECORD_BYTES = 1 << 20

Log = Callable[[str], None]


def _boot_id() -> str:
    try:
        return BOOT_ID_PATH.read_text().strip()
    except OSError:
        return ""


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name (which may hold spaces and parentheses)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    _, _, rest = text.rpartition(")")
    fields = rest.split()
    return fields if len(fields) > 19 else None


def process_start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot, /proc/<pid>/stat field 22), or None when
    there is no such live process (a zombie counts as gone)."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] == "Z":
        return None
    return int(fields[19])


class ProcessIdentity(BaseModel):
    """A process, told apart from any later one that reuses its pid."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pid: int
    start_ticks: int
    boot_id: str
    host: str

    @classmethod
    def of(cls, pid: int) -> Self | None:
        """The identity of the live process ``pid`` on this host, or None."""
        ticks = process_start_ticks(pid)
        if ticks is None:
            return None
        return cls(pid=pid, start_ticks=ticks, boot_id=_boot_id(), host=socket.gethostname())

    @classmethod
    def current(cls) -> Self:
        """This process."""
        identity = cls.of(os.getpid())
        assert identity is not None  # this process is alive
        return identity

    def on_this_host(self) -> bool:
        """Whether the process ran on this host (by host name)."""
        return self.host == socket.gethostname()

    def alive(self) -> bool:
        """Whether this very process still runs (False once the host rebooted)."""
        return (
            self.on_this_host()
            and self.boot_id == _boot_id()
            and process_start_ticks(self.pid) == self.start_ticks
        )


class ActiveRun(BaseModel):
    """What it takes to clean up after a flow run that did not finish normally."""

    model_config = ConfigDict(extra="forbid")

    flow_run_id: str
    run_id: str
    project: str
    provider: PlatformKind | None = None
    # The run's folder on this host (local and qemu: <AICERT_HOME>/runs/<run id>): where
    # its outputs and logs are kept, and what its processes name on their command lines.
    state_dir: str | None = None
    machine: Machine | None = None
    torn_down: bool = False
    owner: ProcessIdentity | None = None
    created_at: datetime | None = None


def active_dir(home: Path | None = None) -> Path:
    """The folder of the run records: ``<home>/active`` (home: ``$AICERT_HOME``)."""
    return (home or aicert_home()) / "active"


def record_path(flow_run_id: str, home: Path | None = None) -> Path:
    """Where the record of the flow run ``flow_run_id`` is kept."""
    return active_dir(home) / f"{flow_run_id}.json"


def save_record(record: ActiveRun, home: Path | None = None) -> None:
    """Write the record atomically (a reader sees the old or the new one, never half)."""
    write_atomic(record_path(record.flow_run_id, home), record.model_dump_json().encode())


def load_record(flow_run_id: str, home: Path | None = None) -> ActiveRun | None:
    """The record of the flow run ``flow_run_id``, or None (see ``read_record``)."""
    return read_record(record_path(flow_run_id, home))


def read_record(path: Path) -> ActiveRun | None:
    """The record in ``path``, or None when it is gone, too big or not a record."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_RECORD_BYTES + 1)
    except OSError:
        return None
    if len(data) > MAX_RECORD_BYTES:
        return None
    try:
        return ActiveRun.model_validate_json(data)
    except ValueError:
        return None


def discard_record(flow_run_id: str, home: Path | None = None) -> None:
    """Remove the record of a run that needs no cleanup any more (no error when gone)."""
    record_path(flow_run_id, home).unlink(missing_ok=True)


# -- processes of a run ---------------------------------------------------------------------


def _cmdline(pid: int) -> str | None:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return None


def run_processes(state_dir: Path) -> dict[int, str]:
    """Live swtpm, qemu and agent processes whose command line names ``state_dir`` (pid ->
    command line): a run's processes carry its folder (the TPM state, the agent's work
    root, the VM's firmware variables)."""
    folder = str(state_dir).rstrip("/")
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        cmdline = _cmdline(int(entry.name))
        if cmdline is None or process_start_ticks(int(entry.name)) is None:
            continue
        names_folder = f"{folder}/" in cmdline or cmdline.rstrip().endswith(folder)
        program = Path(cmdline.split(" ", 1)[0]).name
        ours = program.startswith(RUN_EXECUTABLES) or AGENT_MARKER in cmdline
        if names_folder and ours:
            found[int(entry.name)] = cmdline.strip()
    return found


def terminate_processes(pids: list[int], grace_s: float = SWEEP_GRACE_S) -> None:
    """SIGTERM the processes, wait up to ``grace_s`` for all, SIGKILL the rest."""
    identities = [identity for pid in pids if (identity := ProcessIdentity.of(pid)) is not None]
    for identity in identities:
        with contextlib.suppress(ProcessLookupError):
            os.kill(identity.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    alive = identities
    while alive and time.monotonic() < deadline:
        for identity in alive:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(identity.pid, os.WNOHANG)
        alive = [identity for identity in alive if identity.alive()]
        if alive:
            time.sleep(0.05)
    for identity in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(identity.pid, signal.SIGKILL)


# -- teardown from a record -----------------------------------------------------------------


def describe(record: ActiveRun) -> str:
    """What the record says the run left: processes, ports, container, VM."""
    parts: list[str] = []
    machine = record.machine
    details = machine.details if machine is not None else {}
    if details.get("agent_pid"):
        port = details.get("agent_port")
        parts.append(f"agent pid {details['agent_pid']}" + (f" (port {port})" if port else ""))
    if details.get("swtpm_pid"):
        port = details.get("swtpm_port")
        parts.append(f"swtpm pid {details['swtpm_pid']}" + (f" (port {port})" if port else ""))
    if details.get("qemu_pid"):
        parts.append(f"VM qemu pid {details['qemu_pid']}")
    if details.get("container"):
        parts.append(f"container {details['container']}")
    if machine is not None and record.provider == "azure":
        parts.append(f"Azure VM of run {record.run_id}")
    if machine is not None and record.provider == "gcp":
        parts.append(f"Compute Engine VM of run {record.run_id}")
    if not parts:
        parts.append("no machine recorded")
    return ", ".join(parts)


def teardown_record(record: ActiveRun, home: Path | None = None) -> list[str]:
    """Tear down everything of the record's run; returns what was stopped beyond the
    provider's own teardown (processes found by the run's folder). Idempotent.

    The provider's teardown works from the recorded machine; then any swtpm, VM or agent
    that still names the run's folder is stopped: a run killed while provisioning started
    them before its record could name them.
    """
    from aicert.tasks.platforms import provider_for_machine

    home = (home or aicert_home()).resolve()
    machine = record.machine
    if machine is None and record.provider in ("local", "qemu"):
        # Killed before provisioning returned: what it may have started is found by run id.
        machine = Machine(
            provider=record.provider,
            run_id=record.run_id,
            agent_url="",
            state_dir=record.state_dir or str(home / "runs" / record.run_id),
        )
    if machine is not None and machine.provider == "azure":
        from aicert.flows.azure_platform import azure_provider_for_machine

        azure_provider_for_machine(machine).teardown(machine)
    elif machine is not None and machine.provider == "gcp":
        from aicert.flows.gcp_platform import gcp_provider_for_machine

        gcp_provider_for_machine(machine).teardown(machine)
    elif machine is not None:
        provider_for_machine(machine).teardown(machine)
    # Azure without a machine: it was killed before the VM's creation was asked for, or
    # while it was (``aicert azure cleanup`` finds such resources by their tags).
    swept: list[str] = []
    state_dir = record.state_dir or (machine.state_dir if machine is not None else None)
    if state_dir and record.provider in ("local", "qemu", None):
        leftovers = run_processes(Path(state_dir))
        if leftovers:
            terminate_processes(list(leftovers))
            swept = [f"pid {pid} ({cmd[:80]})" for pid, cmd in sorted(leftovers.items())]
    return swept


# -- cleanup of abandoned runs --------------------------------------------------------------


@dataclass
class CleanupReport:
    """What a cleanup did with each record (by flow run id)."""

    dry_run: bool = False
    torn_down: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether every record was dealt with (none failed to tear down)."""
        return not self.failed


@contextlib.contextmanager
def _record_lock(path: Path) -> Iterator[bool]:
    """A non-blocking lock on one record, so that two cleanups never work on the same run
    at once; yields False when another process holds it."""
    lock_path = path.with_suffix(".lock")
    with lock_path.open("a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            lock_path.unlink(missing_ok=True)


def _age(record: ActiveRun, path: Path) -> timedelta:
    created = record.created_at
    if created is None:
        try:
            created = datetime.fromtimestamp(path.stat().st_mtime, UTC)
        except OSError:
            return timedelta(0)
    return datetime.now(UTC) - created


def cleanup_abandoned_runs(
    home: Path | None = None,
    *,
    older_than: timedelta | None = None,
    dry_run: bool = False,
    log: Log = print,
) -> CleanupReport:
    """Tear down the runs whose owning process is gone, and remove their records.

    A run whose owner is alive, whose owner runs on another host, or (``older_than``) that
    is more recent is kept. A record without an owner (written before owners were recorded)
    counts as abandoned only with ``older_than``. An unreadable record is kept and reported.
    Each decision goes to ``log``.
    """
    home = (home or aicert_home()).resolve()
    report = CleanupReport(dry_run=dry_run)
    folder = active_dir(home)
    if not folder.is_dir():
        return report
    for path in sorted(folder.glob("*.json")):
        record = read_record(path)
        if record is None:
            if path.exists():
                report.kept.append(path.stem)
                log(f"kept {path}: not a readable run record")
            continue
        name = f"run {record.run_id} (flow run {record.flow_run_id})"
        owner = record.owner
        if owner is not None and not owner.on_this_host():
            report.kept.append(record.flow_run_id)
            log(f"kept {name}: owned by pid {owner.pid} on host {owner.host}")
            continue
        if owner is not None and owner.alive():
            report.kept.append(record.flow_run_id)
            log(f"kept {name}: in progress (pid {owner.pid} is alive)")
            continue
        if older_than is not None and _age(record, path) < older_than:
            report.kept.append(record.flow_run_id)
            log(f"kept {name}: more recent than {older_than}")
            continue
        if owner is None and older_than is None:
            report.kept.append(record.flow_run_id)
            log(f"kept {name}: no owner recorded (pass --older-than to remove it)")
            continue
        why = f"owner pid {owner.pid} is gone" if owner else "no owner recorded"
        what = describe(record)
        if dry_run:
            report.torn_down.append(record.flow_run_id)
            log(f"would tear down {name}, {why}: {what}; and remove {path}")
            continue
        with _record_lock(path) as locked:
            if not locked or not path.exists():
                report.kept.append(record.flow_run_id)
                log(f"kept {name}: another process is cleaning it up")
                continue
            try:
                swept = [] if record.torn_down else teardown_record(record, home)
            except Exception as exc:  # report it; the record stays for the next try
                report.failed.append(record.flow_run_id)
                log(f"FAILED to tear down {name}: {type(exc).__name__}: {exc}; kept {path}")
                continue
            path.unlink(missing_ok=True)
        report.torn_down.append(record.flow_run_id)
        extra = f"; also stopped {', '.join(swept)}" if swept else ""
        state = "was already torn down" if record.torn_down else f"tore down {what}"
        log(f"cleaned up {name}, {why}: {state}{extra}; removed {path}")
    return report
