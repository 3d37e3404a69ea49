"""The whole ``certify-training`` flow on the azure platform: the closest run to Azure possible
here, and NOT a run on Azure.

The flow loads a saved ``AzurePlatform`` block and runs unchanged. What stands in for Azure:

- Resource Manager is ``FakeArm`` on 127.0.0.1 (recorded response shapes, long-running
  operations polled), reached by the real azure SDK clients with a static bearer token (no
  Entra ID sign-in: ``resolve_credential`` is the one function replaced).
- The VM is ``AzureVmHost``: when ARM reports the VM created, a swtpm is dressed as an Azure
  vTPM (AK persisted at 0x81000003 by tpm2-tools, its certificate in NV 0x01C101D0 under a
  generated root shaped like Microsoft's, which the provider is told to trust), its PCR 0-9
  and 14 are extended with the digests of a real boot event log (a RHEL 9 UEFI VM: Secure
  Boot, shim, GRUB, MOK lists in PCR 14; no Azure log is available), and the real guest agent
  starts on it with ``--tls`` and ``--boot-event-log``, as the image's unit does.
  Deleting the VM stops it. The training runs in this host's Docker.
- The reference values come from the image publisher's procedure on a "reference VM" of the
  same image: ``collect-boot-evidence.sh`` with tpm2-tools, then ``derive-azure``.

Checked: a certificate that verifies as ``azure`` with the boot chain attested; ARM saw the
creations, then the deletions of everything tagged with the run; the outputs and the training
log were downloaded; a machine-in-the-middle on the agent's port and a boot of another kernel
command line both stop the run before ``start-run`` (nothing of the run reaches PCR 14) and the
VM is still deleted; a failing training still deletes the VM after downloading its outputs.
Azure as it really behaves (issue 17): a VM whose guest sees a zero-byte boot log (Trusted
Launch) and whose AK certificate is issued by the "CA - 11" -> "CA 2025" hierarchy, whose
intermediates only AIA URLs (a local http server) give, is certified: the orchestrator
completes the chain and the boot is judged by the PCR values ``record-azure`` recorded.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from prefect.client.orchestration import get_client
from prefect.states import State

import aicert
from aicert.appevents import ChannelKeyEvent, application_pcr_start
from aicert.errors import CertificateChainError, PlatformError
from aicert.flows.azure_platform import AzurePlatform
from aicert.flows.flows import certify_training
from aicert.reference_values import (
    AzureReferenceValueSet,
    classify_boot_events,
    load_reference_values,
)
from aicert.reference_values import main as reference_values_main
from aicert.tasks.platforms.attestation import expected_channel_pcr
from aicert.tasks.platforms.azure import AICERT_RUN_TAG, AzureProvider, arm
from aicert.tasks.platforms.swtpm import LocalSwtpm
from aicert.tcg_eventlog import parse_event_log
from tests import REPO_ROOT
from tests.aicert_flows.conftest import (
    FAILING_SCRIPT,
    TRAIN_SCRIPT,
    flush_prefect_workers,
    make_git_repo,
    task_runs_of,
    training_config,
    unique_project,
    write_config,
)
from tests.tasks.platforms.azure.fake_arm import (
    RUN_CREATIONS,
    RUN_DELETIONS,
    TEST_IMAGE_ID,
    TEST_ORCHESTRATOR,
    TEST_RESOURCE_GROUP,
    TEST_SSH_KEY,
    FakeArm,
    StaticTokenCredential,
)
from tests.tasks.platforms.azure.guest import (
    REFERENCE_ID,
    AzureLikeCa,
    IssuingCa,
    azure_like_ca,
    boot_log,
    dress_as_azure_vtpm,
    replay_boot_log,
    tpm2,
)
from tests.tasks.platforms.azure.hierarchies import CA11, CA2025, AiaCa, aia_server, cert_path
from tests.tasks.platforms.azure.vm_double import AzureVmHost, BootedVm, VmImage

pytestmark = [pytest.mark.swtpm, pytest.mark.docker, pytest.mark.slow]

COLLECT = REPO_ROOT / "deployments" / "azure" / "collect-boot-evidence.sh"
CREATED = list(RUN_CREATIONS)
DELETED = [("DELETE", type_name) for type_name in RUN_DELETIONS]


def with_root_writable(raw: bytes) -> bytes:
    """The same boot with the root mounted ``rw`` instead of ``ro`` on the kernel command
    line GRUB measured into PCR 8: event data and every bank's digest edited in place (same
    length), so the log still replays to the PCRs such a boot would have."""
    log = parse_event_log(raw)
    (event,) = [
        found
        for found in classify_boot_events(log)
        if found.kind == "kernel_command_line" and found.pcr == 8
    ]
    (record,) = [e for e in log.events if e.index == event.index]
    data = record.data.replace(b" ro ", b" rw ")
    assert data != record.data and raw.count(record.data) == 1
    # GRUB measures the command line without its "kernel_cmdline: " prefix and NUL.
    command_line = data.rstrip(b"\x00").split(b": ", 1)[1]
    edited = raw.replace(record.data, data)
    for bank, digest in record.digests.items():
        assert edited.count(digest) == 1
        edited = edited.replace(digest, hashlib.new(bank, command_line).digest())
    return edited


# -- the publisher's side, and trust in the generated root --------------------------------------


@pytest.fixture(scope="module")
def ca() -> AzureLikeCa:
    return azure_like_ca()


@dataclass(frozen=True)
class Published:
    reference_values: Path
    reference: AzureReferenceValueSet
    root_pem: Path
    # The same set with the reference boot's PCR values recorded (record-azure): what judges
    # a boot whose event log is empty.
    logless_reference_values: Path


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory, ca: AzureLikeCa) -> Published:
    """README section 3 on a reference VM of the image: boot it, collect its evidence with the
    image's script, derive the set (checking the AK certificate and the quote first)."""
    workdir = tmp_path_factory.mktemp("reference-vm")
    swtpm = LocalSwtpm.create(workdir / "tpm", workdir / "ek-ca")
    swtpm.start()
    try:
        chain = dress_as_azure_vtpm(swtpm.tcti, workdir, ca)
        replay_boot_log(swtpm.tcti, boot_log(), workdir / "tools")
        # PCR 0-9 and 14 before any agent ran: what record-azure records for log-less boots.
        (workdir / "pcrs-0-9-14.txt").write_text(
            tpm2(swtpm.tcti, "tpm2_pcrread", "sha256:0,1,2,3,4,5,6,7,8,9,14", cwd=workdir)
        )
        (workdir / "binary_bios_measurements").write_bytes(boot_log())
        nonce = secrets.token_hex(32)
        subprocess.run(
            ["sh", str(COLLECT), str(workdir / "evidence"), nonce],
            env={
                **os.environ,
                "TPM2TOOLS_TCTI": swtpm.tcti,
                "AICERT_BOOT_EVENT_LOG": str(workdir / "binary_bios_measurements"),
            },
            check=True,
            capture_output=True,
            timeout=120,
        )
    finally:
        swtpm.stop()
    evidence = workdir / "evidence"
    (workdir / "intermediates.pem").write_text(chain.intermediate.pem)
    root_pem = workdir / "root.pem"
    root_pem.write_text(chain.root.pem)
    output = workdir / "reference-values.json"
    status = reference_values_main(
        [
            "derive-azure",
            "--event-log", str(evidence / "binary_bios_measurements"),
            "--pcrs", str(evidence / "pcrs.txt"),
            "--image-version", TEST_IMAGE_ID,
            "--id", REFERENCE_ID,
            "--quote", str(evidence / "quote.msg"),
            "--signature", str(evidence / "quote.sig"),
            "--ak-public", str(evidence / "ak.pub"),
            "--nonce", nonce,
            "--ak-certificate", str(evidence / "ak-cert.bin"),
            "--intermediates", str(workdir / "intermediates.pem"),
            "--trust-root", str(root_pem),
            "--output", str(output),
        ]
    )  # fmt: skip
    assert status == 0
    logless = workdir / "reference-values-logless.json"
    status = reference_values_main(
        [
            "record-azure",
            "--pcrs", str(workdir / "pcrs-0-9-14.txt"),
            "--vm-family", "Standard_DSv5",
            "--reference-values", str(output),
            "--output", str(logless),
        ]
    )  # fmt: skip
    assert status == 0
    return Published(output, load_reference_values(output, platform="azure"), root_pem, logless)


