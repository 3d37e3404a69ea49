"""The AICert deployments, in Python: ``python -m aicert.flows.deploy serve|apply|drain``.

- ``certify-training``: an example nightly cron schedule (created *inactive*: turn it on in
  the UI or with ``prefect deployment schedule resume``), and an event trigger on
  ``aicert.source.updated`` whose payload names the configuration (``config_path`` or
  ``config_block``) and, optionally, the pushed ``commit`` to pin the source to;
- ``verify-and-promote``: triggered by ``aicert.certificate.created``, its parameters taken
  from the event's payload;
- ``certify-evaluation``: triggered by ``aicert.certificate.created`` of a *training* run
  (the event's ``aicert.run.kind`` label), it certifies an evaluation of the new model with
  the deployment's evaluation configuration (``config_path`` or ``config_block``). Its
  automation is created *disabled* unless that configuration is given (``apply
  --evaluation-config``): set the parameter, then enable the automation.

Each deployment has a concurrency limit of its own (``CERTIFY_CONCURRENCY``,
``PROMOTE_CONCURRENCY``: runs beyond it wait as AwaitingConcurrencySlots); machine capacity
across deployments is the global limits of ``aicert.flows.capacity`` (``apply --machines N``
creates them).

``apply`` registers both on a process work pool (created when missing) for a worker to run;
``serve`` runs them in this process instead (no work pool, no worker); ``drain`` cancels the
pool's flow runs in flight and waits for them to end (``stack.sh down`` runs it first).
``deployments/prefect.yaml`` declares the same three deployments for ``prefect deploy --all``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.events import DeploymentEventTrigger
from prefect.schedules import Cron

from aicert.flows.capacity import MACHINES_LIMIT, all_machine_limit_names
from aicert.flows.evaluation import certify_evaluation
from aicert.flows.events import CERTIFICATE_CREATED, RUN_KIND_LABEL, SOURCE_UPDATED
from aicert.flows.flows import certify_training
from aicert.flows.promote import verify_and_promote

DEFAULT_WORK_POOL = "aicert"
CERTIFY_DEPLOYMENT = "certify-training"
PROMOTE_DEPLOYMENT = "verify-and-promote"
EVALUATE_DEPLOYMENT = "certify-evaluation"
# At most this many runs of each deployment at once (the worker's --limit is per worker).
CERTIFY_CONCURRENCY = 4
PROMOTE_CONCURRENCY = 4
EVALUATE_CONCURRENCY = 4
EXAMPLE_CRON = "0 3 * * *"
# Relative to the worker's working folder (the repository root, see ``working_dir``).
EXAMPLE_CONFIG = "examples/aicert.yaml"
REPO_ROOT = Path(__file__).resolve().parents[1]


def _from_payload(field: str) -> str:
    # A single-expression template keeps the value's JSON type; ``default(none)`` makes an
    # absent field a null parameter instead of a failed rendering.
    return "{{ event.payload." + field + " | default(none) }}"


def source_updated_trigger() -> DeploymentEventTrigger:
    """Run ``certify-training`` when code or data change (``aicert.source.updated``)."""
    return DeploymentEventTrigger(
        name="certify-training on aicert.source.updated",
        description=(
            "Fires on each aicert.source.updated event whose resource is aicert.source.* "
            "(a push hook, a data pipeline); runs certify-training with the event's "
            "config_path or config_block, pinned to its commit."
        ),
        expect={SOURCE_UPDATED},
        match={"prefect.resource.id": "aicert.source.*"},
        parameters={
            "config_path": _from_payload("config_path"),
            "config_block": _from_payload("config_block"),
            "source_commit": _from_payload("commit"),
        },
    )


PROMOTE_PARAMETERS_FROM_EVENT = (
    "certificate_path",
    "storage_url",
    "certificate_sha256",
    "run_id",
    "project",
    "outputs_path",
)
# Parameter of verify-and-promote <- field of the aicert.certificate.created payload.
PROMOTE_PARAMETER_SOURCES = {
    **{name: name for name in PROMOTE_PARAMETERS_FROM_EVENT},
    "certifying_flow_run_id": "flow_run_id",
}


def certificate_created_trigger() -> DeploymentEventTrigger:
    """Run ``verify-and-promote`` for every new training certificate (``aicert.certificate.created``
    labelled ``aicert.run.kind: training``; an evaluation's outputs are metrics, not a model)."""
    return DeploymentEventTrigger(
        name="verify-and-promote on aicert.certificate.created",
        description=(
            "Fires on each aicert.certificate.created event of a training run (resource "
            "aicert.run.*, label aicert.run.kind: training, emitted by certify-training); "
            "runs verify-and-promote on the announced certificate and model, linked to the "
            "certifying flow run. An evaluation's outputs are not a model to promote."
        ),
        expect={CERTIFICATE_CREATED},
        match={"prefect.resource.id": "aicert.run.*", RUN_KIND_LABEL: "training"},
        parameters={
            name: _from_payload(field) for name, field in PROMOTE_PARAMETER_SOURCES.items()
        },
    )


def training_certificate_trigger(*, enabled: bool) -> DeploymentEventTrigger:
    """Run ``certify-evaluation`` for every new *training* certificate: the
    ``aicert.certificate.created`` events labelled ``aicert.run.kind: training`` (an
    evaluation's own certificate is labelled ``evaluation`` and never matches)."""
    return DeploymentEventTrigger(
        name="certify-evaluation on aicert.certificate.created of a training run",
        description=(
            "Fires on each aicert.certificate.created event of a training run (resource "
            "aicert.run.*, label aicert.run.kind: training); runs certify-evaluation on the "
            "announced model with the deployment's evaluation config_path or config_block. "
            "Created disabled when the deployment has no evaluation configuration."
        ),
        expect={CERTIFICATE_CREATED},
        match={"prefect.resource.id": "aicert.run.*", RUN_KIND_LABEL: "training"},
        parameters={
            name: _from_payload(field) for name, field in PROMOTE_PARAMETER_SOURCES.items()
        },
        enabled=enabled,
    )


def _evaluation_deployment(
    work_pool: str | None,
    job_variables: dict[str, str] | None,
    evaluation_config: str | None,
) -> RunnerDeployment:
    """``certify-evaluation``: its trigger enabled only with an evaluation configuration."""
    return certify_evaluation.to_deployment(
        name=EVALUATE_DEPLOYMENT,
        description="Certify an evaluation of each new training run's model on the benchmark.",
        tags=["aicert"],
        parameters={"config_path": evaluation_config} if evaluation_config else {},
        triggers=[training_certificate_trigger(enabled=evaluation_config is not None)],
        concurrency_limit=EVALUATE_CONCURRENCY,
        entrypoint_type=EntrypointType.MODULE_PATH,
        work_pool_name=work_pool,
        job_variables=job_variables,
    )


def build_deployments(
    work_pool: str | None,
    *,
    allow_dev_platform: bool = True,
    working_dir: Path = REPO_ROOT,
    evaluation_config: str | None = None,
) -> list[RunnerDeployment]:
    """The three deployments, on ``work_pool`` (None: for ``serve``).

    Args:
        work_pool: The process work pool, or None for ``serve``.
        allow_dev_platform: (on for the local stack) verify-and-promote accepts ``local``
            certificates, which attest no boot chain.
        working_dir: Where the worker starts each flow run (relative paths resolve there).
        evaluation_config: certify-evaluation's ``config_path``; without it the deployment
            has none and its trigger is created disabled.
    """
    # A worker starts each flow run in working_dir, so relative paths (the example config)
    # resolve against the repository; the flows are imported from the installed package.
    job_variables = {"working_dir": str(working_dir)} if work_pool else None
    certify = certify_training.to_deployment(
        name=CERTIFY_DEPLOYMENT,
        description="Certify a training run (example: the bundled flowers project).",
        tags=["aicert"],
        parameters={"config_path": EXAMPLE_CONFIG},
        schedules=[Cron(EXAMPLE_CRON, timezone="UTC", active=False)],
        triggers=[source_updated_trigger()],
        concurrency_limit=CERTIFY_CONCURRENCY,
        entrypoint_type=EntrypointType.MODULE_PATH,
        work_pool_name=work_pool,
        job_variables=job_variables,
    )
    promote = verify_and_promote.to_deployment(
        name=PROMOTE_DEPLOYMENT,
        description="Verify a new certificate and its model files, then publish the model.",
        tags=["aicert"],
        parameters={"allow_dev_platform": allow_dev_platform},
        triggers=[certificate_created_trigger()],
        concurrency_limit=PROMOTE_CONCURRENCY,
        entrypoint_type=EntrypointType.MODULE_PATH,
        work_pool_name=work_pool,
        job_variables=job_variables,
    )
    return [certify, promote, _evaluation_deployment(work_pool, job_variables, evaluation_config)]


def ensure_process_work_pool(name: str) -> None:
    """Create the process work pool ``name`` unless it exists."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
        except ObjectAlreadyExists:
            pass


def ensure_machine_limits(machines: int) -> list[str]:
    """Create (or set) the global concurrency limits on machines: ``machines`` slots for
    all platforms together and for each platform (lower a platform's limit in the UI or
    with ``prefect gcl update``). Returns the names of the limits.

    Args:
        machines: How many machines may exist at once.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import (
        GlobalConcurrencyLimitCreate,
        GlobalConcurrencyLimitUpdate,
    )
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    names = all_machine_limit_names()
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                with_limit = GlobalConcurrencyLimitCreate(name=name, limit=machines)
                try:
                    client.create_global_concurrency_limit(with_limit)
                    continue
                except ObjectAlreadyExists:
                    pass
            client.update_global_concurrency_limit(
                name, GlobalConcurrencyLimitUpdate(limit=machines)
            )
    return names


def apply(
    work_pool: str,
    *,
    allow_dev_platform: bool = True,
    machines: int | None = None,
    evaluation_config: str | None = None,
) -> dict[str, str]:
    """Register the deployments on ``work_pool``; returns deployment name -> id.

    Args:
        work_pool: The process work pool (created when missing).
        allow_dev_platform: verify-and-promote accepts local-platform certificates.
        machines: When given, the global machine limits are set to it (see
            :func:`ensure_machine_limits`).
        evaluation_config: certify-evaluation's evaluation configuration (its trigger is
            enabled with it, created disabled without).
    """
    ensure_process_work_pool(work_pool)
    if machines is not None:
        ensure_machine_limits(machines)
    return {
        deployment.full_name: str(deployment.apply())
        for deployment in build_deployments(
            work_pool, allow_dev_platform=allow_dev_platform, evaluation_config=evaluation_config
        )
    }


def serve(*, allow_dev_platform: bool = True, evaluation_config: str | None = None) -> None:
    """Run the deployments from this process until interrupted."""
    from prefect import serve as prefect_serve

    os.chdir(REPO_ROOT)  # the runner starts flow runs here, like the worker's working_dir
    prefect_serve(
        *build_deployments(
            None, allow_dev_platform=allow_dev_platform, evaluation_config=evaluation_config
        )
    )


IN_FLIGHT = ("PENDING", "RUNNING", "CANCELLING")


def drain(work_pool: str, *, timeout_s: float = 120.0) -> list[str]:
    """Cancel the flow runs in flight on ``work_pool`` and wait (bounded) until they end.

    A worker's flow runs live in their own process sessions, so stopping the worker would
    orphan them; cancelled, they run their cancellation hooks (teardown of the machine).
    Returns the names of the runs still in flight when ``timeout_s`` ran out.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        WorkPoolFilter,
        WorkPoolFilterName,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelling

    in_flight = FlowRunFilter(
        state=FlowRunFilterState(
            type=FlowRunFilterStateType(any_=[StateType(name) for name in IN_FLIGHT])
        )
    )
    on_pool = WorkPoolFilter(name=WorkPoolFilterName(any_=[work_pool]))
    with get_client(sync_client=True) as client:
        for run in client.read_flow_runs(flow_run_filter=in_flight, work_pool_filter=on_pool):
            if run.state_type != StateType.CANCELLING:
                client.set_flow_run_state(
                    run.id, Cancelling(message="the AICert stack is going down"), force=True
                )
        deadline = time.monotonic() + timeout_s
        while True:
            left = client.read_flow_runs(flow_run_filter=in_flight, work_pool_filter=on_pool)
            if not left or time.monotonic() >= deadline:
                return [run.name for run in left]
            time.sleep(1.0)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m aicert.flows.deploy serve|apply|drain``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m aicert.flows.deploy",
        description=(
            "Create the certify-training, verify-and-promote and certify-evaluation deployments."
        ),
    )
    parser.add_argument("command", choices=["serve", "apply", "drain"])
    parser.add_argument(
        "--pool",
        default=os.environ.get("AICERT_WORK_POOL", DEFAULT_WORK_POOL),
        help="process work pool for apply (default: $AICERT_WORK_POOL or 'aicert')",
    )
    parser.add_argument(
        "--no-dev-platform",
        action="store_true",
        help="verify-and-promote refuses local-platform certificates (no boot chain)",
    )
    parser.add_argument(
        "--machines",
        type=int,
        default=None,
        help=f"apply: set the global limits {MACHINES_LIMIT}[-<platform>] to this many slots",
    )
    parser.add_argument(
        "--evaluation-config",
        default=None,
        help="certify-evaluation's evaluation configuration (relative to the repository "
        "root); its trigger is enabled with it, created disabled without",
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="drain: seconds to wait for the runs"
    )
    args = parser.parse_args(argv)
    allow_dev = not args.no_dev_platform
    if args.command == "drain":
        left = drain(args.pool, timeout_s=args.timeout)
        for name in left:
            print(f"flow run {name} is still in flight after {args.timeout:.0f} s")
        return 1 if left else 0
    if args.command == "serve":
        serve(allow_dev_platform=allow_dev, evaluation_config=args.evaluation_config)
        return 0
    applied = apply(
        args.pool,
        allow_dev_platform=allow_dev,
        machines=args.machines,
        evaluation_config=args.evaluation_config,
    )
    for name, deployment_id in applied.items():
        print(f"applied {name} ({deployment_id}) on work pool {args.pool}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
