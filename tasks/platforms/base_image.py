"""The offline Python base image that training images are built on.

No image registry is reachable from these machines, so the base image is bootstrapped from the
Debian mirror the host already uses: ``debootstrap`` makes a minimal bookworm root with Python,
a non-root ``aicert`` user (uid 1000) and the ``/workspace`` folders are added, and the tree is
imported into Docker with ``docker import``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors

from aicert.guest_runtime.hostutil import ProgressCallback, file_lock, run_streaming

DEFAULT_BASE_IMAGE = "aicert/python-base:bookworm"
DEBIAN_SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3", "python3-venv", "python3-pip", "ca-certificates")

TRAINING_UID = 1000
TRAINING_GID = 1000
TRAINING_USER = "aicert"

# Bump when the recipe below changes: an image with another value is rebuilt, not reused.
RECIPE_LABEL = "org.aicert.base-image.recipe"
RECIPE_VERSION = "1"

IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
WORKSPACE_DIRS = ("workspace/src", "workspace/resources", "workspace/outputs")

# Serialises builds between processes (parallel test sessions, several flows on one host):
# two concurrent debootstraps would both succeed but waste a minute and race on the tag.
BUILD_LOCK_PATH = Path(tempfile.gettempdir()) / "aicert-base-image.lock"


class BaseImageError(RuntimeError):
    """The base image could not be built (debootstrap, import or Docker failure)."""


def _docker_client(timeout: int = 900) -> docker.DockerClient:
    try:
        client = docker.from_env(timeout=timeout)
        client.ping()
    except docker.errors.DockerException as exc:
        raise BaseImageError(f"the Docker engine is not reachable: {exc}") from exc
    return client


def find_debian_mirror(
    sources_paths: tuple[Path, ...] = (
        Path("/etc/apt/sources.list.d/debian.sources"),
        Path("/etc/apt/sources.list"),
    ),
) -> str:
    """The host's Debian mirror URI (deb822 ``URIs:`` or a one-line ``deb`` entry).

    Security and ``-updates`` archives are skipped: debootstrap needs the main archive.
    """
    for path in sources_paths:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            continue
        mirror = _mirror_from_deb822(text) if path.suffix == ".sources" else _mirror_from_list(text)
        if mirror:
            return mirror
    return DEFAULT_MIRROR


def _mirror_from_deb822(text: str) -> str | None:
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if DEBIAN_SUITE not in fields.get("suites", "").split():
            continue
        uris = fields.get("uris", "").split()
        if uris:
            return uris[0]
    return None


def _mirror_from_list(text: str) -> str | None:
    for line in text.splitlines():
        line = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0])
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "deb" and parts[2] == DEBIAN_SUITE:
            return parts[1]
    return None


def _existing_image_id(client: docker.DockerClient, name: str) -> str | None:
    """The ID of ``name`` if it exists and was made by this recipe version."""
    try:
        image = client.images.get(name)
    except docker.errors.ImageNotFound:
        return None
    except docker.errors.DockerException as exc:
        raise BaseImageError(f"cannot inspect image {name}: {exc}") from exc
    labels = (image.attrs.get("Config") or {}).get("Labels") or {}
    if labels.get(RECIPE_LABEL) != RECIPE_VERSION:
        return None
    return str(image.id)


def _run(argv: list[str], progress: ProgressCallback | None) -> None:
    env = {"DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
    run_streaming(argv, progress, env=env, error=BaseImageError)


def _add_training_user(rootfs: Path) -> None:
    """Add the ``aicert`` user and group (uid/gid 1000) and the ``/workspace`` folders.

    Written directly into the files because ``useradd`` would have to run chrooted.
    """
    etc = rootfs / "etc"
    passwd_line = (
        f"{TRAINING_USER}:x:{TRAINING_UID}:{TRAINING_GID}:AICert training:"
        f"/home/{TRAINING_USER}:/bin/sh\n"
    )
    for name, line in (
        ("passwd", passwd_line),
        ("group", f"{TRAINING_USER}:x:{TRAINING_GID}:\n"),
        ("shadow", f"{TRAINING_USER}:!:19000::::::\n"),
        ("gshadow", f"{TRAINING_USER}:!::\n"),
    ):
        path = etc / name
        existing = path.read_text(encoding="utf-8") if path.exists() else ""
        if any(entry.split(":", 1)[0] == TRAINING_USER for entry in existing.splitlines()):
            continue
        if existing and not existing.endswith("\n"):
            existing += "\n"
        path.write_text(existing + line, encoding="utf-8")
    home = rootfs / "home" / TRAINING_USER
    home.mkdir(parents=True, exist_ok=True)
    os.chown(home, TRAINING_UID, TRAINING_GID)
    home.chmod(0o755)
    for relative in WORKSPACE_DIRS:
        folder = rootfs / relative
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o755)
    os.chown(rootfs / "workspace" / "outputs", TRAINING_UID, TRAINING_GID)


def _strip_caches(rootfs: Path) -> None:
    # Package lists and downloaded .debs are useless in an offline image and cost ~40 MB.
    for pattern in ("var/cache/apt/archives/*.deb", "var/lib/apt/lists/*"):
        for path in rootfs.glob(pattern):
            if path.is_file() and not path.is_symlink():
                path.unlink()


def _mounts_below(folder: Path) -> list[str]:
    prefix = str(folder).rstrip("/") + "/"
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        points = [line.split()[1] for line in mounts if line.split()]
    # Octal escapes (\040 for space) never occur in our mkdtemp names; compare as is.
    return sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True)


def _remove_rootfs(rootfs: Path) -> None:
    """Delete the temporary root, after unmounting what debootstrap may have left mounted.

    A failed debootstrap can leave /proc or /sys mounted inside the target; deleting through
    those would touch the host, so a mount that cannot be unmounted stops the cleanup.
    """
    for mount_point in _mounts_below(rootfs):
        subprocess.run(["umount", "--lazy", mount_point], check=False, capture_output=True)
    remaining = _mounts_below(rootfs)
    if remaining:
        raise BaseImageError(f"not removing {rootfs}: still mounted: {remaining}")
    shutil.rmtree(rootfs, ignore_errors=False)


def _tar_chunks(rootfs: Path, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    with subprocess.Popen(
        ["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        assert proc.stdout is not None
        while chunk := proc.stdout.read(chunk_size):
            yield chunk
        stderr = proc.stderr.read() if proc.stderr else b""
        if proc.wait() != 0:
            raise BaseImageError(f"tar of {rootfs} failed: {stderr.decode(errors='replace')}")


def build_base_image(
    name: str = DEFAULT_BASE_IMAGE,
    *,
    mirror: str | None = None,
    progress: ProgressCallback | None = None,
    force: bool = False,
) -> str:
    """Build (or reuse) the offline Python base image; return its image ID.

    The image is reused when ``name`` exists and carries this recipe's label, unless
    ``force``. Root privileges are needed (debootstrap, chown to uid 1000).
    """
    client = _docker_client()
    with file_lock(Path(BUILD_LOCK_PATH)):
        if not force:
            existing = _existing_image_id(client, name)
            if existing is not None:
                return existing
        if shutil.which("debootstrap") is None:
            raise BaseImageError("debootstrap is not installed (apt-get install debootstrap)")
        mirror = mirror or find_debian_mirror()
        rootfs = Path(tempfile.mkdtemp(prefix="aicert-rootfs-"))
        try:
            _run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    "--include=" + ",".join(BASE_PACKAGES),
                    DEBIAN_SUITE,
                    str(rootfs),
                    mirror,
                ],
                progress,
            )
            _add_training_user(rootfs)
            _strip_caches(rootfs)
            if progress is not None:
                progress(f"I: importing {rootfs} as {name}")
            repository, _, tag = name.rpartition(":") if ":" in name else (name, "", "latest")
            if "/" in tag:  # a registry port, not a tag: "host:5000/repo"
                repository, tag = name, "latest"
            changes = [
                f"ENV PATH={IMAGE_PATH}",
                "ENV LANG=C.UTF-8",
                # Unbuffered output: training logs reach the Prefect UI as they are written.
                "ENV PYTHONUNBUFFERED=1",
                "WORKDIR /workspace",
                f"LABEL {RECIPE_LABEL}={RECIPE_VERSION}",
                'CMD ["python3"]',
            ]
            try:
                client.api.import_image_from_stream(
                    _tar_chunks(rootfs), repository=repository, tag=tag, changes=changes
                )
                image_id = str(client.images.get(name).id)
            except docker.errors.DockerException as exc:
                raise BaseImageError(f"docker import of {name} failed: {exc}") from exc
        finally:
            _remove_rootfs(rootfs)
        if progress is not None:
            progress(f"I: built {name} ({image_id})")
        return image_id


def ensure_base_image(
    name: str = DEFAULT_BASE_IMAGE, *, progress: ProgressCallback | None = None
) -> str:
    """The base image's ID, building it first if it is missing or stale."""
    return build_base_image(name, progress=progress, force=False)
