"""Dependencies resolved on the host as measured wheels, installed offline (PyPI, Docker)."""

from __future__ import annotations

import json
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import pytest

from aicert.guest_runtime.container import run_training_container
from aicert.guest_runtime.training_image import _build_events, build_training_image
from aicert.guest_runtime.wheelhouse import WheelhouseError, WheelInfo, resolve_wheelhouse

from .conftest import sandbox

# six 1.16.0's only wheel on PyPI, and its published SHA-256.
SIX_WHEEL = "six-1.16.0-py2.py3-none-any.whl"
SIX_SHA256 = "8abb2f1d86890a2dfb989f9a77cfcfd3e47c2a354b01111771326f8aa26e0254"


@pytest.fixture(scope="module")
def six_wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[WheelInfo]]:
    folder = tmp_path_factory.mktemp("wheelhouse")
    requirements = folder / "requirements.txt"
    requirements.write_text("# training deps\nsix==1.16.0\n", encoding="utf-8")
    wheels = resolve_wheelhouse(requirements, folder / "wheels")
    return folder / "wheels", wheels


@pytest.fixture
def image_tag(docker_client: docker.DockerClient) -> Iterator[str]:
    tag = f"aicert-test/train:{uuid.uuid4().hex[:12]}"
    yield tag
    try:
        docker_client.images.remove(tag, noprune=False)
    except docker.errors.ImageNotFound:
        pass


def test_resolve_six_gives_the_published_wheel(
    six_wheelhouse: tuple[Path, list[WheelInfo]],
) -> None:
    folder, wheels = six_wheelhouse
    assert wheels == [WheelInfo("six", "1.16.0", SIX_WHEEL, SIX_SHA256, 11053)]
    assert sorted(p.name for p in folder.iterdir()) == [SIX_WHEEL]


@pytest.mark.parametrize("content", ["", "\n\n", "# nothing here\n   # indented comment\n"])
def test_empty_requirements_give_no_wheels(tmp_path: Path, content: str) -> None:
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(content, encoding="utf-8")
    assert resolve_wheelhouse(requirements, tmp_path / "wheels") == []


def test_unresolvable_requirement_is_an_error(tmp_path: Path) -> None:
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("six==0.0.0.999\n", encoding="utf-8")
    with pytest.raises(WheelhouseError, match="pip download exited"):
        resolve_wheelhouse(requirements, tmp_path / "wheels")


def test_training_image_has_six_and_runs_offline(
    base_image: str,
    six_wheelhouse: tuple[Path, list[WheelInfo]],
    image_tag: str,
    workspace: dict[str, Path],
    run_name: str,
) -> None:
    folder, wheels = six_wheelhouse
    build_log: list[str] = []
    image_id = build_training_image(
        base_image, folder, wheels, tag=image_tag, progress=build_log.append
    )
    assert image_id.startswith("sha256:")
    assert any(line.startswith("Step 1/") for line in build_log)  # the build log streams
    # Same inputs, same image (the build cache holds every layer).
    assert build_training_image(base_image, folder, wheels, tag=image_tag) == image_id

    lines: list[str] = []
    result = run_training_container(
        sandbox(
            image_tag,
            workspace,
            ["python", "-c", "import six, sys; print(six.__version__, sys.prefix)"],
            timeout_s=60,
            name=run_name,
        ),
        lines.append,
    )
    assert result.exit_code == 0, lines
    assert result.image_id == image_id
    assert lines == ["1.16.0 /opt/venv"]


def test_wheel_changed_after_measurement_is_refused(
    base_image: str, six_wheelhouse: tuple[Path, list[WheelInfo]], image_tag: str
) -> None:
    folder, wheels = six_wheelhouse
    tampered = [WheelInfo(w.name, w.version, w.filename, "0" * 64, w.size) for w in wheels]
    with pytest.raises(WheelhouseError, match="changed since it was measured"):
        build_training_image(base_image, folder, tampered, tag=image_tag)


def test_training_image_without_wheels_has_an_empty_venv(
    base_image: str, image_tag: str, docker_client: docker.DockerClient
) -> None:
    image_id = build_training_image(base_image, Path("/nonexistent"), [], tag=image_tag)
    config = docker_client.images.get(image_id).attrs["Config"]
    assert config["User"] == "1000:1000"
    assert config["Env"][0].startswith("PATH=/opt/venv/bin:")
    assert image_id != docker_client.images.get(base_image).id


def test_image_build_has_no_network(base_image: str, docker_client: docker.DockerClient) -> None:
    # The build helper the training image uses, given a RUN step that probes the network. The
    # same probe on Docker's default bridge network connects on this machine.
    probe = (
        f"# {uuid.uuid4()}: a fresh file, so the build cache cannot skip the RUN step\n"
        "import json, socket\n"
        "try:\n"
        "    socket.create_connection(('1.1.1.1', 53), timeout=3).close(); result = 'ok'\n"
        "except OSError as exc:\n"
        "    result = str(exc)\n"
        "print('PROBE ' + json.dumps([result, [n for _, n in socket.if_nameindex()]]))\n"
    )
    tag = f"aicert-test/probe:{uuid.uuid4().hex[:12]}"
    with tempfile.TemporaryDirectory() as context:
        (Path(context) / "probe.py").write_text(probe, encoding="utf-8")
        (Path(context) / "Dockerfile").write_text(
            f"FROM {base_image}\nCOPY probe.py /probe.py\nRUN python3 /probe.py\n",
            encoding="utf-8",
        )
        output = [
            str(event.get("stream", ""))
            for event in _build_events(docker_client, Path(context), tag, {})
        ]
    try:
        docker_client.images.remove(tag)
    except docker.errors.ImageNotFound:
        pass
    probe_lines = [line for chunk in output for line in chunk.splitlines() if "PROBE " in line]
    assert probe_lines, output
    result, interfaces = json.loads(probe_lines[-1].split("PROBE ", 1)[1])
    assert "Network is unreachable" in result
    assert interfaces == ["lo"]
