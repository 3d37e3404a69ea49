"""``examples/finetune``: the demo's digits network fine-tuned for a new domain, its base model
two pinned ``resources:`` (real swtpm, Docker, Prefect server on the local platform), driven by
``run_finetune.py`` as ``make demo-finetune`` runs it. A swapped base-model file is refused
before training with the pinned-digest error."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

import aicert
from aicert.guest_runtime.config import RunConfig
from tests import REPO_ROOT
from tests.examples import load_driver

EXAMPLE = REPO_ROOT / "examples" / "finetune"


def driver() -> ModuleType:
    return load_driver(EXAMPLE / "run_finetune.py")


def test_the_shipped_base_model_is_small_and_has_the_pinned_digests() -> None:
    pinned: dict[str, str] = driver().PINNED
    files = {path.name: path for path in (EXAMPLE / "base-model").iterdir()}
    assert set(files) == set(pinned)
    for name, path in files.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == pinned[name], name
        assert path.stat().st_size < 1_000_000, name


def test_the_config_is_valid_and_pins_every_base_model_file(tmp_path: Path) -> None:
    config = RunConfig.model_validate(driver().config(tmp_path))
    assert config.results == "metrics.json"
    assert {r.destination_path: r.sha256 for r in config.resources} == {
        f"base/{name}": digest for name, digest in driver().PINNED.items()
    }
    assert all(r.url.startswith(f"file://{tmp_path}/") for r in config.resources)


@pytest.mark.docker
@pytest.mark.swtpm
@pytest.mark.slow
def test_finetune_example_certifies_and_verifies_from_the_pinned_base_model(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    prefect_api_url: str,
    base_image: str,
    capfd: pytest.CaptureFixture[str],
) -> None:
    home = tmp_path / "aicert-home"
    monkeypatch.setenv("AICERT_HOME", str(home))
    monkeypatch.setenv("PREFECT_API_URL", prefect_api_url)
    example = driver()
    work = example.main(tmp_path / "demo")  # each `aicert` call checked (exit 0)
    printed = capfd.readouterr().out
    assert "VERIFIED" in printed and "2 expected inputs match" in printed
    assert "accuracy>=0.8 met" in printed

    report = aicert.load(work / "proof.json").verify(
        trusted_roots=[home / "platform-ca" / "platform-ca.cert.pem"],
        allow_dev_platform=True,
        model=work / "outputs",
        expected_inputs={f"base/{name}": digest for name, digest in example.PINNED.items()},
        expected_metrics=["accuracy>=0.8"],
    )
    resources = {i.name: i.digest["sha256"] for i in report.inputs if i.kind == "resource"}
    assert resources == {f"base/{name}": digest for name, digest in example.PINNED.items()}
    # Fine-tuning helped on the new domain: the base network scored far lower there.
    assert report.metrics["accuracy"] > report.metrics["base_accuracy"] + 0.3


@pytest.mark.docker
@pytest.mark.swtpm
@pytest.mark.slow
def test_a_swapped_base_model_is_refused_before_training(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    prefect_api_url: str,
    base_image: str,
    capfd: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("AICERT_HOME", str(tmp_path / "aicert-home"))
    monkeypatch.setenv("PREFECT_API_URL", prefect_api_url)
    example = driver()
    swapped = tmp_path / "swapped-base"
    shutil.copytree(EXAMPLE / "base-model", swapped)
    # Another model in its place: the demo's weights, one byte changed.
    weights = bytearray((swapped / "model.npz").read_bytes())
    weights[-100] ^= 0xFF
    (swapped / "model.npz").write_bytes(bytes(weights))
    digest = hashlib.sha256(weights).hexdigest()

    with pytest.raises(subprocess.CalledProcessError):
        example.certify(tmp_path / "run", base_model=swapped)
    printed = capfd.readouterr()
    logs = printed.out + printed.err
    assert (
        f"resources[base/model.npz]: sha256 of {(swapped / 'model.npz').as_uri()} is {digest}, "
        f"but the config pins {example.PINNED['model.npz']}; training will not start"
    ) in logs
    assert "epoch" not in logs  # the job never started
    assert not (tmp_path / "run" / "proof.json").exists()
