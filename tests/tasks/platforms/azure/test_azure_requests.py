"""What the azure provider sends to Azure Resource Manager, observed on the wire.

The provider runs with the real azure SDK clients against ``FakeArm`` (127.0.0.1), so every
assertion is about an HTTP request that went out: bodies, tags, ordering, retries after 429
and 500, long-running operations polled and, when they fail, started again then reported,
and deletions after a failure at any step. The "VM" that provisioning waits for is the real
guest agent on a swtpm (``--platform azure --tls``), served on loopback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from aicert.tasks.platforms.azure import (
    AICERT_CREATED_TAG,
    AICERT_RUN_TAG,
    ArmSessionSettings,
    AzureOperationError,
    AzureProvider,
    AzureProvisioningError,
    AzureResourceNames,
    AzureSettings,
    AzureTeardownError,
    log_progress,
)
from aicert.tasks.platforms.azure.arm import progress_log
from aicert.tasks.platforms.base import Machine
from tests.tasks.platforms.azure.fake_arm import (
    RUN_CREATIONS,
    RUN_DELETIONS,
    TEST_IMAGE_ID,
    TEST_ORCHESTRATOR,
    TEST_RESOURCE_GROUP,
    TEST_SSH_KEY,
    FailureRule,
    FakeArm,
    RecordedRequest,
    StaticTokenCredential,
    azure_settings_for,
)
from tests.tasks.platforms.azure.guest import (
    LocalAgent,
    free_port,
    local_azure_agent,
)

pytestmark = pytest.mark.swtpm

CREATED_TYPES = tuple(type_name for method, type_name in RUN_CREATIONS if method == "PUT")
DELETED_IN_ORDER = RUN_DELETIONS


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalAgent]:
    with local_azure_agent(tmp_path_factory.mktemp("azure-vm"), tls=True) as served:
        yield served


@pytest.fixture
def fake() -> Iterator[FakeArm]:
    with FakeArm() as server:
        yield server


ProviderFactory = Callable[..., AzureProvider]


@pytest.fixture
def make_provider(fake: FakeArm, agent: LocalAgent, tmp_path: Path) -> Callable[..., AzureProvider]:
    def make(progress: Callable[[str], None] | None = None, **overrides: Any) -> AzureProvider:
        overrides.setdefault("agent_port", agent.port)
        settings = azure_settings_for(fake, **overrides)
        kwargs: dict[str, Any] = {"credential": StaticTokenCredential(), "home": tmp_path}
        if progress is not None:
            kwargs["progress"] = progress
        return AzureProvider(settings, **kwargs)

    return make


def _ok(requests: list[RecordedRequest]) -> list[RecordedRequest]:
    return [r for r in requests if r.response_status < 300]


def _vm_body(fake: FakeArm) -> dict[str, Any]:
    puts = _ok(fake.calls("PUT", "virtualMachines"))
    assert len(puts) == 1
    return puts[0].body


def _assert_everything_deleted(fake: FakeArm, run_id: str, first_delete_call: int = 0) -> None:
    left = [r["id"] for r in fake.resources() if r["tags"].get(AICERT_RUN_TAG) == run_id]
    assert left == []
    names = AzureResourceNames.for_run(run_id)
    assert not [r["id"] for r in fake.resources() if r["name"] in names.by_type().values()]
    # A DELETE went out for every type a run makes (204 where it never existed), in
    # dependency order, and none was refused.
    deletes = fake.calls("DELETE")[first_delete_call:]
    assert all(r.response_status in (202, 204) for r in deletes)
    first_delete: dict[str | None, int] = {}
    for index, request in enumerate(deletes):
        first_delete.setdefault(request.type_name, index)
    assert list(first_delete) == list(DELETED_IN_ORDER)


# -- the requests of a provision ---------------------------------------------------------------


def test_trusted_launch_vm_request(
    make_provider: ProviderFactory, fake: FakeArm, agent: LocalAgent
) -> None:
    run_id = "demo-20250101T000000Z-aaaa0001"
    provider = make_provider()
    machine = provider.provision(run_id)
    names = AzureResourceNames.for_run(run_id)
    try:
        vm = _vm_body(fake)
        properties = vm["properties"]
        security = properties["securityProfile"]
        assert security["securityType"] == "TrustedLaunch"
        assert security["uefiSettings"] == {"secureBootEnabled": True, "vTpmEnabled": True}
        assert properties["storageProfile"]["imageReference"] == {"id": TEST_IMAGE_ID}
        os_disk = properties["storageProfile"]["osDisk"]
        assert os_disk["name"] == names.os_disk
        assert os_disk["deleteOption"] == "Delete"
        assert "securityProfile" not in os_disk["managedDisk"]  # Trusted Launch: none
        os_profile = properties["osProfile"]
        assert "adminPassword" not in os_profile
        linux = os_profile["linuxConfiguration"]
        assert linux["disablePasswordAuthentication"] is True
        assert linux["ssh"]["publicKeys"] == [
            {"path": "/home/aicert/.ssh/authorized_keys", "keyData": TEST_SSH_KEY}
        ]
        nic_reference = properties["networkProfile"]["networkInterfaces"][0]
        assert nic_reference["id"].endswith(f"/networkInterfaces/{names.nic}")

        # Every resource created carries the run's tags; the implicit OS disk is tagged after.
        for type_name in CREATED_TYPES:
            (put,) = _ok(fake.calls("PUT", type_name))
            assert put.body["tags"][AICERT_RUN_TAG] == run_id, type_name
            assert datetime.fromisoformat(put.body["tags"][AICERT_CREATED_TAG])
        (patch,) = _ok(fake.calls("PATCH", "disks"))
        assert patch.path.endswith(f"/disks/{names.os_disk}")
        assert patch.body["tags"][AICERT_RUN_TAG] == run_id
        assert all(r["tags"][AICERT_RUN_TAG] == run_id for r in fake.resources())

        # The NSG admits the orchestrator on the agent port, and nothing else.
        (nsg,) = _ok(fake.calls("PUT", "networkSecurityGroups"))
        rules = {
            rule["name"]: rule["properties"] for rule in nsg.body["properties"]["securityRules"]
        }
        allow = rules["aicert-agent-from-orchestrator"]
        assert allow["access"] == "Allow"
        assert allow["direction"] == "Inbound"
        assert allow["sourceAddressPrefix"] == f"{TEST_ORCHESTRATOR}/32"
        assert allow["destinationPortRange"] == str(provider.settings.agent_port)
        deny = rules["aicert-deny-all-inbound"]
        assert (deny["access"], deny["sourceAddressPrefix"], deny["destinationPortRange"]) == (
            "Deny",
            "*",
            "*",
        )
        assert [r for r in rules.values() if r["access"] == "Allow"] == [allow]
        (nic,) = _ok(fake.calls("PUT", "networkInterfaces"))
        assert nic.body["properties"]["networkSecurityGroup"]["id"].endswith(names.nsg)
        (ip,) = _ok(fake.calls("PUT", "publicIPAddresses"))
        assert ip.body["sku"]["name"] == "Standard"
        assert ip.body["properties"]["publicIPAllocationMethod"] == "Static"

        # Created in dependency order, each request authenticated and versioned.
        order = [r.type_name for r in _ok(fake.calls("PUT"))]
        assert order == list(CREATED_TYPES)
        assert all(r.authorization == "Bearer fake-arm-token" for r in fake.requests)
        assert all(r.api_version for r in fake.requests)

        assert machine.agent_url == f"https://127.0.0.1:{provider.settings.agent_port}"
        assert machine.agent_certificate_pem == agent.certificate_pem
        assert machine.details["public_ip"] == "127.0.0.1"
        assert machine.provider == "azure"
    finally:
        provider.teardown(machine)
    _assert_everything_deleted(fake, run_id)


def test_confidential_vm_request(make_provider: ProviderFactory, fake: FakeArm) -> None:
    run_id = "demo-20250101T000000Z-aaaa0002"
    provider = make_provider(
        security_type="ConfidentialVM",
        vm_size="Standard_DC4as_v5",
        confidential_os_disk_encryption="DiskWithVMGuestState",
    )
    machine = provider.provision(run_id)
    provider.teardown(machine)
    properties = _vm_body(fake)["properties"]
    assert properties["hardwareProfile"] == {"vmSize": "Standard_DC4as_v5"}
    assert properties["securityProfile"]["securityType"] == "ConfidentialVM"
    assert properties["securityProfile"]["uefiSettings"] == {
        "secureBootEnabled": True,
        "vTpmEnabled": True,
    }
    managed_disk = properties["storageProfile"]["osDisk"]["managedDisk"]
    assert managed_disk["securityProfile"] == {"securityEncryptionType": "DiskWithVMGuestState"}


def test_existing_subnet_is_used_without_creating_a_network(
    make_provider: ProviderFactory, fake: FakeArm
) -> None:
    vnet_id = fake.seed(
        TEST_RESOURCE_GROUP,
        "virtualNetworks",
        "shared-vnet",
        properties={"subnets": [{"name": "runs", "properties": {"addressPrefix": "10.9.0.0/24"}}]},
    )
    run_id = "demo-20250101T000000Z-aaaa0003"
    provider = make_provider(subnet_id=f"{vnet_id}/subnets/runs")
    machine = provider.provision(run_id)
    provider.teardown(machine)
    assert _ok(fake.calls("PUT", "virtualNetworks")) == []
    (nic,) = _ok(fake.calls("PUT", "networkInterfaces"))
    ip_configuration = nic.body["properties"]["ipConfigurations"][0]["properties"]
    assert ip_configuration["subnet"]["id"] == f"{vnet_id}/subnets/runs"
    assert fake.resource(vnet_id) is not None  # not ours: never deleted


# -- long-running operations, throttling, transient errors --------------------------------------


def test_long_running_operations_report_progress(
    make_provider: ProviderFactory, fake: FakeArm
) -> None:
    fake.polls_in_progress = 3
    messages: list[str] = []
    provider = make_provider(progress=messages.append, progress_interval_s=0.005)
    run_id = "demo-20250101T000000Z-aaaa0004"
    machine = provider.provision(run_id)
    provider.teardown(machine)
    vm = f"create virtual machine {AzureResourceNames.for_run(run_id).vm}"
    assert f"{vm}: started" in messages
    assert any(m.startswith(f"{vm}: InProgress") for m in messages)
    assert any(m.startswith(f"{vm}: Succeeded in") for m in messages)
    polls = [r for r in fake.requests if "/operations/" in r.path]
    assert len(polls) >= 4 * len(_ok(fake.calls("PUT")))  # 3 x InProgress, then Succeeded


def test_progress_goes_to_the_logger_outside_a_flow_run(
    make_provider: ProviderFactory, fake: FakeArm, caplog: pytest.LogCaptureFixture
) -> None:
    provider = make_provider()
    assert provider.progress is log_progress
    assert progress_log.name == "aicert.tasks.platforms.azure"  # the logger the docs name
    caplog.set_level(logging.INFO, logger=progress_log.name)
    run_id = "demo-20250101T000000Z-aaaa0005"
    provider.teardown(provider.provision(run_id))
    logged = [r.getMessage() for r in caplog.records if r.name == progress_log.name]
    vm_name = AzureResourceNames.for_run(run_id).vm
    assert any(m.startswith(f"create virtual machine {vm_name}: Succeeded") for m in logged)
    assert any(m.startswith(f"delete virtual machine {vm_name}: Succeeded") for m in logged)


def test_throttled_request_is_retried_after_retry_after(
    make_provider: ProviderFactory, fake: FakeArm
) -> None:
    fake.inject(FailureRule("PUT", "virtualMachines", "throttle", times=1, retry_after_s=1))
    fake.inject(FailureRule("PUT", "networkInterfaces", "server_error", times=2))
    provider = make_provider()
    run_id = "demo-20250101T000000Z-aaaa0006"
    provider.teardown(provider.provision(run_id))
    throttled, accepted = fake.calls("PUT", "virtualMachines")
    assert (throttled.response_status, accepted.response_status) == (429, 201)
    assert accepted.body == throttled.body
    assert accepted.at - throttled.at >= 0.95  # Retry-After: 1 honoured
    assert [r.response_status for r in fake.calls("PUT", "networkInterfaces")] == [500, 500, 201]


def test_failed_operation_is_started_again(make_provider: ProviderFactory, fake: FakeArm) -> None:
    fake.inject(FailureRule("PUT", "virtualMachines", "failed_lro", times=1))
    messages: list[str] = []
    provider = make_provider(progress=messages.append)
    run_id = "demo-20250101T000000Z-aaaa0007"
    provider.teardown(provider.provision(run_id))
    assert [r.response_status for r in fake.calls("PUT", "virtualMachines")] == [201, 200]
    assert any("AllocationFailed" in m and "starting again" in m for m in messages)


def test_permanently_failed_operation_is_reported_and_cleaned_up(
    make_provider: ProviderFactory, fake: FakeArm
) -> None:
    fake.inject(FailureRule("PUT", "virtualMachines", "failed_lro", times=99))
    provider = make_provider()
    run_id = "demo-20250101T000000Z-aaaa0008"
    vm_name = AzureResourceNames.for_run(run_id).vm
    with pytest.raises(AzureOperationError) as failure:
        provider.provision(run_id)
    message = str(failure.value)
    assert f"create virtual machine {vm_name} failed after 2 attempts" in message
    assert "AllocationFailed" in message
    assert failure.value.code == "AllocationFailed"
    assert len(fake.calls("PUT", "virtualMachines")) == 2
    _assert_everything_deleted(fake, run_id)


# -- failures after the VM exists: everything of the run is deleted ---------------------------


def test_agent_never_answering_deletes_everything(
    make_provider: ProviderFactory, fake: FakeArm
) -> None:
    provider = make_provider(agent_port=free_port(), agent_start_timeout_s=0.5)
    run_id = "demo-20250101T000000Z-aaaa0009"
    with pytest.raises(AzureProvisioningError, match="did not answer"):
        provider.provision(run_id)
    assert _ok(fake.calls("PUT", "virtualMachines"))  # the VM had been created
    _assert_everything_deleted(fake, run_id)


def test_failure_after_vm_creation_deletes_everything(
    make_provider: ProviderFactory, fake: FakeArm
) -> None:
    fake.inject(FailureRule("PATCH", "disks", "failed_lro", times=99, error_code="Conflict"))
    provider = make_provider()
    run_id = "demo-20250101T000000Z-aaaa0010"
    disk = AzureResourceNames.for_run(run_id).os_disk
    with pytest.raises(AzureOperationError, match=f"tag disk {disk} failed.*Conflict"):
        provider.provision(run_id)
    _assert_everything_deleted(fake, run_id)
    # The OS disk was never tagged, yet it went too (by the run's deterministic name).
    assert any(r.path.endswith(f"/disks/{disk}") for r in _ok(fake.calls("DELETE", "disks")))


# -- teardown ----------------------------------------------------------------------------------


def test_teardown_from_the_machine_record_alone(
    make_provider: ProviderFactory, fake: FakeArm, tmp_path: Path
) -> None:
    run_id = "demo-20250101T000000Z-aaaa0011"
    machine = make_provider().provision(run_id)
    # A leftover tagged with the run under another name (an older attempt) goes too.
    stray_ip = fake.seed(
        TEST_RESOURCE_GROUP,
        "publicIPAddresses",
        "stray-ip",
        tags={AICERT_RUN_TAG: run_id, AICERT_CREATED_TAG: "2025-01-01T00:00:00Z"},
    )
    record = Machine.model_validate_json(machine.model_dump_json())  # as a crash hook reads it
    rebuilt = AzureProvider.for_machine(record, credential=StaticTokenCredential())
    assert rebuilt.settings == make_provider().settings
    rebuilt.teardown(record)
    _assert_everything_deleted(fake, run_id)
    assert fake.resource(stray_ip) is None
    deletes = len(fake.calls("DELETE"))
    rebuilt.teardown(record)  # idempotent: everything answers 204 now
    again = fake.calls("DELETE")[deletes:]
    assert again and all(r.response_status == 204 for r in again)


def test_teardown_reports_what_it_could_not_delete(
    make_provider: ProviderFactory, fake: FakeArm
) -> None:
    run_id = "demo-20250101T000000Z-aaaa0012"
    provider = make_provider()
    machine = provider.provision(run_id)
    stuck = FailureRule("DELETE", "virtualMachines", "failed_lro", times=99, error_code="Conflict")
    fake.inject(stuck)
    with pytest.raises(AzureTeardownError) as failure:
        provider.teardown(machine)
    message = str(failure.value)
    names = AzureResourceNames.for_run(run_id)
    assert f"virtualMachines/{names.vm}" in message
    assert "Conflict" in message
    # What the VM still holds could not go either, and says why (ARM refuses it).
    assert f"networkInterfaces/{names.nic}" in message
    assert "InUseResourceCannotBeDeleted" in message
    assert "aicert azure cleanup" in message
    stuck.times = 0  # the cause is fixed: a second teardown finishes the job
    second_teardown = len(fake.calls("DELETE"))
    provider.teardown(machine)
    _assert_everything_deleted(fake, run_id, second_teardown)


# -- settings that would open the machine up are refused ------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("orchestrator_cidr", "0.0.0.0/0"),
        ("orchestrator_cidr", "10.0.0.0/8"),
        ("orchestrator_cidr", "*"),
        ("arm_endpoint", "http://management.example.com"),
        ("image_id", "Canonical:ubuntu-24_04-lts:server:latest"),
        ("ssh_public_key", "hunter2"),
        ("admin_username", "root"),
    ],
)
def test_unsafe_settings_are_refused(fake: FakeArm, field: str, value: str) -> None:
    with pytest.raises(ValidationError, match=field):
        azure_settings_for(fake, **{field: value})


def test_plain_http_endpoint_off_loopback_is_refused() -> None:
    with pytest.raises(ValueError, match="https"):
        ArmSessionSettings(subscription_id="sub", arm_endpoint="http://10.1.2.3:8080")
    assert AzureSettings.model_fields["arm_endpoint"].default is None
