"""Faults injected into ``aicert run`` on the local platform, with real processes: the CLI
killed (SIGKILL, then ``aicert cleanup``), Ctrl-C typed in a terminal, SIGTERM, the swtpm,
agent or training container killed mid-run, a training container killed for memory, and a
full disk. Each asserts the exit code, the message, and that nothing of the run is left:
no process, no listening port, no container, no record, no temporary Prefect server.

The signal tests run the CLI without a Prefect API, so it starts its temporary server (the
part that used to be orphaned); the others use the session's test server.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import docker
import pytest

from aicert.flows.lifecycle import ActiveRun, read_record

from .conftest import (
    REPO_ROOT,
    make_git_repo,
    processes_mentioning,
    run_containers,
    unique_project,
    wait_for,
    write_config,
)

# The job says it started, then holds (HOLD_SECONDS) so that a fault lands mid-training;
# ALLOCATE_MB makes it use that much memory first, FILL_MB writes that much output.
HOLDING_SCRIPT = """\
import os, pathlib, time
out = pathlib.Path("/workspace/outputs")
hog = b"x" * (int(os.environ.get("ALLOCATE_MB", "0")) << 20)
print("training-marker: started", flush=True)
fill = int(os.environ.get("FILL_MB", "0"))
if fill:
    with open(out / "big.bin", "wb") as handle:
        for _ in range(fill):
            handle.write(b"\\0" * (1 << 20))
time.sleep(float(os.environ.get("HOLD_SECONDS", "0")))
(out / "model.txt").write_text("model")
print("training-marker: done", flush=True)
"""
STARTED = "training-marker: started"
# How long a job that a fault is meant to interrupt holds.
TRAINING_HOLD_S = 90
# A signalled run must end (teardown included) within this long.
STOP_DEADLINE_S = 15.0
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@dataclass
class CliRun:
    """An ``aicert run`` in a child process; its output is collected as it comes."""

    process: subprocess.Popen[bytes]
    home: Path
    output: bytearray = field(default_factory=bytearray)
    master_fd: int | None = None
    _reader: threading.Thread | None = None

    def text(self) -> str:
        return ANSI.sub("", self.output.decode(errors="replace"))

    def wait(self, timeout_s: float) -> int:
        try:
            code = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"aicert run still running after {timeout_s} s:\n{self.text()[-3000:]}"
            ) from None
        if self._reader is not None:
            self._reader.join(10)
        return code

    def record(self) -> ActiveRun:
        """The run's record, once its machine is provisioned."""

        def probe() -> ActiveRun | None:
            for path in (self.home / "active").glob("*.json"):
                record = read_record(path)
                if record is not None and record.machine is not None:
                    return record
            return None

        return wait_for(probe, timeout_s=120, what="the run's record with its machine")

    def wait_for_training(self, timeout_s: float = 240) -> None:
        wait_for(
            lambda: STARTED in self.text() or self.process.poll() is not None,
            timeout_s=timeout_s,
            interval_s=0.2,
            what="the training to start",
        )
        assert STARTED in self.text(), self.text()[-3000:]


def _pump_fd(source: int, sink: bytearray) -> None:
    while True:
        try:
            chunk = os.read(source, 4096)
        except OSError:  # the terminal's other side closed
            return
        if not chunk:
            return
        sink.extend(chunk)


def _environment(home: Path, api_url: str | None, prefect_home: Path | None) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("PREFECT_API") and key != "AICERT_HOME"
    }
    env.update(
        AICERT_HOME=str(home),
        PYTHONUNBUFFERED="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_TO_API_BATCH_INTERVAL="0.3",
        COLUMNS="200",
    )
    if api_url is None:
        # The temporary servers of this module share one database (migrated once).
        assert prefect_home is not None
        env["PREFECT_HOME"] = str(prefect_home)
    else:
        env["PREFECT_API_URL"] = api_url
    return env


def _aicert() -> str:
    return str(Path(sys.executable).with_name("aicert"))


