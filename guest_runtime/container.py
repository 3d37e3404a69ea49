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
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, NotRequired, TypedDict

import docker
import docker.errors
import requests.exceptions
from docker.models.containers import Container
from docker.types import DeviceRequest, Mount

from aicert.guest_runtime.config import RunConfig

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


class CreateArgs(TypedDict):
    """The arguments of Docker's ``containers.create`` for the training container."""

    image: str
    command: list[str]
    name: str | None
    labels: dict[str, str]
    user: str
    working_dir: str
    environment: dict[str, str]
    mounts: list[Mount]
    network_mode: str
    privileged: bool
    devices: list[str]
    device_requests: list[DeviceRequest]
    cap_drop: list[str]
    security_opt: list[str]
    read_only: bool
    tmpfs: dict[str, str]
    pids_limit: int
    stdin_open: bool
    tty: bool
    nano_cpus: NotRequired[int]
    mem_limit: NotRequired[str]
    memswap_limit: NotRequired[str]


@dataclass(frozen=True, slots=True)
class SandboxSpec:
    """What the training container is: image, command, mounts and limits.

    Mounts: ``source_dir`` at /workspace/src and ``resources_dir`` at /workspace/resources
    (read-only), ``outputs_dir`` at ``outputs_mount`` (read-write, given to uid 1000).
    ``gpus``: 0 for none, n for the first n NVIDIA GPUs (``docker run --gpus n``).
    ``memory_limit`` is Docker's notation (``"4g"``); swap is not allowed beyond it. The
    container carries the label ``aicert.run`` (``labels``' own, else ``name``, else a random
    id) plus ``labels``. When ``log_path`` is given, each output line is appended to that
    file. The rest of the sandbox (no network, no devices but the GPUs asked for, no
    capabilities, read-only root, uid 1000) is fixed: see ``create_args``.
    """

    image: str
    command: tuple[str, ...]
    source_dir: Path
    resources_dir: Path
    outputs_dir: Path
    timeout_s: float
    outputs_mount: str = WORKSPACE_OUTPUTS
    cpu_limit: float | None = None
    memory_limit: str | None = None
    pids_limit: int = DEFAULT_PIDS_LIMIT
    gpus: int = 0
    env: Mapping[str, str] = field(default_factory=dict)
    name: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    log_path: Path | None = None

    @classmethod
    def for_run(
        cls,
        config: RunConfig,
        *,
        image: str,
        run_id: str,
        source_dir: Path,
        workspace: Path,
        log_path: Path,
    ) -> SandboxSpec:
        """The sandbox of a run: its configuration's command, limits, GPUs and environment,
        the run's source, and ``workspace``'s ``resources`` and ``outputs`` folders."""
        limits = config.limits
        return cls(
            image=image,
            command=tuple(config.entry_command),
            source_dir=source_dir,
            resources_dir=workspace / "resources",
            outputs_dir=workspace / "outputs",
            outputs_mount=config.outputs_path,
            timeout_s=limits.timeout_seconds,
            cpu_limit=limits.cpus,
            memory_limit=limits.memory,
            pids_limit=limits.pids,
            gpus=config.gpus,
            env=dict(config.env),
            name=f"aicert-{run_id}",
            labels={RUN_LABEL: run_id},
            log_path=log_path,
        )

    def checked_folders(self) -> tuple[Path, Path, Path]:
        """Source, resources and outputs, resolved; the outputs made writable by uid 1000.

        Raises:
            ContainerError: an empty command, a non-positive timeout, or a folder missing or
                given as a symlink.
        """
        if not self.command:
            raise ContainerError("the training command is empty")
        if self.timeout_s <= 0:
            raise ContainerError(f"timeout must be positive, got {self.timeout_s}")
        return (
            _checked_folder(Path(self.source_dir), "source"),
            _checked_folder(Path(self.resources_dir), "resources"),
            _prepare_outputs(Path(self.outputs_dir)),
        )

    def create_args(self, image_id: str, folders: tuple[Path, Path, Path]) -> CreateArgs:
        """Docker's ``containers.create`` arguments for ``image_id`` with ``folders`` (from
        ``checked_folders``) mounted."""
        source, resources, outputs = folders
        # The caller's run label wins: teardown finds a run's containers by it.
        run_label = self.labels.get(RUN_LABEL) or self.name or f"aicert-{uuid.uuid4().hex}"
        device_requests = [gpu_device_request(self.gpus)] if self.gpus else []
        args: CreateArgs = {
            "image": image_id,
            "command": list(self.command),
            "name": self.name,
            "labels": {**self.labels, RUN_LABEL: run_label},
            "user": TRAINING_USER,
            "working_dir": WORKSPACE_SRC,
            "environment": {"HOME": CONTAINER_TMP, "PYTHONUNBUFFERED": "1", **self.env},
            "mounts": [
                Mount(WORKSPACE_SRC, str(source), type="bind", read_only=True),
                Mount(WORKSPACE_RESOURCES, str(resources), type="bind", read_only=True),
                Mount(self.outputs_mount, str(outputs), type="bind", read_only=False),
            ],
            "network_mode": "none",
            "privileged": False,
            "devices": [],
            "device_requests": device_requests,
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges"],
            "read_only": True,
            "tmpfs": {CONTAINER_TMP: DEFAULT_TMPFS_OPTIONS},
            "pids_limit": self.pids_limit,
            "stdin_open": False,
            "tty": False,
        }
        if self.cpu_limit is not None:
            args["nano_cpus"] = int(self.cpu_limit * 1_000_000_000)
        if self.memory_limit is not None:
            args["mem_limit"] = self.memory_limit
            args["memswap_limit"] = self.memory_limit
        return args


