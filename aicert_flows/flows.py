"""The ``certify-training`` flow: provision, measure, train, measure, quote, certify, teardown.

The body is ``certify_run``, shared with ``certify-evaluation`` (``aicert.flows.evaluation``).
Teardown runs in ``finally`` and again from the failure, crash and cancellation hooks
(``aicert.flows.certify_hooks``, idempotent); ``transaction()`` + ``on_rollback`` is not used
because, with a retried task inside, Prefect 3.9 rolls back on the first failed attempt even
when the retry succeeds.
"""

# No ``from __future__ import annotations`` here: a deployment's flow run validates the
# parameters against the signature's annotations, and string annotations (``PlatformKind``)
# were not resolved there ("Certify_TrainingModel is not fully defined").
import contextlib
import logging
import shutil
from datetime import UTC, datetime
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run as current_flow_run
from pydantic import BaseModel

from aicert.flows.artifacts import (
    artifact_key,
)
from aicert.flows.assemble import (
    new_nonce,
    new_run_id,
)
from aicert.flows.blocks import (
    AicertRunConfig,
    LocalPlatform,
    PlatformBlock,
    QemuPlatform,
    load_platform_block,
)
from aicert.flows.capacity import machine_slot
from aicert.flows.certify_hooks import CERTIFYING_FLOW_HOOKS, TRAINING_FLOW
from aicert.flows.events import (
    CERTIFICATE_CREATED,
    CERTIFICATE_FAILED,
    RunKind,
)
from aicert.flows.lifecycle import (
    ActiveRun,
    ProcessIdentity,
    cleanup_abandoned_runs,
    discard_record,
    record_path,
    save_record,
)
from aicert.flows.publish import (
    PublishedCertificate,
    assemble_and_write,
    publish_artifacts,
    store_certificate,
)
from aicert.guest_runtime.api_models import Evidence, TrainingStatus
from aicert.guest_runtime.config import RunConfig, parse_config
from aicert.guest_runtime.gpu import refuse_gpus_on_platform
from aicert.model import AppEvent, PlatformKind
from aicert.tasks import (
    MachineFailed,
    TrainingFailed,
    attest_machine_before_run,
    build_image,
    check_tpm,
    collect_outputs,
    collect_quote,
    establish_attestation_key,
    load_run_config,
    measure_inputs,
    measure_outputs,
    provision_machine,
    run_training,
    stage_inputs,
    start_run,
    teardown_machine,
    verify_certificate,
    wait_for_agent,
)
from aicert.tasks.certified_inputs import verify_certified_inputs
from aicert.tasks.platforms import get_provider
from aicert.tasks.platforms.attestation import MachineAttestation
from aicert.tasks.platforms.base import EnrolledKey, Machine, Provider
from aicert.tasks.task_factory import raise_if_cancelled
from aicert.tasks.verification import CertificateVerification

__all__ = [
    "CERTIFICATE_CREATED",
    "CERTIFICATE_FAILED",
    "CertificationResult",
    "PublishedCertificate",
    "artifact_key",
    "certify_run",
    "certify_training",
]

DEFAULT_CONFIG_PATH = "aicert.yaml"


# The runs this process started, newest last: ``aicert run`` says where an interrupted run
# kept its outputs and logs (the record on disk is gone once the run is torn down).
_RUNS_STARTED_HERE: list[ActiveRun] = []


def runs_started_here() -> list[ActiveRun]:
    """The records of the runs this process started (newest last), as last saved."""
    return list(_RUNS_STARTED_HERE)


def _cleanup_before_run() -> None:
    """Tear down runs of this host whose owning process died (a SIGKILLed ``aicert run``, a
    lost worker), before this run starts; logged. A failed cleanup does not stop this run:
    the record stays for the next one, or for ``aicert cleanup``."""
    logger = get_run_logger()

    def log(line: str) -> None:
        # Runs in progress elsewhere are the normal case (a worker's concurrent runs).
        level = logging.DEBUG if line.startswith("kept") else logging.INFO
        logger.log(level, "cleanup: %s", line)

    try:
        report = cleanup_abandoned_runs(log=log)
    except Exception as exc:
        logger.warning("cleanup of abandoned runs failed: %s: %s", type(exc).__name__, exc)
        return
    for flow_run_id in report.failed:
        logger.warning("cleanup: the record %s stays", record_path(flow_run_id))


