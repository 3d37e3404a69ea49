"""Run config validation: every error names the field and the YAML line, before provisioning."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from aicert.guest_runtime.config import ConfigError, RunConfig, load_config, parse_config
from aicert.guest_runtime.strict_yaml import (
    MAX_CONFIG_BYTES,
    MAX_YAML_DEPTH,
    RefusedYamlError,
    strict_yaml_load,
)

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


# -- strict YAML: aliases, duplicate keys, size, depth -------------------------------------------


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """A "billion laughs" document: ``levels`` anchors, each a list of ``width`` aliases of the
    previous one (9 x 9: under 1 KB of YAML, 9**9 strings once expanded)."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels):
        lines.append(f"l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_at_once(tmp_path: Path) -> None:
    bomb = alias_bomb()
    assert len(bomb.encode()) < 1024
    started = time.monotonic()
    problems = problems_of(tmp_path, bomb)
    assert time.monotonic() - started < 0.5
    assert problems == [
        "line 1: YAML anchors and aliases (&name, *name) are not allowed: a training config "
        "has no need for them, and aliases can expand exponentially"
    ]


def test_a_single_alias_in_a_config_is_refused(tmp_path: Path) -> None:
    text = VALID.format(sha=SHA).replace("  tag: v1.0", "  tag: &t v1.0\n  branch: *t")
    problems = problems_of(tmp_path, text)
    assert len(problems) == 1 and problems[0].startswith("line 6: YAML anchors and aliases")


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        pytest.param(
            "  tag: v1.0",
            "  tag: v1.0\n  tag: v2.0",
            "line 7: duplicate key 'tag' (first given on line 6)",
            id="nested",
        ),
        pytest.param(
            "outputs: /workspace/outputs",
            "outputs: /workspace/outputs\noutputs: /workspace/other",
            "line 13: duplicate key 'outputs' (first given on line 12)",
            id="top-level",
        ),
    ],
)
def test_a_duplicate_key_is_refused_naming_the_key_and_lines(
    tmp_path: Path, old: str, new: str, expected: str
) -> None:
    problems = problems_of(tmp_path, VALID.format(sha=SHA).replace(old, new, 1))
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_a_merge_key_is_refused(tmp_path: Path) -> None:
    text = VALID.format(sha=SHA) + "env:\n  <<: {A: b}\n"
    assert problems_of(tmp_path, text) == ["line 14: YAML merge keys (<<) are not allowed"]


def test_deep_nesting_is_refused(tmp_path: Path) -> None:
    text = "command: " + "[" * 200 + "]" * 200 + "\n"
    assert problems_of(tmp_path, text) == [f"line 1: nested more than {MAX_YAML_DEPTH} levels deep"]


def test_an_oversized_config_is_refused_without_parsing_it(tmp_path: Path) -> None:
    text = VALID.format(sha=SHA) + "# " + "x" * MAX_CONFIG_BYTES + "\n"
    assert problems_of(tmp_path, text) == [f"larger than {MAX_CONFIG_BYTES} bytes"]


def test_strict_yaml_load_refuses_an_alias_bomb_for_other_callers() -> None:
    with pytest.raises(RefusedYamlError) as caught:
        strict_yaml_load(alias_bomb())
    assert caught.value.problem_mark is not None and caught.value.problem_mark.line == 0


# -- numbers: every one bounded, named --------------------------------------------------------


def with_limits(**limits: object) -> str:
    body = "".join(f"  {key}: {value}\n" for key, value in limits.items())
    return VALID.format(sha=SHA) + "limits:\n" + body


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            with_limits(timeoutSeconds=10**20),
            "limits.timeoutSeconds (line 14): 100000000000000000000 is out of range: allowed "
            "1 to 2592000 seconds (30 days)",
            id="timeout-huge",
        ),
        pytest.param(
            with_limits(timeoutSeconds=0),
            "limits.timeoutSeconds (line 14): 0 is out of range",
            id="timeout-zero",
        ),
        pytest.param(
            with_limits(pids=999999999999),
            "limits.pids (line 14): 999999999999 is out of range: allowed 1 to 4194304",
            id="pids-huge",
        ),
        pytest.param(
            with_limits(pids="yes"),
            "limits.pids (line 14): YAML read yes as a true/false value, not a number",
            id="pids-boolean",
        ),
        pytest.param(
            with_limits(pids=1.5),
            "limits.pids (line 14): expected a whole number, got 1.5",
            id="pids-fraction",
        ),
        pytest.param(
            with_limits(cpus=0.001),
            "limits.cpus (line 14): 0.001 is out of range: allowed 0.01 to 1024 CPUs",
            id="cpus-tiny",
        ),
        pytest.param(
            with_limits(cpus=".inf"),
            "limits.cpus (line 14): inf is out of range",
            id="cpus-infinite",
        ),
        pytest.param(
            with_limits(memory="1k"),
            "limits.memory (line 14): memory must be between 6m (Docker's minimum) and 16384g",
            id="memory-tiny",
        ),
        pytest.param(
            with_limits(memory="99999999999g"),
            "limits.memory (line 14): memory must be between 6m (Docker's minimum) and 16384g",
            id="memory-huge",
        ),
        pytest.param(
            with_limits(memory=repr("9" * 40)),
            "limits.memory (line 14): String should have at most 32 characters",
            id="memory-endless",
        ),
        pytest.param(
            VALID.format(sha=SHA) + "gpus: 1000\n",
            "gpus (line 13): 1000 is out of range: allowed 0 to 32 GPUs",
            id="gpus-huge",
        ),
        pytest.param(
            VALID.format(sha=SHA) + "gpus: -1\n",
            "gpus (line 13): -1 is out of range",
            id="gpus-negative",
        ),
        pytest.param(
            VALID.format(sha=SHA).replace(
                "outputs: /workspace/outputs", "outputs: {path: /workspace/out, minFiles: -1}"
            ),
            "outputs.minFiles (line 12): -1 is out of range: allowed 0 to 20000 files",
            id="min-files-negative",
        ),
    ],
)
def test_numbers_out_of_bounds_are_named(tmp_path: Path, text: str, expected: str) -> None:
    problems = problems_of(tmp_path, text)
    assert any(problem.startswith(expected) for problem in problems), problems


