"""The one way AICert declares a Prefect task: never cached, retried by a named policy.

Every AICert step has side effects (a machine provisioned, a PCR extended, a file written), so
no task may ever be answered from Prefect's cache: ``aicert_task`` always sets ``NO_CACHE``.
How a step is retried is a ``RetryPolicy`` stated once per kind of step (see
``aicert.tasks.certification``), not a decorator's arguments repeated at every task.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State, TaskRun

P = ParamSpec("P")
R = TypeVar("R")

RetryCondition = Callable[[Task[..., object], TaskRun, State], bool]
"""Decides, from the failed attempt's state, whether Prefect may run the task again."""


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


def aicert_task(
    name: str, *, run_name: str | None = None, retry: RetryPolicy | None = None
) -> Callable[[Callable[P, R]], Task[P, R]]:
    """A decorator making a function an AICert Prefect task.

    Args:
        name: The task's name (what the Prefect UI lists, e.g. ``provision``).
        run_name: The task run's name template (``provision-{provider.kind}-{run_id}``);
            ``None`` leaves Prefect's default (the name and a random suffix).
        retry: The step's retry policy; ``None``: never retried (Prefect's task defaults,
            which are no retries unless a Prefect setting says otherwise).

    Returns:
        The ``prefect.task`` decorator with those settings and ``cache_policy=NO_CACHE``.
    """
    if retry is None:
        return task(name=name, task_run_name=run_name, cache_policy=NO_CACHE)
    return task(
        name=name,
        task_run_name=run_name,
        cache_policy=NO_CACHE,
        retries=retry.retries,
        retry_delay_seconds=list(retry.delays_s),
        retry_condition_fn=retry.condition,
    )
