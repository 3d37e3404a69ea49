"""The ``verify-and-promote`` flow: verification in a downstream flow, before the model is used.

Triggered by ``aicert.certificate.created`` (see ``aicert.flows.deploy``), it publishes a model
only when its certificate verifies and the model files are the certified ones:

1. stage: the certificate (from the event's path, else its storage URL; its SHA-256 must be
   the one the event announced) and a copy of the run's outputs go into a staging folder
   inside the registry;
2. verify: the verification task checks the staged certificate (chain, quote, event log,
   platform, the caller's expected inputs) and re-hashes the staged model against it, so what
   gets published is exactly what was verified (no window between checking and copying);
3. publish: the staging folder is renamed to ``<registry>/<project>/<run_id>/`` (``model/``,
   ``certificate.json``, ``verification.json``) in one atomic rename, then
   ``aicert.model.promoted`` is emitted.

With a ``policy`` the model's certificate must also meet it (``aicert.policy``); with an
``evaluation_certificate`` the model is promoted only beside a verified evaluation of it: the
evaluation's certificate must verify, link to the model's certificate (its certified input is
that certificate's output) and meet ``evaluation_policy`` (its metric thresholds). Both
certificates are published and the promotion record (event, artifact, return value) lists both.

Any failure emits ``aicert.model.rejected`` (the error's type and message) and fails the run
with that very error (a verifier error keeps its ``aicert.errors`` type); nothing reaches the
registry. The event is only a hint of where to look: the project and run id written to the
registry are the verified certificate's, never the event's.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import IO, Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run as current_flow_run

import aicert
from aicert.flows.events import MODEL_PROMOTED, MODEL_REJECTED, emit_run_event
from aicert.model import MAX_CERTIFICATE_BYTES, write_atomic
from aicert.policy import VerificationPolicy, load_policy, policy_from_object
from aicert.reference_values import load_reference_values
from aicert.tasks import verify_certificate
from aicert.tasks.platforms.settings import aicert_home
from aicert.tasks.task_factory import aicert_task
from aicert.tasks.verification import CertificateVerification

__all__ = ["MODEL_PROMOTED", "MODEL_REJECTED", "verify_and_promote"]

STAGING_FOLDER = ".staging"
MODEL_FOLDER = "model"
CERTIFICATE_FILE = "certificate.json"
REPORT_FILE = "verification.json"
EVALUATION_FILE = "evaluation.json"
EVALUATION_REPORT_FILE = "evaluation-verification.json"
MAX_EVENT_OUTPUTS = 100  # event payloads stay small; the certificate lists them all

# Names that become registry path components: no separator, no leading dot (so no "..").
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


class PromotionError(RuntimeError):
    """The model was not promoted, for a reason other than a failed verification."""


class CertificateUnavailableError(PromotionError):
    """Neither the certificate's path nor its storage URL could be read."""


class CertificateDigestError(PromotionError):
    """The certificate's bytes are not the ones the event announced (SHA-256 differs)."""


class RunMismatchError(PromotionError):
    """The event names another run or project than the verified certificate."""


class EvaluationRequiredError(PromotionError):
    """An evaluation policy was given but no evaluation certificate to meet it."""


class RegistryConflictError(PromotionError):
    """The registry already holds this run, promoted with a different certificate."""


def default_registry() -> Path:
    """``$AICERT_REGISTRY``, else ``$AICERT_HOME/registry``."""
    configured = os.environ.get("AICERT_REGISTRY")
    return Path(configured).expanduser() if configured else aicert_home() / "registry"


def default_trusted_roots() -> list[str]:
    """This host's AICert platform CA (the local platform's root), when it exists."""
    from aicert.tasks.platforms.local.provider import platform_ca_certificate_path

    root = platform_ca_certificate_path()
    return [str(root)] if root.is_file() else []


def default_reference_values() -> list[str]:
    """The reference values of the guest images built on this host (qemu platform)."""
    from aicert.tasks.platforms.qemu.image import IMAGE_MANIFEST, guest_images_dir

    return [str(path) for path in sorted(guest_images_dir().glob(f"*/{IMAGE_MANIFEST}"))]


def local_outputs_path(run_id: str) -> Path:
    """Where the ``local`` platform keeps a run's outputs (the run's workspace)."""
    return aicert_home() / "runs" / run_id / "work" / run_id / "outputs"


def promotion_artifact_key(project: str) -> str:
    """``aicert-<project>-promotion``, reduced to what Prefect accepts (``^[a-z0-9-]*$``)."""
    return re.sub(r"[^a-z0-9-]", "-", f"aicert-{project.lower()}-promotion")[:100]


