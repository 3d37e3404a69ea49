"""The exact requests the real google-cloud-compute client sends for a gcp run, against a
local double of the Compute Engine REST API (``fake_compute.py``): the firewall rule that
admits only the orchestrator, the Shielded VM with no external IP and the run's labels,
operations waited for, a quota error reported with its code, and deletion that skips what is
already gone."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from google.auth.credentials import AnonymousCredentials

from aicert.tasks.platforms.gcp import (
    AICERT_CREATED_LABEL,
    AICERT_RUN_LABEL,
    ComputeSession,
    GcpOperationError,
    GcpSettings,
    RunResources,
)
from tests.tasks.platforms.gcp.fake_compute import FakeCompute

RUN_ID = "demo-20261203T070000Z-ab12cd34"


@pytest.fixture
def compute() -> Iterator[FakeCompute]:
    with FakeCompute() as fake:
        yield fake


def _session(compute: FakeCompute, **changes: object) -> ComputeSession:
    settings = GcpSettings(
        project="aicert-tests",
        zone="us-central1-a",
        image="projects/aicert-images/global/images/aicert-guest-1-0-0",
        orchestrator_cidr="203.0.113.7/32",
        api_endpoint=compute.endpoint,
        poll_interval_s=0.01,
        **changes,  # type: ignore[arg-type]
    )
    return ComputeSession(settings, AnonymousCredentials())


def test_a_run_creates_a_firewall_rule_and_a_shielded_vm(compute: FakeCompute) -> None:
    session = _session(compute)
    names = RunResources.for_run(RUN_ID)
    session.create_firewall(names)
    session.create_instance(names, {"aicert-run-id": RUN_ID}, now=1_800_000_000)
    posts = [r for r in compute.state.requests if r.method == "POST"]
    assert [r.path for r in posts] == [
        "/compute/v1/projects/aicert-tests/global/firewalls",
        "/compute/v1/projects/aicert-tests/zones/us-central1-a/instances",
    ]
    rule = posts[0].body or {}
    assert rule["sourceRanges"] == ["203.0.113.7/32"]
    assert rule["allowed"] == [{"IPProtocol": "tcp", "ports": ["8443"]}]
    assert rule["targetTags"] == [names.instance] and rule["direction"] == "INGRESS"
    vm = posts[1].body or {}
    assert vm["shieldedInstanceConfig"] == {
        "enableSecureBoot": True,
        "enableVtpm": True,
        "enableIntegrityMonitoring": True,
    }
    assert vm["labels"] == {AICERT_RUN_LABEL: names.label, AICERT_CREATED_LABEL: "1800000000"}
    assert vm["disks"][0]["initializeParams"]["labels"] == vm["labels"]
    assert "accessConfigs" not in vm["networkInterfaces"][0]  # no external IP
    assert vm["machineType"] == "zones/us-central1-a/machineTypes/n2d-standard-4"
    # Each operation was polled until DONE (the double says RUNNING first).
    polls = [r.path for r in compute.state.requests if "/operations/" in r.path]
    assert any("/global/operations/" in p for p in polls)
    assert any("/zones/us-central1-a/operations/" in p for p in polls)
    assert session.internal_ip(names) == "127.0.0.1"


def test_external_ip_and_confidential_vm_only_when_asked(compute: FakeCompute) -> None:
    session = _session(compute, external_ip=True, confidential_compute=True)
    session.create_instance(RunResources.for_run(RUN_ID), {}, now=0)
    vm = next(r.body for r in compute.state.requests if r.method == "POST") or {}
    assert vm["networkInterfaces"][0]["accessConfigs"][0]["type"] == "ONE_TO_ONE_NAT"
    assert vm["confidentialInstanceConfig"] == {"enableConfidentialCompute": True}
    assert vm["scheduling"] == {"onHostMaintenance": "TERMINATE"}


def test_quota_error_names_its_code(compute: FakeCompute) -> None:
    compute.state.fail_next("insert-instance")
    with pytest.raises(GcpOperationError, match="Quota 'CPUS' exceeded") as raised:
        _session(compute).create_instance(RunResources.for_run(RUN_ID), {}, now=0)
    assert raised.value.code == 403
    assert compute.state.instances == {}


def test_teardown_deletes_both_and_is_idempotent(compute: FakeCompute) -> None:
    session = _session(compute)
    names = RunResources.for_run(RUN_ID)
    session.create_firewall(names)
    session.create_instance(names, {}, now=0)
    assert session.delete_run(names) == []
    assert compute.state.instances == {} and compute.state.firewalls == {}
    assert session.delete_run(names) == []  # already gone: nothing left, no error


def test_stale_runs_are_found_by_their_labels(compute: FakeCompute) -> None:
    session = _session(compute)
    old, new = RunResources.for_run("old-run"), RunResources.for_run("new-run")
    session.create_instance(old, {}, now=1_000)
    session.create_instance(new, {}, now=9_000)
    stale = session.list_stale_runs(older_than_s=3_600, now=10_000)
    assert [r.instance for r in stale] == [old.instance]
    listing = next(
        r for r in compute.state.requests if r.method == "GET" and r.path.endswith("/instances")
    )
    assert listing.query["filter"] == [f"labels.{AICERT_RUN_LABEL}:*"]


@pytest.mark.parametrize("cidr", ["0.0.0.0/0", "everyone"])
def test_orchestrator_range_must_not_be_the_world(cidr: str) -> None:
    with pytest.raises(ValueError, match="orchestrator_cidr"):
        GcpSettings(
            project="aicert-tests",
            zone="z",
            image="projects/aicert-images/global/images/i",
            orchestrator_cidr=cidr,
        )


def test_run_names_are_valid_compute_names() -> None:
    names = RunResources.for_run("My_Project-20261203T070000Z-" + "x" * 80)
    assert len(names.label) <= 63 and len(names.firewall) <= 63
