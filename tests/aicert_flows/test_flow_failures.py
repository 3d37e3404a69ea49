"""How ``certify-training`` fails: bad config, flaky and broken downloads, a failing job, a
crash (SIGTERM to the flow's process) and a cancellation through the API. Each must leave no
swtpm, agent or container behind, and no certificate."""

from __future__ import annotations

import hashlib
import http.server
import itertools
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.events.filters import (
    EventFilter,
    EventNameFilter,
    EventRelatedFilter,
    EventResourceFilter,
)
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelling, State

import aicert
from aicert.flows.events import RUN_KIND_LABEL, run_resource_id
from aicert.flows.flows import CERTIFICATE_FAILED, certify_training
from aicert.tasks.platforms.local.provider import platform_ca_certificate_path

from .conftest import (
    FAILING_SCRIPT,
    TRAIN_SCRIPT,
    events_named,
    flow_run_named,
    flush_prefect_workers,
    make_git_repo,
    processes_mentioning,
    python_subprocess,
    run_containers,
    run_ids_in,
    running_training_container,
    stop_process,
    subprocess_env,
    task_runs_of,
    training_config,
    unique_project,
    wait_for,
    write_config,
)

RESOURCE_BYTES = b"x,y\n" + b"".join(f"{i},{3 * i + 1}\n".encode() for i in range(100))


# -- a local HTTP server with scripted answers -------------------------------------------------


@dataclass
class ScriptedServer:
    base_url: str
    # path -> status codes to answer, in order; the last one repeats.
    script: dict[str, list[int]] = field(default_factory=dict)
    requests: dict[str, list[float]] = field(default_factory=dict)


@pytest.fixture
def scripted_server() -> Iterator[ScriptedServer]:
    state = ScriptedServer(base_url="")
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with lock:
                seen = state.requests.setdefault(self.path, [])
                seen.append(time.monotonic())
                codes = state.script.get(self.path, [404])
                code = codes[min(len(seen), len(codes)) - 1]
            body = RESOURCE_BYTES if code == 200 else f"status {code}\n".encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


# -- helpers ----------------------------------------------------------------------------------


def _project(tmp_path: Path, prefix: str, script: str = TRAIN_SCRIPT, **overrides: Any):
    """A git repo with ``script`` as train.py and its config (absolute gitRepo path).
    ``command=[...]`` replaces the Python entry point."""
    project = unique_project(prefix)
    repo = make_git_repo(tmp_path / "repo", {"train.py": script})
    values = training_config(project, str(repo), **overrides)
    if "command" in overrides:
        del values["pythonEntryPoint"]
    return project, write_config(tmp_path / "aicert.yaml", values)


def _task_states(client: SyncPrefectClient, state: State[Any]) -> dict[str, str]:
    return {
        t.name: t.state.type.value if t.state else "NONE"
        for t in task_runs_of(client, state.state_details.flow_run_id)
    }


def _failed_event(client: SyncPrefectClient, resource_id: str) -> Any:
    flush_prefect_workers()
    events = wait_for(
        lambda: events_named(client, CERTIFICATE_FAILED, resource_id),
        timeout_s=30,
        what=f"{CERTIFICATE_FAILED} for {resource_id}",
    )
    assert len(events) == 1
    return events[0]


def _assert_torn_down(home: Path, run_id: str) -> None:
    assert processes_mentioning(str(home)) == []
    assert run_containers(run_id) == []
    assert not any((home / "active").glob("*.json")), "the hooks did not finish the record"


# -- configuration ----------------------------------------------------------------------------


