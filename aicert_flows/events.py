"""The ``aicert.*`` events AICert emits, on one resource-id scheme.

Every event AICert emits is about one certification run, so its resource is that run:
``aicert.run.<run id>``. A run that fails before it has a run id (an invalid configuration, a
block that cannot be loaded) has no such id yet; its events use
``aicert.run.unassigned-<flow run id>`` instead, so that an automation matching
``aicert.run.*`` sees every event, early failures included (a real run id always starts with
the project's name and a ``YYYYMMDDTHHMMSSZ`` stamp, so the two cannot collide). The project
and the Prefect flow run that emitted the event are related resources (roles ``project`` and
``flow-run``), for automations that filter on them. ``aicert.source.updated`` is emitted by
users, not by AICert: its resource is the source, ``aicert.source.<name>``.

The certificate events (``aicert.certificate.created``, ``aicert.certificate.failed``) say
which kind of run it was in the resource label ``aicert.run.kind`` (and the payload's
``kind``): ``evaluation`` for a run certified by the ``certify-evaluation`` flow, ``training``
for one certified by ``certify-training``. The flow that certified the run decides, not the
configuration: a fine-tune that certifies its own metrics is still a training run. An
automation matches the label (``certify-evaluation``'s trigger matches ``training`` only, so an
evaluation's own certificate never triggers another evaluation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from prefect.events import emit_event
from prefect.events.schemas.events import Event
from pydantic import JsonValue

CERTIFICATE_CREATED = "aicert.certificate.created"
CERTIFICATE_FAILED = "aicert.certificate.failed"
EVALUATION_CERTIFIED = "aicert.evaluation.certified"
MODEL_PROMOTED = "aicert.model.promoted"
MODEL_REJECTED = "aicert.model.rejected"
SOURCE_UPDATED = "aicert.source.updated"

RUN_RESOURCE_PREFIX = "aicert.run."
UNASSIGNED_RUN = "unassigned-"

RunKind = Literal["training", "evaluation"]
"""Which kind of run a certificate event is about (see the module docstring)."""
RUN_KIND_LABEL = "aicert.run.kind"
# The role of the training run an evaluation evaluated, among aicert.evaluation.certified's
# related resources.
EVALUATED_RUN_ROLE = "evaluated-run"


def run_resource_id(run_id: str | None, flow_run_id: str | None) -> str:
    """The resource id of a run's events.

    Args:
        run_id: The AICert run id, or ``None`` when the run failed before it got one.
        flow_run_id: The Prefect flow run that emits the event (names an unassigned run).

    Returns:
        ``aicert.run.<run id>``, else ``aicert.run.unassigned-<flow run id>``.
    """
    if run_id:
        return f"{RUN_RESOURCE_PREFIX}{run_id}"
    return f"{RUN_RESOURCE_PREFIX}{UNASSIGNED_RUN}{flow_run_id or 'none'}"


def emit_run_event(
    event: str,
    *,
    run_id: str | None,
    project: str | None,
    flow_run_id: str | None,
    flow_run_name: str | None,
    payload: Mapping[str, JsonValue],
    kind: RunKind | None = None,
    related_runs: Sequence[tuple[str, str, str]] = (),
) -> Event | None:
    """Emit ``event`` about one run, on the resource-id scheme of this module.

    Args:
        event: The event's name (one of the ``aicert.*`` names above).
        run_id: The run's id (``None``: not assigned yet).
        project: The run's project, when known: the resource's name and a related resource.
        flow_run_id: The Prefect flow run emitting it, a related resource.
        flow_run_name: That flow run's name, shown by the UI.
        payload: The event's payload (documented per event in docs/prefect.md).
        kind: The kind of run, the resource's ``aicert.run.kind`` label (certificate
            events); ``None``: no label.
        related_runs: Other runs the event is about, each ``(role, run id, project)``: a
            related resource ``aicert.run.<run id>`` in that role.

    Returns:
        The emitted event (``None`` where Prefect's events are switched off).
    """
    related: list[dict[str, str]] = [
        {
            "prefect.resource.id": run_resource_id(other, None),
            "prefect.resource.role": role,
            "prefect.resource.name": other_project,
        }
        for role, other, other_project in related_runs
    ]
    if flow_run_id:
        related.append(
            {
                "prefect.resource.id": f"prefect.flow-run.{flow_run_id}",
                "prefect.resource.role": "flow-run",
                "prefect.resource.name": flow_run_name or flow_run_id,
            }
        )
    if project:
        related.append(
            {
                "prefect.resource.id": f"aicert.project.{project}",
                "prefect.resource.role": "project",
                "prefect.resource.name": project,
            }
        )
    resource = {
        "prefect.resource.id": run_resource_id(run_id, flow_run_id),
        "prefect.resource.name": project or run_resource_id(run_id, flow_run_id),
    }
    if kind is not None:
        resource[RUN_KIND_LABEL] = kind
    return emit_event(
        event=event,
        resource=resource,
        related=related,
        payload=dict(payload),
    )