def trust_the_test_azure(monkeypatch: pytest.MonkeyPatch, ca: IssuingCa) -> None:
    """The two things a real Azure run gets from outside: a token for ARM (here FakeArm's), and
    Microsoft's vTPM root (here the generated root, trusted on purpose as the provider allows)."""
    monkeypatch.setattr(arm, "default_credential", lambda: StaticTokenCredential())
    make_provider = AzurePlatform.provider

    def provider_trusting_the_test_root(self: AzurePlatform) -> AzureProvider:
        provider = make_provider(self)
        provider.extra_trusted_root_pems = (ca.root.pem,)
        return provider

    monkeypatch.setattr(AzurePlatform, "provider", provider_trusting_the_test_root)


# -- one flow run on the fake Azure --------------------------------------------------------------


@dataclass
class AzureFlowRun:
    project: str
    home: Path
    state: State[Any]
    result: Any
    task_states: dict[str, str]
    fake: FakeArm
    host: AzureVmHost

    @property
    def run_id(self) -> str:
        (run_id,) = sorted(p.name for p in (self.home / "runs").iterdir())
        return run_id

    @property
    def vm(self) -> BootedVm:
        assert self.host.boot_errors() == []
        (vm,) = self.host.vms
        return vm

    def timeline(self) -> list[tuple[str, str]]:
        """Successful ARM calls on resources and the tag listing, in order (no polls)."""
        return [
            (r.method, r.type_name or r.path.rsplit("/", 1)[-1])
            for r in self.fake.requests
            if r.response_status < 300 and "/operations" not in r.path.lower()
        ]

    def task_ran(self, prefix: str) -> list[str]:
        return [name for name in self.task_states if name.startswith(prefix)]


