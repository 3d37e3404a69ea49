"""The Compute Engine side of a gcp run: its settings, names, labels and requests.

One run makes two resources, both labelled ``aicert-run=<run label>`` and
``aicert-created=<unix time>``: a firewall rule admitting only the orchestrator's address to
the agent's port on instances tagged with the run, and a Shielded VM (vTPM, Secure Boot and
integrity monitoring on; a Confidential VM when asked) booted from the AICert guest image,
with no external IP unless asked. :class:`ComputeSession` creates them with the
``google-cloud-compute`` client (REST transport), waits for each operation, and deletes
them again, ignoring what is already gone (a teardown may run twice, or after a crash).
``list_stale_runs`` finds runs older than a limit for ``aicert gcp cleanup``.

The client library is imported where used: this module loads without the ``gcp`` extra.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aicert.tasks.platforms.gcp.settings import GcpSettings

if TYPE_CHECKING:
    from google.auth.credentials import Credentials
    from google.cloud.compute_v1 import FirewallsClient, InstancesClient

__all__ = [
    "AICERT_CREATED_LABEL",
    "AICERT_RUN_LABEL",
    "ComputeSession",
    "GcpOperationError",
    "GcpSettings",
    "RunResources",
    "run_label",
]

AICERT_RUN_LABEL = "aicert-run"
AICERT_CREATED_LABEL = "aicert-created"
_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


class GcpOperationError(RuntimeError):
    """A Compute Engine request or operation failed; ``code`` is its HTTP status."""

    def __init__(self, what: str, code: int | None, message: str) -> None:
        """Args:
        what: the request and its resource (``create instance x``).
        code: the HTTP status Compute Engine answered (429/403 for quota), if any.
        message: its error message.
        """
        self.what, self.code = what, code
        super().__init__(f"{what} failed: {code or 'error'}: {message}")


def run_label(run_id: str) -> str:
    """The run id as a label value and name part ([a-z0-9-], at most 59), unique by a hash."""
    slug = re.sub(r"[^a-z0-9-]+", "-", run_id.lower()).strip("-")[:50]
    return f"{slug}-{hashlib.sha256(run_id.encode()).hexdigest()[:8]}".lstrip("-")


@dataclass(frozen=True)
class RunResources:
    """The names of a run's resources (what a teardown needs, with the settings)."""

    instance: str
    firewall: str
    label: str

    @classmethod
    def for_run(cls, run_id: str) -> RunResources:
        label = run_label(run_id)
        base = f"aicert-{label}"[:57].rstrip("-")
        names = cls(instance=base, firewall=f"{base}-fw", label=label)
        for name in (names.instance, names.firewall):
            if not _NAME.fullmatch(name):
                raise ValueError(f"not a Compute Engine resource name: {name!r}")
        return names


def _labels(resources: RunResources, now: float) -> dict[str, str]:
    return {AICERT_RUN_LABEL: resources.label, AICERT_CREATED_LABEL: str(int(now))}