def _raise_machine_failure(
    platform: Provider, machine: Machine, kept_in: Path | None, error: Exception
) -> None:
    """When a step failed because the machine itself died (its TPM or agent exited), raise
    ``MachineFailed`` saying so, and where the run's outputs and logs are kept, instead of
    the step's own error (a refused connection, a TSS error code)."""
    try:
        problem = platform.machine_problem(machine)
    except Exception:  # the diagnosis must not hide the original error
        return
    if problem is not None:
        where = kept_in or Path(machine.state_dir)
        raise MachineFailed(
            f"{problem}; no certificate; outputs and logs kept in {where}"
        ) from error


def resolve_platform(provider: str, platform_block: PlatformBlock | str | None) -> Provider:
    """The provider named by ``provider``, or configured by ``platform_block`` (a platform
    block, or the name of a saved one)."""
    if platform_block is None:
        return get_provider(provider)
    if isinstance(platform_block, str):
        platform_block = load_platform_block(platform_block)
    return platform_block.provider()


def pin_source_commit(config: RunConfig, commit: str) -> RunConfig:
    """The configuration with its source pinned to ``commit`` (an event's pushed commit),
    validated again like a configured one; the pinned form is what gets measured."""
    data = config.model_dump(by_alias=True)
    data["source"].update(commit=commit, tag=None, branch=None)
    return parse_config(data, source="flow parameter source_commit")


class CertificationResult(BaseModel):
    """What ``certify-training`` returns.

    Attributes:
        run_id: The run's id.
        project: The training project.
        certificate: Where the certificate was published.
        workspace: The folder on this host with the run's outputs and logs.
        report: The verification report.
    """

    run_id: str
    project: str
    certificate: PublishedCertificate
    workspace: str
    report: CertificateVerification


def _start_record(platform: Provider, run_id: str, project: str) -> ActiveRun:
    """Save the run's record (what the hooks and ``aicert cleanup`` tear down from) before
    anything is provisioned, and remember it as started here."""
    run_dir = getattr(platform, "run_dir", None)
    record = ActiveRun(
        flow_run_id=str(current_flow_run.id),
        run_id=run_id,
        project=project,
        provider=platform.kind,
        state_dir=str(run_dir(run_id)) if callable(run_dir) else None,
        owner=ProcessIdentity.current(),
        created_at=datetime.now(UTC),
    )
    save_record(record)
    _RUNS_STARTED_HERE.append(record)
    return record


def _bring_up_machine(
    platform: Provider, record: ActiveRun, config: RunConfig
) -> tuple[Machine, EnrolledKey, MachineAttestation]:
    """Stage the inputs, provision the machine, wait for its agent, certify its AK and
    attest it. ``record.machine`` is saved as soon as there is one, so that whatever fails
    next (here or in a hook) tears it down."""
    staged = stage_inputs(platform, record.run_id, config, return_state=True)
    staged.result()
    machine = provision_machine(platform, record.run_id, wait_for=[staged])
    record.machine = machine
    save_record(record)
    machine = wait_for_agent(platform, machine, timeout_s=platform.agent_start_timeout_s)
    record.machine = machine
    save_record(record)
    enrolled = establish_attestation_key(platform, machine)
    attestation = attest_machine_before_run(platform, machine, enrolled)
    return machine, enrolled, attestation


def _collect_kept_outputs(
    machine: Machine, run_id: str, measured: list[AppEvent] | None = None
) -> Path:
    """Fetch the outputs and logs of a machine that keeps them, before it is torn down;
    with ``measured`` (the outputs step's events), each output is checked on arrival."""
    workspace = Path(machine.state_dir) / "workspace"
    return Path(collect_outputs(machine, run_id, str(workspace), measured))


