"""``aicert image build-guest``: build the qemu guest image and observe its boot.

Cheap to import: ``aicert.flows.cli`` registers this command for every ``aicert`` start
(``--help`` included), so the build's modules are imported only when the command runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from aicert.tasks.platforms.qemu.image import GuestImage, GuestImageError


def _build_and_observe(
    observe: bool,
    refresh: bool,
    project_root: Path | None,
    shape: tuple[int, int],
    status: Callable[[str], None],
) -> GuestImage:
    """Build the image and, when asked and needed, observe it on the VM ``shape`` (memory
    in MiB, vCPUs); ``status`` shows what is happening."""
    from aicert.tasks.platforms.qemu.build import build_guest_image, default_inputs
    from aicert.tasks.platforms.qemu.observe import observe_reference_values
    from aicert.tasks.platforms.qemu.provider import QemuProvider

    def progress(line: str) -> None:
        status(f"guest image: {line[:100]}")

    image = build_guest_image(
        inputs=default_inputs(project_root), progress=progress, refresh=refresh
    )
    provider = QemuProvider(image.directory, memory_mib=shape[0], smp=shape[1])
    shape_differs = image.reference.vm is not None and image.reference.vm != provider.vm_shape()
    if observe and (not image.reference.observed or shape_differs):
        status("guest image: booting it once to observe PCR 0-9 (about 50 s)")
        image = observe_reference_values(image.directory, provider=provider, progress=progress)
    return image


def build_guest_command(
    observe: Annotated[
        bool, typer.Option(help="Boot the image once to record its PCR 0-9 values.")
    ] = True,
    refresh: Annotated[
        bool, typer.Option(help="Fetch the Debian packages again (take newer versions).")
    ] = False,
    project_root: Annotated[
        Path | None, typer.Option(help="The aicert source tree to install in the guest.")
    ] = None,
    memory_mib: Annotated[
        int,
        typer.Option(
            help="Guest memory of the VMs that will boot it (part of the observed VM shape; "
            "layers, inputs and outputs go to the run's scratch disk, not RAM)."
        ),
    ] = 2048,
    cpus: Annotated[int, typer.Option(help="Virtual CPUs of the VMs that will boot it.")] = 2,
) -> None:
    """Build the qemu guest image (kernel + initramfs with the agent) and its reference values."""
    from rich.console import Console

    console = Console()
    with console.status("building the guest image...") as status:
        try:
            image = _build_and_observe(
                observe, refresh, project_root, (memory_mib, cpus), status.update
            )
        except (GuestImageError, RuntimeError) as exc:
            console.print(f"[bold red]guest image build failed[/bold red]: {exc}")
            raise typer.Exit(1) from None
    reference = image.reference
    console.print(f"[green]guest image ready[/green] {image.id} in {image.directory}")
    console.print(f"  kernel  sha256 {reference.kernel_sha256}")
    console.print(f"  initrd  sha256 {reference.initrd_sha256}")
    console.print(f"  command line   {reference.command_line!r}")
    state = "observed" if reference.observed else "not observed (--observe to boot it once)"
    console.print(f"  PCR 0-9        {state}")
    console.print(f"  reference values: {image.manifest}")
