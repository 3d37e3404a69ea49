"""``examples/lineage``: pretrain -> fine-tune -> evaluate, three certified runs on the local
platform (real swtpm, Docker, Prefect server), driven by ``run_lineage.py`` as ``make
demo-lineage`` runs it; the evaluation's report shows the chain back to the pretraining data
and its certified accuracy."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import ModuleType

import pytest

import aicert
from aicert.policy import LineageRoot
from tests import REPO_ROOT
from tests.examples import load_driver

pytestmark = [pytest.mark.docker, pytest.mark.swtpm, pytest.mark.slow]

EXAMPLE = REPO_ROOT / "examples" / "lineage"


def driver() -> ModuleType:
    return load_driver(EXAMPLE / "run_lineage.py")


def test_lineage_example_certifies_and_verifies_the_chain(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    prefect_api_url: str,
    base_image: str,
    capfd: pytest.CaptureFixture[str],
) -> None:
    home = tmp_path / "aicert-home"
    monkeypatch.setenv("AICERT_HOME", str(home))
    monkeypatch.setenv("PREFECT_API_URL", prefect_api_url)
    work = driver().main(tmp_path / "demo")  # each `aicert` call checked (exit 0)
    printed = capfd.readouterr().out
    assert "VERIFIED" in printed and "Lineage" in printed and "accuracy" in printed

    runs = {stage: aicert.load(work / "runs" / f"{stage}.proof.json") for stage in driver().STAGES}
    report = runs["evaluate"].verify(
        trusted_roots=[home / "platform-ca" / "platform-ca.cert.pem"],
        allow_dev_platform=True,
        parents=[runs["finetune"], runs["pretrain"]],
        require_lineage=True,
        expected_metrics=["accuracy>=0.8"],
    )
    assert report.metrics["examples"] == 30.0
    model_link = next(link for link in report.lineage if link.destination == "model/model.json")
    assert model_link.parent is not None and model_link.parent.run_id == runs["finetune"].run.id
    (base_link,) = model_link.parent.links
    assert base_link.parent is not None and base_link.parent.run_id == runs["pretrain"].run.id
    pretrain_data = hashlib.sha256((EXAMPLE / "data" / "pretrain.csv").read_bytes()).hexdigest()
    assert ("data/pretrain.csv", pretrain_data) in base_link.parent.resources

    # the demo's policy (checked by its `aicert verify --policy`): the chain's root is the
    # pretraining run; the same chain under a policy naming another root is refused
    policy = aicert.load_policy(work / "policy.json")
    assert policy.lineage_root is not None
    assert policy.lineage_root.run_id == runs["pretrain"].run.id
    policy.check(report)
    elsewhere = policy.model_copy(update={"lineage_root": LineageRoot(run_id="another-run")})
    with pytest.raises(aicert.PolicyError, match="lineage_root: run another-run"):
        elsewhere.check(report)
