"""One certified run through the agent's HTTP API, checked from every side.

Real swtpm, real dockerd, the agent in its own process: start_run, AK enrollment, inputs
(base image, git source at a tag, http resources pinned and not, a file:// resource), the
training image with a dependency from requirements.txt, training with streamed logs, outputs,
quote; then the certificate is assembled and verified with the SDK.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
from securesystemslib.dsse import Envelope

import aicert
from aicert.appevents import (
    ConfigEvent,
    ImageEvent,
    OutputFileEvent,
    PackageEvent,
    ResourceEvent,
    ResultEvent,
    RuntimeEvent,
    SourceEvent,
    parse_event,
    replay,
)
from aicert.flows.assemble import assemble_certificate
from aicert.guest_runtime import RUNTIME_VERSION
from aicert.guest_runtime.api_models import Evidence, TrainingStatus
from aicert.guest_runtime.config import parse_config
from aicert.hashing import hash_tree, sha256_file, tree_sha256
from aicert.model import AppEvent
from aicert.quote import verify_quote
from aicert.tasks.platforms.base import EnrolledKey
from tests.exports.test_cli import run_export
from tests.exports.test_signed_exports import sslib_key
from tests.guest_runtime.agent.conftest import (
    AgentUnderTest,
    ConfigFactory,
    Provisioner,
    ResourceFiles,
    TrainingRepo,
    sha256_hex,
)
from tests.guest_runtime.test_tpm_signing import run_model_signing

pytestmark = [pytest.mark.docker, pytest.mark.swtpm, pytest.mark.slow]

EPOCHS = 12


@dataclass
class CertifiedRun:
    agent: AgentUnderTest
    config: dict[str, Any]
    enrolled: EnrolledKey
    started: list[AppEvent]
    inputs: list[AppEvent]
    built: list[AppEvent]
    status: TrainingStatus
    log_lines: list[str]
    outputs: list[AppEvent]
    evidence: Evidence

    def of_type(self, kind: type) -> list[Any]:
        parsed = [parse_event(e, i) for i, e in enumerate(self.evidence.event_log)]
        return [p for p in parsed if isinstance(p, kind)]


@pytest.fixture(scope="module")
def certified(
    provision: Provisioner,
    make_config: ConfigFactory,
    resource_files: ResourceFiles,
    docker_client: docker.DockerClient,
) -> Iterator[CertifiedRun]:
    base = resource_files.base_url
    resources = [
        {
            "url": f"{base}/init-weights.txt",
            "destinationPath": "weights/init.txt",
            "sha256": sha256_hex(resource_files.served["init-weights.txt"]),
        },
        {"url": f"{base}/labels.txt", "destinationPath": "labels.txt"},
        {"url": resource_files.local_file.as_uri(), "destinationPath": "extra/notes.txt"},
    ]
    config = make_config(tag="v1", resources=resources, env={"EPOCHS": str(EPOCHS)})
    with provision("e2e") as agent:
        run_id = agent.run_id
        started, enrolled = agent.start(config)
        inputs = agent.client.measure_inputs(run_id)
        built = agent.client.build_image(run_id)
        status, lines = agent.train()
        outputs = agent.client.measure_outputs(run_id)
        evidence = agent.client.quote(run_id)
        try:
            yield CertifiedRun(
                agent, config, enrolled, started, inputs, built, status, lines, outputs, evidence
            )
        finally:
            for event in built:
                if event.type == "aicert.input.image":
                    try:
                        docker_client.images.remove(event.data["name"])
                    except docker.errors.APIError:
                        pass


def test_certificate_verifies_with_the_sdk(certified: CertifiedRun, tmp_path: Path) -> None:
    certificate = assemble_certificate(
        evidence=certified.evidence,
        enrolled=certified.enrolled,
        project="agent-e2e",
        provider="local",
    )
    path = tmp_path / "proof.json"
    path.write_bytes(certificate.to_json_bytes())
    outputs_dir = certified.agent.workspace / "outputs"
    report = aicert.load(path).verify(
        trusted_roots=[certified.enrolled.trusted_root_pem],
        allow_dev_platform=True,
        model=outputs_dir,  # re-hashes the outputs on disk against the certificate
    )
    assert report.run_id == certified.agent.run_id
    assert report.nonce == certified.agent.nonce.hex()
    assert report.exit_code == 0
    assert report.boot_chain_attested is False
    on_disk = {d.path: d.sha256 for d in hash_tree(outputs_dir)}
    assert {o.path: o.digest["sha256"] for o in report.outputs} == on_disk
    assert set(on_disk) == {"model.bin", "checkpoints/last.json"}
    kinds = [item.kind for item in report.inputs]
    assert kinds.count("resource") == 3 and kinds.count("package") == 1
    assert "source" in kinds and "config" in kinds


def test_the_standard_tools_accept_the_statements_the_agent_signed(
    certified: CertifiedRun, tmp_path: Path
) -> None:
    """The agent's TPM-signed statements, exported from the certificate: the unmodified
    ``model_signing verify certificate`` accepts the outputs and refuses a changed file; the
    SLSA envelope verifies with securesystemslib given the AK certificate's key."""
    certificate = assemble_certificate(
        evidence=certified.evidence,
        enrolled=certified.enrolled,
        project="agent-e2e",
        provider="local",
    )
    assert [s.kind for s in certificate.signed_statements or []] == [
        "model-signing",
        "slsa-provenance",
    ]
    proof, root = tmp_path / "proof.json", tmp_path / "platform-ca.pem"
    proof.write_bytes(certificate.to_json_bytes())
    root.write_text(certified.enrolled.trusted_root_pem)
    trust = ["--trust-root", root, "--allow-dev-platform"]
    model = Path(shutil.copytree(certified.agent.workspace / "outputs", tmp_path / "model"))
    exported = run_export(proof, "-f", "model-signing", "-o", model / "model.sig", *trust)
    assert exported.exit_code == 0, exported.output
    accepted = run_model_signing(model, root)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    (model / "model.bin").write_bytes(b"other weights")
    refused = run_model_signing(model, root)
    assert refused.returncode != 0
    assert "model.bin" in refused.stdout + refused.stderr

    provenance = tmp_path / "provenance.intoto.json"
    exported = run_export(proof, "-f", "slsa", "-o", provenance, *trust)
    assert exported.exit_code == 0, exported.output
    envelope = Envelope.from_dict(json.loads(provenance.read_bytes()))
    envelope.verify([sslib_key(certificate)], 1)
    statement = json.loads(envelope.payload)
    assert {s["name"] for s in statement["subject"]} == {"model.bin", "checkpoints/last.json"}
    dependencies = statement["predicate"]["buildDefinition"]["resolvedDependencies"]
    commit = certified.of_type(SourceEvent)[0].commit
    assert any(d.get("uri", "").endswith(f"@{commit}") for d in dependencies)


