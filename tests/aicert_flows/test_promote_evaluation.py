"""``verify-and-promote`` with a policy and a certified evaluation, on real runs (local platform:
swtpm, Docker, the Prefect server): a training run, then an evaluation run that takes its model
as a certified input and certifies ``metrics.json``. The model is promoted only beside an
evaluation that verifies, links to it and meets the thresholds; the record lists both."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from aicert.errors import LineageUnusedParentError, PolicyError
from aicert.flows.flows import certify_training
from aicert.flows.promote import (
    CERTIFICATE_FILE,
    EVALUATION_FILE,
    EVALUATION_REPORT_FILE,
    EvaluationRequiredError,
    verify_and_promote,
)
from aicert.lineage import certificate_sha256
from aicert.model import load

from .conftest import TRAIN_SCRIPT, make_git_repo, training_config, unique_project, write_config
from .test_promote import Certified, _published

pytestmark = [pytest.mark.docker, pytest.mark.swtpm, pytest.mark.slow]

# The evaluation reads the certified model and scores it on a held-out line: y = 3x/10 + 1.
EVALUATE_SCRIPT = """\
import json, pathlib
model = json.loads(pathlib.Path("/workspace/resources/model/model.json").read_text())
held_out = [(x / 10 + 0.05, 3 * (x / 10 + 0.05) + 1) for x in range(20)]
close = sum(abs(model["a"] * x + model["b"] - y) < 0.5 for x, y in held_out)
metrics = {"accuracy": close / len(held_out), "examples": len(held_out)}
pathlib.Path("/workspace/outputs/metrics.json").write_text(json.dumps(metrics))
print("evaluated", metrics, flush=True)
"""


@dataclass(frozen=True)
class Evaluated:
    model: Certified
    evaluation_bom: Path

    @property
    def training(self) -> dict[str, Any]:
        return self.model.result

    def arguments(self, registry: Path, **extra: Any) -> dict[str, Any]:
        """The training run's ``aicert.certificate.created`` parameters, and ``extra``."""
        return self.model.promotion_arguments(registry) | extra


@pytest.fixture(scope="module")
def evaluated(
    tmp_path_factory: pytest.TempPathFactory, prefect_api_url: str, base_image: str
) -> Evaluated:
    root = tmp_path_factory.mktemp("promote-evaluation")
    home = root / "aicert-home"
    make_git_repo(root / "train", {"train.py": TRAIN_SCRIPT})
    make_git_repo(root / "evaluate", {"train.py": EVALUATE_SCRIPT})
    train = write_config(root / "train.yaml", training_config(unique_project("model"), "train"))
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("AICERT_HOME", str(home))
        training = certify_training(
            config_path=str(train), output_bom=str(root / "model.proof.json")
        )
        model_file = Path(training["workspace"]) / "outputs" / "model.json"
        resource = {
            "type": "file",
            "url": model_file.as_uri(),
            "destinationPath": "model/model.json",
            "certifiedBy": {"certificate": "model.proof.json", "output": "model.json"},
        }
        config = training_config(
            unique_project("evaluation"), "evaluate", resources=[resource], results="metrics.json"
        )
        evaluate = write_config(root / "evaluate.yaml", config)
        certify_training(config_path=str(evaluate), output_bom=str(root / "evaluate.proof.json"))
    return Evaluated(Certified(home, training), root / "evaluate.proof.json")


def test_promoted_beside_its_certified_evaluation(evaluated: Evaluated, tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    policy = tmp_path / "evaluation-policy.yaml"
    policy.write_text("version: aicert-policy/v1\nmetrics:\n  - accuracy>=0.9\n  - examples==20\n")

    promoted = verify_and_promote(
        **evaluated.arguments(
            registry,
            policy={"platforms": ["local"]},
            evaluation_certificate=str(evaluated.evaluation_bom),
            evaluation_policy=str(policy),
        )
    )

    evaluation = load(evaluated.evaluation_bom)
    record = promoted["evaluation"]
    assert promoted["certificate_sha256"] == evaluated.training["certificate"]["sha256"]
    assert record["run_id"] == evaluation.run.id
    digest = hashlib.sha256(evaluated.evaluation_bom.read_bytes()).hexdigest()
    assert record["certificate_sha256"] == digest
    assert record["metrics"] == {"accuracy": 1.0, "examples": 20.0}
    folder = Path(promoted["registry_path"])
    files = _published(registry)
    for name in (CERTIFICATE_FILE, EVALUATION_FILE, EVALUATION_REPORT_FILE):
        assert str((folder / name).relative_to(registry)) in files
    report = json.loads((folder / EVALUATION_REPORT_FILE).read_text())
    (link,) = report["lineage"]
    assert link["verified"] and link["run_id"] == evaluated.training["run_id"]
    model_certificate = load(evaluated.training["certificate"]["path"])
    assert link["certificate_sha256"] == certificate_sha256(model_certificate)


def test_an_evaluation_below_the_threshold_is_refused(evaluated: Evaluated, tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    arguments = evaluated.arguments(
        registry,
        evaluation_certificate=str(evaluated.evaluation_bom),
        evaluation_policy={"metrics": ["accuracy>1"]},
    )
    with pytest.raises(PolicyError, match=r"metrics: metric 'accuracy': certified value 1"):
        verify_and_promote(**arguments)
    assert _published(registry) == []


def test_an_evaluation_of_another_model_is_refused(evaluated: Evaluated, tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    # the model's own certificate evaluates nothing: it links to no certificate
    arguments = evaluated.arguments(
        registry, evaluation_certificate=evaluated.training["certificate"]["path"]
    )
    with pytest.raises(LineageUnusedParentError):
        verify_and_promote(**arguments)
    assert _published(registry) == []


def test_the_model_policy_is_checked(evaluated: Evaluated, tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    arguments = evaluated.arguments(registry, policy={"platforms": ["qemu"]})
    with pytest.raises(PolicyError, match="platforms: local is not one of qemu"):
        verify_and_promote(**arguments)
    assert _published(registry) == []


def test_thresholds_without_an_evaluation_are_refused(evaluated: Evaluated, tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    arguments = evaluated.arguments(registry, evaluation_policy={"metrics": ["accuracy>=0.9"]})
    with pytest.raises(EvaluationRequiredError):
        verify_and_promote(**arguments)
    assert _published(registry) == []


def test_a_policy_file_with_an_unknown_key_is_refused(evaluated: Evaluated, tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    policy = tmp_path / "policy.yaml"
    policy.write_text("platforms: [local]\nallow_unsigned: true\n")
    with pytest.raises(ValueError, match="allow_unsigned: unknown key"):
        verify_and_promote(**evaluated.arguments(registry, policy=str(policy)))
    assert _published(registry) == []
