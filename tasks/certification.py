"""Prefect tasks of a certification run: thin wrappers over the provider and agent client.

Tasks pass paths, ids and small models, never file contents. Every task is declared with
``aicert_task`` (never cached) and one of the retry policies below: provisioning, waiting for
the agent, AK enrollment and the quote are safe to retry; measuring steps are not (a PCR
extended twice cannot be undone), so their retries happen inside the agent (downloads) or only
when the agent was never reached.
"""

from __future__ import annotations

import contextvars
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

from prefect import Task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.blocks.core import Block
from prefect.client.schemas.objects import State, TaskRun
from prefect.logging import get_run_logger

from aicert.appevents import OutputFileEvent
from aicert.guest_runtime.api_models import Evidence, ProgressReport, TrainingStatus
from aicert.guest_runtime.config import (
    ConfigError,
    RunConfig,
    load_config,
    resolve_certificate_paths,
    resolve_local_source,
)
from aicert.model import AppEvent
from aicert.tasks.platforms.agent_client import AgentCallError, AgentUnreachableError
from aicert.tasks.platforms.attestation import MachineAttestation, attest_machine
from aicert.tasks.platforms.base import (
    DEFAULT_AGENT_START_TIMEOUT_S,
    EnrolledKey,
    Machine,
    Provider,
)
from aicert.tasks.platforms.received_outputs import certified_outputs
from aicert.tasks.run_logs import forward_platform_logs
from aicert.tasks.task_factory import RetryPolicy, aicert_task

forward_platform_logs()


class MachineFailed(RuntimeError):
    """The provisioned machine cannot come up (its agent or TPM exited); retrying won't help."""


class TrainingFailed(RuntimeError):
    """The training job exited non-zero or timed out (its outputs and logs are kept)."""


def _only_if_unreachable(task: Task[..., object], task_run: TaskRun, state: State) -> bool:
    """Retry a guest call only when the agent never got it (no PCR was touched)."""
    try:
        state.result()
    except AgentUnreachableError as exc:
        return "Connect" in exc.kind
    except Exception:
        return False
    return False


def _unless_machine_failed(task: Task[..., object], task_run: TaskRun, state: State) -> bool:
    """Retry unless the platform reported the machine dead (``MachineFailed``)."""
    try:
        state.result()
    except MachineFailed:
        return False
    except Exception:
        return True
    return False


# The steps' retry policies, each stated once. Host-side operations and AK enrollment change
# nothing on the machine that a second attempt would double; a call that extends a PCR is
# repeated only when the agent never received it.
HOST_OPERATION = RetryPolicy(delays_s=(2, 10))
"""Provisioning, downloading the outputs: host-side work, safe to repeat."""
INPUT_STAGING = RetryPolicy(delays_s=(5,))
"""Fetching the inputs on the host (a network hiccup; nothing is measured yet)."""
AGENT_START = RetryPolicy(delays_s=(2,), condition=_unless_machine_failed)
"""Waiting for the agent: once more, unless the machine is known dead."""
KEY_ENROLLMENT = RetryPolicy(delays_s=(1, 5))
"""Certifying the AK: the CA issues a new certificate for the same key."""
UNTIL_AGENT_REACHED = RetryPolicy(delays_s=(1, 5), condition=_only_if_unreachable)
"""Guest calls that extend a PCR: repeated only when the agent never got the call."""
QUOTE = RetryPolicy(delays_s=(1, 2, 5))
"""The final quote: reads PCRs, changes none."""

T = TypeVar("T")

# Below this many bytes a step is over before a progress bar would mean anything.
DEFAULT_PROGRESS_MIN_BYTES = 64 * 1024 * 1024


def _progress_settings() -> tuple[int, float]:
    minimum = int(os.environ.get("AICERT_PROGRESS_MIN_BYTES", DEFAULT_PROGRESS_MIN_BYTES))
    return minimum, float(os.environ.get("AICERT_PROGRESS_POLL_S", "0.5"))


