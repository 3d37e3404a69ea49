"""The ``certify-training`` flow: provision, measure, train, measure, quote, certify, teardown.

Teardown runs in ``finally`` and again from the failure, crash and cancellation hooks
(idempotent); ``transaction()`` + ``on_rollback`` is not used because, with a retried task
inside, Prefect 3.9 rolls back on the first failed attempt even when the retry succeeds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from prefect.runtime import flow_run as current_flow_run

from aicert.flows.assemble import (
    assemble_certificate,
    certificate_digest,
    new_nonce,
    new_run_id,
    summary_markdown,
    summary_table,
)
from aicert.flows.providers import get_provider
from aicert.flows.providers.base import EnrolledKey, Machine, Provider
from aicert.flows.settings import aicert_home
from aicert.guest_runtime.api_models import Evidence
from aicert.model import write_atomic
from aicert.tasks import (
    build_image,
    collect_quote,
    establish_attestation_key,
    load_run_config,
    measure_inputs,
    measure_outputs,
    provision_machine,
    run_training,
    teardown_machine,
    verify_certificate,
    wait_for_agent,
)

# Machines of the flow runs in this process, for the crash/cancellation hooks.
_ACTIVE: dict[str, tuple[Provider, Machine]] = {}


def _active_record(run_id: str) -> Path:
    return aicert_home() / "active" / f"{run_id}.json"


def _register(flow_run_id: str, provider: Provider, machine: Machine) -> None:
    _ACTIVE[flow_run_id] = (provider, machine)
    record = _active_record(machine.run_id)
    write_atomic(record, machine.model_dump_json().encode())


def _teardown_registered(flow_run_id: str) -> None:
    entry = _ACTIVE.pop(flow_run_id, None)
    if entry is None:
        return
    provider, machine = entry
    provider.teardown(machine)
    _active_record(machine.run_id).unlink(missing_ok=True)


def _on_failure(flow: Any, flow_run: Any, state: Any) -> None:
    _teardown_registered(str(flow_run.id))
    emit_event(
        event="aicert.certificate.failed",
        resource={
            "prefect.resource.id": f"aicert.run.{flow_run.parameters.get('run_id') or flow_run.id}",
            "prefect.resource.name": str(flow_run.name),
        },
        payload={"state": str(state.type.value), "message": str(state.message or "")[:2000]},
    )


def _on_crash_or_cancel(flow: Any, flow_run: Any, state: Any) -> None:
    _teardown_registered(str(flow_run.id))


def artifact_key(project: str, kind: str) -> str:
    """Stable artifact keys (Prefect requires ``^[a-z0-9-]*$``)."""
    return f"aicert-{project}-{kind}"[:100]


@task(name="assemble-certificate", cache_policy=NO_CACHE)
def assemble_and_write(
    evidence: Evidence,
    enrolled: EnrolledKey,
    project: str,
    provider_kind: str,
    reference_values: str | None,
    run_dir: str,
) -> str:
    certificate = assemble_certificate(
        evidence=evidence,
        enrolled=enrolled,
        project=project,
        provider=provider_kind,  # type: ignore[arg-type]
        reference_values=reference_values,
    )
    path = Path(run_dir) / "certificate.json"
    certificate.write(path)
    if enrolled.trusted_root_pem:
        write_atomic(Path(run_dir) / "platform-ca.pem", enrolled.trusted_root_pem.encode())
    return str(path)


@task(name="store-certificate", cache_policy=NO_CACHE)
def store_certificate(
    certificate_path: str,
    report: dict[str, Any],
    project: str,
    output_bom: str | None,
) -> dict[str, Any]:
    """Publish: the file at ``output_bom`` (atomically), result storage, artifacts, event."""
    from prefect.results import get_default_result_storage

    import aicert

    logger = get_run_logger()
    data = Path(certificate_path).read_bytes()
    digest = certificate_digest(data)
    published = certificate_path
    if output_bom:
        published = str(write_atomic(Path(output_bom).resolve(), data))
        logger.info("certificate written to %s", published)

    storage = get_default_result_storage()
    storage_key = f"aicert/{report['run_id']}/certificate.json"
    stored_at = storage.write_path(storage_key, data)
    storage_url = str(stored_at)
    if "://" not in storage_url:
        storage_url = Path(storage_url).resolve().as_uri()

    certificate = aicert.load(certificate_path)
    verification = certificate.verify(
        trusted_roots=[Path(certificate_path).with_name("platform-ca.pem")]
        if Path(certificate_path).with_name("platform-ca.pem").exists()
        else [],
        allow_dev_platform=certificate.platform.kind == "local",
    )
    create_markdown_artifact(
        key=artifact_key(project, "certificate"),
        markdown=summary_markdown(certificate, verification, published),
        description=f"AICert certificate of run {report['run_id']}",
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
    emit_event(
        event="aicert.certificate.created",
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
        },
    )
    return {"path": published, "sha256": digest, "storage_url": storage_url}


@flow(
    name="certify-training",
    on_failure=[_on_failure],
    on_crashed=[_on_crash_or_cancel],
    on_cancellation=[_on_crash_or_cancel],
    log_prints=True,
)
def certify_training(
    config_path: str = "aicert.yaml",
    provider: str = "local",
    output_bom: str | None = None,
    outputs_dir: str | None = None,
) -> dict[str, Any]:
    """Certify a training run: the flow behind ``aicert run`` and the deployments.

    Returns the run id, the certificate's path and SHA-256, and the verification report.
    """
    logger = get_run_logger()
    config = load_run_config(config_path)
    project = config.project_name()
    run_id = new_run_id(project)
    nonce = new_nonce()
    platform = get_provider(provider)
    logger.info("certifying %s as run %s on the %s platform", project, run_id, platform.kind)

    machine: Machine | None = None
    flow_run_id = str(current_flow_run.id or run_id)
    try:
        machine = provision_machine(platform, run_id)
        _register(flow_run_id, platform, machine)
        wait_for_agent(machine)
        enrolled = establish_attestation_key(platform, machine, run_id, nonce, config)
        measure_inputs(machine, run_id, project)
        build_image(machine, run_id, project)
        run_training(machine, run_id, project)
        measure_outputs(machine, run_id, project)
        evidence = collect_quote(machine, run_id)
        certificate_path = assemble_and_write(
            evidence,
            enrolled,
            project,
            platform.kind,
            platform.reference_values(),
            machine.state_dir,
        )
        trusted = [enrolled.trusted_root_pem] if enrolled.trusted_root_pem else []
        report = verify_certificate(
            certificate_path,
            trusted_roots=trusted,
            allow_dev_platform=platform.kind == "local",
        )
        published = store_certificate(certificate_path, report, project, output_bom)
        local_outputs = platform.outputs_path(machine)
        if outputs_dir and local_outputs is not None:
            destination = Path(outputs_dir).resolve()
            shutil.copytree(local_outputs / "outputs", destination, dirs_exist_ok=True)
            logger.info("outputs copied to %s", destination)
        result = {
            "run_id": run_id,
            "project": project,
            "certificate": published,
            "workspace": str(local_outputs) if local_outputs else None,
            "report": report,
        }
        logger.info("certificate %s verified: %s", published["path"], json.dumps(report["checks"]))
        return result
    finally:
        if machine is not None:
            teardown_machine(platform, machine)
            _ACTIVE.pop(flow_run_id, None)
            _active_record(machine.run_id).unlink(missing_ok=True)