def _safe_name(value: str, what: str) -> str:
    if not _SAFE_NAME.fullmatch(value):
        raise PromotionError(f"{what} {value!r} cannot name a registry folder")
    return value


def _read_capped(open_file: IO[bytes], source: str) -> bytes:
    data: bytes = open_file.read(MAX_CERTIFICATE_BYTES + 1)
    if len(data) > MAX_CERTIFICATE_BYTES:
        raise CertificateUnavailableError(
            f"{source}: larger than the {MAX_CERTIFICATE_BYTES}-byte certificate limit"
        )
    return data


def read_certificate_bytes(certificate_path: str | None, storage_url: str | None) -> bytes:
    """The certificate from its path, else from its storage URL (any fsspec URL: ``file://``,
    or ``s3://`` and the like where the filesystem's package is installed)."""
    problems: list[str] = []
    if certificate_path:
        try:
            with Path(certificate_path).open("rb") as handle:
                return _read_capped(handle, certificate_path)
        except OSError as exc:
            problems.append(f"{certificate_path}: {exc.strerror or exc}")
    if storage_url:
        import fsspec  # a Prefect dependency; reads the result storage's URL schemes

        try:
            with fsspec.open(storage_url, "rb") as handle:
                return _read_capped(handle, storage_url)
        except (OSError, ValueError, ImportError) as exc:
            problems.append(f"{storage_url}: {exc}")
    if not problems:
        raise CertificateUnavailableError("no certificate_path or storage_url was given")
    raise CertificateUnavailableError("cannot read the certificate: " + "; ".join(problems))


@aicert_task("stage-certificate")
def stage_certificate(
    staging: str,
    certificate_path: str | None,
    storage_url: str | None,
    certificate_sha256: str | None,
) -> str:
    """Copy the certificate into the staging folder; check it is the announced one."""
    data = read_certificate_bytes(certificate_path, storage_url)
    digest = hashlib.sha256(data).hexdigest()
    if certificate_sha256 and digest != certificate_sha256.lower():
        raise CertificateDigestError(
            f"the certificate's SHA-256 is {digest}, the event announced {certificate_sha256}"
        )
    staged = write_atomic(Path(staging) / CERTIFICATE_FILE, data)
    get_run_logger().info("staged certificate %s (SHA-256 %s)", staged, digest)
    return str(staged)


@aicert_task("stage-model")
def stage_model(staging: str, outputs_path: str) -> str:
    """Copy the run's outputs into the staging folder. Symlinks are copied as links, so the
    verifier sees (and refuses) any that leave the folder instead of following them."""
    source = Path(outputs_path)
    if not source.is_dir():
        raise PromotionError(f"the run's outputs folder {source} does not exist")
    destination = Path(staging) / MODEL_FOLDER
    shutil.copytree(source, destination, symlinks=True)
    get_run_logger().info("staged the outputs of %s", source)
    return str(destination)


@aicert_task("publish-model")
def publish_model(staging: str, destination: str, report: CertificateVerification) -> str:
    """Rename the verified staging folder to its registry place, atomically."""
    staged = Path(staging)
    target = Path(destination)
    write_atomic(staged / REPORT_FILE, _report_json(report))
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        # rename(2) refuses a non-empty target: a run is never overwritten, and two
        # concurrent promotions of one run cannot interleave their files.
        staged.rename(target)
    except OSError:
        if not target.exists():
            raise
        existing = hashlib.sha256((target / CERTIFICATE_FILE).read_bytes()).hexdigest()
        staged_digest = hashlib.sha256((staged / CERTIFICATE_FILE).read_bytes()).hexdigest()
        if existing != staged_digest:
            raise RegistryConflictError(
                f"{target} already holds run {report.run_id} with another certificate "
                f"(SHA-256 {existing})"
            ) from None
        get_run_logger().info("%s was already promoted with this certificate", target)
    return str(target)


def _report_json(report: CertificateVerification) -> bytes:
    return (json.dumps(report.model_dump(mode="json"), indent=2, sort_keys=True) + "\n").encode()


def _emit(event: str, run_id: str | None, project: str | None, payload: dict[str, Any]) -> None:
    """Emit ``event`` on the run's resource (``aicert.run.<run id>``, see
    ``aicert.flows.events``), this flow run related."""
    flow_run_id = str(current_flow_run.id) if current_flow_run.id else None
    emit_run_event(
        event,
        run_id=run_id,
        project=project,
        flow_run_id=flow_run_id,
        flow_run_name=str(current_flow_run.name) if flow_run_id else None,
        payload={**payload, "flow_run_id": flow_run_id},
    )


