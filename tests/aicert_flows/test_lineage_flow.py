"""Certified inputs end to end on the local platform (real swtpm, Docker, Prefect server): a
fine-tune takes the pretraining run's certified model as a ``certifiedBy`` resource, its
certificate links back to the pretraining certificate, and a swapped base model file stops
the run before training, naming the resource."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client

import aicert
from aicert.errors import LineageMissingParentError
from aicert.flows.flows import certify_training
from aicert.lineage import certificate_sha256
from aicert.tasks.platforms.local.provider import platform_ca_certificate_path

from .conftest import (
    TRAIN_SCRIPT,
    flush_prefect_workers,
    make_git_repo,
    task_runs_of,
    training_config,
    unique_project,
    write_config,
)

pytestmark = [pytest.mark.docker, pytest.mark.swtpm, pytest.mark.slow]

# The fine-tune reads the base model it was given and continues from it.
FINETUNE_SCRIPT = """\
import json, pathlib
base = json.loads(pathlib.Path("/workspace/resources/base/model.json").read_text())
model = {"a": base["a"] * 0.5, "b": base["b"], "base": base}
pathlib.Path("/workspace/outputs/model.json").write_text(json.dumps(model))
print("training-marker: fine-tuned", flush=True)
"""


@dataclass(frozen=True)
class Lineage:
    root: Path
    home: Path
    pretrain_bom: Path
    pretrain_outputs: Path


def certify(config_path: Path, bom: Path, outputs: Path | None = None) -> Any:
    return certify_training(
        config_path=str(config_path),
        output_bom=str(bom),
        outputs_dir=str(outputs) if outputs else None,
        return_state=True,
    )


@pytest.fixture(scope="module")
def pretrained(
    tmp_path_factory: pytest.TempPathFactory, prefect_api_url: str, base_image: str
) -> Any:
    root = tmp_path_factory.mktemp("lineage")
    home = root / "aicert-home"
    repo = make_git_repo(root / "pretrain", {"train.py": TRAIN_SCRIPT})
    config = write_config(
        root / "pretrain.yaml", training_config(unique_project("pretrain"), str(repo))
    )
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("AICERT_HOME", str(home))
        state = certify(config, root / "runs" / "pretrain.proof.json", root / "pretrain-model")
    assert state.is_completed(), state.message
    yield Lineage(root, home, root / "runs" / "pretrain.proof.json", root / "pretrain-model")


def finetune_config(lineage: Lineage, model_file: Path, name: str) -> Path:
    repo = lineage.root / name
    if not repo.exists():
        make_git_repo(repo, {"train.py": FINETUNE_SCRIPT})
    resources = [
        {
            "type": "file",
            "url": model_file.as_uri(),
            "destinationPath": "base/model.json",
            "certifiedBy": {"certificate": "runs/pretrain.proof.json", "output": "model.json"},
        }
    ]
    config = training_config(unique_project(name), str(repo), resources=resources)
    return write_config(lineage.root / f"{name}.yaml", config)


def test_finetune_links_back_to_the_pretraining_certificate(
    pretrained: Lineage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AICERT_HOME", str(pretrained.home))
    config = finetune_config(pretrained, pretrained.pretrain_outputs / "model.json", "finetune")
    bom = pretrained.root / "runs" / "finetune.proof.json"
    state = certify(config, bom)
    assert state.is_completed(), state.message
    child = aicert.load(bom)
    roots = [platform_ca_certificate_path(pretrained.home)]
    report = child.verify(
        trusted_roots=roots,
        allow_dev_platform=True,
        parents=[pretrained.pretrain_bom],
        require_lineage=True,
    )
    (link,) = report.lineage
    parent = aicert.load(pretrained.pretrain_bom)
    assert link.verified and link.run_id == parent.run.id
    assert link.certificate_sha256 == certificate_sha256(parent)
    assert link.output == "model.json" and link.destination == "base/model.json"
    with pytest.raises(LineageMissingParentError):
        child.verify(trusted_roots=roots, allow_dev_platform=True, require_lineage=True)


def test_swapped_base_model_is_refused_before_training(
    pretrained: Lineage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AICERT_HOME", str(pretrained.home))
    swapped = pretrained.root / "swapped" / "model.json"
    swapped.parent.mkdir()
    swapped.write_text('{"a": 3.0, "b": 1.0}')
    config = finetune_config(pretrained, swapped, "swapped-finetune")
    state = certify(config, pretrained.root / "runs" / "swapped.proof.json")
    assert state.is_failed()
    message = str(state.message) + repr(state.result(raise_on_failure=False))
    assert "resources[base/model.json]" in message, message
    assert "certifies model.json as" in message, message
    flush_prefect_workers()
    with get_client(sync_client=True) as client:
        names = {t.name for t in task_runs_of(client, state.state_details.flow_run_id)}
    assert "verify-certified-inputs" in names
    assert "run-training" not in names, sorted(names)
    assert not (pretrained.root / "runs" / "swapped.proof.json").exists()
