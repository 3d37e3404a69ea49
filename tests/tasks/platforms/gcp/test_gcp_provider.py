"""``GcpProvider`` against the Compute Engine double with a "VM" behind it: the exact requests
of a provision (firewall rule admitting only the orchestrator, then the Shielded VM labelled
with the run), the agent reached over https with its certificate pinned, GCE's AK enrolled with
its chain completed to the root and checked, and a teardown that deletes both resources from
the ``Machine`` alone, twice. A quota error, an agent of another platform and reference values
of another image stop the provision, deleting what was made.

The VM is a swtpm dressed as a GCE vTPM (``vm_double.py``); the chain's root is generated in
Google's shape and trusted on purpose, as a test must (Google's roots are pinned).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from google.auth.credentials import AnonymousCredentials

from aicert.tasks.platforms import get_provider, provider_for_machine
from aicert.tasks.platforms.gcp import (
    AICERT_RUN_LABEL,
    GcpEnrollmentError,
    GcpProvider,
    GcpProviderError,
    GcpProvisioningError,
    GcpReferenceValuesError,
    GcpSettings,
    RunResources,
)
from aicert.tasks.platforms.gcp import provider as gcp_provider
from tests.tasks.platforms.gcp.fake_compute import FakeCompute
from tests.tasks.platforms.gcp.vm_double import (
    ISSUED,
    GceVmHost,
    gce_boot_log,
    write_reference_values,
)
from tests.verification.gcp_like import GoogleLikeCa

pytestmark = pytest.mark.swtpm

IMAGE = "projects/aicert-images/global/images/aicert-guest-1-0-0"
ORCHESTRATOR = "203.0.113.7/32"
RUN_ID = "gcpprov-20261203T070000Z-ab12cd34"


@pytest.fixture(scope="module")
def ca() -> GoogleLikeCa:
    return GoogleLikeCa.create(ISSUED)


@pytest.fixture(scope="module")
def reference_values(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_reference_values(tmp_path_factory.mktemp("reference"), IMAGE)


@pytest.fixture
def cloud(tmp_path: Path, ca: GoogleLikeCa) -> Iterator[tuple[FakeCompute, GceVmHost]]:
    with GceVmHost(tmp_path / "vms", ca, gce_boot_log()) as host, FakeCompute(host) as fake:
        yield fake, host


def settings_for(fake: FakeCompute, host: GceVmHost, **changes: object) -> GcpSettings:
    values: dict[str, object] = {
        "project": "aicert-tests",
        "zone": "us-central1-a",
        "image": IMAGE,
        "orchestrator_cidr": ORCHESTRATOR,
        "api_endpoint": fake.endpoint,
        "poll_interval_s": 0.01,
        "agent_port": host.port,
        "agent_start_timeout_s": 60,
        **changes,
    }
    return GcpSettings.model_validate(values)


def provider_for(
    fake: FakeCompute, host: GceVmHost, home: Path, *, trust: bool = True, **changes: object
) -> GcpProvider:
    return GcpProvider(
        settings_for(fake, host, **changes),
        credentials=AnonymousCredentials(),
        home=home,
        extra_trusted_root_pems=(host.ca.root.pem,) if trust else (),
        extra_intermediate_pems=(host.ca.intermediate.pem,),
    )


def changes_of(fake: FakeCompute) -> list[tuple[str, str]]:
    """Requests that change something: method and the path after the project."""
    return [
        (r.method, r.path.split("/aicert-tests/", 1)[1])
        for r in fake.state.requests
        if r.method in ("POST", "DELETE")
    ]


def test_provision_enrol_and_teardown(
    cloud: tuple[FakeCompute, GceVmHost], tmp_path: Path, reference_values: Path
) -> None:
    fake, host = cloud
    provider = provider_for(fake, host, tmp_path, reference_values=str(reference_values))
    assert provider.reference_values() == "aicert-guest-1-0-0"
    machine = provider.provision(RUN_ID)
    names = RunResources.for_run(RUN_ID)
    assert changes_of(fake) == [
        ("POST", "global/firewalls"),
        ("POST", "zones/us-central1-a/instances"),
    ]
    (firewall,) = [r.body for r in fake.state.requests if r.path.endswith("/firewalls")]
    assert firewall is not None
    assert firewall["sourceRanges"] == [ORCHESTRATOR]
    assert firewall["allowed"] == [{"IPProtocol": "tcp", "ports": [str(host.port)]}]
    assert firewall["targetTags"] == [names.instance]
    instance = fake.state.instances[names.instance]
    assert instance["labels"][AICERT_RUN_LABEL] == names.label
    assert instance["shieldedInstanceConfig"] == {
        "enableSecureBoot": True,
        "enableVtpm": True,
        "enableIntegrityMonitoring": True,
    }
    assert machine.agent_url == f"https://127.0.0.1:{host.port}"
    (vm,) = host.vms
    assert vm.agent is not None and machine.agent_certificate_pem == vm.agent.certificate_pem
    assert provider.machine_problem(machine) is None

    with machine.client(timeout_s=30) as client:
        enrolled = provider.enroll_attestation_key(machine, client)
    subjects = [
        x509.load_pem_x509_certificate(pem.encode()).subject.rfc4514_string()
        for pem in enrolled.ak_certificate_chain
    ]
    assert "O=Google Compute Engine" in subjects[0]
    assert [s.split(",")[0] for s in subjects[1:]] == [
        "CN=EK/AK CA Intermediate",
        "CN=EK/AK CA Root",
    ]
    assert enrolled.trusted_root_pem == host.ca.root.pem and enrolled.ek_certificate_pem is None

    # The teardown of another process: the provider rebuilt from the machine alone.
    other = GcpProvider.for_machine(machine, credentials=AnonymousCredentials())
    other.teardown(machine)
    assert changes_of(fake)[2:] == [
        ("DELETE", f"zones/us-central1-a/instances/{names.instance}"),
        ("DELETE", f"global/firewalls/{names.firewall}"),
    ]
    assert vm.deleted and fake.state.instances == {} and fake.state.firewalls == {}
    assert "404" in str(provider.machine_problem(machine))
    other.teardown(machine)  # idempotent: both are already gone


def test_a_chain_under_an_untrusted_root_is_refused_at_enrolment(
    cloud: tuple[FakeCompute, GceVmHost], tmp_path: Path
) -> None:
    fake, host = cloud
    provider = provider_for(fake, host, tmp_path, trust=False)
    machine = provider.provision(RUN_ID)
    try:
        with (
            machine.client(timeout_s=30) as client,
            pytest.raises(GcpEnrollmentError, match="no trust anchor"),
        ):
            provider.enroll_attestation_key(machine, client)
    finally:
        provider.teardown(machine)


def test_a_quota_error_deletes_the_firewall_rule_and_names_the_quota(
    cloud: tuple[FakeCompute, GceVmHost], tmp_path: Path
) -> None:
    fake, host = cloud
    fake.state.fail_next("insert-instance")
    provider = provider_for(fake, host, tmp_path)
    with pytest.raises(GcpProvisioningError, match=r"403.*QUOTA_EXCEEDED"):
        provider.provision(RUN_ID)
    names = RunResources.for_run(RUN_ID)
    assert changes_of(fake)[-1] == ("DELETE", f"global/firewalls/{names.firewall}")
    assert fake.state.firewalls == {} and fake.state.instances == {} and host.vms == []


def test_reference_values_of_another_image_stop_before_any_request(
    cloud: tuple[FakeCompute, GceVmHost], tmp_path: Path, reference_values: Path
) -> None:
    fake, host = cloud
    provider = provider_for(
        fake,
        host,
        tmp_path,
        image="projects/aicert-images/global/images/aicert-guest-2-0-0",
        reference_values=str(reference_values),
    )
    with pytest.raises(GcpReferenceValuesError, match="is for image"):
        provider.provision(RUN_ID)
    assert fake.state.requests == []


def test_an_agent_of_another_platform_stops_the_provision(
    cloud: tuple[FakeCompute, GceVmHost], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, host = cloud
    monkeypatch.setattr("tests.tasks.platforms.gcp.vm_double.AGENT_PLATFORM", "azure", raising=True)
    provider = provider_for(fake, host, tmp_path)
    with pytest.raises(GcpProvisioningError, match="runs as platform 'azure'"):
        provider.provision(RUN_ID)
    assert fake.state.instances == {} and fake.state.firewalls == {}
    assert all(vm.deleted for vm in host.vms)


def test_the_default_credentials_are_looked_up_on_the_module(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(gcp_provider, "default_credentials", AnonymousCredentials)
    settings = GcpSettings(
        project="aicert-tests", zone="z", image=IMAGE, orchestrator_cidr=ORCHESTRATOR
    )
    assert isinstance(GcpProvider(settings, home=tmp_path).credentials, AnonymousCredentials)
    named = settings.model_copy(update={"credentials_block": "prod"})
    with pytest.raises(GcpProviderError, match="credentials block 'prod'"):
        _ = GcpProvider(named, home=tmp_path).credentials


def test_get_provider_names_the_block_and_a_machine_gets_its_provider(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="GcpPlatform block"):
        get_provider("gcp")
    settings = GcpSettings(
        project="aicert-tests", zone="z", image=IMAGE, orchestrator_cidr=ORCHESTRATOR
    )
    from aicert.tasks.platforms.base import Machine

    machine = Machine(
        provider="gcp",
        run_id=RUN_ID,
        agent_url="",
        state_dir=str(tmp_path / "runs" / RUN_ID),
        details={"gcp": settings.model_dump(mode="json")},
    )
    rebuilt = provider_for_machine(machine)
    assert isinstance(rebuilt, GcpProvider) and rebuilt.settings == settings


def test_api_endpoint_sends_tokens_in_clear_only_to_loopback() -> None:
    base = {
        "project": "aicert-tests",
        "zone": "z",
        "image": IMAGE,
        "orchestrator_cidr": ORCHESTRATOR,
    }
    GcpSettings(**base, api_endpoint="http://127.0.0.1:8080")
    GcpSettings(**base, api_endpoint="compute.googleapis.com")
    with pytest.raises(ValueError, match="plain http only on loopback"):
        GcpSettings(**base, api_endpoint="http://compute.example.com")


def test_a_crash_hook_tears_the_run_down_from_its_record(
    cloud: tuple[FakeCompute, GceVmHost], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a crash or cancellation hook in another process does: the run's record names the
    machine, whose settings name the credentials (none here: the default ones, anonymous)."""
    from aicert.flows.lifecycle import ActiveRun, describe, teardown_record

    fake, host = cloud
    machine = provider_for(fake, host, tmp_path).provision(RUN_ID)
    record = ActiveRun(
        flow_run_id="crashed", run_id=RUN_ID, project="p", provider="gcp", machine=machine
    )
    assert "Compute Engine VM of run" in describe(record)
    monkeypatch.setattr(gcp_provider, "default_credentials", AnonymousCredentials)
    assert teardown_record(record, home=tmp_path) == []
    assert fake.state.instances == {} and fake.state.firewalls == {}
    assert all(vm.deleted for vm in host.vms)
    teardown_record(record, home=tmp_path)  # a second hook finds nothing left, and says nothing
