"""The closest run to Azure possible here: the azure provider against a local ARM, the VM
played by the real guest agent on a swtpm dressed as an Azure vTPM.

Not a run on Azure: ``FakeArm`` answers the provider's ARM calls on 127.0.0.1 (its public IP
address is 127.0.0.1), and the "VM" is ``python -m aicert.guest_runtime.server --platform
azure`` on a swtpm holding an AK at 0x81000003 and an Azure-shaped certificate (generated,
not Microsoft's) in NV 0x01C101D0. What is real: the azure SDK clients and their HTTP, the
provider's provisioning, agent wait and teardown, the machine record a crash hook reads, and
the agent's HTTP API.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from aicert.flows.providers.azure import AICERT_RUN_TAG, AzureProvider, AzureResourceNames
from aicert.flows.providers.base import Machine
from aicert.guest_runtime.client import AgentClient
from tests.azure.fake_arm import FakeArm, StaticTokenCredential, azure_settings_for
from tests.azure.guest import (
    AzureLikeChain,
    LocalAgent,
    azure_like_chain,
    install_azure_ak,
    install_nv_certificate,
    local_azure_agent,
)

pytestmark = pytest.mark.swtpm


@dataclass(frozen=True)
class AzureVm:
    agent: LocalAgent
    chain: AzureLikeChain


@pytest.fixture(scope="module")
def azure_vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzureVm]:
    workdir = tmp_path_factory.mktemp("azure-vm")
    chains: list[AzureLikeChain] = []

    def dress_as_azure_vtpm(tcti: str) -> None:
        # What Azure's host does before the VM boots, and what the image ships.
        ak_public = install_azure_ak(tcti, workdir / "tools")
        chain = azure_like_chain(ak_public)
        install_nv_certificate(tcti, workdir / "tools", chain.leaf_der)
        (workdir / "azure-intermediates.pem").write_text(chain.image_pem_bundle)
        chains.append(chain)

    with local_azure_agent(workdir, prepare_tpm=dress_as_azure_vtpm) as agent:
        yield AzureVm(agent=agent, chain=chains[0])


def test_provision_reach_the_agent_and_tear_down(azure_vm: AzureVm, tmp_path: Path) -> None:
    run_id = "azure-demo-20250101T000000Z-cafe0001"
    names = AzureResourceNames.for_run(run_id)
    with FakeArm() as fake:
        settings = azure_settings_for(fake, agent_port=azure_vm.agent.port)
        provider = AzureProvider(
            settings,
            credential=StaticTokenCredential(),
            home=tmp_path,
            extra_trusted_root_pems=[azure_vm.chain.root.pem],
        )
        machine = provider.provision(run_id)
        try:
            assert machine.agent_url == azure_vm.agent.url
            assert Path(machine.state_dir) == tmp_path / "runs" / run_id
            with AgentClient(machine.agent_url) as client:
                health = client.wait_until_ready(timeout_s=5.0)
            assert health.platform == "azure"
            assert health.busy_run_id is None
            assert {r["tags"][AICERT_RUN_TAG] for r in fake.resources()} == {run_id}
            assert provider.reference_values() == settings.reference_values
        finally:
            # As the flow's crash hook does: rebuild the provider from the saved record.
            record = Machine.model_validate_json(machine.model_dump_json())
            AzureProvider.for_machine(record, credential=StaticTokenCredential()).teardown(record)

        assert fake.resources() == []
        timeline = [
            (r.method, r.type_name or r.path.rsplit("/", 1)[-1])
            for r in fake.requests
            if r.response_status < 300 and "/operations/" not in r.path
        ]
    created = [(m, t) for m, t in timeline if m in ("PUT", "PATCH")]
    assert created == [
        ("PUT", "networkSecurityGroups"),
        ("PUT", "publicIPAddresses"),
        ("PUT", "virtualNetworks"),
        ("PUT", "networkInterfaces"),
        ("PUT", "virtualMachines"),
        ("PATCH", "disks"),
    ]
    deleted = [t for m, t in timeline if m == "DELETE"]
    assert deleted == [
        "virtualMachines",
        "networkInterfaces",
        "publicIPAddresses",
        "networkSecurityGroups",
        "virtualNetworks",
        "disks",
    ]
    # The listing by the run's tag happens before the deletions.
    listing = timeline.index(("GET", "resources"))
    assert listing < timeline.index(("DELETE", "virtualMachines"))
    assert names.vm in machine.details["names"].values()
