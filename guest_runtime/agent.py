"""The certification agent: the code that runs on the attested machine.

It measures inputs into PCR 14, runs the training container without network, measures
the outputs into PCR 15 and quotes. Each step is a method so that the orchestrator (the
Prefect flow, through the HTTP API) can drive, retry and observe them one by one. The agent
enforces the order of steps itself: nothing the orchestrator sends can make it quote a run
whose inputs were not all measured, or measure an input after training started.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import stat
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from aicert.appevents import (
    INPUTS_PCR,
    OUTPUTS_PCR,
    ChannelKeyEvent,
    ConfigEvent,
    EventData,
    ImageEvent,
    OutputFileEvent,
    PackageEvent,
    ResourceEvent,
    ResultEvent,
    RuntimeEvent,
    SourceEvent,
    application_pcr_start,
    event_digest,
    extend,
)
from aicert.guest_runtime import RUNTIME_VERSION, gitsource
from aicert.guest_runtime.config import RunConfig, parse_config
from aicert.guest_runtime.staged_inputs import UnpackedInputs
from aicert.hashing import FileDigest, UnsafePathError, hash_tree, sha256_file, tree_sha256
from aicert.model import MAX_EVENTS, MAX_OUTPUT_FILES, AppEvent, PlatformKind
from aicert.reference_values import platform_quote_nonce

log = logging.getLogger(__name__)

QUOTED_PCRS = tuple(range(16))
DOWNLOAD_ATTEMPTS = 4
DOWNLOAD_CHUNK = 4 * 1024 * 1024


class AgentError(RuntimeError):
    """A certification step failed; the message says which and why."""


class StepOrderError(AgentError):
    """A step was asked for out of order (e.g. a quote before the outputs were measured)."""


class InputMismatchError(AgentError):
    """A pinned input digest does not match what was fetched: the run stops before training."""


class SourceError(AgentError, gitsource.SourceError):
    """The git source cannot be fetched or the requested ref does not exist."""


class DownloadError(AgentError):
    """A resource could not be downloaded after retries."""


class TrainingFailedError(AgentError):
    """The training job exited non-zero or timed out: no certificate for this run."""


class DependencyError(AgentError):
    """requirements.txt could not be resolved to wheels (with the machine's pip config)."""


class UnsafeOutputError(AgentError):
    """The outputs folder holds something that cannot be measured safely (a symlink out of it,
    a special file): no certificate for this run."""


class MissingOutputsError(AgentError):
    """The run left fewer output files than its ``outputs.minFiles``: no certificate."""


class TooManyOutputsError(AgentError):
    """The run left more output files than a certificate may list (``MAX_OUTPUT_FILES``)."""


class EventLimitError(AgentError):
    """The run would measure more events than a certificate may hold (``MAX_EVENTS``)."""


Step = Literal["started", "inputs", "built", "training", "trained", "measured", "quoted"]
_ORDER: tuple[Step, ...] = (
    "started",
    "inputs",
    "built",
    "training",
    "trained",
    "measured",
    "quoted",
)
_TRAINING_STARTED: tuple[Step, ...] = _ORDER[_ORDER.index("training") :]


@dataclass
class WorkProgress:
    """What the agent is doing right now, for progress displays (hashing, downloads)."""

    phase: str = "idle"
    done_bytes: int = 0
    total_bytes: int | None = None
    message: str = ""

    def begin(self, phase: str, total_bytes: int | None) -> None:
        self.phase, self.done_bytes, self.total_bytes = phase, 0, total_bytes

    def advance(self, count: int) -> None:
        self.done_bytes += count

    def end(self) -> None:
        self.phase, self.total_bytes = "idle", None

    def snapshot(self) -> dict[str, object]:
        return {
            "phase": self.phase,
            "done_bytes": self.done_bytes,
            "total_bytes": self.total_bytes,
            "message": self.message,
        }


def tree_size(root: Path) -> int:
    """Bytes in the regular files under ``root`` (symlinks not followed): a progress total."""
    total = 0
    for folder, _dirs, files in os.walk(root):
        for name in files:
            try:
                info = os.lstat(os.path.join(folder, name))
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode):
                total += info.st_size
    return total


