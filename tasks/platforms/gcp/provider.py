"""The ``gcp`` provider: a Compute Engine Shielded VM with a vTPM, made per run.

``provision`` creates the run's two resources through a ``ComputeSession``
(``aicert.tasks.platforms.gcp.compute``): a firewall rule admitting only the orchestrator to
the agent's port, and the Shielded VM (vTPM, Secure Boot, integrity monitoring), labelled with
the run. A provision that fails at any point deletes what it made before raising.
``teardown`` deletes both by their names, which follow from the run id alone, so it works from
the ``Machine`` (``GcpProvider.for_machine``) in a crash or cancellation hook of another
process, and twice; ``aicert gcp cleanup`` (``aicert.flows.gcp_cleanup``) removes older
leftovers by their labels.

The image's agent serves HTTPS with a key it measured into PCR 14 before serving: the
provider pins the certificate it sees on first contact, and the flow's ``attest-machine`` step
sends the run only once a quote by the certified AK shows PCR 14 holding exactly that key.

The AK is the one GCE provisions (template in NV 0x01c10001, certificate in 0x01c10000, read by
``aicert.guest_runtime.gce_ak``). The VM holds only the leaf certificate: enrolment completes
the chain with Google's intermediates the verifier ships, checks it against Google's pinned
roots (an issuer listing only the EK purpose accepted, as Google's do), and puts the whole
chain into the certificate, so a wrong VM is torn down before any training and verification
stays offline. The boot chain is judged against the image's gcp reference-value set.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.serialization import Encoding

from aicert.tasks.platforms.agent_client import AgentClient
from aicert.tasks.platforms.base import EnrolledKey, Machine
from aicert.tasks.platforms.cloud_vm import CloudVmProvider, ProgressCallback
from aicert.tasks.platforms.gcp.compute import ComputeSession, GcpOperationError, RunResources
from aicert.tasks.platforms.gcp.errors import (
    GcpEnrollmentError,
    GcpProviderError,
    GcpProvisioningError,
    GcpReferenceValuesError,
    GcpTeardownError,
)
from aicert.tasks.platforms.gcp.settings import GcpSettings
from aicert.tasks.platforms.settings import aicert_home

if TYPE_CHECKING:
    from google.auth.credentials import Credentials

    from aicert.chain import ChainVerification
    from aicert.reference_value_sets import GcpReferenceValueSet

__all__ = ["GcpProvider", "check_gcp_ak_chain", "default_credentials", "log_progress"]

progress_log = logging.getLogger("aicert.tasks.platforms.gcp")


def log_progress(message: str) -> None:
    """Report progress into the platform's logger (the default progress callback)."""
    progress_log.info("%s", message)


def default_credentials() -> Credentials:
    """Application Default Credentials (environment, metadata server, gcloud's)."""
    import google.auth

    credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
    return credentials


def check_gcp_ak_chain(
    chain_pem: Sequence[str],
    ak_public: bytes,
    *,
    extra_trusted_roots: Sequence[str] = (),
    extra_intermediates: Sequence[str] = (),
    at_time: datetime | None = None,
) -> ChainVerification:
    """Complete the VM's AK chain with the shipped Google intermediates (and
    ``extra_intermediates``), verify it to Google's pinned roots (or a root the caller trusts
    on purpose), and check that its leaf certifies ``ak_public`` (TPMT_PUBLIC).

    Args:
        chain_pem: what the VM handed over, the AK certificate first.
        ak_public: the AK's TPMT_PUBLIC.
        extra_trusted_roots: PEM roots accepted besides Google's pinned ones.
        extra_intermediates: PEM path-building candidates besides the shipped ones.
        at_time: when the chain must be valid (default: now).

    Returns:
        The verified chain, leaf to root.

    Raises:
        CertificateChainError: the chain does not verify (the verifier's error).
        AkMismatchError: the leaf certifies another key.
    """
    from aicert.chain import (
        issuer_key_purposes,
        leaf_public_key_matches,
        load_pem_certificates,
        pinned_roots,
        shipped_intermediates,
        verify_ak_chain,
    )
    from aicert.errors import AkMismatchError
    from aicert.quote import public_key_from_ak

    roots = [cert for pem in extra_trusted_roots for cert in load_pem_certificates(pem)]
    verified = verify_ak_chain(
        [*chain_pem, *shipped_intermediates("gcp"), *extra_intermediates],
        trusted_roots=roots,
        pinned_root_fingerprints=pinned_roots("gcp"),
        at_time=at_time or datetime.now(UTC),
        issuer_purposes=issuer_key_purposes("gcp"),
    )
    key, _ = public_key_from_ak(ak_public)
    if not leaf_public_key_matches(verified.leaf, key):
        raise AkMismatchError("the AK certificate does not certify the AK the VM presented")
    return verified


