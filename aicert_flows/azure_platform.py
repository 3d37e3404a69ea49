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

from aicert.flows.blocks import BLOCKS_PAGE_URL, LOGOS_URL, PlatformBlock
from aicert.tasks.platforms.azure import arm
from aicert.tasks.platforms.azure.provider import AzureProvider
from aicert.tasks.platforms.azure.settings import (
    DEFAULT_AGENT_START_TIMEOUT_S,
    DEFAULT_POLLING_INTERVAL_S,
    AgentStartTimeout,
    AzureSettings,
    AzureVmFields,
    PollingInterval,
)
from aicert.tasks.platforms.base import Machine

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential


def resolve_credential(credentials_block: str | None) -> TokenCredential:
    """The credential of a saved prefect-azure block, else ``DefaultAzureCredential``."""
    if credentials_block:
        block = AzureContainerInstanceCredentials.load(credentials_block)
        return credential_from_block(block)
    return arm.default_credential()


def credential_from_block(block: AzureContainerInstanceCredentials) -> TokenCredential:
    """The credential a prefect-azure credentials block describes."""
    # The block's own factory: ClientSecretCredential when a service principal is set,
    # DefaultAzureCredential otherwise (prefect-azure exposes no public accessor for it).
    return block._create_credential()


def azure_provider_for_machine(machine: Machine) -> AzureProvider:
    """The provider able to tear ``machine`` down, with the credential its settings name."""
    recorded = machine.details.get("azure")
    credentials_block = recorded.get("credentials_block") if isinstance(recorded, dict) else None
    return AzureProvider.for_machine(machine, credential=resolve_credential(credentials_block))


class AzurePlatform(PlatformBlock, AzureVmFields):
    """Settings of the ``azure`` AICert platform: one Trusted Launch or Confidential VM with a
    vTPM per run, from a gallery image that carries the AICert guest agent.

    The VM and network fields, their checks included, are ``AzureVmFields``' (shared with
    ``AzureSettings``); the block adds the credentials and names two durations ``*_seconds``.
    """

    _block_type_name = "AICert Azure Platform"
    _block_type_slug = "aicert-azure-platform"
    _documentation_url = f"{BLOCKS_PAGE_URL}#aicert-azure-platform"
    _logo_url = f"{LOGOS_URL}aicert-azure-platform.svg"
    _description = (
        "Settings of the AICert Azure platform: a Trusted Launch or Confidential VM with a "
        "vTPM, made per run from a gallery image and deleted afterwards."
    )
    credentials: AzureContainerInstanceCredentials | None = Field(
        default=None,
        title="Azure credentials",
        description="prefect-azure credentials; empty uses DefaultAzureCredential. Save it as "
        "its own block so that a crash hook in another process can load it for teardown.",
    )
    agent_start_timeout_seconds: AgentStartTimeout = DEFAULT_AGENT_START_TIMEOUT_S
    polling_interval_seconds: PollingInterval = DEFAULT_POLLING_INTERVAL_S

    def settings(self) -> AzureSettings:
        """The provider's settings: the shared fields as they are, the credentials block by
        its saved name (so that another process can load it), the durations renamed."""
        credentials_block = None
        if self.credentials is not None:
            credentials_block = getattr(self.credentials, "_block_document_name", None)
        return AzureSettings(
            **{name: getattr(self, name) for name in AzureVmFields.model_fields},
            credentials_block=credentials_block,
            agent_start_timeout_s=self.agent_start_timeout_seconds,
            polling_interval_s=self.polling_interval_seconds,
        )

    def provider(self) -> AzureProvider:
        """An ``AzureProvider`` with these settings and the block's credential."""
        credential = credential_from_block(self.credentials) if self.credentials else None
        return AzureProvider(self.settings(), credential=credential)