def test_bad_config_fails_at_load_config_before_provisioning(
    flow_env: str, aicert_home: Path, tmp_path: Path, client: SyncPrefectClient
) -> None:
    config = training_config("bad-config", str(tmp_path))
    config["pythonEntrypoint"] = config.pop("pythonEntryPoint")  # a typo'd key
    config["resources"] = [{"url": "http://127.0.0.1:1/x", "destinationPath": "../escape"}]
    path = write_config(tmp_path / "aicert.yaml", config)

    state = certify_training(config_path=str(path), return_state=True)

    assert state.is_failed()
    message = str(state.message)
    assert "pythonEntrypoint" in message and "unknown field" in message
    assert "resources[0].destinationPath" in message and ".." in message
    tasks = _task_states(client, state)
    assert len(tasks) == 1 and next(iter(tasks)).startswith("load-config"), tasks
    assert set(tasks.values()) == {"FAILED"}
    assert not aicert_home.exists(), "something was provisioned for an invalid config"
    flow_run_id = state.state_details.flow_run_id
    # No run id yet, and still on the one scheme: an automation on aicert.run.* sees it.
    resource_id = f"aicert.run.unassigned-{flow_run_id}"
    assert run_resource_id(None, str(flow_run_id)) == resource_id
    event = _failed_event(client, resource_id)
    assert event.payload["state"] == "FAILED" and event.payload["run_id"] is None
    assert event.resource.get(RUN_KIND_LABEL) == "training" == event.payload["kind"]
    on_scheme = client.read_events(
        EventFilter(
            event=EventNameFilter(prefix=["aicert."]),
            resource=EventResourceFilter(id_prefix=["aicert.run."]),
            related=EventRelatedFilter(
                resources_in_roles=[(f"prefect.flow-run.{flow_run_id}", "flow-run")]
            ),
        ),
        limit=50,
    ).events
    assert [e.id for e in on_scheme] == [event.id]
    assert event.resource.name == resource_id


# -- downloads --------------------------------------------------------------------------------


def test_download_retries_until_the_server_recovers(
    flow_env: str,
    aicert_home: Path,
    tmp_path: Path,
    scripted_server: ScriptedServer,
    client: SyncPrefectClient,
) -> None:
    scripted_server.script["/data.csv"] = [503, 503, 200]
    url = f"{scripted_server.base_url}/data.csv"
    digest = hashlib.sha256(RESOURCE_BYTES).hexdigest()
    _, config = _project(
        tmp_path,
        "flaky",
        resources=[{"url": url, "destinationPath": "data/data.csv", "sha256": digest}],
    )
    bom = tmp_path / "proof.json"

    state = certify_training(config_path=str(config), output_bom=str(bom), return_state=True)

    assert state.is_completed(), state.message
    assert len(scripted_server.requests["/data.csv"]) == 3
    report = aicert.load(bom).verify(
        trusted_roots=[platform_ca_certificate_path(aicert_home)], allow_dev_platform=True
    )
    resources = [i for i in report.inputs if i.kind == "resource"]
    assert [(r.uri, r.digest["sha256"], r.size) for r in resources] == [
        (url, digest, len(RESOURCE_BYTES))
    ]


def test_download_that_keeps_failing_names_the_url(
    flow_env: str,
    aicert_home: Path,
    tmp_path: Path,
    scripted_server: ScriptedServer,
    client: SyncPrefectClient,
) -> None:
    scripted_server.script["/gone.bin"] = [500]
    url = f"{scripted_server.base_url}/gone.bin"
    _, config = _project(
        tmp_path, "broken", resources=[{"url": url, "destinationPath": "gone.bin"}]
    )
    bom = tmp_path / "proof.json"

    state = certify_training(config_path=str(config), output_bom=str(bom), return_state=True)

    assert state.is_failed()
    assert url in str(state.message) and "500" in str(state.message)
    assert _task_states(client, state)["measure-inputs"] == "FAILED"
    # The agent retried with growing pauses (backoff), then gave up.
    times = scripted_server.requests["/gone.bin"]
    assert len(times) == 4
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert gaps[0] >= 0.9 and all(b > a for a, b in itertools.pairwise(gaps)), gaps
    assert not bom.exists()
    (run_id,) = run_ids_in(aicert_home)
    _assert_torn_down(aicert_home, run_id)
    event = _failed_event(client, f"aicert.run.{run_id}")
    assert url in event.payload["message"]


# -- the training job -------------------------------------------------------------------------


