"""The default demo (``examples/aicert.yaml``, ``examples/digits/train.py``): ``make demo``
certifies a scikit-learn training on the local platform (real swtpm, Docker, a Prefect server)
and verifies it with its certified accuracy; the certificate lists every pinned wheel, the
weights are plain NumPy arrays (no pickle) and the model card agrees with the certified
metrics."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import time
import zipfile
from pathlib import Path

import pytest

import aicert
from aicert.errors import MetricThresholdError
from tests import REPO_ROOT

pytestmark = [pytest.mark.docker, pytest.mark.swtpm, pytest.mark.slow]

PROJECT = REPO_ROOT / "examples" / "digits"


def pinned_requirements() -> dict[str, str]:
    """requirements.txt as name -> version: every line must be an exact ``==`` pin."""
    pins: dict[str, str] = {}
    for line in (PROJECT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([0-9][A-Za-z0-9.]*)", line)
            assert match is not None, f"requirements.txt: {line!r} is not an exact pin"
            pins[match[1].lower()] = match[2]
    return pins


def npy_dtypes(path: Path) -> dict[str, str]:
    """Each member of an .npz and the dtype its .npy header declares (no NumPy on the host)."""
    dtypes: dict[str, str] = {}
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            with archive.open(member) as handle:
                assert handle.read(6) == b"\x93NUMPY", f"{member} is not a .npy array"
                major = handle.read(2)[0]
                length = int.from_bytes(handle.read(2 if major == 1 else 4), "little")
                header = ast.literal_eval(handle.read(length).decode("latin-1"))
            dtypes[member.removesuffix(".npy")] = header["descr"]
    return dtypes


def test_make_demo_certifies_the_digits_training_with_its_accuracy(
    tmp_path: Path, prefect_api_url: str, base_image: str
) -> None:
    home = tmp_path / "aicert-home"
    env = {**os.environ, "AICERT_HOME": str(home), "PREFECT_API_URL": prefect_api_url}
    started = time.monotonic()
    # `make demo` itself (its setup prerequisite taken as done: the suite's fixtures did it).
    done = subprocess.run(
        ["make", "--no-print-directory", "-o", "setup", "demo", f"DEMO_DIR={tmp_path}"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    printed = done.stdout + done.stderr
    assert done.returncode == 0, printed[-6000:]
    print(f"make demo: {time.monotonic() - started:.1f} s")
    assert "epoch  40/40" in printed  # the training's progress reached the run's logs
    assert "VERIFIED" in printed and "accuracy>=0.9 met" in printed

    certificate = aicert.load(tmp_path / "proof.json")
    roots = [home / "platform-ca" / "platform-ca.cert.pem"]
    report = certificate.verify(
        trusted_roots=roots,
        allow_dev_platform=True,
        model=tmp_path / "outputs",
        expected_metrics=["accuracy>=0.9"],
    )
    assert report.metrics["accuracy"] >= 0.9
    assert report.metrics["test_examples"] == 450.0
    packages = {item.name: item.version for item in report.inputs if item.kind == "package"}
    assert packages == pinned_requirements()
    assert {output.path for output in report.outputs} == {
        "model.npz",
        "model-card.json",
        "metrics.json",
    }
    # The weights are plain arrays: no object dtype, so loading them unpickles nothing.
    dtypes = npy_dtypes(tmp_path / "outputs" / "model.npz")
    assert set(dtypes) == {"classes", "coefs_0", "coefs_1", "intercepts_0", "intercepts_1"}
    assert all("O" not in dtype for dtype in dtypes.values()), dtypes
    card = json.loads((tmp_path / "outputs" / "model-card.json").read_text())
    assert card["dataset"]["name"] == "sklearn.datasets.load_digits"
    assert card["framework"]["scikit-learn"] == packages["scikit-learn"]
    assert card["metrics"] == report.metrics

    # A threshold the model does not meet is refused, naming the metric and its value.
    with pytest.raises(MetricThresholdError, match=r"accuracy"):
        certificate.verify(
            trusted_roots=roots, allow_dev_platform=True, expected_metrics=["accuracy>=0.999"]
        )
