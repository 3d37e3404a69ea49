"""Building the ``qemu`` guest image: cached inputs, the root, the initramfs, the manifest.

``build_guest_image`` makes, offline from the cached Debian packages and wheels (fetched on
first use), the kernel and initramfs described in ``image``'s docstring, and writes their
reference-value set with the predicted digests (kernel, initrd, command line);
``observe.observe_reference_values`` adds what a real boot measured.

Reproducible: the Debian root comes from ``mmdebstrap`` with ``SOURCE_DATE_EPOCH``, Python
files are compiled to hash-based ``.pyc`` and the cpio is written with fixed metadata
(``initramfs``). The package lists are fetched once and kept (``cache/``), so a rebuild from
the same inputs gives the same digests, hence the same image id.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from aicert.errors import PlatformError
from aicert.guest_runtime.hostutil import file_lock
from aicert.hashing import sha256_file
from aicert.reference_values import (
    REFERENCE_VALUES_FORMAT,
    ReferenceValueSet,
    load_options_digest,
    load_reference_values,
)
from aicert.tasks.platforms.qemu.debian import (
    debian_root,
    extract_root,
    install_kernel,
    installed_packages,
)
from aicert.tasks.platforms.qemu.image import (
    IMAGE_INITRD,
    IMAGE_KERNEL,
    IMAGE_MANIFEST,
    LATEST_FILE,
    GuestImage,
    guest_images_dir,
    image_id_for,
    write_reference_values,
)
from aicert.tasks.platforms.qemu.initramfs import compile_python, configure_root, pack_initrd
from aicert.tasks.platforms.qemu.recipe import (
    DEFAULT_SECURITY_MIRROR,
    DEFAULT_SOURCE_DATE_EPOCH,
    KERNEL_COMMAND_LINE,
    OVMF_INITRD_OPTION,
    RECIPE_VERSION,
    BuildInputs,
    ProgressCallback,
    default_project_root,
)
from aicert.tasks.platforms.qemu.wheels import (
    guest_python_pins,
    install_python,
    pinned_wheels,
    project_wheel,
)

BUILD_LOCK = ".build.lock"


def default_inputs(
    project_root: Path | None = None,
    mirror: str | None = None,
    security_mirror: str | None = DEFAULT_SECURITY_MIRROR,
) -> BuildInputs:
    """The inputs of a build here: this source tree (or ``project_root``), the host's Debian
    mirror (or ``mirror``), ``$SOURCE_DATE_EPOCH`` or the recipe's, the installed pins."""
    from aicert.tasks.platforms.base_image import find_debian_mirror

    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", DEFAULT_SOURCE_DATE_EPOCH))
    return BuildInputs(
        project_root=(project_root or default_project_root()).resolve(),
        mirror=mirror or find_debian_mirror(),
        security_mirror=security_mirror,
        source_date_epoch=epoch,
        python_pins=guest_python_pins(),
    )


def prepare_inputs(
    inputs: BuildInputs,
    home: Path | None = None,
    progress: ProgressCallback | None = None,
    *,
    refresh: bool = False,
) -> tuple[Path, Path]:
    """The cached Debian root (with the kernel packages) and wheels for ``inputs``, fetched
    on first use: (debian folder, wheels folder)."""
    cache = guest_images_dir(home) / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    if refresh:
        shutil.rmtree(cache / f"debian-{inputs.debian_key()}", ignore_errors=True)
    return debian_root(inputs, cache, progress), pinned_wheels(inputs, cache, progress)