# The reference set named as a string: its module is imported lazily (only under TYPE_CHECKING).
class GcpProvider(CloudVmProvider["GcpReferenceValueSet"]):
    """The ``gcp`` platform: one Shielded VM with a vTPM per run, made through Compute Engine."""

    kind = "gcp"
    provisioning_error = GcpProvisioningError

    def __init__(
        self,
        settings: GcpSettings,
        *,
        credentials: Credentials | None = None,
        home: Path | None = None,
        progress: ProgressCallback = log_progress,
        extra_trusted_root_pems: Sequence[str] = (),
        extra_intermediate_pems: Sequence[str] = (),
    ) -> None:
        """Args:
        settings: the platform's settings.
        credentials: google-auth credentials; None resolves Application Default Credentials
            (a ``settings.credentials_block`` is resolved by ``aicert.flows.gcp_platform``,
            which passes its credentials in).
        home: the AICert home (runs' folders); None is ``aicert_home()``.
        progress: where progress is reported.
        extra_trusted_root_pems: roots accepted besides Google's pinned ones when the AK chain
            is checked (tests; the end verifier decides on its own).
        extra_intermediate_pems: intermediates that complete the chain besides the shipped
            Google ones (tests, or a hierarchy newer than the package).
        """
        self.settings = settings
        self.home = (home or aicert_home()).resolve()
        self.progress = progress
        self.agent_start_timeout_s = settings.agent_start_timeout_s
        self.extra_trusted_root_pems = tuple(extra_trusted_root_pems)
        self.extra_intermediate_pems = tuple(extra_intermediate_pems)
        self._credentials = credentials

    @classmethod
    def for_machine(
        cls,
        machine: Machine,
        *,
        credentials: Credentials | None = None,
        progress: ProgressCallback = log_progress,
    ) -> GcpProvider:
        """A provider able to tear ``machine`` down, rebuilt from what the machine records.

        Raises:
            GcpProviderError: the machine is not a gcp machine.
        """
        if machine.provider != "gcp" or "gcp" not in machine.details:
            raise GcpProviderError(f"machine of run {machine.run_id} is not a gcp machine")
        settings = GcpSettings.model_validate(machine.details["gcp"])
        home = Path(machine.state_dir).parent.parent
        return cls(settings, credentials=credentials, home=home, progress=progress)

    @property
    def credentials(self) -> Credentials:
        """The credentials Compute Engine requests are made with."""
        if self._credentials is None:
            if self.settings.credentials_block:
                raise GcpProviderError(
                    f"credentials block {self.settings.credentials_block!r}: build the provider "
                    "with its credentials (aicert.flows.gcp_platform.gcp_provider_for_machine)"
                )
            # Looked up on the module, where tests swap it for anonymous credentials.
            self._credentials = default_credentials()
        return self._credentials

    def session(self, settings: GcpSettings | None = None) -> ComputeSession:
        """A Compute Engine session for ``settings`` (default: the provider's)."""
        return ComputeSession(settings or self.settings, self.credentials)

    def run_dir(self, run_id: str) -> Path:
        """The host folder of run ``run_id`` (the machine's ``state_dir``)."""
        return self.home / "runs" / run_id

    # -- reference values ----------------------------------------------------------------------

    def _load_reference_values(self, path: Path) -> GcpReferenceValueSet:
        from aicert.errors import PlatformError
        from aicert.reference_values import load_reference_values

        try:
            reference = load_reference_values(path, platform="gcp")
        except PlatformError as exc:
            raise GcpReferenceValuesError(f"reference_values: {exc}") from exc
        # A set of another image or VM kind would fail the boot check after paying for a VM.
        image = reference.image
        if image.image != self.settings.image:
            raise GcpReferenceValuesError(
                f"reference_values {path}: set {reference.id!r} is for image {image.image}, "
                f"not {self.settings.image}"
            )
        if image.confidential_compute != self.settings.confidential_compute:
            kind = "Confidential" if image.confidential_compute else "Shielded"
            raise GcpReferenceValuesError(
                f"reference_values {path}: set {reference.id!r} is for {kind} VMs, the "
                "platform makes the other kind"
            )
        return reference

    # -- provision ---------------------------------------------------------------------------

    def provision(self, run_id: str) -> Machine:
        """Create the run's firewall rule and VM, and wait for its agent (certificate pinned).

        Raises:
            GcpProvisioningError: a resource could not be made, or the agent did not answer
                as a gcp agent; what was created is deleted first.
            GcpReferenceValuesError: the configured set is unreadable or not the image's
                (before any resource exists).
        """
        if self.boot_reference() is None:
            self.progress(
                "no reference-value set configured (reference_values): the VM's boot chain "
                "is not checked, and the certificate will not verify without one"
            )
        resources = RunResources.for_run(run_id)
        run_dir = self.run_dir(run_id)
        run_dir.mkdir(parents=True, exist_ok=True)
        machine = Machine(
            provider="gcp",
            run_id=run_id,
            agent_url="",
            state_dir=str(run_dir),
            details={
                "gcp": self.settings.model_dump(mode="json"),
                "instance": resources.instance,
                "firewall": resources.firewall,
            },
        )
        try:
            session = self.session()
            session.create_firewall(resources)
            self.progress(
                f"firewall rule {resources.firewall} admits {self.settings.orchestrator_cidr}"
            )
            session.create_instance(resources, {"aicert-run-id": run_id})
            address = session.internal_ip(resources)
            machine.agent_url = f"https://{address}:{self.settings.agent_port}"
            self.progress(f"instance {resources.instance} created at {address}")
            self._wait_for_agent(machine)
            return machine
        except BaseException as failure:
            self._delete_after_failure(machine, failure)
            if isinstance(failure, GcpProviderError) or not isinstance(failure, Exception):
                raise
            raise GcpProvisioningError(f"provisioning run {run_id} failed: {failure}") from failure

    def machine_problem(self, machine: Machine) -> str | None:
        """Why the VM can no longer come up: Compute Engine reports it stopped or gone."""
        instance = machine.details.get("instance")
        if not isinstance(instance, str):
            return None
        try:
            status = self.session().instance_status(instance)
        except GcpOperationError as exc:
            return f"instance {instance}: {exc}" if exc.code == 404 else None
        if status in ("STOPPING", "STOPPED", "SUSPENDING", "SUSPENDED", "TERMINATED"):
            return f"instance {instance} is {status} (preempted, stopped or failed)"
        return None

    def vm_name(self, machine: Machine) -> str:
        """The instance's name in its zone."""
        return str(machine.details["instance"])

    # -- attestation key -----------------------------------------------------------------------

    def enroll_attestation_key(self, machine: Machine, client: AgentClient) -> EnrolledKey:
        """Complete and check the VM's AK chain early (a wrong VM is torn down before any
        training) and hand the whole chain over, leaf to root.

        Raises:
            GcpEnrollmentError: no certificate, or a chain that does not verify to Google's
                roots or does not certify the AK.
        """
        from aicert.errors import VerificationError

        material = client.key_material()
        if not material.ak_certificate_chain:
            raise GcpEnrollmentError(
                "the guest agent returned no AK certificate: it must run with --platform gcp "
                "on a GCE vTPM (AK template in NV 0x01c10001, certificate in 0x01c10000)"
            )
        try:
            verified = check_gcp_ak_chain(
                material.ak_certificate_chain,
                material.ak_public,
                extra_trusted_roots=self.extra_trusted_root_pems,
                extra_intermediates=self.extra_intermediate_pems,
            )
        except VerificationError as exc:
            raise GcpEnrollmentError(f"the VM's AK certificate is not acceptable: {exc}") from exc
        self.progress(
            f"AK certificate {verified.leaf.subject.rfc4514_string()} chains to "
            f"{verified.root_subject}; chain valid until {verified.not_after.isoformat()}"
        )
        chain = [cert.public_bytes(Encoding.PEM).decode("ascii") for cert in verified.chain]
        return EnrolledKey(
            ak_certificate_chain=chain,
            # GCE's EK certificate is bound by nothing in a gcp certificate: not carried.
            ek_certificate_pem=None,
            trusted_root_pem=self._trusted_root_pem(verified),
        )

    # -- teardown --------------------------------------------------------------------------

    def teardown(self, machine: Machine) -> None:
        """Delete the run's VM and firewall rule; what is already gone is skipped.

        Raises:
            GcpTeardownError: some could not be deleted (the others were); lists them.
        """
        settings = self.settings
        if "gcp" in machine.details:
            # The machine's own record says where its resources are.
            settings = GcpSettings.model_validate(machine.details["gcp"])
        left = self.session(settings).delete_run(RunResources.for_run(machine.run_id))
        if left:
            raise GcpTeardownError(
                f"teardown of run {machine.run_id} left resources behind ({'; '.join(left)}); "
                "run `aicert gcp cleanup` once the cause is fixed"
            )
        self.progress(f"deleted the resources of run {machine.run_id}")
