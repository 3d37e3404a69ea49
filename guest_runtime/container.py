"""Run the training job in a locked-down Docker container and stream its logs.

The container sees its source and resources read-only and one writable outputs folder. It has
no network, no devices (so no TPM), no Docker socket, no capabilities, a read-only root file
system, and runs as uid 1000. The wait has its own timeout (Prefect's ``timeout_seconds`` cannot
interrupt a blocking ``container.wait()``), and the container is removed whatever happens.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import docker
import docker.errors
import requests.exceptions
from docker.models.containers import Container
from docker.types import DeviceRequest, Mount

logger = logging.getLogger(__name__)

RUN_LABEL = "aicert.run"
TRAINING_USER = "1000:1000"
TRAINING_UID = 1000
TRAINING_GID = 1000

WORKSPACE_SRC = "/workspace/src"
WORKSPACE_RESOURCES = "/workspace/resources"
WORKSPACE_OUTPUTS = "/workspace/outputs"
# Inside the container: a private tmpfs, the only writable place besides the outputs.
CONTAINER_TMP = "/tmp"  # noqa: S108

DEFAULT_PIDS_LIMIT = 4096
DEFAULT_TMPFS_OPTIONS = "rw,nosuid,nodev,size=1g"
# A line longer than this is passed on in pieces, so one endless line cannot exhaust memory.
MAX_LOG_LINE_BYTES = 64 * 1024
# After the job ends, how long the log reader may take to drain what Docker still holds.
LOG_DRAIN_TIMEOUT_S = 30.0
KILL_WAIT_TIMEOUT_S = 30.0

LogCallback = Callable[[str], None]

_END_OF_LINE = re.compile(rb"\r\n|\r|\n")
# Failures of the engine or of the connection to it (requests raises the latter).
_DOCKER_FAILURES = (docker.errors.DockerException, requests.exceptions.RequestException)


class ContainerError(RuntimeError):
    """Docker could not run the job (engine unreachable, image missing, API failure).

    A job that runs and exits non-zero is not an error: see ``ContainerResult.exit_code``.
    """


@dataclass(frozen=True, slots=True)
class ContainerResult:
    """How the training container ended."""

    exit_code: int
    duration_ms: int
    started_at: datetime
    finished_at: datetime
    timed_out: bool
    container_id: str
    image_id: str
    oom_killed: bool = False
    log_path: Path | None = None


def describe_ending(
    result: ContainerResult, *, memory_limit: str | None, timeout_s: float
) -> str | None:
    """Why the job did not succeed, from Docker's view of the container, or None when it
    exited 0. An exit code of 137 alone does not tell an out-of-memory kill from a
    ``docker kill``: Docker's ``State.OOMKilled`` does, and a timeout is ours."""
    code = result.exit_code
    if result.timed_out:
        return f"training timed out after {timeout_s:g} s (limits.timeoutSeconds) and was killed"
    if result.oom_killed:
        limit = f"limits.memory {memory_limit}" if memory_limit else "the host's memory"
        return (
            f"training ran out of memory: Docker OOM-killed the container ({limit}; "
            f"exit code {code})"
        )
    if code == 0:
        return None
    if 128 < code < 128 + 65:
        try:
            name = signal.Signals(code - 128).name
        except ValueError:
            name = f"signal {code - 128}"
        return (
            f"training was killed by {name} (exit code {code}), not for lack of memory "
            "(Docker reports no OOM kill): something outside the job stopped it"
        )
    return f"training exited with code {code}"


class _LineSplitter:
    """Turns one output stream's chunks into lines (``\\n``, ``\\r\\n`` or ``\\r`` ended).

    ``\\r`` counts as an end of line because progress bars (tqdm) redraw with it and would
    otherwise accumulate into one line shown only at the end of training.
    """

    def __init__(self, emit: Callable[[bytes], None]) -> None:
        self._emit = emit
        self._pending = bytearray()
        self._after_cr = False

    def feed(self, chunk: bytes) -> None:
        if self._after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # the \n of a \r\n split across two chunks
        self._after_cr = False
        start = 0
        for match in _END_OF_LINE.finditer(chunk):
            self._pending += chunk[start : match.start()]
            self._flush()
            start = match.end()
            self._after_cr = match.group() == b"\r" and start == len(chunk)
        self._pending += chunk[start:]
        while len(self._pending) >= MAX_LOG_LINE_BYTES:
            piece = bytes(self._pending[:MAX_LOG_LINE_BYTES])
            del self._pending[:MAX_LOG_LINE_BYTES]
            self._emit(piece)

    def close(self) -> None:
        if self._pending:
            self._flush()

    def _flush(self) -> None:
        line = bytes(self._pending)
        self._pending.clear()
        self._emit(line)