def _train(
    platform: Provider,
    machine: Machine,
    run_id: str,
    project: str,
    local_outputs: Path | None,
    after: object,
) -> TrainingStatus:
    """Check the TPM still answers, then run the training; a failure says where the run's
    outputs and logs are kept (``local_outputs``, or fetched from a machine that keeps
    them)."""
    # ``after`` (the image build's result) and the check's state are the graph's edges.
    tpm_checked = check_tpm(platform, machine, wait_for=[after], return_state=True)
    try:
        tpm_checked.result()
    except MachineFailed as exc:
        kept = f"nothing was trained; logs kept in {machine.state_dir}"
        raise MachineFailed(f"{exc}; {kept}") from exc
    try:
        return run_training(machine, run_id, project, platform, wait_for=[tpm_checked])
    except TrainingFailed:
        if local_outputs is None:
            local_outputs = _collect_kept_outputs(machine, run_id)
        get_run_logger().error("no certificate; outputs and training log kept in %s", local_outputs)
        raise
    except Exception as exc:
        _raise_machine_failure(platform, machine, local_outputs, exc)
        raise


def _measure_and_quote(
    platform: Provider,
    machine: Machine,
    run_id: str,
    project: str,
    local_outputs: Path | None,
    after: TrainingStatus,
) -> tuple[Evidence, Path]:
    """Measure the outputs into PCR 15 and take the quote; returns the evidence and the
    folder on this host that holds the run's outputs and logs (``local_outputs``, or
    fetched from a machine that keeps them)."""
    try:
        measured = measure_outputs(machine, run_id, project, wait_for=[after])
        evidence = collect_quote(machine, run_id, wait_for=[measured])
    except Exception as exc:
        _raise_machine_failure(platform, machine, local_outputs, exc)
        raise
    if local_outputs is None:
        local_outputs = _collect_kept_outputs(machine, run_id, measured)
    return evidence, local_outputs


def _certify(
    platform: Provider,
    machine: Machine,
    enrolled: EnrolledKey,
    evidence: Evidence,
    project: str,
    local_outputs: Path,
    output_bom: str | None,
    kind: RunKind,
) -> tuple[CertificateVerification, PublishedCertificate]:
    """Assemble the certificate, verify it, publish it (the event labelled ``kind``), and
    create the flow-run artifacts. Returns the verification report and where the
    certificate was published."""
    certificate_path = assemble_and_write(
        evidence,
        enrolled,
        project,
        platform.kind,
        platform.reference_values(),
        machine.state_dir,
    )
    model_path = str(local_outputs / "outputs")
    report = verify_certificate(
        certificate_path,
        trusted_roots=[enrolled.trusted_root_pem] if enrolled.trusted_root_pem else [],
        allow_dev_platform=platform.kind == "local",
        model_path=model_path,
        reference_values=platform.boot_reference(),
    )
    published = store_certificate(
        certificate_path,
        machine.run_id,
        project,
        output_bom,
        model_path,
        platform.boot_reference(),
        kind,
        wait_for=[report],
    )
    publish_artifacts(
        certificate_path, published, output_bom, model_path, platform.boot_reference()
    )
    return report, published


def _finish(
    platform: Provider,
    record: ActiveRun,
    early_teardown: list[PrefectFuture[None]],
    succeeded: bool,
) -> None:
    """The machine torn down (waiting for the early teardown, or now), the record updated;
    discarded once the run succeeded. If teardown raises, the record stays and the failure
    hook tears down again."""
    if record.machine is not None:
        if early_teardown:
            early_teardown[0].result()
        else:
            teardown_machine(platform, record.machine)
        record.torn_down = True
        with contextlib.suppress(OSError):
            save_record(record)
    if succeeded:
        discard_record(record.flow_run_id)


