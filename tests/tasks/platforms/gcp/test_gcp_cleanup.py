"""``aicert gcp cleanup``: runs whose VM's ``aicert-created`` label is older than the limit
lose their VM and firewall rule; recent runs and resources without the label stay. Against
the Compute Engine double, through the real client library, and once through the CLI with a
saved ``GcpPlatform`` block."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
from google.auth.credentials import AnonymousCredentials
from typer.testing import CliRunner

from aicert.flows.gcp_cleanup import cleanup_stale_runs
from aicert.tasks.platforms.gcp import ComputeSession, GcpSettings, RunResources
from aicert.tasks.platforms.gcp import provider as gcp_provider
from tests.tasks.platforms.gcp.fake_compute import FakeCompute

IMAGE = "projects/aicert-images/global/images/aicert-guest-1-0-0"
NOW = 1_800_000_000.0


@pytest.fixture
def compute() -> Iterator[FakeCompute]:
    with FakeCompute() as fake:
        yield fake


def session_for(compute: FakeCompute) -> ComputeSession:
    settings = GcpSettings(
        project="aicert-tests",
        zone="us-central1-a",
        image=IMAGE,
        orchestrator_cidr="203.0.113.7/32",
        api_endpoint=compute.endpoint,
        poll_interval_s=0.01,
    )
    return ComputeSession(settings, AnonymousCredentials())


def make_run(session: ComputeSession, run_id: str, created: float) -> RunResources:
    resources = RunResources.for_run(run_id)
    session.create_firewall(resources)
    session.create_instance(resources, {}, now=created)
    return resources


def test_only_runs_older_than_the_limit_are_deleted(compute: FakeCompute) -> None:
    session = session_for(compute)
    old = make_run(session, "old-run", NOW - 3 * 3600)
    recent = make_run(session, "recent-run", NOW - 600)
    # A VM someone else made in the project: no aicert label, never touched.
    compute.state.instances["someone-elses-vm"] = {"name": "someone-elses-vm", "labels": {}}

    dry = cleanup_stale_runs(session, timedelta(hours=1), now=NOW, dry_run=True)
    assert dry.deleted == [old.instance] and old.instance in compute.state.instances

    report = cleanup_stale_runs(session, timedelta(hours=1), now=NOW)
    assert report.deleted == [old.instance] and report.failed == []
    assert sorted(compute.state.instances) == sorted([recent.instance, "someone-elses-vm"])
    assert sorted(compute.state.firewalls) == [recent.firewall]
    (listing,) = [
        r for r in compute.state.requests if r.method == "GET" and r.path.endswith("/instances")
    ][-1:]
    assert listing.query["filter"] == ["labels.aicert-run:*"]
    with pytest.raises(ValueError, match="positive"):
        cleanup_stale_runs(session, timedelta(0))


def test_the_cli_cleans_the_project_of_a_saved_block(
    compute: FakeCompute, prefect_api_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aicert.flows.gcp_cleanup import gcp_app
    from aicert.flows.gcp_platform import GcpPlatform

    session = session_for(compute)
    old = make_run(session, "old-cli-run", time.time() - 2 * 86400)
    recent = make_run(session, "recent-cli-run", time.time())
    name = f"cleanup-{uuid.uuid4().hex[:8]}"
    GcpPlatform(
        project="aicert-tests",
        zone="us-central1-a",
        image=IMAGE,
        orchestrator_cidr="203.0.113.7/32",
        api_endpoint=compute.endpoint,
        poll_interval_s=0.01,
    ).save(name)
    # The one thing a real project gets from outside: credentials (here anonymous ones).
    monkeypatch.setattr(gcp_provider, "default_credentials", AnonymousCredentials)
    runner = CliRunner()
    result = runner.invoke(gcp_app, ["cleanup", "--older-than", "1d", "--platform-block", name])
    assert result.exit_code == 0, result.output
    assert f"deleted {old.instance} and its firewall rule" in result.output
    assert sorted(compute.state.instances) == [recent.instance]
    bad = runner.invoke(gcp_app, ["cleanup", "--older-than", "soon", "--platform-block", name])
    assert bad.exit_code == 2 and "not a duration" in bad.output


def test_aicert_has_the_gcp_command_group() -> None:
    """The builder's CLI plugin adds ``aicert gcp`` when the gcp extra is installed."""
    completed = subprocess.run(
        [sys.executable, "-m", "aicert.cli", "gcp", "cleanup", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert "--older-than" in completed.stdout and "--platform-block" in completed.stdout
