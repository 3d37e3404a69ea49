"""The ``local`` provider: a software TPM (swtpm) started by the project + the host's Docker.

This is the embedded default. It attests what the AICert agent measured, but no boot chain:
its certificates verify only with ``allow_dev_platform``. Each run gets its own swtpm (fresh
PCRs, its own EK certificate from the project's EK CA), its own agent process on a free
loopback port, and its own workspace, so concurrent runs share nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from aicert.guest_runtime.wheel_cache import CACHE_ENV, DependencyCache, dependency_cache_dir
from aicert.tasks.platforms.agent_client import AgentClient
from aicert.tasks.platforms.base import (
    DEFAULT_AGENT_START_TIMEOUT_S,
    EnrolledKey,
    Machine,
    Provider,
)
from aicert.tasks.platforms.enrollment import enroll_with_platform_ca
from aicert.tasks.platforms.processes import free_port, log_tail, process_alive, terminate_all
from aicert.tasks.platforms.settings import aicert_home

if TYPE_CHECKING:
    from aicert.guest_runtime.config import RunConfig
    from aicert.tasks.platforms.swtpm import LocalSwtpm


log = logging.getLogger(__name__)

ABANDONED_SPARE_AGE_S = 600.0
SPARE_JOIN_TIMEOUT_S = 120.0
SPARE_NICENESS = 15
AGENT_MARKER = "aicert.guest_runtime.server"  # in the agent's command line

# Runs the agent (``aicert.guest_runtime.server``) once the TCTI arrives on stdin; started
# before the swtpm exists so that the agent's imports overlap the TPM's manufacture.
# An empty stdin (the provisioning failed) ends it without starting the agent.
_AGENT_LAUNCHER = (
    "import sys\n"
    "import aicert.guest_runtime.server as server\n"
    "import aicert.guest_runtime.tpm, uvicorn\n"  # what server.main imports late
    "tcti = sys.stdin.readline().strip()\n"
    "sys.exit(server.main(['--tcti', tcti, *sys.argv[1:]]) if tcti else 3)\n"
)


def _agent_idle(machine: Machine) -> bool:
    """True when the machine's agent answers and has no run in flight."""
    if not machine.agent_url:
        return False
    try:
        with machine.client(timeout_s=1.0) as client:
            return client.health(timeout_s=1.0).busy_run_id is None
    except Exception:  # unreachable or confused: treat it as busy, end it gently
        return False


class ProjectTpmMixin:
    """What providers whose TPMs the project manufactures (local, qemu) share: the CAs and
    run folders under their home, and AK enrolment by the project's platform CA.

    Attributes:
        home: The provider's ``AICERT_HOME``.
    """

    home: Path

    @property
    def ek_ca_dir(self) -> Path:
        """The EK CA that signs the EK certificate of every TPM the provider makes."""
        return self.home / "ek-ca"

    @property
    def platform_ca_dir(self) -> Path:
        """The platform CA that certifies the AKs of those TPMs."""
        return self.home / "platform-ca"

    def run_dir(self, run_id: str) -> Path:
        """The folder of one run (its TPM state, logs, outputs)."""
        return self.home / "runs" / run_id

    def enroll_attestation_key(self, machine: Machine, client: AgentClient) -> EnrolledKey:
        """Certify the machine's AK with the platform CA (EK certificate, credential
        activation)."""
        return enroll_with_platform_ca(self.ek_ca_dir, self.platform_ca_dir, machine, client)


