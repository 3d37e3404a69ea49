"""The ``azure`` provider: a Trusted Launch or Confidential VM with a vTPM, made per run.

What it creates, in a resource group the operator owns, all named after the run id and tagged
``aicert-run=<run id>`` and ``aicert-created-at=<UTC time>``: a network security group that
admits only the orchestrator's address on the agent port (and denies every other inbound
flow), a static Standard public IP, a virtual network (unless a subnet is given), a NIC, the
VM (Secure Boot and vTPM on, image from an Azure Compute Gallery, SSH key only, no password)
and its OS disk (Azure does not copy the VM's tags onto it: the provider tags it afterwards).

Everything goes through the Azure SDK (``azure-mgmt-compute``, ``azure-mgmt-network``,
``azure-mgmt-resource``): throttling (429, honouring ``Retry-After``) and transient server
errors are retried by azure-core's ``RetryPolicy``; long-running operations are polled with
progress in the Prefect run logs (or the module logger outside a run), and one that ends
``Failed`` is started again, then reported naming the resource. A provision that fails at any
point deletes what it made before raising. ``teardown`` deletes every resource tagged with the
run id plus the run's deterministic names, in dependency order, and works from the ``Machine``
alone (``AzureProvider.for_machine``), so a crash or cancellation hook in another process can
run it. ``aicert azure cleanup`` (``aicert.flows.azure_cleanup``) removes older leftovers.

The image's agent serves HTTPS (``--tls``) with a key it measured into PCR 14 before serving:
the provider pins the certificate it sees on first contact, every later call accepts only that
certificate, and the flow's ``attest-machine`` step sends the run only once a quote by the
certified AK shows PCR 14 holding exactly that key. The boot chain is judged against the
reference-value set published with the gallery image version (``reference_values``: the path of
its ``reference-values.json``); without one no boot chain is checked, and the verifier refuses
the certificate for want of a reference-value set.

The AK is Azure's own (persistent handle 0x81000003, certificate in NV 0x01C101D0, chained to
Microsoft's vTPM root, read by ``aicert.guest_runtime.azure_ak`` on the VM): enrolment only
checks that chain early, with the verifier's pinned root, so a wrong VM is torn down before
any training. The azure-mgmt SDKs are imported where used, so that registering the block
type stays cheap; prefect-azure (the credentials block type) is needed at import.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from aicert.tasks.platforms.agent_client import AgentClient, AgentUnreachableError
from aicert.tasks.platforms.base import EnrolledKey, Machine, Provider
from aicert.tasks.platforms.settings import aicert_home

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential
    from azure.core.polling import LROPoller
    from azure.mgmt.compute import ComputeManagementClient
    from azure.mgmt.network import NetworkManagementClient
    from azure.mgmt.resource import ResourceManagementClient

    from aicert.chain import ChainVerification
    from aicert.reference_values import AzureReferenceValueSet

log = logging.getLogger(__name__)

AICERT_RUN_TAG = "aicert-run"
AICERT_CREATED_TAG = "aicert-created-at"
DEFAULT_AGENT_PORT = 8700
AGENT_POLL_INTERVAL_S = 1.0
# The token audience of Azure public cloud's Resource Manager (sovereign clouds differ).
ARM_CREDENTIAL_SCOPES = ("https://management.azure.com/.default",)
SecurityType = Literal["TrustedLaunch", "ConfidentialVM"]
ConfidentialDiskEncryption = Literal["VMGuestStateOnly", "DiskWithVMGuestState"]
ProgressCallback = Callable[[str], None]
T = TypeVar("T")

VIRTUAL_MACHINES = "Microsoft.Compute/virtualMachines"
DISKS = "Microsoft.Compute/disks"
NETWORK_INTERFACES = "Microsoft.Network/networkInterfaces"
PUBLIC_IP_ADDRESSES = "Microsoft.Network/publicIPAddresses"
NETWORK_SECURITY_GROUPS = "Microsoft.Network/networkSecurityGroups"
VIRTUAL_NETWORKS = "Microsoft.Network/virtualNetworks"
# Dependency order: a VM holds its NIC and disk, a NIC holds its public IP, NSG and subnet.
DELETE_ORDER: tuple[str, ...] = (
    VIRTUAL_MACHINES,
    NETWORK_INTERFACES,
    PUBLIC_IP_ADDRESSES,
    NETWORK_SECURITY_GROUPS,
    VIRTUAL_NETWORKS,
    DISKS,
)
_TYPE_LABELS = {
    VIRTUAL_MACHINES: "virtual machine",
    DISKS: "disk",
    NETWORK_INTERFACES: "network interface",
    PUBLIC_IP_ADDRESSES: "public IP address",
    NETWORK_SECURITY_GROUPS: "network security group",
    VIRTUAL_NETWORKS: "virtual network",
}

_TERMINAL_STATUSES = frozenset({"succeeded", "failed", "canceled", "cancelled"})
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


class AzureProviderError(RuntimeError):
    """Base class of the azure provider's errors."""


