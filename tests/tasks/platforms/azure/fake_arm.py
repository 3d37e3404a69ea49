"""A local HTTP server that plays Azure Resource Manager for the calls the azure provider makes.

It serves exactly: PUT / GET / PATCH / DELETE of virtualMachines, disks, networkInterfaces,
publicIPAddresses, networkSecurityGroups and virtualNetworks in a resource group; the generic
resource list filtered by tag (subscription or resource group scope); and the long-running
operation endpoints its own ``Azure-AsyncOperation`` and ``Location`` headers point at.

Shapes follow ARM's documented responses: every resource has ``id``, ``name``, ``type``,
``location``, ``tags`` and ``properties.provisioningState``; a create answers 201 (200 on
update) with the resource in ``Creating``/``Updating`` state and an ``Azure-AsyncOperation``
header; the operation answers ``{"status": "InProgress"}`` for a configurable number of polls,
then ``Succeeded`` (or ``Failed`` with ``error: {code, message}``); a delete answers 202 with
``Azure-AsyncOperation`` and ``Location`` (204 when the resource does not exist); errors are
``{"error": {"code", "message"}}``. Like ARM, it refuses to delete a resource another resource
still references (a NIC used by a VM, an NSG used by a NIC, ...) and to create one that
references a missing resource, so a provider that deletes in the wrong order fails here too.
A VM's creation makes its OS disk implicitly, without the VM's tags, as Azure does. A list
filtered by tag name *and value* returns no ``tags`` (documented ARM behaviour).

Every request is recorded (method, path, api-version, query, JSON body, authorization) for
assertions. Failures are injected with ``FailureRule``: 429 with ``Retry-After``, 500, or a
long-running operation that ends ``Failed``. Binds 127.0.0.1 only.

A ``VmLifecycle`` (optional) plays the hypervisor: it is told when a VM's creation succeeds (the
VM boots) and when its deletion is about to succeed (the VM is gone once the operation reports
``Succeeded``, as on Azure).

The module is longer than 600 lines on purpose: it is one server's state (routes, resources,
operations, injected failures), which reads best in one place.
"""

from __future__ import annotations

import copy
import json
import re
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import parse_qs, urlsplit

from azure.core.credentials import AccessToken

if TYPE_CHECKING:
    from aicert.tasks.platforms.azure import AzureSettings

FAKE_TOKEN = "fake-arm-token"  # what StaticTokenCredential hands out

MANAGED_TYPES: dict[str, str] = {
    "microsoft.compute/virtualmachines": "Microsoft.Compute/virtualMachines",
    "microsoft.compute/disks": "Microsoft.Compute/disks",
    "microsoft.network/networkinterfaces": "Microsoft.Network/networkInterfaces",
    "microsoft.network/publicipaddresses": "Microsoft.Network/publicIPAddresses",
    "microsoft.network/networksecuritygroups": "Microsoft.Network/networkSecurityGroups",
    "microsoft.network/virtualnetworks": "Microsoft.Network/virtualNetworks",
}

_RESOURCE_PATH = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/"
    r"(?P<ns>Microsoft\.[A-Za-z]+)/(?P<type>[A-Za-z]+)/(?P<name>[^/]+)$",
    re.IGNORECASE,
)
_LIST_PATH = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)(?:/resourceGroups/(?P<rg>[^/]+))?/resources$", re.IGNORECASE
)
_OPERATION_PATH = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/providers/(?P<ns>Microsoft\.[A-Za-z]+)/locations/"
    r"(?P<loc>[^/]+)/(?P<kind>operations|operationResults)/(?P<op>[^/]+)$",
    re.IGNORECASE,
)
_TAG_FILTER = re.compile(
    r"^tagName eq '(?P<name>[^']*)'(?: and tagValue eq '(?P<value>[^']*)')?$", re.IGNORECASE
)
_ARM_ID = re.compile(
    r"^/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.(Compute|Network)/",
    re.IGNORECASE,
)

FailureKind = Literal["throttle", "server_error", "failed_lro"]


class VmLifecycle(Protocol):
    """What runs behind the VM resources: called under the fake's lock, with a copy of the VM.
    ``created`` must return at once (a VM boots after ARM reports it created); ``deleted``
    returns once the VM is gone."""

    def created(self, vm: dict[str, Any]) -> None: ...

    def deleted(self, vm: dict[str, Any]) -> None: ...


