"""The ``local`` provider: a software TPM (swtpm) started by the project + the host's Docker.

This is the embedded default. It attests what the AICert agent measured, but no boot chain:
its certificates verify only with ``allow_dev_platform``. Each run gets its own swtpm (fresh
PCRs, its own EK certificate from the project's EK CA), its own agent process on a free
loopback port, and its own workspace, so concurrent runs share nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from aicert.flows.providers.base import (
    DEFAULT_AGENT_START_TIMEOUT_S,
    EnrolledKey,
    Machine,
    Provider,
)
from aicert.flows.settings import aicert_home
from aicert.guest_runtime.client import AgentClient

if TYPE_CHECKING:
    from aicert.guest_runtime.swtpm import LocalSwtpm


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _process_alive(pid: int, marker: str) -> bool:
    """True when ``pid`` is running and its command line contains ``marker`` (no pid reuse)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return marker in cmdline


def _terminate(pid: int, marker: str, grace_s: float = 10.0) -> None:
    if not _process_alive(pid, marker):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if not _process_alive(pid, marker):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _tail_text(path: Path, max_bytes: int = 2000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return "(no log)"
    return data[-max_bytes:].decode(errors="replace").strip()


class LocalProvider(Provider):
    kind = "local"

    def __init__(
        self,
        home: Path | None = None,
        *,
        agent_start_timeout_s: float = DEFAULT_AGENT_START_TIMEOUT_S,
    ) -> None:
        self.home = (home or aicert_home()).resolve()
        self.agent_start_timeout_s = agent_start_timeout_s
        # LocalSwtpm kills its process when the object is garbage collected (or at exit), so
        # the provider keeps each run's swtpm object until that run's teardown.
        self._swtpms: dict[str, LocalSwtpm] = {}

    @property
    def ek_ca_dir(self) -> Path:
        return self.home / "ek-ca"

    @property
    def platform_ca_dir(self) -> Path:
        return self.home / "platform-ca"

    def run_dir(self, run_id: str) -> Path:
        return self.home / "runs" / run_id

    def provision(self, run_id: str) -> Machine:
        from aicert.guest_runtime.swtpm import LocalSwtpm

        run_dir = self.run_dir(run_id)
        run_dir.mkdir(parents=True, exist_ok=True)
        tpm = LocalSwtpm.create(run_dir / "tpm", self.ek_ca_dir)
        tpm.start()
        self._swtpms[run_id] = tpm
        machine = Machine(
            provider="local",
            run_id=run_id,
            agent_url="",
            state_dir=str(run_dir),
            details={"swtpm_pid": tpm.detach(), "tpm_state": str(run_dir / "tpm")},
        )
        try:
            port = _free_port()
            agent_log = (run_dir / "agent.log").open("ab")
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "aicert.guest_runtime.server",
                    "--tcti",
                    tpm.tcti,
                    "--platform",
                    "local",
                    "--port",
                    str(port),
                    "--work-root",
                    str(run_dir / "work"),
                ],
                stdout=agent_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            agent_log.close()
            machine.details["agent_pid"] = process.pid
            machine.agent_url = f"http://127.0.0.1:{port}"
            return machine
        except BaseException:
            self.teardown(machine)
            raise

    def enroll_attestation_key(self, machine: Machine, client: AgentClient) -> EnrolledKey:
        from aicert.guest_runtime.platform_ca import PlatformCA

        ca = PlatformCA.load_or_create(self.platform_ca_dir)
        material = client.key_material(machine.run_id)
        if material.ek_certificate is None:
            raise RuntimeError("the TPM has no EK certificate: it cannot be enrolled")
        from aicert.guest_runtime.swtpm import LOCALCA_ISSUER_CERT

        verified_ek = ca.verify_ek_certificate(
            material.ek_certificate, self.ek_ca_dir / LOCALCA_ISSUER_CERT
        )
        challenge = ca.begin_activation(verified_ek, material.ek_public, material.ak_public)
        secret = client.activate_credential(
            machine.run_id, challenge.credential_blob, challenge.encrypted_secret
        )
        ak_certificate = ca.complete_activation(challenge, secret)
        ek_pem = (
            x509.load_der_x509_certificate(material.ek_certificate)
            .public_bytes(Encoding.PEM)
            .decode("ascii")
        )
        return EnrolledKey(
            ak_certificate_chain=[ak_certificate, ca.certificate_pem],
            ek_certificate_pem=ek_pem,
            trusted_root_pem=ca.certificate_pem,
        )

    def machine_problem(self, machine: Machine) -> str | None:
        agent_pid = machine.details.get("agent_pid")
        if agent_pid and not _process_alive(int(agent_pid), "aicert.guest_runtime.server"):
            log_tail = _tail_text(Path(machine.state_dir) / "agent.log")
            return f"the guest agent (pid {agent_pid}) exited; agent.log ends with:\n{log_tail}"
        swtpm_pid = machine.details.get("swtpm_pid")
        if swtpm_pid and not _process_alive(int(swtpm_pid), "swtpm"):
            return f"the software TPM (pid {swtpm_pid}) exited"
        return None

    def teardown(self, machine: Machine) -> None:
        agent_pid = machine.details.get("agent_pid")
        if agent_pid:
            _terminate(int(agent_pid), "aicert.guest_runtime.server")
        tpm = self._swtpms.pop(machine.run_id, None)
        if tpm is not None:
            tpm.stop()
        swtpm_pid = machine.details.get("swtpm_pid")
        if swtpm_pid:  # another process's swtpm (a hook tearing down after a crash)
            _terminate(int(swtpm_pid), "swtpm")
        _remove_run_containers(machine.run_id)

    def outputs_path(self, machine: Machine) -> Path | None:
        return Path(machine.state_dir) / "work" / machine.run_id


def run_container_labels(run_id: str) -> list[str]:
    """The ``aicert.run`` label values a run's training container may carry: the run id, and
    the container's name (``aicert-<run id>``), which guest_runtime.container puts there."""
    return [f"aicert.run={run_id}", f"aicert.run=aicert-{run_id}"]


def _remove_run_containers(run_id: str) -> None:
    """Remove any container left by the run (a crash between start and cleanup).

    Fails loudly when Docker cannot be asked: a teardown that silently leaves a training
    container running is worse than a failed teardown that says so.
    """
    import docker

    client = docker.from_env(timeout=30)
    try:
        seen: set[str] = set()
        for label in run_container_labels(run_id):
            for container in client.containers.list(all=True, filters={"label": label}):
                if container.id in seen:
                    continue
                seen.add(container.id)
                with contextlib.suppress(docker.errors.NotFound):
                    container.remove(force=True)
    finally:
        client.close()


def platform_ca_certificate_path(home: Path | None = None) -> Path:
    """The local platform CA certificate a verifier passes as ``--trust-root``."""
    return (home or aicert_home()) / "platform-ca" / "platform-ca.cert.pem"
