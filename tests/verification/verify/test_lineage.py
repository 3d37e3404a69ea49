"""Lineage: a child certificate's certified input checked against the parents supplied.

Every certificate here is real (a swtpm quote over the log, an AK certified by the platform
CA); a child's log measures an ``aicert.input.certified-resource`` event in place of its
resource event, binding a parent's certificate SHA-256, run id and output, as the agent does.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from aicert import lineage as lineage_module
from aicert.appevents import CertifiedResourceEvent, ResourceEvent
from aicert.errors import (
    CertificateChainError,
    LineageCertificateDigestError,
    LineageCycleError,
    LineageDepthError,
    LineageMissingParentError,
    LineageOutputError,
    LineageParentError,
    LineageUnusedParentError,
    VerificationError,
)
from aicert.lineage import LineageLink, certificate_sha256, follow_lineage, lineage_rows
from aicert.model import AppEvent, Certificate

from .factory import (
    DEFAULT_OUTPUTS,
    CertificateFactory,
    MadeCertificate,
    TpmRig,
    sha256_hex,
    tampered,
)
from .test_cli import aicert_cli

MODEL_OUTPUT = "model/weights.bin"


def linked_to(
    parent: Certificate,
    output: str = MODEL_OUTPUT,
    *,
    sha256: str | None = None,
    certificate_digest: str | None = None,
) -> object:
    """An event editor: the log's resource becomes a certified resource bound to ``parent``."""

    def edit(events: list[AppEvent]) -> list[AppEvent]:
        digest = sha256 or sha256_hex(DEFAULT_OUTPUTS.get(output, b"absent"))
        edited = []
        for event in events:
            if event.type == ResourceEvent.TYPE:
                event = CertifiedResourceEvent(
                    url=f"https://models.example.org/{output}",
                    destination=f"base/{output}",
                    sha256=digest,
                    size=len(DEFAULT_OUTPUTS.get(output, b"")),
                    certificate_sha256=certificate_digest or certificate_sha256(parent),
                    run_id=parent.run.id,
                    output=output,
                ).to_event()
            edited.append(event)
        return edited

    return edit


def child_of(factory: CertificateFactory, parent: Certificate, **link: str) -> MadeCertificate:
    return factory.make_certificate(events=linked_to(parent, **link))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def pretrain(factory: CertificateFactory) -> MadeCertificate:
    return factory.make_certificate()


@pytest.fixture(scope="module")
def finetune(factory: CertificateFactory, pretrain: MadeCertificate) -> MadeCertificate:
    return child_of(factory, pretrain.certificate)


@pytest.fixture(scope="module")
def evaluation(factory: CertificateFactory, finetune: MadeCertificate) -> MadeCertificate:
    return child_of(factory, finetune.certificate)


@pytest.fixture(scope="module")
def untrusted_rig(cert_workdir: Path) -> Iterator[TpmRig]:
    """A TPM whose AK another platform CA certified: not a root the verifier trusts."""
    rig = TpmRig.create(
        cert_workdir / "tpm-untrusted", cert_workdir / "ek-ca", cert_workdir / "untrusted-ca"
    )
    try:
        yield rig
    finally:
        rig.close()


def test_chain_verifies_back_to_the_pretraining_run(
    pretrain: MadeCertificate, finetune: MadeCertificate, evaluation: MadeCertificate
) -> None:
    report = evaluation.verify(parents=[finetune.certificate, pretrain.certificate])
    (link,) = report.lineage
    assert link.verified and link.run_id == finetune.certificate.run.id
    assert link.parent is not None and link.parent.links[0].parent is not None
    assert link.parent.links[0].parent.run_id == pretrain.certificate.run.id
    # the chain goes back to the pretraining run's data
    assert link.parent.links[0].parent.resources[0][0] == "data/train.csv"
    assert [depth for depth, _ in lineage_rows(report.lineage)] == [0, 1]
    as_json = report.to_dict()["lineage"]
    assert as_json[0]["parent"]["links"][0]["parent"]["run_id"] == pretrain.certificate.run.id
    assert any(check.name == "lineage" for check in report.checks)


def test_parents_given_as_paths(
    tmp_path: Path, pretrain: MadeCertificate, finetune: MadeCertificate
) -> None:
    path = pretrain.certificate.write(tmp_path / "pretrain.proof.json")
    report = finetune.verify(parents=[str(path)])
    assert report.lineage[0].verified


def test_missing_parent_is_reported_unverified(finetune: MadeCertificate) -> None:
    report = finetune.verify()
    (link,) = report.lineage
    assert not link.verified and report.to_dict()["lineage"][0]["verified"] is False


def test_require_lineage_refuses_a_missing_parent(finetune: MadeCertificate) -> None:
    with pytest.raises(LineageMissingParentError, match=r"base/model/weights\.bin"):
        finetune.verify(require_lineage=True)


def test_require_lineage_refuses_a_missing_grandparent(
    finetune: MadeCertificate, evaluation: MadeCertificate
) -> None:
    with pytest.raises(LineageMissingParentError, match=finetune.certificate.run.id):
        # the fine-tune's own link (to pretraining) has no parent here
        evaluation.verify(parents=[finetune.certificate], require_lineage=True)


def test_wrong_parent_is_refused(factory: CertificateFactory, finetune: MadeCertificate) -> None:
    other = factory.make_certificate()
    with pytest.raises(LineageUnusedParentError, match=other.certificate.run.id):
        finetune.verify(parents=[other.certificate])