def initial_run_name() -> str:
    """The flow run's name until it has a run id: what it certifies (the config file's
    folder or the block's name)."""
    parameters = current_flow_run.parameters
    block = parameters.get("config_block")
    if block:
        return f"certify {getattr(block, '_block_document_name', None) or block}"
    config_path = Path(parameters.get("config_path") or DEFAULT_CONFIG_PATH)
    return f"certify {config_path.resolve().parent.name or config_path}"


def run_display_name(project: str, run_id: str) -> str:
    """The flow run's name once the run has an id: ``<project> · <UTC stamp>`` (the run id
    less its project prefix and random suffix; the run id itself is in the logs)."""
    stamp = run_id.removeprefix(f"{project}-").rsplit("-", 1)[0]
    return f"{project} · {stamp}"


def _rename_flow_run(project: str, run_id: str) -> None:
    """Name the flow run after its project and run id, unless the caller named it (a
    ``with_options(flow_run_name=...)`` is kept)."""
    context = FlowRunContext.get()
    if context is None or context.flow is None or context.flow_run is None:
        return
    if context.flow.flow_run_name is not initial_run_name:
        return
    from prefect.client.orchestration import get_client

    name = run_display_name(project, run_id)
    with get_client(sync_client=True) as client:
        client.update_flow_run(context.flow_run.id, name=name)
    context.flow_run.name = name


def _run_on_machine(
    platform: Provider,
    record: ActiveRun,
    config: RunConfig,
    output_bom: str | None,
    early_teardown: list[PrefectFuture[None]],
    kind: RunKind,
) -> tuple[CertificateVerification, PublishedCertificate, Path]:
    """Everything between provisioning and publishing. Once the machine has done its part
    its teardown is submitted (into ``early_teardown``, which the caller's ``finally`` waits
    for). Returns the report, the published certificate and the folder of the run's outputs
    and logs on this host. Each step waits for the one before it (``wait_for``), so the run
    graph shows the real order rather than every step hanging off ``wait-for-agent``."""
    run_id, project = record.run_id, record.project
    machine, enrolled, attestation = _bring_up_machine(platform, record, config)
    if any(resource.certified_by is not None for resource in config.resources):
        # The parents verified with this run's trust policy, before anything is measured.
        config = verify_certified_inputs(
            config,
            [enrolled.trusted_root_pem] if enrolled.trusted_root_pem else [],
            platform.kind == "local",
            platform.boot_reference(),
            wait_for=[attestation],
        )
    started = start_run(machine, run_id, new_nonce(), config, wait_for=[attestation])
    inputs = measure_inputs(machine, run_id, project, wait_for=[started])
    image = build_image(machine, run_id, project, wait_for=[inputs])
    # Where this host keeps the run's files (None: the machine keeps them).
    kept_here = platform.outputs_path(machine)
    status = _train(platform, machine, run_id, project, kept_here, after=image)
    evidence, local_outputs = _measure_and_quote(
        platform, machine, run_id, project, kept_here, after=status
    )
    # The machine has done its part: tear it down while the certificate is assembled.
    early_teardown.append(teardown_machine.submit(platform, machine, wait_for=[evidence]))
    report, published = _certify(
        platform, machine, enrolled, evidence, project, local_outputs, output_bom, kind
    )
    return report, published, local_outputs


