"""What the cloud platforms (``azure``, ``gcp``) share: a VM made per run whose agent is
reached over https, and whose AK the cloud certified.

- a failed provision tears down what it made, and a teardown failure becomes a note on the
  provision's error (the error to raise);
- the agent is waited for with a deadline per attempt, its channel certificate pinned on
  first contact (trust on first use: the flow's ``attest-machine`` step then checks that the
  attested vTPM measured that very key before anything of the run is sent), and refused if it
  runs as another platform;
- a root trusted on purpose (a test's stand-in for the cloud's pinned root) goes with the
  enrolled key, so that the flow's own verification trusts it too;
- the configured reference-value set is read once, checked against what the platform makes
  (each cloud's own check), before any resource exists.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Generic, Protocol, TypeVar

from aicert.chain import ChainVerification, fingerprint_sha256, load_pem_certificates
from aicert.guest_runtime.hostutil import ProgressCallback
from aicert.tasks.platforms.agent_client import AgentUnreachableError
from aicert.tasks.platforms.base import Machine, Provider

if TYPE_CHECKING:
    from aicert.reference_value_sets import AzureReferenceValueSet

AGENT_POLL_INTERVAL_S = 1.0
"""The pause between two attempts to reach a new VM's agent."""
MAX_AGENT_ATTEMPT_S = 10.0
"""The longest one attempt may take: a VM that accepts connections but never answers must not
outlast the start timeout."""

CloudReferenceSet = TypeVar("CloudReferenceSet", bound="AzureReferenceValueSet")
"""A cloud's reference-value set (Azure's, or Google Cloud's, which extends it)."""


class CloudVmSettings(Protocol):
    """What the provider reads of a cloud platform's settings."""

    @property
    def reference_values(self) -> str | None:
        """The reference-value file the VMs' boot must match; None: none."""


class CloudVmProvider(Provider, Generic[CloudReferenceSet]):
    """A provider of cloud VMs (see the module's docstring).

    Attributes:
        settings: the platform's settings.
        progress: where progress is reported.
        extra_trusted_root_pems: roots accepted besides the cloud's pinned ones (tests).
        provisioning_error: the platform's exception for a VM that did not come up.
    """

    settings: CloudVmSettings
    progress: ProgressCallback
    extra_trusted_root_pems: tuple[str, ...]
    provisioning_error: ClassVar[type[Exception]]
    _boot_reference: CloudReferenceSet | None = None

    def boot_reference(self) -> CloudReferenceSet | None:
        """The reference-value set of ``settings.reference_values`` (read once), which the
        machine's boot chain must match; None when none is configured: then no boot chain is
        checked and the verifier refuses the certificate (it needs a set to judge the boot),
        which is how a run without reference values stays visibly unattested."""
        path = self.settings.reference_values
        if path is None:
            return None
        if self._boot_reference is None:
            self._boot_reference = self._load_reference_values(Path(path))
        return self._boot_reference

    @abstractmethod
    def _load_reference_values(self, path: Path) -> CloudReferenceSet:
        """Read the set at ``path`` and refuse one for another image or kind of VM than the
        platform makes (it would fail the boot check after paying for a VM)."""

    def reference_values(self) -> str | None:
        """The id of the reference-value set, which the certificate names."""
        reference = self.boot_reference()
        return reference.id if reference is not None else None

    @abstractmethod
    def vm_name(self, machine: Machine) -> str:
        """The cloud's name of the machine's VM, as errors name it."""

    def _delete_after_failure(self, machine: Machine, failure: BaseException) -> None:
        """Tear down what a failed provision created; a teardown failure becomes a note on
        ``failure`` (the provision's own error is the one to raise)."""
        self.progress(f"provisioning of run {machine.run_id} failed; deleting what was created")
        try:
            self.teardown(machine)
        except Exception as teardown_error:
            failure.add_note(f"teardown after the failed provision also failed: {teardown_error}")

    def _wait_for_agent(self, machine: Machine) -> None:
        """Wait for the agent and pin its channel certificate on ``machine``.

        Raises:
            provisioning_error: the agent did not answer in ``agent_start_timeout_s``, or runs
                as another platform (a wrong image).
        """
        timeout = self.agent_start_timeout_s
        self.progress(f"waiting up to {timeout:.0f} s for the guest agent at {machine.agent_url}")
        deadline = time.monotonic() + timeout
        while True:
            attempt_s = min(MAX_AGENT_ATTEMPT_S, max(1.0, deadline - time.monotonic()))
            try:
                pinned, health = machine.probe_agent(timeout_s=attempt_s)
                break
            except (AgentUnreachableError, OSError) as exc:
                if time.monotonic() >= deadline:
                    raise self.provisioning_error(
                        f"the guest agent at {machine.agent_url} did not answer within "
                        f"{timeout:.0f} s (VM {self.vm_name(machine)}): {exc}"
                    ) from exc
                time.sleep(AGENT_POLL_INTERVAL_S)
        machine.agent_certificate_pem = pinned.agent_certificate_pem
        if health.platform != self.kind:
            raise self.provisioning_error(
                f"the agent at {machine.agent_url} runs as platform {health.platform!r}, "
                f"not {self.kind!r}: wrong image?"
            )
        self.progress(f"guest agent {health.runtime_version} ready at {machine.agent_url}")

    def _trusted_root_pem(self, verified: ChainVerification) -> str | None:
        """The root trusted on purpose that the chain ended at, or None: a verifier pins the
        cloud's root by itself, only such a root must go with the certificate."""
        for pem in self.extra_trusted_root_pems:
            if any(
                fingerprint_sha256(cert) == verified.root_fingerprint_sha256
                for cert in load_pem_certificates(pem)
            ):
                return pem
        return None