class AzureOperationError(AzureProviderError):
    """An ARM operation on a named resource failed (after the retries it is allowed)."""

    def __init__(self, what: str, code: str, message: str, attempts: int) -> None:
        self.what = what
        self.code = code
        self.attempts = attempts
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        super().__init__(f"{what} failed{tries}: {code}: {message}")


class AzureProvisioningError(AzureProviderError):
    """The machine could not be made ready (its resources were deleted before raising)."""


class AzureReferenceValuesError(AzureProviderError):
    """The configured reference-value set cannot be read, or is not the image's."""


class AzureEnrollmentError(AzureProviderError):
    """The VM's attestation key or its certificate chain is not acceptable."""


class AzureTeardownError(AzureProviderError):
    """Some resources of the run could not be deleted; the message lists them."""


# -- settings -------------------------------------------------------------------------------


class AzureSettings(BaseModel):
    """Plain settings of the azure provider. They travel in ``Machine.details`` (no secret
    here: credentials are referenced by the name of a saved block) so that teardown can run
    in a process that did not provision."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    subscription_id: str = Field(min_length=1)
    resource_group: str
    location: str = Field(min_length=1)
    vm_size: str = "Standard_D4s_v5"
    image_id: str
    security_type: SecurityType = "TrustedLaunch"
    confidential_os_disk_encryption: ConfidentialDiskEncryption = "VMGuestStateOnly"
    subnet_id: str | None = None
    vnet_address_prefix: str = "10.73.0.0/24"
    subnet_address_prefix: str = "10.73.0.0/27"
    orchestrator_cidr: str
    agent_port: int = Field(default=DEFAULT_AGENT_PORT, ge=1, le=65535)
    admin_username: str = "aicert"
    ssh_public_key: str
    os_disk_type: str = "Premium_LRS"
    # Path of the image version's reference-values.json (None: no boot chain is checked).
    reference_values: str | None = None
    arm_endpoint: str | None = None  # None: Azure public cloud's Resource Manager
    credentials_block: str | None = None  # a saved AzureContainerInstanceCredentials block
    agent_start_timeout_s: float = Field(default=900.0, gt=0)
    polling_interval_s: float = Field(default=10.0, gt=0)
    progress_interval_s: float = Field(default=15.0, gt=0)
    retry_total: int = Field(default=6, ge=0)
    retry_backoff_factor: float = Field(default=2.0, ge=0)
    lro_attempts: int = Field(default=2, ge=1, le=5)

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

    @field_validator("arm_endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return checked_arm_endpoint(value)

    @model_validator(mode="after")
    def _vnet_prefixes(self) -> AzureSettings:
        if self.subnet_id is None:
            vnet = ipaddress.ip_network(self.vnet_address_prefix)
            subnet = ipaddress.ip_network(self.subnet_address_prefix)
            if not subnet.subnet_of(vnet):  # type: ignore[arg-type]
                raise ValueError("subnet_address_prefix must lie inside vnet_address_prefix")
        return self


def checked_arm_endpoint(value: str | None) -> str | None:
    """An ARM endpoint URL that may receive bearer tokens: https, or plain http on loopback
    only (where a test plays ARM). Tokens must not cross a network in clear text."""
    if value is None:
        return None
    value = value.rstrip("/")
    parts = urlsplit(value)
    if parts.scheme == "https" or (parts.scheme == "http" and _is_loopback(parts.hostname)):
        return value
    raise ValueError(f"ARM endpoint {value!r}: must be https (plain http only on loopback)")


def _is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class AzureResourceNames:
    """The names of a run's resources: a pure function of the run id, so that any process
    knows what to delete for a run even when ARM's tag listing lags behind a creation."""

    vm: str
    nic: str
    public_ip: str
    nsg: str
    vnet: str
    subnet: str
    os_disk: str
    computer_name: str

    @classmethod
    def for_run(cls, run_id: str) -> AzureResourceNames:
        slug = re.sub(r"[^a-z0-9]+", "-", run_id.lower()).strip("-")[:40].rstrip("-")
        # The digest keeps names of different runs apart after truncation.
        digest = hashlib.sha256(run_id.encode()).hexdigest()[:8]
        base = f"aicert-{slug}-{digest}" if slug else f"aicert-{digest}"
        return cls(
            vm=f"{base}-vm",
            nic=f"{base}-nic",
            public_ip=f"{base}-ip",
            nsg=f"{base}-nsg",
            vnet=f"{base}-vnet",
            subnet="aicert",
            os_disk=f"{base}-osdisk",
            computer_name=base[:63],
        )

    def by_type(self) -> dict[str, str]:
        """Resource type -> name, for every resource a provision may create."""
        return {
            VIRTUAL_MACHINES: self.vm,
            NETWORK_INTERFACES: self.nic,
            PUBLIC_IP_ADDRESSES: self.public_ip,
            NETWORK_SECURITY_GROUPS: self.nsg,
            VIRTUAL_NETWORKS: self.vnet,
            DISKS: self.os_disk,
        }


