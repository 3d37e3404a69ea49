"""Fixtures of the flow tests: a temporary Prefect server, the base image, a per-test
AICERT_HOME, small git repositories with a training script, and bounded polling helpers.

Everything is real: the flow provisions a swtpm and a guest agent, and runs the training in
the host's Docker engine.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import docker
import pytest
import yaml
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterName,
    LogFilter,
    LogFilterFlowRunId,
    LogFilterTaskRunId,
)
from prefect.client.schemas.objects import FlowRun, Log, TaskRun
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.events.schemas.events import ReceivedEvent

from tests import REPO_ROOT

T = TypeVar("T")

# A tiny, dependency-free "training": fit y = a*x + b by gradient descent, write the model
# and metrics to the outputs folder. It prints one line per epoch block (the logs to stream).
TRAIN_SCRIPT = """\
import json, os, pathlib, time
data = [(x / 10, 3 * x / 10 + 1) for x in range(20)]
a = b = 0.0
for epoch in range(1, int(os.environ.get("EPOCHS", "60")) + 1):
    ga = sum(2 * (a * x + b - y) * x for x, y in data) / len(data)
    gb = sum(2 * (a * x + b - y) for x, y in data) / len(data)
    a, b = a - 0.1 * ga, b - 0.1 * gb
    if epoch % 20 == 0:
        print(f"epoch {epoch} a={a:.3f} b={b:.3f}", flush=True)
out = pathlib.Path("/workspace/outputs")
(out / "model.json").write_text(json.dumps({"a": a, "b": b}))
(out / "metrics").mkdir(exist_ok=True)
(out / "metrics" / "loss.txt").write_text(str(sum((a * x + b - y) ** 2 for x, y in data)))
# A test that needs runs to overlap holds the training open (no network: no barrier).
time.sleep(float(os.environ.get("HOLD_SECONDS", "0")))
print("training-marker: done", flush=True)
"""

FAILING_SCRIPT = """\
import pathlib, sys
out = pathlib.Path("/workspace/outputs")
(out / "partial.txt").write_text("half a model")
print("training-marker: about to fail", flush=True)
sys.exit(1)
"""


@pytest.fixture
def flow_env(prefect_api_url: str, base_image: str) -> str:
    """What every flow test needs: the server and the image. Returns the API URL."""
    return prefect_api_url


@pytest.fixture
def client(prefect_api_url: str) -> Iterator[SyncPrefectClient]:
    with get_client(sync_client=True) as prefect_client:
        yield prefect_client


# -- per test: AICERT_HOME, and nothing may outlive the test ----------------------------------


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain ``text`` (the swtpm and agent of a run
    carry their state folder, under AICERT_HOME, on their command line)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline.strip()}")
    return found


def run_containers(run_id: str) -> list[str]:
    """Containers (any state) labelled as the run's, by either labelling convention."""
    client = docker.from_env()
    # The low-level listing: the high-level one inspects each container afterwards, and one
    # removed in between (teardown racing this probe) raised NotFound.
    filters = [
        {"label": f"aicert.run={run_id}"},
        {"label": f"aicert.run=aicert-{run_id}"},
        {"name": f"aicert-{run_id}"},
    ]
    try:
        found = {
            name.lstrip("/")
            for selector in filters
            for summary in client.api.containers(all=True, filters=selector)
            for name in summary.get("Names", [])
        }
        return sorted(found)
    finally:
        client.close()


@pytest.fixture
def aicert_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    home = tmp_path / "aicert-home"
    monkeypatch.setenv("AICERT_HOME", str(home))
    yield home
    leftovers = processes_mentioning(str(home))
    for line in leftovers:  # do not let one failed test poison the next ones
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(line.split(":", 1)[0]), 9)
    assert leftovers == [], f"processes outlived the test: {leftovers}"


def run_ids_in(home: Path) -> list[str]:
    runs = home / "runs"
    return sorted(p.name for p in runs.iterdir()) if runs.is_dir() else []


# -- training projects ------------------------------------------------------------------------


def unique_project(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def make_git_repo(folder: Path, files: dict[str, str]) -> Path:
    """A committed git repository holding ``files`` (path -> text)."""
    folder.mkdir(parents=True)
    for name, text in files.items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    git = ["git", "-c", "user.name=AICert Tests", "-c", "user.email=tests@aicert.invalid"]
    subprocess.run([*git, "init", "--quiet", "--initial-branch=main"], cwd=folder, check=True)
    subprocess.run([*git, "add", "."], cwd=folder, check=True)
    subprocess.run([*git, "commit", "--quiet", "-m", "training code"], cwd=folder, check=True)
    return folder


def git_head(repo: Path) -> str:
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, check=True, capture_output=True, text=True
    ).stdout.strip()


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def training_config(name: str, git_repo: str, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "kind": "python",
        "name": name,
        "source": {"type": "git", "gitRepo": git_repo, "branch": "main"},
        "pythonEntryPoint": "train.py",
        "env": {"EPOCHS": "60"},
        "limits": {"cpus": 1, "memory": "512m", "timeoutSeconds": 120},
    }
    config.update(overrides)
    return config


# -- reading back from the Prefect server -----------------------------------------------------


def wait_for(
    probe: Callable[[], T | None], *, timeout_s: float, interval_s: float = 0.5, what: str
) -> T:
    """Poll ``probe`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def task_runs_of(client: SyncPrefectClient, flow_run_id: Any) -> list[TaskRun]:
    return client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    )


def flow_run_named(client: SyncPrefectClient, name: str) -> FlowRun | None:
    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
    return runs[0] if runs else None


def task_run_logs(client: SyncPrefectClient, task_run_id: Any) -> list[Log]:
    return client.read_logs(
        log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run_id])), limit=200
    )


def flow_run_logs(client: SyncPrefectClient, flow_run_id: Any) -> list[Log]:
    return client.read_logs(
        log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200
    )


def events_named(
    client: SyncPrefectClient, event: str, resource_id: str | None = None
) -> list[ReceivedEvent]:
    page = client.read_events(
        EventFilter(
            event=EventNameFilter(name=[event]),
            resource=EventResourceFilter(id=[resource_id]) if resource_id else None,
        ),
        limit=50,
    )
    return list(page.events)


def flush_prefect_workers() -> None:
    """Send the buffered logs and events of this process to the server now."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    EventsWorker.drain_all(timeout=30)


# -- flows in another process -----------------------------------------------------------------


def python_subprocess(
    script: str, *args: str, env: dict[str, str], log_path: Path
) -> subprocess.Popen[bytes]:
    """Run ``script`` with this interpreter (the project's venv) in its own process group."""
    log = log_path.open("wb")
    try:
        return subprocess.Popen(
            [sys.executable, "-c", script, *args],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        log.close()


def subprocess_env(api_url: str, home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "PREFECT_API_URL": api_url,
            "AICERT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.3",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def running_training_container(project: str) -> str | None:
    """The name of a running training container of ``project`` (its name is
    ``aicert-<run id>`` and a run id starts with the project's name), if any."""
    client = docker.from_env()
    try:
        for container in client.containers.list(filters={"name": f"aicert-{project}-"}):
            if container.status == "running":
                return str(container.name)
        return None
    finally:
        client.close()


def stop_process(process: subprocess.Popen[bytes], grace_s: float = 20.0) -> None:
    """End a process this test started (its group: the flow's children included)."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 2)  # SIGINT: a Prefect runner stops cleanly
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 9)
            process.wait(timeout=10)