def start_cli(
    config: Path,
    home: Path,
    api_url: str | None,
    prefect_home: Path | None = None,
    *,
    terminal: bool = False,
) -> CliRun:
    """``aicert run`` in its own session; with ``terminal``, on a new pseudo-terminal whose
    foreground process group it is (as when typed in a shell)."""
    argv = [_aicert(), "run", "--config", str(config), "--output-bom", str(home / "proof.json")]
    env = _environment(home, api_url, prefect_home)
    if not terminal:
        process = subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        run = CliRun(process, home)
        assert process.stdout is not None
        run._reader = threading.Thread(target=_pump_fd, args=(process.stdout.fileno(), run.output))
    else:
        master, slave = os.openpty()

        def take_terminal() -> None:
            # Session leader (start_new_session) -> this terminal becomes its controlling
            # terminal, and its process group the terminal's foreground group.
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        process = subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            env=env,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            preexec_fn=take_terminal,
        )
        os.close(slave)
        assert os.tcgetpgrp(master) == process.pid
        run = CliRun(process, home, master_fd=master)
        run._reader = threading.Thread(target=_pump_fd, args=(master, run.output))
    run._reader.daemon = True
    run._reader.start()
    return run


# -- what must be gone ----------------------------------------------------------------------


def _listening_ports() -> set[int]:
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(stat[1]) == pid:
                    found.append(int(entry.name))
    return found


def temporary_server_pid(cli_pid: int) -> int:
    """The temporary Prefect server the CLI started (its child running uvicorn)."""

    def probe() -> int | None:
        for child in _children(cli_pid):
            with contextlib.suppress(OSError):
                if (
                    b"prefect.server.api.server:create_app"
                    in Path(f"/proc/{child}/cmdline").read_bytes()
                ):
                    return child
        return None

    return wait_for(probe, timeout_s=120, what="the temporary Prefect server")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def assert_nothing_left(record: ActiveRun, *, server_pid: int | None = None) -> None:
    """No process of the run, no port it listened on, no container, no record, no server."""
    home = Path(record.state_dir or "").parents[1]
    details = record.machine.details if record.machine else {}
    ports = {int(details[k]) for k in ("agent_port", "swtpm_port") if details.get(k)}
    if details.get("swtpm_port"):
        ports.add(int(details["swtpm_port"]) + 1)  # the swtpm's control channel

    def clean() -> bool:
        return (
            not processes_mentioning(str(home))
            and not (ports & _listening_ports())
            and not run_containers(record.run_id)
            and not list((home / "active").glob("*.json"))
            and (server_pid is None or not _alive(server_pid))
        )

    with contextlib.suppress(AssertionError):
        wait_for(clean, timeout_s=20, what="nothing of the run to remain")
    assert processes_mentioning(str(home)) == []
    assert ports & _listening_ports() == set(), ports
    assert run_containers(record.run_id) == []
    assert list((home / "active").glob("*.json")) == []
    if server_pid is not None:
        assert not _alive(server_pid), f"the temporary Prefect server {server_pid} survived"


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def holding_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_git_repo(tmp_path_factory.mktemp("holding") / "repo", {"train.py": HOLDING_SCRIPT})