# -- progress -------------------------------------------------------------------------------


def log_progress(message: str) -> None:
    """Progress into this module's logger; inside a Prefect run ``aicert.tasks`` forwards
    it to the run's log (this module imports no Prefect)."""
    log.info("%s", message)


# -- ARM access -----------------------------------------------------------------------------


def default_credential() -> TokenCredential:
    """``DefaultAzureCredential``: environment, managed identity, then the Azure CLI's."""
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential()


def _authentication_policy(credential: TokenCredential, scopes: Sequence[str]) -> Any:
    """ARM's bearer-token policy, which refuses plain http; allowed here on loopback only,
    where a test plays ARM (AzureSettings already refuses any other http endpoint)."""
    from azure.mgmt.core.policies import ARMChallengeAuthenticationPolicy

    class _LoopbackAwareArmAuthentication(ARMChallengeAuthenticationPolicy):
        def on_request(self, request: Any) -> None:
            parts = urlsplit(request.http_request.url)
            if parts.scheme == "http" and _is_loopback(parts.hostname):
                request.context["enforce_https"] = False
            super().on_request(request)

    return _LoopbackAwareArmAuthentication(credential, *scopes)


@dataclass(frozen=True)
class TaggedResource:
    id: str
    name: str
    type: str
    resource_group: str
    tags: dict[str, str] | None  # None when ARM did not return them


