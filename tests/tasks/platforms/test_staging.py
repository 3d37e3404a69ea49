"""Staging a run's inputs for a machine without a network (tasks/platforms/staging.py): each
resource streamed from its URL straight into the staged tar, the host's only copy of it.

Real parts: the Docker engine (a one-file image saved into the tar), git, ``file://`` files and
a loopback HTTP server; the tar is read back by the guest's own reader
(``aicert.guest_runtime.staged_inputs.unpack_staged_inputs``).
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import docker
import pytest

from aicert.guest_runtime.config import RunConfig, parse_config
from aicert.guest_runtime.errors import DownloadError
from aicert.guest_runtime.staged_inputs import unpack_staged_inputs
from aicert.tasks.platforms.staging import write_staged_inputs
from tests.loopback import serve

MiB = 1024 * 1024
IMAGE = "aicert-test/staging-tiny:1"


@pytest.fixture(scope="module")
def tiny_image() -> str:
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        member = tarfile.TarInfo("hello.txt")
        data = b"a one-file image for staging tests\n"
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    client = docker.from_env()
    try:
        client.api.import_image_from_data(
            archive.getvalue(), repository=IMAGE.split(":")[0], tag="1"
        )
    finally:
        client.close()
    return IMAGE


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("staging-project")
    (repo / "main.py").write_text("print('hello')\n")
    for args in (
        ["init", "--quiet", "--initial-branch=main"],
        ["add", "main.py"],
        ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-m", "one"],
    ):
        subprocess.run(["git", *args], cwd=repo, check=True)
    return repo


class _Served:
    """What the loopback server serves, and what it saw while serving."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.chunked: set[str] = set()
        self.cut_first_try: set[str] = set()
        self.gets: dict[str, int] = {}
        # Called part-way through each full answer (the staging folder is inspected then).
        self.midway: list[object] = []


@pytest.fixture
def server() -> Iterator[tuple[_Served, str]]:
    served = _Served()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            name = self.path.lstrip("/")
            data = served.files.get(name)
            if data is None:
                self.send_error(404)
                return
            served.gets[name] = served.gets.get(name, 0) + 1
            # Three quarters first: the client reads 4 MiB at a time.
            first = len(data) * 3 // 4
            self.send_response(200)
            if name in served.chunked:
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                for start in range(0, len(data), 64 * 1024):
                    piece = data[start : start + 64 * 1024]
                    self.wfile.write(b"%x\r\n%b\r\n" % (len(piece), piece))
                self.wfile.write(b"0\r\n\r\n")
                return
            self.send_header("content-length", str(len(data)))
            self.send_header("connection", "close")
            self.end_headers()
            self.wfile.write(data[:first])
            if name in served.cut_first_try and served.gets[name] == 1:
                self.wfile.flush()
                self.close_connection = True
                return  # the connection drops part-way: the client must try again
            self.wfile.flush()
            for check in served.midway:
                check(name)  # type: ignore[operator]
            self.wfile.write(data[first:])

        def log_message(self, *_: object) -> None:
            pass

    with serve(Handler) as url:
        yield served, url


def _config(project: Path, resources: list[tuple[str, str, bytes]]) -> RunConfig:
    return parse_config(
        {
            "kind": "python",
            "pythonVersion": "3.11",
            "name": "staging-test",
            "source": {"type": "git", "gitRepo": str(project)},
            "pythonEntryPoint": "main.py",
            "image": IMAGE,
            "resources": [
                {"url": url, "destinationPath": path, "sha256": hashlib.sha256(data).hexdigest()}
                for url, path, data in resources
            ],
        },
        source="test",
    )


def _unpacked(tar: Path, destination: Path) -> Path:
    def load_image(chunks: Iterator[bytes]) -> list[str]:
        return [f"{sum(len(chunk) for chunk in chunks)} bytes"]

    return unpack_staged_inputs(tar, destination, load_image).root


def test_resources_of_every_kind_are_streamed_into_the_tar_and_read_back(
    tiny_image: str, project: Path, server: tuple[_Served, str], tmp_path: Path
) -> None:
    served, base = server
    local = tmp_path / "local.bin"
    local.write_bytes(os.urandom(3 * MiB + 5))
    served.files = {
        "sized.bin": os.urandom(2 * MiB + 1),
        "chunked.bin": os.urandom(MiB + 3),
        "flaky.bin": os.urandom(MiB),
    }
    served.chunked = {"chunked.bin"}
    served.cut_first_try = {"flaky.bin"}
    resources = [
        (local.as_uri(), "data/local.bin", local.read_bytes()),
        (f"{base}/sized.bin", "sized.bin", served.files["sized.bin"]),
        (f"{base}/chunked.bin", "deep/er/chunked.bin", served.files["chunked.bin"]),
        (f"{base}/flaky.bin", "flaky.bin", served.files["flaky.bin"]),
    ]
    messages: list[str] = []
    staged = write_staged_inputs(
        _config(project, resources), tmp_path / "out" / "inputs.tar", run_id="t-stream",
        progress=messages.append,
    )  # fmt: skip
    assert served.gets["flaky.bin"] == 2, "the dropped try was tried again"
    assert any("retrying" in message for message in messages)
    root = _unpacked(staged, tmp_path / "unpacked")
    for _, path, data in resources:
        assert (root / "resources" / path).read_bytes() == data, path
    # Nothing of the staging is left beside the tar.
    assert sorted(p.name for p in staged.parent.iterdir()) == ["inputs.tar"]


def test_while_a_resource_streams_the_tar_is_its_only_copy_on_the_host(
    tiny_image: str, project: Path, server: tuple[_Served, str], tmp_path: Path
) -> None:
    served, base = server
    served.files = {"model.bin": os.urandom(8 * MiB)}
    out = tmp_path / "out"
    seen: list[dict[str, int]] = []

    def inspect_staging_folder(name: str) -> None:
        # Once the first 4 MiB the client read are in the tar (it reads 4 MiB at a time) ...
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            tars = list(out.glob(".staging-*/inputs.tar"))
            if tars and tars[0].stat().st_size >= 4 * MiB:
                break
            time.sleep(0.01)
        # ... every file of the staging, with its size.
        sizes = {
            str(path.relative_to(out)): path.stat().st_size
            for path in out.rglob("*")
            if path.is_file()
        }
        seen.append(sizes)

    served.midway.append(inspect_staging_folder)
    resources = [(f"{base}/model.bin", "model.bin", served.files["model.bin"])]
    write_staged_inputs(_config(project, resources), out / "inputs.tar", run_id="t-one-copy")
    assert len(seen) == 1
    sizes = seen[0]
    tars = [name for name in sizes if name.endswith("/inputs.tar")]
    assert len(tars) == 1, sizes
    # The resource's first 4 MiB are in the tar ...
    assert sizes[tars[0]] >= 4 * MiB
    # ... and in no other file (the image archive, the checkout and the manifest are small).
    others = {name: size for name, size in sizes.items() if name != tars[0]}
    assert all(size < MiB for size in others.values()), others


def test_a_resource_that_cannot_be_fetched_leaves_no_tar(
    tiny_image: str, project: Path, server: tuple[_Served, str], tmp_path: Path
) -> None:
    _, base = server
    resources = [(f"{base}/missing.bin", "missing.bin", b"")]
    out = tmp_path / "out"
    with pytest.raises(DownloadError, match=r"missing\.bin.*404"):
        write_staged_inputs(_config(project, resources), out / "inputs.tar", run_id="t-404")
    assert list(out.iterdir()) == []
