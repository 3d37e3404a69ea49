"""The builder's commands of ``aicert``: ``run`` (the certify-training flow), ``cleanup`` and
``image``.

``run`` without a Prefect API starts a temporary server that cannot outlive it (see
``temp_server``); SIGINT (Ctrl-C, once or twice) and SIGTERM stop the run, tear it down, say
where its outputs and logs are kept, and exit 130 / 143.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
error_console = Console(stderr=True)

image_app = typer.Typer(help="Container images used by certified runs.", no_args_is_help=True)


def run(
    config: Annotated[Path, typer.Option("--config", "-c", help="The aicert.yaml to run.")] = Path(
        "aicert.yaml"
    ),
    output_bom: Annotated[
        Path, typer.Option("--output-bom", "-o", help="Where to write the certificate.")
    ] = Path("proof.json"),
    provider: Annotated[
        str,
        typer.Option(
            help="Platform: local (software TPM + this host's Docker) or qemu (a VM with "
            "measured boot; build its image first with `aicert image build-guest`)."
        ),
    ] = "local",
    outputs_dir: Annotated[
        Path | None, typer.Option(help="Copy the certified outputs (the model) here.")
    ] = None,
    qemu_accel: Annotated[
        Literal["auto", "tcg", "kvm"] | None,
        typer.Option(
            "--qemu-accel",
            help="qemu provider: the accelerator (default: $AICERT_QEMU_ACCEL, else auto: "
            "KVM when a probe boots the firmware under it, else tcg).",
        ),
    ] = None,
    refresh_dependencies: Annotated[
        bool,
        typer.Option(
            "--refresh-dependencies",
            help="Resolve requirements.txt again instead of reusing the resolution a "
            "previous run recorded for the same pinned file (sets "
            "$AICERT_REFRESH_DEPENDENCIES).",
        ),
    ] = False,
) -> None:
    """Certify a training run: measure inputs, train without network, measure outputs, quote."""
    if qemu_accel is not None:
        _select_qemu_accel(provider, qemu_accel)
    if refresh_dependencies:
        from aicert.guest_runtime.wheel_cache import REFRESH_ENV

        # Read where wheels are resolved: the orchestrator's staging and the local agent,
        # which inherits this process's environment.
        os.environ[REFRESH_ENV] = "1"
    _check_arguments(config, output_bom, provider)
    result = _certify_until_stopped(config, output_bom, provider, outputs_dir)
    console.print(
        f"[bold green]certified[/bold green] run {result['run_id']}: "
        f"{result['certificate']['path']} (sha256 {result['certificate']['sha256'][:16]}...)"
    )
    if result.get("workspace"):
        console.print(f"outputs and logs: {result['workspace']}")


def _select_qemu_accel(provider: str, qemu_accel: str) -> None:
    """Hand ``--qemu-accel`` to the qemu provider; exit 2 for another provider."""
    if provider != "qemu":
        error_console.print("[bold red]--qemu-accel[/bold red] applies to --provider qemu")
        raise typer.Exit(2)
    from aicert.tasks.platforms.qemu.provider import ACCEL_ENV

    # The flow builds the provider from its name: the option reaches it through the
    # variable the provider reads, overriding the environment's value.
    os.environ[ACCEL_ENV] = qemu_accel


def _check_arguments(config: Path, output_bom: Path, provider: str) -> None:
    """Bad input is exit code 2, before anything is provisioned: the configuration (GPUs
    included, on a platform that cannot pass them), the certificate's target, the provider's
    name."""
    from aicert.flows.output_target import OutputTargetError, check_output_target
    from aicert.guest_runtime.config import ConfigError, load_config
    from aicert.guest_runtime.gpu import refuse_gpus_on_platform
    from aicert.tasks.platforms import PROVIDERS

    # What the user wrote is printed with markup off: a regex's [a-z0-9] is not a rich
    # style tag.
    try:
        loaded = load_config(config)
        if provider in PROVIDERS:  # an unknown provider is refused below, by name
            refuse_gpus_on_platform(loaded, provider)
    except ConfigError as exc:
        error_console.print("[bold red]invalid config[/bold red]", escape(exc.source))
        for problem in exc.problems:
            error_console.print(f"  - {problem}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    try:
        check_output_target(output_bom)
    except OutputTargetError as exc:
        error_console.print(
            "[bold red]invalid --output-bom[/bold red]", escape(str(exc)), soft_wrap=True
        )
        raise typer.Exit(2) from None
    if provider not in PROVIDERS:
        error_console.print(f"[red]--provider {provider!r}: choose from {sorted(PROVIDERS)}[/red]")
        raise typer.Exit(2)


def _certify_until_stopped(
    config: Path, output_bom: Path, provider: str, outputs_dir: Path | None
) -> dict[str, Any]:
    """Run the ``certify-training`` flow (on a temporary Prefect server when no API is
    configured) until it ends or a signal stops it; returns the flow's result. A failed or
    stopped run exits 1, 130 or 143 once its machine is torn down."""
    from aicert.flows.flows import certify_training
    from aicert.flows.temp_server import TemporaryPrefectServer, needs_temporary_server

    server: TemporaryPrefectServer | None = None
    with _StopSignals() as stop:
        try:
            settings: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
            if needs_temporary_server():
                from prefect.settings import PREFECT_API_URL, temporary_settings

                server = TemporaryPrefectServer()
                error_console.print("starting a temporary Prefect server...", style="dim")
                settings = temporary_settings({PREFECT_API_URL: server.start()})
            with settings:
                return certify_training(
                    config_path=str(config),
                    provider=provider,
                    output_bom=str(output_bom),
                    outputs_dir=str(outputs_dir) if outputs_dir else None,
                )
        except BaseException as exc:
            stop.finishing = True
            if stop.received is None and not isinstance(exc, Exception):
                raise  # typer.Exit, SystemExit: not a signal of ours
            if stop.received is None:
                message = escape(str(exc)) or type(exc).__name__
                error_console.print(
                    f"[bold red]certification failed[/bold red]: {message}", soft_wrap=True
                )
            exit_code = _finish_stopped_runs(stop.received)
            raise typer.Exit(exit_code) from None
        finally:
            stop.finishing = True
            if server is not None:
                _flush_to_prefect()
                server.stop()


FLUSH_TIMEOUT_S = 5.0


def _flush_to_prefect() -> None:
    """Send the buffered logs and events now, while the temporary server still runs: at
    exit, Prefect would retry them against the stopped server for minutes."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    with contextlib.suppress(Exception):
        APILogWorker.drain_all(timeout=FLUSH_TIMEOUT_S)
    with contextlib.suppress(Exception):
        EventsWorker.drain_all(timeout=FLUSH_TIMEOUT_S)


