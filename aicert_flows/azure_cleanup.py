"""``aicert azure cleanup``: delete Azure resources that runs left behind.

A run's own teardown deletes its resources on success, failure, crash and cancellation; this
is the backstop for what no hook could reach (the orchestrator host lost power, the process
was SIGKILLed while provisioning). Every resource the azure provider makes carries the tags
``aicert-run=<run id>`` and ``aicert-created-at=<UTC ISO 8601>``; a resource is deleted only
when its creation tag is older than the cutoff, so runs still in progress are left alone. A
tagged resource without a readable creation time is kept and reported, never guessed at.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated

import typer

from aicert.tasks.platforms.azure.settings import DEFAULT_POLLING_INTERVAL_S

if TYPE_CHECKING:
    from aicert.tasks.platforms.azure import ArmSession, ProgressCallback

_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


@dataclass
class CleanupReport:
    """What a cleanup did, each resource named ``<resource group>/<type>/<name>``: deleted
    (or, in a dry run, to delete), kept (too recent, or undated), and failures."""

    cutoff: datetime
    deleted: list[str] = field(default_factory=list)
    kept_recent: list[str] = field(default_factory=list)
    kept_undated: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    dry_run: bool = False


def parse_duration(text: str) -> timedelta:
    """``90s``, ``30m``, ``2h``, ``1d``, ``1w`` as a timedelta (positive)."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration like 30m, 2h or 1d")
    seconds = int(match[1]) * _UNIT_SECONDS[match[2].lower()]
    if seconds <= 0:
        raise ValueError("the duration must be positive")
    return timedelta(seconds=seconds)


def parse_created_tag(value: str | None) -> datetime | None:
    """The ``aicert-created-at`` tag as an aware UTC time; None when absent or unreadable."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return None
    return parsed.astimezone(UTC)


def cleanup_leftovers(
    older_than: timedelta,
    *,
    arm: ArmSession,
    resource_group: str | None = None,
    now: datetime | None = None,
    dry_run: bool = False,
    progress: ProgressCallback | None = None,
) -> CleanupReport:
    """Delete every resource tagged ``aicert-run`` whose ``aicert-created-at`` is older than
    ``older_than`` (in ``resource_group``, or the whole subscription), in dependency order."""
    from aicert.tasks.platforms.azure import (
        AICERT_CREATED_TAG,
        AICERT_RUN_TAG,
        delete_in_order,
        target_label,
    )

    if older_than <= timedelta(0):
        raise ValueError("older_than must be positive")
    report_progress = progress or arm.progress
    cutoff = (now or datetime.now(UTC)) - older_than
    report = CleanupReport(cutoff=cutoff, dry_run=dry_run)
    targets: list[tuple[str, str, str]] = []
    for resource in arm.list_tagged(AICERT_RUN_TAG, resource_group=resource_group):
        label = target_label(resource.type, resource.resource_group, resource.name)
        created = parse_created_tag((resource.tags or {}).get(AICERT_CREATED_TAG))
        if created is None:
            report.kept_undated.append(label)
        elif created >= cutoff:
            report.kept_recent.append(label)
        else:
            targets.append((resource.type, resource.resource_group, resource.name))
    if dry_run:
        report.deleted = sorted(target_label(*target) for target in targets)
        report_progress(f"dry run: would delete {len(report.deleted)} resources")
        return report
    deleted, failed = delete_in_order(arm, targets)
    report.deleted = deleted
    report.failed = failed
    report_progress(
        f"cleanup: deleted {len(deleted)}, kept {len(report.kept_recent)} recent and "
        f"{len(report.kept_undated)} undated, {len(failed)} failed"
    )
    return report


# -- CLI ------------------------------------------------------------------------------------

azure_app = typer.Typer(help="Azure platform maintenance.", no_args_is_help=True)


@azure_app.callback()
def _azure_group() -> None:
    """Azure platform maintenance."""
    # A callback keeps ``azure`` a command group while it has a single command.


def _session_from_options(
    platform_block: str | None,
    subscription_id: str | None,
    arm_endpoint: str | None,
    credentials_block: str | None,
    polling_interval_s: float,
) -> tuple[ArmSession, str | None]:
    """The ARM session and the block's resource group (None without a block)."""
    from aicert.flows.azure_platform import (
        AzurePlatform,
        credential_from_block,
        resolve_credential,
    )
    from aicert.tasks.platforms.azure import ArmSession, ArmSessionSettings

    def echo(message: str) -> None:
        typer.echo(message, err=True)

    if platform_block is not None:
        block = AzurePlatform.load(platform_block)
        credential = (
            credential_from_block(block.credentials)
            if block.credentials is not None
            else resolve_credential(None)
        )
        return ArmSession(block.settings(), credential, echo), block.resource_group
    if subscription_id is None:
        raise typer.BadParameter("give --platform-block or --subscription-id")
    settings = ArmSessionSettings(
        subscription_id=subscription_id,
        arm_endpoint=arm_endpoint,
        polling_interval_s=polling_interval_s,
    )
    return ArmSession(settings, resolve_credential(credentials_block), echo), None


@azure_app.command("cleanup")
def cleanup_command(
    older_than: Annotated[
        str, typer.Option("--older-than", help="Delete what was created before this: 2h, 1d...")
    ],
    platform_block: Annotated[
        str | None, typer.Option(help="A saved AICert Azure Platform block to take settings from.")
    ] = None,
    subscription_id: Annotated[
        str | None, typer.Option(help="Subscription to clean (without --platform-block).")
    ] = None,
    resource_group: Annotated[
        str | None,
        typer.Option(help="Only this resource group (default: the block's, else all)."),
    ] = None,
    credentials_block: Annotated[
        str | None,
        typer.Option(help="A saved prefect-azure credentials block (default credential else)."),
    ] = None,
    arm_endpoint: Annotated[
        str | None, typer.Option(help="Resource Manager endpoint (default: public cloud).")
    ] = None,
    polling_interval: Annotated[
        float,
        typer.Option(
            min=0.001, max=120, help="Seconds between polls of a deletion (without a block)."
        ),
    ] = DEFAULT_POLLING_INTERVAL_S,
    dry_run: Annotated[bool, typer.Option(help="List what would be deleted.")] = False,
) -> None:
    """Delete Azure resources tagged aicert-run whose creation is older than --older-than."""
    try:
        age = parse_duration(older_than)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--older-than") from None
    arm, block_group = _session_from_options(
        platform_block, subscription_id, arm_endpoint, credentials_block, polling_interval
    )
    with arm:
        report = cleanup_leftovers(
            age, arm=arm, resource_group=resource_group or block_group, dry_run=dry_run
        )
    verb = "would delete" if dry_run else "deleted"
    for resource_id in report.deleted:
        typer.echo(f"{verb} {resource_id}")
    for resource_id in report.kept_undated:
        typer.echo(f"kept (no readable aicert-created-at tag) {resource_id}")
    for what, why in report.failed.items():
        typer.echo(f"FAILED {what}: {why}", err=True)
    if report.failed:
        raise typer.Exit(1)