class ComputeSession:
    """Compute Engine requests of one project and zone, through google-cloud-compute."""

    def __init__(self, settings: GcpSettings, credentials: Credentials) -> None:
        """Args:
        settings: the project, zone and endpoint.
        credentials: google-auth credentials (a prefect-gcp block's, or anonymous in tests).
        """
        from google.api_core.client_options import ClientOptions
        from google.cloud import compute_v1

        options = (
            ClientOptions(api_endpoint=settings.api_endpoint) if settings.api_endpoint else None
        )
        self.settings = settings
        self.instances: InstancesClient = compute_v1.InstancesClient(
            credentials=credentials, client_options=options, transport="rest"
        )
        self.firewalls: FirewallsClient = compute_v1.FirewallsClient(
            credentials=credentials, client_options=options, transport="rest"
        )
        self.zone_operations = compute_v1.ZoneOperationsClient(
            credentials=credentials, client_options=options, transport="rest"
        )
        self.global_operations = compute_v1.GlobalOperationsClient(
            credentials=credentials, client_options=options, transport="rest"
        )

    def _wait(self, what: str, start: Callable[[], object], zonal: bool) -> None:
        """Start an operation and poll it until DONE with this session's own operations
        clients (the library's built-in waiter polls the default endpoint, whatever
        ``api_endpoint`` says); its error, or a request's, is a GcpOperationError."""
        from google.api_core import exceptions

        s = self.settings
        try:
            name = start().name  # type: ignore[attr-defined]
            deadline = time.monotonic() + s.operation_timeout_s
            while True:
                if zonal:
                    current = self.zone_operations.get(
                        project=s.project, zone=s.zone, operation=name
                    )
                else:
                    current = self.global_operations.get(project=s.project, operation=name)
                if current.status == current.Status.DONE:
                    break
                if time.monotonic() > deadline:
                    raise GcpOperationError(what, None, f"not done after {s.operation_timeout_s} s")
                time.sleep(s.poll_interval_s)
        except exceptions.GoogleAPICallError as exc:
            raise GcpOperationError(what, exc.code, exc.message) from exc
        if current.error.errors:
            message = "; ".join(f"{e.code}: {e.message}" for e in current.error.errors)
            raise GcpOperationError(what, current.http_error_status_code or None, message)

    def create_firewall(self, resources: RunResources, now: float | None = None) -> None:
        """Admit only the orchestrator to the agent's port on the run's instance."""
        from google.cloud import compute_v1

        settings = self.settings
        rule = compute_v1.Firewall(
            name=resources.firewall,
            network=settings.network,
            direction="INGRESS",
            priority=1000,
            source_ranges=[settings.orchestrator_cidr],
            target_tags=[resources.instance],
            allowed=[compute_v1.Allowed(I_p_protocol="tcp", ports=[str(settings.agent_port)])],
            description=f"AICert run {resources.label}: the orchestrator to the guest agent",
        )
        # Firewall rules carry no labels; the run is in the name, the tag and the description.
        self._wait(
            f"create firewall rule {resources.firewall}",
            lambda: self.firewalls.insert(project=settings.project, firewall_resource=rule),
            zonal=False,
        )

    def instance_body(
        self, resources: RunResources, metadata: Mapping[str, str], now: float
    ) -> object:
        """The Shielded VM the run boots (a ``compute_v1.Instance``)."""
        from google.cloud import compute_v1

        s = self.settings
        interface = compute_v1.NetworkInterface(network=s.network, subnetwork=s.subnetwork)
        if s.external_ip:
            interface.access_configs = [
                compute_v1.AccessConfig(name="external", type_="ONE_TO_ONE_NAT")
            ]
        instance = compute_v1.Instance(
            name=resources.instance,
            machine_type=f"zones/{s.zone}/machineTypes/{s.machine_type}",
            labels=_labels(resources, now),
            tags=compute_v1.Tags(items=[resources.instance]),
            disks=[
                compute_v1.AttachedDisk(
                    boot=True,
                    auto_delete=True,
                    initialize_params=compute_v1.AttachedDiskInitializeParams(
                        source_image=s.image,
                        disk_size_gb=s.disk_size_gb,
                        labels=_labels(resources, now),
                    ),
                )
            ],
            network_interfaces=[interface],
            shielded_instance_config=compute_v1.ShieldedInstanceConfig(
                enable_secure_boot=True, enable_vtpm=True, enable_integrity_monitoring=True
            ),
            metadata=compute_v1.Metadata(
                items=[compute_v1.Items(key=k, value=v) for k, v in sorted(metadata.items())]
            ),
        )
        if s.confidential_compute:
            instance.confidential_instance_config = compute_v1.ConfidentialInstanceConfig(
                enable_confidential_compute=True
            )
            instance.scheduling = compute_v1.Scheduling(on_host_maintenance="TERMINATE")
        return instance

    def create_instance(
        self, resources: RunResources, metadata: Mapping[str, str], now: float | None = None
    ) -> None:
        """Boot the run's Shielded VM and wait until Compute Engine reports it made."""
        body = self.instance_body(resources, metadata, time.time() if now is None else now)
        s = self.settings
        self._wait(
            f"create instance {resources.instance}",
            lambda: self.instances.insert(
                project=s.project,
                zone=s.zone,
                instance_resource=body,  # type: ignore[arg-type]
            ),
            zonal=True,
        )

    def instance_status(self, instance: str) -> str:
        """The VM's status as Compute Engine reports it (RUNNING, TERMINATED, ...).

        Raises:
            GcpOperationError: the request failed (code 404: the VM is gone).
        """
        from google.api_core import exceptions

        s = self.settings
        try:
            return self.instances.get(project=s.project, zone=s.zone, instance=instance).status
        except exceptions.GoogleAPICallError as exc:
            raise GcpOperationError(f"get instance {instance}", exc.code, exc.message) from exc

    def internal_ip(self, resources: RunResources) -> str:
        """The VM's address the orchestrator reaches (external when asked, else internal)."""
        from google.api_core import exceptions

        s = self.settings
        try:
            instance = self.instances.get(
                project=s.project, zone=s.zone, instance=resources.instance
            )
        except exceptions.GoogleAPICallError as exc:
            raise GcpOperationError(
                f"get instance {resources.instance}", exc.code, exc.message
            ) from exc
        interface = instance.network_interfaces[0]
        if s.external_ip and interface.access_configs:
            return interface.access_configs[0].nat_i_p
        return interface.network_i_p

    def delete_run(self, resources: RunResources) -> list[str]:
        """Delete the VM, then its firewall rule; what is already gone is skipped. Returns
        the resources that could not be deleted (empty when all are gone)."""
        from google.api_core import exceptions

        s = self.settings
        left: list[str] = []
        steps: list[tuple[str, Callable[[], object]]] = [
            (
                f"instance {resources.instance}",
                lambda: self.instances.delete(
                    project=s.project, zone=s.zone, instance=resources.instance
                ),
            ),
            (
                f"firewall rule {resources.firewall}",
                lambda: self.firewalls.delete(project=s.project, firewall=resources.firewall),
            ),
        ]
        for (name, start), zonal in zip(steps, (True, False), strict=True):
            try:
                self._wait(f"delete {name}", start, zonal)
            except GcpOperationError as exc:
                if not isinstance(exc.__cause__, exceptions.NotFound):
                    left.append(f"{name} ({exc})")
        return left

    def list_stale_runs(self, older_than_s: float, now: float | None = None) -> list[RunResources]:
        """The runs whose VM was created more than ``older_than_s`` ago (by its labels)."""
        s = self.settings
        limit = (time.time() if now is None else now) - older_than_s
        stale: list[RunResources] = []
        from google.cloud import compute_v1

        request = compute_v1.ListInstancesRequest(
            project=s.project, zone=s.zone, filter=f"labels.{AICERT_RUN_LABEL}:*"
        )
        for instance in self.instances.list(request=request):
            labels = dict(instance.labels)
            created = labels.get(AICERT_CREATED_LABEL, "")
            if created.isdigit() and int(created) < limit:
                name = instance.name
                stale.append(RunResources(name, f"{name}-fw", labels[AICERT_RUN_LABEL]))
        return stale
