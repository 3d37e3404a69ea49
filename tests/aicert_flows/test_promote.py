"""``verify-and-promote`` in this process, on a run certified by ``certify-training`` (local
platform, real swtpm and Docker): the model is published only when its certificate verifies
and the event's claims are the certificate's; a refusal leaves the registry empty.

(The event-triggered path through a worker is tested in ``tests/deployments``.)"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from aicert.flows.flows import certify_training
from aicert.flows.promote import (
    CERTIFICATE_FILE,
    MODEL_FOLDER,
    REPORT_FILE,
    STAGING_FOLDER,
    CertificateDigestError,
    RunMismatchError,
    verify_and_promote,
)
from aicert.tasks.platforms.local.provider import platform_ca_certificate_path

from .conftest import TRAIN_SCRIPT, make_git_repo, training_config, unique_project, write_config


@dataclass
class Certified:
    home: Path
    result: dict[str, Any]

    def promotion_arguments(self, registry: Path) -> dict[str, Any]:
        """What the ``aicert.certificate.created`` event hands the promotion flow."""
        certificate = self.result["certificate"]
        return {
            "certificate_path": certificate["path"],
            "storage_url": certificate["storage_url"],
            "certificate_sha256": certificate["sha256"],
            "run_id": self.result["run_id"],
            "project": self.result["project"],
            "outputs_path": str(Path(self.result["workspace"]) / "outputs"),
            "registry": str(registry),
            "trusted_roots": [str(platform_ca_certificate_path(self.home))],
            "allow_dev_platform": True,
            "reference_values": [],
        }


@pytest.fixture(scope="module")
def certified(
    tmp_path_factory: pytest.TempPathFactory, prefect_api_url: str, base_image: str
) -> Certified:
    root = tmp_path_factory.mktemp("promote")
    make_git_repo(root / "project", {"train.py": TRAIN_SCRIPT})
    config = write_config(
        root / "aicert.yaml", training_config(unique_project("promote"), "project")
    )
    home = root / "aicert-home"
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("AICERT_HOME", str(home))
        result = certify_training(config_path=str(config), output_bom=str(root / "proof.json"))
    return Certified(home, result)


def _published(registry: Path) -> list[str]:
    return sorted(
        str(path.relative_to(registry))
        for path in registry.rglob("*")
        if path.is_file() and STAGING_FOLDER not in path.parts
    )


def test_a_verified_model_is_published(certified: Certified, tmp_path: Path) -> None:
    registry = tmp_path / "registry"

    promoted = verify_and_promote(**certified.promotion_arguments(registry))

    run_id, project = certified.result["run_id"], certified.result["project"]
    folder = registry / project / run_id
    assert promoted == {
        "run_id": run_id,
        "project": project,
        "registry_path": str(folder),
        "certificate_sha256": certified.result["certificate"]["sha256"],
        "evaluation": None,
    }
    assert _published(registry) == [
        f"{project}/{run_id}/{CERTIFICATE_FILE}",
        f"{project}/{run_id}/{MODEL_FOLDER}/metrics/loss.txt",
        f"{project}/{run_id}/{MODEL_FOLDER}/model.json",
        f"{project}/{run_id}/{REPORT_FILE}",
    ]
    report = json.loads((folder / REPORT_FILE).read_text())
    assert (report["run_id"], report["project"]) == (run_id, project)
    assert not any((registry / STAGING_FOLDER).iterdir())


def test_another_digest_than_announced_is_refused(certified: Certified, tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    arguments = certified.promotion_arguments(registry) | {"certificate_sha256": "0" * 64}

    with pytest.raises(CertificateDigestError):
        verify_and_promote(**arguments)

    assert _published(registry) == []


def test_an_event_naming_another_run_is_refused(certified: Certified, tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    arguments = certified.promotion_arguments(registry) | {"run_id": "someone-else"}

    with pytest.raises(RunMismatchError):
        verify_and_promote(**arguments)

    assert _published(registry) == []
