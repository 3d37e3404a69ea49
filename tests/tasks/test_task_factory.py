"""Every AICert task is declared by ``aicert_task``: never cached, with its step's retry policy.

The task names are what the Prefect UI lists (and other tests look runs up by them); the retry
settings say which steps may run twice: a call that extends a PCR is repeated only when the
agent never got it, waiting for the agent not once the machine is known dead.
"""

from __future__ import annotations

import signal
from typing import Any

import pytest
from prefect import Task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.exceptions import CancelledRun, TerminationSignal
from prefect.states import Failed

from aicert.tasks import certification, verification
from aicert.tasks.certification import (
    AGENT_START,
    UNTIL_AGENT_REACHED,
    MachineFailed,
)
from aicert.tasks.platforms.agent_client import AgentUnreachableError
from aicert.tasks.task_factory import (
    CANCELLED_MESSAGE,
    RetryPolicy,
    aicert_task,
    raise_if_cancelled,
)

# task object -> (name, retries, delays, retry condition); every task run is named after its
# step (one scheme, see aicert.tasks.task_factory).
EXPECTED: dict[str, tuple[str, int, list[int] | None, str | None]] = {
    "load_run_config": ("load-config", 0, None, None),
    "provision_machine": ("provision", 2, [2, 10], None),
    "stage_inputs": ("stage-inputs", 1, [5], None),
    "wait_for_agent": ("wait-for-agent", 1, [2], "_unless_machine_failed"),
    "establish_attestation_key": ("establish-ak", 2, [1, 5], None),
    "attest_machine_before_run": ("attest-machine", 2, [1, 5], "_only_if_unreachable"),
    "start_run": ("start-run", 2, [1, 5], "_only_if_unreachable"),
    "measure_inputs": ("measure-inputs", 2, [1, 5], "_only_if_unreachable"),
    "build_image": ("build-image", 2, [1, 5], "_only_if_unreachable"),
    "check_tpm": ("check-tpm", 0, None, None),
    "run_training": ("run-training", 0, None, None),
    "measure_outputs": ("measure-outputs", 2, [1, 5], "_only_if_unreachable"),
    "collect_outputs": ("collect-outputs", 2, [2, 10], None),
    "collect_quote": ("quote", 3, [1, 2, 5], None),
    "teardown_machine": ("teardown", 0, None, None),
}


def _settings(step: Task[..., Any]) -> tuple[str, int, list[int] | None, str | None]:
    condition = step.retry_condition_fn
    delays = step.retry_delay_seconds if step.retries else None
    return (
        step.name,
        step.retries,
        list(delays) if isinstance(delays, list) else delays,
        getattr(condition, "__name__", None),
    )


@pytest.mark.parametrize("attribute", sorted(EXPECTED))
def test_each_certification_step_keeps_its_name_and_retry_policy(attribute: str) -> None:
    step = getattr(certification, attribute)

    assert isinstance(step, Task)
    assert _settings(step) == EXPECTED[attribute]
    assert step.task_run_name == step.name
    assert step.cache_policy is NO_CACHE


def test_every_task_of_the_module_is_listed() -> None:
    tasks = {name for name, value in vars(certification).items() if isinstance(value, Task)}
    assert tasks == set(EXPECTED)


def test_the_verification_task_is_never_cached_nor_retried() -> None:
    step = verification.verify_certificate
    assert (step.name, step.retries, step.cache_policy) == ("verify-certificate", 0, NO_CACHE)


def test_the_factory_states_retries_once_per_policy() -> None:
    policy = RetryPolicy(delays_s=(3, 7, 11))

    @aicert_task("example", run_name="example-{value}", retry=policy)
    def example(value: int) -> int:
        return value

    assert (example.name, example.task_run_name) == ("example", "example-{value}")
    assert (example.retries, example.retry_delay_seconds) == (3, [3, 7, 11])
    assert example.retry_condition_fn is None
    assert example.cache_policy is NO_CACHE
    assert example.fn(4) == 4


def _a_task_run() -> TaskRun:
    return TaskRun(task_key="k", dynamic_key="0", flow_run_id=None)


def _decide(policy: RetryPolicy, error: BaseException) -> bool:
    """The policy's verdict on an attempt that failed with ``error``."""
    assert policy.condition is not None
    return policy.condition(certification.start_run, _a_task_run(), Failed(data=error))


def test_a_pcr_extending_call_is_retried_only_when_the_agent_never_got_it() -> None:
    refused = AgentUnreachableError("measure inputs", "ConnectError", "refused", None)
    timed_out = AgentUnreachableError("measure inputs", "ReadTimeout", "no answer", None)

    assert _decide(UNTIL_AGENT_REACHED, refused) is True
    assert _decide(UNTIL_AGENT_REACHED, timed_out) is False  # it may have extended the PCR
    assert _decide(UNTIL_AGENT_REACHED, RuntimeError("agent said no")) is False


def test_waiting_for_the_agent_is_not_retried_once_the_machine_is_dead() -> None:
    assert _decide(AGENT_START, MachineFailed("swtpm exited")) is False
    assert _decide(AGENT_START, TimeoutError("no answer yet")) is True


def test_an_interruption_outside_a_cancellation_stays_a_termination() -> None:
    """Outside a cancelled flow run, SIGTERM's TerminationSignal goes on (a crash)."""

    @aicert_task("interrupted")
    def interrupted() -> None:
        raise TerminationSignal(signal.SIGTERM)

    with pytest.raises(TerminationSignal):
        interrupted.fn()


def test_the_flow_turns_a_cancelled_step_back_into_the_termination_signal() -> None:
    with pytest.raises(TerminationSignal) as raised:
        raise_if_cancelled(CancelledRun(CANCELLED_MESSAGE))
    assert raised.value.signal == signal.SIGTERM
    raise_if_cancelled(RuntimeError("a failed step"))  # anything else: the caller re-raises
