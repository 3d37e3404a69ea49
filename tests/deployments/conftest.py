"""Fixtures of the deployment tests: the real stack of ``deployments/stack.sh`` (a ``prefect
server start`` on a free loopback port, the process work pool, a worker with ``--limit 4``,
the deployments), one per backend per session, and the trigger-to-promotion scenario.

Everything is real: events go to the server's events API, the server's automations create the
flow runs, the worker runs them in subprocesses that provision a swtpm and a guest agent and
train in the host's Docker engine. Every wait is bounded, and the stack is torn down (and
checked for leftovers) even when a test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterName,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.sorting import FlowRunSort
from prefect.events import Event
from prefect.events.clients import PrefectEventsClient
from prefect.events.schemas.events import ReceivedEvent
from prefect.settings import PREFECT_API_URL, temporary_settings

from aicert.flows.events import RUN_KIND_LABEL
from aicert.flows.flows import CERTIFICATE_CREATED
from aicert.flows.promote import MODEL_PROMOTED, MODEL_REJECTED
from aicert.tasks.platforms.base_image import ensure_base_image
from aicert.tasks.platforms.local.provider import platform_ca_certificate_path
from tests import REPO_ROOT
from tests.aicert_flows.conftest import (
    TRAIN_SCRIPT,
    events_named,
    flush_prefect_workers,
    git_head,
    make_git_repo,
    processes_mentioning,
    run_containers,
    training_config,
    unique_project,
    wait_for,
    write_config,
)

STACK_SCRIPT = REPO_ROOT / "deployments" / "stack.sh"
WORKER_LIMIT = 4
STACK_TIMEOUT_S = 240
RUN_START_TIMEOUT_S = 90
RUN_FINISH_TIMEOUT_S = 240


# -- the stack --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Stack:
    """A running stack: its API, its AICERT_HOME (runs, CAs, registry) and its environment."""

    backend: str
    api_url: str
    ui_url: str
    home: Path
    registry: Path
    env: dict[str, str]

    @contextlib.contextmanager
    def client(self) -> Iterator[SyncPrefectClient]:
        with (
            temporary_settings({PREFECT_API_URL: self.api_url}),
            get_client(sync_client=True) as client,
        ):
            try:
                yield client
            finally:
                # Prefect's events and log workers are per-process singletons bound to the
                # API they started with: flows run here would leave them sending the next
                # test module's task states and events to this stack. Drain and stop them.
                flush_prefect_workers()

    @property
    def platform_ca(self) -> Path:
        return platform_ca_certificate_path(self.home)

    def stack_sh(self, *args: str, timeout_s: float = STACK_TIMEOUT_S) -> str:
        return run_stack_script(self.env, *args, timeout_s=timeout_s)


def run_stack_script(env: dict[str, str], *args: str, timeout_s: float) -> str:
    done = subprocess.run(
        ["bash", str(STACK_SCRIPT), *args],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(
            f"stack.sh {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        )
    return done.stdout + done.stderr


def _stack_pids(home: Path) -> list[int]:
    pids = []
    for name in ("server.pid", "worker.pid"):
        with contextlib.suppress(OSError, ValueError):
            pids.append(int((home / "stack" / name).read_text()))
    return pids


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


@contextlib.contextmanager
def running_stack(
    backend: str, base: Path, *, deployments: str, pg_dir: Path | None = None
) -> Iterator[Stack]:
    """``stack.sh up`` in a fresh AICERT_HOME; ``stack.sh down`` and leak checks after."""
    home = base / "home"
    registry = base / "registry"
    port = free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("PREFECT_") or key == "PREFECT_SERVER_ANALYTICS_ENABLED"
    }
    env.update(
        {
            "AICERT_HOME": str(home),
            "AICERT_REGISTRY": str(registry),
            "AICERT_STACK_TIMEOUT": "120",
            # A short poll keeps the tests' event-to-start latency low.
            "AICERT_WORKER_POLL_SECONDS": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.3",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if pg_dir is not None:
        env["AICERT_PG_DIR"] = str(pg_dir)
    args = ["up", "--port", str(port), "--limit", str(WORKER_LIMIT), "--deployments", deployments]
    if backend == "postgres":
        args.append("--postgres")
    stack = Stack(
        backend=backend,
        api_url=f"http://127.0.0.1:{port}/api",
        ui_url=f"http://127.0.0.1:{port}",
        home=home,
        registry=registry,
        env=env,
    )
    try:
        run_stack_script(env, *args, timeout_s=STACK_TIMEOUT_S)
        assert (home / "stack" / "backend").read_text().strip() == backend
        yield stack
    finally:
        pids = _stack_pids(home)
        down_error: BaseException | None = None
        try:
            run_stack_script(env, "down", timeout_s=STACK_TIMEOUT_S)
        except BaseException as exc:  # still look for (and end) leftovers
            down_error = exc
        check_nothing_left(home, pids, pg_dir)
        if down_error is not None:
            raise down_error


def check_nothing_left(home: Path, pids: list[int], pg_dir: Path | None) -> None:
    leftovers = [f"stack process {pid}" for pid in pids if _pid_alive(pid)]
    for marker in [str(home)] + ([str(pg_dir)] if pg_dir else []):
        for line in processes_mentioning(marker):
            leftovers.append(line)
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(line.split(":", 1)[0]), 9)
    runs = home / "runs"
    for run_id in sorted(p.name for p in runs.iterdir()) if runs.is_dir() else []:
        leftovers += [f"container {name}" for name in run_containers(run_id)]
    assert leftovers == [], f"the stack left these behind: {leftovers}"


@pytest.fixture(scope="session")
def base_image() -> str:
    """The offline Debian Python base image; built here when missing (CI), else reused."""
    return ensure_base_image()


@pytest.fixture(scope="session")
def sqlite_stack(tmp_path_factory: pytest.TempPathFactory, base_image: str) -> Iterator[Stack]:
    """The default stack (SQLite), its deployments applied from ``deployments/prefect.yaml``
    with ``prefect deploy --all`` (the PostgreSQL stack uses the Python entry point)."""
    with running_stack("sqlite", tmp_path_factory.mktemp("stack-sqlite"), deployments="yaml") as s:
        yield s


@contextlib.contextmanager
def postgres_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The stack on a real PostgreSQL server started by ``stack.sh up --postgres``.

    As root, the script runs PostgreSQL as the ``postgres`` user, which cannot enter pytest's
    private temporary folders: the cluster lives in a folder of its own under /tmp.
    """
    pg_parent = Path(tempfile.mkdtemp(prefix="aicert-pg-test-"))
    try:
        pg_parent.chmod(0o711)
        with running_stack(
            "postgres",
            tmp_path_factory.mktemp("stack-postgres"),
            deployments="python",
            pg_dir=pg_parent / "cluster",
        ) as stack:
            yield stack
    finally:
        shutil.rmtree(pg_parent, ignore_errors=True)


