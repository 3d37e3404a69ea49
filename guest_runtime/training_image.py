"""The training image: the measured base image plus a venv holding the measured wheels.

Built offline (the build's network is disabled; pip installs only the copied wheels, checking
each one's SHA-256), FROM the base image's ID. With a ``DependencyCache`` an image built from
the same inputs (base image ID, wheel digests, Dockerfile) is reused instead of built again;
see ``_reusable_image`` for why that is safe. Either way the run measures the image ID it uses.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import requests.exceptions

from aicert.guest_runtime.hostutil import ProgressCallback
from aicert.guest_runtime.wheel_cache import DependencyCache, WheelInfo
from aicert.guest_runtime.wheelhouse import WheelhouseError
from aicert.hashing import sha256_file

VENV_PATH = "/opt/venv"
WHEELS_IN_IMAGE = "/tmp/wheels"  # noqa: S108 - a build-time path inside the image
TRAINING_USER = "1000:1000"
WHEELS_LABEL = "org.aicert.wheels"
# The digest of what the image was built from (``_inputs_digest``), for finding it again.
INPUTS_LABEL = "org.aicert.build-inputs"
# Images built with a cache keep a tag of this repository (named by their inputs digest), so
# that a run's teardown, which removes the run's own tag, does not delete them.
KEPT_REPOSITORY = "aicert/training-cache"

_DOCKER_FAILURES = (docker.errors.DockerException, requests.exceptions.RequestException)


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


def _sorted_wheels(wheels: list[WheelInfo]) -> list[WheelInfo]:
    for wheel in wheels:
        if "/" in wheel.filename or wheel.filename.startswith("."):
            raise WheelhouseError(f"bad wheel file name: {wheel.filename!r}")
    return sorted(wheels, key=lambda wheel: wheel.filename)


def _lock(wheels: list[WheelInfo]) -> str:
    """The requirements file pip installs from inside the build: each file and its digest."""
    return "".join(
        f"{WHEELS_IN_IMAGE}/{wheel.filename} --hash=sha256:{wheel.sha256}\n"
        for wheel in _sorted_wheels(wheels)
    )


def _inputs_digest(base_id: str, wheels: list[WheelInfo], dockerfile: str) -> str:
    """SHA-256 of everything the build reads: the base image ID, the wheels (by digest), the
    Dockerfile and the lock file made from them."""
    inputs = {
        "base_image_id": base_id,
        "wheels": [[wheel.filename, wheel.sha256] for wheel in _sorted_wheels(wheels)],
        "dockerfile": dockerfile,
        "lock": _lock(wheels),
    }
    encoded = json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()


def _stage_context(
    context: Path, wheelhouse: Path, wheels: list[WheelInfo], dockerfile: str
) -> None:
    """Copy the wheels into the build context, checking each against its measured hash."""
    wheel_dir = context / "wheels"
    wheel_dir.mkdir()
    for wheel in _sorted_wheels(wheels):
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
    lock = wheel_dir / "requirements.lock"
    lock.write_text(_lock(wheels), encoding="utf-8")
    os.utime(lock, (0, 0))
    (context / "Dockerfile").write_text(dockerfile, encoding="utf-8")


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


def _build(
    client: docker.DockerClient,
    context: Path,
    tag: str,
    labels: dict[str, str],
    progress: ProgressCallback | None,
) -> str:
    """Run the build of ``context``, streaming its log to ``progress``; the image ID."""
    image_id: str | None = None
    tail: list[str] = []
    try:
        for event in _build_events(client, context, tag, labels):
            if "error" in event:
                detail = event.get("errorDetail", {}).get("message") or event["error"]
                raise WheelhouseError(f"training image build failed: {detail}\n" + "\n".join(tail))
            if "aux" in event and isinstance(event["aux"], dict) and "ID" in event["aux"]:
                image_id = str(event["aux"]["ID"])
            for line in str(event.get("stream", "")).splitlines():
                if line.strip():
                    tail = [*tail[-29:], line]
                    if progress is not None:
                        progress(line)
        if image_id is None:
            image_id = str(client.images.get(tag).id)
    except _DOCKER_FAILURES as exc:
        raise WheelhouseError(f"training image build failed: {exc}") from exc
    return image_id


def _layers(image: dict[str, object]) -> list[object]:
    """The content digests of an image's layers, bottom first (``RootFS.Layers``)."""
    rootfs = image.get("RootFS")
    layers = rootfs.get("Layers") if isinstance(rootfs, dict) else None
    return list(layers) if isinstance(layers, list) else []