def certify_on_fake_azure(
    root: Path,
    ca: IssuingCa,
    published: Published,
    *,
    image: VmImage,
    script: str = TRAIN_SCRIPT,
    with_reference_values: bool = True,
) -> AzureFlowRun:
    project = unique_project("azureflow")
    make_git_repo(root / "project", {"train.py": script})
    config = write_config(root / "aicert.yaml", training_config(project, "project"))
    home = root / "aicert-home"
    block_name = f"fake-azure-{uuid.uuid4().hex[:8]}"
    with (
        AzureVmHost(root / "vms", ca, image) as host,
        FakeArm(vm_lifecycle=host) as fake,
        pytest.MonkeyPatch.context() as monkeypatch,
    ):
        AzurePlatform(
            subscription_id=fake.subscription_id,
            resource_group=TEST_RESOURCE_GROUP,
            location="westeurope",
            image_id=TEST_IMAGE_ID,
            orchestrator_cidr=TEST_ORCHESTRATOR,
            ssh_public_key=TEST_SSH_KEY,
            reference_values=(
                str(
                    published.reference_values
                    if image.log_handed_over
                    else published.logless_reference_values
                )
                if with_reference_values
                else None
            ),
            arm_endpoint=fake.url,
            agent_port=host.port,
            agent_start_timeout_seconds=120,
            polling_interval_seconds=0.05,
        ).save(block_name)
        monkeypatch.setenv("AICERT_HOME", str(home))
        trust_the_test_azure(monkeypatch, ca)
        state = certify_training(
            config_path=str(config),
            platform_block=f"aicert-azure-platform/{block_name}",
            return_state=True,
        )
        result = state.result(raise_on_failure=False)
    flush_prefect_workers()
    with get_client(sync_client=True) as client:
        task_states = {
            t.name: t.state.type.value if t.state else "NONE"
            for t in task_runs_of(client, state.state_details.flow_run_id)
        }
    return AzureFlowRun(project, home, state, result, task_states, fake, host)