class ArmSession:
    """The SDK clients of one subscription, with the provider's retry and polling rules."""

    def __init__(
        self,
        subscription_id: str,
        credential: TokenCredential,
        *,
        arm_endpoint: str | None = None,
        polling_interval_s: float = 10.0,
        progress_interval_s: float = 15.0,
        retry_total: int = 6,
        retry_backoff_factor: float = 2.0,
        lro_attempts: int = 2,
        progress: ProgressCallback = log_progress,
    ) -> None:
        self.subscription_id = subscription_id
        self.credential = credential
        self.arm_endpoint = checked_arm_endpoint(arm_endpoint)
        self.progress_interval_s = progress_interval_s
        self.lro_attempts = lro_attempts
        self.progress = progress
        self._client_options: dict[str, Any] = {
            "polling_interval": polling_interval_s,
            "retry_total": retry_total,
            "retry_backoff_factor": retry_backoff_factor,
            "retry_backoff_max": 120,
        }
        self._clients: list[Any] = []
        self._lock = threading.Lock()
        self._compute: ComputeManagementClient | None = None
        self._network: NetworkManagementClient | None = None
        self._resources: ResourceManagementClient | None = None

    @classmethod
    def for_settings(
        cls,
        settings: AzureSettings,
        credential: TokenCredential,
        progress: ProgressCallback = log_progress,
    ) -> ArmSession:
        return cls(
            settings.subscription_id,
            credential,
            arm_endpoint=settings.arm_endpoint,
            polling_interval_s=settings.polling_interval_s,
            progress_interval_s=settings.progress_interval_s,
            retry_total=settings.retry_total,
            retry_backoff_factor=settings.retry_backoff_factor,
            lro_attempts=settings.lro_attempts,
            progress=progress,
        )

    def _options(self) -> dict[str, Any]:
        options = dict(self._client_options)
        options["authentication_policy"] = _authentication_policy(
            self.credential, ARM_CREDENTIAL_SCOPES
        )
        if self.arm_endpoint is not None:
            options["base_url"] = self.arm_endpoint
        return options

    def _track(self, client: T) -> T:
        self._clients.append(client)
        return client

    @property
    def compute(self) -> ComputeManagementClient:
        with self._lock:
            if self._compute is None:
                from azure.mgmt.compute import ComputeManagementClient

                self._compute = self._track(
                    ComputeManagementClient(
                        self.credential, self.subscription_id, **self._options()
                    )
                )
            return self._compute

    @property
    def network(self) -> NetworkManagementClient:
        with self._lock:
            if self._network is None:
                from azure.mgmt.network import NetworkManagementClient

                self._network = self._track(
                    NetworkManagementClient(
                        self.credential, self.subscription_id, **self._options()
                    )
                )
            return self._network

    @property
    def resources(self) -> ResourceManagementClient:
        with self._lock:
            if self._resources is None:
                from azure.mgmt.resource import ResourceManagementClient

                self._resources = self._track(
                    ResourceManagementClient(
                        self.credential, self.subscription_id, **self._options()
                    )
                )
            return self._resources

    def close(self) -> None:
        for client in self._clients:
            client.close()
        self._clients.clear()

    def __enter__(self) -> ArmSession:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- long-running operations ---------------------------------------------------------

    def wait(self, poller: LROPoller[T], what: str) -> T:
        """The operation's result, reporting its status every ``progress_interval_s``."""
        started = time.monotonic()
        while not poller.done():
            poller.wait(timeout=self.progress_interval_s)
            status = poller.status()
            # A terminal status while the poller still runs is its final GET: not news.
            if not poller.done() and status.lower() not in _TERMINAL_STATUSES:
                elapsed = time.monotonic() - started
                self.progress(f"{what}: {status} ({elapsed:.0f} s)")
        result = poller.result()
        self.progress(f"{what}: {poller.status()} in {time.monotonic() - started:.1f} s")
        return result

    def run(self, start: Callable[[], LROPoller[T]], what: str) -> T:
        """Start a long-running operation and wait for it; start it again when it ends
        ``Failed`` (ARM PUT and DELETE are idempotent), up to ``lro_attempts`` times."""
        from azure.core.exceptions import HttpResponseError
        from azure.core.polling.base_polling import OperationFailed

        for attempt in range(1, self.lro_attempts + 1):
            self.progress(f"{what}: started" + (f" (attempt {attempt})" if attempt > 1 else ""))
            try:
                return self.wait(start(), what)
            except HttpResponseError as exc:
                code, message = _arm_error(exc)
                lro_failed = isinstance(exc.__cause__, OperationFailed)
                if not lro_failed or attempt == self.lro_attempts:
                    raise AzureOperationError(what, code, message, attempt) from exc
                self.progress(f"{what}: the operation failed ({code}: {message}); starting again")
        raise AssertionError("unreachable")  # the loop returns or raises

    # -- generic resource operations ---------------------------------------------------------

    def delete(self, resource_type: str, resource_group: str, name: str) -> None:
        """Delete one resource of a type the provider creates; absent is success (ARM 204)."""
        deleters: dict[str, Callable[[], LROPoller[None]]] = {
            VIRTUAL_MACHINES: lambda: self.compute.virtual_machines.begin_delete(
                resource_group, name
            ),
            DISKS: lambda: self.compute.disks.begin_delete(resource_group, name),
            NETWORK_INTERFACES: lambda: self.network.network_interfaces.begin_delete(
                resource_group, name
            ),
            PUBLIC_IP_ADDRESSES: lambda: self.network.public_ip_addresses.begin_delete(
                resource_group, name
            ),
            NETWORK_SECURITY_GROUPS: lambda: self.network.network_security_groups.begin_delete(
                resource_group, name
            ),
            VIRTUAL_NETWORKS: lambda: self.network.virtual_networks.begin_delete(
                resource_group, name
            ),
        }
        canonical = canonical_type(resource_type)
        if canonical not in deleters:
            raise AzureProviderError(f"no deleter for resource type {resource_type}")
        self.run(deleters[canonical], f"delete {_TYPE_LABELS[canonical]} {name}")

    def list_tagged(
        self, tag_name: str, tag_value: str | None = None, resource_group: str | None = None
    ) -> list[TaggedResource]:
        """Resources carrying ``tag_name`` (= ``tag_value`` if given), in the subscription or
        one resource group. ARM returns no tags when filtering by a tag's value."""
        from azure.mgmt.core.tools import parse_resource_id

        flt = f"tagName eq '{_odata_quote(tag_name)}'"
        if tag_value is not None:
            flt += f" and tagValue eq '{_odata_quote(tag_value)}'"
        if resource_group is not None:
            pages = self.resources.resources.list_by_resource_group(resource_group, filter=flt)
        else:
            pages = self.resources.resources.list(filter=flt)
        found: list[TaggedResource] = []
        for item in pages:
            parsed = parse_resource_id(item.id)
            found.append(
                TaggedResource(
                    id=item.id,
                    name=item.name,
                    type=item.type,
                    resource_group=parsed["resource_group"],
                    tags=dict(item.tags) if item.tags is not None else None,
                )
            )
        return found


def canonical_type(resource_type: str) -> str:
    """The provider's spelling of an ARM resource type (ARM compares them case-insensitively)."""
    for known in DELETE_ORDER:
        if known.lower() == resource_type.lower():
            return known
    return resource_type


def _odata_quote(value: str) -> str:
    return value.replace("'", "''")


def _arm_error(exc: Exception) -> tuple[str, str]:
    """ARM's ``error.code`` and ``error.message`` from a failed request or operation."""
    response = getattr(exc, "response", None)
    if response is not None:
        try:
            body = response.json()
        except Exception:
            body = None
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            error = body["error"]
            return str(error.get("code", "Unknown")), str(error.get("message", ""))
        status = getattr(response, "status_code", None)
        if status is not None:
            return f"HTTP{status}", str(getattr(exc, "message", exc))
    return type(exc).__name__, str(exc)