def test_failing_training_gives_no_certificate_but_keeps_outputs_and_logs(
    flow_env: str, aicert_home: Path, tmp_path: Path, client: SyncPrefectClient
) -> None:
    project, config = _project(tmp_path, "failing", script=FAILING_SCRIPT)
    bom = tmp_path / "proof.json"

    state = certify_training(config_path=str(config), output_bom=str(bom), return_state=True)

    assert state.is_failed()
    assert "exited with code 1" in str(state.message)
    tasks = _task_states(client, state)
    assert tasks["run-training"] == "FAILED"
    assert "measure-outputs" not in tasks and "quote" not in tasks
    assert tasks["teardown"] == "COMPLETED"
    assert not bom.exists()
    (run_id,) = run_ids_in(aicert_home)
    workspace = aicert_home / "runs" / run_id / "work" / run_id
    assert (workspace / "outputs" / "partial.txt").read_text() == "half a model"
    assert "training-marker: about to fail" in (workspace / "logs" / "training.log").read_text()
    _assert_torn_down(aicert_home, run_id)
    event = _failed_event(client, f"aicert.run.{run_id}")
    assert event.payload["state"] == "FAILED" and event.payload["project"] == project


# -- crash and cancellation -------------------------------------------------------------------

CRASH_SCRIPT = """\
import sys
from aicert.flows.flows import certify_training
certify_training.with_options(flow_run_name=sys.argv[2])(config_path=sys.argv[1])
"""


def test_sigterm_while_training_crashes_the_run_and_the_hooks_tear_down(
    flow_env: str, aicert_home: Path, tmp_path: Path, client: SyncPrefectClient
) -> None:
    project, config = _project(tmp_path, "crash", command=["sleep", "60"])
    flow_run_name = f"crash-{project}"
    process = python_subprocess(
        CRASH_SCRIPT,
        str(config),
        flow_run_name,
        env=subprocess_env(flow_env, aicert_home),
        log_path=tmp_path / "flow.log",
    )
    try:
        container = wait_for(
            lambda: running_training_container(project) if process.poll() is None else "exited",
            timeout_s=120,
            what="the training container",
        )
        assert container != "exited", (tmp_path / "flow.log").read_text()[-3000:]
        os.kill(process.pid, signal.SIGTERM)
        process.wait(timeout=90)
    finally:
        stop_process(process)
    log = (tmp_path / "flow.log").read_text()
    flow_run = wait_for(
        lambda: (run := flow_run_named(client, flow_run_name)) and run.state.is_final() and run,
        timeout_s=30,
        what="the flow run's final state",
    )
    assert flow_run.state is not None and flow_run.state.is_crashed(), (flow_run.state, log[-3000:])
    (run_id,) = run_ids_in(aicert_home)
    _assert_torn_down(aicert_home, run_id)


SERVE_SCRIPT = """\
import sys
from aicert.flows.flows import certify_training
certify_training.serve(name=sys.argv[1], print_starting_message=False)
"""


@dataclass
class ServedFlow:
    """``certify-training`` served by a Prefect runner in another process, as a deployment."""

    deployment_id: Any
    home: Path
    log_path: Path
    runner_pid: int

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def served_flow(
    prefect_api_url: str, base_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServedFlow]:
    root = tmp_path_factory.mktemp("served")
    home = root / "aicert-home"
    name = unique_project("served")
    env = subprocess_env(prefect_api_url, home)
    env["PREFECT_RUNNER_POLL_FREQUENCY"] = "1"  # pick up new flow runs within a second
    log_path = root / "runner.log"
    runner = python_subprocess(SERVE_SCRIPT, name, env=env, log_path=log_path)
    try:
        with get_client(sync_client=True) as client:
            deployment = wait_for(
                lambda: (
                    _deployment(client, f"certify-training/{name}")
                    or (runner.poll() is not None and "exited")
                ),
                timeout_s=60,
                what="the served deployment",
            )
        assert deployment != "exited", log_path.read_text()[-3000:]
        yield ServedFlow(deployment.id, home, log_path, runner.pid)
    finally:
        stop_process(runner)
    assert processes_mentioning(str(home)) == []


def _deployment(client: SyncPrefectClient, name: str) -> Any:
    try:
        return client.read_deployment_by_name(name)
    except ObjectNotFound:
        return None


