"""The settings of the ``azure`` platform, each field defined once.

``AzureVmFields`` holds what an operator chooses (subscription, resource group, image,
network, who may reach the agent), with its type, default, bounds, description and the checks
that keep a VM from being opened up. Two models inherit it: ``AzureSettings``, the provider's
plain settings (which travel in ``Machine.details``), and the Prefect block
``aicert.flows.azure_platform.AzurePlatform``. ``ArmSessionSettings`` holds how requests reach
Azure Resource Manager (endpoint, polling, retries); ``aicert azure cleanup`` uses it alone.
The two fields the block names differently (``*_seconds``, kept for saved blocks) share their
definition through ``AgentStartTimeout`` and ``PollingInterval``.
"""

from __future__ import annotations

import ipaddress
import re
from ipaddress import IPv4Network, IPv6Network
from typing import Annotated, Literal, Self
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_AGENT_PORT = 8700
DEFAULT_AGENT_START_TIMEOUT_S = 900.0
DEFAULT_POLLING_INTERVAL_S = 10.0
SecurityType = Literal["TrustedLaunch", "ConfidentialVM"]
ConfidentialDiskEncryption = Literal["VMGuestStateOnly", "DiskWithVMGuestState"]

AgentStartTimeout = Annotated[
    float,
    Field(
        gt=0,
        le=3600,
        title="Agent start timeout (seconds)",
        description="How long to wait for the VM's guest agent to answer once the VM exists.",
    ),
]
PollingInterval = Annotated[
    float,
    Field(
        gt=0,
        le=120,
        title="Polling interval (seconds)",
        description="Seconds between polls of a long-running Resource Manager operation.",
    ),
]

_GALLERY_IMAGE_ID = re.compile(
    r"^/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.Compute/galleries/[^/]+"
    r"/images/[^/]+(/versions/[^/]+)?$",
    re.IGNORECASE,
)
_SUBNET_ID = re.compile(
    r"^/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.Network/virtualNetworks/"
    r"[^/]+/subnets/[^/]+$",
    re.IGNORECASE,
)
_RESOURCE_GROUP = re.compile(r"^[-\w.()]{1,89}[-\w()]$")
_SSH_PUBLIC_KEY = re.compile(
    r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|sk-ssh-ed25519@openssh\.com) "
    r"[A-Za-z0-9+/=]+( [^\r\n]*)?$"
)
_LINUX_USERNAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
# Names Azure refuses as the admin user of a Linux VM (documented list, abridged to the
# common ones; Azure reports the rest itself).
_RESERVED_USERNAMES = frozenset(
    {"admin", "administrator", "root", "user", "guest", "test", "sys", "support", "adm"}
)