def test_edited_parent_is_refused_naming_the_link(
    pretrain: MadeCertificate, finetune: MadeCertificate
) -> None:
    def edit(document: dict[str, object]) -> None:
        run = document["run"]
        assert isinstance(run, dict)
        run["duration_ms"] = 1

    edited = tampered(pretrain, edit)
    with pytest.raises(LineageCertificateDigestError, match=r"base/model/weights\.bin"):
        finetune.verify(parents=[edited.certificate])


def test_parent_from_an_untrusted_root_is_refused(
    factory: CertificateFactory, untrusted_rig: TpmRig
) -> None:
    parent = CertificateFactory(untrusted_rig).make_certificate()
    child = child_of(factory, parent.certificate)
    with pytest.raises(LineageParentError, match="CertificateChainError") as caught:
        child.verify(parents=[parent.certificate])
    assert isinstance(caught.value.__cause__, CertificateChainError)


def test_output_the_parent_does_not_certify_is_refused(
    factory: CertificateFactory, pretrain: MadeCertificate
) -> None:
    child = child_of(factory, pretrain.certificate, output="model/other.bin")
    with pytest.raises(LineageOutputError, match=r"no output model/other\.bin"):
        child.verify(parents=[pretrain.certificate])


def test_file_other_than_the_certified_output_is_refused(
    factory: CertificateFactory, pretrain: MadeCertificate
) -> None:
    child = child_of(factory, pretrain.certificate, sha256=sha256_hex(b"swapped weights"))
    with pytest.raises(LineageOutputError, match="the child measured"):
        child.verify(parents=[pretrain.certificate])


def test_depth_is_bounded(
    monkeypatch: pytest.MonkeyPatch,
    pretrain: MadeCertificate,
    finetune: MadeCertificate,
    evaluation: MadeCertificate,
) -> None:
    monkeypatch.setattr(lineage_module, "MAX_LINEAGE_DEPTH", 1)
    with pytest.raises(LineageDepthError):
        evaluation.verify(parents=[finetune.certificate, pretrain.certificate])


def test_a_certificate_that_is_its_own_ancestor_is_refused(
    pretrain: MadeCertificate, finetune: MadeCertificate
) -> None:
    # A certificate cannot bind its own SHA-256; the parent's report is given a link back to
    # the child, as a forged or colliding lineage would show it.
    child_digest = certificate_sha256(finetune.certificate)

    def verify_parent(parent: Certificate) -> object:
        report = pretrain.verify()
        back = dataclasses.replace(
            finetune.verify().lineage[0],
            certificate_sha256=child_digest,
            run_id=finetune.certificate.run.id,
        )
        return dataclasses.replace(report, lineage=(back,))

    links = finetune.verify().lineage
    with pytest.raises(LineageCycleError, match="its own ancestor"):
        follow_lineage(
            finetune.certificate,
            links,
            [pretrain.certificate, finetune.certificate],
            verify_parent,  # type: ignore[arg-type]
        )


def test_every_lineage_error_is_a_verification_error() -> None:
    for error in (
        LineageMissingParentError,
        LineageCertificateDigestError,
        LineageParentError,
        LineageOutputError,
        LineageCycleError,
        LineageDepthError,
        LineageUnusedParentError,
    ):
        assert issubclass(error, VerificationError)


def test_link_round_trips_from_its_event(finetune: MadeCertificate) -> None:
    link = finetune.verify().lineage[0]
    assert isinstance(link, LineageLink) and link.output == MODEL_OUTPUT
    assert link.sha256 == sha256_hex(DEFAULT_OUTPUTS[MODEL_OUTPUT])


def test_cli_shows_the_lineage_tree(
    tmp_path: Path,
    pretrain: MadeCertificate,
    finetune: MadeCertificate,
    evaluation: MadeCertificate,
) -> None:
    root = tmp_path / "platform-ca.pem"
    root.write_text(pretrain.trust_root_pem)
    child = evaluation.certificate.write(tmp_path / "evaluate.proof.json")
    parents = [
        pretrain.certificate.write(tmp_path / "pretrain.proof.json"),
        finetune.certificate.write(tmp_path / "finetune.proof.json"),
    ]
    trust = ["--trust-root", root, "--allow-dev-platform"]
    result = aicert_cli("verify", child, *trust, "--parent", parents[0], "--parent", parents[1])
    assert result.returncode == 0, result.stderr
    assert "Lineage" in result.stdout and "└ base/model/weights.bin" in result.stdout
    assert pretrain.certificate.run.id in result.stdout

    as_json = aicert_cli("verify", child, *trust, "--parent", parents[1], "--json")
    assert as_json.returncode == 0, as_json.stderr
    (link,) = json.loads(as_json.stdout)["lineage"]
    assert link["verified"] and link["parent"]["links"][0]["verified"] is False

    required = aicert_cli("verify", child, *trust, "--parent", parents[1], "--require-lineage")
    assert required.returncode == 1
    assert "LineageMissingParentError" in required.stderr


def test_cli_refuses_a_wrong_parent(
    tmp_path: Path, pretrain: MadeCertificate, evaluation: MadeCertificate
) -> None:
    root = tmp_path / "platform-ca.pem"
    root.write_text(pretrain.trust_root_pem)
    child = evaluation.certificate.write(tmp_path / "evaluate.proof.json")
    wrong = pretrain.certificate.write(tmp_path / "pretrain.proof.json")
    result = aicert_cli(
        "verify", child, "--trust-root", root, "--allow-dev-platform", "--parent", wrong
    )
    assert result.returncode == 1
    assert "LineageUnusedParentError" in result.stderr
