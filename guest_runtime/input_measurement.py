"""The run's inputs into PCR 14: base image, source, resources, then the dependencies.

Each input is fetched (or read from the staged inputs on a machine without network), checked
against what the configuration pins, and measured in a fixed order, so that the certificate's
event log replays to the quoted PCR 14. The callers run these inside ``measuring_step``: a
failure part-way leaves the run uncertifiable.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from aicert.appevents import (
    CertifiedResourceEvent,
    ImageEvent,
    PackageEvent,
    ResourceEvent,
    SourceEvent,
)
from aicert.guest_runtime import gitsource
from aicert.guest_runtime.config import Resource
from aicert.guest_runtime.download import download
from aicert.guest_runtime.errors import (
    AgentError,
    DependencyError,
    DownloadError,
    InputMismatchError,
    SourceError,
)
from aicert.guest_runtime.run_state import Measurer, RunState, training_image_tag
from aicert.guest_runtime.writeback import write_behind
from aicert.hashing import sha256_file, tree_sha256

# Docker API timeouts: inspecting an image is quick, loading a staged one is not.
INSPECT_TIMEOUT_S = 120
LOAD_TIMEOUT_S = 600


def measure_inputs(measurer: Measurer, run: RunState, staged_inputs: Path | None) -> None:
    """Base image, source and resources into PCR 14, in that order.

    ``staged_inputs``: the tar the orchestrator staged for a machine without network (read
    first); None: the agent fetches the inputs itself.
    """
    # What is copied in now reaches the disk while it is hashed, not in ``docker create``.
    with write_behind(run.workspace):
        if staged_inputs is not None:
            _unpack_staged_inputs(measurer, run, staged_inputs)
        _measure_base_image(measurer, run)
        _fetch_source(measurer, run)
        for resource in run.config.resources:
            _fetch_resource(measurer, run, resource)


def _measure_base_image(measurer: Measurer, run: RunState) -> None:
    import docker

    client = docker.from_env(timeout=INSPECT_TIMEOUT_S)
    try:
        image = client.images.get(run.config.image)
    except docker.errors.ImageNotFound:
        raise AgentError(
            f"image: {run.config.image!r} is not on this machine "
            "(build the default one with `aicert image build-base`)"
        ) from None
    except docker.errors.DockerException as exc:
        raise AgentError(f"image: the Docker engine cannot be reached: {exc}") from None
    finally:
        client.close()
    run.base_image_id = str(image.id)
    measurer.measure(run, ImageEvent(role="base", name=run.config.image, image_id=str(image.id)))


def _device_size(path: Path) -> int:
    """Bytes in a file or block device (st_size is 0 for a device)."""
    with path.open("rb") as handle:
        return handle.seek(0, os.SEEK_END)


def _unpack_staged_inputs(measurer: Measurer, run: RunState, staged_inputs: Path) -> None:
    import docker

    from aicert.guest_runtime.staged_inputs import StagedInputsError, unpack_staged_inputs

    client = docker.from_env(timeout=LOAD_TIMEOUT_S)
    size = _device_size(staged_inputs)
    measurer.progress(f"reading staged inputs from {staged_inputs} ({size / 1e6:.1f} MB)")

    def load_image(chunks: Iterator[bytes]) -> list[str]:
        try:
            images = client.images.load(chunks)
        except docker.errors.DockerException as exc:
            raise AgentError(f"image: the staged image does not load: {exc}") from exc
        return [tag for image in images for tag in image.tags]

    measurer.work.begin("reading staged inputs", size)
    try:
        run.staged = unpack_staged_inputs(
            staged_inputs, run.workspace / "staged", load_image, on_bytes=measurer.work.advance
        )
    except StagedInputsError as exc:
        raise InputMismatchError(str(exc)) from exc
    finally:
        measurer.work.end()
        client.close()
    loaded = ", ".join(run.staged.loaded_images)
    measurer.progress(f"staged inputs read; image loaded as {loaded}")


def _staged_checkout(run: RunState) -> tuple[Path, str]:
    """The staged source tree and its commit, which the tree is shown to be."""
    from aicert.guest_runtime.staged_inputs import StagedInputsError, verified_commit

    assert run.staged is not None
    tree, commit_file = run.staged.source_tree, run.staged.source_commit
    if not tree.is_dir() or not commit_file.is_file():
        raise SourceError("source: the staged inputs carry no source tree and commit")
    try:
        return tree, verified_commit(commit_file.read_bytes(), tree)
    except StagedInputsError as exc:
        raise SourceError(str(exc)) from exc


def _clone_source(measurer: Measurer, run: RunState) -> tuple[Path, str]:
    source = run.config.source
    checkout = run.workspace / "checkout"
    measurer.progress(f"fetching source {source.git_repo} ({source.ref or 'default branch'})")
    try:
        commit = gitsource.clone_source(source, checkout)
    except gitsource.SourceError as exc:
        raise SourceError(str(exc)) from None
    shutil.rmtree(checkout / ".git")
    return checkout, commit


def _fetch_source(measurer: Measurer, run: RunState) -> None:
    source = run.config.source
    if run.staged is not None:
        checkout, commit = _staged_checkout(run)
        if source.commit and not commit.startswith(source.commit):
            raise SourceError(f"source.commit: {source.commit} but the staged commit is {commit}")
    else:
        checkout, commit = _clone_source(measurer, run)
    source_dir = checkout
    if source.subdirectory:
        source_dir = (checkout / source.subdirectory).resolve()
        if not source_dir.is_relative_to(checkout.resolve()) or not source_dir.is_dir():
            raise SourceError(f"source.subdirectory: {source.subdirectory!r} is not a folder")
    digests = measurer.hash_tree(source_dir, "hashing source")
    run.source_dir = source_dir
    measurer.measure(
        run,
        SourceEvent(
            type="git",
            url=source.git_repo,
            ref=source.ref,
            subdirectory=source.subdirectory,
            commit=commit,
            tree_sha256=tree_sha256(digests),
            file_count=len(digests),
            size=sum(d.size for d in digests),
        ),
    )


def _take_staged_resource(
    measurer: Measurer, run: RunState, destination: str, target: Path
) -> tuple[str, int]:
    """Move a staged resource to ``target`` and hash it: (sha256 hex, size)."""
    assert run.staged is not None
    staged = run.staged.resource(destination)
    if not staged.is_file() or staged.is_symlink():
        raise DownloadError(f"resources[{destination}]: not in the staged inputs")
    os.replace(staged, target)
    measurer.work.begin(f"hashing {destination}", target.stat().st_size)
    try:
        return sha256_file(target, progress=measurer.work.advance)
    finally:
        measurer.work.end()


def _download_resource(
    measurer: Measurer, url: str, destination: str, target: Path
) -> tuple[str, int]:
    """Download ``url`` to ``target`` while hashing it: (sha256 hex, size)."""
    measurer.work.begin(f"downloading {destination}", None)
    try:
        return download(
            url,
            target,
            progress=measurer.progress,
            on_bytes=measurer.work.advance,
            on_total=measurer.work.set_total,
        )
    finally:
        measurer.work.end()


def _fetch_resource(measurer: Measurer, run: RunState, resource: Resource) -> None:
    url, destination, pinned = resource.url, resource.destination_path, resource.sha256
    target = (run.resources_dir / destination).resolve()
    if not target.is_relative_to(run.resources_dir.resolve()):
        raise AgentError(f"resources: destinationPath {destination!r} leaves the folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    if run.staged is not None:
        digest, size = _take_staged_resource(measurer, run, destination, target)
    else:
        digest, size = _download_resource(measurer, url, destination, target)
    if pinned is not None and digest != pinned:
        pinned_by = "the config pins"
        if resource.certified_by is not None:
            link = resource.certified_by
            pinned_by = f"certificate {link.run_id} certifies {link.output} as"
        raise InputMismatchError(
            f"resources[{destination}]: sha256 of {url} is {digest}, "
            f"but {pinned_by} {pinned}; training will not start"
        )
    measurer.measure(run, _resource_event(resource, digest, size))


def _resource_event(resource: Resource, digest: str, size: int) -> ResourceEvent:
    """The resource's event: a certified resource also binds its parent certificate."""
    url, destination, link = resource.url, resource.destination_path, resource.certified_by
    if link is None:
        return ResourceEvent(url=url, destination=destination, sha256=digest, size=size)
    # The orchestrator verified the parent and pinned the file to its certified output; a
    # link it did not resolve would bind nothing a verifier could follow.
    if not link.resolved or resource.sha256 is None:
        raise InputMismatchError(
            f"resources[{destination}]: certifiedBy {link.certificate} was not verified "
            "by the orchestrator (no certificateSha256, runId or sha256); training will not start"
        )
    assert link.certificate_sha256 is not None and link.run_id is not None
    return CertifiedResourceEvent(
        url=url,
        destination=destination,
        sha256=digest,
        size=size,
        certificate_sha256=link.certificate_sha256,
        run_id=link.run_id,
        output=link.output,
    )


