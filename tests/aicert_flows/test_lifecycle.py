"""Run records and the cleanup of abandoned runs, on real processes: a real swtpm stands for
what a run left, a real child process for its owner. A run whose owner lives is never
touched; one whose owner died (or whose pid now names another process) is torn down; a run
killed while provisioning is found by the processes naming its folder; and a dead TPM right
before training stops a flow run before any training, saying where its logs are."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import SyncPrefectClient

from aicert.flows.flows import certify_training
from aicert.flows.lifecycle import (
    ActiveRun,
    ProcessIdentity,
    cleanup_abandoned_runs,
    process_start_ticks,
    save_record,
)
from aicert.tasks.certification import MachineFailed
from aicert.tasks.platforms import PROVIDERS
from aicert.tasks.platforms.base import Machine
from aicert.tasks.platforms.local.provider import LocalProvider
from aicert.tasks.platforms.swtpm import LocalSwtpm

from .conftest import (
    TRAIN_SCRIPT,
    flow_run_logs,
    flush_prefect_workers,
    make_git_repo,
    processes_mentioning,
    run_containers,
    training_config,
    unique_project,
    write_config,
)


def _alive(pid: int) -> bool:
    return process_start_ticks(pid) is not None


@pytest.fixture
def owner() -> Iterator[subprocess.Popen[bytes]]:
    """A process that stands for the ``aicert run`` owning a run."""
    process = subprocess.Popen(["sleep", "300"])
    yield process
    process.kill()
    process.wait()


def _kill(process: subprocess.Popen[bytes]) -> None:
    process.kill()
    process.wait()  # reaped: its pid names no process now


def _abandoned_run(
    home: Path, owner_pid: int, *, with_machine: bool = True
) -> tuple[ActiveRun, int]:
    """A started swtpm in a run folder, and that run's record; returns (record, swtpm pid)."""
    run_id = f"abandoned-{uuid.uuid4().hex[:8]}"
    run_dir = home / "runs" / run_id
    tpm = LocalSwtpm.create(run_dir / "tpm", home / "ek-ca")
    tpm.start()
    swtpm_port = tpm.port
    swtpm_pid = tpm.detach()
    owner = ProcessIdentity.of(owner_pid)
    assert owner is not None
    machine = Machine(
        provider="local",
        run_id=run_id,
        agent_url="http://127.0.0.1:9",
        state_dir=str(run_dir),
        details={"swtpm_pid": swtpm_pid, "swtpm_port": swtpm_port, "tpm_state": str(tpm.state_dir)},
    )
    record = ActiveRun(
        flow_run_id=str(uuid.uuid4()),
        run_id=run_id,
        project="abandoned",
        provider="local",
        state_dir=str(run_dir),
        machine=machine if with_machine else None,
        owner=owner,
        created_at=datetime.now(UTC),
    )
    save_record(record, home)
    return record, swtpm_pid


def _records(home: Path) -> list[Path]:
    return sorted((home / "active").glob("*.json"))


def test_a_live_owner_keeps_its_run_a_dead_one_has_it_torn_down(
    aicert_home: Path, owner: subprocess.Popen[bytes]
) -> None:
    record, swtpm = _abandoned_run(aicert_home, owner.pid)
    lines: list[str] = []

    report = cleanup_abandoned_runs(aicert_home, log=lines.append)
    assert report.kept == [record.flow_run_id] and report.torn_down == []
    assert f"kept run {record.run_id}" in lines[0] and f"pid {owner.pid} is alive" in lines[0]
    assert _alive(swtpm) and _records(aicert_home)

    _kill(owner)
    lines.clear()
    report = cleanup_abandoned_runs(aicert_home, dry_run=True, log=lines.append)
    assert report.torn_down == [record.flow_run_id]
    assert f"would tear down run {record.run_id}" in lines[0], lines
    assert f"swtpm pid {swtpm}" in lines[0], lines
    assert _alive(swtpm) and _records(aicert_home)  # a dry run changes nothing

    lines.clear()
    report = cleanup_abandoned_runs(aicert_home, log=lines.append)
    assert report.torn_down == [record.flow_run_id] and report.ok
    assert f"cleaned up run {record.run_id} " in lines[0], lines
    assert f"owner pid {owner.pid} is gone: tore down swtpm pid {swtpm}" in lines[0], lines
    assert not _alive(swtpm)
    assert _records(aicert_home) == []
    # Idempotent: nothing left to do.
    assert cleanup_abandoned_runs(aicert_home, log=lines.append).torn_down == []


def test_a_reused_pid_or_a_reboot_is_not_the_owner(owner: subprocess.Popen[bytes]) -> None:
    identity = ProcessIdentity.of(owner.pid)
    assert identity is not None and identity.alive()
    # Same pid, another process (it started at another time): not the owner.
    assert not identity.model_copy(update={"start_ticks": identity.start_ticks + 1}).alive()
    assert not identity.model_copy(update={"boot_id": "another-boot"}).alive()
    assert not identity.model_copy(update={"host": "another-host"}).alive()


def test_a_run_owned_on_another_host_is_kept(
    aicert_home: Path, owner: subprocess.Popen[bytes]
) -> None:
    record, swtpm = _abandoned_run(aicert_home, owner.pid)
    assert record.owner is not None
    save_record(
        record.model_copy(update={"owner": record.owner.model_copy(update={"host": "elsewhere"})}),
        aicert_home,
    )
    _kill(owner)
    lines: list[str] = []
    report = cleanup_abandoned_runs(aicert_home, log=lines.append)
    assert report.kept == [record.flow_run_id], lines
    assert "on host elsewhere" in lines[0]
    assert _alive(swtpm)
    os.kill(swtpm, signal.SIGKILL)


