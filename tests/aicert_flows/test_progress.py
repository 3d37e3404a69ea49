"""Large outputs show hashing progress as a Prefect progress artifact while they are hashed."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from aicert.flows.flows import certify_training

from .conftest import (
    flush_prefect_workers,
    make_git_repo,
    training_config,
    unique_project,
    write_config,
)

# A 3 GiB sparse file: written instantly by the job, hashed in about two seconds.
BIG_OUTPUT_SCRIPT = """
import pathlib
with open("/workspace/outputs/weights.bin", "wb") as handle:
    handle.truncate(3 * 1024 ** 3)
pathlib.Path("/workspace/outputs/small.txt").write_text("ok\\n")
print("wrote a 3 GiB sparse weights file", flush=True)
"""


def test_hashing_large_outputs_creates_a_progress_artifact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_api_url: str, base_image: str
) -> None:
    project = unique_project("progress")
    make_git_repo(tmp_path / "project", {"train.py": BIG_OUTPUT_SCRIPT})
    config = write_config(tmp_path / "aicert.yaml", training_config(project, "project"))
    monkeypatch.setenv("AICERT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("AICERT_PROGRESS_MIN_BYTES", str(1024**3))
    monkeypatch.setenv("AICERT_PROGRESS_POLL_S", "0.05")

    state = certify_training(config_path=str(config), return_state=True)
    assert state.is_completed(), state.message
    flush_prefect_workers()

    key = f"aicert-{project}-hashing-outputs"
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )
        inputs = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[f"aicert-{project}-hashing-inputs"])
            )
        )
    assert len(artifacts) == 1, f"no progress artifact {key}"
    assert artifacts[0].type == "progress"
    assert float(artifacts[0].data) == 100.0
    assert artifacts[0].description == "hashing outputs"
    # The inputs were a few bytes: no progress bar for them.
    assert inputs == []