def test_the_largest_allowed_numbers_load(tmp_path: Path) -> None:
    text = with_limits(timeoutSeconds=2592000, pids=4194304, cpus=1024, memory="16384g")
    config = load_config(write(tmp_path, text + "gpus: 32\n"))
    assert (config.limits.timeout_seconds, config.limits.pids, config.gpus) == (
        2592000,
        4194304,
        32,
    )


# -- YAML's implicit typing, messages -----------------------------------------------------------


def test_an_unquoted_all_digit_sha256_says_to_quote_it(tmp_path: Path) -> None:
    digits = "1234567890" * 6 + "1234"
    problems = problems_of(tmp_path, VALID.format(sha=digits))
    assert problems == [
        f"resources[0].sha256 (line 11): YAML read {digits} as a number, not text: "
        f'quote it ("{digits}")'
    ]
    # Quoted, the same digest loads.
    config = load_config(write(tmp_path, VALID.format(sha=f'"{digits}"')))
    assert config.resources[0].sha256 == digits


def test_an_unquoted_number_in_env_says_to_quote_it(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, VALID.format(sha=SHA) + "env:\n  EPOCHS: 200\n")
    assert problems == [
        'env.EPOCHS (line 14): YAML read 200 as a number, not text: quote it ("200")'
    ]


def test_an_unquoted_date_says_to_quote_it(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, VALID.format(sha=SHA).replace("tag: v1.0", "tag: 2026-12-02"))
    assert problems == [
        'source.tag (line 6): YAML read 2026-12-02 as a date, not text: quote it ("2026-12-02")'
    ]


def test_a_bad_name_is_explained_without_a_regex(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, VALID.format(sha=SHA) + "name: Flowers_v2\n")
    assert problems == [
        "name (line 13): name must be 1 to 63 characters: lowercase letters, digits and '-', "
        "starting with a letter or a digit (got 'Flowers_v2')"
    ]


# -- the image reference: Docker's grammar ------------------------------------------------------

DIGEST = "sha256:" + "0123456789abcdef" * 4


@pytest.mark.parametrize(
    "image",
    [
        "aicert/python-base:bookworm",
        "python",
        "python:3.11-slim",
        "library/python:3.11",
        "ghcr.io/acme/trainer:v1.2_rc-3",
        "localhost:5000/my_team/trainer__v2:latest",
        "registry.example.org:443/a.b/c-d--e",
        "[2001:db8::1]:5000/trainer:1",
        f"python@{DIGEST}",
        f"ghcr.io/acme/trainer:v1@{DIGEST}",
    ],
)
def test_docker_image_references_are_accepted(image: str) -> None:
    config = parse_config({"source": {"gitRepo": "x"}, "image": image})
    assert config.image == image


@pytest.mark.parametrize(
    "image",
    [
        "python:3; touch /tmp/pwn",
        "Python:3",
        "python:",
        "python:-3",
        "python:" + "t" * 129,
        "acme//trainer",
        "acme/trainer/",
        "-acme/trainer",
        "acme/trainer.",
        "acme/Trainer",
        "python@sha256:abc",
        "python@md5:" + "0" * 32,
        f"python@{DIGEST.upper()}",
        "python:3\n",
        "pythön",
        "python:3.11 ",
        "a" * 256,
        "",
    ],
)
def test_bad_image_references_are_refused_naming_the_field(image: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"source": {"gitRepo": "x"}, "image": image})
    (problem,) = caught.value.problems
    assert problem.startswith("image: "), problem


# -- outputs.minFiles ----------------------------------------------------------------------------


def test_outputs_as_a_path_is_measured_as_before(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, VALID.format(sha=SHA)))
    assert config.measured_form()["outputs"] == "/workspace/outputs"
    assert (config.outputs_path, config.min_output_files) == ("/workspace/outputs", 0)


def test_outputs_with_min_files_is_measured_as_written(tmp_path: Path) -> None:
    text = VALID.format(sha=SHA).replace(
        "outputs: /workspace/outputs", "outputs:\n  path: /workspace/model\n  minFiles: 2"
    )
    config = load_config(write(tmp_path, text))
    assert (config.outputs_path, config.min_output_files) == ("/workspace/model", 2)
    assert config.measured_form()["outputs"] == {"path": "/workspace/model", "minFiles": 2}
    assert parse_config(config.measured_form()) == config


def test_outputs_mapping_errors_name_the_field(tmp_path: Path) -> None:
    text = VALID.format(sha=SHA).replace(
        "outputs: /workspace/outputs", "outputs:\n  path: /workspace/src/x\n  minFile: 1"
    )
    assert sorted(problems_of(tmp_path, text)) == [
        "outputs.minFile (line 14): unknown field (check the spelling)",
        "outputs.path (line 13): outputs must not be /workspace or inside /workspace/src",
    ]
