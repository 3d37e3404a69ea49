"""The builder's commands of ``aicert``: ``run`` (the certify-training flow) and ``image``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

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
) -> None:
    """Certify a training run: measure inputs, train without network, measure outputs, quote."""
    from aicert.flows.output_target import OutputTargetError, check_output_target
    from aicert.guest_runtime.config import ConfigError, load_config

    # Bad input is exit code 2, before anything is provisioned. What the user wrote is
    # printed with markup off: a regex's [a-z0-9] is not a rich style tag.
    try:
        load_config(config)
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
    from aicert.flows.flows import certify_training
    from aicert.flows.providers import PROVIDERS

    if provider not in PROVIDERS:
        error_console.print(f"[red]--provider {provider!r}: choose from {sorted(PROVIDERS)}[/red]")
        raise typer.Exit(2)
    try:
        result = certify_training(
            config_path=str(config),
            provider=provider,
            output_bom=str(output_bom),
            outputs_dir=str(outputs_dir) if outputs_dir else None,
        )
    except Exception as exc:
        error_console.print(
            f"[bold red]certification failed[/bold red]: {escape(str(exc))}", soft_wrap=True
        )
        raise typer.Exit(1) from None
    console.print(
        f"[bold green]certified[/bold green] run {result['run_id']}: "
        f"{result['certificate']['path']} (sha256 {result['certificate']['sha256'][:16]}...)"
    )
    if result.get("workspace"):
        console.print(f"outputs and logs: {result['workspace']}")


@image_app.command("build-base")
def build_base(
    name: Annotated[str, typer.Option(help="Image name.")] = "aicert/python-base:bookworm",
    force: Annotated[bool, typer.Option(help="Rebuild even if the image exists.")] = False,
) -> None:
    """Build the offline Debian bookworm Python base image (debootstrap + docker import)."""
    from aicert.guest_runtime.base_image import build_base_image

    with console.status("building the base image (debootstrap)...") as status:

        def progress(line: str) -> None:
            status.update(f"building the base image: {line[:100]}")

        image_id = build_base_image(name, progress=progress, force=force)
    console.print(f"[green]base image ready[/green] {name} {image_id}")


def register(app: typer.Typer) -> None:
    import importlib.util

    from aicert.flows.qemu_image import build_guest_command

    image_app.command("build-guest")(build_guest_command)

    app.command(name="run")(run)
    app.add_typer(image_app, name="image")
    if importlib.util.find_spec("azure.mgmt.compute") is not None:
        from aicert.flows.azure_cleanup import azure_app

        app.add_typer(azure_app, name="azure", help="Azure provider maintenance.")
