"""The verification policy: each rule failing alone is named, all failures are listed, and a
policy file is parsed strictly (an unknown key refused naming it). Real certificates from the
factory (a swtpm quote over the log): pretrain -> fine-tune -> evaluation with metrics."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from aicert.errors import PolicyError, VerificationError
from aicert.lineage import certificate_sha256
from aicert.model import AppEvent
from aicert.policy import (
    MAX_POLICY_BYTES,
    POLICY_SCHEMA_RESOURCE,
    VerificationPolicy,
    load_policy,
    parse_policy,
    policy_json_schema,
)

from .factory import (
    BASE_IMAGE_ID,
    DEFAULT_OUTPUTS,
    RESOURCE_CONTENT,
    RESOURCE_DESTINATION,
    SOURCE_URL,
    CertificateFactory,
    MadeCertificate,
    sha256_hex,
)
from .seeds import load_seed
from .test_certified_metrics import with_results
from .test_cli import aicert_cli
from .test_lineage import linked_to

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def pretrain(factory: CertificateFactory) -> MadeCertificate:
    return factory.make_certificate()


@pytest.fixture(scope="module")
def evaluation(factory: CertificateFactory, pretrain: MadeCertificate) -> MadeCertificate:
    """An evaluation of the pretrained model: a certified input and certified metrics."""
    link: Callable[[list[AppEvent]], list[AppEvent]] = linked_to(pretrain.certificate)  # type: ignore[assignment]
    results = with_results()
    return factory.make_certificate(events=lambda events: results(link(events)))


def accepting(pretrain: MadeCertificate) -> dict[str, Any]:
    """A policy the evaluation meets, rule by rule."""
    return {
        "version": "aicert-policy/v1",
        "source_repositories": [SOURCE_URL],
        "base_images": [BASE_IMAGE_ID.removeprefix("sha256:")],
        "resources": {"base/model/weights.bin": sha256_hex(DEFAULT_OUTPUTS["model/weights.bin"])},
        "platforms": ["local"],
        "lineage_root": {"run_id": pretrain.certificate.run.id},
        "metrics": ["accuracy>=0.9"],
    }


def test_a_met_policy_passes(evaluation: MadeCertificate, pretrain: MadeCertificate) -> None:
    policy = VerificationPolicy.model_validate(accepting(pretrain))
    report = evaluation.verify(parents=[pretrain.certificate], policy=policy)
    assert any(check.name == "policy" for check in report.checks)
    by_digest = {"certificate_sha256": certificate_sha256(pretrain.certificate)}
    VerificationPolicy.model_validate({"lineage_root": by_digest}).check(report)


# Each rule broken alone: the error names that rule, and only it.
BROKEN: dict[str, Any] = {
    "source_repositories": ["https://git.example.org/other/repo.git"],
    "base_images": ["0" * 64],
    "resources": {"base/model/weights.bin": "1" * 64},
    "platforms": ["qemu", "azure"],
    "lineage_root": {"run_id": "some-other-run"},
    "metrics": ["accuracy>=0.95"],
}


@pytest.mark.parametrize("rule", sorted(BROKEN))
def test_each_rule_failing_alone_is_named(
    rule: str, evaluation: MadeCertificate, pretrain: MadeCertificate
) -> None:
    policy = VerificationPolicy.model_validate({**accepting(pretrain), rule: BROKEN[rule]})
    with pytest.raises(PolicyError) as caught:
        evaluation.verify(parents=[pretrain.certificate], policy=policy)
    assert len(caught.value.failures) == 1
    assert caught.value.failures[0].startswith(f"{rule}: ")
    assert isinstance(caught.value, VerificationError)


def test_every_failed_rule_is_listed(
    evaluation: MadeCertificate, pretrain: MadeCertificate
) -> None:
    policy = VerificationPolicy.model_validate({**accepting(pretrain), **BROKEN})
    with pytest.raises(PolicyError) as caught:
        evaluation.verify(parents=[pretrain.certificate], policy=policy)
    assert [f.partition(":")[0] for f in caught.value.failures] == [
        "source_repositories",
        "base_images",
        "resources",
        "platforms",
        "lineage_root",
        "metrics",
    ]
    assert "6 rule(s) failed" in str(caught.value)


def test_lineage_root_needs_the_parent_verified(
    evaluation: MadeCertificate, pretrain: MadeCertificate
) -> None:
    policy = VerificationPolicy.model_validate(
        {"lineage_root": accepting(pretrain)["lineage_root"]}
    )
    with pytest.raises(PolicyError, match=r"lineage_root: .*no verified parent"):
        evaluation.verify(policy=policy)


def test_missing_dataset_and_metric_are_named(pretrain: MadeCertificate) -> None:
    policy = VerificationPolicy.model_validate(
        {"resources": {"data/held-out.csv": "2" * 64}, "metrics": ["f1>0.5"]}
    )
    with pytest.raises(PolicyError) as caught:
        pretrain.verify(policy=policy)
    assert caught.value.failures[0] == "resources: data/held-out.csv was not an input of the run"
    assert caught.value.failures[1].startswith("metrics: metric 'f1': not among")
    # the pretraining run's own dataset is its resource
    met = {"resources": {RESOURCE_DESTINATION: sha256_hex(RESOURCE_CONTENT)}}
    pretrain.verify(policy=VerificationPolicy.model_validate(met))


def test_reference_value_sets_rule() -> None:
    qemu = load_seed("qemu")
    report = qemu.verify()
    assert report.reference_values is not None
    VerificationPolicy.model_validate(
        {"platforms": ["qemu"], "reference_value_sets": [report.reference_values]}
    ).check(report)
    with pytest.raises(PolicyError, match=r"reference_value_sets: the boot chain was judged by"):
        VerificationPolicy.model_validate({"reference_value_sets": ["another-image"]}).check(report)


def test_a_local_certificate_fails_a_reference_value_sets_rule(pretrain: MadeCertificate) -> None:
    policy = VerificationPolicy.model_validate({"reference_value_sets": ["guest-image-1"]})
    with pytest.raises(PolicyError, match="reference_value_sets: no reference-value set judged"):
        pretrain.verify(policy=policy)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('{"platforms": ["local"], "platfroms": ["qemu"]}', "platfroms: unknown key"),
        ('{"lineage_root": {"run": "x"}}', "lineage_root.run: unknown key"),
        ('{"lineage_root": {}}', "exactly one of certificate_sha256 and run_id"),
        ('{"platforms": ["local"], "platforms": ["qemu"]}', "duplicate key 'platforms'"),
        ('{"metrics": ["accuracy>=NaN"]}', "the threshold must be finite"),
        ('{"metrics": ["accuracy"]}', "use NAME>=NUMBER"),
        ('{"platforms": []}', "platforms: List should have at least 1 item"),
        ('{"version": "aicert-policy/v2"}', "version: Input should be 'aicert-policy/v1'"),
        ('{"base_images": ["sha256:abc"]}', "base_images.0: String should match pattern"),
        ("[]", "(top level): Input should be a valid dictionary"),
        ('{"platforms": NaN}', "NaN is not a JSON number"),
    ],
)
def test_a_malformed_policy_is_refused_naming_the_problem(text: str, named: str) -> None:
    with pytest.raises(ValueError, match=r"policy\.json: ") as caught:
        parse_policy(text, "policy.json")
    assert named in str(caught.value)


def test_a_policy_file_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text('{"platforms": ["local"]' + " " * MAX_POLICY_BYTES + "}")
    with pytest.raises(ValueError, match=f"larger than {MAX_POLICY_BYTES} bytes"):
        load_policy(path)
    with pytest.raises(ValueError, match="cannot read"):
        load_policy(tmp_path / "absent.json")


def test_published_schema_matches_the_model() -> None:
    published = json.loads((ROOT / "verification" / POLICY_SCHEMA_RESOURCE).read_text("utf-8"))
    assert published == policy_json_schema(), (
        "verification/schemas/aicert-policy-v1.schema.json is stale: run `make schema`"
    )
    jsonschema.Draft202012Validator(published).validate(
        {"platforms": ["qemu"], "lineage_root": {"run_id": "r"}, "metrics": ["acc>=1"]}
    )
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(published).validate({"platfroms": ["qemu"]})


def test_cli_policy(tmp_path: Path, evaluation: MadeCertificate, pretrain: MadeCertificate) -> None:
    proof = evaluation.certificate.write(tmp_path / "evaluate.proof.json")
    parent = pretrain.certificate.write(tmp_path / "pretrain.proof.json")
    root = tmp_path / "root.pem"
    root.write_text(evaluation.trust_root_pem)
    common = [proof, "--trust-root", root, "--allow-dev-platform", "--parent", parent]
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(accepting(pretrain)))
    passed = aicert_cli("verify", *common, "--policy", policy)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    policy.write_text(json.dumps({**accepting(pretrain), "platforms": ["qemu"]}))
    failed = aicert_cli("verify", *common, "--policy", policy)
    assert failed.returncode == 1 and "PolicyError" in failed.stdout + failed.stderr
    assert "platforms: local is not one of qemu" in failed.stdout + failed.stderr
    policy.write_text(json.dumps({"platforms": ["local"], "allow_all": True}))
    refused = aicert_cli("verify", *common, "--policy", policy)
    assert refused.returncode == 2 and "allow_all: unknown key" in refused.stdout + refused.stderr
