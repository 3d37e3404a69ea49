"""``certify-evaluation`` on real runs (local platform: swtpm, Docker, the Prefect server): a
training run's certificate and model, evaluated by a certified run whose model is that
certificate's output; the events say which kind of run each certificate is, and
``aicert.evaluation.certified`` names both runs. A certificate other than the announced one,
or of another run, is refused before any machine starts; the model slot is named."""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import SyncPrefectClient

import aicert
from aicert.flows.evaluation import certify_evaluation, point_model_at
from aicert.flows.events import (
    CERTIFICATE_CREATED,
    CERTIFICATE_FAILED,
    EVALUATED_RUN_ROLE,
    EVALUATION_CERTIFIED,
    RUN_KIND_LABEL,
)
from aicert.flows.flows import certify_training
from aicert.guest_runtime.config import ConfigError, load_config
from aicert.tasks.platforms.local.provider import platform_ca_certificate_path

from .conftest import (
    TRAIN_SCRIPT,
    events_named,
    flush_prefect_workers,
    make_git_repo,
    run_ids_in,
    training_config,
    unique_project,
    wait_for,
    write_config,
)
from .test_promote_evaluation import EVALUATE_SCRIPT

pytestmark = [pytest.mark.docker, pytest.mark.swtpm, pytest.mark.slow]

# The model slot: where the evaluation reads the model, which output of the training run it
# is. The url and certificate are placeholders the flow replaces.
MODEL_SLOT = {
    "type": "file",
    "url": "https://models.invalid/model.json",
    "destinationPath": "model/model.json",
    "certifiedBy": {"certificate": "placeholder.proof.json", "output": "model.json"},
}


@dataclass(frozen=True)
class Trained:
    root: Path
    home: Path
    result: dict[str, Any]
    evaluation_config: Path

    def event_parameters(self, **overrides: object) -> dict[str, Any]:
        """What the training run's aicert.certificate.created gives certify-evaluation."""
        certificate = self.result["certificate"]
        return {
            "run_id": self.result["run_id"],
            "project": self.result["project"],
            "certificate_sha256": certificate["sha256"],
            "certificate_path": certificate["path"],
            "storage_url": certificate["storage_url"],
            "outputs_path": str(Path(self.result["workspace"]) / "outputs"),
            "config_path": str(self.evaluation_config),
            **overrides,
        }


def evaluation_config(root: Path, resources: list[dict[str, Any]]) -> Path:
    repo = root / "evaluate"
    if not repo.exists():
        make_git_repo(repo, {"train.py": EVALUATE_SCRIPT})
    config = training_config(
        unique_project("evaluation"), "evaluate", resources=resources, results="metrics.json"
    )
    return write_config(root / f"evaluate-{len(resources)}.yaml", config)


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory, prefect_api_url: str, base_image: str
) -> Trained:
    root = tmp_path_factory.mktemp("certify-evaluation")
    home = root / "aicert-home"
    make_git_repo(root / "train", {"train.py": TRAIN_SCRIPT})
    train = write_config(root / "train.yaml", training_config(unique_project("model"), "train"))
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("AICERT_HOME", str(home))
        result = certify_training(config_path=str(train), output_bom=str(root / "model.proof.json"))
    return Trained(root, home, result, evaluation_config(root, [MODEL_SLOT]))


@pytest.fixture(scope="module")
def evaluated(trained: Trained) -> dict[str, Any]:
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("AICERT_HOME", str(trained.home))
        return certify_evaluation(
            **trained.event_parameters(), output_bom=str(trained.root / "evaluate.proof.json")
        )


def test_the_new_model_is_evaluated_by_a_certified_run(
    trained: Trained, evaluated: dict[str, Any]
) -> None:
    assert evaluated["metrics"] == {"accuracy": 1.0, "examples": 20.0}
    training_bom = Path(trained.result["certificate"]["path"])
    report = aicert.load(evaluated["certificate"]["path"]).verify(
        trusted_roots=[platform_ca_certificate_path(trained.home)],
        allow_dev_platform=True,
        parents=[training_bom],
        require_lineage=True,
        expected_metrics=["accuracy>=1"],
    )
    (link,) = report.lineage
    assert link.verified and link.run_id == trained.result["run_id"]
    assert (link.destination, link.output) == ("model/model.json", "model.json")
    record = evaluated["evaluated"]
    assert record["run_id"] == trained.result["run_id"]
    assert record["certificate_sha256"] == hashlib.sha256(training_bom.read_bytes()).hexdigest()
    assert record["model_output"] == "model.json"