def flow_run_ui_url(flow_run_id: str) -> str | None:
    """The Prefect UI's page of a flow run (``None`` when no UI address is configured)."""
    from prefect.settings import get_current_settings

    ui_url = get_current_settings().ui_url
    return f"{str(ui_url).rstrip('/')}/runs/flow-run/{flow_run_id}" if ui_url else None


def _certifying_run_line(certifying_flow_run_id: str | None) -> str:
    if not certifying_flow_run_id:
        return "- certified by: (the event named no flow run)"
    url = flow_run_ui_url(certifying_flow_run_id)
    if url is None:
        return f"- certified by flow run `{certifying_flow_run_id}`"
    return f"- certified by flow run [{certifying_flow_run_id}]({url})"


def _stage_and_verify(
    staging: Path,
    certificate_path: str | None,
    storage_url: str | None,
    certificate_sha256: str | None,
    run_id: str | None,
    outputs_path: str | None,
    verification: dict[str, Any],
    policy: VerificationPolicy | None,
) -> tuple[str, CertificateVerification]:
    """Stage the certificate and the model, then verify the staged copies (the certificate,
    and the model re-hashed against it, and the policy); returns the staged certificate and
    the verification report."""
    staging.mkdir(parents=True)
    staged_certificate = stage_certificate(
        str(staging), certificate_path, storage_url, certificate_sha256
    )
    located_run = run_id or aicert.load(staged_certificate).run.id
    outputs = outputs_path or str(local_outputs_path(_safe_name(located_run, "run id")))
    staged_model = stage_model(str(staging), outputs)
    report = verify_certificate(
        staged_certificate, model_path=staged_model, policy=policy, **verification
    )
    return staged_certificate, report


def _verification_arguments(
    trusted_roots: list[str] | None,
    expected_inputs: dict[str, str] | None,
    allow_dev_platform: bool,
    reference_values: list[str] | None,
) -> dict[str, Any]:
    """The trust policy both certificates are verified with (the model's expected inputs
    apply to the model only: ``_verify_evaluation`` drops them)."""
    return {
        "trusted_roots": default_trusted_roots() if trusted_roots is None else trusted_roots,
        "expected_inputs": expected_inputs,
        "allow_dev_platform": allow_dev_platform,
        "reference_values": [
            load_reference_values(path)
            for path in (
                default_reference_values() if reference_values is None else reference_values
            )
        ],
    }


PolicyInput = VerificationPolicy | dict[str, Any] | str | None
"""A policy given to the flow: the object, its JSON values, or a YAML or JSON file's path."""


def read_policy(policy: PolicyInput, what: str = "policy") -> VerificationPolicy | None:
    """The policy a flow parameter gives: a ``VerificationPolicy``, its JSON values (a
    deployment's parameter), or the path of a policy file, YAML (strictly parsed: no
    aliases, no duplicate keys) or JSON, read by ``aicert.load_policy``.

    Raises:
        ValueError: the file cannot be read or is not a valid policy (an unknown key named).
    """
    if policy is None or isinstance(policy, VerificationPolicy):
        return policy
    if isinstance(policy, dict):
        return policy_from_object(policy, what)
    try:
        return load_policy(Path(policy).expanduser())
    except ValueError as exc:
        raise ValueError(f"{what} {exc}") from None


def _verify_evaluation(
    staging: Path,
    evaluation_certificate: str,
    staged_certificate: str,
    verification: dict[str, Any],
    evaluation_policy: VerificationPolicy | None,
) -> CertificateVerification:
    """Stage the evaluation's certificate and verify it with the model certificate as its
    parent: the link must hold (the verifier refuses a parent no link names, so an
    evaluation of another model fails here) and the evaluation policy must be met."""
    data = read_certificate_bytes(evaluation_certificate, None)
    staged = write_atomic(staging / EVALUATION_FILE, data)
    trust = {key: value for key, value in verification.items() if key != "expected_inputs"}
    report = verify_certificate(
        str(staged), parents=[staged_certificate], policy=evaluation_policy, **trust
    )
    if not any(link.get("verified") for link in report.lineage):
        raise PromotionError(
            f"the evaluation {evaluation_certificate} evaluates no certified model"
        )
    write_atomic(staging / EVALUATION_REPORT_FILE, _report_json(report))
    return report