def checked_arm_endpoint(value: str | None) -> str | None:
    """An ARM endpoint URL that may receive bearer tokens: https, or plain http on loopback
    only (where a test plays ARM). Tokens must not cross a network in clear text.

    Raises:
        ValueError: the endpoint would send tokens in clear text off this host.
    """
    if value is None:
        return None
    value = value.rstrip("/")
    parts = urlsplit(value)
    if parts.scheme == "https" or (parts.scheme == "http" and is_loopback(parts.hostname)):
        return value
    raise ValueError(f"ARM endpoint {value!r}: must be https (plain http only on loopback)")


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (a URL's host name) is this machine's loopback interface."""
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ArmAccount(BaseModel):
    """Where requests to Azure Resource Manager go: the subscription and the endpoint."""

    subscription_id: str = Field(
        min_length=1, title="Subscription ID", description="The Azure subscription of the runs."
    )
    arm_endpoint: str | None = Field(
        default=None,
        title="Resource Manager endpoint",
        description="Resource Manager endpoint; empty is the Azure public cloud.",
    )

    @field_validator("arm_endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return checked_arm_endpoint(value)


class ArmSessionSettings(ArmAccount):
    """How an ``ArmSession`` talks to Resource Manager: polling, progress and retries."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    polling_interval_s: PollingInterval = DEFAULT_POLLING_INTERVAL_S
    progress_interval_s: float = Field(
        default=15.0, gt=0, description="Seconds between progress reports of an operation."
    )
    retry_total: int = Field(
        default=6, ge=0, description="Retries of a throttled (429) or failed (5xx) request."
    )
    retry_backoff_factor: float = Field(
        default=2.0, ge=0, description="Exponential backoff factor between retries (seconds)."
    )
    lro_attempts: int = Field(
        default=2,
        ge=1,
        le=5,
        description="Starts of a long-running operation that ends Failed before it is reported.",
    )


class AzureVmFields(ArmAccount):
    """What the operator chooses about a run's VM and network: the fields both
    ``AzureSettings`` and the ``AzurePlatform`` block hold, validated the same way."""

    resource_group: str = Field(description="An existing resource group for run VMs.")
    location: str = Field(
        min_length=1, title="Region", description="The Azure region, e.g. westeurope."
    )
    vm_size: str = Field(
        default="Standard_D4s_v5",
        description="Trusted Launch: a Gen2 size (e.g. Standard_D4s_v5); Confidential VM: "
        "a DCasv5/ECasv5 size (e.g. Standard_DC4as_v5).",
    )
    image_id: str = Field(
        title="Gallery image",
        description="Azure Compute Gallery image (version) id of the AICert guest image.",
    )
    security_type: SecurityType = Field(
        default="TrustedLaunch",
        description="TrustedLaunch, or ConfidentialVM (which needs a confidential vm_size).",
    )
    confidential_os_disk_encryption: ConfidentialDiskEncryption = Field(
        default="VMGuestStateOnly",
        description="Confidential VM only: what the OS disk's confidential encryption covers.",
    )
    subnet_id: str | None = Field(
        default=None, description="An existing subnet; empty creates a virtual network per run."
    )
    vnet_address_prefix: str = Field(
        default="10.73.0.0/24",
        description="Address space of the per-run virtual network (without subnet_id).",
    )
    subnet_address_prefix: str = Field(
        default="10.73.0.0/27",
        description="The per-run subnet, inside vnet_address_prefix (without subnet_id).",
    )
    orchestrator_cidr: str = Field(
        title="Orchestrator address",
        description="The public address (or a block of at most /24) the flow runs from: the "
        "only source the network security group admits, on the agent port only.",
    )
    agent_port: int = Field(
        default=DEFAULT_AGENT_PORT,
        ge=1,
        le=65535,
        description="The TCP port the guest agent serves HTTPS on.",
    )
    admin_username: str = Field(
        default="aicert", description="The VM's Linux admin user (SSH key login only)."
    )
    ssh_public_key: str = Field(
        title="SSH public key",
        description="One OpenSSH public key line for the admin user; no password is set.",
    )
    os_disk_type: str = Field(
        default="Premium_LRS", description="Storage type of the OS disk (e.g. Premium_LRS)."
    )
    reference_values: str | None = Field(
        default=None,
        title="Reference values",
        description="Path of the reference-values.json published with the gallery image "
        "version (boot PCRs 0-9; python -m aicert.reference_values derive-azure). Empty: the "
        "boot chain is not checked, and verifiers refuse the certificates for want of a set.",
    )

    @field_validator("resource_group")
    @classmethod
    def _resource_group(cls, value: str) -> str:
        if not _RESOURCE_GROUP.match(value):
            raise ValueError(f"{value!r} is not a valid resource group name")
        return value

    @field_validator("image_id")
    @classmethod
    def _gallery_image(cls, value: str) -> str:
        if not _GALLERY_IMAGE_ID.match(value):
            raise ValueError(
                "must be an Azure Compute Gallery image id: /subscriptions/<s>/resourceGroups/"
                "<rg>/providers/Microsoft.Compute/galleries/<g>/images/<i>[/versions/<v>]"
            )
        return value

    @field_validator("subnet_id")
    @classmethod
    def _subnet(cls, value: str | None) -> str | None:
        if value is not None and not _SUBNET_ID.match(value):
            raise ValueError("must be a subnet id: .../virtualNetworks/<vnet>/subnets/<subnet>")
        return value

    @field_validator("orchestrator_cidr")
    @classmethod
    def _orchestrator(cls, value: str) -> str:
        # The NSG must admit the orchestrator and nobody else: a single address or a small
        # block (a NAT pool), never a wide range or "any".
        try:
            network = ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address or CIDR block") from None
        narrowest = 24 if network.version == 4 else 56
        if network.prefixlen < narrowest or network.network_address.is_unspecified:
            raise ValueError(
                f"{value!r} admits too many addresses: give the orchestrator's address "
                f"(or a block of at most /{narrowest})"
            )
        return str(network)

    @field_validator("ssh_public_key")
    @classmethod
    def _ssh_key(cls, value: str) -> str:
        value = value.strip()
        if not _SSH_PUBLIC_KEY.match(value):
            raise ValueError("must be one OpenSSH public key line (ssh-ed25519 / ssh-rsa / ecdsa)")
        return value

    @field_validator("admin_username")
    @classmethod
    def _username(cls, value: str) -> str:
        if not _LINUX_USERNAME.match(value) or value in _RESERVED_USERNAMES:
            raise ValueError(f"{value!r} is not an admin user name Azure accepts")
        return value

    @model_validator(mode="after")
    def _vnet_prefixes(self) -> Self:
        if self.subnet_id is None and not _lies_inside(
            self.subnet_address_prefix, self.vnet_address_prefix
        ):
            raise ValueError("subnet_address_prefix must lie inside vnet_address_prefix")
        return self


def _lies_inside(subnet_prefix: str, vnet_prefix: str) -> bool:
    subnet = ipaddress.ip_network(subnet_prefix)
    vnet = ipaddress.ip_network(vnet_prefix)
    # subnet_of compares networks of one IP version only.
    if isinstance(subnet, IPv4Network) and isinstance(vnet, IPv4Network):
        return subnet.subnet_of(vnet)
    if isinstance(subnet, IPv6Network) and isinstance(vnet, IPv6Network):
        return subnet.subnet_of(vnet)
    return False


class AzureSettings(AzureVmFields, ArmSessionSettings):
    """Plain settings of the azure provider. They travel in ``Machine.details`` (no secret
    here: credentials are referenced by the name of a saved block) so that teardown can run
    in a process that did not provision."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # A saved prefect-azure AzureContainerInstanceCredentials block (None: the default chain).
    credentials_block: str | None = None
    agent_start_timeout_s: AgentStartTimeout = DEFAULT_AGENT_START_TIMEOUT_S
