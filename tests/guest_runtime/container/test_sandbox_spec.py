"""The sandbox specification: built from a run's configuration in one place (no Docker)."""

from __future__ import annotations

from pathlib import Path

from aicert.guest_runtime.config import parse_config
from aicert.guest_runtime.container import (
    CONTAINER_TMP,
    RUN_LABEL,
    WORKSPACE_OUTPUTS,
    SandboxSpec,
)

CONFIG = {
    "source": {"gitRepo": "https://example.org/repo.git", "tag": "v1"},
    "command": ["python3", "train.py", "--epochs", "2"],
    "outputs": {"path": "/workspace/out", "minFiles": 1},
    "limits": {"cpus": 1.5, "memory": "2g", "timeoutSeconds": 90, "pids": 77},
    "gpus": 2,
    "env": {"SEED": "7"},
}


def test_a_runs_sandbox_comes_from_its_configuration(tmp_path: Path) -> None:
    spec = SandboxSpec.for_run(
        parse_config(CONFIG),
        image="sha256:abc",
        run_id="run-1",
        source_dir=tmp_path / "checkout",
        workspace=tmp_path,
        log_path=tmp_path / "logs" / "training.log",
    )
    assert spec.command == ("python3", "train.py", "--epochs", "2")
    assert (spec.resources_dir, spec.outputs_dir) == (tmp_path / "resources", tmp_path / "outputs")
    assert spec.outputs_mount == "/workspace/out"
    assert (spec.cpu_limit, spec.memory_limit, spec.pids_limit) == (1.5, "2g", 77)
    assert (spec.timeout_s, spec.gpus, dict(spec.env)) == (90, 2, {"SEED": "7"})
    assert (spec.name, dict(spec.labels)) == ("aicert-run-1", {RUN_LABEL: "run-1"})


def test_the_sandbox_has_no_network_devices_capabilities_or_writable_root(tmp_path: Path) -> None:
    spec = SandboxSpec(
        image="img",
        command=("true",),
        source_dir=tmp_path,
        resources_dir=tmp_path,
        outputs_dir=tmp_path,
        timeout_s=5,
        env={"HOME": "/elsewhere"},
    )
    folders = (tmp_path / "s", tmp_path / "r", tmp_path / "o")
    args = spec.create_args("sha256:abc", folders)
    assert args["network_mode"] == "none"
    assert (args["devices"], args["device_requests"]) == ([], [])
    assert args["cap_drop"] == ["ALL"] and args["read_only"] is True
    assert args["privileged"] is False and args["security_opt"] == ["no-new-privileges"]
    assert args["environment"] == {"HOME": "/elsewhere", "PYTHONUNBUFFERED": "1"}
    assert list(args["tmpfs"]) == [CONTAINER_TMP]
    assert "nano_cpus" not in args and "mem_limit" not in args
    mounts = args["mounts"]
    assert [(m["Target"], m["ReadOnly"]) for m in mounts] == [
        ("/workspace/src", True),
        ("/workspace/resources", True),
        (WORKSPACE_OUTPUTS, False),
    ]
    assert args["labels"][RUN_LABEL].startswith("aicert-")
