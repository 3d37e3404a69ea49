"""The stack on PostgreSQL (``stack.sh up --postgres``: a real server from Debian's postgresql
package, started by the script) passes the trigger-to-promotion scenario of test_triggers.py,
and the server's records really are in that database. Last, ``stack.sh down`` with a
certification in flight cancels it and leaves nothing behind."""

from __future__ import annotations

import glob
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.aicert_flows.conftest import running_training_container

from .conftest import (
    Promotion,
    Stack,
    check_nothing_left,
    check_promoted,
    check_tampered_certificate_rejected,
    emit,
    make_git_repo,
    postgres_stack,
    training_config,
    trigger_to_promotion,
    unique_project,
    wait_for,
    write_config,
)


@pytest.fixture(scope="module")
def pg_stack(tmp_path_factory: pytest.TempPathFactory, base_image: str) -> Iterator[Stack]:
    with postgres_stack(tmp_path_factory) as stack:
        yield stack


@pytest.fixture(scope="module")
def pg_promotion(pg_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Promotion:
    return trigger_to_promotion(pg_stack, tmp_path_factory.mktemp("pg-projects"), "pgdeploy")


def _psql(stack: Stack, query: str) -> str:
    state = stack.home / "stack"
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/psql"))
    port = (state / "pg-port").read_text().strip()
    command = [found[-1] if found else "psql", "-h", "127.0.0.1", "-p", port]
    done = subprocess.run(
        [*command, "-U", "prefect", "-d", "prefect", "-tAc", query],
        env={**os.environ, "PGPASSWORD": (state / "pg-password").read_text().strip()},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout.strip()


def test_trigger_to_promotion_on_postgres(pg_promotion: Promotion) -> None:
    check_promoted(pg_promotion)


def test_tampered_certificate_is_rejected_on_postgres(
    pg_promotion: Promotion, tmp_path: Path
) -> None:
    check_tampered_certificate_rejected(pg_promotion, tmp_path)


def test_the_runs_are_stored_in_postgres(pg_promotion: Promotion) -> None:
    ids = f"'{pg_promotion.certify_run.id}', '{pg_promotion.promote_run.id}'"
    states = _psql(pg_promotion.stack, f"SELECT state_type FROM flow_run WHERE id IN ({ids})")
    assert states.splitlines() == ["COMPLETED", "COMPLETED"]
    created = _psql(
        pg_promotion.stack,
        "SELECT count(*) FROM events WHERE event = 'aicert.certificate.created' "
        f"AND resource_id = 'aicert.run.{pg_promotion.run_id}'",
    )
    assert int(created) >= 1
    # ...and nothing went to a SQLite file in the stack's PREFECT_HOME.
    assert not list((pg_promotion.stack.home / "prefect").glob("*.db"))


SLEEPING_TRAINING = """\
import time
print("training-marker: sleeping", flush=True)
time.sleep(240)
"""


def test_down_cancels_runs_in_flight_and_leaves_nothing(pg_stack: Stack, tmp_path: Path) -> None:
    """``stack.sh down`` while a certification trains: the run is cancelled, its teardown
    hook stops its swtpm, agent and container, and nothing of the stack is left (last test of
    this module: the stack is down afterwards)."""
    project = unique_project("pgdown")
    make_git_repo(tmp_path / "repo", {"train.py": SLEEPING_TRAINING})
    config = write_config(
        tmp_path / "aicert.yaml",
        training_config(
            project, "repo", limits={"cpus": 1, "memory": "256m", "timeoutSeconds": 300}
        ),
    )
    emit(
        pg_stack, "aicert.source.updated", f"aicert.source.{project}", {"config_path": str(config)}
    )
    wait_for(
        lambda: running_training_container(project),
        timeout_s=120,
        what=f"the training container of {project}",
    )
    pids = [
        int((pg_stack.home / "stack" / f"{name}.pid").read_text()) for name in ("server", "worker")
    ]
    output = pg_stack.stack_sh("down")
    assert "cancelling the flow runs in flight" in output, output
    check_nothing_left(pg_stack.home, pids, Path(pg_stack.env["AICERT_PG_DIR"]))
    assert not list((pg_stack.home / "active").glob("*.json")), "a run's teardown record is left"