def _start_served_run(
    client: SyncPrefectClient, served: ServedFlow, config: Path, project: str
) -> tuple[Any, str]:
    """Start a flow run of the deployment; return it once its training container runs."""
    flow_run = client.create_flow_run_from_deployment(
        served.deployment_id, parameters={"config_path": str(config)}
    )
    container = wait_for(
        lambda: (
            running_training_container(project)
            or (client.read_flow_run(flow_run.id).state.is_final() and "ended")
        ),
        timeout_s=120,
        what="the training container",
    )
    assert container != "ended", served.log_tail()
    (run_id,) = [r for r in run_ids_in(served.home) if r.startswith(f"{project}-")]
    return flow_run, run_id


def _wait_final(client: SyncPrefectClient, flow_run_id: Any) -> Any:
    return wait_for(
        lambda: (run := client.read_flow_run(flow_run_id)).state.is_final() and run,
        timeout_s=90,
        what="the flow run's final state",
    )


def _wait_torn_down(home: Path, run_id: str) -> None:
    wait_for(
        lambda: (
            not processes_mentioning(str(home))
            and not run_containers(run_id)
            and not any((home / "active").glob("*.json"))
        ),
        timeout_s=60,
        what="the teardown",
    )


def test_cancellation_through_the_api_tears_down(
    served_flow: ServedFlow, tmp_path: Path, client: SyncPrefectClient
) -> None:
    project, config = _project(tmp_path, "cancel", command=["sleep", "60"])
    flow_run, run_id = _start_served_run(client, served_flow, config, project)

    client.set_flow_run_state(flow_run.id, Cancelling(), force=True)

    final = _wait_final(client, flow_run.id)
    assert final.state.is_cancelled(), (final.state, served_flow.log_tail())
    _wait_torn_down(served_flow.home, run_id)
    assert "Hook '_on_cancellation' finished running successfully" in served_flow.log_tail()
    event = _failed_event(client, f"aicert.run.{run_id}")
    assert event.payload["state"] in {"CANCELLING", "CANCELLED"}, event.payload
    # The step the cancellation interrupted is Cancelled (not Crashed), and teardown ran.
    tasks = {
        t.name: t.state.type.value if t.state else "NONE" for t in task_runs_of(client, flow_run.id)
    }
    assert tasks["run-training"] == "CANCELLED", (tasks, served_flow.log_tail())
    assert tasks["teardown"] == "COMPLETED", tasks


def test_killed_flow_process_is_torn_down_by_the_crash_hook(
    served_flow: ServedFlow, tmp_path: Path, client: SyncPrefectClient
) -> None:
    """SIGKILL (an OOM kill, say) leaves the flow's own ``finally`` no chance: the runner marks
    the run Crashed and runs ``on_crashed`` in its process, which must tear down alone."""
    project, config = _project(tmp_path, "killed", command=["sleep", "60"])
    flow_run, run_id = _start_served_run(client, served_flow, config, project)
    agents = [
        line
        for line in processes_mentioning(str(served_flow.home / "runs" / run_id))
        if "aicert.guest_runtime.server" in line
    ]
    assert len(agents) == 1, agents
    agent_pid = int(agents[0].split(":", 1)[0])
    flow_pid = _parent_pid(agent_pid)  # the runner's process for this flow run
    assert flow_pid != served_flow.runner_pid
    assert served_flow.runner_pid in _ancestors(flow_pid)

    os.kill(flow_pid, signal.SIGKILL)

    final = _wait_final(client, flow_run.id)
    assert final.state.is_crashed(), (final.state, served_flow.log_tail())
    _wait_torn_down(served_flow.home, run_id)
    assert "Hook '_on_crashed' finished running successfully" in served_flow.log_tail()
    event = _failed_event(client, f"aicert.run.{run_id}")
    assert event.payload["state"] == "CRASHED" and event.payload["project"] == project
    # The hook ran in the runner's process, and still knew the kind of run from the flow.
    assert event.resource.get(RUN_KIND_LABEL) == "training" == event.payload["kind"]


def _ancestors(pid: int) -> list[int]:
    found = []
    while pid > 1:
        pid = _parent_pid(pid)
        found.append(pid)
    return found


def _parent_pid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no parent of {pid}")
