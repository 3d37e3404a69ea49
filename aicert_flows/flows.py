"""The ``certify-training`` flow: provision, measure, train, measure, quote, certify, teardown.

Teardown runs in ``finally`` and again from the failure, crash and cancellation hooks
(idempotent); ``transaction()`` + ``on_rollback`` is not used because, with a retried task
inside, Prefect 3.9 rolls back on the first failed attempt even when the retry succeeds.

The hooks find the machine through a record on disk (``$AICERT_HOME/active/<flow run id>.json``)
rather than in memory: under a runner or worker, the ``on_cancellation`` and ``on_crashed``
hooks run in the supervising process, not in the process that provisioned the machine.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import Flow, flow, get_run_logger
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.client.schemas.objects import FlowRun, State
from prefect.events import emit_event
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run as current_flow_run

import aicert
from aicert.flows.assemble import (
    assemble_certificate,
    certificate_digest,
    new_nonce,
    new_run_id,
    summary_markdown,
    summary_table,
)
from aicert.flows.lifecycle import (
    ActiveRun,
    ProcessIdentity,
    cleanup_abandoned_runs,
    discard_record,
    load_record,
    record_path,
    save_record,
    teardown_record,
)
from aicert.flows.output_target import OutputTargetError, check_output_target
from aicert.guest_runtime.api_models import Evidence
from aicert.guest_runtime.config import RunConfig, parse_config
from aicert.model import PlatformKind, write_atomic
from aicert.reference_values import PlatformReferenceValues
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
from aicert.tasks.platforms import get_provider
from aicert.tasks.platforms.base import EnrolledKey, Machine, Provider
from aicert.tasks.task_factory import aicert_task
from aicert.verify import VerificationReport

CERTIFICATE_CREATED = "aicert.certificate.created"
CERTIFICATE_FAILED = "aicert.certificate.failed"
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


def _after_unsuccessful_run(flow_run: FlowRun, state: State) -> None:
    """Shared by the failure, crash and cancellation hooks: teardown, then the event.

    The event's resource is ``aicert.run.<run id>``, or ``aicert.flow-run.<flow run id>``
    when the run failed before it got a run id (an invalid configuration).
    """
    flow_run_id = str(flow_run.id)
    record = load_record(flow_run_id)
    teardown_error: str | None = None
    if record is not None and not record.torn_down:
        try:
            teardown_record(record)
            record.torn_down = True
            # Only a hint for a later cleanup (the record is removed below): a full disk
            # must not turn a finished teardown into a failed one.
            with contextlib.suppress(OSError):
                save_record(record)
        except Exception as exc:  # still report the failed run; the record stays
            teardown_error = f"{type(exc).__name__}: {exc}"
    _emit_failed(flow_run, state, record, teardown_error)
    if teardown_error is not None:
        raise RuntimeError(
            f"teardown of run {record.run_id if record else '?'} failed: {teardown_error}; "
            f"its record stays at {record_path(flow_run_id)}"
        )
    discard_record(flow_run_id)


def _emit_failed(
    flow_run: FlowRun, state: State, record: ActiveRun | None, teardown_error: str | None
) -> None:
    """Emit ``aicert.certificate.failed`` for a run that ended without a certificate."""
    flow_run_id = str(flow_run.id)
    resource_id = (
        f"aicert.run.{record.run_id}" if record is not None else f"aicert.flow-run.{flow_run_id}"
    )
    emit_event(
        event=CERTIFICATE_FAILED,
        resource={
            "prefect.resource.id": resource_id,
            "prefect.resource.name": record.project if record else str(flow_run.name),
        },
        related=[
            {
                "prefect.resource.id": f"prefect.flow-run.{flow_run_id}",
                "prefect.resource.role": "flow-run",
                "prefect.resource.name": str(flow_run.name),
            }
        ],
        payload={
            "run_id": record.run_id if record else None,
            "project": record.project if record else None,
            "flow_run_id": flow_run_id,
            "state": str(state.type.value),
            "message": str(state.message or "")[:2000],
            "teardown_error": teardown_error,
        },
    )


# One hook per state, so that the run's logs name the one that ran.
def _on_failure(flow: Flow[..., dict[str, Any]], flow_run: FlowRun, state: State) -> None:
    _after_unsuccessful_run(flow_run, state)


def _on_crashed(flow: Flow[..., dict[str, Any]], flow_run: FlowRun, state: State) -> None:
    _after_unsuccessful_run(flow_run, state)


def _on_cancellation(flow: Flow[..., dict[str, Any]], flow_run: FlowRun, state: State) -> None:
    _after_unsuccessful_run(flow_run, state)


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


def resolve_platform(provider: str, platform_block: str | None) -> Provider:
    """The provider named by ``provider``, or configured by the saved ``platform_block``."""
    if platform_block is None:
        return get_provider(provider)
    from aicert.flows.blocks import load_platform_block

    return load_platform_block(platform_block).provider()


def pin_source_commit(config: RunConfig, commit: str) -> RunConfig:
    """The configuration with its source pinned to ``commit`` (an event's pushed commit),
    validated again like a configured one; the pinned form is what gets measured."""
    data = config.model_dump(by_alias=True)
    data["source"].update(commit=commit, tag=None, branch=None)
    return parse_config(data, source="flow parameter source_commit")


def artifact_key(project: str, kind: str) -> str:
    """Stable artifact keys (Prefect requires ``^[a-z0-9-]*$``)."""
    return f"aicert-{project}-{kind}"[:100]


@aicert_task("assemble-certificate")
def assemble_and_write(
    evidence: Evidence,
    enrolled: EnrolledKey,
    project: str,
    provider_kind: PlatformKind,
    reference_values: str | None,
    run_dir: str,
) -> str:
    """Build the certificate from the evidence; write it (and the platform CA it needs) to
    ``run_dir``. Returns the certificate's path."""
    certificate = assemble_certificate(
        evidence=evidence,
        enrolled=enrolled,
        project=project,
        provider=provider_kind,
        reference_values=reference_values,
    )
    path = Path(run_dir) / "certificate.json"
    certificate.write(path)
    if enrolled.trusted_root_pem:
        write_atomic(Path(run_dir) / "platform-ca.pem", enrolled.trusted_root_pem.encode())
    return str(path)


ReferenceValues = PlatformReferenceValues | Iterable[PlatformReferenceValues] | None


def _verify_before_publishing(
    certificate_path: str, data: bytes, reference_values: ReferenceValues
) -> VerificationReport:
    """Verify the very bytes about to be published (fail closed: nothing is written anywhere
    unless they verify); the report also feeds the artifacts."""
    certificate = aicert.Certificate.from_json_bytes(data, source=certificate_path)
    platform_ca = Path(certificate_path).with_name("platform-ca.pem")
    return certificate.verify(
        trusted_roots=[platform_ca] if platform_ca.exists() else [],
        allow_dev_platform=certificate.platform.kind == "local",
        reference_values=reference_values,
    )


def _write_output_bom(output_bom: str, data: bytes, certificate_path: str) -> str:
    """Write the certificate to ``output_bom`` atomically; returns where it was written."""
    # Checked again: the target may have changed during the run. The run is certified either
    # way, so the message points at the verified certificate kept with the run.
    try:
        return str(write_atomic(check_output_target(Path(output_bom)), data))
    except (OutputTargetError, OSError) as exc:
        reason = exc.reason if isinstance(exc, OutputTargetError) else exc.strerror
        raise OutputTargetError(
            Path(output_bom),
            f"cannot write the certificate there ({reason}); the run is certified and "
            f"its verified certificate is {certificate_path}",
        ) from None


def _write_to_result_storage(run_id: str, data: bytes) -> str:
    """Store the certificate in the flow's default result storage; returns its URL."""
    from prefect.results import get_default_result_storage

    stored_at = get_default_result_storage().write_path(f"aicert/{run_id}/certificate.json", data)
    storage_url = str(stored_at)
    if "://" not in storage_url:
        storage_url = Path(storage_url).resolve().as_uri()
    return storage_url


def _create_certificate_artifacts(
    verification: VerificationReport,
    run_id: str,
    project: str,
    published: str,
    storage_url: str,
    digest: str,
) -> None:
    """The certificate's summary, its bill of materials and a link to the stored file."""
    create_markdown_artifact(
        key=artifact_key(project, "certificate"),
        markdown=summary_markdown(verification, published),
        description=f"AICert certificate of run {run_id}",
    )
    create_table_artifact(
        key=artifact_key(project, "bom"),
        table=summary_table(verification),
        description="Certified inputs (PCR 14) and outputs (PCR 15)",
    )
    create_link_artifact(
        key=artifact_key(project, "certificate-file"),
        link=storage_url,
        link_text=f"certificate.json ({digest[:12]})",
        description="The certificate in the flow's result storage",
    )


@aicert_task("store-certificate")
def store_certificate(
    certificate_path: str,
    report: dict[str, Any],
    project: str,
    output_bom: str | None,
    outputs_path: str | None = None,
    reference_values: ReferenceValues = None,
) -> dict[str, Any]:
    """Publish: the file at ``output_bom`` (atomically), result storage, artifacts, event.

    ``outputs_path``: the run's outputs folder on this host, when the platform keeps one; the
    event carries it so that a downstream flow (verify-and-promote) can re-hash the model.
    """
    logger = get_run_logger()
    data = Path(certificate_path).read_bytes()
    digest = certificate_digest(data)
    verification = _verify_before_publishing(certificate_path, data, reference_values)
    published = certificate_path
    if output_bom:
        published = _write_output_bom(output_bom, data, certificate_path)
        logger.info("certificate written to %s", published)
    storage_url = _write_to_result_storage(report["run_id"], data)
    _create_certificate_artifacts(
        verification, report["run_id"], project, published, storage_url, digest
    )
    emit_event(
        event=CERTIFICATE_CREATED,
        resource={
            "prefect.resource.id": f"aicert.run.{report['run_id']}",
            "prefect.resource.name": project,
        },
        payload={
            "run_id": report["run_id"],
            "project": project,
            "certificate_sha256": digest,
            "certificate_path": published,
            "storage_url": storage_url,
            "platform": report["platform"],
            "outputs_path": outputs_path,
        },
    )
    return {"path": published, "sha256": digest, "storage_url": storage_url}


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
) -> tuple[Machine, EnrolledKey]:
    """Stage the inputs, provision the machine, wait for its agent, certify its AK and
    attest it. ``record.machine`` is saved as soon as there is one, so that whatever fails
    next (here or in a hook) tears it down."""
    stage_inputs(platform, record.run_id, config)
    machine = provision_machine(platform, record.run_id)
    record.machine = machine
    save_record(record)
    machine = wait_for_agent(platform, machine, timeout_s=platform.agent_start_timeout_s)
    record.machine = machine
    save_record(record)
    enrolled = establish_attestation_key(platform, machine)
    attest_machine_before_run(platform, machine, enrolled)
    return machine, enrolled


