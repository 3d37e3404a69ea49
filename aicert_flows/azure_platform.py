"""The Prefect side of the ``azure`` platform: the ``AzurePlatform`` block and credentials.

The provider itself (``aicert.tasks.platforms.azure``) uses no Prefect; this module turns a
saved block into one, resolving a saved prefect-azure credentials block to the credential the
provider takes. ``azure_provider_for_machine`` rebuilds the provider of a recorded machine in
another process (crash hooks, ``aicert cleanup``), loading the same credentials block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prefect_azure.credentials import AzureContainerInstanceCredentials
from pydantic import Field

from aicert.flows.blocks import DOCUMENTATION_URL, PlatformBlock
from aicert.tasks.platforms.azure import provider as azure_provider
from aicert.tasks.platforms.azure.provider import (
    DEFAULT_AGENT_PORT,
    AzureProvider,
    AzureSettings,
    ConfidentialDiskEncryption,
    SecurityType,
)
from aicert.tasks.platforms.base import Machine

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential


def resolve_credential(credentials_block: str | None) -> TokenCredential:
    """The credential of a saved prefect-azure block, else ``DefaultAzureCredential``."""
    if credentials_block:
        block = AzureContainerInstanceCredentials.load(credentials_block)
        return credential_from_block(block)
    return azure_provider.default_credential()


def credential_from_block(block: AzureContainerInstanceCredentials) -> TokenCredential:
    # The block's own factory: ClientSecretCredential when a service principal is set,
    # DefaultAzureCredential otherwise (prefect-azure exposes no public accessor for it).
    return block._create_credential()


def azure_provider_for_machine(machine: Machine) -> AzureProvider:
    """The provider able to tear ``machine`` down, with the credential its settings name."""
    recorded = machine.details.get("azure")
    credentials_block = recorded.get("credentials_block") if isinstance(recorded, dict) else None
    return AzureProvider.for_machine(machine, credential=resolve_credential(credentials_block))


class AzurePlatform(PlatformBlock):
    """Settings of the ``azure`` AICert platform: one Trusted Launch or Confidential VM with a
    vTPM per run, from a gallery image that carries the AICert guest agent."""

    _block_type_name = "AICert Azure Platform"
    _block_type_slug = "aicert-azure-platform"
    _documentation_url = DOCUMENTATION_URL
    _description = (
        "Settings of the AICert Azure platform: a Trusted Launch or Confidential VM with a "
        "vTPM, made per run from a gallery image and deleted afterwards."
    )
    _code_example = """
    from aicert.flows.azure_platform import AzurePlatform

    azure_platform = AzurePlatform.load("BLOCK_NAME")
    provider = azure_platform.provider()
    """
    subscription_id: str = Field(..., title="Subscription ID")
    resource_group: str = Field(..., description="An existing resource group for run VMs.")
    location: str = Field(..., title="Region", description="e.g. westeurope")
    vm_size: str = Field(
        default="Standard_D4s_v5",
        description="Trusted Launch: a Gen2 size (e.g. Standard_D4s_v5); Confidential VM: "
        "a DCasv5/ECasv5 size (e.g. Standard_DC4as_v5).",
    )
    image_id: str = Field(
        ...,
        title="Gallery image",
        description="Azure Compute Gallery image (version) id of the AICert guest image.",
    )
    security_type: SecurityType = Field(default="TrustedLaunch")
    confidential_os_disk_encryption: ConfidentialDiskEncryption = Field(
        default="VMGuestStateOnly",
        description="Confidential VM only: what the OS disk's confidential encryption covers.",
    )
    subnet_id: str | None = Field(
        default=None, description="An existing subnet; empty creates a virtual network per run."
    )
    vnet_address_prefix: str = Field(default="10.73.0.0/24")
    subnet_address_prefix: str = Field(default="10.73.0.0/27")
    orchestrator_cidr: str = Field(
        ...,
        title="Orchestrator address",
        description="The public address (or a block of at most /24) the flow runs from: the "
        "only source the network security group admits, on the agent port only.",
    )
    agent_port: int = Field(default=DEFAULT_AGENT_PORT, ge=1, le=65535)
    admin_username: str = Field(default="aicert")
    ssh_public_key: str = Field(..., title="SSH public key", description="No password is set.")
    os_disk_type: str = Field(default="Premium_LRS")
    reference_values: str | None = Field(
        default=None,
        title="Reference values",
        description="Path of the reference-values.json published with the gallery image "
        "version (boot PCRs 0-9; python -m aicert.reference_values derive-azure). Empty: the "
        "boot chain is not checked, and verifiers refuse the certificates for want of a set.",
    )
    credentials: AzureContainerInstanceCredentials | None = Field(
        default=None,
        description="prefect-azure credentials; empty uses DefaultAzureCredential. Save it as "
        "its own block so that a crash hook in another process can load it for teardown.",
    )
    arm_endpoint: str | None = Field(
        default=None, description="Resource Manager endpoint; empty is the Azure public cloud."
    )
    agent_start_timeout_seconds: float = Field(default=900.0, gt=0, le=3600)
    polling_interval_seconds: float = Field(default=10.0, gt=0, le=120)

    def settings(self) -> AzureSettings:
        credentials_block = None
        if self.credentials is not None:
            credentials_block = getattr(self.credentials, "_block_document_name", None)
        return AzureSettings(
            subscription_id=self.subscription_id,
            resource_group=self.resource_group,
            location=self.location,
            vm_size=self.vm_size,
            image_id=self.image_id,
            security_type=self.security_type,
            confidential_os_disk_encryption=self.confidential_os_disk_encryption,
            subnet_id=self.subnet_id,
            vnet_address_prefix=self.vnet_address_prefix,
            subnet_address_prefix=self.subnet_address_prefix,
            orchestrator_cidr=self.orchestrator_cidr,
            agent_port=self.agent_port,
            admin_username=self.admin_username,
            ssh_public_key=self.ssh_public_key,
            os_disk_type=self.os_disk_type,
            reference_values=self.reference_values,
            arm_endpoint=self.arm_endpoint,
            credentials_block=credentials_block,
            agent_start_timeout_s=self.agent_start_timeout_seconds,
            polling_interval_s=self.polling_interval_seconds,
        )

    def provider(self) -> AzureProvider:
        credential = credential_from_block(self.credentials) if self.credentials else None
        return AzureProvider(self.settings(), credential=credential)
