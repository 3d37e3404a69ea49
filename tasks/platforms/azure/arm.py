"""Azure Resource Manager access for the ``azure`` platform: sessions, names, deletions.

``ArmSession`` holds the SDK clients of one subscription (``azure-mgmt-compute``,
``azure-mgmt-network``, ``azure-mgmt-resource``): throttling (429, honouring ``Retry-After``)
and transient server errors are retried by azure-core's ``RetryPolicy``; long-running
operations are polled with progress reports, and one that ends ``Failed`` is started again,
then reported naming the resource. A run's resources have names derived from its run id
(``AzureResourceNames``) and carry the tags ``aicert-run`` and ``aicert-created-at``, so that
any process can find and delete them (``delete_in_order``, in dependency order). The SDKs
are imported where used, so that importing this module stays cheap.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

from aicert.tasks.platforms.azure.errors import AzureOperationError, AzureProviderError
from aicert.tasks.platforms.azure.settings import ArmSessionSettings, is_loopback
from aicert.tasks.platforms.cloud_vm import ProgressCallback

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential
    from azure.core.pipeline import PipelineRequest
    from azure.core.polling import LROPoller
    from azure.core.rest import HttpRequest
    from azure.mgmt.compute import ComputeManagementClient
    from azure.mgmt.core.policies import ARMChallengeAuthenticationPolicy
    from azure.mgmt.network import NetworkManagementClient
    from azure.mgmt.resource import ResourceManagementClient

# One logger for the platform's progress, whichever of its modules reports; inside a Prefect
# run ``aicert.tasks`` forwards it to the run's log (this package imports no Prefect).
progress_log = logging.getLogger(__package__)

AICERT_RUN_TAG = "aicert-run"
AICERT_CREATED_TAG = "aicert-created-at"
# The token audience of Azure public cloud's Resource Manager (sovereign clouds differ).
ARM_CREDENTIAL_SCOPES = ("https://management.azure.com/.default",)
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
        """The names of run ``run_id``'s resources."""
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


def log_progress(message: str) -> None:
    """Report progress into the platform's logger (the default progress callback)."""
    progress_log.info("%s", message)


def default_credential() -> TokenCredential:
    """``DefaultAzureCredential``: environment, managed identity, then the Azure CLI's."""
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential()


def _authentication_policy(
    credential: TokenCredential, scopes: Iterable[str]
) -> ARMChallengeAuthenticationPolicy:
    """ARM's bearer-token policy, which refuses plain http; allowed here on loopback only,
    where a test plays ARM (the settings already refuse any other http endpoint)."""
    from azure.mgmt.core.policies import ARMChallengeAuthenticationPolicy

    class _LoopbackAwareArmAuthentication(ARMChallengeAuthenticationPolicy):
        def on_request(self, request: PipelineRequest[HttpRequest]) -> None:
            parts = urlsplit(request.http_request.url)
            if parts.scheme == "http" and is_loopback(parts.hostname):
                request.context["enforce_https"] = False
            super().on_request(request)

    return _LoopbackAwareArmAuthentication(credential, *scopes)


@dataclass(frozen=True)
class TaggedResource:
    """A resource found by its tags: its ARM id, name, type, group and tags."""

    id: str
    name: str
    type: str
    resource_group: str
    tags: dict[str, str] | None  # None when ARM did not return them


class ArmSession:
    """The SDK clients of one subscription, with the provider's retry and polling rules."""

    def __init__(
        self,
        settings: ArmSessionSettings,
        credential: TokenCredential,
        progress: ProgressCallback = log_progress,
    ) -> None:
        """Args:
        settings: the subscription, endpoint, polling and retry rules (an ``AzureSettings``
            serves as well).
        credential: the token credential every request is signed with.
        progress: where operation progress is reported.
        """
        self.settings = settings
        self.credential = credential
        self.progress = progress
        self._lock = threading.Lock()
        self._compute: ComputeManagementClient | None = None
        self._network: NetworkManagementClient | None = None
        self._resources: ResourceManagementClient | None = None

    def _options(self) -> dict[str, object]:
        """The keyword arguments every SDK client of this session is built with."""
        options: dict[str, object] = {
            "polling_interval": self.settings.polling_interval_s,
            "retry_total": self.settings.retry_total,
            "retry_backoff_factor": self.settings.retry_backoff_factor,
            "retry_backoff_max": 120,
            "authentication_policy": _authentication_policy(self.credential, ARM_CREDENTIAL_SCOPES),
        }
        if self.settings.arm_endpoint is not None:
            options["base_url"] = self.settings.arm_endpoint
        return options

    @property
    def compute(self) -> ComputeManagementClient:
        """The compute client (VMs, disks), built on first use."""
        with self._lock:
            if self._compute is None:
                from azure.mgmt.compute import ComputeManagementClient

                self._compute = ComputeManagementClient(
                    self.credential, self.settings.subscription_id, **self._options()
                )
            return self._compute

    @property
    def network(self) -> NetworkManagementClient:
        """The network client (NSGs, IPs, networks, NICs), built on first use."""
        with self._lock:
            if self._network is None:
                from azure.mgmt.network import NetworkManagementClient

                self._network = NetworkManagementClient(
                    self.credential, self.settings.subscription_id, **self._options()
                )
            return self._network

    @property
    def resources(self) -> ResourceManagementClient:
        """The resource client (listing by tag), built on first use."""
        with self._lock:
            if self._resources is None:
                from azure.mgmt.resource import ResourceManagementClient

                self._resources = ResourceManagementClient(
                    self.credential, self.settings.subscription_id, **self._options()
                )
            return self._resources

    def close(self) -> None:
        """Close the clients built so far (a later use builds new ones)."""
        with self._lock:
            for client in (self._compute, self._network, self._resources):
                if client is not None:
                    client.close()
            self._compute = self._network = self._resources = None

    def __enter__(self) -> ArmSession:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- long-running operations ---------------------------------------------------------

    def wait(self, poller: LROPoller[T], what: str) -> T:
        """The operation's result, reporting its status every ``progress_interval_s``."""
        started = time.monotonic()
        while not poller.done():
            poller.wait(timeout=self.settings.progress_interval_s)
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
        ``Failed`` (ARM PUT and DELETE are idempotent), up to ``lro_attempts`` times.

        Raises:
            AzureOperationError: the request was refused, or every attempt ended ``Failed``.
        """
        from azure.core.exceptions import HttpResponseError
        from azure.core.polling.base_polling import OperationFailed

        attempts = self.settings.lro_attempts
        for attempt in range(1, attempts + 1):
            self.progress(f"{what}: started" + (f" (attempt {attempt})" if attempt > 1 else ""))
            try:
                return self.wait(start(), what)
            except HttpResponseError as exc:
                code, message = _arm_error(exc)
                lro_failed = isinstance(exc.__cause__, OperationFailed)
                if not lro_failed or attempt == attempts:
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
        return [
            TaggedResource(
                id=item.id,
                name=item.name,
                type=item.type,
                resource_group=parse_resource_id(item.id)["resource_group"],
                tags=dict(item.tags) if item.tags is not None else None,
            )
            for item in pages
        ]


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

    Returns:
        The deleted resources and, by the same label, the failures (one failure does not
        stop the others: a teardown removes all it can, then reports what is left). Labels
        are ``target_label``'s.
    """
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