SignalHandler = Callable[[int, FrameType | None], object] | int | signal.Handlers
"""What ``signal.signal`` takes and gives back: a function, or ``SIG_DFL``/``SIG_IGN``."""


class _StopSignals:
    """SIGINT and SIGTERM stop the run: the first one interrupts the flow (Prefect marks it
    crashed and its hook tears the machine down), later ones only say that it is stopping,
    so that a second Ctrl-C cannot cut the teardown short.

    During the flow Prefect's own SIGTERM handler is installed; it restores this one and
    sends the signal again once the flow run is crashed, which lands here.
    """

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self.finishing = False
        self._previous: dict[signal.Signals, SignalHandler] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = self.received is None
        if first:
            self.received = signal.Signals(signum)
        if self.finishing or not first:
            error_console.print(
                f"{signal.Signals(signum).name}: stopping, tearing the run down...", style="dim"
            )
            return
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        from prefect.exceptions import TerminationSignal

        raise TerminationSignal(signal=signum)

    def __enter__(self) -> _StopSignals:
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous = signal.signal(signum, self._handle)
            # None: a handler not installed from Python; the default is what to restore.
            self._previous[signum] = signal.SIG_DFL if previous is None else previous
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _finish_stopped_runs(received: signal.Signals | None) -> int:
    """After a failed or interrupted run: tear down what a hook could not (idempotent), say
    where each run's outputs and logs are kept; return the exit code (130 for SIGINT, 143
    for SIGTERM, else 1)."""
    from aicert.flows.flows import runs_started_here
    from aicert.flows.lifecycle import discard_record, load_record, teardown_record

    for started in runs_started_here():
        record = load_record(started.flow_run_id) or started
        state = "torn down"
        if not record.torn_down and load_record(started.flow_run_id) is not None:
            try:
                teardown_record(record)
                discard_record(record.flow_run_id)
            except Exception as exc:
                state = (
                    f"NOT torn down ({type(exc).__name__}: {exc}); run `aicert cleanup` to finish"
                )
        where = record.state_dir or (record.machine.state_dir if record.machine else None)
        if received is not None:
            error_console.print(
                f"[bold red]interrupted[/bold red] by {received.name}: run {record.run_id} "
                f"stopped, {state}; no certificate.",
                soft_wrap=True,
            )
        elif state != "torn down":
            error_console.print(f"run {record.run_id}: {escape(state)}", soft_wrap=True)
        if where and Path(where).exists():
            error_console.print(f"outputs and logs kept in {escape(where)}", soft_wrap=True)
    if received is None:
        return 1
    if not runs_started_here():
        error_console.print(
            f"[bold red]interrupted[/bold red] by {received.name} before the run started."
        )
    return 128 + int(received)