def assert_everything_deleted(run: AzureFlowRun) -> None:
    """ARM: the creations, then the listing by the run's tag, then every deletion in
    dependency order, once; nothing left. The VM double: its agent and TPM are gone."""
    timeline = run.timeline()
    changes = [call for call in timeline if call[0] in ("PUT", "PATCH", "DELETE")]
    assert changes == CREATED + DELETED, changes
    assert timeline.index(("GET", "resources")) < timeline.index(DELETED[0])
    for request in run.fake.calls("PUT"):
        assert request.body["tags"][AICERT_RUN_TAG] == run.run_id
    assert run.fake.resources() == []
    assert run.vm.deleted and run.host.running() == []
    assert not any((run.home / "active").glob("*.json")), "a flow run record was left"


def assert_stopped_before_start_run(run: AzureFlowRun) -> None:
    """Nothing of the run reached the machine: no start-run task, no workspace on the VM, and
    PCR 14 held only the agent's channel key when the VM was deleted."""
    assert run.task_ran("start-run") == [] and run.task_ran("measure-inputs") == []
    vm = run.vm
    assert vm.agent is not None and vm.final_pcrs, "the VM's TPM was not read at deletion"
    # What shim left in PCR 14 at boot, then the agent's channel key: nothing of the run.
    boot_start = application_pcr_start(boot_log())[14]  # both boots differ in PCR 8 only
    assert boot_start != bytes(32)
    channel_only, _ = expected_channel_pcr(vm.agent.certificate_pem, boot_start)
    assert vm.final_pcrs[14] == channel_only
    assert vm.final_pcrs[15] == bytes(32)
    assert not vm.agent.work_root.exists() or list(vm.agent.work_root.iterdir()) == []
    assert not (run.home / "runs" / run.run_id / "certificate.json").exists()


# -- a certified run -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certified(
    tmp_path_factory: pytest.TempPathFactory,
    prefect_api_url: str,
    base_image: str,
    ca: AzureLikeCa,
    published: Published,
) -> AzureFlowRun:
    return certify_on_fake_azure(
        tmp_path_factory.mktemp("certified"), ca, published, image=VmImage(boot_log())
    )


def test_flow_certifies_and_the_certificate_verifies_as_azure(
    certified: AzureFlowRun, published: Published
) -> None:
    assert certified.state.is_completed(), certified.state.message
    assert all(state == "COMPLETED" for state in certified.task_states.values())
    certificate = aicert.load(certified.result["certificate"]["path"])
    assert certificate.platform.kind == "azure"
    assert certificate.platform.reference_values == REFERENCE_ID
    assert certificate.boot_event_log == boot_log()

    report = certificate.verify(
        trusted_roots=[published.root_pem], reference_values=published.reference
    )
    assert report.platform == "azure"
    assert report.boot_chain_attested is True
    assert REFERENCE_ID in report.platform_note and "NOT checked" in report.platform_note
    assert "Azure Virtual TPM Root Certificate Authority 2023" in report.ak_root_subject
    assert sorted(o.path for o in report.outputs) == ["metrics/loss.txt", "model.json"]
    assert certified.result["report"]["boot_chain_attested"] is True
    # The set was derived as the publisher does: from a quote by a certified AK.
    assert published.reference.provenance["quote_verified"] is True


def test_the_certificate_needs_the_reference_values_and_the_trusted_root(
    certified: AzureFlowRun, published: Published
) -> None:
    certificate = aicert.load(certified.result["certificate"]["path"])
    with pytest.raises(PlatformError, match="no reference-value set"):
        certificate.verify(trusted_roots=[published.root_pem])
    # The generated root is not Microsoft's: only the pinned fingerprint refuses it.
    with pytest.raises(CertificateChainError):
        certificate.verify(reference_values=published.reference)


def test_the_channel_was_the_attested_vms(certified: AzureFlowRun) -> None:
    """The run's first PCR 14 event is the key of the TLS certificate the VM's agent served,
    and the TPM's PCR 14 when the VM was deleted is the one the certificate's quote shows."""
    vm = certified.vm
    assert vm.agent is not None and vm.agent.certificate_pem is not None
    certificate = aicert.load(certified.result["certificate"]["path"])
    first = certificate.event_log[0]
    assert first.type == ChannelKeyEvent.TYPE
    served = ChannelKeyEvent.for_certificate(vm.agent.certificate_pem.encode())
    assert first.data["public_key_sha256"] == served.public_key_sha256
    quoted = {int(index): value for index, value in certificate.attestation.quote.pcrs.items()}
    assert quoted[14] == vm.final_pcrs[14].hex()
    assert quoted[9] == vm.agent.boot_pcrs[9].hex()