def assemble_image(
    inputs: BuildInputs,
    debian: Path,
    wheels: Path,
    destination: Path,
    progress: ProgressCallback | None = None,
) -> tuple[str, str, dict[str, Any]]:
    """Make ``vmlinuz`` and ``initrd.img`` in ``destination`` from cached inputs.

    Returns:
        The kernel's SHA-256, the initrd's SHA-256 and the provenance for the manifest.
    """
    destination.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="aicert-guest-") as scratch:
        work = Path(scratch)
        root = work / "root"
        if progress:
            progress("assembling the guest root")
        extract_root(debian / "root.tar", root)
        project_wheels = project_wheel(inputs, work, progress)
        install_python(inputs, root, wheels, project_wheels, progress)
        package, version, modules = install_kernel(debian, root, destination, work)
        configure_root(root, modules)
        compile_python(root, progress)
        if progress:
            progress("packing the initramfs (sorted newc cpio, gzip -1)")
        initrd_sha256 = pack_initrd(root, destination / IMAGE_INITRD, inputs.source_date_epoch)
        provenance = {
            "recipe_version": RECIPE_VERSION,
            "source_date_epoch": inputs.source_date_epoch,
            "apt_sources": inputs.apt_sources(),
            "kernel_package": f"{package}={version}",
            "kernel_modules": modules,
            "debian_packages": installed_packages(root),
            "python_packages": list(inputs.python_pins),
            "aicert_version": importlib.metadata.version("aicert"),
        }
    return sha256_file(destination / IMAGE_KERNEL)[0], initrd_sha256, provenance


def _existing_reference(manifest: Path) -> ReferenceValueSet | None:
    """The reference values already kept for an image, if readable (an older recipe's
    manifest is not: the image folder is then replaced)."""
    if not manifest.is_file():
        return None
    try:
        return load_reference_values(manifest, platform="qemu")
    except PlatformError:
        return None


def _predicted_reference(
    kernel_sha256: str, initrd_sha256: str, provenance: dict[str, Any]
) -> ReferenceValueSet:
    """The reference values a build predicts (no PCR values: those are observed)."""
    load_options = KERNEL_COMMAND_LINE + OVMF_INITRD_OPTION
    return ReferenceValueSet(
        format=REFERENCE_VALUES_FORMAT,
        id=image_id_for(kernel_sha256, initrd_sha256, KERNEL_COMMAND_LINE),
        platform="qemu",
        kernel_sha256=kernel_sha256,
        initrd_sha256=initrd_sha256,
        command_line=KERNEL_COMMAND_LINE,
        load_options=load_options,
        load_options_sha256=load_options_digest(load_options).hex(),
        build=provenance,
    )


def _keep(staging: Path, images: Path, reference: ReferenceValueSet) -> ReferenceValueSet:
    """Move a staged image to its id's folder (or keep the same image already there, with
    its observed values), write its manifest and name it ``latest``."""
    final = images / reference.id
    existing = _existing_reference(final / IMAGE_MANIFEST)
    if existing is not None:
        # The same image again (reproducible): keep its observed values.
        reference = existing.model_copy(update={"build": reference.build})
    else:
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        final.chmod(0o755)
    write_reference_values(reference, final / IMAGE_MANIFEST)
    (images / LATEST_FILE).write_text(reference.id + "\n", encoding="utf-8")
    return reference


def build_guest_image(
    home: Path | None = None,
    *,
    inputs: BuildInputs | None = None,
    progress: ProgressCallback | None = None,
    refresh: bool = False,
) -> GuestImage:
    """Build the guest image (reusing cached Debian packages and wheels) and write its
    reference-value set with the predicted digests; ``observe_reference_values`` adds the
    observed PCR values. ``refresh`` fetches the Debian packages again (newer versions).

    Raises:
        GuestImageError: a build step failed.
    """
    inputs = inputs or default_inputs()
    images = guest_images_dir(home)
    images.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with file_lock(images / BUILD_LOCK):
        debian, wheels = prepare_inputs(inputs, home, progress, refresh=refresh)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=images))
        try:
            kernel_sha256, initrd_sha256, provenance = assemble_image(
                inputs, debian, wheels, staging, progress
            )
            provenance["build_seconds"] = round(time.monotonic() - started, 1)
            predicted = _predicted_reference(kernel_sha256, initrd_sha256, provenance)
            reference = _keep(staging, images, predicted)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    final = images / reference.id
    if progress:
        progress(
            f"guest image {reference.id}: initrd {initrd_sha256[:16]}... "
            f"({(final / IMAGE_INITRD).stat().st_size / 1e6:.0f} MB), "
            f"{time.monotonic() - started:.0f} s"
        )
    return GuestImage(final.resolve(), reference)