# -- talking to the stack -------------------------------------------------------------------


def emit(
    stack: Stack,
    event: str,
    resource_id: str,
    payload: dict[str, Any],
    labels: dict[str, str] | None = None,
) -> Event:
    """Send one event to the stack's events API (what a push hook would do), its resource
    labelled with ``labels``."""
    to_send = Event(
        event=event,
        resource={"prefect.resource.id": resource_id, **(labels or {})},
        payload=payload,
    )

    async def send() -> None:
        async with PrefectEventsClient(api_url=stack.api_url) as events:
            await events.emit(to_send)

    asyncio.run(send())
    return to_send


def deployment_runs(
    client: SyncPrefectClient, deployment: str, parameters: Callable[[dict[str, Any]], bool]
) -> list[FlowRun]:
    runs = client.read_flow_runs(
        deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])),
        sort=FlowRunSort.EXPECTED_START_TIME_ASC,
        limit=200,
    )
    return [run for run in runs if parameters(run.parameters)]


def wait_for_run(
    client: SyncPrefectClient,
    deployment: str,
    parameters: Callable[[dict[str, Any]], bool],
    *,
    what: str,
    timeout_s: float = RUN_START_TIMEOUT_S,
) -> FlowRun:
    """The (single) flow run of ``deployment`` whose parameters match, once it exists."""
    runs = wait_for(
        lambda: deployment_runs(client, deployment, parameters),
        timeout_s=timeout_s,
        what=what,
    )
    assert len(runs) == 1, f"{what}: {len(runs)} flow runs: {[r.name for r in runs]}"
    return runs[0]