def test_arm_saw_the_creations_then_the_deletions(certified: AzureFlowRun) -> None:
    assert_everything_deleted(certified)
    vm_body = certified.fake.calls("PUT", "virtualMachines")[0].body
    security = vm_body["properties"]["securityProfile"]
    assert security["uefiSettings"] == {"secureBootEnabled": True, "vTpmEnabled": True}


def test_outputs_and_training_log_were_downloaded(certified: AzureFlowRun) -> None:
    workspace = Path(certified.result["workspace"])
    assert workspace == certified.home / "runs" / certified.run_id / "workspace"
    assert (workspace / "outputs" / "model.json").is_file()
    assert "training-marker: done" in (workspace / "logs" / "training.log").read_text()
    # What was downloaded is what the certificate binds.
    certificate = aicert.load(certified.result["certificate"]["path"])
    certificate.verify_artifact(workspace / "outputs" / "model.json")


# -- runs stopped before start-run ---------------------------------------------------------------


@pytest.fixture(scope="module")
def intercepted(
    tmp_path_factory: pytest.TempPathFactory,
    prefect_api_url: str,
    ca: AzureLikeCa,
    published: Published,
) -> AzureFlowRun:
    return certify_on_fake_azure(
        tmp_path_factory.mktemp("intercepted"),
        ca,
        published,
        image=VmImage(boot_log(), intercept_channel=True),
    )


def test_a_machine_in_the_middle_stops_the_run_at_attest_machine(
    intercepted: AzureFlowRun,
) -> None:
    assert intercepted.state.is_failed()
    assert "ChannelBindingError" in str(intercepted.state.message)
    assert "does not hold the channel key" in str(intercepted.state.message)
    assert [intercepted.task_states[name] for name in intercepted.task_ran("attest-machine")] == [
        "FAILED"
    ]
    assert_stopped_before_start_run(intercepted)
    assert_everything_deleted(intercepted)


@pytest.fixture(scope="module")
def other_boot(
    tmp_path_factory: pytest.TempPathFactory,
    prefect_api_url: str,
    ca: AzureLikeCa,
    published: Published,
) -> AzureFlowRun:
    return certify_on_fake_azure(
        tmp_path_factory.mktemp("other-boot"),
        ca,
        published,
        image=VmImage(with_root_writable(boot_log())),
    )


def test_a_boot_that_differs_from_the_reference_values_stops_the_run(
    other_boot: AzureFlowRun,
) -> None:
    assert other_boot.state.is_failed()
    message = str(other_boot.state.message)
    assert "kernel command line" in message and REFERENCE_ID in message, message
    assert "-root ro crashkernel" in message  # the reference's command line, named
    assert_stopped_before_start_run(other_boot)
    assert_everything_deleted(other_boot)


# -- a failure after the run started -------------------------------------------------------------


@pytest.fixture(scope="module")
def failed_training(
    tmp_path_factory: pytest.TempPathFactory,
    prefect_api_url: str,
    base_image: str,
    ca: AzureLikeCa,
    published: Published,
) -> AzureFlowRun:
    return certify_on_fake_azure(
        tmp_path_factory.mktemp("failed-training"),
        ca,
        published,
        image=VmImage(boot_log()),
        script=FAILING_SCRIPT,
    )


def test_a_failing_training_still_deletes_the_vm_after_downloading_its_files(
    failed_training: AzureFlowRun,
) -> None:
    run = failed_training
    assert run.state.is_failed()
    assert "exited with code 1" in str(run.state.message)
    assert run.task_states["run-training"] == "FAILED"
    assert [run.task_states[name] for name in run.task_ran("collect-outputs")] == ["COMPLETED"]
    assert run.task_ran("quote") == []
    workspace = run.home / "runs" / run.run_id / "workspace"
    assert (workspace / "outputs" / "partial.txt").read_text() == "half a model"
    assert "training-marker: about to fail" in (workspace / "logs" / "training.log").read_text()
    assert not (run.home / "runs" / run.run_id / "certificate.json").exists()
    assert_everything_deleted(run)