@dataclass
class FailureRule:
    """Inject a failure into the next ``times`` requests matching ``method`` and ``type_name``.

    ``throttle``: 429 with ``Retry-After``; ``server_error``: 500; ``failed_lro``: the request
    is accepted but its long-running operation ends ``Failed`` with ``error_code``.
    """

    method: str
    type_name: str  # e.g. "virtualMachines"; matched case-insensitively
    kind: FailureKind
    times: int = 1
    retry_after_s: int = 1
    error_code: str = "AllocationFailed"
    error_message: str = (
        "Allocation failed. We do not have sufficient capacity for the requested VM size "
        "in this region."
    )


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    api_version: str | None
    body: Any
    authorization: str | None
    response_status: int
    at: float  # time.monotonic() when the request arrived

    @property
    def type_name(self) -> str | None:
        match = _RESOURCE_PATH.match(self.path)
        return match["type"] if match else None

    @property
    def resource_name(self) -> str | None:
        match = _RESOURCE_PATH.match(self.path)
        return match["name"] if match else None


@dataclass
class _Operation:
    op_id: str
    resource_key: str
    action: Literal["create", "update", "delete"]
    polls_left: int
    failure: FailureRule | None
    status: str = "InProgress"
    started: str = field(default_factory=lambda: _now())
    ended: str | None = None


# What the server answers: status, headers, JSON body (None: no body).
_Response = tuple[int, dict[str, str], Any]