class _LogPump:
    """Reads the attached output in a thread; sends lines to the callback and the log file."""

    def __init__(
        self,
        frames: Iterable[tuple[bytes | None, bytes | None]],
        on_log_line: LogCallback,
        log_file: BinaryIO | None,
    ) -> None:
        self._frames = frames
        self._on_log_line = on_log_line
        self._log_file = log_file
        self._lock = threading.Lock()
        self._callback_failed = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="aicert-container-logs", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _emit(self, raw_line: bytes) -> None:
        # Decoding after splitting: a multi-byte character split across chunks stays intact.
        line = raw_line.decode("utf-8", errors="replace")
        with self._lock:
            if self._log_file is not None:
                self._log_file.write(raw_line + b"\n")
                self._log_file.flush()
            try:
                self._on_log_line(line)
            except Exception:
                # A broken log sink must not kill the job's output capture: keep writing the file.
                if not self._callback_failed:
                    logger.exception("container log callback failed; continuing")
                    self._callback_failed = True

    def _run(self) -> None:
        stdout = _LineSplitter(self._emit)
        stderr = _LineSplitter(self._emit)
        try:
            for out_chunk, err_chunk in self._frames:
                if out_chunk:
                    stdout.feed(out_chunk)
                if err_chunk:
                    stderr.feed(err_chunk)
        except Exception as exc:  # the stream breaks when the container is removed early
            self.error = exc
        finally:
            stdout.close()
            stderr.close()


def _docker_client() -> docker.DockerClient:
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        raise ContainerError(f"the Docker engine is not reachable: {exc}") from exc
    return client


def _checked_folder(path: Path, role: str) -> Path:
    if path.is_symlink():
        raise ContainerError(f"{role} folder must not be a symlink: {path}")
    resolved = path.resolve()
    if not resolved.is_dir():
        raise ContainerError(f"{role} folder does not exist or is not a folder: {path}")
    return resolved


def _prepare_outputs(outputs_dir: Path) -> Path:
    """Make the outputs folder writable by the training user (uid 1000)."""
    if outputs_dir.is_symlink():
        raise ContainerError(f"outputs folder must not be a symlink: {outputs_dir}")
    outputs_dir.mkdir(parents=True, exist_ok=True)
    resolved = _checked_folder(outputs_dir, "outputs")
    info = resolved.stat()
    if (info.st_uid, info.st_gid) != (TRAINING_UID, TRAINING_GID):
        try:
            os.chown(resolved, TRAINING_UID, TRAINING_GID, follow_symlinks=False)
        except PermissionError as exc:
            raise ContainerError(
                f"cannot give the outputs folder to uid {TRAINING_UID} (run as root): {exc}"
            ) from exc
    if not stat.S_IMODE(info.st_mode) & stat.S_IWUSR:
        resolved.chmod(stat.S_IMODE(info.st_mode) | stat.S_IRWXU)
    return resolved


def _parse_docker_time(value: str | None) -> datetime | None:
    if not value or value.startswith("0001-"):
        return None
    # Docker gives RFC 3339 with nanoseconds; datetime takes at most microseconds.
    head, _, fraction = value.rstrip("Z").partition(".")
    fraction = (fraction + "000000")[:6]
    try:
        return datetime.fromisoformat(f"{head}.{fraction}+00:00")
    except ValueError:
        return None