def _collect_kept_outputs(machine: Machine, run_id: str) -> Path:
    """Fetch the outputs and logs of a machine that keeps them, before it is torn down."""
    workspace = Path(machine.state_dir) / "workspace"
    return Path(collect_outputs(machine, run_id, str(workspace)))


def _train(
    platform: Provider, machine: Machine, run_id: str, project: str, local_outputs: Path | None
) -> None:
    """Check the TPM still answers, then run the training; a failure says where the run's
    outputs and logs are kept (``local_outputs``, or fetched from a machine that keeps
    them)."""
    try:
        check_tpm(platform, machine)
    except MachineFailed as exc:
        kept = f"nothing was trained; logs kept in {machine.state_dir}"
        raise MachineFailed(f"{exc}; {kept}") from exc
    try:
        run_training(machine, run_id, project, platform)
    except TrainingFailed:
        if local_outputs is None:
            local_outputs = _collect_kept_outputs(machine, run_id)
        get_run_logger().error("no certificate; outputs and training log kept in %s", local_outputs)
        raise
    except Exception as exc:
        _raise_machine_failure(platform, machine, local_outputs, exc)
        raise


def _measure_and_quote(
    platform: Provider, machine: Machine, run_id: str, project: str, local_outputs: Path | None
) -> tuple[Evidence, Path]:
    """Measure the outputs into PCR 15 and take the quote; returns the evidence and the
    folder on this host that holds the run's outputs and logs (``local_outputs``, or
    fetched from a machine that keeps them)."""
    try:
        measure_outputs(machine, run_id, project)
        evidence = collect_quote(machine, run_id)
    except Exception as exc:
        _raise_machine_failure(platform, machine, local_outputs, exc)
        raise
    if local_outputs is None:
        local_outputs = _collect_kept_outputs(machine, run_id)
    return evidence, local_outputs