def _start_in_thread(call: Callable[[], T], name: str) -> tuple[threading.Thread, dict[str, Any]]:
    """Start ``call`` in a daemon thread, with this thread's context (the Prefect run's: its
    log lines reach this task run); its value or exception lands in the returned dict, for
    ``_outcome`` once the thread ended."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # re-raised in the caller's thread by _outcome
            outcome["error"] = exc

    context = contextvars.copy_context()
    worker = threading.Thread(target=context.run, args=(target,), name=name, daemon=True)
    worker.start()
    return worker, outcome


def _outcome(outcome: dict[str, Any]) -> Any:
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


class AgentStalled(RuntimeError):
    """A measuring step showed no progress for too long (not retried: the agent may still be
    extending PCRs in it; the run fails and its machine is torn down)."""


# A measuring call may rightly run for hours (a 14 GB base model hashed at ~20 MB/s in a qemu
# guest without KVM), so it is bounded by the progress the agent reports, not by its length:
# no change in the agent's progress (phase, bytes done, message) for this long fails the step.
DEFAULT_STALL_TIMEOUT_S = 900.0
# The measuring call's own HTTP read timeout: a backstop only, beyond any real run.
MEASURING_CALL_TIMEOUT_S = 48 * 3600.0


def _stall_timeout_s() -> float:
    return float(os.environ.get("AICERT_AGENT_STALL_TIMEOUT_S", DEFAULT_STALL_TIMEOUT_S))


class _ProgressWatch:
    """Shows an agent call's progress (a Prefect progress artifact and log lines) and
    notices when it stops changing."""

    def __init__(self, artifact_key: str, min_bytes: int, stall_timeout_s: float) -> None:
        self._key = artifact_key
        self._min_bytes = min_bytes
        self._stall_timeout_s = stall_timeout_s
        self._artifact_id: UUID | None = None
        self._last_logged = 0.0
        self._last: ProgressReport | None = None
        self._changed_at = time.monotonic()

    def observe(self, report: ProgressReport | None) -> None:
        """Take one poll's report (None: the agent did not answer).

        Raises:
            AgentStalled: nothing changed for the stall timeout.
        """
        now = time.monotonic()
        if report is not None and report != self._last:
            self._last, self._changed_at = report, now
            self._show(report)
        elif now - self._changed_at > self._stall_timeout_s:
            last = self._last
            seen = (
                f"{last.phase}, {last.done_bytes} bytes done, {last.message!r}"
                if last is not None
                else "no answer to a progress request"
            )
            raise AgentStalled(
                f"{self._key}: the agent showed no progress for {self._stall_timeout_s:.0f} s "
                f"(last seen: {seen}); set AICERT_AGENT_STALL_TIMEOUT_S to wait longer"
            )

    def _show(self, report: ProgressReport) -> None:
        if not report.total_bytes or report.total_bytes < self._min_bytes:
            return
        percent = min(100.0, 100.0 * report.done_bytes / report.total_bytes)
        if self._artifact_id is None:
            self._artifact_id = create_progress_artifact(
                progress=percent, key=self._key, description=report.phase
            )
        else:
            update_progress_artifact(self._artifact_id, percent, description=report.phase)
        if time.monotonic() - self._last_logged > 5.0:
            self._last_logged = time.monotonic()
            get_run_logger().info(
                "%s: %.0f%% of %.1f MB", report.phase, percent, report.total_bytes / 1e6
            )

    def finish(self) -> None:
        """The call ended: a progress bar shown is completed."""
        if self._artifact_id is not None:
            update_progress_artifact(self._artifact_id, 100.0)


def _call_with_progress(machine: Machine, artifact_key: str, call: Callable[[], T]) -> T:
    """Run a long agent call, showing its hashing/download progress as a Prefect progress
    artifact (and in the logs) while it runs; return the call's result.

    Raises:
        AgentStalled: the agent's progress did not change for the stall timeout
            (``AICERT_AGENT_STALL_TIMEOUT_S``, default 900 s); the call is abandoned.
    """
    worker, outcome = _start_in_thread(call, f"agent-call-{artifact_key}")
    min_bytes, poll_s = _progress_settings()
    watch = _ProgressWatch(artifact_key, min_bytes, _stall_timeout_s())
    with machine.client(timeout_s=5.0) as poller:
        while True:
            worker.join(poll_s)
            if not worker.is_alive():
                break
            try:
                report: ProgressReport | None = poller.progress()
            except AgentCallError:
                report = None  # the call itself reports what went wrong, if it ends
            watch.observe(report)
    value: T = _outcome(outcome)
    watch.finish()
    return value


def describe_event(event: AppEvent) -> str:
    """One log line's text for a measured event: ``PCR 14 <- source name=x sha256=ab12...``.

    Values are written as ``key=value`` (a digest shortened to 16 hex digits, nested values
    counted rather than dumped); the configuration is left out (its digest is measured)."""
    parts = [f"PCR {event.pcr} <- {event.type}"]
    for key, value in event.data.items():
        if key == "config":
            continue
        if isinstance(value, dict | list):
            parts.append(f"{key}=({len(value)} entries)")
        elif isinstance(value, str) and len(value) == 64 and _is_hex(value):
            parts.append(f"{key}={value[:16]}...")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def _is_hex(text: str) -> bool:
    return all(character in "0123456789abcdef" for character in text.lower())


def _log_events(events: list[AppEvent]) -> None:
    logger = get_run_logger()
    for event in events:
        logger.info("%s", describe_event(event))


def _config_from_block(block_or_name: Block | str) -> RunConfig:
    """The run configuration of an ``aicert-run-config`` block, or of the saved one named
    ``<slug>/<name>`` or by its bare name. Prefect finds the block class through the
    ``prefect.collections`` entry point (``aicert.flows.blocks``), so this layer needs no
    import of the flows package."""
    if isinstance(block_or_name, Block):
        block, name = block_or_name, block_or_name._block_document_name or "(unsaved)"
    else:
        name = block_or_name
        block = Block.load(name if "/" in name else f"aicert-run-config/{name}")
    load_config_of_block = getattr(block, "load_config", None)
    if not callable(load_config_of_block):
        raise ConfigError(
            [f"block {name!r} is a {type(block).__name__}, not an AicertRunConfig"],
            "config_block",
        )
    config = load_config_of_block()
    if not isinstance(config, RunConfig):
        raise ConfigError([f"block {name!r} did not give a run configuration"], "config_block")
    return config


@aicert_task("load-config")
def load_run_config(
    config_path: str | None = None, config_block: Block | str | None = None
) -> RunConfig:
    """Validate the run configuration from a file or a saved ``AicertRunConfig`` block.

    A relative local ``gitRepo`` is resolved against the file's folder (or the block's
    ``base_dir``), and so is a relative ``certifiedBy.certificate`` (file configs only).
    Raises ``ConfigError`` naming the field; nothing is retried.
    """
    if (config_path is None) == (config_block is None):
        raise ConfigError(["give exactly one of config_path and config_block"], "flow parameters")
    if config_block is not None:
        return _config_from_block(config_block)
    assert config_path is not None
    path = Path(config_path)
    config = load_config(path)
    config = resolve_certificate_paths(config, path.resolve().parent)
    return resolve_local_source(config, path.resolve().parent)


@aicert_task("provision", retry=HOST_OPERATION)
def provision_machine(provider: Provider, run_id: str) -> Machine:
    """Start the run's machine (its TPM and agent); its agent may not answer yet."""
    machine = provider.provision(run_id)
    get_run_logger().info("provisioned %s machine, agent at %s", provider.kind, machine.agent_url)
    return machine