def test_replayed_event_log_equals_the_quoted_pcrs(certified: CertifiedRun) -> None:
    evidence = certified.evidence
    # The log in the evidence is exactly what the steps returned, in order.
    steps = certified.started + certified.inputs + certified.built + certified.outputs
    assert evidence.event_log == steps
    replayed = replay(evidence.event_log)
    assert replayed[14] == bytes.fromhex(evidence.pcrs["14"])
    assert replayed[15] == bytes.fromhex(evidence.pcrs["15"])
    assert replayed[14] != bytes(32) and replayed[15] != bytes(32)
    # The quote signs those values, with the run's nonce.
    pcrs = {int(index): bytes.fromhex(value) for index, value in evidence.pcrs.items()}
    assert sorted(pcrs) == list(range(16))
    verify_quote(evidence.attest, evidence.signature, evidence.ak_public, evidence.nonce, pcrs)
    assert evidence.nonce == certified.agent.nonce


def test_events_are_measured_in_the_documented_order(certified: CertifiedRun) -> None:
    types = [event.type for event in certified.evidence.event_log]
    outputs = len(certified.of_type(OutputFileEvent))
    assert types == [
        "aicert.runtime",
        "aicert.input.config",
        "aicert.input.image",  # base
        "aicert.input.source",
        *["aicert.input.resource"] * 3,
        "aicert.input.package",
        "aicert.input.image",  # training, last of the inputs
        *["aicert.output.file"] * outputs,
        "aicert.output.result",
        "aicert.output.signed-statements",  # after the result, before the quote
    ]
    assert [e.pcr for e in certified.evidence.event_log] == [14] * 9 + [15] * (outputs + 2)
    (runtime,) = certified.of_type(RuntimeEvent)
    assert runtime.run_id == certified.agent.run_id
    assert runtime.nonce == certified.agent.nonce.hex()
    assert runtime.runtime_version == RUNTIME_VERSION
    assert runtime.platform == "local"


def test_config_event_holds_the_validated_config(certified: CertifiedRun) -> None:
    (config_event,) = certified.of_type(ConfigEvent)
    validated = parse_config(certified.config).measured_form()
    assert config_event.config == validated
    # Defaults are filled in, so the measured config says everything that applied.
    assert config_event.config["image"] == "aicert/python-base:bookworm"
    assert config_event.config["outputs"] == "/workspace/outputs"
    assert config_event.config["limits"]["pids"] == 4096


