"""The Prefect side of the ``gcp`` platform: the ``GcpPlatform`` block and its credentials.

The provider itself (``aicert.tasks.platforms.gcp``) uses no Prefect; this module turns a
saved block into one, resolving a saved prefect-gcp ``GcpCredentials`` block to the
google-auth credentials the provider takes. ``gcp_provider_for_machine`` rebuilds the provider
of a recorded machine in another process (crash hooks, ``aicert cleanup``), loading the same
credentials block by the name the machine's settings carry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prefect_gcp import GcpCredentials
from pydantic import Field

from aicert.flows.blocks import BLOCKS_PAGE_URL, LOGOS_URL, PlatformBlock
from aicert.tasks.platforms.base import Machine
from aicert.tasks.platforms.gcp import provider as gcp_provider
from aicert.tasks.platforms.gcp.provider import GcpProvider
from aicert.tasks.platforms.gcp.settings import GcpSettings, GcpVmFields

if TYPE_CHECKING:
    from google.auth.credentials import Credentials

__all__ = ["GcpPlatform", "gcp_provider_for_machine", "resolve_credentials"]


def resolve_credentials(credentials_block: str | None) -> Credentials:
    """The credentials of a saved prefect-gcp block, else Application Default Credentials."""
    if credentials_block:
        return GcpCredentials.load(credentials_block).get_credentials_from_service_account()
    return gcp_provider.default_credentials()


def gcp_provider_for_machine(machine: Machine) -> GcpProvider:
    """The provider able to tear ``machine`` down, with the credentials its settings name."""
    recorded = machine.details.get("gcp")
    credentials_block = recorded.get("credentials_block") if isinstance(recorded, dict) else None
    return GcpProvider.for_machine(machine, credentials=resolve_credentials(credentials_block))


class GcpPlatform(PlatformBlock, GcpVmFields):
    """Settings of the ``gcp`` AICert platform: one Compute Engine Shielded VM (vTPM, Secure
    Boot, integrity monitoring) per run, from an image that carries the AICert guest agent.

    The VM and firewall fields, their checks included, are ``GcpVmFields``' (shared with
    ``GcpSettings``); the block adds the credentials.
    """

    _block_type_name = "AICert GCP Platform"
    _block_type_slug = "aicert-gcp-platform"
    _documentation_url = f"{BLOCKS_PAGE_URL}#aicert-gcp-platform"
    _logo_url = f"{LOGOS_URL}aicert-gcp-platform.svg"
    _description = (
        "Settings of the AICert Google Cloud platform: a Compute Engine Shielded VM with a "
        "vTPM, made per run from the AICert guest image and deleted afterwards."
    )
    credentials: GcpCredentials | None = Field(
        default=None,
        title="GCP credentials",
        description="prefect-gcp credentials; empty uses Application Default Credentials. "
        "Save it as its own block so that a crash hook in another process can load it.",
    )

    def settings(self) -> GcpSettings:
        """The provider's settings: the shared fields as they are, the credentials block by
        its saved name (so that another process can load it)."""
        credentials_block = None
        if self.credentials is not None:
            credentials_block = getattr(self.credentials, "_block_document_name", None)
        return GcpSettings(
            **{name: getattr(self, name) for name in GcpVmFields.model_fields},
            credentials_block=credentials_block,
        )

    def provider(self) -> GcpProvider:
        """A ``GcpProvider`` with these settings and the block's credentials."""
        credentials = (
            self.credentials.get_credentials_from_service_account() if self.credentials else None
        )
        return GcpProvider(self.settings(), credentials=credentials)
