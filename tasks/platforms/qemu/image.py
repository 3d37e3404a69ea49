"""The guest image of the ``qemu`` platform: a Debian kernel and an initramfs with the agent.

An image is a folder ``$AICERT_HOME/guest-images/<image id>/`` holding:

- ``vmlinuz``: Debian bookworm's cloud kernel (``linux-image-cloud-amd64``), unchanged;
- ``initrd.img``: a gzip'ed newc cpio of a Debian minbase root (python3, libtss2, busybox,
  Debian's Docker engine without its CLIs) with the verifier (``aicert``) and the guest
  runtime (``aicert.guest_runtime``) installed, the few kernel modules the VM needs, and
  ``/init`` (``guest/init.sh``), which mounts proc/sys/securityfs/cgroup2, configures the
  virtio NIC for qemu's user-mode network, starts dockerd on its unix socket only and runs
  the guest agent on port 8080 with ``--platform qemu --tcti device:/dev/tpmrm0``: nothing
  else runs or listens on the network;
- ``reference-values.json``: the reference-value set (``aicert.reference_values``) with the
  kernel, initrd and command line digests; ``observe.observe_reference_values`` boots the
  image once and adds the PCR 0-9 values and the kernel's PCR 4 digest, flagged ``observed``.

``latest`` names the last image built. This module finds and loads images (the provider and
the CLI import it: it stays cheap); the build is spread over the package's other modules:
``recipe`` (pins and inputs), ``debian`` (root and kernel), ``wheels`` (Python packages),
``initramfs`` (the guest's files, .pyc, the cpio), ``build`` (the whole build), ``observe``
(the observation boot) and ``command`` (``aicert image build-guest``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from pathlib import Path

from aicert.hashing import sha256_file
from aicert.reference_values import ReferenceValueSet, load_reference_values
from aicert.tasks.platforms.settings import aicert_home

IMAGE_KERNEL = "vmlinuz"
IMAGE_INITRD = "initrd.img"
IMAGE_MANIFEST = "reference-values.json"
LATEST_FILE = "latest"
IMAGE_ID_PATTERN = re.compile(r"^qemu-[0-9a-f]{16}$")


class GuestImageError(RuntimeError):
    """The guest image could not be built, found or observed."""


@dataclasses.dataclass(frozen=True)
class GuestImage:
    """A built image: its files and its reference-value set.

    Attributes:
        directory: The image's folder.
        reference: Its reference-value set (``reference-values.json``).
    """

    directory: Path
    reference: ReferenceValueSet

    @property
    def id(self) -> str:
        """The image id (``qemu-`` and 16 hex digits of its digests)."""
        return self.reference.id

    @property
    def kernel(self) -> Path:
        """The kernel the VM boots."""
        return self.directory / IMAGE_KERNEL

    @property
    def initrd(self) -> Path:
        """The initramfs the VM boots."""
        return self.directory / IMAGE_INITRD

    @property
    def manifest(self) -> Path:
        """The image's reference-value set."""
        return self.directory / IMAGE_MANIFEST

    @property
    def command_line(self) -> str:
        """The kernel command line the VM gets."""
        return self.reference.command_line


def guest_images_dir(home: Path | None = None) -> Path:
    """Where images are kept: ``<home>/guest-images`` (``$AICERT_HOME`` by default)."""
    return (home or aicert_home()) / "guest-images"


def load_guest_image(image: str | Path | None = None, home: Path | None = None) -> GuestImage:
    """An image by id, by folder or manifest path, or (None) the last one built.

    Raises:
        GuestImageError: there is no such image, or its files do not match its manifest.
    """
    root = guest_images_dir(home)
    if image is None:
        try:
            image = (root / LATEST_FILE).read_text(encoding="utf-8").strip()
        except OSError:
            raise GuestImageError(
                f"no guest image in {root}: build one with `aicert image build-guest`"
            ) from None
    candidate = Path(image)
    if isinstance(image, str) and IMAGE_ID_PATTERN.match(image):
        candidate = root / image
    if candidate.is_file():
        candidate = candidate.parent
    manifest = candidate / IMAGE_MANIFEST
    if not manifest.is_file():
        raise GuestImageError(f"{candidate} holds no guest image ({IMAGE_MANIFEST} missing)")
    reference = load_reference_values(manifest, platform="qemu")
    built = GuestImage(candidate.resolve(), reference)
    for path, expected in (
        (built.kernel, reference.kernel_sha256),
        (built.initrd, reference.initrd_sha256),
    ):
        if not path.is_file():
            raise GuestImageError(f"{path} is missing")
        if sha256_file(path)[0] != expected:
            raise GuestImageError(f"{path} does not match its manifest (modified after build?)")
    return built


def image_id_for(kernel_sha256: str, initrd_sha256: str, command_line: str) -> str:
    """The id of the image with these digests and command line."""
    material = f"{kernel_sha256}\n{initrd_sha256}\n{command_line}\n".encode()
    return "qemu-" + hashlib.sha256(material).hexdigest()[:16]


def write_reference_values(reference: ReferenceValueSet, path: Path) -> None:
    """Write ``reference`` to ``path`` atomically (a reader never sees half a manifest)."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(reference.model_dump_json(indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)
