"""The ``azure`` provider: a Trusted Launch or Confidential VM with a vTPM, made per run.

``provision`` creates the run's resources (``aicert.tasks.platforms.azure.resources``: an NSG
admitting only the orchestrator, a public IP, a network, a NIC, the VM and its OS disk, all
named after the run id and tagged with it) through an ``ArmSession``
(``aicert.tasks.platforms.azure.arm``: retries, long-running operations, progress in the
Prefect run logs or the ``aicert.tasks.platforms.azure`` logger). A provision that fails at
any point deletes what it made before raising. ``teardown`` deletes every resource tagged
with the run id plus the run's deterministic names, in dependency order, and works from the
``Machine`` alone (``AzureProvider.for_machine``), so a crash or cancellation hook in another
process can run it. ``aicert azure cleanup`` (``aicert.flows.azure_cleanup``) removes older
leftovers.

The image's agent serves HTTPS (``--tls``) with a key it measured into PCR 14 before serving:
the provider pins the certificate it sees on first contact, every later call accepts only that
certificate, and the flow's ``attest-machine`` step sends the run only once a quote by the
certified AK shows PCR 14 holding exactly that key. The boot chain is judged against the
reference-value set published with the gallery image version (``reference_values``: the path of
its ``reference-values.json``); without one no boot chain is checked, and the verifier refuses
the certificate for want of a reference-value set.

The AK is Azure's own (persistent handle 0x81000003, certificate in NV 0x01C101D0, chained to
Microsoft's vTPM root, read by ``aicert.guest_runtime.azure_ak`` on the VM): enrolment
completes its chain (shipped intermediates, then AIA: ``aicert.tasks.platforms.azure.ak_chain``)
and checks it early, with the verifier's pinned root, so a wrong VM is torn down before any
training.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from aicert.tasks.platforms.agent_client import AgentClient, AgentUnreachableError
from aicert.tasks.platforms.azure import arm as arm_access
from aicert.tasks.platforms.azure.ak_chain import AkChainCompleter
from aicert.tasks.platforms.azure.arm import (
    AICERT_RUN_TAG,
    VIRTUAL_MACHINES,
    ArmSession,
    AzureResourceNames,
    ProgressCallback,
    delete_in_order,
    log_progress,
)
from aicert.tasks.platforms.azure.errors import (
    AzureEnrollmentError,
    AzureProviderError,
    AzureProvisioningError,
    AzureReferenceValuesError,
    AzureTeardownError,
)
from aicert.tasks.platforms.azure.resources import RunResources, run_tags
from aicert.tasks.platforms.azure.settings import AzureSettings
from aicert.tasks.platforms.base import EnrolledKey, Machine
from aicert.tasks.platforms.cloud_vm import CloudVmProvider
from aicert.tasks.platforms.settings import aicert_home

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential

    from aicert.chain import ChainVerification
    from aicert.guest_runtime.api_models import KeyMaterial
    from aicert.reference_values import AzureReferenceValueSet


def check_azure_ak_chain(
    chain_pem: Sequence[str],
    ak_public: bytes,
    *,
    extra_trusted_roots: Sequence[str] = (),
    at_time: datetime | None = None,
) -> ChainVerification:
    """Check that the AK certificate chain verifies to Microsoft's pinned vTPM root (or a
    root the caller trusts on purpose) and that its leaf certifies ``ak_public``
    (TPMT_PUBLIC).

    Raises:
        CertificateChainError: the chain does not verify (the verifier's error).
        AkMismatchError: the leaf certifies another key.
    """
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


# The reference set named as a string: its module is imported lazily (only under TYPE_CHECKING).
class AzureProvider(CloudVmProvider["AzureReferenceValueSet"]):
    """The ``azure`` platform: one VM with a vTPM per run, made and deleted through ARM."""

    kind = "azure"
    provisioning_error = AzureProvisioningError

    def __init__(
        self,
        settings: AzureSettings,
        *,
        credential: TokenCredential | None = None,
        home: Path | None = None,
        progress: ProgressCallback = log_progress,
        extra_trusted_root_pems: Sequence[str] = (),
        ak_chain_completer: AkChainCompleter | None = None,
    ) -> None:
        """Args:
        settings: the platform's settings.
        credential: None resolves the default chain (a ``settings.credentials_block`` is
            resolved by ``aicert.flows.azure_platform``, which passes its credential in).
        home: the AICert home (runs' folders); None is ``aicert_home()``.
        progress: where progress is reported.
        extra_trusted_root_pems: roots accepted besides Microsoft's pinned one when the
            provider checks an AK chain early (tests; the end verifier decides on its own).
        ak_chain_completer: completes the VM's AK chain (None: the shipped CAs and AIA
            with the default bounds, ending at Microsoft's root or an extra trusted root).
        """
        self.settings = settings
        self.home = (home or aicert_home()).resolve()
        self.progress = progress
        self.agent_start_timeout_s = settings.agent_start_timeout_s
        self.extra_trusted_root_pems = tuple(extra_trusted_root_pems)
        self._credential = credential
        self._ak_chain_completer = ak_chain_completer

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
        """The credential ARM requests are signed with (the default chain unless given)."""
        if self._credential is None:
            if self.settings.credentials_block:
                # A saved prefect-azure block is resolved by the Prefect side
                # (aicert.flows.azure_platform), which passes the credential in.
                raise AzureProviderError(
                    f"credentials block {self.settings.credentials_block!r}: build the provider "
                    "with its credential (aicert.flows.azure_platform.azure_provider_for_machine)"
                )
            # Looked up on the module, where tests swap it for a local token.
            self._credential = arm_access.default_credential()
        return self._credential

    def session(self, settings: AzureSettings | None = None) -> ArmSession:
        """An ARM session (a context manager that closes its clients) for ``settings``."""
        return ArmSession(settings or self.settings, self.credential, self.progress)

    def run_dir(self, run_id: str) -> Path:
        """The host folder of run ``run_id`` (the machine's ``state_dir``)."""
        return self.home / "runs" / run_id

    # -- reference values ----------------------------------------------------------------------

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

    # -- provision ---------------------------------------------------------------------------

    def provision(self, run_id: str) -> Machine:
        """Create the run's VM and its network, and wait for its agent (certificate pinned).

        Raises:
            AzureProviderError: a resource could not be made, or the agent did not answer as
                an azure agent; what was created is deleted first.
            AzureReferenceValuesError: the configured set is unreadable or not the image's
                (before any resource exists).
        """
        self._announce_boot_reference()
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
                RunResources(arm, self.settings, names, run_tags(run_id)).create_all(machine)
            self._wait_for_agent(machine)
            return machine
        except BaseException as failure:
            self._delete_after_failure(machine, failure)
            if isinstance(failure, AzureProviderError | AgentUnreachableError) or not isinstance(
                failure, Exception
            ):
                raise
            raise AzureProvisioningError(
                f"provisioning run {run_id} failed: {failure}"
            ) from failure

    def _announce_boot_reference(self) -> None:
        """Load the reference-value set before any resource exists (a missing or wrong set
        must not cost a VM), and say what an unpinned or absent set means."""
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

    def vm_name(self, machine: Machine) -> str:
        """The VM's name in its resource group."""
        return str(machine.details["names"][VIRTUAL_MACHINES])

    # -- attestation key -----------------------------------------------------------------------

    def enroll_attestation_key(self, machine: Machine, client: AgentClient) -> EnrolledKey:
        """Check early that the VM's own AK certificate chains to Microsoft's vTPM root (a
        wrong VM is torn down before any training) and hand the chain over.

        Raises:
            AkChainIncompleteError: the chain cannot be completed (names the missing issuer;
                a subclass says why its AIA download failed).
            AzureEnrollmentError: no chain, or a chain that does not verify or certify the AK.
        """
        from aicert.errors import VerificationError

        material = client.key_material()
        chain = material.ak_certificate_chain
        if not chain:
            raise AzureEnrollmentError(
                "the guest agent returned no AK certificate chain: it must run with "
                "--platform azure on an Azure vTPM (AK at 0x81000003, certificate in NV "
                "0x01C101D0)"
            )
        # The VM's chain may lack intermediates of newer hierarchies (reachable only by AIA):
        # complete it here, where there is network, so the certificate verifies offline.
        chain = self.ak_chain_completer().complete(chain)
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
        return EnrolledKey(
            ak_certificate_chain=list(chain),
            ek_certificate_pem=_ek_certificate_pem(material),
            trusted_root_pem=self._trusted_root_pem(verified),
        )

    def ak_chain_completer(self) -> AkChainCompleter:
        """What completes the VM's AK chain: the shipped CAs, then AIA (``ak_chain``);
        roots trusted on purpose (tests) may end the chain."""
        if self._ak_chain_completer is None:
            self._ak_chain_completer = AkChainCompleter(
                trusted_root_pems=self.extra_trusted_root_pems
            )
        return self._ak_chain_completer

    # -- teardown --------------------------------------------------------------------------

    def teardown(self, machine: Machine) -> None:
        """Delete every resource tagged with the run id, and the run's named resources.

        Raises:
            AzureTeardownError: some could not be deleted (all others were); lists them.
        """
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


def _ek_certificate_pem(material: KeyMaterial) -> str | None:
    """The VM's EK certificate (DER from the agent) as PEM, when it has one."""
    if material.ek_certificate is None:
        return None
    certificate = x509.load_der_x509_certificate(material.ek_certificate)
    return certificate.public_bytes(Encoding.PEM).decode("ascii")