@aicert_task("stage-inputs", retry=INPUT_STAGING)
def stage_inputs(provider: Provider, run_id: str, config: RunConfig) -> None:
    """Fetch the inputs on this host when the machine cannot (qemu: no network in the VM).
    Nothing is measured here: the machine measures what it is given."""
    logger = get_run_logger()
    provider.stage_inputs(run_id, config)
    logger.info("inputs for %s ready for the %s machine", run_id, provider.kind)


@aicert_task("wait-for-agent", retry=AGENT_START)
def wait_for_agent(
    provider: Provider, machine: Machine, timeout_s: float = DEFAULT_AGENT_START_TIMEOUT_S
) -> Machine:
    """Wait until the machine's agent answers; fail at once when the provider reports that
    the machine died (rather than after the whole timeout). An https agent's certificate is
    pinned on first contact: the returned machine carries it, and ``attest-machine`` then
    checks that the attested TPM measured that very key."""
    deadline = time.monotonic() + timeout_s
    https = machine.agent_url.startswith("https://")
    while True:
        try:
            pinned, health = machine.probe_agent(timeout_s=min(5.0, timeout_s))
            break
        except (AgentUnreachableError, OSError):
            problem = provider.machine_problem(machine)
            if problem is not None:
                raise MachineFailed(problem) from None
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)  # each probe is a refused connect (<1 ms) on a local agent
    logger = get_run_logger()
    logger.info(
        "agent %s ready on %s%s",
        health.runtime_version,
        health.platform,
        " (TLS channel pinned)" if https else "",
    )
    started = machine.details.get("started_at")
    if started is not None:  # a VM: how long firmware, kernel and agent took to come up
        boot_seconds = round(time.time() - float(started), 1)
        logger.info("the %s machine booted in %.1f s", provider.kind, boot_seconds)
        pinned = pinned.model_copy(
            update={"details": {**pinned.details, "boot_seconds": boot_seconds}}
        )
    return pinned