def cleanup(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only list what would be torn down.")
    ] = False,
    older_than: Annotated[
        str | None,
        typer.Option(help="Only runs started longer ago than this (90s, 30m, 2h, 1d)."),
    ] = None,
) -> None:
    """Tear down runs whose `aicert run` or worker died, and remove their records.

    What a run left (its swtpm, agent, training container or VM) after a SIGKILL or a power
    loss is found from its record in $AICERT_HOME/active; runs in progress are kept.

    Every `aicert run` and every flow run does this first; this command does it now.
    """
    from aicert.flows.azure_cleanup import parse_duration
    from aicert.flows.lifecycle import cleanup_abandoned_runs

    try:
        cutoff = parse_duration(older_than) if older_than is not None else None
    except ValueError as exc:
        error_console.print(f"[red]--older-than: {escape(str(exc))}[/red]")
        raise typer.Exit(2) from None
    report = cleanup_abandoned_runs(
        older_than=cutoff,
        dry_run=dry_run,
        log=lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True),
    )
    verb = "would tear down" if dry_run else "tore down"
    console.print(
        f"{verb} {len(report.torn_down)} run(s), kept {len(report.kept)}, "
        f"failed {len(report.failed)}",
        highlight=False,
    )
    if not report.ok:
        raise typer.Exit(1)


@image_app.command("build-base")
def build_base(
    name: Annotated[str, typer.Option(help="Image name.")] = "aicert/python-base:bookworm",
    force: Annotated[bool, typer.Option(help="Rebuild even if the image exists.")] = False,
) -> None:
    """Build the offline Debian bookworm Python base image (debootstrap + docker import)."""
    from aicert.tasks.platforms.base_image import build_base_image

    with console.status("building the base image (debootstrap)...") as status:

        def progress(line: str) -> None:
            status.update(f"building the base image: {line[:100]}")

        image_id = build_base_image(name, progress=progress, force=force)
    console.print(f"[green]base image ready[/green] {name} {image_id}")


def register(app: typer.Typer) -> None:
    """Add the builder's commands to the ``aicert`` app (the ``aicert.cli`` entry point).

    The bare verifier install ships this package but not its dependencies: nothing is added
    without Prefect and the Docker SDK."""
    import importlib.util

    if importlib.util.find_spec("prefect") is None or importlib.util.find_spec("docker") is None:
        return
    from aicert.tasks.platforms.qemu.command import build_guest_command

    image_app.command("build-guest")(build_guest_command)

    app.command(name="run")(run)
    app.command(name="cleanup")(cleanup)
    app.add_typer(image_app, name="image")
    if importlib.util.find_spec("azure.mgmt.compute") is not None:
        from aicert.flows.azure_cleanup import azure_app

        app.add_typer(azure_app, name="azure", help="Azure provider maintenance.")
    if importlib.util.find_spec("google.cloud.compute_v1") is not None:
        from aicert.flows.gcp_cleanup import gcp_app

        app.add_typer(gcp_app, name="gcp", help="Google Cloud provider maintenance.")
