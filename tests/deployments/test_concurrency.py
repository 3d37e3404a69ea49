"""Four certifications at once through one worker (``--limit 4``): all complete and verify,
each on its own swtpm, agent port, container and workspace, with nothing crossing between runs."""

from __future__ import annotations

import itertools
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
import pytest
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

import aicert
from aicert.errors import ArtifactMismatchError
from aicert.flows.flows import CERTIFICATE_CREATED

from .conftest import (
    Stack,
    deployment_runs,
    make_project,
    wait_for,
    wait_for_event,
    wait_until_final,
)

EPOCHS = (20, 40, 60, 80)  # one per run: four different models
# Each training stays up this long, so that the four runs overlap even when the worker's four
# flow processes start seconds apart on a busy 2-core machine (CI once saw a 2 s spread outlast
# a whole short run).
HOLD_S = 30
AGENT_URL = re.compile(r"agent at http://127\.0\.0\.1:(\d+)")


def _container_creations(run_id: str, since: datetime) -> list[dict[str, Any]]:
    client = docker.from_env()
    try:
        events = client.events(
            since=since,
            until=datetime.now(UTC),
            filters={"type": "container", "event": "create", "container": f"aicert-{run_id}"},
            decode=True,
        )
        return [event["Actor"]["Attributes"] for event in events]
    finally:
        client.close()


def test_four_certifications_at_once(sqlite_stack: Stack, tmp_path: Path) -> None:
    projects = [
        make_project(tmp_path, f"conc{i}", epochs, HOLD_S) for i, epochs in enumerate(EPOCHS)
    ]
    since = datetime.now(UTC)
    with sqlite_stack.client() as client:
        deployment = client.read_deployment_by_name("certify-training/certify-training")
        submitted = [
            client.create_flow_run_from_deployment(
                deployment.id, parameters={"config_path": str(config)}
            )
            for _, _, config in projects
        ]
        runs = [wait_until_final(client, run.id, timeout_s=300) for run in submitted]
        for run in runs:
            assert run.state is not None and run.state.is_completed(), (run.name, run.state)
        created = {
            project: wait_for_event(client, CERTIFICATE_CREATED, project=project).payload
            for project, _, _ in projects
        }
        run_ids = {project: payload["run_id"] for project, payload in created.items()}
        agent_ports = []
        for run in runs:
            logs = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])), limit=200
            )
            agent_ports += [int(m[1]) for log in logs if (m := AGENT_URL.search(log.message))]
        # Their promotions (one per certificate) finish before the stack is torn down.
        promotions = wait_for(
            lambda: (
                found
                if len(
                    found := deployment_runs(
                        client, "verify-and-promote", lambda p: p.get("run_id") in run_ids.values()
                    )
                )
                == len(projects)
                else None
            ),
            timeout_s=90,
            what="four verify-and-promote runs",
        )
        promotions = [wait_until_final(client, run.id) for run in promotions]

    # They ran at the same time: each started before any finished.
    assert max(r.start_time for r in runs) < min(r.end_time for r in runs)  # type: ignore[type-var]
    assert len(set(run_ids.values())) == len(projects)
    assert len(set(agent_ports)) == len(projects), agent_ports

    certificates = {p: aicert.load(created[p]["certificate_path"]) for p in run_ids}
    reports = {}
    for project, payload in created.items():
        outputs = Path(payload["outputs_path"])
        # Each run's workspace is its own folder under the stack's AICERT_HOME.
        run_id = run_ids[project]
        assert outputs == sqlite_stack.home / "runs" / run_id / "work" / run_id / "outputs"
        reports[project] = certificates[project].verify(
            trusted_roots=[sqlite_stack.platform_ca], allow_dev_platform=True, model=outputs
        )
        assert reports[project].project == project and reports[project].run_id == run_id
        # One training container per run, named and labelled after the run.
        creations = _container_creations(run_id, since)
        assert [(c["name"], c.get("aicert.run")) for c in creations] == [
            (f"aicert-{run_id}", run_id)
        ]
    assert len({r.nonce for r in reports.values()}) == len(projects)
    # Each run had its own TPM: its own endorsement key and attestation key.
    assert len({c.attestation.ek.certificate for c in certificates.values()}) == len(projects)
    assert len({c.attestation.ak.public for c in certificates.values()}) == len(projects)
    # No run's certificate vouches for another run's model.
    for mine, other in itertools.permutations(run_ids, 2):
        with pytest.raises(ArtifactMismatchError):
            certificates[mine].verify_artifact(Path(created[other]["outputs_path"]))

    for run in promotions:
        assert run.state is not None and run.state.is_completed(), (run.name, run.state)
    for project, run_id in run_ids.items():
        assert (sqlite_stack.registry / project / run_id / "certificate.json").is_file()
