"""What the flow-run artifacts show, from values alone: where the link points, how inputs are
named. (The artifacts of a real run are checked in test_certify_flow.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from aicert.flows.artifacts import CertificateLocation, artifact_key, input_label
from aicert.model import InputRecord

SHA = "ab" * 32


def _location(storage_url: str, output_bom: str | None) -> CertificateLocation:
    return CertificateLocation(
        path=output_bom or "/home/u/.aicert/runs/r/certificate.json",
        storage_url=storage_url,
        output_bom=output_bom,
        sha256=SHA,
    )


def test_the_link_prefers_remote_result_storage() -> None:
    link, text = _location("s3://bucket/aicert/r/certificate.json", "/srv/proof.json").best_link()
    assert link == "s3://bucket/aicert/r/certificate.json"
    assert SHA[:12] in text


def test_with_local_storage_the_link_is_the_path_the_user_gave(tmp_path: Path) -> None:
    bom = tmp_path / "proof.json"
    link, text = _location("file:///tmp/storage/aicert/r/certificate.json", str(bom)).best_link()
    assert link == bom.resolve().as_uri()
    assert str(bom) in text and SHA[:12] in text


def test_without_an_output_path_the_link_is_the_local_storage() -> None:
    url = "file:///tmp/storage/aicert/r/certificate.json"
    link, text = _location(url, None).best_link()
    assert link == url and "local result storage" in text


def _input(kind: str, name: str, uri: str | None, version: str | None) -> InputRecord:
    return InputRecord(kind=kind, name=name, uri=uri, version=version, digest={"sha256": SHA})


@pytest.mark.parametrize(
    ("record", "label"),
    [
        (
            _input("source", "checkout", "https://github.com/org/flowers.git", "v1.2"),
            "https://github.com/org/flowers.git @ v1.2",
        ),
        (
            _input("source", "checkout", "https://github.com/org/flowers.git", None),
            "https://github.com/org/flowers.git",
        ),
        (_input("package", "numpy", None, "2.1.0"), "numpy 2.1.0"),
        (_input("config", "aicert.yaml", None, None), "aicert.yaml"),
    ],
)
def test_inputs_are_named_by_repository_or_name(record: InputRecord, label: str) -> None:
    assert input_label(record) == label


def test_artifact_keys_are_what_prefect_accepts() -> None:
    assert artifact_key("Flowers_Example", "certificate") == "aicert-flowers-example-certificate"
    assert len(artifact_key("x" * 200, "bom")) == 100
