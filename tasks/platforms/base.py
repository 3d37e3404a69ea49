"""The provider interface: what the flow needs from a platform, and nothing more.

A provider stages the inputs a machine cannot fetch, provisions a machine with a TPM and a
running guest agent, certifies that machine's attestation key (its cloud's CA, or the
project's platform CA), names the reference values its boot must match, and tears down
everything it made. ``Machine`` is plain data so it can
cross task boundaries and process boundaries (teardown may run in a crash hook).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from aicert.guest_runtime.api_models import Health
from aicert.guest_runtime.channel import fetch_server_certificate
from aicert.guest_runtime.config import RunConfig
from aicert.model import PlatformKind
from aicert.tasks.platforms.agent_client import AgentClient


class Machine(BaseModel):
    """A provisioned machine: where its agent listens and how to tear it down."""

    model_config = ConfigDict(extra="forbid")

    provider: PlatformKind
    run_id: str
    agent_url: str
    state_dir: str
    details: dict[str, Any] = {}
    # An https agent's channel certificate, pinned on first contact (see
    # aicert.guest_runtime.channel); the platform quote then shows it is the machine's.
    agent_certificate_pem: str | None = None

    def client(self, timeout_s: float = 900.0) -> AgentClient:
        return AgentClient(
            self.agent_url, timeout_s=timeout_s, server_certificate_pem=self.agent_certificate_pem
        )

    def probe_agent(self, timeout_s: float = 5.0) -> tuple[Machine, Health]:
        """Ask the agent's health once; returns this machine with its https agent's
        certificate pinned (fetched on first contact: trust on first use, which the flow's
        ``attest-machine`` then checks against the TPM's measurement of that very key), and
        the answer. Raises AgentUnreachableError or OSError when no agent answers."""
        pinned = self
        if self.agent_url.startswith("https://") and self.agent_certificate_pem is None:
            certificate = fetch_server_certificate(self.agent_url, timeout_s=timeout_s)
            pinned = self.model_copy(update={"agent_certificate_pem": certificate})
        with pinned.client(timeout_s=timeout_s) as client:
            return pinned, client.health(timeout_s=timeout_s)


class EnrolledKey(BaseModel):
    """The AK certificate chain (leaf first) and the EK certificate (PEM), when known."""

    model_config = ConfigDict(extra="forbid")

    ak_certificate_chain: list[str]
    ek_certificate_pem: str | None
    trusted_root_pem: str | None  # the root a verifier must trust (None: pinned in the SDK)


DEFAULT_AGENT_START_TIMEOUT_S = 60.0


class Provider(ABC):
    """A platform. ``teardown`` must work from the ``Machine`` alone: it may run in another
    process than ``provision`` (the crash hook, or a runner's cancellation hook)."""

    kind: PlatformKind
    # How long the flow waits for a freshly provisioned machine's agent to answer.
    agent_start_timeout_s: float = DEFAULT_AGENT_START_TIMEOUT_S

    def stage_inputs(self, run_id: str, config: RunConfig) -> None:
        """Fetch the run's inputs on this host for a machine that cannot (default: the
        machine's agent fetches them itself)."""
        return None

    @abstractmethod
    def provision(self, run_id: str) -> Machine:
        """Start a machine with a fresh TPM and the guest agent; return when it was started."""

    @abstractmethod
    def enroll_attestation_key(self, machine: Machine, client: AgentClient) -> EnrolledKey:
        """Have the machine's AK certified (credential activation against its EK)."""

    def machine_problem(self, machine: Machine) -> str | None:
        """Why the machine can no longer come up (e.g. its agent exited), or None.

        Lets the flow fail at once with the reason instead of waiting out a timeout."""
        return None

    def reference_values(self) -> str | None:
        """The id of the reference-value set a certificate from this platform names."""
        return None

    def boot_reference(self) -> Any | None:
        """The reference-value set the machine's boot chain must match (None: no boot chain
        is measured, e.g. the local platform)."""
        return None

    @abstractmethod
    def teardown(self, machine: Machine) -> None:
        """Stop and delete everything provisioned for the machine; idempotent."""

    def outputs_path(self, machine: Machine) -> Path | None:
        """Where the run's outputs and logs are kept on this host, if they are local."""
        return None