@aicert_task("establish-ak", retry=KEY_ENROLLMENT)
def establish_attestation_key(provider: Provider, machine: Machine) -> EnrolledKey:
    """Have the machine's AK certified (its cloud's CA, or the project's platform CA)."""
    with machine.client() as client:
        enrolled = provider.enroll_attestation_key(machine, client)
    get_run_logger().info("AK certified by %s", provider.kind)
    return enrolled


@aicert_task("attest-machine", retry=UNTIL_AGENT_REACHED)
def attest_machine_before_run(
    provider: Provider, machine: Machine, enrolled: EnrolledKey
) -> MachineAttestation:
    """Before anything of the run is sent: the machine is fresh, the channel ends in it, and
    its boot chain matches the platform's reference values (see ``attestation``)."""
    logger = get_run_logger()
    with machine.client() as client:
        attestation = attest_machine(machine, client, enrolled, provider.boot_reference())
    if attestation.channel_key_sha256:
        logger.info(
            "channel key %s... is the machine's (PCR 14)", attestation.channel_key_sha256[:16]
        )
    logger.info("machine attested: %s", attestation.boot_chain or "no measured boot chain")
    return attestation


@aicert_task("start-run", retry=UNTIL_AGENT_REACHED)
def start_run(machine: Machine, run_id: str, nonce: bytes, config: RunConfig) -> list[AppEvent]:
    """Send the run: runtime identity, nonce and configuration into PCR 14."""
    with machine.client() as client:
        events = client.start_run(run_id, nonce, config.measured_form())
    _log_events(events)
    return events


@aicert_task("measure-inputs", retry=UNTIL_AGENT_REACHED)
def measure_inputs(machine: Machine, run_id: str, project: str) -> list[AppEvent]:
    """Have the agent fetch and hash the inputs into PCR 14, showing its progress."""
    with machine.client(timeout_s=MEASURING_CALL_TIMEOUT_S) as client:
        events = _call_with_progress(
            machine, f"aicert-{project}-hashing-inputs", lambda: client.measure_inputs(run_id)
        )
    _log_events(events)
    return events


@aicert_task("build-image", retry=UNTIL_AGENT_REACHED)
def build_image(machine: Machine, run_id: str, project: str) -> list[AppEvent]:
    """Have the agent build the training image offline and measure it into PCR 14."""
    with machine.client() as client:
        events = client.build_image(run_id)
    _log_events(events)
    return events


# How long the TPM may take to answer the liveness check (a quote takes well under a second
# on a software TPM, a few seconds on a busy vTPM).
TPM_CHECK_TIMEOUT_S = 30.0


@aicert_task("check-tpm")
def check_tpm(provider: Provider, machine: Machine) -> None:
    """Right before the training starts: the machine's TPM must still answer, or the run
    would train for nothing (its outputs could not be measured or quoted).

    The platform's own view first (the swtpm or VM process alive), then a real TPM command
    through the agent: a platform quote over a fresh challenge, which changes no PCR.
    Raises ``MachineFailed`` naming the cause; nothing is retried.
    """
    problem = provider.machine_problem(machine)
    if problem is None:
        try:
            with machine.client(timeout_s=TPM_CHECK_TIMEOUT_S) as client:
                client.platform_quote(os.urandom(32))
        except AgentCallError as exc:
            # The agent may have died with its TPM meanwhile: the platform says which.
            problem = provider.machine_problem(machine) or f"the TPM did not answer: {exc}"
    if problem is not None:
        raise MachineFailed(f"the machine's TPM is not usable before training: {problem}")
    get_run_logger().info("TPM answers (platform quote over a fresh challenge)")


