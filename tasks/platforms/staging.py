"""Staging a run's inputs on the orchestrator's host for a machine without a network (qemu).

Writes the tar that ``aicert.guest_runtime.staged_inputs`` reads (its docstring has the
layout). Nothing here is trusted by the machine: it recomputes and measures everything from
the bytes (image layers, git tree and commit, resource and wheel digests).
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from aicert.guest_runtime.config import RunConfig
from aicert.guest_runtime.gitsource import clone_source, commit_object
from aicert.guest_runtime.hostutil import ProgressCallback
from aicert.guest_runtime.staged_inputs import (
    IMAGE_ARCHIVE,
    MANIFEST,
    RESOURCES,
    SOURCE_COMMIT,
    SOURCE_TREE,
    STAGED_INPUTS_FORMAT,
    WHEELS,
)
from aicert.guest_runtime.wheel_cache import DependencyCache

log = logging.getLogger(__name__)

SAVE_CHUNK = 4 * 1024 * 1024
PROGRESS_EVERY_S = 5.0


class StagingError(RuntimeError):
    """An input could not be fetched on the host (the message names it)."""


def _save_image(name: str, destination: Path, progress: ProgressCallback) -> int:
    import docker

    client = docker.from_env(timeout=600)
    try:
        try:
            image = client.images.get(name)
        except docker.errors.ImageNotFound:
            raise StagingError(
                f"image: {name!r} is not in this host's Docker engine "
                "(build the default one with `aicert image build-base`)"
            ) from None
        written, last = 0, time.monotonic()
        with destination.open("wb") as output:
            # named=True keeps the tag, so the guest finds the image by its configured name.
            for chunk in image.save(chunk_size=SAVE_CHUNK, named=True):
                output.write(chunk)
                written += len(chunk)
                if time.monotonic() - last > PROGRESS_EVERY_S:
                    last = time.monotonic()
                    progress(f"saving image {name}: {written / 1e6:.0f} MB")
        progress(f"image {name} saved ({written / 1e6:.0f} MB)")
        return written
    except docker.errors.DockerException as exc:
        raise StagingError(f"image: cannot save {name!r}: {exc}") from exc
    finally:
        client.close()


def _requirements(checkout: Path, config: RunConfig) -> Path | None:
    root = checkout / config.source.subdirectory if config.source.subdirectory else checkout
    requirements = root / "requirements.txt"
    return requirements if requirements.is_file() else None


def write_staged_inputs(
    config: RunConfig,
    destination: Path,
    *,
    run_id: str,
    progress: ProgressCallback | None = None,
    dependency_cache: DependencyCache | None = None,
) -> Path:
    """Fetch the inputs of ``config`` and write them as a staged-inputs tar at
    ``destination`` (atomically); wheels through ``dependency_cache`` when given (see
    ``wheelhouse.resolve_wheelhouse``). Returns ``destination``."""
    from aicert.guest_runtime.wheelhouse import (
        WheelhouseError,
        has_requirements,
        resolve_wheelhouse,
    )

    report = progress or (lambda message: log.info("%s", message))
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".staging-", dir=destination.parent) as work_dir:
        work = Path(work_dir)
        image_archive = work / "image.tar"
        _save_image(config.image, image_archive, report)

        report(f"cloning {config.source.git_repo} ({config.source.ref or 'default branch'})")
        checkout = work / "checkout"
        commit = clone_source(config.source, checkout)
        raw_commit = commit_object(checkout)
        shutil.rmtree(checkout / ".git")

        wheels = work / "wheels"
        requirements = _requirements(checkout, config)
        wheel_names: list[str] = []
        if requirements is not None and has_requirements(requirements):
            try:
                found = resolve_wheelhouse(
                    requirements,
                    wheels,
                    python_version=config.python_version,
                    progress=report,
                    cache=dependency_cache,
                )
            except WheelhouseError as exc:
                raise StagingError(f"requirements.txt: {exc}") from exc
            wheel_names = [wheel.filename for wheel in found]

        manifest = {
            "format": STAGED_INPUTS_FORMAT,
            "run_id": run_id,
            "image": config.image,
            "source": {"url": config.source.git_repo, "commit": commit},
            "resources": [resource.destination_path for resource in config.resources],
            "wheels": wheel_names,
        }
        partial = _write_tar(work, manifest, raw_commit, config, report)
        os.replace(partial, destination)
    size = destination.stat().st_size
    report(f"staged inputs for {run_id}: {size / 1e6:.1f} MB at {destination}")
    return destination


def _write_tar(
    work: Path,
    manifest: dict[str, object],
    raw_commit: bytes,
    config: RunConfig,
    report: ProgressCallback,
) -> Path:
    """The staged-inputs tar of what ``work`` holds (image.tar, checkout, wheels) and of
    ``config``'s resources, in the order the guest reads it, as ``work/inputs.tar``."""
    partial = work / "inputs.tar"
    # Each file is copied into the tar SAVE_CHUNK at a time (tarfile's default is 16 KiB):
    # the tar is written from the disk, never held in memory.
    with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT, copybufsize=SAVE_CHUNK) as archive:
        manifest_file = work / MANIFEST
        manifest_file.write_text(json.dumps(manifest, indent=2))
        # Order matters: the guest reads the disk front to back, once.
        archive.add(manifest_file, MANIFEST)
        archive.add(work / "image.tar", IMAGE_ARCHIVE)
        commit_file = work / "commit"
        commit_file.write_bytes(raw_commit)
        archive.add(commit_file, SOURCE_COMMIT)
        archive.add(work / "checkout", SOURCE_TREE)
        for resource in config.resources:
            report(f"downloading {resource.url}")
            member = _resource_member(resource.destination_path)
            _add_resource(archive, member, resource.url, work, report)
        if (work / "wheels").is_dir():
            archive.add(work / "wheels", WHEELS, filter=_wheels_only)
    return partial