@dataclass(frozen=True)
class _Target:
    """The resource a request names."""

    resource_id: str
    full_type: str
    resource_group: str
    name: str

    @property
    def key(self) -> str:
        return self.resource_id.lower()  # ARM ids compare case-insensitively

    @property
    def namespace(self) -> str:
        return self.full_type.split("/")[0]


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client closing its keep-alive connection is not a server error worth printing.
        exc = sys.exc_info()[1]
        if not isinstance(exc, ConnectionError):
            super().handle_error(request, client_address)


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def _ids_in(value: Any, *, skip_keys: frozenset[str] = frozenset()) -> Iterator[str]:
    """Every ``"id"`` string nested in ``value`` (references to other resources)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key in skip_keys:
                continue
            if key == "id" and isinstance(item, str):
                yield item
            else:
                yield from _ids_in(item, skip_keys=skip_keys)
    elif isinstance(value, list):
        for item in value:
            yield from _ids_in(item, skip_keys=skip_keys)


class FakeArm:
    """The server; use as a context manager. ``url`` is its base URL (``http://127.0.0.1:P``)."""

    def __init__(
        self,
        *,
        public_ip_address: str = "127.0.0.1",
        polls_in_progress: int = 1,
        subscription_id: str = "00000000-0000-0000-0000-000000000000",
        vm_lifecycle: VmLifecycle | None = None,
    ) -> None:
        self.public_ip_address = public_ip_address
        self.vm_lifecycle = vm_lifecycle
        self.polls_in_progress = polls_in_progress
        self.subscription_id = subscription_id
        self.requests: list[RecordedRequest] = []
        self.failures: list[FailureRule] = []
        self._resources: dict[str, dict[str, Any]] = {}
        self._operations: dict[str, _Operation] = {}
        self._lock = threading.RLock()
        self._server = _QuietServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeArm:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # -- test helpers ------------------------------------------------------------------

    def inject(self, rule: FailureRule) -> None:
        with self._lock:
            self.failures.append(rule)

    def seed(
        self,
        resource_group: str,
        type_name: str,
        name: str,
        *,
        location: str = "westeurope",
        tags: dict[str, str] | None = None,
        properties: dict[str, Any] | None = None,
    ) -> str:
        """Put a resource in place directly (e.g. a leftover of an earlier run); its id."""
        full_type = MANAGED_TYPES[_type_key(type_name)]
        resource_id = self._resource_id(resource_group, full_type, name)
        body = {"location": location, "tags": tags or {}, "properties": properties or {}}
        with self._lock:
            resource = self._new_resource(resource_id, full_type, name, body)
            resource["properties"]["provisioningState"] = "Succeeded"
            self._resources[resource_id.lower()] = resource
        return resource_id

    def resource(self, resource_id: str) -> dict[str, Any] | None:
        with self._lock:
            found = self._resources.get(resource_id.lower())
            return copy.deepcopy(found) if found is not None else None

    def resources(self) -> list[dict[str, Any]]:
        with self._lock:
            return [copy.deepcopy(r) for r in self._resources.values()]

    def calls(self, method: str, type_name: str | None = None) -> list[RecordedRequest]:
        """Recorded requests with ``method`` on resources of ``type_name`` (any if None)."""
        with self._lock:
            return [
                r
                for r in self.requests
                if r.method == method
                and (type_name is None or (r.type_name or "").lower() == type_name.lower())
            ]

    # -- ARM semantics -----------------------------------------------------------------

    def _resource_id(self, resource_group: str, full_type: str, name: str) -> str:
        return (
            f"/subscriptions/{self.subscription_id}/resourceGroups/{resource_group}"
            f"/providers/{full_type}/{name}"
        )

    def _new_resource(
        self, resource_id: str, full_type: str, name: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        resource: dict[str, Any] = {
            "name": name,
            "id": resource_id,
            "type": full_type,
            "location": body.get("location", ""),
            "tags": dict(body.get("tags") or {}),
            "properties": copy.deepcopy(body.get("properties") or {}),
        }
        for extra in ("sku", "zones", "identity"):
            if extra in body:
                resource[extra] = copy.deepcopy(body[extra])
        if full_type.startswith("Microsoft.Network/"):
            resource["etag"] = f'W/"{uuid.uuid4()}"'
            resource["properties"].setdefault("resourceGuid", str(uuid.uuid4()))
        return resource

    def _failure_for(self, method: str, type_name: str | None) -> FailureRule | None:
        if type_name is None:
            return None
        for rule in self.failures:
            if (
                rule.times > 0
                and rule.method == method
                and rule.type_name.lower() == type_name.lower()
            ):
                rule.times -= 1
                return rule
        return None

    def _missing_reference(self, body: dict[str, Any]) -> str | None:
        # Gallery images are not resources of this fake; every other ARM id must exist.
        for ref in _ids_in(body.get("properties") or {}, skip_keys=frozenset({"imageReference"})):
            if not _ARM_ID.match(ref):
                continue
            subnet = re.match(
                r"^(?P<vnet>.+/virtualNetworks/[^/]+)/subnets/(?P<s>[^/]+)$", ref, re.I
            )
            if subnet:
                vnet = self._resources.get(subnet["vnet"].lower())
                names = {
                    s.get("name", "").lower()
                    for s in (vnet or {}).get("properties", {}).get("subnets", [])
                }
                if subnet["s"].lower() not in names:
                    return ref
            elif ref.lower() not in self._resources:
                return ref
        return None

    def _referenced_by(self, resource_id: str) -> str | None:
        wanted = resource_id.lower()
        for key, other in self._resources.items():
            if key == wanted:
                continue
            for ref in _ids_in(other.get("properties") or {}):
                ref_lower = ref.lower()
                if ref_lower == wanted or ref_lower.startswith(wanted + "/"):
                    return other["id"]
        return None

    def _start_operation(
        self,
        resource_key: str,
        action: Literal["create", "update", "delete"],
        location: str,
        namespace: str,
        failure: FailureRule | None,
    ) -> tuple[str, str]:
        op_id = str(uuid.uuid4())
        self._operations[op_id] = _Operation(
            op_id, resource_key, action, self.polls_in_progress, failure
        )
        base = f"{self.url}/subscriptions/{self.subscription_id}/providers/{namespace}/locations/"
        location = location or "westeurope"
        status_url = f"{base}{location}/operations/{op_id}?api-version=2024-07-01"
        result_url = f"{base}{location}/operationResults/{op_id}?api-version=2024-07-01"
        return status_url, result_url

    def _advance(self, operation: _Operation) -> None:
        if operation.status != "InProgress":
            return
        if operation.polls_left > 0:
            operation.polls_left -= 1
            return
        resource = self._resources.get(operation.resource_key)
        operation.ended = _now()
        if operation.failure is not None:
            operation.status = "Failed"
            if resource is not None and operation.action != "delete":
                resource["properties"]["provisioningState"] = "Failed"
            return
        is_vm = resource is not None and resource["type"] == "Microsoft.Compute/virtualMachines"
        if operation.action == "delete":
            if is_vm and self.vm_lifecycle is not None:
                assert resource is not None
                self.vm_lifecycle.deleted(copy.deepcopy(resource))
            operation.status = "Succeeded"
            self._resources.pop(operation.resource_key, None)
            return
        operation.status = "Succeeded"
        if resource is not None:
            resource["properties"]["provisioningState"] = "Succeeded"
            self._on_succeeded(resource)
            if is_vm and operation.action == "create" and self.vm_lifecycle is not None:
                self.vm_lifecycle.created(copy.deepcopy(resource))

    def _on_succeeded(self, resource: dict[str, Any]) -> None:
        """What ARM fills in once a create (or a retried one) succeeds; idempotent."""
        kind = resource["type"]
        props = resource["properties"]
        if kind == "Microsoft.Network/publicIPAddresses":
            props["ipAddress"] = self.public_ip_address
        elif kind == "Microsoft.Network/networkInterfaces":
            for index, config in enumerate(props.get("ipConfigurations", [])):
                config.setdefault("properties", {})["privateIPAddress"] = f"10.73.0.{4 + index}"
                config["id"] = f"{resource['id']}/ipConfigurations/{config.get('name', 'ipconfig')}"
            props["macAddress"] = "00-0D-3A-00-00-01"
        elif kind == "Microsoft.Network/virtualNetworks":
            for subnet in props.get("subnets", []):
                subnet["id"] = f"{resource['id']}/subnets/{subnet.get('name', 'default')}"
        elif kind == "Microsoft.Compute/virtualMachines":
            props.setdefault("vmId", str(uuid.uuid4()))
            props.setdefault("timeCreated", _now())
            os_disk = props.get("storageProfile", {}).get("osDisk", {})
            rg = resource["id"].split("/")[4]
            disk_name = os_disk.get("name") or f"{resource['name']}_OsDisk_1_{uuid.uuid4().hex}"
            os_disk["name"] = disk_name
            disk_id = self._resource_id(rg, "Microsoft.Compute/disks", disk_name)
            os_disk.setdefault("managedDisk", {})["id"] = disk_id
            if disk_id.lower() in self._resources:
                return
            # Azure does not copy the VM's tags onto the disks it creates implicitly.
            disk = self._new_resource(
                disk_id,
                "Microsoft.Compute/disks",
                disk_name,
                {
                    "location": resource["location"],
                    "properties": {
                        "osType": "Linux",
                        "diskState": "Attached",
                        "creationData": {"createOption": "FromImage"},
                    },
                },
            )
            disk["managedBy"] = resource["id"]
            disk["properties"]["provisioningState"] = "Succeeded"
            self._resources[disk_id.lower()] = disk

    # -- HTTP ------------------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in two writes: without this, Nagle's algorithm and
            # the client's delayed ACK add 40 ms to every request.
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:  # quiet test output
                return

            def _handle(self) -> None:
                arrived = time.monotonic()
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = None
                split = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(split.query).items()}
                with fake._lock:
                    status, headers, payload = fake._dispatch(
                        self.command, split.path, query, body, self.headers.get("Authorization")
                    )
                    fake.requests.append(
                        RecordedRequest(
                            method=self.command,
                            path=split.path,
                            query=query,
                            api_version=query.get("api-version"),
                            body=body,
                            authorization=self.headers.get("Authorization"),
                            response_status=status,
                            at=arrived,
                        )
                    )
                data = b"" if payload is None else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("x-ms-request-id", str(uuid.uuid4()))
                for key, value in headers.items():
                    self.send_header(key, value)
                if data:
                    self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_PATCH = do_DELETE = do_POST = _handle

        return Handler

    def _dispatch(
        self,
        method: str,
        path: str,
        query: dict[str, str],
        body: Any,
        authorization: str | None,
    ) -> _Response:
        if authorization != f"Bearer {FAKE_TOKEN}":
            return 401, {}, _error("AuthenticationFailed", "missing or invalid bearer token")
        if "api-version" not in query:
            return 400, {}, _error("MissingApiVersionParameter", "api-version is required")

        operation = _OPERATION_PATH.match(path)
        if operation and method == "GET":
            return self._operation_status(operation["op"], operation["kind"])

        listing = _LIST_PATH.match(path)
        if listing and method == "GET":
            return self._list(listing["rg"], query.get("$filter"))

        match = _RESOURCE_PATH.match(path)
        if match is None:
            return 404, {}, _error("InvalidResourceType", f"no route for {method} {path}")
        type_key = _type_key(f"{match['ns']}/{match['type']}")
        if type_key not in MANAGED_TYPES:
            return 404, {}, _error("InvalidResourceType", f"type {match['type']} not served")
        rule = self._failure_for(method, match["type"])
        if rule is not None and rule.kind == "throttle":
            return (
                429,
                {"Retry-After": str(rule.retry_after_s)},
                _error("TooManyRequests", "The request is being throttled."),
            )
        if rule is not None and rule.kind == "server_error":
            return 500, {}, _error("InternalServerError", "An internal server error occurred.")
        full_type = MANAGED_TYPES[type_key]
        target = _Target(
            self._resource_id(match["rg"], full_type, match["name"]),
            full_type,
            match["rg"],
            match["name"],
        )
        handlers = {"GET": self._get, "PUT": self._put, "PATCH": self._patch}
        handlers["DELETE"] = self._delete
        if method not in handlers:
            return 405, {}, _error("MethodNotAllowed", f"{method} is not served")
        return handlers[method](target, body, rule)

    def _get(self, target: _Target, body: Any, rule: FailureRule | None) -> _Response:
        existing = self._resources.get(target.key)
        if existing is None:
            return (
                404,
                {},
                _error(
                    "ResourceNotFound",
                    f"The Resource '{target.full_type}/{target.name}' under resource group "
                    f"'{target.resource_group}' was not found.",
                ),
            )
        return 200, {}, existing

    def _put(self, target: _Target, body: Any, rule: FailureRule | None) -> _Response:
        if not isinstance(body, dict) or not body.get("location"):
            return 400, {}, _error("LocationRequired", "The location property is required.")
        missing = self._missing_reference(body)
        if missing is not None:
            return (
                400,
                {},
                _error(
                    "InvalidResourceReference",
                    f"Resource {missing} referenced by {target.resource_id} was not found.",
                ),
            )
        existing = self._resources.get(target.key)
        resource = self._new_resource(target.resource_id, target.full_type, target.name, body)
        resource["properties"]["provisioningState"] = "Creating" if existing is None else "Updating"
        self._resources[target.key] = resource
        status_url, _ = self._start_operation(
            target.key,
            "create" if existing is None else "update",
            resource["location"],
            target.namespace,
            rule,
        )
        return (201 if existing is None else 200), {"Azure-AsyncOperation": status_url}, resource

    def _patch(self, target: _Target, body: Any, rule: FailureRule | None) -> _Response:
        existing = self._resources.get(target.key)
        if existing is None:
            return 404, {}, _error("ResourceNotFound", f"{target.resource_id} was not found.")
        if isinstance(body, dict) and "tags" in body:
            existing["tags"] = dict(body["tags"] or {})
        existing["properties"]["provisioningState"] = "Updating"
        status_url, result_url = self._start_operation(
            target.key, "update", existing["location"], target.namespace, rule
        )
        return 202, {"Azure-AsyncOperation": status_url, "Location": result_url}, None

    def _delete(self, target: _Target, body: Any, rule: FailureRule | None) -> _Response:
        existing = self._resources.get(target.key)
        if existing is None:
            return 204, {}, None
        holder = self._referenced_by(target.resource_id)
        if holder is not None:
            return (
                400,
                {},
                _error(
                    "InUseResourceCannotBeDeleted",
                    f"Resource {target.resource_id} is in use by {holder} and cannot be deleted.",
                ),
            )
        existing["properties"]["provisioningState"] = "Deleting"
        status_url, result_url = self._start_operation(
            target.key, "delete", existing["location"], target.namespace, rule
        )
        return 202, {"Azure-AsyncOperation": status_url, "Location": result_url}, None

    def _operation_status(self, op_id: str, kind: str) -> _Response:
        operation = self._operations.get(op_id)
        if operation is None:
            return 404, {}, _error("OperationNotFound", f"operation {op_id} not found")
        self._advance(operation)
        if kind.lower() == "operationresults":
            # The Location URL: 202 while running, then the final outcome.
            if operation.status == "InProgress":
                return 202, {"Location": ""}, None
            if operation.status == "Failed":
                return 400, {}, self._failure_body(operation)
            return 204, {}, None
        payload: dict[str, Any] = {
            "name": op_id,
            "status": operation.status,
            "startTime": operation.started,
        }
        if operation.ended is not None:
            payload["endTime"] = operation.ended
        if operation.status == "Failed":
            payload.update(self._failure_body(operation))
        return 200, {}, payload

    @staticmethod
    def _failure_body(operation: _Operation) -> dict[str, Any]:
        rule = operation.failure
        assert rule is not None
        return _error(rule.error_code, rule.error_message)

    def _list(self, resource_group: str | None, filter_text: str | None) -> _Response:
        tag_name = tag_value = None
        if filter_text:
            parsed = _TAG_FILTER.match(filter_text.strip())
            if parsed is None:
                return 400, {}, _error("InvalidFilterInQueryString", f"bad $filter {filter_text!r}")
            tag_name, tag_value = parsed["name"], parsed["value"]
        value = []
        for resource in self._resources.values():
            if resource_group and resource["id"].split("/")[4].lower() != resource_group.lower():
                continue
            tags = resource.get("tags") or {}
            if tag_name is not None and tag_name not in tags:
                continue
            if tag_value is not None and tags.get(tag_name) != tag_value:
                continue
            item = {k: resource[k] for k in ("id", "name", "type", "location")}
            if tag_value is None:
                item["tags"] = dict(tags)
            if "managedBy" in resource:
                item["managedBy"] = resource["managedBy"]
            value.append(item)
        return 200, {}, {"value": value}


def _type_key(type_name: str) -> str:
    lowered = type_name.lower()
    if "/" in lowered:
        return lowered
    for key in MANAGED_TYPES:
        if key.endswith("/" + lowered):
            return key
    return lowered


class StaticTokenCredential:
    """A ``TokenCredential`` handing out ``FAKE_TOKEN``: what the fake ARM accepts."""

    def __init__(self) -> None:
        self.scopes_asked: list[tuple[str, ...]] = []

    def get_token(self, *scopes: str, **_: Any) -> AccessToken:
        self.scopes_asked.append(scopes)
        return AccessToken(FAKE_TOKEN, int(time.time()) + 3600)


# What a provision asks of ARM, in order (method, resource type), and what a teardown deletes,
# in dependency order: the sequences the tests expect of the provider.
RUN_CREATIONS: tuple[tuple[str, str], ...] = (
    ("PUT", "networkSecurityGroups"),
    ("PUT", "publicIPAddresses"),
    ("PUT", "virtualNetworks"),
    ("PUT", "networkInterfaces"),
    ("PUT", "virtualMachines"),
    ("PATCH", "disks"),
)
RUN_DELETIONS: tuple[str, ...] = (
    "virtualMachines",
    "networkInterfaces",
    "publicIPAddresses",
    "networkSecurityGroups",
    "virtualNetworks",
    "disks",
)

TEST_RESOURCE_GROUP = "rg-aicert-runs"
TEST_IMAGE_ID = (
    "/subscriptions/11111111-1111-1111-1111-111111111111/resourceGroups/rg-images/providers/"
    "Microsoft.Compute/galleries/aicert_gallery/images/aicert-guest/versions/1.0.0"
)
TEST_SSH_KEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHq3gTlqDK0sBvOH5pLpY3mF9q0hYzYyqS3qfS4hCk0b ops"
)
TEST_ORCHESTRATOR = "203.0.113.7"


def azure_settings_for(fake: FakeArm, **overrides: Any) -> AzureSettings:
    """``AzureSettings`` pointing at ``fake``, with fast polling and retry backoff."""
    from aicert.tasks.platforms.azure import AzureSettings

    values: dict[str, Any] = {
        "subscription_id": fake.subscription_id,
        "resource_group": TEST_RESOURCE_GROUP,
        "location": "westeurope",
        "image_id": TEST_IMAGE_ID,
        "orchestrator_cidr": TEST_ORCHESTRATOR,
        "ssh_public_key": TEST_SSH_KEY,
        "arm_endpoint": fake.url,
        "polling_interval_s": 0.01,
        "progress_interval_s": 0.02,
        "retry_backoff_factor": 0.01,
        "agent_start_timeout_s": 20.0,
    }
    values.update(overrides)
    return AzureSettings(**values)