def build_training_image(measurer: Measurer, run: RunState) -> None:
    """The wheels of ``requirements.txt`` into PCR 14, then the training image built on the
    base image with them (measured too); without requirements, the base image is the
    training image.

    With a dependency cache (``$AICERT_DEPENDENCY_CACHE``, set by the local provider),
    cached wheels, a recorded resolution and an image built from the same inputs are reused:
    the events measured are the same as without it."""
    from aicert.guest_runtime import training_image, wheelhouse
    from aicert.guest_runtime.wheel_cache import DependencyCache

    assert run.source_dir is not None and run.base_image_id is not None
    requirements = run.source_dir / "requirements.txt"
    if not (requirements.is_file() and wheelhouse.has_requirements(requirements)):
        run.training_image_id = run.base_image_id
        return
    cache = DependencyCache.from_environment()
    wheel_dir = run.workspace / "wheels"
    try:
        if run.staged is not None:
            wheel_dir = run.staged.wheels
            wheels = wheelhouse.staged_wheelhouse(wheel_dir)
        else:
            wheels = wheelhouse.resolve_wheelhouse(
                requirements,
                wheel_dir,
                python_version=run.config.python_version,
                progress=measurer.progress,
                cache=cache,
            )
    except wheelhouse.WheelhouseError as exc:
        raise DependencyError(f"requirements.txt: {exc}") from exc
    for wheel in wheels:
        measurer.measure(
            run,
            PackageEvent(
                name=wheel.name,
                version=wheel.version,
                filename=wheel.filename,
                sha256=wheel.sha256,
                size=wheel.size,
            ),
        )
    tag = training_image_tag(run.run_id)
    try:
        image_id = training_image.build_training_image(
            run.base_image_id, wheel_dir, wheels, tag=tag, progress=measurer.progress, cache=cache
        )
    except wheelhouse.WheelhouseError as exc:  # the engine's failure, not the inputs'
        raise AgentError(f"training image: {exc}") from exc
    run.training_image_id = image_id
    measurer.measure(run, ImageEvent(role="training", name=tag, image_id=image_id))