@pytest.fixture(scope="module", autouse=True)
def _server_database(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    """The database of this module's temporary servers, migrated in the background while the
    first tests run (a fresh one takes half a minute), so each server starts on it at once."""
    folder = tmp_path_factory.mktemp("prefect-home")
    migration = subprocess.Popen(
        [str(Path(sys.executable).with_name("prefect")), "server", "database", "upgrade", "-y"],
        env={**os.environ, "PREFECT_HOME": str(folder)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    yield folder, migration
    if migration.poll() is None:
        migration.kill()
    migration.wait()


@pytest.fixture
def server_home(_server_database: tuple[Path, subprocess.Popen[bytes]]) -> Path:
    """PREFECT_HOME of this module's temporary servers, once its database is migrated."""
    folder, migration = _server_database
    assert migration.wait(timeout=300) == 0, "migrating the temporary servers' database failed"
    return folder


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "aicert-home"
    home.mkdir()
    yield home
    leftovers = processes_mentioning(str(home))
    for line in leftovers:  # one failed test must not poison the next ones
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)
    if leftovers:
        subprocess.run([_aicert(), "cleanup"], env={**os.environ, "AICERT_HOME": str(home)})


def holding_config(
    tmp_path: Path, repo: Path, hold_s: float, memory: str = "256m", **env: str
) -> Path:
    name = unique_project("fault")
    return write_config(
        tmp_path / "aicert.yaml",
        {
            "kind": "python",
            "name": name,
            "source": {"type": "git", "gitRepo": str(repo), "branch": "main"},
            "pythonEntryPoint": "train.py",
            "env": {"HOLD_SECONDS": str(hold_s), **env},
            "limits": {"cpus": 1, "memory": memory, "timeoutSeconds": 300},
        },
    )


# -- parts of the run killed mid-training ---------------------------------------------------


def _failed(cli: CliRun, timeout_s: float = 180) -> str:
    code = cli.wait(timeout_s)
    text = cli.text()
    assert code == 1, text[-4000:]
    assert "certification failed" in text, text[-4000:]
    return " ".join(text.split())  # rich wraps long lines: compare without the breaks


def _kill_swtpm(record: ActiveRun) -> str:
    pid = int(record.machine.details["swtpm_pid"])  # type: ignore[union-attr]
    os.kill(pid, signal.SIGKILL)
    return f"the software TPM (pid {pid}) exited"


def _kill_agent(record: ActiveRun) -> str:
    """The agent dies; its training container runs on until teardown removes it."""
    pid = int(record.machine.details["agent_pid"])  # type: ignore[union-attr]
    os.kill(pid, signal.SIGKILL)
    return f"the guest agent (pid {pid}) exited"


def _kill_container(record: ActiveRun) -> str:
    client = docker.from_env()
    try:
        client.containers.get(f"aicert-{record.run_id}").kill()
    finally:
        client.close()
    return "training was killed by SIGKILL (exit code 137), not for lack of memory"


@pytest.mark.parametrize(
    "kill", [_kill_swtpm, _kill_agent, _kill_container], ids=["swtpm", "agent", "container"]
)
def test_part_of_the_run_killed_mid_training_is_named(
    kill: Callable[[ActiveRun], str],
    flow_env: str,
    holding_repo: Path,
    home: Path,
    tmp_path: Path,
) -> None:
    """The run fails naming what died (not a refused connection or a bare exit code 137),
    as soon as it died (not once the training would have ended), says where the outputs
    and logs are kept, and leaves nothing behind."""
    config = holding_config(tmp_path, holding_repo, hold_s=TRAINING_HOLD_S)
    cli = start_cli(config, home, flow_env)
    cli.wait_for_training()
    record = cli.record()
    cause = kill(record)
    killed = time.monotonic()

    text = _failed(cli)
    assert time.monotonic() - killed < TRAINING_HOLD_S - 20, text[-3000:]
    assert cause in text, text[-3000:]
    assert f"kept in {record.state_dir}" in text, text[-3000:]
    assert_nothing_left(record)


def test_out_of_memory_is_named(
    flow_env: str, holding_repo: Path, home: Path, tmp_path: Path
) -> None:
    config = holding_config(tmp_path, holding_repo, hold_s=0, memory="64m", ALLOCATE_MB="400")
    cli = start_cli(config, home, flow_env)
    text = _failed(cli, timeout_s=240)
    assert (
        "training ran out of memory: Docker OOM-killed the container (limits.memory 64m; "
        "exit code 137)"
    ) in text, text[-3000:]
    assert processes_mentioning(str(home)) == []
    assert run_containers_of_home(home) == []
    assert not list((home / "active").glob("*.json"))


def test_full_disk_fails_the_run_and_leaves_nothing(
    flow_env: str, holding_repo: Path, tmp_path: Path
) -> None:
    """AICERT_HOME on a 48 MB tmpfs and a job that writes 100 MB of outputs."""
    home = tmp_path / "small-home"
    home.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(home)], check=True)
    try:
        config = holding_config(tmp_path, holding_repo, hold_s=0, FILL_MB="100")
        cli = start_cli(config, home, flow_env)
        text = _failed(cli, timeout_s=240)
        assert "No space left on device" in text, text[-3000:]
        assert "training exited with code 1" in text, text[-3000:]
        assert "outputs and training log kept in" in text, text[-3000:]
        assert processes_mentioning(str(home)) == []
        assert not list((home / "active").glob("*.json"))
        assert run_containers_of_home(home) == []
    finally:
        for line in processes_mentioning(str(home)):
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)
        subprocess.run(["umount", "-l", str(home)], check=False)


def run_containers_of_home(home: Path) -> list[str]:
    runs = home / "runs"
    names: list[str] = []
    for run in runs.iterdir() if runs.is_dir() else []:
        names += run_containers(run.name)
    return names


# -- the CLI killed, interrupted, terminated ------------------------------------------------