def _certify(
    platform: Provider,
    machine: Machine,
    enrolled: EnrolledKey,
    evidence: Evidence,
    project: str,
    local_outputs: Path,
    output_bom: str | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Assemble the certificate, verify it, publish it. Returns the verification report and
    where the certificate was published (path, SHA-256, storage URL)."""
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
        certificate_path, report, project, output_bom, model_path, platform.boot_reference()
    )
    return report, published


def _finish(
    platform: Provider,
    record: ActiveRun,
    early_teardown: PrefectFuture[None] | None,
    succeeded: bool,
) -> None:
    """The machine torn down (waiting for the early teardown, or now), the record updated;
    discarded once the run succeeded. If teardown raises, the record stays and the failure
    hook tears down again."""
    if record.machine is not None:
        if early_teardown is not None:
            early_teardown.result()
        else:
            teardown_machine(platform, record.machine)
        record.torn_down = True
        with contextlib.suppress(OSError):
            save_record(record)
    if succeeded:
        discard_record(record.flow_run_id)


@flow(
    name="certify-training",
    on_failure=[_on_failure],
    on_crashed=[_on_crashed],
    on_cancellation=[_on_cancellation],
    log_prints=True,
)
def certify_training(
    config_path: str | None = None,
    provider: str = "local",
    output_bom: str | None = None,
    outputs_dir: str | None = None,
    config_block: str | None = None,
    platform_block: str | None = None,
    source_commit: str | None = None,
) -> dict[str, Any]:
    """Certify a training run: the flow behind ``aicert run`` and the deployments.

    The configuration comes from ``config_path`` (default ``aicert.yaml``) or from a saved
    ``AicertRunConfig`` block named ``config_block``; the platform from ``provider`` or, when
    given, from a saved platform block (``platform_block``: a ``LocalPlatform`` name or
    ``<block-type-slug>/<name>``), which then takes precedence. ``source_commit`` pins the
    source to that commit instead of the configured tag/branch/commit (an event trigger passes
    the pushed commit).

    Returns the run id, the certificate's path and SHA-256, and the verification report.
    """
    logger = get_run_logger()
    if config_path is None and config_block is None:
        config_path = DEFAULT_CONFIG_PATH
    config = load_run_config(config_path, config_block)
    if source_commit:
        config = pin_source_commit(config, source_commit)
    platform = resolve_platform(provider, platform_block)
    project = config.project_name()
    run_id = new_run_id(project)
    logger.info("certifying %s as run %s on the %s platform", project, run_id, platform.kind)

    _cleanup_before_run()
    record = _start_record(platform, run_id, project)
    early_teardown: PrefectFuture[None] | None = None
    succeeded = False
    try:
        machine, enrolled = _bring_up_machine(platform, record, config)
        start_run(machine, run_id, new_nonce(), config)
        measure_inputs(machine, run_id, project)
        build_image(machine, run_id, project)
        # Where this host keeps the run's files (None: the machine keeps them).
        kept_here = platform.outputs_path(machine)
        _train(platform, machine, run_id, project, kept_here)
        evidence, local_outputs = _measure_and_quote(platform, machine, run_id, project, kept_here)
        # The machine has done its part: tear it down while the certificate is assembled.
        early_teardown = teardown_machine.submit(platform, machine)
        report, published = _certify(
            platform, machine, enrolled, evidence, project, local_outputs, output_bom
        )
        if outputs_dir:
            destination = Path(outputs_dir).resolve()
            shutil.copytree(local_outputs / "outputs", destination, dirs_exist_ok=True)
            logger.info("outputs copied to %s", destination)
        logger.info("certificate %s verified: %s", published["path"], json.dumps(report["checks"]))
        succeeded = True
        return {
            "run_id": run_id,
            "project": project,
            "certificate": published,
            "workspace": str(local_outputs),
            "report": report,
        }
    finally:
        _finish(platform, record, early_teardown, succeeded)