def gpu_device_request(count: int) -> DeviceRequest:
    """The device request ``docker run --gpus <count>`` sends (docker/cli's ``GpuOpts``):
    the default driver (``""``, the NVIDIA one), ``count`` GPUs (dockerd passes devices 0 to
    count-1), the ``gpu`` capability, no options."""
    request = DeviceRequest(count=count, capabilities=[["gpu"]])
    # The CLI leaves DeviceIDs unset (Go's nil slice: JSON null), the SDK would send [].
    request["DeviceIDs"] = None
    return request


def _local_image_id(client: docker.DockerClient, image: str) -> str:
    """The ID of ``image`` in the local engine (nothing is pulled)."""
    try:
        return str(client.images.get(image).id)
    except docker.errors.ImageNotFound as exc:
        raise ContainerError(f"image not found locally (nothing is pulled): {image}") from exc
    except _DOCKER_FAILURES as exc:
        raise ContainerError(f"cannot inspect image {image}: {exc}") from exc


def run_training_container(spec: SandboxSpec, on_log_line: LogCallback) -> ContainerResult:
    """Run ``spec.command`` in the training sandbox; return how it ended.

    Each output line (stdout and stderr) goes to ``on_log_line`` as it is written. A non-zero
    exit is reported in the result, not raised. After ``spec.timeout_s`` the container is
    killed and the result has ``timed_out=True``. The container is removed in every case.

    Raises:
        ContainerError: Docker cannot run the job (engine down, image missing, ...).
    """
    folders = spec.checked_folders()
    client = _docker_client()
    image_id = _local_image_id(client, spec.image)
    with _Attached(client, spec, image_id, folders, on_log_line) as attached:
        return attached.run()


class _Attached:
    """A created training container with its output followed from before its start; leaving
    the ``with`` removes the container and closes the log stream and file, whatever happened."""

    def __init__(
        self,
        client: docker.DockerClient,
        spec: SandboxSpec,
        image_id: str,
        folders: tuple[Path, Path, Path],
        on_log_line: LogCallback,
    ) -> None:
        self._client = client
        self._spec = spec
        self._image_id = image_id
        self._folders = folders
        self._on_log_line = on_log_line
        self._container: Container | None = None
        self._frames: Iterator[tuple[bytes | None, bytes | None]] | None = None
        self._pump: _LogPump | None = None
        self._log_file: BinaryIO | None = None

    def __enter__(self) -> _Attached:
        try:
            self._container = self._client.containers.create(
                **self._spec.create_args(self._image_id, self._folders)
            )
        except _DOCKER_FAILURES as exc:
            raise ContainerError(f"cannot create the training container: {exc}") from exc
        try:
            self._attach()
        except BaseException:
            self._release()
            raise
        return self

    def _attach(self) -> None:
        assert self._container is not None
        log_path = self._spec.log_path
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(log_path, "ab")  # closed by _release
        # Attach before start, so that not a byte of output is missed.
        try:
            self._frames = self._client.api.attach(
                self._container.id, stdout=True, stderr=True, stream=True, logs=True, demux=True
            )
        except _DOCKER_FAILURES as exc:
            raise ContainerError(f"cannot attach to the training container: {exc}") from exc
        self._pump = _LogPump(self._frames, self._on_log_line, self._log_file)
        self._pump.start()

    def __exit__(self, *_: object) -> None:
        self._release()

    def run(self) -> ContainerResult:
        """Start the container, wait for it (killing it at the timeout), drain its output."""
        container, pump = self._container, self._pump
        assert container is not None and pump is not None
        started_at = datetime.now(UTC)
        started = time.monotonic()
        try:
            container.start()
        except _DOCKER_FAILURES as exc:
            raise ContainerError(_start_failure(exc, self._spec.gpus)) from exc
        status, timed_out = _wait_or_kill(container, self._spec.timeout_s, started)
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
            image_id=self._image_id,
            oom_killed=bool(state.get("OOMKilled", False)),
            log_path=self._spec.log_path,
        )

    def _release(self) -> None:
        container = self._container
        if container is not None:
            try:
                container.remove(force=True)
            except docker.errors.NotFound:
                pass
            except _DOCKER_FAILURES:
                logger.exception("could not remove training container %s", container.id)
        if self._frames is not None:
            close = getattr(self._frames, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()
        if self._pump is not None:
            self._pump.join(5.0)
        if self._log_file is not None:
            self._log_file.close()


# What dockerd answers a device request for GPUs when no NVIDIA device driver is registered
# (the NVIDIA Container Toolkit is not installed or not configured for Docker).
_NO_GPU_DRIVER = "could not select device driver"


def _start_failure(exc: Exception, gpus: int) -> str:
    """Why the training container could not start; for a GPU job refused for want of the
    NVIDIA runtime, says so in the config's terms."""
    if gpus and _NO_GPU_DRIVER in str(exc):
        return (
            f"gpus: {gpus} GPUs asked for, but this machine's Docker engine cannot pass GPUs: "
            "the NVIDIA Container Toolkit is missing or not configured for Docker (the engine "
            f"answered: {exc}); the job was not started"
        )
    return f"cannot start the training container: {exc}"


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
