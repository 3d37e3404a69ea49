"""Fixtures for the guest runtime's container tests: a real Docker engine and base image."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from aicert.guest_runtime.container import DEFAULT_PIDS_LIMIT, RUN_LABEL, SandboxSpec
from aicert.tasks.platforms.base_image import ensure_base_image


@pytest.fixture(scope="session")
def docker_client() -> docker.DockerClient:
    client = docker.from_env()
    client.ping()
    return client


@pytest.fixture(scope="session")
def base_image(docker_client: docker.DockerClient) -> str:
    """The offline Python base image (built once, about a minute, then reused)."""
    return ensure_base_image()


def containers_with_run_label(value: str) -> list[str]:
    completed = subprocess.run(
        ["docker", "ps", "-a", "-q", "--filter", f"label={RUN_LABEL}={value}"],
        check=True,
        capture_output=True,
        text=True,
    )
    return completed.stdout.split()


@pytest.fixture
def run_name() -> Iterator[str]:
    """A unique container name (also its ``aicert.run`` label); none may be left afterwards."""
    name = f"aicert-test-{uuid.uuid4().hex[:12]}"
    yield name
    assert containers_with_run_label(name) == [], f"container {name} was left behind"


@pytest.fixture
def workspace(tmp_path: Path) -> dict[str, Path]:
    folders = {role: tmp_path / role for role in ("src", "resources", "outputs")}
    for folder in folders.values():
        folder.mkdir()
    return folders


def sandbox(
    image: str,
    workspace: dict[str, Path],
    command: list[str],
    *,
    timeout_s: float,
    outputs_dir: Path | None = None,
    cpu_limit: float | None = None,
    memory_limit: str | None = None,
    pids_limit: int = DEFAULT_PIDS_LIMIT,
    name: str | None = None,
    log_path: Path | None = None,
) -> SandboxSpec:
    """A sandbox over the ``workspace`` fixture's folders (``outputs_dir`` replaces its own)."""
    return SandboxSpec(
        image=image,
        command=tuple(command),
        source_dir=workspace["src"],
        resources_dir=workspace["resources"],
        outputs_dir=outputs_dir or workspace["outputs"],
        timeout_s=timeout_s,
        cpu_limit=cpu_limit,
        memory_limit=memory_limit,
        pids_limit=pids_limit,
        name=name,
        log_path=log_path,
    )
