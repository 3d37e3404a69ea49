"""Run config validation: every error names the field and the YAML line, before provisioning."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from aicert.guest_runtime.config import ConfigError, RunConfig, load_config, parse_config

VALID = """\
kind: python
pythonVersion: 11
source:
  type: git
  gitRepo: https://example.invalid/project.git
  tag: v1.0
pythonEntryPoint: src/main.py
resources:
  - url: https://example.invalid/data.csv
    destinationPath: data/train.csv
    sha256: {sha}
outputs: /workspace/outputs
"""
SHA = "ab" * 32


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "aicert.yaml"
    path.write_text(text)
    return path


def problems_of(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert str(tmp_path / "aicert.yaml") in str(caught.value)
    return caught.value.problems


def test_the_valid_config_loads(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, VALID.format(sha=SHA)))
    assert isinstance(config, RunConfig)
    assert config.python_version == "3.11"
    assert config.source.tag == "v1.0"
    assert config.resources[0].destination_path == "data/train.csv"
    assert config.resources[0].sha256 == SHA


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        pytest.param(
            "pythonEntryPoint:",
            "pythonEntryPont:",
            "pythonEntryPont (line 7): unknown field",
            id="typo-top-level",
        ),
        pytest.param(
            "  tag: v1.0", "  tga: v1.0", "source.tga (line 6): unknown field", id="typo-nested"
        ),
        pytest.param(
            "destinationPath: data/train.csv",
            "destinationPath: ../outside.csv",
            "resources[0].destinationPath (line 10): destinationPath must not contain '..'",
            id="dotdot-destination",
        ),
        pytest.param(
            "destinationPath: data/train.csv",
            "destinationPath: data/../../x",
            "resources[0].destinationPath (line 10): destinationPath must not contain '..'",
            id="inner-dotdot-destination",
        ),
        pytest.param(
            "destinationPath: data/train.csv",
            "destinationPath: /etc/cron.d/x",
            "resources[0].destinationPath (line 10): destinationPath must be relative",
            id="absolute-destination",
        ),
        pytest.param(
            f"sha256: {SHA}",
            "sha256: " + "zz" * 32,
            "resources[0].sha256 (line 11): sha256 must be 64 hexadecimal characters",
            id="non-hex-sha256",
        ),
        pytest.param(
            f"sha256: {SHA}",
            "sha256: " + "ab" * 31,
            "resources[0].sha256 (line 11): sha256 must be 64 hexadecimal characters",
            id="short-sha256",
        ),
        pytest.param(
            "  tag: v1.0",
            "  tag: v1.0\n  branch: main",
            "source (line 3): give at most one of tag, branch, commit (got tag, branch)",
            id="tag-and-branch",
        ),
        pytest.param(
            "pythonVersion: 11",
            "pythonVersion: 3.12",
            "pythonVersion (line 2): Python 3.12 is not available",
            id="bad-python-version",
        ),
        pytest.param(
            "outputs: /workspace/outputs",
            "outputs: /tmp/outputs",
            "outputs (line 12): outputs must be an absolute path under /workspace",
            id="outputs-outside-workspace",
        ),
        pytest.param(
            "outputs: /workspace/outputs",
            "outputs: /workspace/../etc",
            "outputs (line 12): outputs must be an absolute path under /workspace",
            id="outputs-escaping-workspace",
        ),
        pytest.param(
            "outputs: /workspace/outputs",
            "outputs: /workspace/src/out",
            "outputs (line 12): outputs must not be /workspace or inside /workspace/src",
            id="outputs-over-the-source",
        ),
        pytest.param(
            "  gitRepo: https://example.invalid/project.git\n",
            "",
            "source.gitRepo (line 3): required field is missing",
            id="missing-git-repo",
        ),
    ],
)
def test_config_errors_name_the_field_and_the_line(
    tmp_path: Path, old: str, new: str, expected: str
) -> None:
    text = VALID.format(sha=SHA)
    assert old in text
    problems = problems_of(tmp_path, text.replace(old, new, 1))
    assert any(problem.startswith(expected) for problem in problems), problems


def test_missing_source_is_named(tmp_path: Path) -> None:
    text = VALID.format(sha=SHA)
    start = text.index("source:")
    end = text.index("pythonEntryPoint:")
    problems = problems_of(tmp_path, text[:start] + text[end:])
    assert problems == ["source: required field is missing"]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = (
        VALID.format(sha="not-hex")
        .replace("pythonVersion: 11", "pythonVersion: 2.7")
        .replace("data/train.csv", "/abs")
    )
    problems = problems_of(tmp_path, text)
    fields = sorted(problem.split(" ", 1)[0] for problem in problems)
    assert fields == ["pythonVersion", "resources[0].destinationPath", "resources[0].sha256"]


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, "kind: python\nsource: [unclosed\n")
    assert len(problems) == 1 and "invalid YAML" in problems[0] and "line 3" in problems[0]


def test_a_config_given_as_data_is_validated_the_same_way() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(
            {
                "source": {"gitRepo": "https://example.invalid/p.git"},
                "resources": [{"url": "https://example.invalid/x", "destinationPath": "../x"}],
            }
        )
    assert caught.value.problems == [
        "resources[0].destinationPath: destinationPath must not contain '..' ('../x')"
    ]


def test_cli_refuses_a_bad_config_before_provisioning(tmp_path: Path) -> None:
    aicert_cli = Path(sys.executable).parent / "aicert"
    assert aicert_cli.is_file(), f"the aicert console script is not installed at {aicert_cli}"
    home = tmp_path / "aicert-home"
    config = tmp_path / "bad.yaml"
    config.write_text(VALID.format(sha=SHA).replace("  tag: v1.0", "  tga: v1.0"))
    completed = subprocess.run(
        [str(aicert_cli), "run", "--config", str(config), "--output-bom", str(tmp_path / "p.json")],
        env={**os.environ, "AICERT_HOME": str(home), "NO_COLOR": "1", "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2, completed.stdout + completed.stderr
    assert "source.tga (line 6): unknown field" in completed.stderr
    # Nothing was provisioned: no run folder (so no swtpm, no agent) and no certificate.
    assert not (home / "runs").exists()
    assert not (tmp_path / "p.json").exists()