def _registry_destination(
    registry_root: Path,
    report: CertificateVerification,
    run_id: str | None,
    project: str | None,
) -> Path:
    """``<registry>/<project>/<run id>`` of the verified certificate; the event's run and
    project, when it names them, must be the certificate's."""
    if run_id and report.run_id != run_id:
        raise RunMismatchError(
            f"the event names run {run_id}, the certificate is of run {report.run_id}"
        )
    if project and report.project != project:
        raise RunMismatchError(
            f"the event names project {project}, the certificate's is {report.project}"
        )
    return (
        registry_root / _safe_name(report.project, "project") / _safe_name(report.run_id, "run id")
    )


def _evaluation_record(
    evaluation: CertificateVerification | None, published: str
) -> dict[str, Any] | None:
    """The promoted model's evaluation in the promotion record: its run, the SHA-256 of
    its published certificate and its certified metrics (None: no evaluation required)."""
    if evaluation is None:
        return None
    data = (Path(published) / EVALUATION_FILE).read_bytes()
    return {
        "run_id": evaluation.run_id,
        "project": evaluation.project,
        "certificate_sha256": hashlib.sha256(data).hexdigest(),
        "metrics": dict(evaluation.metrics),
    }


def _evaluation_line(record: dict[str, Any] | None) -> str:
    if record is None:
        return ""
    metrics = ", ".join(f"{name} {value:g}" for name, value in sorted(record["metrics"].items()))
    return (
        f"- evaluated by run `{record['run_id']}` (certificate SHA-256 "
        f"`{record['certificate_sha256']}`): {metrics or 'no metrics'}\n"
    )


def _announce_promotion(
    report: CertificateVerification,
    published: str,
    certifying_flow_run_id: str | None,
    evaluation: dict[str, Any] | None,
) -> str:
    """Emit ``aicert.model.promoted`` and the promotion artifact, both listing the model's
    certificate and (when one was required) its evaluation's; returns the promoted
    certificate's SHA-256."""
    digest = hashlib.sha256((Path(published) / CERTIFICATE_FILE).read_bytes()).hexdigest()
    outputs_list = [
        {"path": o["path"], "size": o["size"], "sha256": o["digest"]["sha256"]}
        for o in report.outputs[:MAX_EVENT_OUTPUTS]
    ]
    _emit(
        MODEL_PROMOTED,
        report.run_id,
        report.project,
        {
            "run_id": report.run_id,
            "project": report.project,
            "certificate_sha256": digest,
            "registry_path": published,
            "model_path": str(Path(published) / MODEL_FOLDER),
            "platform": report.platform,
            "outputs_count": len(report.outputs),
            "outputs": outputs_list,
            "certifying_flow_run_id": certifying_flow_run_id,
            "evaluation": evaluation,
        },
    )
    create_markdown_artifact(
        key=promotion_artifact_key(report.project),
        markdown=(
            f"# Promoted `{report.run_id}`\n\n"
            f"{_certifying_run_line(certifying_flow_run_id)}\n"
            f"- registry folder: `{published}`\n"
            f"- certificate SHA-256: `{digest}`\n"
            f"- platform: {report.platform} ({report.platform_note})\n"
            f"- {len(report.outputs)} model file(s) re-hashed against the certificate\n"
            f"{_evaluation_line(evaluation)}"
        ),
        description=f"Model of run {report.run_id}, verified and promoted",
    )
    return digest


def _policies(
    policy: PolicyInput, evaluation_policy: PolicyInput, evaluation_certificate: str | None
) -> tuple[VerificationPolicy | None, VerificationPolicy | None]:
    """The model's and the evaluation's policies, read; thresholds without an evaluation
    certificate to meet them are refused rather than silently skipped."""
    model_policy = read_policy(policy)
    wanted_evaluation = read_policy(evaluation_policy, "evaluation policy")
    if wanted_evaluation is not None and evaluation_certificate is None:
        raise EvaluationRequiredError(
            "an evaluation policy was given but no evaluation_certificate to meet it"
        )
    return model_policy, wanted_evaluation


def _reject(
    exc: Exception,
    run_id: str | None,
    project: str | None,
    certificate_path: str | None,
    storage_url: str | None,
) -> None:
    """Emit ``aicert.model.rejected`` for ``exc`` and log it (the flow then re-raises)."""
    _emit(
        MODEL_REJECTED,
        run_id,
        project,
        {
            "run_id": run_id,
            "project": project,
            "certificate_path": certificate_path,
            "storage_url": storage_url,
            "error_type": type(exc).__name__,
            "error_message": str(exc)[:2000],
        },
    )
    get_run_logger().error("model of run %s rejected: %s: %s", run_id, type(exc).__name__, exc)


