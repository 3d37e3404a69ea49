"""The orchestrator's client for the guest agent's HTTP API.

The outputs archive is received by ``received_outputs`` (streamed, hashed on arrival,
checked against the certified digests)."""

from __future__ import annotations

import io
import ssl
import tarfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from aicert.guest_runtime.api_models import (
    API_PREFIX,
    ActivateRequest,
    ActivateResponse,
    EventsResponse,
    Evidence,
    Health,
    KeyMaterial,
    LogChunk,
    PlatformEvidence,
    PlatformQuoteRequest,
    ProgressReport,
    StartRunRequest,
    TrainingStatus,
)
from aicert.guest_runtime.channel import pinned_context
from aicert.guest_runtime.hostutil import ProgressCallback
from aicert.model import AppEvent
from aicert.tasks.platforms.received_outputs import (
    RECEIVE_CHUNK,
    CertifiedFile,
    OutputsReceiver,
)

ModelT = TypeVar("ModelT", bound=BaseModel)


class AgentCallError(RuntimeError):
    """The agent refused or failed a step; ``kind`` is the agent's exception class name."""

    def __init__(self, operation: str, kind: str, message: str, status: int | None) -> None:
        self.operation = operation
        self.kind = kind
        self.status = status
        super().__init__(f"{operation}: {message}")

    @property
    def is_training_failure(self) -> bool:
        return self.kind == "TrainingFailedError"

    @property
    def is_input_error(self) -> bool:
        return self.kind in {
            "ConfigError",
            "InputMismatchError",
            "SourceError",
            "DownloadError",
            "DependencyError",
        }


class AgentUnreachableError(AgentCallError):
    """No answer from the agent (not started yet, crashed, or the network is down)."""


# Consecutive unanswered log polls tolerated while following a training run.
FOLLOW_RETRIES = 5


