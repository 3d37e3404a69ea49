"""The certification core refuses, fails closed and cleans up: one fresh machine per test.

Every refusal is checked through the HTTP API (``AgentCallError.kind`` is the agent's
exception class name) on a real swtpm and a real Docker engine.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import docker
import pytest

from aicert.model import MAX_OUTPUT_FILES
from aicert.tasks.platforms.agent_client import AgentCallError, AgentClient, AgentUnreachableError
from tests.guest_runtime.agent.conftest import (
    AgentUnderTest,
    ConfigFactory,
    ResourceFiles,
    sha256_hex,
)

pytestmark = [pytest.mark.docker, pytest.mark.swtpm, pytest.mark.slow]


def call_error(call: object, *args: object) -> AgentCallError:
    with pytest.raises(AgentCallError) as caught:
        call(*args)  # type: ignore[operator]
    return caught.value


def process_alive(pid: int) -> bool:
    """Running (a zombie awaiting its parent's wait() counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline and process_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def run_containers(client: docker.DockerClient, run_id: str) -> list[str]:
    """Containers whose ``aicert.run`` label names the run (as ``<id>`` or ``aicert-<id>``)."""
    return [
        f"{c.name} ({c.labels.get('aicert.run')})"
        for c in client.containers.list(all=True, filters={"label": "aicert.run"})
        if run_id in c.labels.get("aicert.run", "")
    ]


# -- inputs ------------------------------------------------------------------------------------


def test_pinned_hash_mismatch_stops_the_run_before_training(
    agent: AgentUnderTest, make_config: ConfigFactory, resource_files: ResourceFiles
) -> None:
    wrong = sha256_hex(b"not the served content")
    config = make_config(
        resources=[
            {
                "url": f"{resource_files.base_url}/labels.txt",
                "destinationPath": "labels.txt",
                "sha256": wrong,
            }
        ]
    )
    agent.start(config)
    error = call_error(agent.client.measure_inputs, agent.run_id)
    assert error.kind == "InputMismatchError"
    assert error.status == 422
    assert error.is_input_error
    actual = sha256_hex(resource_files.served["labels.txt"])
    assert wrong in str(error) and actual in str(error) and "labels.txt" in str(error)
    for step in (agent.client.build_image, agent.client.start_training):
        refused = call_error(step, agent.run_id)
        assert (refused.kind, refused.status) == ("StepOrderError", 409)
    # Nor does a retry of the inputs step measure anything again.
    retried = call_error(agent.client.measure_inputs, agent.run_id)
    assert retried.kind == "StepOrderError"
    assert "InputMismatchError" in str(retried) or wrong in str(retried)


def test_destination_path_traversal_is_refused_at_config_validation(
    agent: AgentUnderTest, make_config: ConfigFactory, resource_files: ResourceFiles
) -> None:
    config = make_config(
        resources=[{"url": f"{resource_files.base_url}/labels.txt", "destinationPath": "../x"}]
    )
    error = call_error(agent.client.start_run, agent.run_id, agent.nonce, config)
    assert (error.kind, error.status) == ("ConfigError", 422)
    assert "resources[0].destinationPath" in str(error)
    # Refused before anything was made or measured: the agent still takes a valid run.
    assert not agent.workspace.exists()
    assert agent.client.health().busy_run_id is None
    events, _ = agent.start(make_config())
    assert [e.type for e in events] == ["aicert.runtime", "aicert.input.config"]


# -- training -------------------------------------------------------------------------------


def test_failed_training_gives_no_certificate_but_keeps_outputs_and_logs(
    agent: AgentUnderTest, make_config: ConfigFactory
) -> None:
    agent.prepare(make_config(entry="src/fail.py"))
    status, lines = agent.train()
    assert status.state == "failed"
    assert status.exit_code == 3
    assert status.error is not None and "3" in status.error
    assert lines == ["starting a job that fails", "about to exit with code 3"]
    error = call_error(agent.client.measure_outputs, agent.run_id)
    assert error.kind == "TrainingFailedError"
    assert error.is_training_failure
    refused = call_error(agent.client.quote, agent.run_id)
    assert (refused.kind, refused.status) == ("StepOrderError", 409)
    # Kept for the builder to inspect.
    assert (agent.workspace / "outputs" / "partial.bin").read_bytes() == b"half a model"
    log_text = (agent.workspace / "logs" / "training.log").read_text()
    assert log_text.splitlines() == lines


def test_the_job_runs_without_network_tpm_docker_socket_or_root(
    agent: AgentUnderTest, make_config: ConfigFactory, docker_client: docker.DockerClient
) -> None:
    # A listener the job could reach on Docker's default bridge, were it given a network.
    ipam = docker_client.networks.get("bridge").attrs["IPAM"]["Config"][0]
    gateway = ipam.get("Gateway") or str(next(ipaddress.ip_network(ipam["Subnet"]).hosts()))
    with socket.create_server((gateway, 0)) as listener:
        target = f"{gateway}:{listener.getsockname()[1]}"
        # No requirements.txt at v0: no package events, the job runs on the base image.
        assert agent.prepare(make_config(entry="src/probe.py", env={"PROBE_TARGET": target})) == []
        status, lines = agent.train()
    probe = dict(line.removeprefix("probe ").split("=", 1) for line in lines)
    assert probe["failures"] == "", lines
    assert status.state == "succeeded" and status.exit_code == 0, lines
    assert probe["uid"] == "1000" and probe["euid"] == "1000"
    assert int(probe["capeff"], 16) == 0
    for path in ("/dev/tpm0", "/dev/tpmrm0", "/var/run/docker.sock", "/run/docker.sock"):
        assert probe[f"exists:{path}"] == "False"
    assert probe["interfaces"] == "lo"
    assert probe["connect"] == "ENETUNREACH"
    assert probe["dns"] == "failed"
    assert probe["src_writable"] == "False"


def test_symlink_out_of_the_outputs_is_refused(
    agent: AgentUnderTest, make_config: ConfigFactory
) -> None:
    agent.prepare(make_config(entry="src/symlink_out.py"))
    status, _ = agent.train()
    assert status.state == "succeeded"
    error = call_error(agent.client.measure_outputs, agent.run_id)
    assert error.kind == "UnsafeOutputError"
    assert error.status == 422
    assert "passwd-link" in str(error) and "/etc/passwd" in str(error)
    refused = call_error(agent.client.quote, agent.run_id)
    assert refused.kind == "StepOrderError"


def test_more_outputs_than_a_certificate_lists_are_refused_before_pcr_15(
    agent: AgentUnderTest, make_config: ConfigFactory
) -> None:
    """A certificate lists at most MAX_OUTPUT_FILES outputs (so that the largest one verifies
    in under 2 s): a run that leaves more gets no certificate and PCR 15 stays untouched."""
    assert MAX_OUTPUT_FILES == 20_000  # the training script writes one file more
    agent.prepare(make_config(entry="src/many_outputs.py"))
    status, lines = agent.train()
    assert status.state == "succeeded", lines
    error = call_error(agent.client.measure_outputs, agent.run_id)
    assert error.kind == "TooManyOutputsError"
    assert error.status == 422
    assert "20001 files" in str(error) and "at most 20000" in str(error)
    assert call_error(agent.client.quote, agent.run_id).kind == "StepOrderError"
    assert len(list((agent.workspace / "outputs").iterdir())) == 20_001  # kept


def test_the_configured_outputs_folder_is_the_one_measured(
    agent: AgentUnderTest, make_config: ConfigFactory
) -> None:
    config = make_config(outputs="/workspace/model", env={"OUTPUTS_DIR": "/workspace/model"})
    agent.prepare(config)
    status, lines = agent.train()
    assert status.state == "succeeded", lines
    events = agent.client.measure_outputs(agent.run_id)
    measured = [e.data["path"] for e in events if e.type == "aicert.output.file"]
    assert measured == ["checkpoints/last.json", "model.bin"]
    assert (agent.workspace / "outputs" / "model.bin").stat().st_size == 16


# -- the platform ----------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_swtpm_killed_mid_run_fails_the_next_measuring_call_quickly(
    agent: AgentUnderTest, make_config: ConfigFactory
) -> None:
    agent.start(make_config())
    swtpm_pid = int(agent.machine.details["swtpm_pid"])
    os.kill(swtpm_pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while process_alive(swtpm_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_alive(swtpm_pid)
    # A short client timeout: a hanging TPM call fails the test instead of blocking it.
    with AgentClient(agent.machine.agent_url, timeout_s=30.0) as client:
        started = time.monotonic()
        error = call_error(client.measure_inputs, agent.run_id)
        assert time.monotonic() - started < 20
        assert (error.kind, error.status) == ("TpmUnreachableError", 503), error
        assert "TPM" in str(error) and "unreachable" in str(error)
        # The run is over: a retry does not measure half the inputs again.
        retried = call_error(client.measure_inputs, agent.run_id)
        assert retried.kind == "StepOrderError"
        assert client.health().status == "ok"


def test_steps_out_of_order_are_refused(agent: AgentUnderTest, make_config: ConfigFactory) -> None:
    client, run_id = agent.client, agent.run_id

    def refused(call: object, *args: object) -> None:
        error = call_error(call, *args)
        assert (error.kind, error.status) == ("StepOrderError", 409), error

    refused(client.measure_inputs, run_id)  # no run yet
    refused(client.start_run, run_id, agent.nonce, make_config())  # before the AK
    refused(client.platform_quote, os.urandom(32))  # no AK to quote with
    refused(client.activate_credential, b"blob", b"secret")  # no AK to activate
    agent.provider.enroll_attestation_key(agent.machine, client)
    assert client.key_material().ak_public == client.key_material().ak_public  # a retry
    client.platform_quote(os.urandom(32))
    client.start_run(run_id, agent.nonce, make_config())
    refused(client.start_run, "another-run", os.urandom(32), make_config())  # busy
    refused(client.start_run, run_id, agent.nonce, make_config())
    refused(client.key_material)  # the AK is fixed once a run started
    refused(client.quote, run_id)
    refused(client.build_image, run_id)  # before the inputs
    refused(client.training_status, run_id)  # nothing to report yet
    client.measure_inputs(run_id)
    refused(client.measure_inputs, run_id)  # measured once only
    refused(client.start_training, run_id)  # before the image
    client.build_image(run_id)
    refused(client.measure_outputs, run_id)  # before training
    status, _ = agent.train()
    assert status.state == "succeeded"
    refused(client.start_training, run_id)  # once only
    refused(client.quote, run_id)  # before the outputs
    client.measure_outputs(run_id)
    refused(client.measure_outputs, run_id)
    assert client.quote(run_id).exit_code == 0
    refused(client.measure_inputs, "no-such-run")
    refused(client.start_run, "second-run", os.urandom(32), make_config())  # a fresh machine


def test_teardown_during_training_leaves_nothing_running(
    agent: AgentUnderTest, make_config: ConfigFactory, docker_client: docker.DockerClient
) -> None:
    agent.prepare(make_config(entry="src/sleep.py"))
    agent.client.start_training(agent.run_id)
    chunk = agent.client.read_logs(agent.run_id, 0, wait_s=30)
    assert chunk.lines == ["sleeping"]
    assert len(run_containers(docker_client, agent.run_id)) == 1
    pids = [int(agent.machine.details[key]) for key in ("swtpm_pid", "agent_pid")]
    assert all(process_alive(pid) for pid in pids)

    agent.provider.teardown(agent.machine)

    assert not any(process_alive(pid) for pid in pids)
    assert processes_mentioning(str(agent.provider.run_dir(agent.run_id))) == []
    assert run_containers(docker_client, agent.run_id) == []
    agent.provider.teardown(agent.machine)  # idempotent


def test_stopped_agent_kills_its_training_container(
    agent: AgentUnderTest, make_config: ConfigFactory, docker_client: docker.DockerClient
) -> None:
    # Only the agent gets SIGTERM (not the provider's teardown, which also removes the
    # run's containers): the agent itself must not leave a job running unmeasured.
    agent.prepare(make_config(entry="src/sleep.py"))
    agent.client.start_training(agent.run_id)
    assert agent.client.read_logs(agent.run_id, 0, wait_s=30).lines == ["sleeping"]
    agent_pid = int(agent.machine.details["agent_pid"])

    os.kill(agent_pid, signal.SIGTERM)

    deadline = time.monotonic() + 30
    while process_alive(agent_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not process_alive(agent_pid)
    running = [
        c.name
        for c in docker_client.containers.list(filters={"label": f"aicert.run={agent.run_id}"})
    ]
    assert running == []


def test_following_training_survives_dropped_log_polls(
    agent: AgentUnderTest, make_config: ConfigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Polls that get no answer (a VM too busy to answer in time) are asked again: reading
    # logs changes nothing on the machine. Lines are neither lost nor repeated.
    agent.prepare(make_config())
    agent.client.start_training(agent.run_id)
    real_read_logs = agent.client.read_logs
    calls = {"n": 0}

    def flaky_read_logs(run_id: str, offset: int, wait_s: float = 10.0) -> Any:
        calls["n"] += 1
        if calls["n"] in (1, 2):  # two in a row
            raise AgentUnreachableError("GET /logs", "ReadTimeout", "no answer in time", None)
        return real_read_logs(run_id, offset, wait_s)

    monkeypatch.setattr(agent.client, "read_logs", flaky_read_logs)
    lines: list[str] = []
    status = agent.client.follow_training(agent.run_id, lines.append, poll_wait_s=1.0)
    assert status.state == "succeeded"
    assert calls["n"] >= 3
    assert lines == agent.client.read_logs(agent.run_id, 0, wait_s=0).lines  # no gap, no repeat

    calls["n"] = 0
    with pytest.raises(AgentUnreachableError):
        agent.client.follow_training(
            agent.run_id, lambda _: None, poll_wait_s=1.0, unreachable_retries=0
        )