def _promotion_run_name() -> str:
    """``promote <project> · <run stamp>`` from the event's parameters, else ``promote``."""
    from prefect.runtime import flow_run

    parameters = flow_run.parameters
    project, run_id = parameters.get("project"), parameters.get("run_id")
    if project and run_id:
        from aicert.flows.flows import run_display_name

        return f"promote {run_display_name(str(project), str(run_id))}"
    return "promote"


@flow(name="verify-and-promote", flow_run_name=_promotion_run_name, log_prints=True)
def verify_and_promote(
    certificate_path: str | None = None,
    storage_url: str | None = None,
    certificate_sha256: str | None = None,
    run_id: str | None = None,
    project: str | None = None,
    outputs_path: str | None = None,
    registry: str | None = None,
    trusted_roots: list[str] | None = None,
    expected_inputs: dict[str, str] | None = None,
    allow_dev_platform: bool = False,
    reference_values: list[str] | None = None,
    certifying_flow_run_id: str | None = None,
    policy: PolicyInput = None,
    evaluation_certificate: str | None = None,
    evaluation_policy: PolicyInput = None,
) -> dict[str, Any]:
    """Verify a certificate and its model files, then publish them to the registry.

    The first six parameters and ``certifying_flow_run_id`` come from the
    ``aicert.certificate.created`` event's payload (see ``aicert.flows.deploy``).

    Args:
        certificate_path: The certificate file the certifying run published.
        storage_url: Its copy in the certifying run's result storage (read when the path
            cannot be).
        certificate_sha256: The SHA-256 the event announced; the file must have it.
        run_id: The certified run's id; must be the certificate's.
        project: The certified run's project; must be the certificate's.
        outputs_path: The run's outputs folder (default: the local platform's workspace of
            the run under ``$AICERT_HOME``).
        registry: The registry folder (default: ``$AICERT_REGISTRY``, else
            ``$AICERT_HOME/registry``).
        trusted_roots: PEM files of trusted platform CAs (default: this host's AICert
            platform CA; Azure's roots are pinned in the verifier).
        expected_inputs: Input name, URI or path -> the SHA-256 (a source: the git commit)
            the run must have measured.
        allow_dev_platform: Accept ``local`` certificates, which attest no boot chain.
        reference_values: Reference-value files a measured boot must match (default: those
            of the guest images built on this host).
        certifying_flow_run_id: The flow run that certified the model; the promotion
            artifact links to it.
        policy: A verification policy the model's certificate must meet (its JSON values,
            or a YAML or JSON policy file's path; see ``aicert.policy``).
        evaluation_certificate: The certificate of an evaluation of this model (a certified
            run whose certified input is the model): required to verify, link to the model's
            certificate and meet ``evaluation_policy``; published beside the model.
        evaluation_policy: The policy the evaluation must meet (its metric thresholds);
            given without ``evaluation_certificate``, the model is refused.

    Returns:
        The promoted run's id, project, registry folder and certificate digest, and the
        evaluation's record (run id, certificate digest, metrics) or None.
    """
    registry_root = Path(registry).expanduser() if registry else default_registry()
    staging = registry_root / STAGING_FOLDER / uuid.uuid4().hex
    try:
        model_policy, wanted_evaluation = _policies(
            policy, evaluation_policy, evaluation_certificate
        )
        verification = _verification_arguments(
            trusted_roots, expected_inputs, allow_dev_platform, reference_values
        )
        staged_certificate, report = _stage_and_verify(
            staging,
            certificate_path,
            storage_url,
            certificate_sha256,
            run_id,
            outputs_path,
            verification,
            model_policy,
        )
        evaluation = None
        if evaluation_certificate is not None:
            evaluation = _verify_evaluation(
                staging, evaluation_certificate, staged_certificate, verification, wanted_evaluation
            )
        destination = _registry_destination(registry_root, report, run_id, project)
        published = publish_model(str(staging), str(destination), report)
    except Exception as exc:
        _reject(exc, run_id, project, certificate_path, storage_url)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    record = _evaluation_record(evaluation, published)
    digest = _announce_promotion(report, published, certifying_flow_run_id, record)
    get_run_logger().info("promoted run %s to %s", report.run_id, published)
    return {
        "run_id": report.run_id,
        "project": report.project,
        "registry_path": published,
        "certificate_sha256": digest,
        "evaluation": record,
    }