def delete_in_order(
    arm: ArmSession, targets: Iterable[tuple[str, str, str]]
) -> tuple[list[str], dict[str, str]]:
    """Delete ``(type, resource group, name)`` targets in dependency order.

    Returns the deleted ids and, by ``type/name``, the failures (one failure does not stop
    the others: a teardown removes all it can, then reports what is left)."""
    unique = {(canonical_type(t), rg, name) for t, rg, name in targets}
    deleted: list[str] = []
    failed: dict[str, str] = {}
    for resource_type in DELETE_ORDER:
        for _, rg, name in sorted(t for t in unique if t[0] == resource_type):
            label = target_label(resource_type, rg, name)
            try:
                arm.delete(resource_type, rg, name)
                deleted.append(label)
            except Exception as exc:
                failed[label] = str(exc)
    for resource_type, rg, name in sorted(t for t in unique if t[0] not in DELETE_ORDER):
        failed[target_label(resource_type, rg, name)] = (
            "tagged by aicert but of a type aicert never makes: not deleted"
        )
    return deleted, failed


def target_label(resource_type: str, resource_group: str, name: str) -> str:
    """``<resource group>/<type>/<name>``: how reports name a resource."""
    return f"{resource_group}/{canonical_type(resource_type)}/{name}"


# -- the provider ---------------------------------------------------------------------------


def _utc_now_tag() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def check_azure_ak_chain(
    chain_pem: Sequence[str],
    ak_public: bytes,
    *,
    extra_trusted_roots: Sequence[str] = (),
    at_time: datetime | None = None,
) -> ChainVerification:
    """The AK certificate chain verifies to Microsoft's pinned vTPM root (or a root the
    caller trusts on purpose) and its leaf certifies ``ak_public`` (TPMT_PUBLIC); raises the
    verifier's ``CertificateChainError`` / ``AkMismatchError`` otherwise."""
    from aicert.chain import (
        PINNED_ROOT_FINGERPRINTS,
        leaf_public_key_matches,
        load_pem_certificates,
        verify_ak_chain,
    )
    from aicert.errors import AkMismatchError
    from aicert.quote import public_key_from_ak

    roots = [cert for pem in extra_trusted_roots for cert in load_pem_certificates(pem)]
    verified = verify_ak_chain(
        list(chain_pem),
        trusted_roots=roots,
        pinned_root_fingerprints=PINNED_ROOT_FINGERPRINTS.values(),
        at_time=at_time or datetime.now(UTC),
    )
    key, _ = public_key_from_ak(ak_public)
    if not leaf_public_key_matches(verified.leaf, key):
        raise AkMismatchError("the AK certificate does not certify the AK the VM presented")
    return verified