def _resource_member(destination_path: str) -> str:
    """The tar member of a resource: ``resources/<destinationPath>``, which must stay in it."""
    relative = posixpath.normpath(destination_path)
    if relative.startswith(("/", "../")) or relative in ("..", "."):
        raise StagingError(f"resources: destinationPath {destination_path!r} leaves the folder")
    return f"{RESOURCES}/{relative}"


class _CountedReader:
    """``read(n)`` of a stream, whole (tarfile takes a short read for the end of the data),
    each read's size passed to ``on_bytes``."""

    def __init__(self, source: BinaryIO, on_bytes: Callable[[int], None]) -> None:
        self._source, self._on_bytes = source, on_bytes

    def read(self, size: int) -> bytes:
        pieces, left = [], size
        while left > 0:
            piece = self._source.read(left)
            if not piece:
                break
            pieces.append(piece)
            left -= len(piece)
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        self._on_bytes(len(data))
        return data


def _add_resource(
    archive: tarfile.TarFile, member: str, url: str, work: Path, report: ProgressCallback
) -> None:
    """Stream ``url`` straight into the tar as ``member``: the tar holds this host's only copy
    of a resource (a size must be known first: a regular file's, an HTTP Content-Length;
    without one it is downloaded beside the tar, added, and removed). A failed try is cut
    off the tar's end and tried again as a download is."""
    from aicert.guest_runtime.download import (
        DownloadProgress,
        download,
        open_resource,
        with_retries,
    )

    start = archive.offset
    assert archive.fileobj is not None

    def undo() -> None:
        # tarfile writes a member's header, then its bytes: whatever a failed try wrote
        # lies past ``start``.
        assert archive.fileobj is not None
        archive.fileobj.seek(start)
        archive.fileobj.truncate()
        archive.offset = start

    def once() -> bool:
        with open_resource(url) as (source, size):
            if size is None:
                return False
            info = tarfile.TarInfo(member)
            info.size, info.mode, info.mtime = size, 0o644, int(time.time())
            progress = DownloadProgress(member, size, report, None)
            archive.addfile(info, _CountedReader(source, progress))
        return True

    if with_retries(url, once, undo=undo, progress=report):
        return
    spooled = work / ".resource-without-size"
    download(url, spooled, progress=report)
    try:
        archive.add(spooled, member)
    finally:
        spooled.unlink()


def _wheels_only(member: tarfile.TarInfo) -> tarfile.TarInfo | None:
    # resolve_wheelhouse downloads through a hidden temporary folder inside the wheel folder.
    if "/." in member.name:
        return None
    return member
