"""Downloads: hashed while streamed, never left partial, retried when retrying may help and
only then (a real HTTP server on loopback)."""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from aicert.guest_runtime.download import download
from aicert.guest_runtime.errors import DownloadError


def test_a_file_url_is_copied_and_hashed(tmp_path: Path) -> None:
    source = tmp_path / "data.bin"
    source.write_bytes(b"x" * 1000)
    target = tmp_path / "out" / "data.bin"
    target.parent.mkdir()
    chunks: list[int] = []
    digest, size = download(source.as_uri(), target, on_bytes=chunks.append)
    assert (digest, size) == (hashlib.sha256(b"x" * 1000).hexdigest(), 1000)
    assert target.read_bytes() == b"x" * 1000 and sum(chunks) == 1000
    assert not target.with_name("data.bin.part").exists()


def test_a_missing_file_fails_at_once_and_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "data.bin"
    messages: list[str] = []
    with pytest.raises(DownloadError, match="cannot download"):
        download((tmp_path / "missing").as_uri(), target, progress=messages.append)
    assert messages == []  # a file:// failure is not retried
    assert list(tmp_path.iterdir()) == []


BODY = os.urandom(3 * 1024 * 1024 + 17)  # several stream chunks, not a multiple of one


class _Server(http.server.BaseHTTPRequestHandler):
    """Serves ``/data.bin`` as told by the class attributes: ``failures`` 503s first, a body
    cut short (Content-Length says more) when ``cut`` is set, 404 for any other path."""

    failures = 0
    cut = False
    requests: ClassVar[list[str]] = []
    files: ClassVar[dict[str, Path]] = {}  # more paths, served from these files

    def do_GET(self) -> None:
        type(self).requests.append(self.path)
        if self.path in type(self).files:
            self._send_file(type(self).files[self.path])
            return
        if self.path != "/data.bin":
            self.send_error(404)
            return
        if type(self).failures > 0:
            type(self).failures -= 1
            self.send_error(503)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY[: len(BODY) // 2] if type(self).cut else BODY)

    def _send_file(self, path: Path) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(path.stat().st_size))
        self.end_headers()
        with path.open("rb") as source:
            shutil.copyfileobj(source, self.wfile)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, type[_Server]]]:
    handler = type("Handler", (_Server,), {"requests": [], "files": {}})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_an_http_download_is_streamed_and_hashed(
    server: tuple[str, type[_Server]], tmp_path: Path
) -> None:
    base, _handler = server
    target = tmp_path / "data.bin"
    chunks: list[int] = []
    totals: list[int | None] = []
    digest, size = download(
        f"{base}/data.bin", target, on_bytes=chunks.append, on_total=totals.append
    )
    assert (digest, size) == (hashlib.sha256(BODY).hexdigest(), len(BODY))
    assert target.read_bytes() == BODY
    assert totals == [len(BODY)] and sum(chunks) == len(BODY)
    assert list(tmp_path.iterdir()) == [target]


def test_a_server_error_is_retried(server: tuple[str, type[_Server]], tmp_path: Path) -> None:
    base, handler = server
    handler.failures = 1
    messages: list[str] = []
    digest, _size = download(f"{base}/data.bin", tmp_path / "data.bin", progress=messages.append)
    assert digest == hashlib.sha256(BODY).hexdigest()
    assert handler.requests == ["/data.bin", "/data.bin"]
    assert any("HTTP Error 503" in message and "retrying" in message for message in messages)


def test_a_client_error_is_not_retried(server: tuple[str, type[_Server]], tmp_path: Path) -> None:
    base, handler = server
    with pytest.raises(DownloadError, match="HTTP Error 404"):
        download(f"{base}/missing.bin", tmp_path / "data.bin")
    assert handler.requests == ["/missing.bin"]
    assert list(tmp_path.iterdir()) == []


def test_a_body_cut_short_is_retried_and_leaves_nothing(
    server: tuple[str, type[_Server]], tmp_path: Path
) -> None:
    base, handler = server
    handler.cut = True
    cut_short = r"cannot download http://\S+: received \d+ of \d+ bytes$"
    with pytest.raises(DownloadError, match=cut_short):
        download(f"{base}/data.bin", tmp_path / "data.bin", attempts=2)
    assert handler.requests == ["/data.bin", "/data.bin"]
    assert list(tmp_path.iterdir()) == []


def test_a_file_url_may_name_localhost(tmp_path: Path) -> None:
    source = tmp_path / "data.bin"
    source.write_bytes(BODY)
    target = tmp_path / "copy.bin"
    digest, size = download(f"file://localhost{source}", target)
    assert (digest, size) == (hashlib.sha256(BODY).hexdigest(), len(BODY))
    assert target.read_bytes() == BODY


def test_a_file_url_on_another_host_is_refused_at_once(tmp_path: Path) -> None:
    messages: list[str] = []
    with pytest.raises(DownloadError, match="names a file on this machine"):
        download("file://elsewhere/data.bin", tmp_path / "data.bin", progress=messages.append)
    assert messages == [] and list(tmp_path.iterdir()) == []


# Downloads a URL in a fresh interpreter; prints the peak RSS growth over the download.
_RSS_PROBE = """\
import re, sys
from pathlib import Path
from aicert.guest_runtime.download import download

def peak() -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"^VmHWM:\\s+(\\d+) kB", status, re.MULTILINE).group(1)) * 1024

before = peak()
download(sys.argv[1], Path(sys.argv[2]))
print(peak() - before)
"""
BIG = 128 * 1024 * 1024
# What a download may add to the peak RSS: its buffers and threads, not the file.
MAX_RSS_GROWTH = 32 * 1024 * 1024


@pytest.mark.parametrize("scheme", ["file", "http"])
def test_memory_does_not_grow_with_the_file(
    scheme: str, tmp_path: Path, server: tuple[str, type[_Server]]
) -> None:
    big = tmp_path / "big.bin"
    with big.open("wb") as handle:
        for _ in range(BIG // len(BODY) + 1):
            handle.write(BODY)
    if scheme == "file":
        url = big.as_uri()
    else:
        url = f"{server[0]}/big.bin"
        server[1].files["/big.bin"] = big
    probe = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, url, str(tmp_path / "copy.bin")],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    assert (tmp_path / "copy.bin").stat().st_size == big.stat().st_size > BIG
    assert int(probe.stdout) < MAX_RSS_GROWTH