class AzureProvider(Provider):
    kind = "azure"

    def __init__(
        self,
        settings: AzureSettings,
        *,
        credential: TokenCredential | None = None,
        home: Path | None = None,
        progress: ProgressCallback = log_progress,
        extra_trusted_root_pems: Sequence[str] = (),
    ) -> None:
        """``credential``: None resolves ``settings.credentials_block`` or the default chain.
        ``extra_trusted_root_pems``: roots accepted besides Microsoft's pinned one when the
        provider checks an AK chain early (tests; the end verifier decides on its own)."""
        self.settings = settings
        self.home = (home or aicert_home()).resolve()
        self.progress = progress
        self.agent_start_timeout_s = settings.agent_start_timeout_s
        self.extra_trusted_root_pems = tuple(extra_trusted_root_pems)
        self._credential = credential
        self._boot_reference: AzureReferenceValueSet | None = None

    @classmethod
    def for_machine(
        cls,
        machine: Machine,
        *,
        credential: TokenCredential | None = None,
        progress: ProgressCallback = log_progress,
    ) -> AzureProvider:
        """A provider able to tear ``machine`` down, rebuilt from what the machine records."""
        if machine.provider != "azure" or "azure" not in machine.details:
            raise AzureProviderError(f"machine of run {machine.run_id} is not an azure machine")
        settings = AzureSettings.model_validate(machine.details["azure"])
        home = Path(machine.state_dir).parent.parent
        return cls(settings, credential=credential, home=home, progress=progress)

    @property
    def credential(self) -> TokenCredential:
        if self._credential is None:
            if self.settings.credentials_block:
                # A saved prefect-azure block is resolved by the Prefect side
                # (aicert.flows.azure_platform), which passes the credential in.
                raise AzureProviderError(
                    f"credentials block {self.settings.credentials_block!r}: build the provider "
                    "with its credential (aicert.flows.azure_platform.azure_provider_for_machine)"
                )
            self._credential = default_credential()
        return self._credential

    @contextmanager
    def session(self, settings: AzureSettings | None = None) -> Iterator[ArmSession]:
        arm = ArmSession.for_settings(settings or self.settings, self.credential, self.progress)
        try:
            yield arm
        finally:
            arm.close()

    def run_dir(self, run_id: str) -> Path:
        return self.home / "runs" / run_id

    def boot_reference(self) -> AzureReferenceValueSet | None:
        """The Azure reference-value set of ``settings.reference_values`` (read once), which the
        machine's boot chain must match; None when none is configured: then no boot chain is
        checked and the verifier refuses the certificate (it needs a set to judge the boot
        log), which is how a run without reference values stays visibly unattested."""
        path = self.settings.reference_values
        if path is None:
            return None
        if self._boot_reference is None:
            self._boot_reference = self._load_reference_values(Path(path))
        return self._boot_reference

    def _load_reference_values(self, path: Path) -> AzureReferenceValueSet:
        from aicert.errors import PlatformError
        from aicert.reference_values import load_reference_values

        try:
            reference = load_reference_values(path, platform="azure")
        except PlatformError as exc:
            raise AzureReferenceValuesError(f"reference_values: {exc}") from exc
        # The set describes one image version booted one way: a VM of another version or
        # security type would fail the boot-chain check after paying for a VM; refuse now.
        image = reference.image
        if image.security_type != self.settings.security_type:
            raise AzureReferenceValuesError(
                f"reference_values {path}: set {reference.id!r} is for {image.security_type} "
                f"VMs, the platform makes {self.settings.security_type} VMs"
            )
        if "/versions/" in self.settings.image_id.lower() and (
            image.gallery_image_version_id.lower() != self.settings.image_id.lower()
        ):
            raise AzureReferenceValuesError(
                f"reference_values {path}: set {reference.id!r} is for image version "
                f"{image.gallery_image_version_id}, not image_id {self.settings.image_id}"
            )
        return reference

    def reference_values(self) -> str | None:
        """The id of the reference-value set, which the certificate names."""
        reference = self.boot_reference()
        return reference.id if reference is not None else None

    # -- provision ---------------------------------------------------------------------------

    def provision(self, run_id: str) -> Machine:
        # Before any resource exists: a missing or wrong set must not cost a VM.
        reference = self.boot_reference()
        if reference is None:
            self.progress(
                "no reference-value set configured (reference_values): the VM's boot chain "
                "is not checked, and the certificate will not verify without one"
            )
        elif "/versions/" not in self.settings.image_id.lower():
            self.progress(
                f"image_id names no version: the VM boots the image's latest version, and "
                f"its boot chain must match reference values {reference.id} (version "
                f"{reference.image.gallery_image_version_id})"
            )
        names = AzureResourceNames.for_run(run_id)
        run_dir = self.run_dir(run_id)
        run_dir.mkdir(parents=True, exist_ok=True)
        machine = Machine(
            provider="azure",
            run_id=run_id,
            agent_url="",
            state_dir=str(run_dir),
            details={
                "azure": self.settings.model_dump(mode="json"),
                "names": names.by_type(),
            },
        )
        try:
            with self.session() as arm:
                self._create_resources(arm, run_id, names, machine)
            self._wait_for_agent(machine)
            return machine
        except BaseException as failure:
            self.progress(f"provisioning of run {run_id} failed; deleting what was created")
            try:
                self.teardown(machine)
            except Exception as teardown_error:
                failure.add_note(
                    f"teardown after the failed provision also failed: {teardown_error}"
                )
            if isinstance(failure, AzureProviderError | AgentUnreachableError) or not isinstance(
                failure, Exception
            ):
                raise
            raise AzureProvisioningError(
                f"provisioning run {run_id} failed: {failure}"
            ) from failure

    def _create_resources(
        self, arm: ArmSession, run_id: str, names: AzureResourceNames, machine: Machine
    ) -> None:
        from azure.mgmt.compute import models as compute
        from azure.mgmt.network import models as network

        s = self.settings
        rg = s.resource_group
        tags = {AICERT_RUN_TAG: run_id, AICERT_CREATED_TAG: _utc_now_tag()}

        nsg = arm.run(
            lambda: arm.network.network_security_groups.begin_create_or_update(
                rg, names.nsg, self._nsg_model(network, tags)
            ),
            f"create network security group {names.nsg}",
        )
        public_ip = arm.run(
            lambda: arm.network.public_ip_addresses.begin_create_or_update(
                rg,
                names.public_ip,
                network.PublicIPAddress(
                    location=s.location,
                    tags=tags,
                    sku=network.PublicIPAddressSku(name="Standard", tier="Regional"),
                    properties=network.PublicIPAddressPropertiesFormat(
                        public_ip_allocation_method="Static", public_ip_address_version="IPv4"
                    ),
                ),
            ),
            f"create public IP address {names.public_ip}",
        )
        subnet_id = s.subnet_id
        if subnet_id is None:
            vnet = arm.run(
                lambda: arm.network.virtual_networks.begin_create_or_update(
                    rg,
                    names.vnet,
                    network.VirtualNetwork(
                        location=s.location,
                        tags=tags,
                        properties=network.VirtualNetworkPropertiesFormat(
                            address_space=network.AddressSpace(
                                address_prefixes=[s.vnet_address_prefix]
                            ),
                            subnets=[
                                network.Subnet(
                                    name=names.subnet,
                                    properties=network.SubnetPropertiesFormat(
                                        address_prefix=s.subnet_address_prefix
                                    ),
                                )
                            ],
                        ),
                    ),
                ),
                f"create virtual network {names.vnet}",
            )
            subnet_id = f"{vnet.id}/subnets/{names.subnet}"
        nic = arm.run(
            lambda: arm.network.network_interfaces.begin_create_or_update(
                rg,
                names.nic,
                network.NetworkInterface(
                    location=s.location,
                    tags=tags,
                    properties=network.NetworkInterfacePropertiesFormat(
                        network_security_group=network.NetworkSecurityGroup(id=nsg.id),
                        ip_configurations=[
                            network.NetworkInterfaceIPConfiguration(
                                name="ipconfig1",
                                properties=network.NetworkInterfaceIPConfigurationPropertiesFormat(
                                    subnet=network.Subnet(id=subnet_id),
                                    private_ip_allocation_method="Dynamic",
                                    public_ip_address=network.PublicIPAddress(id=public_ip.id),
                                    primary=True,
                                ),
                            )
                        ],
                    ),
                ),
            ),
            f"create network interface {names.nic}",
        )
        vm = arm.run(
            lambda: arm.compute.virtual_machines.begin_create_or_update(
                rg, names.vm, self._vm_model(compute, names, tags, nic.id)
            ),
            f"create virtual machine {names.vm}",
        )
        machine.details["vm_id"] = vm.properties.vm_id if vm.properties else None
        # Azure creates the OS disk implicitly without the VM's tags: tag it, so that a
        # cleanup by tag finds it even if the VM is gone and the disk was left behind.
        arm.run(
            lambda: arm.compute.disks.begin_update(
                rg, names.os_disk, compute.DiskUpdate(tags=tags)
            ),
            f"tag disk {names.os_disk}",
        )
        address = arm.network.public_ip_addresses.get(rg, names.public_ip).properties.ip_address
        if not address:
            raise AzureProvisioningError(
                f"public IP address {names.public_ip} has no address after creation"
            )
        machine.details["public_ip"] = address
        host = f"[{address}]" if ":" in address else address
        # The image's agent serves HTTPS with its measured key (--tls); _wait_for_agent pins it.
        machine.agent_url = f"https://{host}:{s.agent_port}"

    def _nsg_model(self, network: Any, tags: dict[str, str]) -> Any:
        s = self.settings
        return network.NetworkSecurityGroup(
            location=s.location,
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
                            source_address_prefix=s.orchestrator_cidr,
                            source_port_range="*",
                            destination_address_prefix="*",
                            destination_port_range=str(s.agent_port),
                            description="The AICert orchestrator reaches the guest agent",
                        ),
                    ),
                    # The default rules admit the virtual network and the load balancer:
                    # nothing but the orchestrator may reach this machine.
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

    def _vm_model(
        self, compute: Any, names: AzureResourceNames, tags: dict[str, str], nic_id: str
    ) -> Any:
        s = self.settings
        disk_security = None
        if s.security_type == "ConfidentialVM":
            disk_security = compute.VMDiskSecurityProfile(
                security_encryption_type=s.confidential_os_disk_encryption
            )
        return compute.VirtualMachine(
            location=s.location,
            tags=tags,
            properties=compute.VirtualMachineProperties(
                hardware_profile=compute.HardwareProfile(vm_size=s.vm_size),
                security_profile=compute.SecurityProfile(
                    security_type=s.security_type,
                    uefi_settings=compute.UefiSettings(
                        secure_boot_enabled=True, v_tpm_enabled=True
                    ),
                ),
                storage_profile=compute.StorageProfile(
                    image_reference=compute.ImageReference(id=s.image_id),
                    os_disk=compute.OSDisk(
                        name=names.os_disk,
                        create_option="FromImage",
                        delete_option="Delete",
                        managed_disk=compute.ManagedDiskParameters(
                            storage_account_type=s.os_disk_type,
                            security_profile=disk_security,
                        ),
                    ),
                ),
                os_profile=compute.OSProfile(
                    computer_name=names.computer_name,
                    admin_username=s.admin_username,
                    linux_configuration=compute.LinuxConfiguration(
                        disable_password_authentication=True,
                        ssh=compute.SshConfiguration(
                            public_keys=[
                                compute.SshPublicKey(
                                    path=f"/home/{s.admin_username}/.ssh/authorized_keys",
                                    key_data=s.ssh_public_key,
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

    def _wait_for_agent(self, machine: Machine) -> None:
        """Wait for the agent and pin its channel certificate on ``machine`` (trust on first
        use: the flow's ``attest-machine`` step then checks that the attested vTPM measured
        that very key before anything of the run is sent)."""
        timeout = self.settings.agent_start_timeout_s
        self.progress(f"waiting up to {timeout:.0f} s for the guest agent at {machine.agent_url}")
        deadline = time.monotonic() + timeout
        while True:
            # A VM that accepts connections but never answers must not outlast the timeout.
            attempt_s = min(10.0, max(1.0, deadline - time.monotonic()))
            try:
                pinned, health = machine.probe_agent(timeout_s=attempt_s)
                break
            except (AgentUnreachableError, OSError) as exc:
                if time.monotonic() >= deadline:
                    raise AzureProvisioningError(
                        f"the guest agent at {machine.agent_url} did not answer within "
                        f"{timeout:.0f} s (VM {machine.details['names'][VIRTUAL_MACHINES]}): {exc}"
                    ) from exc
                time.sleep(AGENT_POLL_INTERVAL_S)
        machine.agent_certificate_pem = pinned.agent_certificate_pem
        if health.platform != "azure":
            raise AzureProvisioningError(
                f"the agent at {machine.agent_url} runs as platform {health.platform!r}, "
                "not 'azure': wrong image?"
            )
        self.progress(f"guest agent {health.runtime_version} ready at {machine.agent_url}")

    # -- attestation key -----------------------------------------------------------------------

    def enroll_attestation_key(self, machine: Machine, client: AgentClient) -> EnrolledKey:
        from aicert.chain import fingerprint_sha256, load_pem_certificates
        from aicert.errors import VerificationError

        material = client.key_material()
        chain = material.ak_certificate_chain
        if not chain:
            raise AzureEnrollmentError(
                "the guest agent returned no AK certificate chain: it must run with "
                "--platform azure on an Azure vTPM (AK at 0x81000003, certificate in NV "
                "0x01C101D0)"
            )
        try:
            verified = check_azure_ak_chain(
                chain, material.ak_public, extra_trusted_roots=self.extra_trusted_root_pems
            )
        except VerificationError as exc:
            raise AzureEnrollmentError(f"the VM's AK certificate is not acceptable: {exc}") from exc
        self.progress(
            f"AK certificate {verified.leaf.subject.rfc4514_string()} chains to "
            f"{verified.root_subject}; chain valid until {verified.not_after.isoformat()}"
        )
        ek_pem = None
        if material.ek_certificate is not None:
            ek_pem = (
                x509.load_der_x509_certificate(material.ek_certificate)
                .public_bytes(Encoding.PEM)
                .decode("ascii")
            )
        # A verifier pins Microsoft's root by itself; only a root trusted on purpose here
        # (tests) must be handed over with the certificate.
        trusted_root = next(
            (
                pem
                for pem in self.extra_trusted_root_pems
                if any(
                    fingerprint_sha256(cert) == verified.root_fingerprint_sha256
                    for cert in load_pem_certificates(pem)
                )
            ),
            None,
        )
        return EnrolledKey(
            ak_certificate_chain=list(chain),
            ek_certificate_pem=ek_pem,
            trusted_root_pem=trusted_root,
        )

    # -- teardown --------------------------------------------------------------------------

    def teardown(self, machine: Machine) -> None:
        """Delete every resource tagged with the run id, and the run's named resources."""
        settings = self.settings
        if "azure" in machine.details:
            # The machine's own record says where its resources are.
            settings = AzureSettings.model_validate(machine.details["azure"])
        rg = settings.resource_group
        names = AzureResourceNames.for_run(machine.run_id)
        targets = {(t, rg, n) for t, n in names.by_type().items()}
        failed: dict[str, str] = {}
        with self.session(settings) as arm:
            try:
                for found in arm.list_tagged(AICERT_RUN_TAG, machine.run_id, rg):
                    targets.add((found.type, found.resource_group, found.name))
            except Exception as exc:
                # Still delete the named resources; report the listing failure at the end.
                failed["list resources tagged with the run"] = str(exc)
            _, delete_failures = delete_in_order(arm, targets)
        failed.update(delete_failures)
        if failed:
            listing = "; ".join(f"{what}: {why}" for what, why in failed.items())
            raise AzureTeardownError(
                f"teardown of run {machine.run_id} left resources behind ({listing}); "
                "run `aicert azure cleanup` once the cause is fixed"
            )
        self.progress(f"deleted the resources of run {machine.run_id}")