def test_each_certificate_event_names_its_kind_of_run(
    trained: Trained, evaluated: dict[str, Any], client: SyncPrefectClient
) -> None:
    flush_prefect_workers()
    kinds = {}
    for run in (trained.result, evaluated):
        (created,) = wait_for(
            lambda run=run: events_named(
                client, CERTIFICATE_CREATED, f"aicert.run.{run['run_id']}"
            ),
            timeout_s=30,
            what=f"aicert.certificate.created of {run['run_id']}",
        )
        kinds[run["run_id"]] = (created.resource.get(RUN_KIND_LABEL), created.payload["kind"])
    assert kinds == {
        trained.result["run_id"]: ("training", "training"),
        evaluated["run_id"]: ("evaluation", "evaluation"),
    }


def test_evaluation_certified_names_both_runs(
    trained: Trained, evaluated: dict[str, Any], client: SyncPrefectClient
) -> None:
    flush_prefect_workers()
    (event,) = wait_for(
        lambda: events_named(client, EVALUATION_CERTIFIED, f"aicert.run.{evaluated['run_id']}"),
        timeout_s=30,
        what="aicert.evaluation.certified",
    )
    assert event.resource.get(RUN_KIND_LABEL) == "evaluation"
    roles = {related.role: related.id for related in event.related}
    assert roles[EVALUATED_RUN_ROLE] == f"aicert.run.{trained.result['run_id']}"
    assert roles["project"] == f"aicert.project.{evaluated['project']}"
    payload = event.payload
    assert payload["certificate_sha256"] == evaluated["certificate"]["sha256"]
    assert payload["storage_url"] == evaluated["certificate"]["storage_url"]
    assert payload["metrics"] == {"accuracy": 1.0, "examples": 20.0}
    assert payload["evaluated"]["certificate_sha256"] == trained.result["certificate"]["sha256"]
    assert payload["evaluated"]["certificate_path"] == trained.result["certificate"]["path"]


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        pytest.param({"certificate_sha256": "0" * 64}, "CertificateDigestError", id="digest"),
        pytest.param(
            {"run_id": "someone-else-20260101T000000Z-00000000"},
            "RunMismatchError",
            id="another-run",
        ),
    ],
)
def test_a_certificate_not_the_announced_one_is_refused_before_any_machine(
    trained: Trained,
    client: SyncPrefectClient,
    monkeypatch: pytest.MonkeyPatch,
    overrides: dict[str, str],
    error: str,
) -> None:
    monkeypatch.setenv("AICERT_HOME", str(trained.home))
    runs_before = run_ids_in(trained.home)
    state = certify_evaluation(**trained.event_parameters(**overrides), return_state=True)
    assert state.is_failed()
    assert error in repr(state.result(raise_on_failure=False))
    assert run_ids_in(trained.home) == runs_before  # no machine was provisioned
    flush_prefect_workers()
    flow_run_id = str(state.state_details.flow_run_id)
    (failed,) = wait_for(
        lambda: events_named(client, CERTIFICATE_FAILED, f"aicert.run.unassigned-{flow_run_id}"),
        timeout_s=30,
        what="aicert.certificate.failed of the refused evaluation",
    )
    assert failed.resource.get(RUN_KIND_LABEL) == "evaluation"
    assert failed.payload["kind"] == "evaluation"


def test_the_model_slot_is_named(trained: Trained, tmp_path: Path) -> None:
    certificate = Path(trained.result["certificate"]["path"])
    outputs = Path(trained.result["workspace"]) / "outputs"
    none = load_config(evaluation_config(tmp_path, []))
    with pytest.raises(ConfigError, match=r"this configuration has 0 .*add one"):
        point_model_at(none, certificate, outputs)
    second = {**copy.deepcopy(MODEL_SLOT), "destinationPath": "other/model.json"}
    two = load_config(evaluation_config(tmp_path, [MODEL_SLOT, second]))
    with pytest.raises(ConfigError, match=r"has 2 .*name the model's with model_resource"):
        point_model_at(two, certificate, outputs)
    pointed, output, model = point_model_at(two, certificate, outputs, "other/model.json")
    assert pointed.resources[0] == two.resources[0]  # the other slot untouched
    assert pointed.resources[1].url == model.resolve().as_uri() and output == "model.json"
    assert pointed.resources[1].certified_by is not None
    assert pointed.resources[1].certified_by.certificate == str(certificate)
    with pytest.raises(ConfigError, match="model_resource 'absent': no resource"):
        point_model_at(two, certificate, outputs, "absent")
    with pytest.raises(ConfigError, match=r"resources\[model/model.json\]: .* not on this host"):
        point_model_at(load_config(trained.evaluation_config), certificate, tmp_path / "nothing")