@flow(
    name=TRAINING_FLOW,
    flow_run_name=initial_run_name,
    log_prints=True,
    **CERTIFYING_FLOW_HOOKS,  # type: ignore[arg-type]
)
def certify_training(
    config_path: str | None = None,
    provider: PlatformKind = "local",
    output_bom: str | None = None,
    outputs_dir: str | None = None,
    config_block: AicertRunConfig | str | None = None,
    platform_block: LocalPlatform | QemuPlatform | str | None = None,
    source_commit: str | None = None,
) -> dict[str, object]:
    """Certify a training run: the flow behind ``aicert run`` and the deployments.

    The flow run is named ``<project> · <UTC stamp>`` once the run has an id. Each machine
    takes a slot of the ``aicert-machines`` global concurrency limits while it exists (see
    ``aicert.flows.capacity``).

    Args:
        config_path: The run configuration file (``aicert.yaml``), relative to the flow's
            working folder; the default when no ``config_block`` is given.
        provider: The platform to certify on when no ``platform_block`` is given, one of
            the platform kinds: ``local`` (swtpm on this host, a development platform),
            ``qemu`` (a measured-boot VM); the cloud kinds need their platform block.
        output_bom: Where to write the certificate (JSON) besides the result storage.
        outputs_dir: A folder to copy the certified outputs (the model) into.
        config_block: An AicertRunConfig block holding the configuration, instead of
            ``config_path``: picked in the UI, or a saved block's name (what event triggers
            and automations pass).
        platform_block: A LocalPlatform or QemuPlatform block, or a saved platform
            block's name (a LocalPlatform name, or ``<block-type-slug>/<name>``: an
            AzurePlatform is given by name); takes precedence over ``provider``.
        source_commit: Certify this commit of the configured source (an event trigger
            passes the pushed commit) instead of its tag, branch or commit.

    Returns:
        ``CertificationResult.model_dump()``: the run id, project, where the certificate
        was published, the workspace and the verification report (a dict, as ``aicert run``
        and earlier callers index it).
    """
    if config_path is None and config_block is None:
        config_path = DEFAULT_CONFIG_PATH
    config = load_run_config(config_path, config_block)
    if source_commit:
        config = pin_source_commit(config, source_commit)
    platform = resolve_platform(provider, platform_block)
    result = certify_run(
        config, platform, kind="training", output_bom=output_bom, outputs_dir=outputs_dir
    )
    return result.model_dump()


def certify_run(
    config: RunConfig,
    platform: Provider,
    *,
    kind: RunKind,
    output_bom: str | None = None,
    outputs_dir: str | None = None,
) -> CertificationResult:
    """Certify one run of ``config`` on ``platform``, inside the calling flow: the body
    shared by the certifying flows (``certify-training``, ``certify-evaluation``).

    The flow run is renamed ``<project> · <UTC stamp>``, abandoned runs of this host are
    cleaned up, the machine takes a slot of the machine limits while it exists and is torn
    down whatever happens; the certificate is published with the event labelled ``kind``.
    The calling flow carries ``CERTIFYING_FLOW_HOOKS`` (teardown and the failure event).

    Args:
        config: The validated run configuration (certified inputs not yet resolved).
        platform: The platform to certify on.
        kind: The kind of run (the certificate events' ``aicert.run.kind``).
        output_bom: Where to write the certificate besides the result storage.
        outputs_dir: A folder to copy the certified outputs into.

    Returns:
        The run id, project, published certificate, workspace and verification report.
    """
    logger = get_run_logger()
    refuse_gpus_on_platform(config, platform.kind)  # GpuError, before anything is provisioned
    project = config.project_name()
    run_id = new_run_id(project)
    _rename_flow_run(project, run_id)
    logger.info("certifying %s as run %s on the %s platform", project, run_id, platform.kind)

    _cleanup_before_run()
    record = _start_record(platform, run_id, project)
    succeeded = False
    early_teardown: list[PrefectFuture[None]] = []
    with machine_slot(platform.kind):
        try:
            report, published, local_outputs = _run_on_machine(
                platform, record, config, output_bom, early_teardown, kind
            )
            succeeded = True
        except BaseException as exc:
            raise_if_cancelled(exc)
            raise
        finally:
            _finish(platform, record, early_teardown, succeeded)
    if outputs_dir:
        destination = Path(outputs_dir).resolve()
        shutil.copytree(local_outputs / "outputs", destination, dirs_exist_ok=True)
        logger.info("outputs copied to %s", destination)
    logger.info(
        "run %s certified and verified (%d checks passed): %s",
        run_id,
        len(report.checks),
        published.path,
    )
    return CertificationResult(
        run_id=run_id,
        project=project,
        certificate=published,
        workspace=str(local_outputs),
        report=report,
    )
