"""``aicert gcp cleanup``: delete Compute Engine resources that runs left behind.

A run's own teardown deletes its VM and firewall rule on success, failure, crash and
cancellation; this is the backstop for what no hook could reach (the orchestrator host lost
power, the process was SIGKILLed while provisioning). Every VM the gcp provider makes carries
the labels ``aicert-run=<run label>`` and ``aicert-created=<unix time>``; a run is deleted
(its VM, then its firewall rule, whose name follows from the VM's) only when its creation
label is older than the cutoff, so runs still in progress are left alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from aicert.guest_runtime.hostutil import ProgressCallback
    from aicert.tasks.platforms.gcp import ComputeSession

__all__ = ["GcpCleanupReport", "cleanup_stale_runs", "gcp_app"]


@dataclass
class GcpCleanupReport:
    """What a cleanup did: the runs' VMs deleted (or, in a dry run, to delete), and what
    could not be deleted with the reason."""

    cutoff_unix: float
    deleted: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    dry_run: bool = False


def cleanup_stale_runs(
    session: ComputeSession,
    older_than: timedelta,
    *,
    now: float | None = None,
    dry_run: bool = False,
    progress: ProgressCallback | None = None,
) -> GcpCleanupReport:
    """Delete every run whose VM's ``aicert-created`` label is older than ``older_than``
    (the session's project and zone), its firewall rule with it.

    Raises:
        ValueError: ``older_than`` is not positive.
    """
    if older_than <= timedelta(0):
        raise ValueError("older_than must be positive")
    now = time.time() if now is None else now
    report = GcpCleanupReport(cutoff_unix=now - older_than.total_seconds(), dry_run=dry_run)
    for run in session.list_stale_runs(older_than.total_seconds(), now=now):
        if dry_run:
            report.deleted.append(run.instance)
            continue
        left = session.delete_run(run)
        if left:
            report.failed.extend(left)
        else:
            report.deleted.append(run.instance)
    if progress is not None:
        verb = "would delete" if dry_run else "deleted"
        progress(f"cleanup: {verb} {len(report.deleted)} runs, {len(report.failed)} failed")
    return report


gcp_app = typer.Typer(help="Google Cloud platform maintenance.", no_args_is_help=True)


@gcp_app.callback()
def _gcp_group() -> None:
    """Google Cloud platform maintenance."""
    # A callback keeps ``gcp`` a command group while it has a single command.


@gcp_app.command("cleanup")
def cleanup_command(
    older_than: Annotated[
        str, typer.Option("--older-than", help="Delete runs created before this: 2h, 1d...")
    ],
    platform_block: Annotated[
        str, typer.Option(help="The saved AICert GCP Platform block (project, zone, credentials).")
    ],
    dry_run: Annotated[bool, typer.Option(help="List what would be deleted.")] = False,
) -> None:
    """Delete the VMs labelled aicert-run (and their firewall rules) older than --older-than."""
    from aicert.flows.azure_cleanup import parse_duration
    from aicert.flows.gcp_platform import GcpPlatform, resolve_credentials
    from aicert.tasks.platforms.gcp import ComputeSession

    try:
        age = parse_duration(older_than)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--older-than") from None
    block = GcpPlatform.load(platform_block)
    settings = block.settings()
    credentials = (
        block.credentials.get_credentials_from_service_account()
        if block.credentials is not None
        else resolve_credentials(None)
    )
    report = cleanup_stale_runs(
        ComputeSession(settings, credentials),
        age,
        dry_run=dry_run,
        progress=lambda line: typer.echo(line, err=True),
    )
    verb = "would delete" if dry_run else "deleted"
    for instance in report.deleted:
        typer.echo(f"{verb} {instance} and its firewall rule")
    for what in report.failed:
        typer.echo(f"FAILED {what}", err=True)
    if report.failed:
        raise typer.Exit(1)
