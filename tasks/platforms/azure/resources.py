"""The resources of one ``azure`` run, created in order through an ``ArmSession``.

In the operator's resource group, all named after the run id and tagged
``aicert-run=<run id>`` and ``aicert-created-at=<UTC time>``: a network security group that
admits only the orchestrator's address on the agent port (and denies every other inbound
flow), a static Standard public IP, a virtual network (unless a subnet is given), a NIC, the
VM (Secure Boot and vTPM on, image from an Azure Compute Gallery, SSH key only, no password)
and its OS disk (Azure does not copy the VM's tags onto it: it is tagged afterwards). The
request bodies are built by the ``*_model`` functions, one per resource.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TypeVar

from aicert.tasks.platforms.azure.arm import (
    AICERT_CREATED_TAG,
    AICERT_RUN_TAG,
    ArmSession,
    AzureResourceNames,
)
from aicert.tasks.platforms.azure.errors import AzureProvisioningError
from aicert.tasks.platforms.azure.settings import AzureSettings

if TYPE_CHECKING:
    from azure.core.polling import LROPoller
    from azure.mgmt.compute.models import VirtualMachine
    from azure.mgmt.network.models import (
        NetworkInterface,
        NetworkSecurityGroup,
        PublicIPAddress,
        VirtualNetwork,
    )

    from aicert.tasks.platforms.base import Machine

Tags = dict[str, str]
B = TypeVar("B")  # a request body
R = TypeVar("R")  # what the operation returns


def run_tags(run_id: str) -> Tags:
    """The tags every resource of the run carries: its run id and its creation time (UTC)."""
    created = datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    return {AICERT_RUN_TAG: run_id, AICERT_CREATED_TAG: created}


@dataclass(frozen=True)
class RunResources:
    """Creates the resources of one run, one method a step, in the order they depend on."""

    arm: ArmSession
    settings: AzureSettings
    names: AzureResourceNames
    tags: Tags

    def create_all(self, machine: Machine) -> None:
        """Create every resource and record on ``machine`` the VM id, its public address
        and the agent URL (``https://<address>:<agent port>``)."""
        nsg_id = self.create_network_security_group()
        public_ip_id = self.create_public_ip()
        subnet_id = self.settings.subnet_id or self.create_virtual_network()
        nic_id = self.create_network_interface(nsg_id, subnet_id, public_ip_id)
        machine.details["vm_id"] = self.create_vm(nic_id)
        self.tag_os_disk()
        address = self.public_address()
        machine.details["public_ip"] = address
        host = f"[{address}]" if ":" in address else address
        # The image's agent serves HTTPS with its measured key (--tls); the provider pins it.
        machine.agent_url = f"https://{host}:{self.settings.agent_port}"

    def _put(
        self, begin: Callable[[str, str, B], LROPoller[R]], name: str, body: B, label: str
    ) -> R:
        """Create (or update) resource ``name`` with ``begin`` (an SDK ``begin_create_or_update``)
        and wait for it; ``label`` names its type in progress and errors."""
        rg = self.settings.resource_group
        return self.arm.run(lambda: begin(rg, name, body), f"create {label} {name}")

    def create_network_security_group(self) -> str:
        """The NSG admitting the orchestrator alone; returns its id."""
        name = self.names.nsg
        nsg = self._put(
            self.arm.network.network_security_groups.begin_create_or_update,
            name,
            nsg_model(self.settings, self.tags),
            "network security group",
        )
        return _created_id(nsg.id, name)

    def create_public_ip(self) -> str:
        """The run's static public IP address; returns its id."""
        name = self.names.public_ip
        public_ip = self._put(
            self.arm.network.public_ip_addresses.begin_create_or_update,
            name,
            public_ip_model(self.settings, self.tags),
            "public IP address",
        )
        return _created_id(public_ip.id, name)

    def create_virtual_network(self) -> str:
        """The run's own virtual network (when no subnet is given); returns its subnet's id."""
        name = self.names.vnet
        vnet = self._put(
            self.arm.network.virtual_networks.begin_create_or_update,
            name,
            vnet_model(self.settings, self.names, self.tags),
            "virtual network",
        )
        return f"{_created_id(vnet.id, name)}/subnets/{self.names.subnet}"

    def create_network_interface(self, nsg_id: str, subnet_id: str, public_ip_id: str) -> str:
        """The VM's NIC, behind the NSG, with the public IP; returns its id."""
        name = self.names.nic
        nic = self._put(
            self.arm.network.network_interfaces.begin_create_or_update,
            name,
            nic_model(self.settings, self.tags, nsg_id, subnet_id, public_ip_id),
            "network interface",
        )
        return _created_id(nic.id, name)

    def create_vm(self, nic_id: str) -> str | None:
        """The VM itself; returns its Azure VM id (a UUID) when ARM gave one."""
        vm = self._put(
            self.arm.compute.virtual_machines.begin_create_or_update,
            self.names.vm,
            vm_model(self.settings, self.names, self.tags, nic_id),
            "virtual machine",
        )
        return vm.properties.vm_id if vm.properties else None

    def tag_os_disk(self) -> None:
        """Tag the OS disk: Azure creates it implicitly without the VM's tags, and a cleanup
        by tag must find it even if the VM is gone and the disk was left behind."""
        from azure.mgmt.compute.models import DiskUpdate

        rg, name = self.settings.resource_group, self.names.os_disk
        self.arm.run(
            lambda: self.arm.compute.disks.begin_update(rg, name, DiskUpdate(tags=self.tags)),
            f"tag disk {name}",
        )

    def public_address(self) -> str:
        """The address Azure gave the run's public IP."""
        rg, name = self.settings.resource_group, self.names.public_ip
        properties = self.arm.network.public_ip_addresses.get(rg, name).properties
        address = properties.ip_address if properties is not None else None
        if not address:
            raise AzureProvisioningError(f"public IP address {name} has no address after creation")
        return address


def _created_id(resource_id: str | None, name: str) -> str:
    """The id ARM returned for a resource just created (the SDK types it optional)."""
    if not resource_id:
        raise AzureProvisioningError(f"{name}: Resource Manager returned no id after creation")
    return resource_id


# -- request bodies ---------------------------------------------------------------------------


def nsg_model(settings: AzureSettings, tags: Tags) -> NetworkSecurityGroup:
    """An NSG that admits the orchestrator on the agent port and denies every other inbound
    flow (the default rules would admit the virtual network and the load balancer)."""
    from azure.mgmt.network import models as network

    return network.NetworkSecurityGroup(
        location=settings.location,
        tags=tags,
        properties=network.NetworkSecurityGroupPropertiesFormat(
            security_rules=[
                network.SecurityRule(
                    name="aicert-agent-from-orchestrator",
                    properties=network.SecurityRulePropertiesFormat(
                        priority=100,
                        direction="Inbound",
                        access="Allow",
                        protocol="Tcp",
                        source_address_prefix=settings.orchestrator_cidr,
                        source_port_range="*",
                        destination_address_prefix="*",
                        destination_port_range=str(settings.agent_port),
                        description="The AICert orchestrator reaches the guest agent",
                    ),
                ),
                network.SecurityRule(
                    name="aicert-deny-all-inbound",
                    properties=network.SecurityRulePropertiesFormat(
                        priority=4096,
                        direction="Inbound",
                        access="Deny",
                        protocol="*",
                        source_address_prefix="*",
                        source_port_range="*",
                        destination_address_prefix="*",
                        destination_port_range="*",
                    ),
                ),
            ]
        ),
    )


def public_ip_model(settings: AzureSettings, tags: Tags) -> PublicIPAddress:
    """A static Standard IPv4 public address."""
    from azure.mgmt.network import models as network

    return network.PublicIPAddress(
        location=settings.location,
        tags=tags,
        sku=network.PublicIPAddressSku(name="Standard", tier="Regional"),
        properties=network.PublicIPAddressPropertiesFormat(
            public_ip_allocation_method="Static", public_ip_address_version="IPv4"
        ),
    )


def vnet_model(settings: AzureSettings, names: AzureResourceNames, tags: Tags) -> VirtualNetwork:
    """A virtual network with the one subnet the run's NIC joins."""
    from azure.mgmt.network import models as network

    return network.VirtualNetwork(
        location=settings.location,
        tags=tags,
        properties=network.VirtualNetworkPropertiesFormat(
            address_space=network.AddressSpace(address_prefixes=[settings.vnet_address_prefix]),
            subnets=[
                network.Subnet(
                    name=names.subnet,
                    properties=network.SubnetPropertiesFormat(
                        address_prefix=settings.subnet_address_prefix
                    ),
                )
            ],
        ),
    )


def nic_model(
    settings: AzureSettings, tags: Tags, nsg_id: str, subnet_id: str, public_ip_id: str
) -> NetworkInterface:
    """A NIC in ``subnet_id`` behind the NSG, carrying the public IP."""
    from azure.mgmt.network import models as network

    return network.NetworkInterface(
        location=settings.location,
        tags=tags,
        properties=network.NetworkInterfacePropertiesFormat(
            network_security_group=network.NetworkSecurityGroup(id=nsg_id),
            ip_configurations=[
                network.NetworkInterfaceIPConfiguration(
                    name="ipconfig1",
                    properties=network.NetworkInterfaceIPConfigurationPropertiesFormat(
                        subnet=network.Subnet(id=subnet_id),
                        private_ip_allocation_method="Dynamic",
                        public_ip_address=network.PublicIPAddress(id=public_ip_id),
                        primary=True,
                    ),
                )
            ],
        ),
    )


def vm_model(
    settings: AzureSettings, names: AzureResourceNames, tags: Tags, nic_id: str
) -> VirtualMachine:
    """The VM: Secure Boot and vTPM on, the gallery image, SSH key only; its OS disk and NIC
    go with it when it is deleted."""
    from azure.mgmt.compute import models as compute

    disk_security = None
    if settings.security_type == "ConfidentialVM":
        disk_security = compute.VMDiskSecurityProfile(
            security_encryption_type=settings.confidential_os_disk_encryption
        )
    return compute.VirtualMachine(
        location=settings.location,
        tags=tags,
        properties=compute.VirtualMachineProperties(
            hardware_profile=compute.HardwareProfile(vm_size=settings.vm_size),
            security_profile=compute.SecurityProfile(
                security_type=settings.security_type,
                uefi_settings=compute.UefiSettings(secure_boot_enabled=True, v_tpm_enabled=True),
            ),
            storage_profile=compute.StorageProfile(
                image_reference=compute.ImageReference(id=settings.image_id),
                os_disk=compute.OSDisk(
                    name=names.os_disk,
                    create_option="FromImage",
                    delete_option="Delete",
                    managed_disk=compute.ManagedDiskParameters(
                        storage_account_type=settings.os_disk_type,
                        security_profile=disk_security,
                    ),
                ),
            ),
            os_profile=compute.OSProfile(
                computer_name=names.computer_name,
                admin_username=settings.admin_username,
                linux_configuration=compute.LinuxConfiguration(
                    disable_password_authentication=True,
                    ssh=compute.SshConfiguration(
                        public_keys=[
                            compute.SshPublicKey(
                                path=f"/home/{settings.admin_username}/.ssh/authorized_keys",
                                key_data=settings.ssh_public_key,
                            )
                        ]
                    ),
                ),
            ),
            network_profile=compute.NetworkProfile(
                network_interfaces=[
                    compute.NetworkInterfaceReference(
                        id=nic_id,
                        properties=compute.NetworkInterfaceReferenceProperties(
                            primary=True, delete_option="Delete"
                        ),
                    )
                ]
            ),
        ),
    )