# While the job runs, how often the platform is asked whether the machine (its TPM, its
# agent, its VM) still lives.
MACHINE_CHECK_INTERVAL_S = 2.0


def _while_machine_lives(provider: Provider, machine: Machine, call: Callable[[], T]) -> T:
    """Run ``call`` (following the training) in a thread; raise ``MachineFailed`` as soon as
    the platform reports the machine dead, rather than after the whole training (a run whose
    TPM died can never be certified) or after the agent's unanswered polls ran out."""
    worker, outcome = _start_in_thread(call, f"follow-{machine.run_id}")
    while True:
        worker.join(MACHINE_CHECK_INTERVAL_S)
        if not worker.is_alive():
            break
        try:
            problem = provider.machine_problem(machine)
        except Exception:  # a failed diagnosis is not a dead machine
            problem = None
        if problem is not None:
            # The follower thread ends when teardown stops the agent.
            raise MachineFailed(f"{problem} (during training)")
    value: T = _outcome(outcome)
    return value


@aicert_task("run-training")
def run_training(
    machine: Machine, run_id: str, project: str, provider: Provider | None = None
) -> TrainingStatus:
    """Run the job and stream its logs into this task's logs. Never retried: a non-zero
    exit is the job's own result, not a platform fault. With ``provider``, a machine that
    dies meanwhile (its TPM or agent exits) fails the task at once with ``MachineFailed``."""
    logger = get_run_logger()
    with machine.client() as client:
        client.start_training(run_id)

        def follow() -> TrainingStatus:
            return client.follow_training(run_id, lambda line: logger.info("[training] %s", line))

        status = follow() if provider is None else _while_machine_lives(provider, machine, follow)
    if status.state != "succeeded":
        raise TrainingFailed(status.error or f"training ended as {status.state}")
    logger.info("training finished in %.1f s", (status.duration_ms or 0) / 1000)
    return status


@aicert_task("measure-outputs", retry=UNTIL_AGENT_REACHED)
def measure_outputs(machine: Machine, run_id: str, project: str) -> list[AppEvent]:
    """Have the agent measure the outputs into PCR 15; warn when the run left none (the
    certificate then certifies an empty outputs folder; ``outputs.minFiles`` makes that a
    failure, refused by the agent before PCR 15 is touched)."""
    with machine.client(timeout_s=MEASURING_CALL_TIMEOUT_S) as client:
        events = _call_with_progress(
            machine, f"aicert-{project}-hashing-outputs", lambda: client.measure_outputs(run_id)
        )
    _log_events(events)
    if not any(event.type == OutputFileEvent.TYPE for event in events):
        get_run_logger().warning(
            "run %s left no output files: its certificate lists no outputs (set "
            "outputs.minFiles in the config to make such a run fail)",
            run_id,
        )
    return events


@aicert_task("collect-outputs", retry=HOST_OPERATION)
def collect_outputs(
    machine: Machine, run_id: str, destination: str, measured: list[AppEvent] | None = None
) -> str:
    """Download the run's outputs and logs from a machine that keeps them (qemu, Azure)
    before it is torn down, streamed and hashed on arrival; returns the local folder
    (``outputs/`` and ``logs/``). ``measured``: the outputs step's events; each output must
    then arrive as certified (``OutputMismatchError`` names the one that does not)."""
    logger = get_run_logger()
    target = Path(destination)
    certified = certified_outputs(measured) if measured is not None else None
    with machine.client() as client:
        names = client.download_archive(run_id, target, certified=certified, progress=logger.info)
    total = sum((target / name).stat().st_size for name in names)
    logger.info("downloaded %d files (%.1f MB) to %s", len(names), total / 1e6, target)
    return str(target)


@aicert_task("quote", retry=QUOTE)
def collect_quote(machine: Machine, run_id: str) -> Evidence:
    """The run's evidence: the TPM quote over PCRs 0-15, the PCR values and event logs."""
    with machine.client() as client:
        evidence = client.quote(run_id)
    get_run_logger().info("TPM quote over PCRs 0-15 collected")
    return evidence


@aicert_task("teardown")
def teardown_machine(provider: Provider, machine: Machine) -> None:
    """Stop and remove the machine (idempotent: the hooks may tear it down again)."""
    provider.teardown(machine)
    get_run_logger().info("tore down the %s machine of %s", provider.kind, machine.run_id)
