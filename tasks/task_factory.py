"""The one way AICert declares a Prefect task: never cached, retried by a named policy.

Every AICert step has side effects (a machine provisioned, a PCR extended, a file written), so
no task may ever be answered from Prefect's cache: ``aicert_task`` always sets ``NO_CACHE``.
How a step is retried is a ``RetryPolicy`` stated once per kind of step (see
``aicert.tasks.certification``), not a decorator's arguments repeated at every task.

Task run names follow one scheme: the step's name alone (``provision``, ``run-training``).
The flow run's name already says which project and run they belong to, and a short name is
not clipped in the log panel; a step that runs twice in one flow run is told apart by Prefect.

A step interrupted because its flow run is being cancelled (the runner or worker sends the
flow's process SIGTERM) ends **Cancelled**, not Crashed: Prefect's task engine would mark any
``TerminationSignal`` a crash. The flow turns that ``CancelledRun`` back into the signal (see
``raise_if_cancelled``), so its teardown and Prefect's own cancellation handling run as before.
"""

from __future__ import annotations

import functools
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar, cast

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State, StateType, TaskRun
from prefect.exceptions import CancelledRun, TerminationSignal
from prefect.states import Cancelled

P = ParamSpec("P")
R = TypeVar("R")

RetryCondition = Callable[[Task[..., object], TaskRun, State], bool]
"""Decides, from the failed attempt's state, whether Prefect may run the task again."""

CANCELLED_MESSAGE = "the flow run was cancelled while this step ran"


@dataclass(frozen=True)
class RetryPolicy:
    """How often, how late and when a failed step is run again.

    Attributes:
        delays_s: The wait before each retry, in seconds; one retry per entry.
        condition: When given, a retry happens only if it returns true for the failed
            attempt (e.g. only when the agent was never reached, so no PCR was touched).
    """

    delays_s: tuple[float, ...]
    condition: RetryCondition | None = None

    @property
    def retries(self) -> int:
        """How many times the step may run again after its first attempt."""
        return len(self.delays_s)


def flow_run_is_cancelling() -> bool:
    """Whether the current flow run is being cancelled (its state on the server is
    Cancelling or Cancelled); ``False`` outside a flow run or when the server cannot say."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    flow_run_id = flow_run.id
    if not flow_run_id:
        return False
    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run_id).state
    except Exception:  # a server that cannot answer: the interruption stays a crash
        return False
    return state is not None and state.type in (StateType.CANCELLING, StateType.CANCELLED)


def _cancellable(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn``, returning a Cancelled state when its flow run's cancellation interrupts it."""

    @functools.wraps(fn)
    def step(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except TerminationSignal:
            if not flow_run_is_cancelling():
                raise  # a plain SIGTERM: the process is going down, a crash
            # A returned state becomes the task run's final state.
            return cast(R, Cancelled(message=CANCELLED_MESSAGE))

    return step


def raise_if_cancelled(error: BaseException) -> None:
    """In the flow: re-raise a step's cancellation as the ``TerminationSignal`` it was, so
    that the flow run ends the way Prefect ends a cancelled run.

    Args:
        error: The exception a step's call raised.

    Raises:
        TerminationSignal: ``error`` is a step's ``CancelledRun``.
    """
    if isinstance(error, CancelledRun):
        raise TerminationSignal(signal.SIGTERM) from error


def aicert_task(
    name: str, *, run_name: str | None = None, retry: RetryPolicy | None = None
) -> Callable[[Callable[P, R]], Task[P, R]]:
    """A decorator making a function an AICert Prefect task.

    Args:
        name: The task's name (what the Prefect UI lists, e.g. ``provision``).
        run_name: The task run's name template; ``None`` (every AICert step): the step's
            name, the one scheme of the module docstring.
        retry: The step's retry policy; ``None``: never retried (Prefect's task defaults,
            which are no retries unless a Prefect setting says otherwise).

    Returns:
        The ``prefect.task`` decorator with those settings and ``cache_policy=NO_CACHE``;
        the step ends Cancelled when its flow run's cancellation interrupts it.
    """
    run_name = name if run_name is None else run_name

    def decorate(fn: Callable[P, R]) -> Task[P, R]:
        if retry is None:
            return task(name=name, task_run_name=run_name, cache_policy=NO_CACHE)(_cancellable(fn))
        return task(
            name=name,
            task_run_name=run_name,
            cache_policy=NO_CACHE,
            retries=retry.retries,
            retry_delay_seconds=list(retry.delays_s),
            retry_condition_fn=retry.condition,
        )(_cancellable(fn))

    return decorate
