"""Dependencies as measured wheels, installed offline into the training image.

The training container never reaches a network, and containers here cannot reach the package
index anyway (the host's TLS trust store is not theirs). So the agent resolves
``requirements.txt`` on the host with the host's pip configuration, downloading wheels for the
container's interpreter (Debian bookworm: CPython 3.11, glibc 2.36, x86_64) whatever the host
runs. Each wheel's SHA-256 is measured; the image build then installs exactly those files, with
pip checking those hashes, in a build whose network is disabled.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors
import requests.exceptions
from packaging.utils import InvalidWheelFilename, parse_wheel_filename

from aicert.guest_runtime.hostutil import ProgressCallback, run_streaming
from aicert.hashing import sha256_file

# Bookworm's glibc is 2.36: every manylinux_2_N with N <= 36 runs there. pip does not expand
# manylinux_2_N to lower N by itself (only the legacy manylinux2014/2010 aliases), so all are
# listed, with the legacy names for wheels tagged only that way.
GLIBC_MINOR = 36
TARGET_PLATFORMS: tuple[str, ...] = (
    *(f"manylinux_2_{minor}_x86_64" for minor in range(GLIBC_MINOR, 4, -1)),
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
    "linux_x86_64",
)
VENV_PATH = "/opt/venv"
WHEELS_IN_IMAGE = "/tmp/wheels"  # noqa: S108 - a build-time path inside the image
TRAINING_USER = "1000:1000"
WHEELS_LABEL = "org.aicert.wheels"

_DOCKER_FAILURES = (docker.errors.DockerException, requests.exceptions.RequestException)


class WheelhouseError(RuntimeError):
    """Dependencies could not be resolved, or the training image could not be built."""


@dataclass(frozen=True, slots=True)
class WheelInfo:
    """One downloaded wheel: distribution name (normalised), version, file name, SHA-256, size."""

    name: str
    version: str
    filename: str
    sha256: str
    size: int


def has_requirements(requirements: Path) -> bool:
    """Whether the file holds anything but blank lines and comments."""
    for line in requirements.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            return True
    return False


def _run_streaming(argv: list[str], progress: ProgressCallback | None) -> None:
    env = {"PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    run_streaming(
        argv, progress, env=env, error=WheelhouseError, tail_lines=30, what="pip download"
    )


def _wheel_info(path: Path) -> WheelInfo:
    try:
        name, version, _build, _tags = parse_wheel_filename(path.name)
    except InvalidWheelFilename as exc:
        raise WheelhouseError(f"not a wheel file name: {path.name}: {exc}") from exc
    sha256, size = sha256_file(path)
    return WheelInfo(
        name=str(name), version=str(version), filename=path.name, sha256=sha256, size=size
    )


def staged_wheelhouse(folder: Path) -> list[WheelInfo]:
    """The wheels an orchestrator staged in ``folder`` (hashed here), sorted by file name."""
    paths = sorted(folder.iterdir()) if folder.is_dir() else []
    not_wheels = [path.name for path in paths if path.suffix != ".whl" or not path.is_file()]
    if not_wheels:
        raise WheelhouseError(f"staged wheels: files that are not wheels: {not_wheels}")
    return [_wheel_info(path) for path in paths]


def resolve_wheelhouse(
    requirements: Path,
    dest: Path,
    *,
    python_version: str = "3.11",
    progress: ProgressCallback | None = None,
) -> list[WheelInfo]:
    """Download the wheels that satisfy ``requirements`` (dependencies included) into ``dest``.

    Only binary wheels for CPython ``python_version`` on glibc x86_64 are accepted, so that
    they install in the container whatever the host is. Uses the host's pip configuration.
    Returns the wheels sorted by file name; an empty or comment-only file gives ``[]``.
    ``dest`` keeps exactly the returned wheels' files afterwards (older files are removed).
    """
    requirements = Path(requirements)
    if not has_requirements(requirements):
        return []
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    version_tag = python_version.replace(".", "")
    platforms = [arg for platform in TARGET_PLATFORMS for arg in ("--platform", platform)]
    # A fresh folder per call: the result lists what this resolution chose, not leftovers.
    with tempfile.TemporaryDirectory(prefix=".download-", dir=dest) as download_dir:
        _run_streaming(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--requirement",
                str(requirements),
                "--dest",
                download_dir,
                "--only-binary=:all:",
                "--python-version",
                python_version,
                "--implementation",
                "cp",
                "--abi",
                f"cp{version_tag}",
                "--abi",
                "abi3",
                "--abi",
                "none",
                *platforms,
                "--progress-bar",
                "off",
            ],
            progress,
        )
        downloaded = sorted(Path(download_dir).iterdir())
        not_wheels = [path.name for path in downloaded if path.suffix != ".whl"]
        if not_wheels:
            raise WheelhouseError(f"pip downloaded files that are not wheels: {not_wheels}")
        for old in dest.iterdir():
            if old.suffix == ".whl" and (old.is_file() or old.is_symlink()):
                old.unlink()
        wheels: list[WheelInfo] = []
        for path in downloaded:
            final_path = dest / path.name
            os.replace(path, final_path)
            wheels.append(_wheel_info(final_path))
    return wheels


def _dockerfile(base_image: str, wheels: list[WheelInfo]) -> str:
    if wheels:
        # Two stages: the wheels are copied only into the first, so the final image does not
        # carry a layer with all the wheel files on top of the installed packages.
        lines = [
            f"FROM {base_image} AS install",
            f"COPY wheels {WHEELS_IN_IMAGE}",
            # --require-hashes: pip installs only files whose SHA-256 is the measured one.
            f"RUN python3 -m venv {VENV_PATH}"
            f" && {VENV_PATH}/bin/pip install --no-index --no-cache-dir"
            f" --disable-pip-version-check --require-hashes --find-links {WHEELS_IN_IMAGE}"
            f" --requirement {WHEELS_IN_IMAGE}/requirements.lock",
            f"FROM {base_image}",
            f"COPY --from=install {VENV_PATH} {VENV_PATH}",
        ]
    else:
        lines = [f"FROM {base_image}", f"RUN python3 -m venv {VENV_PATH}"]
    lines += [
        f"ENV PATH={VENV_PATH}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        f"ENV VIRTUAL_ENV={VENV_PATH}",
        "WORKDIR /workspace/src",
        f"USER {TRAINING_USER}",
    ]
    return "\n".join(lines) + "\n"


def _stage_context(
    context: Path, wheelhouse: Path, base_image: str, wheels: list[WheelInfo]
) -> None:
    """Copy the wheels into the build context, checking each against its measured hash."""
    wheel_dir = context / "wheels"
    wheel_dir.mkdir()
    lock_lines = []
    for wheel in sorted(wheels, key=lambda w: w.filename):
        if "/" in wheel.filename or wheel.filename.startswith("."):
            raise WheelhouseError(f"bad wheel file name: {wheel.filename!r}")
        staged = wheel_dir / wheel.filename
        shutil.copyfile(wheelhouse / wheel.filename, staged)
        # Fixed mtime and mode: the build cache keys on content, and so does the image ID.
        os.utime(staged, (0, 0))
        staged.chmod(0o644)
        sha256, size = sha256_file(staged)
        if (sha256, size) != (wheel.sha256, wheel.size):
            raise WheelhouseError(
                f"{wheel.filename} changed since it was measured: "
                f"sha256 {sha256} size {size}, measured {wheel.sha256} size {wheel.size}"
            )
        lock_lines.append(f"{WHEELS_IN_IMAGE}/{wheel.filename} --hash=sha256:{wheel.sha256}\n")
    lock = wheel_dir / "requirements.lock"
    lock.write_text("".join(lock_lines), encoding="utf-8")
    os.utime(lock, (0, 0))
    (context / "Dockerfile").write_text(_dockerfile(base_image, wheels), encoding="utf-8")


def _build_events(
    client: docker.DockerClient, context: Path, tag: str, labels: dict[str, str]
) -> Iterator[dict]:
    return client.api.build(
        path=str(context),
        tag=tag,
        rm=True,
        forcerm=True,
        pull=False,
        network_mode="none",
        labels=labels,
        decode=True,
    )


def build_training_image(
    base_image: str,
    wheelhouse: Path,
    wheels: list[WheelInfo],
    *,
    tag: str,
    progress: ProgressCallback | None = None,
) -> str:
    """Build the training image: ``base_image`` plus a venv at /opt/venv holding ``wheels``.

    The build has no network (``network_mode="none"``); pip installs from the copied wheels only
    and checks their SHA-256 against ``wheels``. With no wheels the venv is empty. The image runs
    as uid 1000 with the venv first on ``PATH``. Same inputs give the same image ID while
    Docker's build cache holds the layers. Returns the image ID.
    """
    try:
        client = docker.from_env(timeout=900)
        base_id = str(client.images.get(base_image).id)
    except docker.errors.ImageNotFound as exc:
        raise WheelhouseError(f"base image not found locally: {base_image}") from exc
    except _DOCKER_FAILURES as exc:
        raise WheelhouseError(f"the Docker engine is not reachable: {exc}") from exc
    wheel_summary = json.dumps(
        sorted([w.filename, w.sha256] for w in wheels), separators=(",", ":")
    )
    with tempfile.TemporaryDirectory(prefix="aicert-build-") as context_dir:
        context = Path(context_dir)
        # FROM the ID, not the tag: the image is built on exactly the base that was measured.
        _stage_context(context, Path(wheelhouse), base_id, wheels)
        image_id: str | None = None
        tail: list[str] = []
        try:
            for event in _build_events(client, context, tag, {WHEELS_LABEL: wheel_summary}):
                if "error" in event:
                    detail = event.get("errorDetail", {}).get("message") or event["error"]
                    raise WheelhouseError(
                        f"training image build failed: {detail}\n" + "\n".join(tail)
                    )
                if "aux" in event and isinstance(event["aux"], dict) and "ID" in event["aux"]:
                    image_id = str(event["aux"]["ID"])
                for line in str(event.get("stream", "")).splitlines():
                    if line.strip():
                        tail = [*tail[-29:], line]
                        if progress is not None:
                            progress(line)
        except _DOCKER_FAILURES as exc:
            raise WheelhouseError(f"training image build failed: {exc}") from exc
    if image_id is None:
        try:
            image_id = str(client.images.get(tag).id)
        except _DOCKER_FAILURES as exc:
            raise WheelhouseError(f"the build produced no image {tag}: {exc}") from exc
    return image_id