class LocalProvider(ProjectTpmMixin, Provider):
    """Runs on this host: a swtpm and an agent process per run (see the module docstring)."""

    kind = "local"

    def __init__(
        self,
        home: Path | None = None,
        *,
        agent_start_timeout_s: float = DEFAULT_AGENT_START_TIMEOUT_S,
        keep_spare_tpm: bool = True,
        channel_tls: bool = False,
        staged_inputs: bool = False,
    ) -> None:
        """``channel_tls``: the agent serves TLS with a key it measures into PCR 14, as on
        remote platforms. ``staged_inputs``: the orchestrator fetches the inputs and the
        agent reads them from a staged tar, as in a VM without network."""
        self.home = (home or aicert_home()).resolve()
        self.channel_tls = channel_tls
        self.staged_inputs = staged_inputs
        self.agent_start_timeout_s = agent_start_timeout_s
        self.keep_spare_tpm = keep_spare_tpm
        self._spare_makers: list[threading.Thread] = []
        # LocalSwtpm kills its process when the object is garbage collected (or at exit), so
        # the provider keeps each run's swtpm object until that run's teardown.
        self._swtpms: dict[str, LocalSwtpm] = {}

    @property
    def spares_dir(self) -> Path:
        """Where manufactured, never started TPMs wait for a run."""
        return self.home / "tpm-spares"

    # -- spare TPMs ------------------------------------------------------------------------
    # Manufacturing a TPM (swtpm_setup: EKs, EK certificates) takes about a second, the
    # largest part of provisioning. So the provider keeps one manufactured, never started TPM
    # ready ("ready-<EK CA fingerprint>-<id>"), made in the background while a run trains.
    # A never started TPM is as fresh as a new one: its PCRs are reset when it starts, and
    # the agent refuses a TPM whose PCR 14/15 are not. A run claims a spare by renaming it,
    # which is atomic, so two runs never share one.

    def _ek_ca_fingerprint(self) -> str | None:
        from aicert.tasks.platforms.swtpm import LOCALCA_ISSUER_CERT

        try:
            issuer = (self.ek_ca_dir / LOCALCA_ISSUER_CERT).read_bytes()
        except OSError:
            return None
        return hashlib.sha256(issuer).hexdigest()[:16]

    def _claim_spare(self, tpm_dir: Path) -> LocalSwtpm | None:
        """A ready spare TPM moved to ``tpm_dir``, or None. Only spares whose EK certificates
        come from the current EK CA qualify (the platform CA checks them against it)."""
        from aicert.tasks.platforms.swtpm import LocalSwtpm, SwtpmError

        fingerprint = self._ek_ca_fingerprint()
        if fingerprint is None or not self.spares_dir.is_dir():
            return None
        for spare in sorted(self.spares_dir.glob(f"ready-{fingerprint}-*")):
            try:
                spare.rename(tpm_dir)
            except OSError:  # claimed by another run meanwhile
                continue
            try:
                return LocalSwtpm.load(tpm_dir, self.ek_ca_dir)
            except SwtpmError:
                shutil.rmtree(tpm_dir, ignore_errors=True)
        return None

    def _make_spare_in_background(self) -> None:
        if not self.keep_spare_tpm:
            return
        fingerprint = self._ek_ca_fingerprint()
        if fingerprint is not None and any(self.spares_dir.glob(f"ready-{fingerprint}-*")):
            return
        self.spares_dir.mkdir(parents=True, exist_ok=True)
        self._remove_abandoned_spares()
        name = uuid.uuid4().hex
        making = self.spares_dir / f"making-{name}"

        def manufacture() -> None:
            from aicert.tasks.platforms.swtpm import LocalSwtpm

            # Lower this thread's priority, which swtpm_setup inherits (on Linux the nice
            # value is per thread): the spare is for later and must not slow this run down.
            with contextlib.suppress(OSError, AttributeError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SPARE_NICENESS)
            try:
                LocalSwtpm.create(making, self.ek_ca_dir)
                making.rename(self.spares_dir / f"ready-{self._ek_ca_fingerprint()}-{name}")
            except Exception:  # a spare is an optimisation: the next run makes its own TPM
                log.warning("could not make a spare TPM in %s", making, exc_info=True)
                shutil.rmtree(making, ignore_errors=True)

        maker = threading.Thread(target=manufacture, name="aicert-spare-tpm", daemon=True)
        maker.start()
        self._spare_makers.append(maker)

    def _remove_abandoned_spares(self) -> None:
        """``making-*`` folders of processes that died while manufacturing."""
        cutoff = time.time() - ABANDONED_SPARE_AGE_S
        for folder in self.spares_dir.glob("making-*"):
            with contextlib.suppress(OSError):
                if folder.stat().st_mtime < cutoff:
                    shutil.rmtree(folder)

    def _finish_spares(self) -> None:
        """Wait for the spare being made (its swtpm_setup must not outlive the run)."""
        while self._spare_makers:
            self._spare_makers.pop().join(timeout=SPARE_JOIN_TIMEOUT_S)

    def provision(self, run_id: str) -> Machine:
        """Start the run's agent and swtpm; return once both processes are started.

        The agent's Python process starts first, through ``_AGENT_LAUNCHER``: its imports
        (about 0.8 s) overlap getting the TPM (a spare, or swtpm_setup: about 0.9 s), then it
        reads the swtpm's TCTI on stdin and runs the agent. ``wait_for_agent`` waits for its
        API.
        """
        from aicert.tasks.platforms.swtpm import LocalSwtpm

        run_dir = self.run_dir(run_id)
        run_dir.mkdir(parents=True, exist_ok=True)
        tpm_dir = run_dir / "tpm"
        if tpm_dir.exists():
            # Left by a failed attempt of this provisioning (the task retries): swtpm_setup
            # refuses an existing state, and a fresh TPM is what a retry should get anyway.
            shutil.rmtree(tpm_dir)
        port = free_port()
        scheme = "https" if self.channel_tls else "http"
        machine = Machine(
            provider="local",
            run_id=run_id,
            agent_url=f"{scheme}://127.0.0.1:{port}",
            state_dir=str(run_dir),
            # Everything a teardown in another process needs, recorded with the run.
            details={
                "tpm_state": str(tpm_dir),
                "agent_port": port,
                "container": f"aicert-{run_id}",
            },
        )
        with (run_dir / "agent.log").open("ab") as agent_log:
            agent = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _AGENT_LAUNCHER,
                    "--platform",
                    "local",
                    "--port",
                    str(port),
                    "--work-root",
                    str(run_dir / "work"),
                    *(["--tls"] if self.channel_tls else []),
                    *(
                        ["--staged-inputs", str(self.inputs_archive(run_id))]
                        if self.staged_inputs
                        else []
                    ),
                ],
                stdin=subprocess.PIPE,
                stdout=agent_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # The agent runs on this host: it shares this home's dependency cache.
                env={**os.environ, CACHE_ENV: str(dependency_cache_dir(self.home))},
            )
        machine.details["agent_pid"] = agent.pid
        try:
            tpm = self._claim_spare(tpm_dir) or LocalSwtpm.create(tpm_dir, self.ek_ca_dir)
            tpm.start()
            self._swtpms[run_id] = tpm
            # The provider owns the process now (stopped by pid in teardown, wherever that
            # runs), not the LocalSwtpm object's finalizer.
            machine.details["swtpm_port"] = tpm.port
            machine.details["swtpm_pid"] = tpm.detach()
            assert agent.stdin is not None
            agent.stdin.write(f"{tpm.tcti}\n".encode())
            agent.stdin.close()
            self._make_spare_in_background()
            return machine
        except BaseException:
            self.teardown(machine)
            raise

    def inputs_archive(self, run_id: str) -> Path:
        """The staged inputs of a run (``staged_inputs``)."""
        return self.run_dir(run_id) / "inputs.tar"

    def stage_inputs(self, run_id: str, config: RunConfig) -> None:
        """With ``staged_inputs``, fetch the run's inputs here into its staged tar."""
        if self.staged_inputs:
            from aicert.tasks.platforms.staging import write_staged_inputs

            write_staged_inputs(
                config,
                self.inputs_archive(run_id),
                run_id=run_id,
                dependency_cache=DependencyCache.for_home(self.home),
            )

    def machine_problem(self, machine: Machine) -> str | None:
        """Why the run's agent or TPM is gone, or None."""
        agent_pid = machine.details.get("agent_pid")
        if agent_pid and not process_alive(int(agent_pid), AGENT_MARKER):
            agent_log = log_tail(Path(machine.state_dir) / "agent.log", 2000)
            return f"the guest agent (pid {agent_pid}) exited; agent.log ends with:\n{agent_log}"
        swtpm_pid = machine.details.get("swtpm_pid")
        if swtpm_pid and not process_alive(int(swtpm_pid), "swtpm"):
            return f"the software TPM (pid {swtpm_pid}) exited"
        return None

    def teardown(self, machine: Machine) -> None:
        """Stop the run's agent and TPM, remove its container and staged inputs."""
        # The agent and its TPM go together: the run is over or abandoned, and the TPM's
        # state is thrown away, so nothing needs the agent to close its TPM session first.
        processes = [
            (int(pid), marker)
            for pid, marker in (
                (machine.details.get("agent_pid"), AGENT_MARKER),
                (machine.details.get("swtpm_pid"), "swtpm"),
            )
            if pid
        ]
        tpm = self._swtpms.pop(machine.run_id, None)
        # An agent with no run in flight (the run was quoted) has nothing left to write:
        # kill it at once instead of waiting ~0.4 s for its graceful exit. One in the middle
        # of a run (failure, crash, cancellation) gets SIGTERM and time to close its files.
        terminate_all(processes, grace_s=0.0 if _agent_idle(machine) else 10.0)
        if tpm is not None:
            tpm.stop()  # reaps the child and removes its pid file
        _remove_run_containers(machine.run_id)
        self.inputs_archive(machine.run_id).unlink(missing_ok=True)
        self._finish_spares()

    def outputs_path(self, machine: Machine) -> Path | None:
        """The agent's work folder of the run, on this host."""
        return Path(machine.state_dir) / "work" / machine.run_id


