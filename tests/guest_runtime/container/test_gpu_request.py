"""GPU jobs' device request: what the training container's create request carries, and how
a machine without the NVIDIA runtime refuses it.

No GPU and no NVIDIA runtime exist here, so the request is checked against a recording
double of the Docker Engine API (``engine_double``), with the real clients pointed at it:
``container.py``'s docker SDK path must send the very ``HostConfig.DeviceRequests`` that the
real ``docker create --gpus N`` sends. Then the real dockerd refuses the request (no NVIDIA
device driver), and the run must fail before the job starts, with an error naming ``gpus``
and the NVIDIA Container Toolkit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from aicert.guest_runtime.container import ContainerError, run_training_container

from .conftest import sandbox
from .engine_double import CONTAINER_ID, EngineDouble


@pytest.fixture
def engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> EngineDouble:
    """The double, serving, with ``DOCKER_HOST`` pointing the SDK at it."""
    # A short path: a unix socket's path is at most 107 bytes.
    socket = Path(os.environ.get("TMPDIR", "/tmp")) / f"aicert-engine-{os.getpid()}-{id(tmp_path)}"
    double = EngineDouble(socket)
    monkeypatch.setenv("DOCKER_HOST", double.url)
    with double:
        yield double
    socket.unlink(missing_ok=True)


def cli_device_requests(engine: EngineDouble, gpus: int) -> object:
    """The ``HostConfig.DeviceRequests`` the real ``docker`` CLI sends for ``--gpus``."""
    docker = shutil.which("docker")
    assert docker is not None, "the docker CLI is part of the engine this suite runs on"
    completed = subprocess.run(
        [docker, "--host", engine.url, "create", "--gpus", str(gpus), "busybox", "true"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "DOCKER_CONFIG": str(engine.socket) + "-config"},
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == CONTAINER_ID
    body = engine.create_bodies()[-1]
    assert isinstance(body, dict)
    return body["HostConfig"]["DeviceRequests"]


def created_through_the_sdk(
    engine: EngineDouble, workspace: dict[str, Path], gpus: int, tmp_path: Path
) -> dict[str, object]:
    """The create body of a run of ``gpus`` GPUs through ``run_training_container``; the
    double refuses the attach that follows, so nothing starts."""
    spec = dataclasses.replace(
        sandbox("aicert/python-base:bookworm", workspace, ["true"], timeout_s=30),
        gpus=gpus,
        name="aicert-gpu-request",
        log_path=tmp_path / "logs" / "training.log",
    )
    with pytest.raises(ContainerError, match="cannot attach to the training container"):
        run_training_container(spec, lambda line: None)
    bodies = engine.create_bodies()
    assert len(bodies) == 1 and isinstance(bodies[0], dict)
    assert not [r for r in engine.requests if r.path.endswith("/start")]
    return bodies[0]


@pytest.mark.parametrize("gpus", [1, 2, 8])
def test_the_create_request_carries_what_docker_run_gpus_sends(
    engine: EngineDouble, workspace: dict[str, Path], tmp_path: Path, gpus: int
) -> None:
    body = created_through_the_sdk(engine, workspace, gpus, tmp_path)
    sent = body["HostConfig"]["DeviceRequests"]  # type: ignore[index]
    assert sent == [
        {"Driver": "", "Count": gpus, "DeviceIDs": None, "Capabilities": [["gpu"]], "Options": {}}
    ]
    assert sent == cli_device_requests(engine, gpus)
    # The rest of the sandbox stays as without GPUs: no other device, no privilege.
    host = body["HostConfig"]  # type: ignore[index]
    assert "Devices" not in host and "Privileged" not in host and host["CapDrop"] == ["ALL"]
    assert (host["NetworkMode"], host["ReadonlyRootfs"]) == ("none", True)


def test_no_gpus_no_device_request(
    engine: EngineDouble, workspace: dict[str, Path], tmp_path: Path
) -> None:
    body = created_through_the_sdk(engine, workspace, 0, tmp_path)
    assert body["HostConfig"]["DeviceRequests"] == []  # type: ignore[index]


def test_an_engine_without_the_nvidia_runtime_fails_the_run_before_training(
    base_image: str, workspace: dict[str, Path], run_name: str, tmp_path: Path
) -> None:
    """The real dockerd (no NVIDIA Container Toolkit here) refuses the GPU request at start:
    a ContainerError naming gpus and the toolkit, nothing run, the container removed (the
    ``run_name`` fixture checks) and the outputs folder and log file kept for the builder."""
    marker = workspace["outputs"] / "trained"
    log_path = tmp_path / "logs" / "training.log"
    spec = dataclasses.replace(
        sandbox(base_image, workspace, ["touch", str(marker)], timeout_s=60, name=run_name),
        gpus=1,
        log_path=log_path,
    )
    with pytest.raises(ContainerError) as refused:
        run_training_container(spec, lambda line: None)
    assert str(refused.value) == (
        "gpus: 1 GPUs asked for, but this machine's Docker engine cannot pass GPUs: the NVIDIA "
        "Container Toolkit is missing or not configured for Docker (the engine answered: "
        f"{refused.value.__cause__}); the job was not started"
    )
    assert 'could not select device driver "" with capabilities: [[gpu]]' in str(refused.value)
    assert workspace["outputs"].is_dir() and not marker.exists()
    assert log_path.exists()


def test_the_double_records_json_bodies(engine: EngineDouble) -> None:
    """The double itself: a body it records is the JSON sent (a test of the test tool)."""
    import http.client
    import socket as sockets

    class UnixConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM)
            self.sock.connect(str(engine.socket))

    connection = UnixConnection("localhost")
    connection.request("POST", "/v1.43/containers/create", body=json.dumps({"Image": "x"}))
    assert connection.getresponse().status == 201
    connection.close()
    assert engine.create_bodies() == [{"Image": "x"}]
