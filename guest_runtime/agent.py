"""The certification agent: the code that runs on the attested machine.

It measures inputs into PCR 14, runs the training container without network, measures
the outputs into PCR 15 and quotes. Each step is a method so that the orchestrator (the
Prefect flow, through the HTTP API) can drive, retry and observe them one by one. The agent
enforces the order of steps itself: nothing the orchestrator sends can make it quote a run
whose inputs were not all measured, or measure an input after training started.

The steps' work lives beside it: ``input_measurement`` (PCR 14), ``training`` (the sandboxed
job), ``output_measurement`` (PCR 15); ``run_state`` holds a run and its lifecycle rules.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from aicert.appevents import (
    INPUTS_PCR,
    OUTPUTS_PCR,
    ChannelKeyEvent,
    ConfigEvent,
    RuntimeEvent,
    application_pcr_start,
    event_digest,
    extend,
)
from aicert.guest_runtime import (
    RUNTIME_VERSION,
    gpu,
    input_measurement,
    output_measurement,
    training,
)
from aicert.guest_runtime.config import parse_config
from aicert.guest_runtime.errors import AgentError, StepOrderError
from aicert.guest_runtime.run_state import (
    TRAINING_STARTED,
    Measurer,
    ProgressCallback,
    RunState,
    Step,
    WorkProgress,
    measuring_step,
    require,
)
from aicert.model import AppEvent, PlatformKind
from aicert.reference_values import platform_quote_nonce

if TYPE_CHECKING:  # this module imports without libtss2 (the orchestrator's type checks)
    from aicert.guest_runtime.tpm import AttestationKey, Quote, Tpm, TpmObject

log = logging.getLogger(__name__)

QUOTED_PCRS = tuple(range(16))


def _quote_fields(quote: Quote, ak: AttestationKey) -> dict[str, object]:
    """The fields every quote answer has (``api_models.Evidence``, ``PlatformEvidence``)."""
    return {
        "attest": quote.attest,
        "signature": quote.signature,
        "pcrs": {str(i): value.hex() for i, value in sorted(quote.pcrs.items())},
        "ak_public": ak.public_bytes,
    }


class CertificationAgent:
    """Drives one run at a time on this machine's TPM and container engine.

    Args:
        tpm: this machine's TPM, opened by the caller.
        platform: the platform kind recorded in the run's first event.
        work_root: where each run gets its workspace.
        progress: receives progress messages (default: the log).
        azure_intermediates: Azure only: the intermediates of the pre-provisioned AK's
            chain, shipped in the image.
        staged_inputs: qemu: the tar (a raw disk) with inputs the orchestrator fetched for
            this VM, which has no network; None: the agent fetches them itself.
        boot_event_log: where the kernel exposes the TCG boot log (machines with a measured
            boot): a boot may have extended PCR 14 already (shim's MOK lists), and that is
            the fresh state.
    """

    def __init__(
        self,
        *,
        tpm: Tpm,
        platform: PlatformKind,
        work_root: Path,
        progress: ProgressCallback | None = None,
        azure_intermediates: Path | None = None,
        staged_inputs: Path | None = None,
        boot_event_log: Path | None = None,
    ) -> None:
        self.tpm = tpm
        self.platform = platform
        self.work_root = work_root
        self.work = WorkProgress()
        report = progress or (lambda message: log.info("%s", message))

        def progress_and_remember(message: str) -> None:
            self.work.message = message
            report(message)

        self.progress = progress_and_remember
        self.measurer = Measurer(tpm, self.work, progress_and_remember)
        self.run: RunState | None = None
        self._lock = threading.RLock()
        self._ak: AttestationKey | None = None
        self._ek: TpmObject | None = None
        # Remote platforms: the agent's TLS key, measured into PCR 14 before serving.
        self.channel_event: AppEvent | None = None
        self.azure_intermediates = azure_intermediates
        self.staged_inputs = staged_inputs
        self.boot_event_log = boot_event_log
        # PCR 14 as first read, for a boot whose event log is empty (see _fresh_pcrs).
        self._logless_pcr14: bytes | None = None

    def _require(self, run_id: str, *allowed: Step, observing: bool = False) -> RunState:
        return require(self.run, run_id, *allowed, observing=observing)

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
            if self.platform == "gcp":
                # GCE provisions the AK as an NV template, certified by Google's vTPM CA.
                from aicert.guest_runtime.gce_ak import read_gce_attestation_key

                gce = read_gce_attestation_key(tpm)
                self._ak, self._ek = gce.ak, gce.ek
                return gce.key_material()
            if self._ek is None:
                self._ek = tpm.create_ek()
            if self._ak is None:
                from aicert.guest_runtime.tpm import AkAlgorithm

                # ECDSA P-256: the AK also signs the run's model_signing bundle, and the
                # model_signing tool verifies only EC keys.
                self._ak = tpm.create_ak(AkAlgorithm.ECC_P256_ECDSA_SHA256)
            return {
                "ek_certificate": tpm.ek_certificate(),
                "ek_public": self._ek.public_bytes,
                "ak_public": self._ak.public_bytes,
                "ak_name": self._ak.name,
            }

    def activate_credential(self, credential_blob: bytes, secret: bytes) -> bytes:
        """TPM2_ActivateCredential with the machine's AK: the secret the platform CA sealed."""
        with self._lock:
            self._refuse_during_run("credential activation")
            ak = self._machine_ak()
            if self.platform == "azure":
                raise StepOrderError("the Azure AK is certified by Microsoft: nothing to activate")
            if self.platform == "gcp":
                raise StepOrderError("the GCE AK is certified by Google: nothing to activate")
            return self.tpm.activate_credential(ak, credential_blob, secret)

    def _machine_ak(self) -> AttestationKey:
        if self._ak is None:
            raise StepOrderError("no attestation key yet: ask for the key material first")
        return self._ak

    def _fresh_pcrs(self) -> dict[int, bytes]:
        """PCR 14 and 15 as the boot left them (see ``application_pcr_start``)."""
        boot_log = None
        if self.boot_event_log is not None:
            try:
                boot_log = self.boot_event_log.read_bytes()
            except OSError:
                boot_log = None  # no measured boot on this machine (the local platform)
        if boot_log == b"":
            # Azure Trusted Launch hands the guest a zero-byte log: nothing says what the boot
            # left in PCR 14, so its value before the agent's first event is the start; the
            # verifier requires it to equal the reference boot's value exactly.
            if self._logless_pcr14 is None:
                self._logless_pcr14 = self.tpm.pcr_read([INPUTS_PCR])[INPUTS_PCR]
            return {INPUTS_PCR: self._logless_pcr14, OUTPUTS_PCR: bytes(32)}
        return application_pcr_start(boot_log)

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
            ak = self._machine_ak()
            if not 16 <= len(challenge) <= 64:
                raise AgentError("the platform quote challenge must be 16 to 64 bytes")
            quote = self.tpm.quote(ak, QUOTED_PCRS, platform_quote_nonce(challenge))
            channel = self.channel_event
            return {
                **_quote_fields(quote, ak),
                "boot_event_log": boot_event_log,
                "channel_key": channel.data if channel is not None else None,
            }

    def measure_channel_key(self, event: ChannelKeyEvent) -> None:
        """Extend PCR 14 with the agent's channel (TLS) key, before it serves anything: the
        first PCR 14 event of the machine, so a platform quote binds the key to the TPM."""
        with self._lock:
            if self.channel_event is not None or self.run is not None:
                raise StepOrderError("the channel key is measured once, before any run")
            fresh = self._fresh_pcrs()
            if self.tpm.pcr_read([INPUTS_PCR])[INPUTS_PCR] != fresh[INPUTS_PCR]:
                raise AgentError("PCR 14 is not in its boot state: reboot the machine")
            measured = event.to_event()
            self.tpm.pcr_extend(measured.pcr, event_digest(measured))
            self.channel_event = measured

    # -- step 1: start ---------------------------------------------------------------------

    def start_run(
        self, run_id: str, nonce: bytes, config_data: dict[str, object]
    ) -> list[AppEvent]:
        """Check the machine is fresh, create the run's workspace, and measure the runtime,
        the configuration and (``gpus`` > 0) the GPUs the job gets into PCR 14. Returns the
        events measured."""
        with self._lock:
            if self.run is not None:
                raise StepOrderError(
                    f"this machine already ran {self.run.run_id}: a run needs a fresh machine"
                    if self.run.finished
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
            self._check_reset_pcrs()
            for sub in ("resources", "outputs", "logs"):
                (workspace / sub).mkdir(parents=True)
            started = datetime.now(UTC)
            run = RunState(run_id, nonce, config, workspace, started)
            if self.channel_event is not None:
                run.events.append(self.channel_event)
            self.run = run
            first = len(run.events)
            with measuring_step(run):
                runtime = RuntimeEvent(
                    runtime_version=RUNTIME_VERSION,
                    run_id=run_id,
                    nonce=nonce.hex(),
                    platform=self.platform,
                    started_at=started.isoformat(),
                )
                self.measurer.measure(run, runtime)
                self.measurer.measure(run, ConfigEvent(config=config.measured_form()))
                # Before anything is fetched: a machine without the GPUs asked for fails now.
                gpu.measure_gpus(self.measurer, run, self.platform)
            return run.events[first:]

    def _check_reset_pcrs(self) -> None:
        """PCR 14 and 15 hold what the boot and the channel key put there, nothing more."""
        pcrs = self.tpm.pcr_read([INPUTS_PCR, OUTPUTS_PCR])
        fresh = self._fresh_pcrs()
        expected_inputs = fresh[INPUTS_PCR]
        if self.channel_event is not None:
            expected_inputs = extend(expected_inputs, event_digest(self.channel_event))
        if pcrs[INPUTS_PCR] != expected_inputs or pcrs[OUTPUTS_PCR] != fresh[OUTPUTS_PCR]:
            # A certificate replays the log from zeros: a TPM whose PCR 14/15 were
            # already extended (a reused machine) cannot produce a valid one.
            raise AgentError("PCR 14/15 are not in their reset state: reboot the machine")

    # -- step 3: inputs ------------------------------------------------------------------------

    def measure_inputs(self, run_id: str) -> list[AppEvent]:
        """Base image, source and resources into PCR 14, in that order."""
        with self._lock:
            run = self._require(run_id, "started")
            first = len(run.events)
            with measuring_step(run):
                input_measurement.measure_inputs(self.measurer, run, self.staged_inputs)
            run.step = "inputs"
            return run.events[first:]

    # -- step 4: dependencies and the training image -----------------------------------------

    def build_image(self, run_id: str) -> list[AppEvent]:
        """The wheels of ``requirements.txt`` and the training image built with them into
        PCR 14 (nothing when the source has no requirements)."""
        with self._lock:
            run = self._require(run_id, "inputs")
            first = len(run.events)
            with measuring_step(run):
                input_measurement.build_training_image(self.measurer, run)
            run.step = "built"
            return run.events[first:]

    # -- step 5: training --------------------------------------------------------------------

    def start_training(self, run_id: str) -> None:
        """Start the training job in its sandbox; it runs on in a thread."""
        with self._lock:
            training.start_training(self._require(run_id, "built"), self._lock)

    def stop_training(self) -> None:
        """Kill the run's training container, if one runs (the agent is shutting down)."""
        training.stop_training(self.run)

    def training_status(self, run_id: str) -> dict[str, object]:
        """The job's state, exit code and error (``api_models.TrainingStatus``)."""
        # Before training there is no status to give: "running" would keep a follower
        # polling forever.
        return training.training_status(self._require(run_id, *TRAINING_STARTED, observing=True))

    def read_logs(self, run_id: str, offset: int, wait_s: float) -> tuple[list[str], int, bool]:
        """Lines from ``offset``; waits up to ``wait_s`` for new ones (long polling)."""
        run = self._require(run_id, *TRAINING_STARTED, observing=True)
        return training.read_logs(run, offset, wait_s)

    def outputs_archive(self, run_id: str) -> Iterator[bytes]:
        """The run's ``outputs/`` and ``logs/`` as a tar stream, once training is over."""
        return training.outputs_archive(self._require(run_id, *TRAINING_STARTED, observing=True))

    # -- step 6: outputs -------------------------------------------------------------------------

    def measure_outputs(self, run_id: str) -> list[AppEvent]:
        """Each output file and the job's result into PCR 15, then the statements the AK
        signs (``statement_signing``) and the event binding them."""
        # Imported here: it needs libtss2, which the orchestrator's type checks do without.
        from aicert.guest_runtime.statement_signing import sign_statements

        with self._lock:
            run = self._require(run_id, "trained")
            output_measurement.refuse_failed_training(run)
            ak = self._machine_ak()
            first = len(run.events)
            with measuring_step(run):
                output_measurement.measure_outputs(self.measurer, run)
                run.signed_statements = sign_statements(self.measurer, run, self.tpm, ak)
            run.step = "measured"
            return run.events[first:]

    # -- step 7: quote ---------------------------------------------------------------------------

    def quote(self, run_id: str, boot_event_log: bytes | None = None) -> dict[str, object]:
        """Quote PCR 0-15 over the run's nonce: the run's evidence (``api_models.Evidence``)."""
        with self._lock:
            run = self._require(run_id, "measured", "quoted")
            ak = self._machine_ak()
            quote = self.tpm.quote(ak, QUOTED_PCRS, run.nonce)
            run.step = "quoted"
            assert run.finished_at is not None
            return {
                **_quote_fields(quote, ak),
                "nonce": run.nonce,
                "event_log": list(run.events),
                "boot_event_log": boot_event_log,
                "started_at": run.started_at.isoformat(),
                "finished_at": run.finished_at.isoformat(),
                "exit_code": run.exit_code,
                "duration_ms": run.duration_ms or 0,
                "signed_statements": list(run.signed_statements),
            }