def _config_problem(
    image: dict[str, object], base: dict[str, object], labels: dict[str, str]
) -> str | None:
    """What in ``image``'s own configuration says it was not built by this recipe, or None."""
    config = image.get("Config")
    config = config if isinstance(config, dict) else {}
    found = config.get("Labels") or {}
    for name, value in labels.items():
        if not isinstance(found, dict) or found.get(name) != value:
            return f"its label {name} is not this build's"
    if config.get("User") != TRAINING_USER:
        return f"it runs as {config.get('User')!r}, not {TRAINING_USER}"
    image_layers, base_layers = _layers(image), _layers(base)
    if (
        not base_layers
        or len(image_layers) <= len(base_layers)
        or image_layers[: len(base_layers)] != base_layers
    ):
        return "its layers do not start with the measured base image's"
    return None


def _reusable_image(
    client: docker.DockerClient,
    cache: DependencyCache,
    inputs_digest: str,
    base_id: str,
    labels: dict[str, str],
) -> tuple[str | None, str]:
    """The ID of an image this cache recorded as built from ``inputs_digest``, if it is
    still that image; else None. Second: what was found, for the progress log.

    Why this is safe: the image is found by its label and must have the ID the cache recorded
    when the build returned it. An image ID is the SHA-256 of the image's configuration, and
    that configuration holds the labels, the layers' content digests (``RootFS``) and the
    runtime settings: no other image can have the recorded ID, so tags (which anyone with the
    engine can move) are never consulted, and an image labelled for these inputs but built
    elsewhere has another ID and is not used. Its own configuration is still checked (this
    build's labels, user, and the measured base image's layers underneath), so a record that
    names another image (edited, or left from an older recipe) is not trusted either. What
    stays trusted is the engine itself, as for every image this machine builds and runs.
    """
    recorded = cache.read_image(inputs_digest)
    if recorded is None:
        return None, "no training image recorded for these inputs"
    try:
        labelled = client.images.list(filters={"label": f"{INPUTS_LABEL}={inputs_digest}"})
        base = client.images.get(base_id).attrs
    except _DOCKER_FAILURES as exc:
        return None, f"the engine could not list images: {exc}"
    image = next((found for found in labelled if found.id == recorded), None)
    if image is None:
        return None, f"no image labelled for these inputs has the recorded ID {recorded}"
    problem = _config_problem(image.attrs, base, labels)
    if problem is not None:
        return None, f"image {recorded} is not reused: {problem}"
    return recorded, f"reusing training image {recorded}, built from the same inputs"


def _tag(client: docker.DockerClient, image_id: str, tag: str) -> None:
    repository, _, name = tag.rpartition(":")
    try:
        if not client.api.tag(image_id, repository, name, force=True):
            raise WheelhouseError(f"cannot tag image {image_id} as {tag}")
    except _DOCKER_FAILURES as exc:
        raise WheelhouseError(f"cannot tag image {image_id} as {tag}: {exc}") from exc


def build_training_image(
    base_image: str,
    wheelhouse: Path,
    wheels: list[WheelInfo],
    *,
    tag: str,
    progress: ProgressCallback | None = None,
    cache: DependencyCache | None = None,
) -> str:
    """Build the training image: ``base_image`` plus a venv at /opt/venv holding ``wheels``.

    The build has no network (``network_mode="none"``); pip installs from the copied wheels only
    and checks their SHA-256 against ``wheels``. With no wheels the venv is empty. The image runs
    as uid 1000 with the venv first on ``PATH``. Same inputs give the same image ID while
    Docker's build cache holds the layers. With ``cache``, an image recorded there as built
    from the same inputs is tagged ``tag`` and used without a build (``_reusable_image``), and
    a new build is recorded and kept. Returns the image ID.
    """
    try:
        client = docker.from_env(timeout=900)
        base_id = str(client.images.get(base_image).id)
    except docker.errors.ImageNotFound as exc:
        raise WheelhouseError(f"base image not found locally: {base_image}") from exc
    except _DOCKER_FAILURES as exc:
        raise WheelhouseError(f"the Docker engine is not reachable: {exc}") from exc
    with contextlib.closing(client):
        # FROM the ID, not the tag: the image is built on exactly the base that was measured.
        dockerfile = _dockerfile(base_id, wheels)
        digest = _inputs_digest(base_id, wheels, dockerfile)
        wheel_summary = json.dumps(
            sorted([w.filename, w.sha256] for w in wheels), separators=(",", ":")
        )
        labels = {WHEELS_LABEL: wheel_summary, INPUTS_LABEL: digest}
        if cache is not None:
            reused, found = _reusable_image(client, cache, digest, base_id, labels)
            if progress is not None:
                progress(found)
            if reused is not None:
                _tag(client, reused, tag)
                return reused
        with tempfile.TemporaryDirectory(prefix="aicert-build-") as context_dir:
            context = Path(context_dir)
            _stage_context(context, Path(wheelhouse), wheels, dockerfile)
            image_id = _build(client, context, tag, labels, progress)
        if cache is not None:
            _tag(client, image_id, f"{KEPT_REPOSITORY}:{digest}")
            cache.write_image(digest, image_id)
        return image_id
