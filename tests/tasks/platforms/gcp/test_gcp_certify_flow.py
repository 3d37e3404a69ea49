"""The whole ``certify-training`` flow on the gcp platform: the closest run to Google Cloud
possible here, and NOT a run on Google Cloud.

The flow loads a saved ``GcpPlatform`` block and runs unchanged. What stands in for Google:

- Compute Engine is ``FakeCompute`` on 127.0.0.1, reached by the real google-cloud-compute
  client with anonymous credentials (``default_credentials`` is the one function replaced).
- The VM is ``GceVmHost``: when the double reports the instance made, a swtpm is dressed as a
  GCE vTPM (AK template in NV 0x01c10001, the leaf certificate of the key it gives in
  0x01c10000 under a generated chain of Google's shape, whose root and intermediate the
  provider is told to use, as Google's roots are pinned), its PCR 0-9 and 14 are extended
  with a real GCE boot event log (``cos-85-amd-sev.bin``), and the real guest agent starts
  ``--platform gcp --tls --boot-event-log``. Deleting the instance stops it. The training runs
  in this host's Docker.
- The reference values are derived from that log as the image publisher would.

Checked: a certificate that verifies as ``gcp`` with the boot chain attested, its AK chain
completed to the root by the orchestrator; Compute Engine saw the firewall rule and the
instance created, then both deleted; a failing training still deletes both.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from google.auth.credentials import AnonymousCredentials
from prefect.states import State

import aicert
from aicert.errors import PlatformError
from aicert.flows.flows import certify_training
from aicert.flows.gcp_platform import GcpPlatform
from aicert.reference_values import load_reference_values
from aicert.tasks.platforms.gcp import GcpProvider, RunResources
from aicert.tasks.platforms.gcp import provider as gcp_provider
from tests.aicert_flows.conftest import (
    FAILING_SCRIPT,
    TRAIN_SCRIPT,
    flush_prefect_workers,
    make_git_repo,
    training_config,
    unique_project,
    write_config,
)
from tests.tasks.platforms.gcp.fake_compute import FakeCompute
from tests.tasks.platforms.gcp.vm_double import (
    ISSUED,
    GceVmHost,
    gce_boot_log,
    write_reference_values,
)
from tests.verification.gcp_like import GoogleLikeCa

pytestmark = [pytest.mark.swtpm, pytest.mark.docker, pytest.mark.slow]

IMAGE = "projects/aicert-images/global/images/aicert-guest-1-0-0"
REFERENCE_ID = "aicert-guest-1-0-0"


@pytest.fixture(scope="module")
def ca() -> GoogleLikeCa:
    return GoogleLikeCa.create(ISSUED)


@pytest.fixture(scope="module")
def reference_values(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_reference_values(tmp_path_factory.mktemp("reference"), IMAGE)


@dataclass
class GcpFlowRun:
    home: Path
    state: State[Any]
    result: Any
    fake: FakeCompute
    host: GceVmHost

    @property
    def run_id(self) -> str:
        (run_id,) = sorted(p.name for p in (self.home / "runs").iterdir())
        return run_id

    def changes(self) -> list[tuple[str, str]]:
        return [
            (r.method, r.path.split("/aicert-tests/", 1)[1])
            for r in self.fake.state.requests
            if r.method in ("POST", "DELETE")
        ]


def trust_the_test_google(monkeypatch: pytest.MonkeyPatch, ca: GoogleLikeCa) -> None:
    """What a real run gets from outside: credentials (here anonymous ones, which the double
    accepts) and Google's roots (here the generated root, trusted on purpose, and its
    intermediate, which the package does not ship)."""
    monkeypatch.setattr(gcp_provider, "default_credentials", AnonymousCredentials)
    make_provider = GcpPlatform.provider

    def provider_trusting_the_test_root(self: GcpPlatform) -> GcpProvider:
        provider = make_provider(self)
        provider.extra_trusted_root_pems = (ca.root.pem,)
        provider.extra_intermediate_pems = (ca.intermediate.pem,)
        return provider

    monkeypatch.setattr(GcpPlatform, "provider", provider_trusting_the_test_root)


def certify_on_fake_gcp(
    root: Path, ca: GoogleLikeCa, reference_values: Path, script: str = TRAIN_SCRIPT
) -> GcpFlowRun:
    make_git_repo(root / "project", {"train.py": script})
    config = write_config(
        root / "aicert.yaml", training_config(unique_project("gcpflow"), "project")
    )
    home = root / "aicert-home"
    block_name = f"fake-gcp-{uuid.uuid4().hex[:8]}"
    with (
        GceVmHost(root / "vms", ca, gce_boot_log()) as host,
        FakeCompute(host) as fake,
        pytest.MonkeyPatch.context() as monkeypatch,
    ):
        GcpPlatform(
            project="aicert-tests",
            zone="us-central1-a",
            image=IMAGE,
            orchestrator_cidr="203.0.113.7/32",
            api_endpoint=fake.endpoint,
            agent_port=host.port,
            agent_start_timeout_s=120,
            poll_interval_s=0.05,
            reference_values=str(reference_values),
        ).save(block_name)
        monkeypatch.setenv("AICERT_HOME", str(home))
        trust_the_test_google(monkeypatch, ca)
        state = certify_training(
            config_path=str(config),
            platform_block=f"aicert-gcp-platform/{block_name}",
            return_state=True,
        )
        result = state.result(raise_on_failure=False)
    flush_prefect_workers()
    assert host.boot_errors() == []
    return GcpFlowRun(home, state, result, fake, host)


def assert_everything_deleted(run: GcpFlowRun) -> None:
    names = RunResources.for_run(run.run_id)
    assert run.changes() == [
        ("POST", "global/firewalls"),
        ("POST", "zones/us-central1-a/instances"),
        ("DELETE", f"zones/us-central1-a/instances/{names.instance}"),
        ("DELETE", f"global/firewalls/{names.firewall}"),
    ]
    assert run.fake.state.instances == {} and run.fake.state.firewalls == {}
    (vm,) = run.host.vms
    assert vm.deleted and vm.agent is not None and vm.agent.process.poll() is not None
    assert not any((run.home / "active").glob("*.json")), "a flow run record was left"


@pytest.fixture(scope="module")
def certified(
    tmp_path_factory: pytest.TempPathFactory,
    prefect_api_url: str,
    base_image: str,
    ca: GoogleLikeCa,
    reference_values: Path,
) -> GcpFlowRun:
    return certify_on_fake_gcp(tmp_path_factory.mktemp("certified"), ca, reference_values)


def test_flow_certifies_and_the_certificate_verifies_as_gcp(
    certified: GcpFlowRun, ca: GoogleLikeCa, reference_values: Path
) -> None:
    assert certified.state.is_completed(), certified.state.message
    certificate = aicert.load(certified.result["certificate"]["path"])
    assert certificate.platform.kind == "gcp"
    assert certificate.platform.reference_values == REFERENCE_ID
    assert certificate.boot_event_log == gce_boot_log()
    # The VM gave the leaf only; the orchestrator completed the chain to the root.
    subjects = [
        x509.load_pem_x509_certificate(pem.encode()).subject.rfc4514_string()
        for pem in certificate.attestation.ak.certificate_chain
    ]
    assert "O=Google Compute Engine" in subjects[0]
    assert [subject.split(",")[0] for subject in subjects[1:]] == [
        "CN=EK/AK CA Intermediate",
        "CN=EK/AK CA Root",
    ]
    reference = load_reference_values(reference_values, platform="gcp")
    report = certificate.verify(trusted_roots=[ca.root.pem], reference_values=reference)
    assert report.platform == "gcp" and report.boot_chain_attested is True
    assert report.platform_note.startswith(
        f"boot chain matches Google Cloud reference values {REFERENCE_ID} (image {IMAGE})"
    )
    assert sorted(o.path for o in report.outputs) == ["metrics/loss.txt", "model.json"]
    with pytest.raises(PlatformError, match="no reference-value set"):
        certificate.verify(trusted_roots=[ca.root.pem])


def test_compute_engine_saw_the_creations_then_the_deletions(certified: GcpFlowRun) -> None:
    assert_everything_deleted(certified)
    (firewall,) = [r.body for r in certified.fake.state.requests if r.path.endswith("firewalls")]
    assert firewall is not None and firewall["sourceRanges"] == ["203.0.113.7/32"]


@pytest.fixture(scope="module")
def failed_training(
    tmp_path_factory: pytest.TempPathFactory,
    prefect_api_url: str,
    base_image: str,
    ca: GoogleLikeCa,
    reference_values: Path,
) -> GcpFlowRun:
    return certify_on_fake_gcp(
        tmp_path_factory.mktemp("failed"), ca, reference_values, script=FAILING_SCRIPT
    )


def test_a_failing_training_still_deletes_the_vm_and_the_firewall_rule(
    failed_training: GcpFlowRun,
) -> None:
    run = failed_training
    assert run.state.is_failed()
    assert "exited with code 1" in str(run.state.message)
    assert not (run.home / "runs" / run.run_id / "certificate.json").exists()
    assert_everything_deleted(run)