def test_source_event_binds_the_tagged_commit_and_its_tree(
    certified: CertifiedRun, training_repo: TrainingRepo, tmp_path: Path
) -> None:
    (source,) = certified.of_type(SourceEvent)
    tagged = subprocess.run(
        ["git", "rev-parse", "v1^{commit}"],
        cwd=training_repo.path,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"],
        cwd=training_repo.path,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert tagged != head  # the branch moved on after the tag
    assert source.commit == tagged
    assert source.ref == "v1"
    assert source.url == str(training_repo.path)
    checkout = tmp_path / "checkout"
    subprocess.run(
        ["git", "clone", "--quiet", "--branch", "v1", str(training_repo.path), str(checkout)],
        check=True,
        capture_output=True,
    )
    shutil.rmtree(checkout / ".git")
    digests = hash_tree(checkout)
    assert source.tree_sha256 == tree_sha256(digests)
    assert source.file_count == len(digests)
    assert source.size == sum(d.size for d in digests)


def test_resources_are_measured_and_mounted_for_the_job(
    certified: CertifiedRun, resource_files: ResourceFiles
) -> None:
    measured = {r.destination: r for r in certified.of_type(ResourceEvent)}
    expected = {
        "weights/init.txt": resource_files.served["init-weights.txt"],
        "labels.txt": resource_files.served["labels.txt"],
        "extra/notes.txt": resource_files.local_content,
    }
    assert set(measured) == set(expected)
    for destination, content in expected.items():
        event = measured[destination]
        assert (event.sha256, event.size) == (sha256_hex(content), len(content))
        # The job saw the same bytes at /workspace/resources/<destinationPath>.
        line = f"resource {destination} size={len(content)} sha256={sha256_hex(content)}"
        assert line in certified.log_lines
        on_disk = certified.agent.workspace / "resources" / destination
        assert on_disk.read_bytes() == content
    assert measured["extra/notes.txt"].url == resource_files.local_file.as_uri()


def test_dependencies_are_measured_wheels_installed_offline(
    certified: CertifiedRun, docker_client: docker.DockerClient
) -> None:
    assert [e.type for e in certified.built] == ["aicert.input.package", "aicert.input.image"]
    (package,) = certified.of_type(PackageEvent)
    assert (package.name, package.version) == ("six", "1.16.0")
    wheel = certified.agent.workspace / "wheels" / package.filename
    assert sha256_file(wheel) == (package.sha256, package.size)
    base, training = certified.of_type(ImageEvent)
    assert (base.role, training.role) == ("base", "training")
    assert base.image_id == docker_client.images.get("aicert/python-base:bookworm").id
    assert training.image_id == docker_client.images.get(training.name).id
    assert training.image_id != base.image_id
    # The job (no network) imported six from the image's venv.
    assert any(line.startswith("six 1.16.0 from /opt/venv/") for line in certified.log_lines), (
        certified.log_lines
    )


def test_training_logs_stream_in_order(certified: CertifiedRun) -> None:
    assert certified.status.state == "succeeded"
    assert certified.status.exit_code == 0
    epochs = [line for line in certified.log_lines if line.startswith("epoch ")]
    assert [line.split()[1] for line in epochs] == [f"{i}/{EPOCHS}" for i in range(1, EPOCHS + 1)]
    assert certified.log_lines[-1] == "training done"
    assert certified.status.log_lines == len(certified.log_lines)
    # The log file on disk holds the same lines; reading from an offset gives the rest.
    log_file = certified.agent.workspace / "logs" / "training.log"
    assert log_file.read_text().splitlines() == certified.log_lines
    chunk = certified.agent.client.read_logs(certified.agent.run_id, offset=5, wait_s=0)
    assert chunk.lines == certified.log_lines[5:]
    assert chunk.finished and chunk.next_offset == len(certified.log_lines)


def test_outputs_are_measured_sorted_then_the_result(certified: CertifiedRun) -> None:
    outputs = certified.of_type(OutputFileEvent)
    digests = hash_tree(certified.agent.workspace / "outputs")
    assert [(o.path, o.size, o.sha256) for o in outputs] == [
        (d.path, d.size, d.sha256) for d in digests
    ]
    (result,) = certified.of_type(ResultEvent)
    assert result.exit_code == 0
    assert result.duration_ms == certified.status.duration_ms
    assert [e.type for e in certified.outputs[-2:]] == [
        "aicert.output.result",
        "aicert.output.signed-statements",
    ]


def test_fifty_quotes_in_a_row_do_not_exhaust_the_tpm(certified: CertifiedRun) -> None:
    client, run_id = certified.agent.client, certified.agent.run_id
    attests = set()
    for _ in range(50):
        evidence = client.quote(run_id)
        assert evidence.pcrs == certified.evidence.pcrs
        attests.add(evidence.attest)
    assert len(attests) == 50  # each one a fresh quote (the TPM clock moves)
    pcrs = {int(index): bytes.fromhex(value) for index, value in evidence.pcrs.items()}
    verify_quote(evidence.attest, evidence.signature, evidence.ak_public, evidence.nonce, pcrs)