@dataclass
class RunState:
    run_id: str
    nonce: bytes
    config: RunConfig
    workspace: Path
    started_at: datetime
    step: Step = "started"
    events: list[AppEvent] = field(default_factory=list)
    base_image_id: str | None = None
    training_image_id: str | None = None
    source_dir: Path | None = None
    exit_code: int | None = None
    duration_ms: int | None = None
    timed_out: bool = False
    training_error: str | None = None
    finished_at: datetime | None = None
    log_lines: list[str] = field(default_factory=list)
    log_condition: threading.Condition = field(default_factory=threading.Condition)
    training_thread: threading.Thread | None = None
    staged: UnpackedInputs | None = None
    # Set when a measuring step failed part-way: PCR 14/15 may hold some of its events, so
    # the run can never be certified and no later step may run (a retry would measure twice).
    failure: str | None = None

    @property
    def resources_dir(self) -> Path:
        return self.workspace / "resources"

    @property
    def outputs_dir(self) -> Path:
        return self.workspace / "outputs"

    @property
    def log_path(self) -> Path:
        return self.workspace / "logs" / "training.log"


ProgressCallback = Callable[[str], None]


class CertificationAgent:
    """Drives one run at a time on this machine's TPM and container engine."""

    def __init__(
        self,
        *,
        tpm: object,
        platform: PlatformKind,
        work_root: Path,
        progress: ProgressCallback | None = None,
        azure_intermediates: Path | None = None,
        staged_inputs: Path | None = None,
        boot_event_log: Path | None = None,
    ) -> None:
        # ``tpm`` is an aicert.guest_runtime.tpm.Tpm opened by the caller; kept untyped
        # here so this module imports without libtss2 for the orchestrator's type checks.
        self.tpm = tpm
        self.platform = platform
        self.work_root = work_root
        self.work = WorkProgress()
        report = progress or (lambda message: log.info("%s", message))

        def progress_and_remember(message: str) -> None:
            self.work.message = message
            report(message)

        self.progress = progress_and_remember
        self.run: RunState | None = None
        self._lock = threading.RLock()
        self._ak: object | None = None
        self._ek: object | None = None
        # Remote platforms: the agent's TLS key, measured into PCR 14 before serving.
        self.channel_event: AppEvent | None = None
        # Azure only: the intermediates of the pre-provisioned AK's chain, shipped in the image.
        self.azure_intermediates = azure_intermediates
        # qemu: the tar (a raw disk) with inputs the orchestrator fetched for this VM, which
        # has no network; None: the agent fetches them itself.
        self.staged_inputs = staged_inputs
        # Where the kernel exposes the TCG boot log (machines with a measured boot): a boot
        # may have extended PCR 14 already (shim's MOK lists), and that is the fresh state.
        self.boot_event_log = boot_event_log

    # -- helpers ---------------------------------------------------------------------------

    def _hash_tree_with_progress(self, root: Path, phase: str) -> list[FileDigest]:
        self.work.begin(phase, tree_size(root))
        try:
            return hash_tree(root, progress=self.work.advance)
        finally:
            self.work.end()

    def _require(self, run_id: str, *allowed: Step, observing: bool = False) -> RunState:
        """The run, if ``run_id`` is at one of the ``allowed`` steps. ``observing`` (status and
        logs) is allowed on a failed run too."""
        run = self.run
        if run is None or run.run_id != run_id:
            raise StepOrderError(f"no run {run_id!r} on this agent")
        if run.failure is not None and not observing:
            raise StepOrderError(
                f"run {run_id} failed and cannot go on ({run.failure}); "
                "start a new run on a fresh machine"
            )
        if run.step not in allowed:
            raise StepOrderError(
                f"run {run_id}: step not allowed now (the run is at {run.step!r}, "
                f"expected one of {', '.join(allowed)})"
            )
        return run

    @contextmanager
    def _measuring_step(self, run: RunState) -> Iterator[None]:
        """Any failure inside ends the run for good (see ``RunState.failure``)."""
        try:
            yield
        except BaseException as exc:
            run.failure = f"{type(exc).__name__}: {exc}"
            raise

    def _measure(self, run: RunState, data: EventData) -> AppEvent:
        if len(run.events) >= MAX_EVENTS:
            # A certificate the verifier would refuse is not worth a PCR extend.
            raise EventLimitError(
                f"more than {MAX_EVENTS} measured events (inputs and outputs): a certificate "
                "holds at most that many; no certificate is produced"
            )
        event = data.to_event()
        self.tpm.pcr_extend(event.pcr, event_digest(event))  # type: ignore[attr-defined]
        run.events.append(event)
        return event

    # -- the machine: attestation key and platform quote (before any run) ---------------------

    def key_material(self) -> dict[str, bytes | list[str] | None]:
        """EK certificate, EK and AK public areas: what the platform CA needs to activate.

        The AK belongs to the machine, not to a run: it is established (and the machine
        attested with it) before the orchestrator sends a run. Asking again returns the same
        key (a retried enrollment); once a run started, the key is fixed."""
        with self._lock:
            self._refuse_during_run("the attestation key")
            tpm = self.tpm
            if self.platform == "azure":
                # Azure pre-provisions the AK and has Microsoft's CA certify it: no activation.
                from aicert.guest_runtime.azure_ak import (
                    DEFAULT_INTERMEDIATES_PATH,
                    read_azure_attestation_key,
                )

                azure = read_azure_attestation_key(
                    tpm, self.azure_intermediates or DEFAULT_INTERMEDIATES_PATH
                )
                self._ak, self._ek = azure.ak, azure.ek
                return azure.key_material()
            if self._ek is None:
                self._ek = tpm.create_ek()  # type: ignore[attr-defined]
            if self._ak is None:
                self._ak = tpm.create_ak()  # type: ignore[attr-defined]
            return {
                "ek_certificate": tpm.ek_certificate(),  # type: ignore[attr-defined]
                "ek_public": self._ek.public_bytes,  # type: ignore[attr-defined]
                "ak_public": self._ak.public_bytes,  # type: ignore[attr-defined]
                "ak_name": self._ak.name,  # type: ignore[attr-defined]
            }

    def activate_credential(self, credential_blob: bytes, secret: bytes) -> bytes:
        with self._lock:
            self._refuse_during_run("credential activation")
            if self._ak is None:
                raise StepOrderError("no attestation key yet: ask for the key material first")
            if self.platform == "azure":
                raise StepOrderError("the Azure AK is certified by Microsoft: nothing to activate")
            return self.tpm.activate_credential(  # type: ignore[attr-defined]
                self._ak, credential_blob, secret
            )

    def _fresh_pcrs(self) -> dict[int, bytes]:
        """PCR 14 and 15 as the boot left them (see ``application_pcr_start``)."""
        log = None
        if self.boot_event_log is not None:
            try:
                log = self.boot_event_log.read_bytes()
            except OSError:
                log = None  # no measured boot on this machine (the local platform)
        return application_pcr_start(log)

    def _refuse_during_run(self, what: str) -> None:
        if self.run is not None:
            raise StepOrderError(
                f"{what} belongs to the machine and is fixed once a run started "
                f"(run {self.run.run_id})"
            )

    def platform_quote(
        self, challenge: bytes, boot_event_log: bytes | None = None
    ) -> dict[str, object]:
        """Quote PCR 0-15 with the machine's AK over the orchestrator's challenge.

        Asked once the AK is certified and before the run is sent, so the orchestrator can
        check the boot chain and the channel key first. The extraData is
        ``platform_quote_nonce(challenge)``, never a run nonce: this quote cannot be passed
        off as a run's final quote."""
        with self._lock:
            if self._ak is None:
                raise StepOrderError("no attestation key yet: ask for the key material first")
            if not 16 <= len(challenge) <= 64:
                raise AgentError("the platform quote challenge must be 16 to 64 bytes")
            quote = self.tpm.quote(  # type: ignore[attr-defined]
                self._ak, QUOTED_PCRS, platform_quote_nonce(challenge)
            )
            return {
                "attest": quote.attest,
                "signature": quote.signature,
                "pcrs": {str(i): value.hex() for i, value in sorted(quote.pcrs.items())},
                "ak_public": self._ak.public_bytes,  # type: ignore[attr-defined]
                "boot_event_log": boot_event_log,
                "channel_key": (
                    self.channel_event.data if self.channel_event is not None else None
                ),
            }

    def measure_channel_key(self, event: ChannelKeyEvent) -> None:
        """Extend PCR 14 with the agent's channel (TLS) key, before it serves anything: the
        first PCR 14 event of the machine, so a platform quote binds the key to the TPM."""
        with self._lock:
            if self.channel_event is not None or self.run is not None:
                raise StepOrderError("the channel key is measured once, before any run")
            fresh = self._fresh_pcrs()
            if self.tpm.pcr_read([INPUTS_PCR])[INPUTS_PCR] != fresh[INPUTS_PCR]:  # type: ignore[attr-defined]
                raise AgentError("PCR 14 is not in its boot state: reboot the machine")
            measured = event.to_event()
            self.tpm.pcr_extend(measured.pcr, event_digest(measured))  # type: ignore[attr-defined]
            self.channel_event = measured

    # -- step 1: start ---------------------------------------------------------------------

    def start_run(self, run_id: str, nonce: bytes, config_data: dict) -> list[AppEvent]:
        with self._lock:
            if self.run is not None:
                raise StepOrderError(
                    f"this machine already ran {self.run.run_id}: a run needs a fresh machine"
                    if self._finished()
                    else f"the agent is busy with run {self.run.run_id}"
                )
            if len(nonce) < 16:
                raise AgentError("the nonce must be at least 16 bytes")
            config = parse_config(config_data, source="config")
            if self._ak is None:
                raise StepOrderError(
                    "no attestation key yet: the machine's AK is established before a run"
                )
            workspace = self.work_root / run_id
            if workspace.exists():
                raise AgentError(f"run {run_id} already has a workspace at {workspace}")
            pcrs = self.tpm.pcr_read([INPUTS_PCR, OUTPUTS_PCR])  # type: ignore[attr-defined]
            fresh = self._fresh_pcrs()
            expected_inputs = fresh[INPUTS_PCR]
            if self.channel_event is not None:
                expected_inputs = extend(expected_inputs, event_digest(self.channel_event))
            if pcrs[INPUTS_PCR] != expected_inputs or pcrs[OUTPUTS_PCR] != fresh[OUTPUTS_PCR]:
                # A certificate replays the log from zeros: a TPM whose PCR 14/15 were
                # already extended (a reused machine) cannot produce a valid one.
                raise AgentError("PCR 14/15 are not in their reset state: reboot the machine")
            for sub in ("resources", "outputs", "logs"):
                (workspace / sub).mkdir(parents=True)
            started = datetime.now(UTC)
            run = RunState(run_id, nonce, config, workspace, started)
            if self.channel_event is not None:
                run.events.append(self.channel_event)
            self.run = run
            first = len(run.events)
            with self._measuring_step(run):
                self._measure(
                    run,
                    RuntimeEvent(
                        runtime_version=RUNTIME_VERSION,
                        run_id=run_id,
                        nonce=nonce.hex(),
                        platform=self.platform,
                        started_at=started.isoformat(),
                    ),
                )
                self._measure(run, ConfigEvent(config=config.measured_form()))
            return run.events[first:]

    def _finished(self) -> bool:
        run = self.run
        return run is not None and (
            run.step == "quoted" or run.training_error is not None or run.failure is not None
        )

    # -- step 3: inputs ------------------------------------------------------------------------

    def measure_inputs(self, run_id: str) -> list[AppEvent]:
        """Base image, source and resources into PCR 14, in that order."""
        with self._lock:
            run = self._require(run_id, "started")
            first = len(run.events)
            with self._measuring_step(run):
                if self.staged_inputs is not None:
                    self._unpack_staged_inputs(run)
                self._measure_base_image(run)
                self._fetch_source(run)
                for resource in run.config.resources:
                    self._fetch_resource(run, resource)
            run.step = "inputs"
            return run.events[first:]

    def _measure_base_image(self, run: RunState) -> None:
        import docker

        client = docker.from_env(timeout=120)
        try:
            image = client.images.get(run.config.image)
        except docker.errors.ImageNotFound:
            raise AgentError(
                f"image: {run.config.image!r} is not on this machine "
                "(build the default one with `aicert image build-base`)"
            ) from None
        except docker.errors.DockerException as exc:
            raise AgentError(f"image: the Docker engine cannot be reached: {exc}") from None
        finally:
            client.close()
        run.base_image_id = image.id
        self._measure(run, ImageEvent(role="base", name=run.config.image, image_id=image.id))

    def _unpack_staged_inputs(self, run: RunState) -> None:
        import docker

        from aicert.guest_runtime.staged_inputs import StagedInputsError, unpack_staged_inputs

        assert self.staged_inputs is not None
        client = docker.from_env(timeout=600)
        size = _device_size(self.staged_inputs)
        self.progress(f"reading staged inputs from {self.staged_inputs} ({size / 1e6:.1f} MB)")

        def load_image(chunks: Iterator[bytes]) -> list[str]:
            try:
                images = client.images.load(chunks)
            except docker.errors.DockerException as exc:
                raise AgentError(f"image: the staged image does not load: {exc}") from exc
            return [tag for image in images for tag in image.tags]

        self.work.begin("reading staged inputs", size)
        try:
            run.staged = unpack_staged_inputs(
                self.staged_inputs,
                run.workspace / "staged",
                load_image,
                on_bytes=self.work.advance,
            )
        except StagedInputsError as exc:
            raise InputMismatchError(str(exc)) from exc
        finally:
            self.work.end()
            client.close()
        self.progress(f"staged inputs read; image loaded as {', '.join(run.staged.loaded_images)}")

    def _staged_checkout(self, run: RunState) -> tuple[Path, str]:
        """The staged source tree and its commit, which the tree is shown to be."""
        from aicert.guest_runtime.staged_inputs import StagedInputsError, verified_commit

        assert run.staged is not None
        tree, commit_file = run.staged.source_tree, run.staged.source_commit
        if not tree.is_dir() or not commit_file.is_file():
            raise SourceError("source: the staged inputs carry no source tree and commit")
        try:
            return tree, verified_commit(commit_file.read_bytes(), tree)
        except StagedInputsError as exc:
            raise SourceError(str(exc)) from exc

    def _fetch_source(self, run: RunState) -> None:
        source = run.config.source
        if run.staged is not None:
            checkout, commit = self._staged_checkout(run)
            if source.commit and not commit.startswith(source.commit):
                raise SourceError(
                    f"source.commit: {source.commit} but the staged commit is {commit}"
                )
        else:
            checkout, commit = self._clone_source(run)
        source_dir = checkout
        if source.subdirectory:
            source_dir = (checkout / source.subdirectory).resolve()
            if not source_dir.is_relative_to(checkout.resolve()) or not source_dir.is_dir():
                raise SourceError(f"source.subdirectory: {source.subdirectory!r} is not a folder")
        digests = self._hash_tree_with_progress(source_dir, "hashing source")
        run.source_dir = source_dir
        self._measure(
            run,
            SourceEvent(
                type="git",
                url=source.git_repo,
                ref=source.ref,
                subdirectory=source.subdirectory,
                commit=commit,
                tree_sha256=tree_sha256(digests),
                file_count=len(digests),
                size=sum(d.size for d in digests),
            ),
        )

    def _clone_source(self, run: RunState) -> tuple[Path, str]:
        source = run.config.source
        checkout = run.workspace / "checkout"
        self.progress(f"fetching source {source.git_repo} ({source.ref or 'default branch'})")
        try:
            commit = gitsource.clone_source(source, checkout)
        except gitsource.SourceError as exc:
            raise SourceError(str(exc)) from None
        shutil.rmtree(checkout / ".git")
        return checkout, commit

    def _fetch_resource(self, run: RunState, resource: object) -> None:
        url: str = resource.url  # type: ignore[attr-defined]
        destination: str = resource.destination_path  # type: ignore[attr-defined]
        pinned: str | None = resource.sha256  # type: ignore[attr-defined]
        target = (run.resources_dir / destination).resolve()
        if not target.is_relative_to(run.resources_dir.resolve()):
            raise AgentError(f"resources: destinationPath {destination!r} leaves the folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        if run.staged is not None:
            staged = run.staged.resource(destination)
            if not staged.is_file() or staged.is_symlink():
                raise DownloadError(f"resources[{destination}]: not in the staged inputs")
            os.replace(staged, target)
            self.work.begin(f"hashing {destination}", target.stat().st_size)
            try:
                digest, size = sha256_file(target, progress=self.work.advance)
            finally:
                self.work.end()
        else:
            self.work.begin(f"downloading {destination}", None)
            try:
                digest, size = download(
                    url,
                    target,
                    progress=self.progress,
                    on_bytes=self.work.advance,
                    on_total=lambda total: setattr(self.work, "total_bytes", total),
                )
            finally:
                self.work.end()
        if pinned is not None and digest != pinned:
            raise InputMismatchError(
                f"resources[{destination}]: sha256 of {url} is {digest}, "
                f"but the config pins {pinned}; training will not start"
            )
        self._measure(
            run, ResourceEvent(url=url, destination=destination, sha256=digest, size=size)
        )

    # -- step 4: dependencies and the training image -----------------------------------------

    def build_image(self, run_id: str) -> list[AppEvent]:
        with self._lock:
            run = self._require(run_id, "inputs")
            first = len(run.events)
            assert run.source_dir is not None and run.base_image_id is not None
            requirements = run.source_dir / "requirements.txt"
            from aicert.guest_runtime.wheelhouse import (
                WheelhouseError,
                build_training_image,
                has_requirements,
                resolve_wheelhouse,
                staged_wheelhouse,
            )

            with self._measuring_step(run):
                if requirements.is_file() and has_requirements(requirements):
                    wheel_dir = run.workspace / "wheels"
                    try:
                        if run.staged is not None:
                            wheel_dir = run.staged.wheels
                            wheels = staged_wheelhouse(wheel_dir)
                        else:
                            wheels = resolve_wheelhouse(
                                requirements,
                                wheel_dir,
                                python_version=run.config.python_version,
                                progress=self.progress,
                            )
                    except WheelhouseError as exc:
                        raise DependencyError(f"requirements.txt: {exc}") from exc
                    for wheel in wheels:
                        self._measure(
                            run,
                            PackageEvent(
                                name=wheel.name,
                                version=wheel.version,
                                filename=wheel.filename,
                                sha256=wheel.sha256,
                                size=wheel.size,
                            ),
                        )
                    tag = training_image_tag(run.run_id)
                    try:
                        image_id = build_training_image(
                            run.base_image_id, wheel_dir, wheels, tag=tag, progress=self.progress
                        )
                    except WheelhouseError as exc:  # the engine's failure, not the inputs'
                        raise AgentError(f"training image: {exc}") from exc
                    run.training_image_id = image_id
                    self._measure(run, ImageEvent(role="training", name=tag, image_id=image_id))
                else:
                    run.training_image_id = run.base_image_id
            run.step = "built"
            return run.events[first:]

    # -- step 5: training --------------------------------------------------------------------

    def start_training(self, run_id: str) -> None:
        with self._lock:
            run = self._require(run_id, "built")
            run.step = "training"
            thread = threading.Thread(
                target=self._train, args=(run,), name=f"training-{run_id}", daemon=True
            )
            run.training_thread = thread
            thread.start()

    def stop_training(self) -> None:
        """Kill the run's training container, if one runs (the agent is shutting down)."""
        run = self.run
        if run is None or run.step != "training":
            return
        import docker

        try:
            client = docker.from_env(timeout=30)
            try:
                for container in client.containers.list(
                    filters={"label": f"aicert.run={run.run_id}"}
                ):
                    container.kill()
                    log.warning(
                        "killed training container %s of run %s", container.name, run.run_id
                    )
            finally:
                client.close()
        except docker.errors.DockerException as exc:
            log.error("could not stop the training container of run %s: %s", run.run_id, exc)

    def _append_log(self, run: RunState, line: str) -> None:
        with run.log_condition:
            run.log_lines.append(line)
            run.log_condition.notify_all()

    def _train(self, run: RunState) -> None:
        from aicert.guest_runtime.container import describe_ending, run_training_container

        try:
            assert run.source_dir is not None and run.training_image_id is not None
            limits = run.config.limits
            result = run_training_container(
                run.training_image_id,
                command=run.config.entry_command,
                source_dir=run.source_dir,
                resources_dir=run.resources_dir,
                outputs_dir=run.outputs_dir,
                outputs_mount=run.config.outputs_path,
                cpu_limit=limits.cpus,
                memory_limit=limits.memory,
                pids_limit=limits.pids,
                gpus=run.config.gpus or None,
                timeout_s=limits.timeout_seconds,
                on_log_line=lambda line: self._append_log(run, line),
                log_path=run.log_path,
                env=dict(run.config.env),
                name=f"aicert-{run.run_id}",
                labels={"aicert.run": run.run_id},
            )
            run.exit_code = result.exit_code
            run.duration_ms = result.duration_ms
            run.timed_out = result.timed_out
            run.finished_at = datetime.now(UTC)
            run.training_error = describe_ending(
                result, memory_limit=limits.memory, timeout_s=limits.timeout_seconds
            )
        except Exception as exc:  # reported through training_status, never lost
            log.exception("training container failed")
            run.training_error = f"the training container could not run: {exc}"
            run.finished_at = datetime.now(UTC)
        finally:
            with self._lock:
                run.step = "trained"
            with run.log_condition:
                run.log_condition.notify_all()

    def training_status(self, run_id: str) -> dict[str, object]:
        # Before training there is no status to give: "running" would keep a follower
        # polling forever.
        run = self._require(run_id, *_TRAINING_STARTED, observing=True)
        if run.step == "training":
            state = "running"
        else:
            state = "failed" if run.training_error is not None else "succeeded"
        return {
            "state": state,
            "exit_code": run.exit_code,
            "duration_ms": run.duration_ms,
            "timed_out": run.timed_out,
            "error": run.training_error,
            "log_lines": len(run.log_lines),
        }

    def read_logs(self, run_id: str, offset: int, wait_s: float) -> tuple[list[str], int, bool]:
        """Lines from ``offset``; waits up to ``wait_s`` for new ones (long polling)."""
        run = self._require(run_id, *_TRAINING_STARTED, observing=True)
        deadline = time.monotonic() + max(0.0, wait_s)
        with run.log_condition:
            while len(run.log_lines) <= offset and run.step == "training":
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                run.log_condition.wait(remaining)
            lines = run.log_lines[offset:]
            finished = run.step != "training"
        return lines, offset + len(lines), finished and offset + len(lines) >= len(run.log_lines)

    def outputs_archive(self, run_id: str) -> Iterator[bytes]:
        """The run's ``outputs/`` and ``logs/`` as a tar stream, once training is over
        (also after a failed training: its outputs and logs are kept for the builder)."""
        from aicert.guest_runtime.archive import stream_tar

        run = self._require(run_id, *_TRAINING_STARTED, observing=True)
        if run.step == "training":
            raise StepOrderError(f"run {run_id}: training is still running")
        return stream_tar({"outputs": run.outputs_dir, "logs": run.log_path.parent})

    # -- step 6: outputs -------------------------------------------------------------------------

    def measure_outputs(self, run_id: str) -> list[AppEvent]:
        with self._lock:
            run = self._require(run_id, "trained")
            if run.training_error is not None:
                raise TrainingFailedError(
                    f"run {run_id}: {run.training_error}; outputs and logs are kept in "
                    f"{run.workspace}, no certificate is produced"
                )
            first = len(run.events)
            self.progress(f"hashing outputs in {run.outputs_dir}")
            with self._measuring_step(run):
                try:
                    # The whole tree is walked and checked before the first extend.
                    digests = self._hash_tree_with_progress(run.outputs_dir, "hashing outputs")
                except UnsafePathError as exc:
                    raise UnsafeOutputError(
                        f"outputs: {exc}; no certificate is produced, outputs and logs are "
                        f"kept in {run.workspace}"
                    ) from exc
                # Checked before the first extend: a run short of its required outputs leaves
                # PCR 15 untouched and gets no certificate.
                if len(digests) > MAX_OUTPUT_FILES:
                    raise TooManyOutputsError(
                        f"outputs: the run left {len(digests)} files in "
                        f"{run.config.outputs_path}, a certificate lists at most "
                        f"{MAX_OUTPUT_FILES} (pack many small files into shards or an archive); "
                        f"no certificate is produced, outputs and logs are kept in {run.workspace}"
                    )
                required = run.config.min_output_files
                if len(digests) < required:
                    raise MissingOutputsError(
                        f"outputs: the run left {len(digests)} file(s) in "
                        f"{run.config.outputs_path}, outputs.minFiles requires at least "
                        f"{required}; no certificate is produced, outputs and logs are kept "
                        f"in {run.workspace}"
                    )
                for digest in digests:
                    self._measure(
                        run,
                        OutputFileEvent(path=digest.path, size=digest.size, sha256=digest.sha256),
                    )
                assert run.finished_at is not None and run.exit_code is not None
                self._measure(
                    run,
                    ResultEvent(
                        exit_code=run.exit_code,
                        duration_ms=run.duration_ms or 0,
                        finished_at=run.finished_at.isoformat(),
                    ),
                )
            run.step = "measured"
            return run.events[first:]

    # -- step 7: quote ---------------------------------------------------------------------------

    def quote(self, run_id: str, boot_event_log: bytes | None = None) -> dict[str, object]:
        with self._lock:
            run = self._require(run_id, "measured", "quoted")
            quote = self.tpm.quote(self._ak, QUOTED_PCRS, run.nonce)  # type: ignore[attr-defined]
            run.step = "quoted"
            assert run.finished_at is not None
            return {
                "attest": quote.attest,
                "signature": quote.signature,
                "pcrs": {str(i): value.hex() for i, value in sorted(quote.pcrs.items())},
                "nonce": run.nonce,
                "ak_public": self._ak.public_bytes,  # type: ignore[attr-defined]
                "event_log": list(run.events),
                "boot_event_log": boot_event_log,
                "started_at": run.started_at.isoformat(),
                "finished_at": run.finished_at.isoformat(),
                "exit_code": run.exit_code,
                "duration_ms": run.duration_ms or 0,
            }


def _device_size(path: Path) -> int:
    """Bytes in a file or block device (st_size is 0 for a device)."""
    with path.open("rb") as handle:
        return handle.seek(0, os.SEEK_END)


def training_image_tag(run_id: str) -> str:
    """The tag of a run's training image; teardown removes it once the run is over."""
    return f"aicert/training:{run_id.lower()}"


def download(
    url: str,
    target: Path,
    *,
    progress: ProgressCallback | None = None,
    attempts: int = DOWNLOAD_ATTEMPTS,
    timeout_s: float = 60.0,
    on_bytes: Callable[[int], None] | None = None,
    on_total: Callable[[int | None], None] | None = None,
) -> tuple[str, int]:
    """Stream ``url`` to ``target`` while hashing it; retry transient failures with backoff.

    Returns (sha256 hex, size). A partial file never stays at ``target``.
    """
    scheme = urllib.parse.urlsplit(url).scheme
    partial = target.with_name(target.name + ".part")
    last_error: Exception | None = None
    for attempt in range(1, attempts + 1):
        try:
            digest = hashlib.sha256()
            size = 0
            request = urllib.request.Request(url, headers={"User-Agent": "aicert"})  # noqa: S310
            with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
                total = int(response.headers.get("Content-Length") or 0) or None
                if on_total is not None:
                    on_total(total)
                with partial.open("wb") as handle:
                    last_report = 0.0
                    while chunk := response.read(DOWNLOAD_CHUNK):
                        digest.update(chunk)
                        handle.write(chunk)
                        size += len(chunk)
                        if on_bytes is not None:
                            on_bytes(len(chunk))
                        now = time.monotonic()
                        if progress and now - last_report > 1.0:
                            last_report = now
                            pct = f" ({100 * size / total:.0f}%)" if total else ""
                            progress(f"downloading {target.name}: {size / 1e6:.1f} MB{pct}")
            if total is not None and size != total:
                raise DownloadError(f"{url}: received {size} of {total} bytes")
            os.replace(partial, target)
            if progress:
                progress(f"downloaded {target.name}: {size} bytes")
            return digest.hexdigest(), size
        except urllib.error.HTTPError as exc:
            partial.unlink(missing_ok=True)
            last_error = exc
            if exc.code < 500 and exc.code not in (408, 429):
                break  # a client error will not heal by retrying
        except (OSError, DownloadError) as exc:
            partial.unlink(missing_ok=True)
            last_error = exc
            if scheme == "file":
                break
        if attempt < attempts:
            delay = min(2.0 ** (attempt - 1), 10.0)
            if progress:
                progress(f"download of {url} failed ({last_error}); retrying in {delay:.0f} s")
            time.sleep(delay)
    raise DownloadError(f"resources: cannot download {url}: {last_error}")


def safe_run_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", text)[:128]
