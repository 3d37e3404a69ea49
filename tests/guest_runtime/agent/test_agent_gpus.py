"""A GPU job through the real agent (local platform: swtpm, dockerd, the HTTP API).

This machine has no GPU: ``nvidia-smi`` is ``fake_nvidia_smi``, a double for that hardware
printing the real format, first on the agent's PATH. The agent measures what it reported as
the ``aicert.input.gpus`` event right after the config; the real dockerd, without the NVIDIA
Container Toolkit, then refuses the device request, and the run fails before the job starts
with the error that says so, its logs kept. Without nvidia-smi the run is refused at once.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from aicert.gpus import GpuEvent

from ..fake_nvidia_smi import H100_UUIDS, install_fake_nvidia_smi, path_with
from .conftest import AgentUnderTest, ConfigFactory
from .test_agent_failures import call_error


@pytest.fixture
def fake_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fake nvidia-smi first on PATH, which the agent process (started after this
    fixture) inherits."""
    folder = tmp_path / "bin"
    install_fake_nvidia_smi(folder)
    monkeypatch.setenv("PATH", path_with(folder))
    return folder


def test_gpu_facts_are_measured_and_a_machine_without_the_runtime_fails_before_training(
    fake_gpus: Path, agent: AgentUnderTest, make_config: ConfigFactory
) -> None:
    config = {**make_config(), "gpus": 2}
    events, _ = agent.start(config)
    assert [e.type for e in events] == ["aicert.runtime", "aicert.input.config", GpuEvent.TYPE]
    measured = GpuEvent.model_validate(events[2].data)
    assert [d.uuid for d in measured.devices] == list(H100_UUIDS)
    assert (measured.driver_version, measured.cuda_version) == ("550.54.15", "12.4")
    agent.client.measure_inputs(agent.run_id)
    agent.client.build_image(agent.run_id)
    status, lines = agent.train()
    assert status.state == "failed" and lines == []
    assert status.error is not None
    assert status.error.startswith(
        "the training container could not run: gpus: 2 GPUs asked for, but this machine's "
        "Docker engine cannot pass GPUs: the NVIDIA Container Toolkit is missing or not "
        "configured for Docker (the engine answered: "
    ), status.error
    assert status.error.endswith("); the job was not started")
    assert (agent.workspace / "logs" / "training.log").exists()
    assert list((agent.workspace / "outputs").iterdir()) == []


def test_without_nvidia_smi_a_gpu_run_is_refused_at_its_start(
    agent: AgentUnderTest, make_config: ConfigFactory
) -> None:
    agent.provider.enroll_attestation_key(agent.machine, agent.client)
    error = call_error(
        agent.client.start_run, agent.run_id, agent.nonce, {**make_config(), "gpus": 1}
    )
    assert (error.kind, error.status) == ("GpuError", 422)
    assert "gpus: nvidia-smi is not on this machine's PATH" in str(error)
