"""``certifiedBy`` on a resource: parsed strictly, resolved relative to the config, measured
only when present, and refused by the agent unless the orchestrator resolved it."""

from __future__ import annotations

from pathlib import Path

import pytest

from aicert.appevents import CertifiedResourceEvent, ResourceEvent
from aicert.guest_runtime.config import (
    ConfigError,
    RunConfig,
    load_config,
    resolve_certificate_paths,
)
from aicert.guest_runtime.errors import InputMismatchError
from aicert.guest_runtime.input_measurement import _resource_event

CONFIG = """\
kind: python
source:
  type: git
  gitRepo: https://example.invalid/finetune.git
  tag: v1.0
resources:
  - url: https://models.example.org/pretrain/model.json
    destinationPath: base/model.json
    certifiedBy:
      certificate: {certificate}
      output: {output}
"""
DIGEST = "cd" * 32


def config_with(
    tmp_path: Path, certificate: str = "runs/pretrain.proof.json", output: str = "model.json"
) -> RunConfig:
    path = tmp_path / "aicert.yaml"
    path.write_text(CONFIG.format(certificate=certificate, output=output))
    return load_config(path)


def test_certified_by_is_parsed_and_measured(tmp_path: Path) -> None:
    config = config_with(tmp_path)
    link = config.resources[0].certified_by
    assert link is not None and link.output == "model.json" and not link.resolved
    measured = config.measured_form()["resources"][0]["certifiedBy"]
    assert measured["certificate"] == "runs/pretrain.proof.json"


def test_a_plain_resource_measures_without_the_key(tmp_path: Path) -> None:
    config = config_with(tmp_path)
    plain = config.resources[0].model_copy(update={"certified_by": None})
    form = config.model_copy(update={"resources": [plain]}).measured_form()
    assert "certifiedBy" not in form["resources"][0]


def test_relative_certificate_resolved_against_the_config_folder(tmp_path: Path) -> None:
    config = resolve_certificate_paths(config_with(tmp_path), tmp_path)
    link = config.resources[0].certified_by
    assert link is not None
    assert link.certificate == str(tmp_path / "runs" / "pretrain.proof.json")
    url = config_with(tmp_path, certificate="https://certs.example.org/p.json")
    resolved = resolve_certificate_paths(url, tmp_path).resources[0].certified_by
    assert resolved is not None and resolved.certificate == "https://certs.example.org/p.json"


@pytest.mark.parametrize(
    ("certificate", "output", "problem"),
    [
        ("ftp://certs.example.org/p.json", "model.json", "http:// or https://"),
        ("p.json", "../model.json", "must not contain '..'"),
        ("p.json", "/abs/model.json", "must be relative"),
    ],
)
def test_invalid_links_are_refused_naming_the_field(
    tmp_path: Path, certificate: str, output: str, problem: str
) -> None:
    with pytest.raises(ConfigError, match="certifiedBy") as caught:
        config_with(tmp_path, certificate=certificate, output=output)
    assert problem in str(caught.value)


def test_unknown_key_in_certified_by_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "aicert.yaml"
    path.write_text(CONFIG.format(certificate="p.json", output="model.json") + "      digest: x\n")
    with pytest.raises(ConfigError, match=r"certifiedBy\.digest.*unknown field"):
        load_config(path)


def test_agent_refuses_an_unresolved_link(tmp_path: Path) -> None:
    resource = config_with(tmp_path).resources[0].model_copy(update={"sha256": DIGEST})
    with pytest.raises(InputMismatchError, match="was not verified by the orchestrator"):
        _resource_event(resource, DIGEST, 10)


def test_agent_binds_a_resolved_link(tmp_path: Path) -> None:
    resource = config_with(tmp_path).resources[0]
    assert resource.certified_by is not None
    link = resource.certified_by.model_copy(
        update={"certificate_sha256": "ef" * 32, "run_id": "pretrain-20261203T000000Z-abcd"}
    )
    resolved = resource.model_copy(update={"sha256": DIGEST, "certified_by": link})
    event = _resource_event(resolved, DIGEST, 10)
    assert isinstance(event, CertifiedResourceEvent)
    assert event.to_event().type == "aicert.input.certified-resource"
    assert (event.certificate_sha256, event.run_id, event.output) == (
        "ef" * 32,
        "pretrain-20261203T000000Z-abcd",
        "model.json",
    )
    plain = resolved.model_copy(update={"certified_by": None})
    assert type(_resource_event(plain, DIGEST, 10)) is ResourceEvent
