"""Training images reused from the dependency cache, and refused when the cache lies.

Real Docker engine and base image; six 1.16.0 from the index. Each tamper test changes one
thing (the record, a tag, an image with the same label) and checks which image the build
returns and what it said.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import pytest

from aicert.guest_runtime.training_image import (
    INPUTS_LABEL,
    KEPT_REPOSITORY,
    WHEELS_LABEL,
    build_training_image,
)
from aicert.guest_runtime.wheel_cache import DependencyCache, WheelInfo
from aicert.guest_runtime.wheelhouse import resolve_wheelhouse

pytestmark = [pytest.mark.docker]

REUSING = "reusing training image"


@pytest.fixture(scope="module")
def six_wheels(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[WheelInfo]]:
    folder = tmp_path_factory.mktemp("wheelhouse")
    requirements = folder / "requirements.txt"
    requirements.write_text("six==1.16.0\n", encoding="utf-8")
    return folder / "wheels", resolve_wheelhouse(requirements, folder / "wheels")


@pytest.fixture
def tags(docker_client: docker.DockerClient) -> Iterator[list[str]]:
    """Tags a test makes (it appends them); removed afterwards, the images with them."""
    made: list[str] = []
    yield made
    for tag in made:
        try:
            docker_client.images.remove(tag, noprune=False)
        except docker.errors.ImageNotFound:
            pass


def new_tag(tags: list[str]) -> str:
    tag = f"aicert-test/train:{uuid.uuid4().hex[:12]}"
    tags.append(tag)
    return tag


@pytest.fixture
def built(
    base_image: str,
    six_wheels: tuple[Path, list[WheelInfo]],
    tmp_path: Path,
    tags: list[str],
    docker_client: docker.DockerClient,
) -> tuple[DependencyCache, str, str]:
    """A cache with one build recorded: (cache, inputs digest, image ID)."""
    folder, wheels = six_wheels
    cache = DependencyCache(tmp_path / "cache")
    image_id = build_training_image(base_image, folder, wheels, tag=new_tag(tags), cache=cache)
    (record,) = (cache.root / "images").iterdir()
    digest = record.stem
    tags.append(f"{KEPT_REPOSITORY}:{digest}")
    return cache, digest, image_id


def build(
    base_image: str,
    six_wheels: tuple[Path, list[WheelInfo]],
    cache: DependencyCache,
    tags: list[str],
) -> tuple[str, list[str]]:
    folder, wheels = six_wheels
    lines: list[str] = []
    image_id = build_training_image(
        base_image, folder, wheels, tag=new_tag(tags), progress=lines.append, cache=cache
    )
    return image_id, lines


def test_same_inputs_reuse_the_image_without_a_build(
    base_image: str,
    six_wheels: tuple[Path, list[WheelInfo]],
    built: tuple[DependencyCache, str, str],
    tags: list[str],
    docker_client: docker.DockerClient,
) -> None:
    cache, digest, image_id = built
    labels = docker_client.images.get(image_id).labels
    assert labels[INPUTS_LABEL] == digest and WHEELS_LABEL in labels
    # The run's tag goes at teardown; the kept tag holds the image for the next run.
    docker_client.images.remove(tags[0])
    assert f"{KEPT_REPOSITORY}:{digest}" in docker_client.images.get(image_id).tags

    reused, lines = build(base_image, six_wheels, cache, tags)

    assert reused == image_id
    assert any(line.startswith(REUSING) for line in lines)
    assert not any(line.startswith("Step ") for line in lines)  # no build ran
    assert tags[-1] in docker_client.images.get(image_id).tags  # the run's own tag


def test_other_wheels_are_other_inputs(
    base_image: str,
    six_wheels: tuple[Path, list[WheelInfo]],
    built: tuple[DependencyCache, str, str],
    tags: list[str],
) -> None:
    cache, digest, image_id = built
    other, lines = build(base_image, (Path("/nonexistent"), []), cache, tags)
    assert other != image_id
    assert "no training image recorded for these inputs" in lines
    records = {path.stem for path in (cache.root / "images").iterdir()}
    (other_digest,) = records - {digest}
    tags.append(f"{KEPT_REPOSITORY}:{other_digest}")
    assert cache.read_image(other_digest) == other


def test_record_naming_another_image_is_not_trusted(
    base_image: str,
    six_wheels: tuple[Path, list[WheelInfo]],
    built: tuple[DependencyCache, str, str],
    tags: list[str],
    docker_client: docker.DockerClient,
) -> None:
    cache, digest, image_id = built
    base_id = str(docker_client.images.get(base_image).id)
    cache.write_image(digest, base_id)  # the record now names the base image

    rebuilt, lines = build(base_image, six_wheels, cache, tags)

    assert f"no image labelled for these inputs has the recorded ID {base_id}" in lines
    assert rebuilt == image_id  # built again (from Docker's build cache), not the base
    assert any(line.startswith("Step 1/") for line in lines)
    assert cache.read_image(digest) == image_id  # the record is repaired


def test_retagged_kept_tag_is_not_consulted(
    base_image: str,
    six_wheels: tuple[Path, list[WheelInfo]],
    built: tuple[DependencyCache, str, str],
    tags: list[str],
    docker_client: docker.DockerClient,
) -> None:
    cache, digest, image_id = built
    # Someone moves the kept tag to the base image: the lookup is by label and recorded ID.
    docker_client.images.get(base_image).tag(KEPT_REPOSITORY, digest)
    docker_client.images.get(image_id).tag("aicert-test/keep", digest[:12])
    tags.append(f"aicert-test/keep:{digest[:12]}")

    reused, lines = build(base_image, six_wheels, cache, tags)

    assert reused == image_id
    assert any(line.startswith(REUSING) for line in lines)


def test_labelled_image_not_on_the_base_is_not_trusted(
    base_image: str,
    six_wheels: tuple[Path, list[WheelInfo]],
    built: tuple[DependencyCache, str, str],
    tags: list[str],
    docker_client: docker.DockerClient,
) -> None:
    # An image with this build's labels and user, but not built on the measured base, and a
    # record naming it: its own configuration gives it away.
    cache, digest, image_id = built
    real = docker_client.images.get(image_id)
    forged_tag = new_tag(tags)
    with tempfile.TemporaryDirectory() as context:
        (Path(context) / "venv").write_text("not a venv\n", encoding="utf-8")
        (Path(context) / "Dockerfile").write_text(
            "FROM scratch\nCOPY venv /opt/venv\nUSER 1000:1000\n", encoding="utf-8"
        )
        forged, _ = docker_client.images.build(
            path=context, tag=forged_tag, labels=real.labels, network_mode="none"
        )
    assert forged.labels == real.labels
    cache.write_image(digest, str(forged.id))

    rebuilt, lines = build(base_image, six_wheels, cache, tags)

    assert (
        f"image {forged.id} is not reused: its layers do not start with the measured base image's"
        in lines
    )
    assert rebuilt == image_id
