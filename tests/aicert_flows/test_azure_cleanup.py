"""``aicert azure cleanup`` (``aicert.flows.azure_cleanup``): leftovers older than the cutoff
are deleted in dependency order, recent and undated ones kept, against the local double of
Azure Resource Manager (``FakeArm``) with the real SDK clients."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from typer.testing import CliRunner

from aicert.flows import azure_cleanup
from aicert.flows.azure_cleanup import azure_app, cleanup_leftovers, parse_duration
from aicert.tasks.platforms.azure import (
    AICERT_CREATED_TAG,
    AICERT_RUN_TAG,
    ArmSession,
    AzureResourceNames,
    arm,
)
from tests.tasks.platforms.azure.fake_arm import (
    TEST_RESOURCE_GROUP,
    FakeArm,
    RecordedRequest,
    StaticTokenCredential,
    azure_settings_for,
)


@pytest.fixture
def fake() -> Iterator[FakeArm]:
    with FakeArm() as server:
        yield server


def _ok(requests: list[RecordedRequest]) -> list[RecordedRequest]:
    return [r for r in requests if r.response_status < 300]


def _seed_run(fake: FakeArm, run_id: str, created: datetime | None) -> dict[str, str]:
    tags = {AICERT_RUN_TAG: run_id}
    if created is not None:
        tags[AICERT_CREATED_TAG] = created.isoformat().replace("+00:00", "Z")
    names = AzureResourceNames.for_run(run_id)
    nic = fake.seed(TEST_RESOURCE_GROUP, "networkInterfaces", names.nic, tags=tags)
    vm = fake.seed(
        TEST_RESOURCE_GROUP,
        "virtualMachines",
        names.vm,
        tags=tags,
        properties={"networkProfile": {"networkInterfaces": [{"id": nic}]}},
    )
    return {"vm": vm, "nic": nic}


def test_cleanup_deletes_only_resources_older_than_the_cutoff(fake: FakeArm) -> None:
    now = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
    old = _seed_run(fake, "old-run", now - timedelta(hours=5))
    recent = _seed_run(fake, "recent-run", now - timedelta(minutes=30))
    undated = _seed_run(fake, "undated-run", None)
    untagged = fake.seed(TEST_RESOURCE_GROUP, "disks", "someone-elses-disk")
    settings = azure_settings_for(fake)
    with ArmSession(settings, StaticTokenCredential(), progress=lambda _: None) as session:
        dry = cleanup_leftovers(timedelta(hours=2), arm=session, now=now, dry_run=True)
        assert fake.calls("DELETE") == []
        report = cleanup_leftovers(timedelta(hours=2), arm=session, now=now)

    assert dry.deleted == report.deleted
    assert report.failed == {}
    assert sorted(report.deleted) == sorted(
        f"{TEST_RESOURCE_GROUP}/{kind}/{AzureResourceNames.for_run('old-run').by_type()[kind]}"
        for kind in ("Microsoft.Compute/virtualMachines", "Microsoft.Network/networkInterfaces")
    )
    assert all(fake.resource(rid) is None for rid in old.values())
    assert all(fake.resource(rid) is not None for rid in recent.values())
    assert all(fake.resource(rid) is not None for rid in undated.values())
    assert fake.resource(untagged) is not None
    assert len(report.kept_recent) == 2
    assert len(report.kept_undated) == 2
    # The VM went before the NIC it holds (the fake refuses the other order, as ARM does).
    assert [r.type_name for r in _ok(fake.calls("DELETE"))] == [
        "virtualMachines",
        "networkInterfaces",
    ]
    (listing,) = [r for r in fake.requests if r.path.endswith("/resources")][-1:]
    assert listing.query["$filter"] == f"tagName eq '{AICERT_RUN_TAG}'"


def test_cleanup_command(fake: FakeArm, monkeypatch: pytest.MonkeyPatch) -> None:
    old = _seed_run(fake, "old-run", datetime.now(UTC) - timedelta(days=2))
    # The command's credential lookup (DefaultAzureCredential here) is the one thing swapped.
    monkeypatch.setattr(arm, "default_credential", lambda: StaticTokenCredential())
    arguments = ["cleanup", "--older-than", "2h", "--subscription-id", fake.subscription_id]
    arguments += ["--resource-group", TEST_RESOURCE_GROUP, "--arm-endpoint", fake.url]
    arguments += ["--polling-interval", "0.01"]
    result = CliRunner().invoke(azure_app, arguments)
    assert result.exit_code == 0, result.output
    assert all(fake.resource(rid) is None for rid in old.values())
    assert "deleted rg-aicert-runs/Microsoft.Compute/virtualMachines/" in result.output

    refused = CliRunner().invoke(azure_app, ["cleanup", "--older-than", "soon"])
    assert refused.exit_code == 2
    assert "not a duration" in refused.output


def test_parse_duration() -> None:
    assert parse_duration("2h") == timedelta(hours=2)
    assert parse_duration("90s") == timedelta(seconds=90)
    assert parse_duration("1d") == timedelta(days=1)
    for bad in ("", "2", "h", "0h", "-1h", "2 hours"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert azure_cleanup.parse_created_tag("2025-01-01T00:00:00") is None  # no zone: undated