class _IterReader(io.RawIOBase):
    """A read-only file over an iterator of byte chunks (tarfile's stream mode reads one).
    A chunk is handed out through a memoryview: no copy of its rest on each small read."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            try:
                self._pending = memoryview(next(self._chunks))
            except StopIteration:
                return 0
        count = min(len(buffer), len(self._pending))
        buffer[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count


class AgentClient:
    """``server_certificate_pem``: for an ``https://`` agent, the channel certificate pinned
    on first contact (``aicert.guest_runtime.channel``); nothing else is accepted."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 600.0,
        server_certificate_pem: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        # A plain-http agent (local platform) never uses TLS, yet httpx's default (``True``)
        # loads certifi's CA bundle for every client: 30-60 ms each, and a certification makes
        # one per task and per health probe. A context that trusts no CA costs nothing and
        # fails closed should TLS ever be attempted.
        verify = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if self.base_url.startswith("https://"):
            if server_certificate_pem is None:
                raise ValueError(
                    f"{self.base_url}: an https agent needs its pinned channel certificate"
                )
            verify = pinned_context(server_certificate_pem)
        self._http = httpx.Client(
            base_url=self.base_url + API_PREFIX, timeout=timeout_s, verify=verify
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _call(
        self,
        method: str,
        path: str,
        response_model: type[ModelT],
        *,
        body: BaseModel | None = None,
        params: dict[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> ModelT:
        operation = f"{method} {path}"
        try:
            response = self._http.request(
                method,
                path,
                content=body.model_dump_json() if body is not None else None,
                headers={"content-type": "application/json"} if body is not None else None,
                params=params,
                timeout=timeout_s if timeout_s is not None else httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.TransportError as exc:
            raise AgentUnreachableError(
                operation, type(exc).__name__, f"agent at {self.base_url} unreachable: {exc}", None
            ) from exc
        if response.status_code >= 400:
            problem: dict[str, Any] = {}
            try:
                problem = response.json()
                kind, message = problem.get("kind", "HTTPError"), problem.get("error", "")
            except ValueError:
                kind, message = "HTTPError", response.text[:500]
            if response.status_code == 422 and isinstance(problem.get("detail"), list):
                message = str(problem["detail"])
            raise AgentCallError(operation, kind, message, response.status_code)
        return response_model.model_validate_json(response.content)

    # -- API -------------------------------------------------------------------------------

    def health(self, timeout_s: float = 5.0) -> Health:
        return self._call("GET", "/health", Health, timeout_s=timeout_s)

    def wait_until_ready(self, timeout_s: float = 60.0, interval_s: float = 0.2) -> Health:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self.health(timeout_s=min(5.0, timeout_s))
            except AgentUnreachableError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(interval_s)

    def progress(self, timeout_s: float = 5.0) -> ProgressReport:
        return self._call("GET", "/progress", ProgressReport, timeout_s=timeout_s)

    def start_run(self, run_id: str, nonce: bytes, config: dict[str, Any]) -> list[AppEvent]:
        body = StartRunRequest(run_id=run_id, nonce=nonce, config=config)
        return self._call("POST", "/runs", EventsResponse, body=body).events

    def key_material(self) -> KeyMaterial:
        """The machine's EK certificate and EK/AK public areas (the AK is made on first ask)."""
        return self._call("POST", "/ak", KeyMaterial)

    def activate_credential(self, credential_blob: bytes, secret: bytes) -> bytes:
        body = ActivateRequest(credential_blob=credential_blob, encrypted_secret=secret)
        return self._call("POST", "/ak/activate", ActivateResponse, body=body).secret

    def platform_quote(self, challenge: bytes) -> PlatformEvidence:
        """A quote of PCR 0-15 with the boot event log and the measured channel key, asked
        before the run is sent."""
        body = PlatformQuoteRequest(challenge=challenge)
        return self._call("POST", "/platform-quote", PlatformEvidence, body=body)

    def measure_inputs(self, run_id: str) -> list[AppEvent]:
        return self._call("POST", f"/runs/{run_id}/inputs", EventsResponse).events

    def build_image(self, run_id: str) -> list[AppEvent]:
        return self._call("POST", f"/runs/{run_id}/image", EventsResponse).events

    def start_training(self, run_id: str) -> TrainingStatus:
        return self._call("POST", f"/runs/{run_id}/training", TrainingStatus)

    def training_status(self, run_id: str) -> TrainingStatus:
        return self._call("GET", f"/runs/{run_id}/training", TrainingStatus)

    def read_logs(self, run_id: str, offset: int, wait_s: float = 10.0) -> LogChunk:
        return self._call(
            "GET",
            f"/runs/{run_id}/logs",
            LogChunk,
            params={"offset": offset, "wait": wait_s},
            timeout_s=wait_s + 30.0,
        )

    def follow_training(
        self,
        run_id: str,
        on_line: Callable[[str], None],
        *,
        poll_wait_s: float = 5.0,
        unreachable_retries: int = FOLLOW_RETRIES,
    ) -> TrainingStatus:
        """Stream the training logs to ``on_line`` until the job ends; return its status.

        Reading logs and status changes nothing on the machine, so a dropped or timed-out poll
        (a VM under load answers slowly) is asked again, up to ``unreachable_retries`` times
        in a row, before the error is raised."""
        offset = 0
        failures = 0
        while True:
            try:
                chunk = self.read_logs(run_id, offset, poll_wait_s)
                status = self.training_status(run_id) if chunk.finished else None
            except AgentUnreachableError:
                failures += 1
                if failures > unreachable_retries:
                    raise
                time.sleep(min(2.0 * failures, 10.0))
                continue
            failures = 0
            for line in chunk.lines:
                on_line(line)
            offset = chunk.next_offset
            if status is not None and status.state != "running":
                return status

    def measure_outputs(self, run_id: str) -> list[AppEvent]:
        return self._call("POST", f"/runs/{run_id}/outputs", EventsResponse).events

    def download_archive(
        self,
        run_id: str,
        destination: Path,
        *,
        certified: Mapping[str, CertifiedFile] | None = None,
        progress: ProgressCallback | None = None,
    ) -> list[str]:
        """Fetch the run's ``outputs/`` and ``logs/`` into ``destination``; returns the file
        names. Streamed: each file is written and hashed in chunks as it arrives (a file of
        any size takes a few MiB of memory), with ``progress`` lines every few seconds. Only
        folders and regular files are accepted, and nothing lands outside ``destination``.

        ``certified``: the digests the agent measured (``received_outputs.certified_outputs``
        of the outputs step's events), keyed by path
        under ``outputs/``; every file under ``outputs/`` must be one of them, with that
        size and SHA-256, and every one of them must arrive.

        Raises:
            OutputMismatchError: a file under ``outputs/`` is not what was certified, was not
                certified, or is missing (it names the file; a file that arrived different
                is deleted).
            AgentCallError: the agent refused, or the archive is malformed or unsafe.
            AgentUnreachableError: the connection failed.
        """
        operation = f"GET /runs/{run_id}/archive"
        destination.mkdir(parents=True, exist_ok=True)
        receiver = OutputsReceiver(destination, certified, progress)
        try:
            with self._http.stream("GET", f"/runs/{run_id}/archive") as response:
                if response.status_code >= 400:
                    response.read()
                    problem = response.json() if response.content else {}
                    raise AgentCallError(
                        operation,
                        problem.get("kind", "HTTPError"),
                        problem.get("error", response.text[:500]),
                        response.status_code,
                    )
                reader = _IterReader(response.iter_raw(RECEIVE_CHUNK))
                with tarfile.open(fileobj=reader, mode="r|", bufsize=RECEIVE_CHUNK) as archive:
                    for member in archive:
                        receiver.receive(archive, member)
        except httpx.TransportError as exc:
            raise AgentUnreachableError(
                operation, type(exc).__name__, f"agent at {self.base_url} unreachable: {exc}", None
            ) from exc
        except (tarfile.TarError, OSError) as exc:
            raise AgentCallError(operation, type(exc).__name__, str(exc), None) from exc
        receiver.finish()
        return receiver.names

    def quote(self, run_id: str) -> Evidence:
        return self._call("POST", f"/runs/{run_id}/quote", Evidence)
