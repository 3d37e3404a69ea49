"""A recording double of the Docker Engine API on a unix socket, for what no engine here can
do: accept a GPU device request (this machine has no GPU and no NVIDIA runtime).

It answers the calls a client makes to create a container (``_ping``, ``version``, image
inspect, ``containers/create`` and inspect, ``attach``, remove) and records every request's
method, path and JSON body. The real clients are pointed at it (``DOCKER_HOST``): the docker
SDK that ``container.py`` uses, and the ``docker`` CLI, whose ``--gpus`` request is the
reference. ``attach`` answers 500, so a run stops right after the create, before any start.
"""

from __future__ import annotations

import json
import re
import socketserver
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import TracebackType
from typing import Self

from pydantic import JsonValue

API_VERSION = "1.43"
CONTAINER_ID = "c0ffee" * 10 + "c0de"
IMAGE_ID = "sha256:" + "ab" * 32


@dataclass(frozen=True)
class Recorded:
    """One request the double received."""

    method: str
    path: str
    body: JsonValue


@dataclass
class _Log:
    requests: list[Recorded] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _UnixHttpServer

    def log_message(self, format: str, *args: object) -> None:
        return  # quiet: the test reads the recording, not a log

    def address_string(self) -> str:
        return "unix"  # a unix socket peer has no (host, port)

    def _answer(self, status: int, body: JsonValue | None = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Api-Version", API_VERSION)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body: JsonValue = json.loads(raw) if raw.strip() else None
        path = re.sub(r"^/v[0-9.]+", "", self.path.split("?", 1)[0])
        with self.server.log.lock:
            self.server.log.requests.append(Recorded(self.command, path, body))
        if path == "/_ping":
            self._answer(200, None)
        elif path == "/version":
            self._answer(200, {"ApiVersion": API_VERSION, "MinAPIVersion": "1.24"})
        elif path.startswith("/images/") and path.endswith("/json"):
            self._answer(200, {"Id": IMAGE_ID, "RepoTags": [], "Config": {}})
        elif path == "/containers/create":
            self._answer(201, {"Id": CONTAINER_ID, "Warnings": []})
        elif path == f"/containers/{CONTAINER_ID}/json":
            self._answer(
                200, {"Id": CONTAINER_ID, "Name": "/double", "State": {}, "Config": {"Tty": False}}
            )
        elif path == f"/containers/{CONTAINER_ID}" and self.command == "DELETE":
            self._answer(204, None)
        else:
            self._answer(500, {"message": f"the engine double does not answer {path}"})

    do_GET = do_POST = do_HEAD = do_DELETE = _handle


class _UnixHttpServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    log: _Log


class EngineDouble:
    """The double, serving on ``socket`` while entered; ``requests`` is what it received."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket
        self._server = _UnixHttpServer(str(socket), _Handler)
        self._server.log = _Log()
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """``DOCKER_HOST`` for a client of the double."""
        return f"unix://{self.socket}"

    @property
    def requests(self) -> list[Recorded]:
        with self._server.log.lock:
            return list(self._server.log.requests)

    def create_bodies(self) -> list[JsonValue]:
        """The body of each ``containers/create`` request, in order."""
        return [r.body for r in self.requests if r.path == "/containers/create"]

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
