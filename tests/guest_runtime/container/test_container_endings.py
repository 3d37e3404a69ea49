"""How the end of a training container is put into words: an out-of-memory kill (Docker's
``State.OOMKilled``), a kill by a signal that is not one, a timeout, a plain non-zero exit.
The end-to-end cases (a real OOM kill, a real ``docker kill``) are in
``tests/aicert_flows/test_fault_injection.py``."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from aicert.guest_runtime.container import ContainerResult, describe_ending


def _result(
    exit_code: int, *, oom_killed: bool = False, timed_out: bool = False
) -> ContainerResult:
    now = datetime.now(UTC)
    return ContainerResult(
        exit_code=exit_code,
        duration_ms=10,
        started_at=now,
        finished_at=now,
        timed_out=timed_out,
        container_id="c",
        image_id="i",
        oom_killed=oom_killed,
    )


def test_success_has_no_cause() -> None:
    assert describe_ending(_result(0), memory_limit="1g", timeout_s=60) is None


def test_out_of_memory_names_the_limit() -> None:
    text = describe_ending(_result(137, oom_killed=True), memory_limit="64m", timeout_s=60)
    assert text == (
        "training ran out of memory: Docker OOM-killed the container (limits.memory 64m; "
        "exit code 137)"
    )
    unlimited = describe_ending(_result(137, oom_killed=True), memory_limit=None, timeout_s=60)
    assert unlimited is not None and "(the host's memory; exit code 137)" in unlimited


@pytest.mark.parametrize(("code", "name"), [(137, "SIGKILL"), (143, "SIGTERM"), (130, "SIGINT")])
def test_a_signal_is_not_called_out_of_memory(code: int, name: str) -> None:
    text = describe_ending(_result(code), memory_limit="64m", timeout_s=60)
    assert text is not None
    assert text.startswith(f"training was killed by {name} (exit code {code}), not for lack")


def test_timeout_wins_over_the_kill_it_caused() -> None:
    text = describe_ending(_result(137, timed_out=True), memory_limit="64m", timeout_s=30)
    assert text == "training timed out after 30 s (limits.timeoutSeconds) and was killed"


def test_plain_exit_code() -> None:
    assert describe_ending(_result(3), memory_limit=None, timeout_s=60) == (
        "training exited with code 3"
    )
    # An out-of-memory kill of a child process, the job itself exiting 1.
    child = describe_ending(_result(1, oom_killed=True), memory_limit="64m", timeout_s=60)
    assert child is not None and child.startswith("training ran out of memory")