def wait_until_final(
    client: SyncPrefectClient, flow_run_id: Any, *, timeout_s: float = RUN_FINISH_TIMEOUT_S
) -> FlowRun:
    def final() -> FlowRun | None:
        run = client.read_flow_run(flow_run_id)
        return run if run.state is not None and run.state.is_final() else None

    return wait_for(final, timeout_s=timeout_s, interval_s=1.0, what=f"flow run {flow_run_id}")


def events_with_payload(
    client: SyncPrefectClient, event: str, **fields: Any
) -> list[ReceivedEvent]:
    return [
        received
        for received in events_named(client, event)
        if all(received.payload.get(key) == value for key, value in fields.items())
    ]


def wait_for_event(
    client: SyncPrefectClient, event: str, *, timeout_s: float = 60, **fields: Any
) -> ReceivedEvent:
    found = wait_for(
        lambda: events_with_payload(client, event, **fields),
        timeout_s=timeout_s,
        what=f"{event} with {fields}",
    )
    assert len(found) == 1, f"{len(found)} {event} events with {fields}"
    return found[0]


def registry_snapshot(registry: Path) -> dict[str, str]:
    """Every file in the registry (staging included) -> its SHA-256."""
    if not registry.exists():
        return {}
    return {
        str(path.relative_to(registry)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(registry.rglob("*"))
        if path.is_file()
    }


def flow_run_duration(run: FlowRun) -> tuple[datetime, datetime]:
    assert run.start_time is not None and run.end_time is not None, run.name
    return run.start_time, run.end_time


# -- the scenario: an event, a certification, a promotion -------------------------------------


@dataclass
class Promotion:
    """What one ``aicert.source.updated`` event led to on a stack."""

    stack: Stack
    project: str
    repo: Path
    commit: str
    config_path: Path
    emitted: Event
    certify_run: FlowRun
    created_event: ReceivedEvent
    promote_run: FlowRun

    @property
    def run_id(self) -> str:
        return str(self.created_event.payload["run_id"])

    @property
    def registry_dir(self) -> Path:
        return self.stack.registry / self.project / self.run_id


def make_project(
    base: Path, prefix: str, epochs: int = 60, hold_s: float = 0
) -> tuple[str, Path, Path]:
    """A committed training repository and its aicert.yaml: (project, repo, config path).

    ``hold_s`` keeps the training container running that long after it wrote the model."""
    project = unique_project(prefix)
    repo = make_git_repo(base / project / "repo", {"train.py": TRAIN_SCRIPT})
    config = write_config(
        base / project / "aicert.yaml",
        training_config(project, "repo", env={"EPOCHS": str(epochs), "HOLD_SECONDS": str(hold_s)}),
    )
    return project, repo, config


def trigger_to_promotion(stack: Stack, base: Path, prefix: str) -> Promotion:
    """Emit ``aicert.source.updated`` for a new project and follow it to the promotion."""
    project, repo, config = make_project(base, prefix)
    commit = git_head(repo)
    emitted = emit(
        stack,
        "aicert.source.updated",
        f"aicert.source.{project}",
        {"config_path": str(config), "commit": commit},
    )
    with stack.client() as client:
        certify = wait_for_run(
            client,
            "certify-training",
            lambda p: p.get("config_path") == str(config),
            what=f"the certify-training run for {project}",
        )
        certify = wait_until_final(client, certify.id)
        assert certify.state is not None and certify.state.is_completed(), certify.state
        created = wait_for_event(client, CERTIFICATE_CREATED, project=project)
        run_id = created.payload["run_id"]
        promote = wait_for_run(
            client,
            "verify-and-promote",
            lambda p: p.get("run_id") == run_id,
            what=f"the verify-and-promote run for {run_id}",
        )
        promote = wait_until_final(client, promote.id)
    return Promotion(stack, project, repo, commit, config, emitted, certify, created, promote)


def check_promoted(promotion: Promotion) -> None:
    """The model and its certificate are in the registry, verified, and announced."""
    import aicert

    run = promotion.promote_run
    assert run.state is not None and run.state.is_completed(), run.state
    payload = promotion.created_event.payload
    certificate = Path(payload["certificate_path"])
    folder = promotion.registry_dir
    assert (folder / "certificate.json").read_bytes() == certificate.read_bytes()
    assert hashlib.sha256(certificate.read_bytes()).hexdigest() == payload["certificate_sha256"]
    report = aicert.load(folder / "certificate.json").verify(
        trusted_roots=[promotion.stack.platform_ca],
        allow_dev_platform=True,
        model=folder / "model",
    )
    assert report.run_id == promotion.run_id and report.project == promotion.project
    assert sorted(o.path for o in report.outputs) == ["metrics/loss.txt", "model.json"]
    assert json.loads((folder / "verification.json").read_text())["run_id"] == promotion.run_id
    with promotion.stack.client() as client:
        promoted = wait_for_event(client, MODEL_PROMOTED, run_id=promotion.run_id)
    assert promoted.payload["registry_path"] == str(folder)
    assert promoted.payload["certificate_sha256"] == payload["certificate_sha256"]
    assert promoted.resource.id == f"aicert.run.{promotion.run_id}"
    assert not list((promotion.stack.registry / ".staging").iterdir())


def tampered_copy(certificate: Path, destination: Path) -> Path:
    """A copy of ``certificate`` whose model.json output digest was changed, consistently
    in the measured event and in the outputs list (what a forger would do)."""
    data = json.loads(certificate.read_text())
    forged = "0" * 64
    for event in data["event_log"]:
        if event["type"] == "aicert.output.file" and event["data"]["path"] == "model.json":
            event["data"]["sha256"] = forged
    for output in data["outputs"]:
        if output["path"] == "model.json":
            output["digest"]["sha256"] = forged
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_text(json.dumps(data))
    return destination


def check_tampered_certificate_rejected(promotion: Promotion, base: Path) -> None:
    """``aicert.certificate.created`` naming a forged copy: rejected, nothing published."""
    stack = promotion.stack
    payload = dict(promotion.created_event.payload)
    forged = tampered_copy(Path(payload["certificate_path"]), base / "forged" / "certificate.json")
    payload.update(
        certificate_path=str(forged),
        certificate_sha256=hashlib.sha256(forged.read_bytes()).hexdigest(),
        storage_url=None,
    )
    before = registry_snapshot(stack.registry)
    emit(
        stack,
        CERTIFICATE_CREATED,
        f"aicert.run.{promotion.run_id}",
        payload,
        {RUN_KIND_LABEL: "training"},
    )
    with stack.client() as client:
        run = wait_for_run(
            client,
            "verify-and-promote",
            lambda p: p.get("certificate_path") == str(forged),
            what="the verify-and-promote run for the forged certificate",
        )
        run = wait_until_final(client, run.id)
        assert run.state is not None and run.state.is_failed(), run.state
        assert "EventLogError" in str(run.state.message), run.state.message
        rejected = wait_for_event(client, MODEL_REJECTED, certificate_path=str(forged))
    assert rejected.payload["error_type"] == "EventLogError"
    assert "PCR 15" in rejected.payload["error_message"]
    assert registry_snapshot(stack.registry) == before


@pytest.fixture(scope="session")
def promotion(sqlite_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Promotion:
    """One event-driven certification and promotion on the SQLite stack, shared by the
    trigger and UI tests."""
    started = time.monotonic()
    result = trigger_to_promotion(sqlite_stack, tmp_path_factory.mktemp("projects"), "deploy")
    print(f"trigger to promotion: {time.monotonic() - started:.1f} s")
    return result


def task_run_names(client: SyncPrefectClient, flow_run_id: Any) -> list[str]:
    task_runs = client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    )
    return sorted(t.name for t in task_runs)
