"""YAML policies in the verifier: ``aicert.load_policy`` and ``aicert verify --policy`` read a
YAML file strictly (no aliases, duplicate or merge keys; bounded), into the very policy its
JSON twin gives; without PyYAML a JSON policy still works and a YAML one is refused saying what
to install. Real certificates from the factory (a swtpm quote over the log)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from aicert.policy import MAX_POLICY_BYTES, VerificationPolicy, load_policy
from aicert.strict_yaml import MAX_YAML_DEPTH

from .factory import CertificateFactory, MadeCertificate
from .test_certified_metrics import with_results
from .test_cli import aicert_cli
from .test_lineage import linked_to
from .test_policy import accepting


@pytest.fixture(scope="module")
def pretrain(factory: CertificateFactory) -> MadeCertificate:
    return factory.make_certificate()


@pytest.fixture(scope="module")
def evaluation(factory: CertificateFactory, pretrain: MadeCertificate) -> MadeCertificate:
    link = linked_to(pretrain.certificate)
    results = with_results()
    return factory.make_certificate(events=lambda events: results(link(events)))  # type: ignore[arg-type]


def write_twins(folder: Path, rules: dict[str, object]) -> tuple[Path, Path]:
    """The same policy as policy.json and as block-style policy.yaml."""
    as_json = folder / "policy.json"
    as_json.write_text(json.dumps(rules))
    as_yaml = folder / "policy.yaml"
    as_yaml.write_text(yaml.safe_dump(rules, default_flow_style=False, sort_keys=False))
    return as_json, as_yaml


def test_a_yaml_policy_equals_its_json_twin(tmp_path: Path, pretrain: MadeCertificate) -> None:
    as_json, as_yaml = write_twins(tmp_path, accepting(pretrain))
    assert "{" not in as_yaml.read_text()  # block style: really YAML, not JSON in a .yaml file
    from_yaml = load_policy(as_yaml)
    assert from_yaml == load_policy(as_json)
    assert from_yaml == VerificationPolicy.model_validate(accepting(pretrain))
    yml = tmp_path / "policy.yml"
    yml.write_text(as_yaml.read_text())
    assert load_policy(yml) == from_yaml


def test_a_file_of_another_suffix_is_read_as_json_else_yaml(
    tmp_path: Path, pretrain: MadeCertificate
) -> None:
    as_json, as_yaml = write_twins(tmp_path, accepting(pretrain))
    plain_json = tmp_path / "policy"
    plain_json.write_text(as_json.read_text())
    plain_yaml = tmp_path / "rules.txt"
    plain_yaml.write_text(as_yaml.read_text())
    assert load_policy(plain_json) == load_policy(plain_yaml) == load_policy(as_json)


ALIAS_BOMB = 'a: &a ["x", "x"]\nb: &b [*a, *a]\nc: &c [*b, *b]\nplatforms: [local]\n'


@pytest.mark.parametrize(
    ("text", "named"),
    [
        pytest.param(
            ALIAS_BOMB,
            "line 1: YAML anchors and aliases (&name, *name) are not allowed: a policy",
            id="alias-bomb",
        ),
        pytest.param(
            "platforms: [local]\nmetrics: ['a>=1']\nplatforms: [qemu]\n",
            "line 3: duplicate key 'platforms' (first given on line 1)",
            id="duplicate-key",
        ),
        pytest.param(
            "lineage_root:\n  <<: {run_id: r}\n",
            "line 2: YAML merge keys (<<) are not allowed",
            id="merge-key",
        ),
        pytest.param(
            "platforms: [local]\nallow_unsigned: true\n",
            "invalid policy: allow_unsigned: unknown key",
            id="unknown-key",
        ),
        pytest.param(
            "lineage_root:\n  run: x\n",
            "invalid policy: lineage_root.run: unknown key",
            id="unknown-nested-key",
        ),
        pytest.param(
            "metrics: " + "[" * (MAX_YAML_DEPTH + 1) + "]" * (MAX_YAML_DEPTH + 1) + "\n",
            f"line 1: nested more than {MAX_YAML_DEPTH} levels deep",
            id="too-deep",
        ),
        pytest.param("platforms: [local]\n  - qemu\n", "line 2: invalid YAML: ", id="not-yaml"),
        pytest.param(
            # YAML reads an unquoted date as a date: refused as not a string, by its path.
            "source_repositories: [2026-01-01]\n",
            "source_repositories.0: Input should be a valid string",
            id="typed-scalar",
        ),
    ],
)
def test_a_refused_yaml_policy_is_named(tmp_path: Path, text: str, named: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as caught:
        load_policy(path)
    assert str(caught.value).startswith(f"{path}: "), caught.value
    assert named in str(caught.value), caught.value


def test_a_yaml_policy_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("platforms: [local]\n#" + "x" * MAX_POLICY_BYTES + "\n")
    with pytest.raises(ValueError, match=f"larger than {MAX_POLICY_BYTES} bytes"):
        load_policy(path)


def test_cli_reads_a_yaml_policy(
    tmp_path: Path, evaluation: MadeCertificate, pretrain: MadeCertificate
) -> None:
    proof = evaluation.certificate.write(tmp_path / "evaluate.proof.json")
    parent = pretrain.certificate.write(tmp_path / "pretrain.proof.json")
    root = tmp_path / "root.pem"
    root.write_text(evaluation.trust_root_pem)
    common = [proof, "--trust-root", root, "--allow-dev-platform", "--parent", parent]
    _, policy = write_twins(tmp_path, accepting(pretrain))
    passed = aicert_cli("verify", *common, "--policy", policy)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    write_twins(tmp_path, {**accepting(pretrain), "platforms": ["qemu"]})
    failed = aicert_cli("verify", *common, "--policy", policy)
    assert failed.returncode == 1 and "platforms: local is not one of qemu" in failed.stderr
    policy.write_text("platforms: [local]\nplatforms: [qemu]\n")
    refused = aicert_cli("verify", *common, "--policy", policy)
    output = refused.stdout + refused.stderr
    assert refused.returncode == 2 and "duplicate key 'platforms'" in output, output


# Run in a fresh interpreter where ``import yaml`` (and the builder's Prefect) fails, as in a
# bare ``pip install aicert``.
WITHOUT_YAML = """\
import sys
sys.modules["yaml"] = sys.modules["prefect"] = None
from aicert.cli import main
import aicert
print(aicert.load_policy(sys.argv[1]).platforms)
try:
    aicert.load_policy(sys.argv[2])
except ValueError as exc:
    print("refused:", exc)
assert "yaml" not in [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]
sys.argv[1:] = sys.argv[3:]
main()
"""


def test_json_works_and_yaml_is_explained_without_pyyaml(
    tmp_path: Path, evaluation: MadeCertificate, pretrain: MadeCertificate
) -> None:
    as_json, as_yaml = write_twins(tmp_path, accepting(pretrain))
    proof = evaluation.certificate.write(tmp_path / "evaluate.proof.json")
    parent = pretrain.certificate.write(tmp_path / "pretrain.proof.json")
    root = tmp_path / "root.pem"
    root.write_text(evaluation.trust_root_pem)
    cli = ["verify", proof, "--trust-root", root, "--allow-dev-platform", "--parent", parent]
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_YAML, as_json, as_yaml, *cli, "--policy", as_json],
        capture_output=True,
        text=True,
        timeout=120,
        env={"COLUMNS": "250", "NO_COLOR": "1", "PATH": str(Path(sys.executable).parent)},
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "['local']" in done.stdout
    assert (
        f"refused: {as_yaml}: reading a YAML policy needs PyYAML, which this installation "
        "lacks: install 'aicert[guest]' (or pyyaml), or give the policy as JSON"
    ) in done.stdout, output