def test_older_than_keeps_recent_runs_and_records_without_owner_need_it(
    aicert_home: Path, owner: subprocess.Popen[bytes]
) -> None:
    record, swtpm = _abandoned_run(aicert_home, owner.pid)
    _kill(owner)
    lines: list[str] = []
    report = cleanup_abandoned_runs(aicert_home, older_than=timedelta(hours=2), log=lines.append)
    assert report.kept == [record.flow_run_id] and "more recent than 2:00:00" in lines[0]
    assert _alive(swtpm)

    # A record written before owners were recorded: only an age makes it abandoned.
    save_record(
        record.model_copy(
            update={"owner": None, "created_at": datetime.now(UTC) - timedelta(hours=3)}
        ),
        aicert_home,
    )
    lines.clear()
    assert cleanup_abandoned_runs(aicert_home, log=lines.append).kept == [record.flow_run_id]
    assert "no owner recorded (pass --older-than" in lines[0]
    report = cleanup_abandoned_runs(aicert_home, older_than=timedelta(hours=2), log=lines.append)
    assert report.torn_down == [record.flow_run_id]
    assert not _alive(swtpm) and _records(aicert_home) == []


def test_unreadable_record_is_kept_and_named(aicert_home: Path) -> None:
    (aicert_home / "active").mkdir(parents=True)
    bad = aicert_home / "active" / "not-a-record.json"
    bad.write_text("{")
    lines: list[str] = []
    report = cleanup_abandoned_runs(aicert_home, log=lines.append)
    assert report.kept == ["not-a-record"] and bad.exists()
    assert f"kept {bad}: not a readable run record" in lines


def test_run_killed_while_provisioning_is_found_by_its_folder(
    aicert_home: Path, owner: subprocess.Popen[bytes]
) -> None:
    """No machine in the record yet: its swtpm is found by the run folder on its command
    line; a process that merely names the folder (a ``tail`` of its log) is left alone."""
    record, swtpm = _abandoned_run(aicert_home, owner.pid, with_machine=False)
    assert record.state_dir is not None
    log = Path(record.state_dir) / "agent.log"
    log.write_text("")
    reader = subprocess.Popen(["tail", "-f", str(log)], stdout=subprocess.DEVNULL)
    try:
        _kill(owner)
        lines: list[str] = []
        report = cleanup_abandoned_runs(aicert_home, log=lines.append)
        assert report.torn_down == [record.flow_run_id], lines
        assert f"also stopped pid {swtpm}" in lines[0], lines
        assert not _alive(swtpm)
        assert reader.poll() is None, "a process that is not the run's was killed"
    finally:
        reader.kill()
        reader.wait()


def test_cleanup_command_exit_codes(aicert_home: Path) -> None:
    aicert = str(Path(sys.executable).with_name("aicert"))
    env = {**os.environ, "AICERT_HOME": str(aicert_home)}
    bad = subprocess.run(
        [aicert, "cleanup", "--older-than", "soon"], env=env, capture_output=True, text=True
    )
    assert bad.returncode == 2, bad.stderr
    assert "--older-than" in bad.stderr
    empty = subprocess.run([aicert, "cleanup"], env=env, capture_output=True, text=True)
    assert empty.returncode == 0, empty.stderr
    assert "tore down 0 run(s), kept 0, failed 0" in empty.stdout


# -- in a flow run ---------------------------------------------------------------------------


class _TpmDiesBeforeTraining(LocalProvider):
    """The local platform, whose swtpm is killed (for real) right before the training: the
    flow asks ``outputs_path`` just before its TPM check."""

    def outputs_path(self, machine: Machine) -> Path | None:
        os.kill(int(machine.details["swtpm_pid"]), signal.SIGKILL)
        return super().outputs_path(machine)


def test_flow_cleans_up_first_and_a_dead_tpm_stops_it_before_training(
    flow_env: str,
    aicert_home: Path,
    tmp_path: Path,
    client: SyncPrefectClient,
    owner: subprocess.Popen[bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(PROVIDERS, "local-tpm-dies", _TpmDiesBeforeTraining)
    abandoned, abandoned_swtpm = _abandoned_run(aicert_home, owner.pid)
    _kill(owner)
    project = unique_project("deadtpm")
    repo = make_git_repo(tmp_path / "repo", {"train.py": TRAIN_SCRIPT})
    config = write_config(tmp_path / "aicert.yaml", training_config(project, str(repo)))

    # The test double is no platform kind: the flow's Literal parameter would refuse it.
    unchecked = certify_training.with_options(validate_parameters=False)
    state: Any = unchecked(config_path=str(config), provider="local-tpm-dies", return_state=True)

    assert state.is_failed()
    with pytest.raises(MachineFailed) as failure:
        state.result()
    message = str(failure.value)
    assert "the machine's TPM is not usable before training: the software TPM" in message
    assert "nothing was trained; logs kept in" in message
    run_dir = Path(message.rsplit("logs kept in ", 1)[1].strip())
    assert (run_dir / "agent.log").is_file()
    run_id = run_dir.name
    assert not (run_dir / "work" / run_id / "logs" / "training.log").exists()
    flush_prefect_workers()
    logs = [entry.message for entry in flow_run_logs(client, state.state_details.flow_run_id)]
    assert any(f"cleanup: cleaned up run {abandoned.run_id}" in line for line in logs), logs
    assert not _alive(abandoned_swtpm)
    assert processes_mentioning(str(aicert_home)) == []
    assert run_containers(run_id) == []
    assert _records(aicert_home) == []
