"""The hooks of the certifying flows: a run that failed, crashed or was cancelled is torn down
and announced (``aicert.certificate.failed``, labelled with the kind of run).

Teardown runs in the flow's ``finally`` and again from these hooks (idempotent). The hooks
find the machine through a record on disk (``$AICERT_HOME/active/<flow run id>.json``) rather
than in memory: under a runner or worker, the ``on_cancellation`` and ``on_crashed`` hooks run
in the supervising process, not in the process that provisioned the machine. The kind of run
comes from the flow (``run_kind_of``): the hooks receive the flow, not its parameters' state.
"""

from __future__ import annotations

import contextlib

from prefect import Flow
from prefect.client.schemas.objects import FlowRun, State

from aicert.flows.events import CERTIFICATE_FAILED, RunKind, emit_run_event
from aicert.flows.lifecycle import (
    ActiveRun,
    discard_record,
    load_record,
    record_path,
    save_record,
    teardown_record,
)

__all__ = ["CERTIFYING_FLOW_HOOKS", "EVALUATION_FLOW", "TRAINING_FLOW", "run_kind_of"]

TRAINING_FLOW = "certify-training"
EVALUATION_FLOW = "certify-evaluation"


def run_kind_of(flow_name: str) -> RunKind:
    """The kind of run the certifying flow ``flow_name`` certifies: ``evaluation`` for
    certify-evaluation, else ``training`` (the certificate events' ``aicert.run.kind``)."""
    return "evaluation" if flow_name == EVALUATION_FLOW else "training"


def _after_unsuccessful_run(flow_run: FlowRun, state: State, kind: RunKind) -> None:
    """Shared by the failure, crash and cancellation hooks: teardown, then the event.

    The event's resource is ``aicert.run.<run id>``, or ``aicert.run.unassigned-<flow run
    id>`` when the run failed before it got a run id (an invalid configuration); its
    ``aicert.run.kind`` label is ``kind``.
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
    _emit_failed(flow_run, state, record, teardown_error, kind)
    if teardown_error is not None:
        raise RuntimeError(
            f"teardown of run {record.run_id if record else '?'} failed: {teardown_error}; "
            f"its record stays at {record_path(flow_run_id)}"
        )
    discard_record(flow_run_id)


def _emit_failed(
    flow_run: FlowRun,
    state: State,
    record: ActiveRun | None,
    teardown_error: str | None,
    kind: RunKind,
) -> None:
    """Emit ``aicert.certificate.failed`` for a run that ended without a certificate (on
    ``aicert.run.unassigned-<flow run id>`` when it failed before it got a run id)."""
    emit_run_event(
        CERTIFICATE_FAILED,
        run_id=record.run_id if record else None,
        project=record.project if record else None,
        flow_run_id=str(flow_run.id),
        flow_run_name=str(flow_run.name),
        payload={
            "run_id": record.run_id if record else None,
            "project": record.project if record else None,
            "flow_run_id": str(flow_run.id),
            "state": str(state.type.value),
            "message": str(state.message or "")[:2000],
            "teardown_error": teardown_error,
            "kind": kind,
        },
        kind=kind,
    )


# One hook per state, so that the run's logs name the one that ran.
def _on_failure(flow: Flow[..., dict[str, object]], flow_run: FlowRun, state: State) -> None:
    _after_unsuccessful_run(flow_run, state, run_kind_of(flow.name))


def _on_crashed(flow: Flow[..., dict[str, object]], flow_run: FlowRun, state: State) -> None:
    _after_unsuccessful_run(flow_run, state, run_kind_of(flow.name))


def _on_cancellation(flow: Flow[..., dict[str, object]], flow_run: FlowRun, state: State) -> None:
    _after_unsuccessful_run(flow_run, state, run_kind_of(flow.name))


# The hooks of every certifying flow (``@flow(..., **CERTIFYING_FLOW_HOOKS)``): teardown, and
# ``aicert.certificate.failed`` labelled with the flow's kind of run.
CERTIFYING_FLOW_HOOKS = {
    "on_failure": [_on_failure],
    "on_crashed": [_on_crashed],
    "on_cancellation": [_on_cancellation],
}
