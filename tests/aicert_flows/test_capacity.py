"""Machine capacity as global concurrency limits, on the real (temporary) Prefect server.

With ``aicert-machines`` set to 2 slots, two machines hold them and a third waits until one is
released; a ``certify-training`` run waits for its slot before anything is provisioned, and
runs once a slot frees up.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import SyncPrefectClient
from prefect.exceptions import ObjectNotFound

from aicert.flows.capacity import MACHINES_LIMIT, all_machine_limit_names, machine_slot
from aicert.flows.deploy import ensure_machine_limits
from aicert.flows.flows import certify_training

from .conftest import (
    TRAIN_SCRIPT,
    make_git_repo,
    task_runs_of,
    training_config,
    unique_project,
    wait_for,
    write_config,
)

# How long a holder that should be waiting is watched before the test says it waited.
WAITED_S = 4.0


@pytest.fixture
def two_machines(client: SyncPrefectClient) -> Iterator[SyncPrefectClient]:
    """The machine limits set to 2 slots on the session's server; removed afterwards, so
    that the other tests run unlimited."""
    assert ensure_machine_limits(2) == all_machine_limit_names()
    try:
        yield client
    finally:
        for name in all_machine_limit_names():
            try:
                client.delete_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                pass


class SlotHolder:
    """A thread that takes a local machine's slots, records when, and holds them until
    ``release`` is called."""

    def __init__(self) -> None:
        self.acquired_at: float | None = None
        self._release = threading.Event()
        self._thread = threading.Thread(target=self._hold, daemon=True)
        self._thread.start()

    def _hold(self) -> None:
        with machine_slot("local", timeout_s=120):
            self.acquired_at = time.monotonic()
            self._release.wait(120)

    def release(self) -> None:
        self._release.set()
        self._thread.join(30)
        assert not self._thread.is_alive()


def _active_slots(client: SyncPrefectClient) -> int:
    return client.read_global_concurrency_limit_by_name(MACHINES_LIMIT).active_slots


def test_a_third_machine_waits_for_a_slot(two_machines: SyncPrefectClient) -> None:
    first, second = SlotHolder(), SlotHolder()
    wait_for(
        lambda: first.acquired_at and second.acquired_at,
        timeout_s=30,
        what="the first two machines' slots",
    )
    third = SlotHolder()
    try:
        time.sleep(WAITED_S)
        assert third.acquired_at is None, "a third machine got a slot of a limit of 2"
        assert _active_slots(two_machines) == 2
        released_at = time.monotonic()
        first.release()
        wait_for(lambda: third.acquired_at, timeout_s=30, what="the third machine's slot")
        assert third.acquired_at is not None and third.acquired_at >= released_at
        assert _active_slots(two_machines) == 2
    finally:
        for holder in (first, second, third):
            holder.release()
    assert _active_slots(two_machines) == 0


def _in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # reported by the test's assertion
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def test_a_certification_waits_for_a_machine_slot_before_provisioning(
    flow_env: str, aicert_home: Path, tmp_path: Path, two_machines: SyncPrefectClient
) -> None:
    project = unique_project("capacity")
    make_git_repo(tmp_path / "repo", {"train.py": TRAIN_SCRIPT})
    config = write_config(tmp_path / "aicert.yaml", training_config(project, "repo"))
    holders = [SlotHolder(), SlotHolder()]
    wait_for(lambda: all(h.acquired_at for h in holders), timeout_s=30, what="both machine slots")
    thread, outcome = _in_thread(
        lambda: certify_training(config_path=str(config), return_state=True)
    )
    try:
        # Named after the project once it has a run id, before it asks for a slot.
        run = wait_for(
            lambda: next(
                (r for r in two_machines.read_flow_runs(limit=200) if r.name.startswith(project)),
                None,
            ),
            timeout_s=60,
            what="the certification named after its project",
        )
        time.sleep(WAITED_S)
        # It waits for a slot: Running, its config loaded, nothing provisioned yet.
        waiting = two_machines.read_flow_run(run.id)
        assert waiting.state is not None and waiting.state.is_running(), waiting.state
        steps = {t.name for t in task_runs_of(two_machines, run.id)}
        assert "provision" not in steps and "stage-inputs" not in steps, steps
        holders[0].release()
        thread.join(180)
        assert not thread.is_alive(), "the certification did not finish after a slot freed"
    finally:
        for holder in holders:
            holder.release()
        thread.join(180)
    state = outcome.get("value")
    assert state is not None and state.is_completed(), outcome
    steps = {t.name for t in task_runs_of(two_machines, run.id)}
    assert {"provision", "teardown"} <= steps
    assert _active_slots(two_machines) == 0
