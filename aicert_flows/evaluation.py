"""The ``certify-evaluation`` flow: a new training run's model, evaluated as a certified run.

Triggered by ``aicert.certificate.created`` for a training run (the event's ``aicert.run.kind``
label, see ``aicert.flows.deploy``), it certifies an evaluation run of the configured
benchmark whose model is that training run's certified output:

1. the training certificate is staged from the event's path (else its storage URL), refused
   unless its SHA-256 is the one the event announced and its run id the event's;
2. the evaluation configuration (``config_path`` or ``config_block``, set on the deployment)
   names its model slot: a ``file`` resource with ``certifiedBy.output`` (the training run's
   output path, ``model.json``) and a ``destinationPath``. The flow points that resource at
   the staged certificate and at the run's output file on this host; ``verify-certified-
   inputs`` then verifies the training certificate with the evaluation's trust policy and pins
   the file to the certified digest, as for any certified input (``aicert.tasks.certified_inputs``);
3. the evaluation is certified by ``certify_run``, the body of ``certify-training``, with the
   kind ``evaluation`` (so its own ``aicert.certificate.created`` never triggers another
   evaluation), then ``aicert.evaluation.certified`` is emitted: the evaluation run's
   resource, the evaluated training run as a related resource (role ``evaluated-run``), both
   certificates' digests and locations and the certified metrics.

A failure emits ``aicert.certificate.failed`` labelled ``evaluation`` (the certifying flows'
hooks, ``aicert.flows.certify_hooks``).
"""

# No ``from __future__ import annotations``: a deployment's flow run validates the parameters
# against the signature's annotations (see aicert.flows.flows).
import hashlib
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run as current_flow_run
from pydantic import BaseModel

import aicert
from aicert.flows.blocks import AicertRunConfig, LocalPlatform, QemuPlatform
from aicert.flows.certify_hooks import CERTIFYING_FLOW_HOOKS, EVALUATION_FLOW
from aicert.flows.events import (
    EVALUATED_RUN_ROLE,
    EVALUATION_CERTIFIED,
    emit_run_event,
)
from aicert.flows.flows import (
    CertificationResult,
    certify_run,
    initial_run_name,
    resolve_platform,
)
from aicert.flows.promote import RunMismatchError, local_outputs_path, stage_certificate
from aicert.guest_runtime.config import CertifiedBy, ConfigError, RunConfig, parse_config
from aicert.model import PlatformKind
from aicert.tasks import load_run_config
from aicert.tasks.platforms.settings import aicert_home

__all__ = ["EVALUATION_CERTIFIED", "EvaluatedRun", "certify_evaluation", "point_model_at"]


class EvaluatedRun(BaseModel):
    """The training run an evaluation evaluated, as its certificate event announced it.

    Attributes:
        run_id: The training run's id.
        project: Its project.
        certificate_sha256: The SHA-256 of its certificate file's bytes.
        certificate_path: The certificate the event named (else None).
        storage_url: Its copy in result storage (else None).
        model_output: The training run's output the evaluation took as its model.
        model_path: That output's file on this host.
    """

    run_id: str
    project: str | None
    certificate_sha256: str
    certificate_path: str | None
    storage_url: str | None
    model_output: str
    model_path: str


def _model_slot(config: RunConfig, model_resource: str | None) -> int:
    """The index of the resource that takes the model: the one named ``model_resource``
    (its destinationPath), else the configuration's only ``certifiedBy`` resource."""
    slots = [i for i, r in enumerate(config.resources) if r.certified_by is not None]
    named = [config.resources[i].destination_path for i in slots]
    if model_resource is not None:
        if model_resource not in named:
            raise ConfigError(
                [
                    f"model_resource {model_resource!r}: no resource with certifiedBy has that "
                    f"destinationPath (those with certifiedBy: {', '.join(named) or 'none'})"
                ],
                "certify-evaluation",
            )
        return slots[named.index(model_resource)]
    if len(slots) != 1:
        raise ConfigError(
            [
                f"resources: an evaluation's model is its resource with certifiedBy "
                f"(output: the training run's model file); this configuration has "
                f"{len(slots)} ({', '.join(named) or 'none'}): "
                + ("add one" if not slots else "name the model's with model_resource")
            ],
            "certify-evaluation",
        )
    return slots[0]


def point_model_at(
    config: RunConfig,
    certificate: Path,
    outputs_dir: Path,
    model_resource: str | None = None,
) -> tuple[RunConfig, str, Path]:
    """The evaluation configuration with its model slot pointed at a training run's model.

    The slot keeps its ``destinationPath`` and ``certifiedBy.output``; its ``url`` becomes the
    output's file under ``outputs_dir``, its ``certifiedBy.certificate`` ``certificate``, and
    any pinned ``sha256`` or resolved link is dropped (``verify-certified-inputs`` pins the
    certified digest).

    Args:
        config: The evaluation's validated configuration.
        certificate: The training run's certificate file (staged, digest checked).
        outputs_dir: The training run's outputs folder on this host.
        model_resource: The slot's destinationPath, when the configuration has several
            certifiedBy resources.

    Returns:
        The configuration, validated again; the model's output path; its file.

    Raises:
        ConfigError: no or several slots, or the output's file is not in ``outputs_dir``.
    """
    index = _model_slot(config, model_resource)
    slot = config.resources[index]
    assert slot.certified_by is not None
    output = slot.certified_by.output
    model_file = outputs_dir / output
    if not model_file.is_file():
        raise ConfigError(
            [
                f"resources[{slot.destination_path}]: the training run's output {output} is "
                f"not on this host ({model_file} is not a file)"
            ],
            "certify-evaluation",
        )
    pointed = slot.model_copy(
        update={
            "url": model_file.resolve().as_uri(),
            "sha256": None,
            "certified_by": CertifiedBy(certificate=str(certificate), output=output),
        }
    )
    resources = [*config.resources[:index], pointed, *config.resources[index + 1 :]]
    data = config.model_copy(update={"resources": resources}).model_dump(by_alias=True)
    return parse_config(data, source="certify-evaluation model resource"), output, model_file