def run_container_filters(run_id: str) -> list[dict[str, str]]:
    """Docker filters that find a run's training container: the agent labels it
    ``aicert.run=<run id>`` and names it ``aicert-<run id>``."""
    return [{"label": f"aicert.run={run_id}"}, {"name": f"^aicert-{run_id}$"}]


def _remove_run_containers(run_id: str) -> None:
    """Remove any container left by the run (a crash between start and cleanup).

    Fails loudly when Docker cannot be asked: a teardown that silently leaves a training
    container running is worse than a failed teardown that says so.
    """
    import docker

    from aicert.guest_runtime.run_state import training_image_tag

    client = docker.from_env(timeout=30)
    try:
        seen: set[str] = set()
        for filters in run_container_filters(run_id):
            for container in client.containers.list(all=True, filters=filters):
                if container.id in seen:
                    continue
                seen.add(container.id)
                with contextlib.suppress(docker.errors.NotFound):
                    container.remove(force=True)
        # The run's training image is only needed while it runs (the certificate records
        # its ID): drop the run's tag so images do not pile up, run after run.
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            client.images.remove(training_image_tag(run_id), noprune=False)
    finally:
        client.close()


def platform_ca_certificate_path(home: Path | None = None) -> Path:
    """The local platform CA certificate a verifier passes as ``--trust-root``."""
    return (home or aicert_home()) / "platform-ca" / "platform-ca.cert.pem"