# -- a platform without reference values ---------------------------------------------------------


@pytest.fixture(scope="module")
def unreferenced(
    tmp_path_factory: pytest.TempPathFactory,
    prefect_api_url: str,
    base_image: str,
    ca: AzureLikeCa,
    published: Published,
) -> AzureFlowRun:
    return certify_on_fake_azure(
        tmp_path_factory.mktemp("unreferenced"),
        ca,
        published,
        image=VmImage(boot_log()),
        with_reference_values=False,
    )


def test_without_reference_values_the_certificate_is_refused(unreferenced: AzureFlowRun) -> None:
    """No set configured: the boot chain is checked by nobody, so the flow's own verification
    refuses the certificate, naming what is missing, and nothing is published."""
    run = unreferenced
    assert run.state.is_failed()
    assert "no reference-value set" in str(run.state.message), run.state.message
    assert [run.task_states[name] for name in run.task_ran("verify-certificate")] == ["FAILED"]
    assert run.task_ran("store-certificate") == []
    certificate = aicert.load(run.home / "runs" / run.run_id / "certificate.json")
    assert certificate.platform.reference_values is None
    assert_everything_deleted(run)


# -- Azure as it really behaves: an empty boot log, an AK chain completed through AIA -----------


@pytest.fixture(scope="module")
def aia_ca() -> Iterator[AiaCa]:
    """The "Azure Cloud Virtual TPM CA - 11" -> "CA 2025" -> root hierarchy, its
    intermediates served over http at the AIA URLs of the certificates."""
    with aia_server() as server:
        yield AiaCa(server)


@pytest.fixture(scope="module")
def logless(
    tmp_path_factory: pytest.TempPathFactory,
    prefect_api_url: str,
    base_image: str,
    aia_ca: AiaCa,
    published: Published,
) -> AzureFlowRun:
    return certify_on_fake_azure(
        tmp_path_factory.mktemp("logless"),
        aia_ca,
        published,
        image=VmImage(boot_log(), log_handed_over=False),
    )


def test_a_trusted_launch_vm_without_a_log_and_with_an_aia_chain_is_certified(
    logless: AzureFlowRun, aia_ca: AiaCa, published: Published
) -> None:
    """The VM hands the guest a zero-byte log and its image ships no intermediate: the
    orchestrator fetched CA-11 and CA 2025 through AIA, put the whole chain into the
    certificate, and the boot was judged by the PCR values recorded from the reference boot
    (PCR 14 starting at shim's MOK measurements, as recorded)."""
    assert logless.state.is_completed(), logless.state.message
    assert cert_path(CA11) in aia_ca.server.requests
    assert cert_path(CA2025) in aia_ca.server.requests
    certificate = aicert.load(logless.result["certificate"]["path"])
    assert certificate.boot_event_log == b""
    subjects = [
        x509.load_pem_x509_certificate(pem.encode()).subject.rfc4514_string()
        for pem in certificate.attestation.ak.certificate_chain
    ]
    assert subjects[1:] == [
        f"CN={CA11}",
        f"CN={CA2025}",
        aia_ca.root.certificate.subject.rfc4514_string(),
    ]
    reference = load_reference_values(published.logless_reference_values, platform="azure")
    report = certificate.verify(trusted_roots=[aia_ca.root.pem], reference_values=reference)
    assert report.boot_chain_attested is True
    assert report.platform_note.startswith(
        "boot chain checked by PCR values, not by a replayed log"
    )
    assert int(certificate.attestation.quote.pcrs["14"], 16) != 0
    assert_everything_deleted(logless)
    # Without the recorded boots, the same certificate cannot be judged.
    with pytest.raises(PlatformError, match="record no PCR values for such boots"):
        certificate.verify(trusted_roots=[aia_ca.root.pem], reference_values=published.reference)