def run_training_container(
    image: str,
    *,
    command: list[str],
    source_dir: Path,
    resources_dir: Path,
    outputs_dir: Path,
    cpu_limit: float | None,
    memory_limit: str | None,
    gpus: int | None,
    timeout_s: float,
    on_log_line: LogCallback,
    env: Mapping[str, str] | None = None,
    name: str | None = None,
    log_path: Path | None = None,
    labels: Mapping[str, str] | None = None,
    pids_limit: int = DEFAULT_PIDS_LIMIT,
    outputs_mount: str = WORKSPACE_OUTPUTS,
) -> ContainerResult:
    """Run ``command`` in ``image`` with the training sandbox; return how it ended.

    Mounts: ``source_dir`` at /workspace/src and ``resources_dir`` at /workspace/resources
    (read-only), ``outputs_dir`` at ``outputs_mount`` (default /workspace/outputs; read-write,
    given to uid 1000).
    ``gpus``: ``None`` or 0 for none, -1 for all, n for n GPUs. ``memory_limit`` is Docker's
    notation (``"4g"``); swap is not allowed beyond it. Each output line (stdout and stderr) goes
    to ``on_log_line`` as it is written and, when ``log_path`` is given, is appended to that file.
    The container carries the label ``aicert.run`` (= ``name``, or a random id) plus ``labels``.

    A non-zero exit is reported in the result, not raised. After ``timeout_s`` the container is
    killed and the result has ``timed_out=True``. The container is removed in every case.
    Raises ``ContainerError`` when Docker cannot run the job (engine down, image missing, ...).
    """
    if not command:
        raise ContainerError("the training command is empty")
    if timeout_s <= 0:
        raise ContainerError(f"timeout must be positive, got {timeout_s}")
    source = _checked_folder(Path(source_dir), "source")
    resources = _checked_folder(Path(resources_dir), "resources")
    outputs = _prepare_outputs(Path(outputs_dir))

    client = _docker_client()
    try:
        image_id = str(client.images.get(image).id)
    except docker.errors.ImageNotFound as exc:
        raise ContainerError(f"image not found locally (nothing is pulled): {image}") from exc
    except _DOCKER_FAILURES as exc:
        raise ContainerError(f"cannot inspect image {image}: {exc}") from exc

    # The caller's run label wins: teardown finds a run's containers by it.
    run_label = (labels or {}).get(RUN_LABEL) or name or f"aicert-{uuid.uuid4().hex}"
    environment = {"HOME": CONTAINER_TMP, "PYTHONUNBUFFERED": "1", **(env or {})}
    device_requests = (
        [DeviceRequest(count=gpus, capabilities=[["gpu"]])]
        if gpus is not None and gpus != 0
        else []
    )
    create_args: dict[str, Any] = {
        "image": image_id,
        "command": list(command),
        "name": name,
        "labels": {**(labels or {}), RUN_LABEL: run_label},
        "user": TRAINING_USER,
        "working_dir": WORKSPACE_SRC,
        "environment": environment,
        "mounts": [
            Mount(WORKSPACE_SRC, str(source), type="bind", read_only=True),
            Mount(WORKSPACE_RESOURCES, str(resources), type="bind", read_only=True),
            Mount(outputs_mount, str(outputs), type="bind", read_only=False),
        ],
        "network_mode": "none",
        "privileged": False,
        "devices": [],
        "device_requests": device_requests,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "read_only": True,
        "tmpfs": {CONTAINER_TMP: DEFAULT_TMPFS_OPTIONS},
        "pids_limit": pids_limit,
        "stdin_open": False,
        "tty": False,
    }
    if cpu_limit is not None:
        create_args["nano_cpus"] = int(cpu_limit * 1_000_000_000)
    if memory_limit is not None:
        create_args["mem_limit"] = memory_limit
        create_args["memswap_limit"] = memory_limit

    container: Container | None = None
    frames: Any = None
    pump: _LogPump | None = None
    log_file: BinaryIO | None = None
    try:
        try:
            container = client.containers.create(**create_args)
        except _DOCKER_FAILURES as exc:
            raise ContainerError(f"cannot create the training container: {exc}") from exc
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log_file = open(log_path, "ab")
        # Attach before start, so that not a byte of output is missed.
        try:
            frames = client.api.attach(
                container.id, stdout=True, stderr=True, stream=True, logs=True, demux=True
            )
        except _DOCKER_FAILURES as exc:
            raise ContainerError(f"cannot attach to the training container: {exc}") from exc
        pump = _LogPump(frames, on_log_line, log_file)
        pump.start()

        started_at = datetime.now(UTC)
        started = time.monotonic()
        try:
            container.start()
        except _DOCKER_FAILURES as exc:
            raise ContainerError(f"cannot start the training container: {exc}") from exc
        status, timed_out = _wait_or_kill(container, timeout_s, started)
        duration_ms = int((time.monotonic() - started) * 1000)
        finished_at = datetime.now(UTC)

        if not pump.join(LOG_DRAIN_TIMEOUT_S):
            logger.warning("container log stream did not end %ss after exit", LOG_DRAIN_TIMEOUT_S)
        try:
            container.reload()
            state = container.attrs.get("State") or {}
        except _DOCKER_FAILURES:
            state = {}
        docker_started = _parse_docker_time(state.get("StartedAt"))
        docker_finished = _parse_docker_time(state.get("FinishedAt"))
        if docker_started and docker_finished and docker_finished >= docker_started:
            # The engine's own clock brackets the process exactly; ours includes API latency.
            started_at, finished_at = docker_started, docker_finished
            duration_ms = int((docker_finished - docker_started).total_seconds() * 1000)
        return ContainerResult(
            exit_code=int(status.get("StatusCode", -1)),
            duration_ms=duration_ms,
            started_at=started_at,
            finished_at=finished_at,
            timed_out=timed_out,
            container_id=str(container.id),
            image_id=image_id,
            oom_killed=bool(state.get("OOMKilled", False)),
            log_path=log_path,
        )
    finally:
        if container is not None:
            try:
                container.remove(force=True)
            except docker.errors.NotFound:
                pass
            except _DOCKER_FAILURES:
                logger.exception("could not remove training container %s", container.id)
        if frames is not None:
            with contextlib.suppress(Exception):
                frames.close()
        if pump is not None:
            pump.join(5.0)
        if log_file is not None:
            log_file.close()


def _wait_or_kill(container: Container, timeout_s: float, started: float) -> tuple[dict, bool]:
    """Wait for the container; kill it at the deadline. Return (wait status, timed out)."""
    try:
        return container.wait(timeout=timeout_s), False
    except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError) as exc:
        # docker-py reports its read timeout on the unix socket as either exception; before the
        # deadline it can only be a lost connection to the engine.
        if time.monotonic() - started < timeout_s * 0.99:
            raise ContainerError(f"lost the connection to the Docker engine: {exc}") from exc
    except _DOCKER_FAILURES as exc:
        raise ContainerError(f"waiting for the training container failed: {exc}") from exc
    with contextlib.suppress(docker.errors.APIError):  # it may have exited meanwhile
        container.kill()
    try:
        return container.wait(timeout=KILL_WAIT_TIMEOUT_S), True
    except _DOCKER_FAILURES as exc:
        raise ContainerError(f"the killed training container did not stop: {exc}") from exc
