"""The settings of the ``gcp`` platform, each field defined once.

``GcpVmFields`` holds what an operator chooses (project, zone, guest image, network, who may
reach the agent, the reference values) with its checks; ``GcpSettings`` adds the saved
credentials block's name and is what the provider takes and ``Machine.details`` carries (no
secret: a crash hook in another process loads the block by name). The Prefect block
``aicert.flows.gcp_platform.GcpPlatform`` inherits ``GcpVmFields`` too.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from aicert.reference_value_sets import GCE_IMAGE_PATTERN

__all__ = ["DEFAULT_AGENT_PORT", "GcpSettings", "GcpVmFields"]

DEFAULT_AGENT_PORT = 8443
_CIDR = re.compile(r"^\d{1,3}(\.\d{1,3}){3}/\d{1,2}$")


class GcpVmFields(BaseModel):
    """What the operator chooses about a run's VM and its firewall rule."""

    project: str = Field(..., title="Project", description="The Google Cloud project id.")
    zone: str = Field(..., title="Zone", description="The zone of the VMs, e.g. us-central1-a.")
    image: str = Field(
        ..., title="Guest image", description="The guest image, projects/<p>/global/images/<name>."
    )
    orchestrator_cidr: str = Field(
        ...,
        title="Orchestrator address",
        description="The orchestrator's address (a.b.c.d/32): the only source admitted.",
    )
    machine_type: str = Field(
        "n2d-standard-4", title="Machine type", description="The machine type."
    )
    network: str = Field("global/networks/default", title="Network", description="The VPC network.")
    subnetwork: str | None = Field(
        None, title="Subnetwork", description="The subnetwork (default: automatic)."
    )
    external_ip: bool = Field(
        False, title="External IP address", description="Give the VM an external IP address."
    )
    confidential_compute: bool = Field(
        False, title="Confidential VM", description="Make a Confidential VM (AMD SEV)."
    )
    agent_port: int = Field(
        DEFAULT_AGENT_PORT,
        title="Agent port",
        ge=1,
        le=65535,
        description="The guest agent's TLS port.",
    )
    disk_size_gb: int = Field(
        50, title="Boot disk size (GB)", ge=10, le=65536, description="Boot disk size."
    )
    api_endpoint: str | None = Field(
        None,
        title="Compute Engine endpoint",
        description="Compute Engine endpoint (tests point it at a local double).",
    )
    operation_timeout_s: float = Field(
        600.0, title="Operation timeout (seconds)", gt=0, description="Wait per operation."
    )
    poll_interval_s: float = Field(
        2.0,
        title="Polling interval (seconds)",
        gt=0,
        le=60,
        description="Operation polling interval.",
    )
    agent_start_timeout_s: float = Field(
        900.0,
        title="Agent start timeout (seconds)",
        gt=0,
        le=3600,
        description="How long to wait for the VM's guest agent.",
    )
    reference_values: str | None = Field(
        None,
        title="Reference values",
        description="Path of the image's gcp reference-values.json (boot PCRs 0-9). Empty: the "
        "boot chain is not checked, and verifiers refuse the certificates for want of a set.",
    )

    @field_validator("project")
    @classmethod
    def _project(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z][a-z0-9-]{4,28}[a-z0-9]", value):
            raise ValueError(f"not a Google Cloud project id: {value!r}")
        return value

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        if not re.fullmatch(GCE_IMAGE_PATTERN, value):
            raise ValueError(f"not a Compute Engine image (projects/p/global/images/i): {value!r}")
        return value

    @field_validator("orchestrator_cidr")
    @classmethod
    def _cidr(cls, value: str) -> str:
        if not _CIDR.fullmatch(value) or value.endswith("/0"):
            raise ValueError(f"orchestrator_cidr must be an IPv4 range, not the world: {value}")
        return value

    @field_validator("api_endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        # Requests carry OAuth tokens: plain http only to a double on this machine.
        if value is None or "://" not in value:
            return value
        parts = urlsplit(value)
        if parts.scheme == "https":
            return value
        if parts.scheme == "http" and parts.hostname is not None:
            host = "127.0.0.1" if parts.hostname == "localhost" else parts.hostname
            try:
                if ipaddress.ip_address(host).is_loopback:
                    return value
            except ValueError:
                pass
        raise ValueError(f"api_endpoint {value!r}: must be https (plain http only on loopback)")


class GcpSettings(GcpVmFields):
    """Plain settings of the gcp provider; they travel in ``Machine.details``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # A saved prefect-gcp GcpCredentials block (None: Application Default Credentials).
    credentials_block: str | None = None
