"""A local double of the Compute Engine REST API (v1), enough for a gcp run.

It answers the requests the real ``google-cloud-compute`` client sends over its REST
transport (pointed here with ``client_options.api_endpoint`` and anonymous credentials):
instances insert/get/list/delete, firewalls insert/delete, and zonal and global operations,
which it reports RUNNING on the first poll and DONE on the next, as Compute Engine does for a
VM being made. ``fail_next`` makes the next operation of a kind end with an error (a quota
error: HTTP 403 ``QUOTA_EXCEEDED``, as Compute Engine reports it in the operation). Every
request is recorded (method, path, query, JSON body) for the tests to compare. With a
``vm_lifecycle`` an instance the double reports made boots a local "VM" (``vm_double.py``),
and its deletion stops it.
"""

from __future__ import annotations

import itertools
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

PREFIX = "/compute/v1/projects/"


class VmLifecycle(Protocol):
    """What boots a "VM" when the double reports an instance made, and stops it on delete."""

    def created(self, instance: dict[str, Any]) -> None: ...

    def deleted(self, instance: dict[str, Any]) -> None: ...


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    body: dict[str, Any] | None


@dataclass
class ComputeState:
    """What the double holds: resources by kind and name, operations, the request log."""

    instances: dict[str, dict[str, Any]] = field(default_factory=dict)
    firewalls: dict[str, dict[str, Any]] = field(default_factory=dict)
    operations: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    failures: dict[str, tuple[int, str, str]] = field(default_factory=dict)
    counter: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    lock: threading.Lock = field(default_factory=threading.Lock)
    vm_lifecycle: VmLifecycle | None = None

    def fail_next(
        self,
        kind: str,
        status: int = 403,
        code: str = "QUOTA_EXCEEDED",
        message: str = "Quota 'CPUS' exceeded.  Limit: 8.0 in region us-central1.",
    ) -> None:
        """The next operation of ``kind`` (e.g. ``insert-instance``) ends with this error."""
        self.failures[kind] = (status, code, message)


class _Handler(BaseHTTPRequestHandler):
    state: ComputeState

    def log_message(self, format: str, *args: object) -> None:
        return  # quiet: the tests read state.requests

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _not_found(self, what: str) -> None:
        self._reply(
            404,
            {
                "error": {
                    "code": 404,
                    "message": f"The resource '{what}' was not found",
                    "errors": [{"reason": "notFound", "message": what}],
                }
            },
        )

    def _record(self) -> tuple[list[str], dict[str, Any] | None]:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        with self.state.lock:
            self.state.requests.append(Recorded(self.command, url.path, parse_qs(url.query), body))
        if not url.path.startswith(PREFIX):
            return [], body
        return url.path[len(PREFIX) :].split("/"), body

    def _operation(self, project: str, scope: str, kind: str, target: str) -> dict[str, Any]:
        name = f"operation-{next(self.state.counter)}"
        operation: dict[str, Any] = {
            "kind": "compute#operation",
            "id": str(next(self.state.counter)),
            "name": name,
            "operationType": kind.split("-")[0],
            "targetLink": target,
            "status": "RUNNING",
            "progress": 0,
            "selfLink": f"{PREFIX}{project}/{scope}/operations/{name}",
        }
        if scope.startswith("zones/"):
            operation["zone"] = f"https://compute.googleapis.com{PREFIX}{project}/{scope}"
        failure = self.state.failures.pop(kind, None)
        if failure is not None:
            status, code, message = failure
            operation["_failure"] = {
                "httpErrorStatusCode": status,
                "httpErrorMessage": "FORBIDDEN" if status == 403 else "ERROR",
                "error": {"errors": [{"code": code, "message": message}]},
            }
        self.state.operations[name] = operation
        return {k: v for k, v in operation.items() if not k.startswith("_")}

    def _poll(self, name: str) -> None:
        operation = self.state.operations.get(name)
        if operation is None:
            self._not_found(name)
            return
        # DONE on the second poll: the client must really wait.
        polls = operation.setdefault("_polls", 0) + 1
        operation["_polls"] = polls
        if polls >= 2:
            operation.update(status="DONE", progress=100, **operation.get("_failure", {}))
        self._reply(200, {k: v for k, v in operation.items() if not k.startswith("_")})

    def do_GET(self) -> None:
        parts, _ = self._record()
        if len(parts) == 5 and parts[1] == "zones" and parts[3] == "operations":
            return self._poll(parts[4])
        if len(parts) == 4 and parts[1] == "global" and parts[2] == "operations":
            return self._poll(parts[3])
        if len(parts) == 5 and parts[3] == "instances":
            instance = self.state.instances.get(parts[4])
            return self._reply(200, instance) if instance else self._not_found(parts[4])
        if len(parts) == 4 and parts[3] == "instances":
            return self._reply(
                200, {"kind": "compute#instanceList", "items": list(self.state.instances.values())}
            )
        return self._not_found(self.path)

    def do_POST(self) -> None:
        parts, body = self._record()
        body = body or {}
        project = parts[0] if parts else ""
        if len(parts) == 4 and parts[3] == "instances":
            operation = self._operation(
                project, f"zones/{parts[2]}", "insert-instance", body["name"]
            )
            if "_failure" not in self.state.operations[operation["name"]]:
                interface = body.get("networkInterfaces", [{}])[0]
                interface["networkIP"] = "127.0.0.1"
                for access in interface.get("accessConfigs", []):
                    access["natIP"] = "127.0.0.1"
                self.state.instances[body["name"]] = {**body, "status": "RUNNING"}
                if self.state.vm_lifecycle is not None:
                    self.state.vm_lifecycle.created(self.state.instances[body["name"]])
            return self._reply(200, operation)
        if len(parts) == 3 and parts[2] == "firewalls":
            operation = self._operation(project, "global", "insert-firewall", body["name"])
            if "_failure" not in self.state.operations[operation["name"]]:
                self.state.firewalls[body["name"]] = body
            return self._reply(200, operation)
        return self._not_found(self.path)

    def do_DELETE(self) -> None:
        parts, _ = self._record()
        project = parts[0] if parts else ""
        if len(parts) == 5 and parts[3] == "instances":
            instance = self.state.instances.pop(parts[4], None)
            if instance is None:
                return self._not_found(parts[4])
            if self.state.vm_lifecycle is not None:
                self.state.vm_lifecycle.deleted(instance)
            return self._reply(
                200, self._operation(project, f"zones/{parts[2]}", "delete-instance", parts[4])
            )
        if len(parts) == 4 and parts[2] == "firewalls":
            if self.state.firewalls.pop(parts[3], None) is None:
                return self._not_found(parts[3])
            return self._reply(200, self._operation(project, "global", "delete-firewall", parts[3]))
        return self._not_found(self.path)


class FakeCompute:
    """The double on a loopback port; ``endpoint`` goes into ``GcpSettings.api_endpoint``."""

    def __init__(self, vm_lifecycle: VmLifecycle | None = None) -> None:
        self.state = ComputeState(vm_lifecycle=vm_lifecycle)
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeCompute:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