def test_sigkill_leaves_nothing_after_cleanup(
    base_image: str, holding_repo: Path, server_home: Path, home: Path, tmp_path: Path
) -> None:
    """A SIGKILLed CLI cannot clean up: its temporary server dies with it (parent-death
    signal), and ``aicert cleanup`` tears down the rest from the run's record."""
    config = holding_config(tmp_path, holding_repo, hold_s=120)
    cli = start_cli(config, home, None, server_home)
    server = temporary_server_pid(cli.process.pid)
    cli.wait_for_training()
    record = cli.record()
    assert record.owner is not None and record.owner.pid == cli.process.pid
    details = record.machine.details  # type: ignore[union-attr]
    assert {"agent_pid", "swtpm_pid", "agent_port", "swtpm_port", "container"} <= set(details)

    cli.process.kill()
    assert cli.wait(10) == -signal.SIGKILL
    wait_for(lambda: not _alive(server), timeout_s=15, what="the server to end with the CLI")
    # The record is what is left to find the run by; the run itself is still there.
    assert _alive(int(details["agent_pid"])) and _alive(int(details["swtpm_pid"]))
    assert run_containers(record.run_id)

    env = {**os.environ, "AICERT_HOME": str(home)}
    dry = subprocess.run(
        [_aicert(), "cleanup", "--dry-run"], env=env, capture_output=True, text=True, timeout=60
    )
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert f"would tear down run {record.run_id}" in dry.stdout, dry.stdout
    assert f"owner pid {cli.process.pid} is gone" in dry.stdout, dry.stdout
    assert _alive(int(details["agent_pid"])) and list((home / "active").glob("*.json"))

    done = subprocess.run(
        [_aicert(), "cleanup"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"cleaned up run {record.run_id}" in done.stdout, done.stdout
    assert f"agent pid {details['agent_pid']}" in done.stdout, done.stdout
    assert_nothing_left(record, server_pid=server)


def test_ctrl_c_in_a_terminal_stops_and_tears_down(
    base_image: str, holding_repo: Path, server_home: Path, home: Path, tmp_path: Path
) -> None:
    """Ctrl-C, twice, typed at the terminal's foreground process group: the temporary server
    is not in that group, so the run is torn down over a live API and the CLI says so."""
    config = holding_config(tmp_path, holding_repo, hold_s=120)
    cli = start_cli(config, home, None, server_home, terminal=True)
    server = temporary_server_pid(cli.process.pid)
    assert os.getpgid(server) != cli.process.pid
    cli.wait_for_training()
    record = cli.record()

    assert cli.master_fd is not None
    started = time.monotonic()
    os.write(cli.master_fd, b"\x03")
    time.sleep(1.0)
    os.write(cli.master_fd, b"\x03")  # an impatient second Ctrl-C must not cut teardown short
    code = cli.wait(STOP_DEADLINE_S + 5)
    elapsed = time.monotonic() - started
    text = cli.text()
    os.close(cli.master_fd)
    assert code == 130, text[-3000:]
    assert elapsed < STOP_DEADLINE_S, (elapsed, text[-3000:])
    assert f"interrupted by SIGINT: run {record.run_id} stopped, torn down" in text, text[-3000:]
    assert f"outputs and logs kept in {record.state_dir}" in text, text[-3000:]
    assert "Connection refused" not in text, text[-3000:]
    assert_nothing_left(record, server_pid=server)


def test_sigterm_stops_and_tears_down(
    base_image: str, holding_repo: Path, server_home: Path, home: Path, tmp_path: Path
) -> None:
    config = holding_config(tmp_path, holding_repo, hold_s=120)
    cli = start_cli(config, home, None, server_home)
    server = temporary_server_pid(cli.process.pid)
    cli.wait_for_training()
    record = cli.record()

    started = time.monotonic()
    cli.process.send_signal(signal.SIGTERM)
    code = cli.wait(STOP_DEADLINE_S + 5)
    elapsed = time.monotonic() - started
    text = cli.text()
    assert code == 143, text[-3000:]
    assert elapsed < STOP_DEADLINE_S, (elapsed, text[-3000:])
    assert f"interrupted by SIGTERM: run {record.run_id} stopped, torn down" in text, text
    assert f"outputs and logs kept in {record.state_dir}" in text, text[-3000:]
    assert_nothing_left(record, server_pid=server)