def _stage_training_certificate(
    run_id: str,
    certificate_path: str | None,
    storage_url: str | None,
    certificate_sha256: str | None,
) -> Path:
    """The training certificate, copied into this flow run's folder under
    ``$AICERT_HOME/evaluations`` (its SHA-256 the announced one, its run id the event's)."""
    folder = aicert_home() / "evaluations" / str(current_flow_run.id)
    folder.mkdir(parents=True, exist_ok=True)
    staged = Path(stage_certificate(str(folder), certificate_path, storage_url, certificate_sha256))
    certified_run = aicert.load(staged).run.id
    if certified_run != run_id:
        raise RunMismatchError(
            f"the certificate is of run {certified_run}, the event announced run {run_id}"
        )
    return staged


def _announce(result: CertificationResult, evaluated: EvaluatedRun) -> None:
    """Emit ``aicert.evaluation.certified`` about the evaluation run."""
    emit_run_event(
        EVALUATION_CERTIFIED,
        run_id=result.run_id,
        project=result.project,
        flow_run_id=str(current_flow_run.id),
        flow_run_name=str(current_flow_run.name),
        payload={
            "run_id": result.run_id,
            "project": result.project,
            "certificate_sha256": result.certificate.sha256,
            "certificate_path": result.certificate.path,
            "storage_url": result.certificate.storage_url,
            "metrics": dict(result.report.metrics),
            "evaluated": evaluated.model_dump(),
            "flow_run_id": str(current_flow_run.id),
        },
        kind="evaluation",
        related_runs=[
            (EVALUATED_RUN_ROLE, evaluated.run_id, evaluated.project or evaluated.run_id)
        ],
    )


@flow(
    name=EVALUATION_FLOW,
    flow_run_name=initial_run_name,
    log_prints=True,
    **CERTIFYING_FLOW_HOOKS,  # type: ignore[arg-type]
)
def certify_evaluation(
    run_id: str,
    certificate_sha256: str,
    certificate_path: str | None = None,
    storage_url: str | None = None,
    project: str | None = None,
    outputs_path: str | None = None,
    certifying_flow_run_id: str | None = None,
    config_path: str | None = None,
    config_block: AicertRunConfig | str | None = None,
    model_resource: str | None = None,
    provider: PlatformKind = "local",
    platform_block: LocalPlatform | QemuPlatform | str | None = None,
    output_bom: str | None = None,
) -> dict[str, object]:
    """Certify an evaluation of a training run's model on the configured benchmark.

    Args:
        run_id: The training run (from its aicert.certificate.created event).
        certificate_sha256: The SHA-256 of the training certificate's bytes (the event's).
        certificate_path: The training certificate's file (the event's).
        storage_url: Its copy in result storage, read when the path cannot be.
        project: The training run's project (the event's).
        outputs_path: The training run's outputs on this host (the event's; default: the
            local platform's workspace of the run).
        certifying_flow_run_id: The flow run that certified the training run.
        config_path: The evaluation's run configuration file (its benchmark code and data,
            its results file, and the model slot: a resource with certifiedBy).
        config_block: An AicertRunConfig block (or a saved one's name) instead of
            config_path.
        model_resource: The model slot's destinationPath, when the configuration has more
            than one resource with certifiedBy.
        provider: The platform to certify on when no platform_block is given.
        platform_block: A LocalPlatform or QemuPlatform block, or a saved platform block's
            name; takes precedence over provider.
        output_bom: Where to write the evaluation's certificate besides the result storage.

    Returns:
        The evaluation's ``CertificationResult`` (as a dict) with ``evaluated`` (the
        training run, its certificate and model) and the certified ``metrics``.
    """
    logger = get_run_logger()
    if (config_path is None) == (config_block is None):
        raise ConfigError(
            ["give the evaluation's configuration: exactly one of config_path and config_block"],
            "certify-evaluation parameters",
        )
    config = load_run_config(config_path, config_block)
    staged = _stage_training_certificate(run_id, certificate_path, storage_url, certificate_sha256)
    outputs_dir = Path(outputs_path) if outputs_path else local_outputs_path(run_id)
    config, output, model_file = point_model_at(config, staged, outputs_dir, model_resource)
    logger.info("evaluating %s of run %s (certificate %s)", output, run_id, staged)
    platform = resolve_platform(provider, platform_block)
    result = certify_run(config, platform, kind="evaluation", output_bom=output_bom)
    evaluated = EvaluatedRun(
        run_id=run_id,
        project=project,
        certificate_sha256=hashlib.sha256(staged.read_bytes()).hexdigest(),
        certificate_path=certificate_path,
        storage_url=storage_url,
        model_output=output,
        model_path=str(model_file),
    )
    _announce(result, evaluated)
    logger.info("run %s evaluated by run %s: %s", run_id, result.run_id, result.report.metrics)
    return {
        **result.model_dump(),
        "evaluated": evaluated.model_dump(),
        "metrics": dict(result.report.metrics),
        "certifying_flow_run_id": certifying_flow_run_id,
    }
