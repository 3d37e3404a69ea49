"""The agent's HTTP API: the same code path for the local platform and for a remote VM.

One run at a time; typed request/response models (``api_models``); training logs by long
polling. Errors come back as ``{"error", "kind"}`` with the agent's exception class name, so
the orchestrator can tell a training failure (no retry) from a platform failure (retry).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import logging
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from aicert.guest_runtime import RUNTIME_VERSION
from aicert.guest_runtime import api_models as api
from aicert.guest_runtime.agent import CertificationAgent
from aicert.guest_runtime.config import ConfigError
from aicert.guest_runtime.errors import (
    AgentError,
    DependencyError,
    EventLimitError,
    InputMismatchError,
    MissingOutputsError,
    ResultsFileError,
    StepOrderError,
    TooManyOutputsError,
    TrainingFailedError,
    UnsafeOutputError,
)
from aicert.model import PLATFORM_KINDS

log = logging.getLogger(__name__)

_STATUS = {
    ConfigError: 422,
    StepOrderError: 409,
    InputMismatchError: 422,
    TrainingFailedError: 422,
    DependencyError: 422,
    UnsafeOutputError: 422,
    MissingOutputsError: 422,
    TooManyOutputsError: 422,
    ResultsFileError: 422,
    EventLimitError: 422,
}
# Matched by name: the TPM module needs libtss2, which this module must import without.
_UNAVAILABLE_KINDS = frozenset({"TpmUnreachableError"})


# The agent's event loop only dispatches (the steps run in worker threads): a loop that does not
# turn for this long is stuck, and every thread's stack goes to stderr (the VM's console).
EVENT_LOOP_STALL_S = 30.0


@contextlib.asynccontextmanager
async def _event_loop_watchdog(stall_s: float) -> AsyncIterator[None]:
    """Re-arm faulthandler's timer while the loop turns. Its own C thread fires without the
    GIL, so the stacks come out even when a thread holds the GIL or the loop is blocked."""

    async def rearm() -> None:
        while True:
            faulthandler.dump_traceback_later(stall_s, repeat=True, file=sys.stderr)
            await asyncio.sleep(min(1.0, stall_s / 10))

    task = asyncio.create_task(rearm())
    try:
        yield
    finally:
        task.cancel()
        faulthandler.cancel_dump_traceback_later()


def create_app(
    agent: CertificationAgent,
    boot_event_log: Path | None = None,
    *,
    event_loop_stall_s: float | None = None,
) -> FastAPI:
    """The agent's API application.

    Args:
        agent: the agent the routes drive.
        boot_event_log: where this machine's kernel exposes the TCG boot event log
            (default: securityfs).
        event_loop_stall_s: dump every thread's stack to stderr when the event loop does not
            turn for that long (the process-wide faulthandler: set by ``main`` only).
    """
    log_path = boot_event_log or BOOT_EVENT_LOG

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        watched = event_loop_stall_s is not None
        async with (
            _event_loop_watchdog(event_loop_stall_s) if watched else contextlib.nullcontext()
        ):
            yield

    app = FastAPI(title="AICert guest agent", version=RUNTIME_VERSION, lifespan=lifespan)
    _add_error_handlers(app)
    app.include_router(_machine_routes(agent, log_path), prefix=api.API_PREFIX)
    app.include_router(_run_routes(agent, log_path), prefix=api.API_PREFIX)
    app.include_router(_training_routes(agent), prefix=api.API_PREFIX)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Errors as ``{"error", "kind"}``: the agent's own with their status, others 500/503."""

    @app.exception_handler(AgentError)
    @app.exception_handler(ConfigError)
    async def _agent_error(_: Request, exc: Exception) -> JSONResponse:
        status = next((code for cls, code in _STATUS.items() if isinstance(exc, cls)), 500)
        return JSONResponse({"error": str(exc), "kind": type(exc).__name__}, status_code=status)

    # A middleware, not ``exception_handler(Exception)``: Starlette answers the latter and then
    # re-raises, and uvicorn resets the connection, so the client's next request on that
    # keep-alive connection failed with a ReadError (as if the agent were unreachable).
    @app.middleware("http")
    async def _unexpected(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        try:
            return await call_next(request)
        except Exception as exc:
            log.exception("agent request failed")
            kind = type(exc).__name__
            # 503: the machine's TPM is gone; the orchestrator tears down rather than retries.
            status = 503 if kind in _UNAVAILABLE_KINDS else 500
            return JSONResponse({"error": str(exc), "kind": kind}, status_code=status)


def _peak_rss_bytes() -> int | None:
    """This process's peak resident set (VmHWM in /proc/self/status), or None."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _machine_routes(agent: CertificationAgent, log_path: Path) -> APIRouter:
    """The machine's routes: health, progress, its attestation key and platform quote."""
    router = APIRouter()

    @router.get("/health")
    def health() -> api.Health:
        run = agent.run
        busy = run.run_id if run is not None and run.step != "quoted" else None
        return api.Health(
            status="ok",
            runtime_version=RUNTIME_VERSION,
            platform=agent.platform,
            busy_run_id=busy,
            peak_rss_bytes=_peak_rss_bytes(),
        )

    @router.get("/progress")
    def progress() -> api.ProgressReport:
        return api.ProgressReport(**agent.work.snapshot())

    @router.post("/ak")
    def key_material() -> api.KeyMaterial:
        return api.KeyMaterial(**agent.key_material())

    @router.post("/ak/activate")
    def activate(request: api.ActivateRequest) -> api.ActivateResponse:
        secret = agent.activate_credential(request.credential_blob, request.encrypted_secret)
        return api.ActivateResponse(secret=secret)

    @router.post("/platform-quote")
    def platform_quote(request: api.PlatformQuoteRequest) -> api.PlatformEvidence:
        boot_log = _read_boot_event_log(log_path)
        return api.PlatformEvidence(**agent.platform_quote(request.challenge, boot_log))

    return router


def _run_routes(agent: CertificationAgent, log_path: Path) -> APIRouter:
    """The run's measuring steps, from start to quote."""
    router = APIRouter()

    @router.post("/runs")
    def start_run(request: api.StartRunRequest) -> api.EventsResponse:
        events = agent.start_run(request.run_id, request.nonce, request.config)
        return api.EventsResponse(events=events)

    @router.post("/runs/{run_id}/inputs")
    def measure_inputs(run_id: str) -> api.EventsResponse:
        return api.EventsResponse(events=agent.measure_inputs(run_id))

    @router.post("/runs/{run_id}/image")
    def build_image(run_id: str) -> api.EventsResponse:
        return api.EventsResponse(events=agent.build_image(run_id))

    @router.post("/runs/{run_id}/outputs")
    def measure_outputs(run_id: str) -> api.EventsResponse:
        return api.EventsResponse(events=agent.measure_outputs(run_id))

    @router.post("/runs/{run_id}/quote")
    def quote(run_id: str) -> api.Evidence:
        return api.Evidence(**agent.quote(run_id, boot_event_log=_read_boot_event_log(log_path)))

    return router


def _training_routes(agent: CertificationAgent) -> APIRouter:
    """The training job: start, status, logs by long polling, and the outputs archive."""
    router = APIRouter()

    @router.post("/runs/{run_id}/training")
    def start_training(run_id: str) -> api.TrainingStatus:
        agent.start_training(run_id)
        return api.TrainingStatus(**agent.training_status(run_id))

    @router.get("/runs/{run_id}/training")
    def training_status(run_id: str) -> api.TrainingStatus:
        return api.TrainingStatus(**agent.training_status(run_id))

    @router.get("/runs/{run_id}/logs")
    def logs(
        run_id: str,
        offset: int = Query(0, ge=0),
        wait: float = Query(10.0, ge=0, le=60),
    ) -> api.LogChunk:
        lines, next_offset, finished = agent.read_logs(run_id, offset, wait)
        return api.LogChunk(lines=lines, next_offset=next_offset, finished=finished)

    @router.get("/runs/{run_id}/archive")
    def archive(run_id: str) -> StreamingResponse:
        return StreamingResponse(agent.outputs_archive(run_id), media_type="application/x-tar")

    return router


BOOT_EVENT_LOG = Path("/sys/kernel/security/tpm0/binary_bios_measurements")


def _read_boot_event_log(path: Path = BOOT_EVENT_LOG) -> bytes | None:
    # Only a machine that booted with a TPM has one; the local platform does not.
    try:
        return path.read_bytes()
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aicert-agent", description=__doc__)
    parser.add_argument("--tcti", required=True, help="e.g. swtpm:host=127.0.0.1,port=2321")
    parser.add_argument("--platform", choices=PLATFORM_KINDS, default="local")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--work-root", type=Path, required=True)
    parser.add_argument(
        "--azure-intermediates",
        type=Path,
        default=None,
        help="Azure AK chain intermediates (PEM; default /etc/aicert/azure-intermediates.pem)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="serve HTTPS with a fresh key measured into PCR 14 first (remote platforms)",
    )
    parser.add_argument(
        "--staged-inputs",
        type=Path,
        default=None,
        help="a tar (file or block device) with the run's inputs, staged by the orchestrator",
    )
    parser.add_argument(
        "--boot-event-log",
        type=Path,
        default=None,
        help=f"the TCG boot event log to return with quotes (default {BOOT_EVENT_LOG})",
    )
    args = parser.parse_args(argv)

    import uvicorn

    from aicert.appevents import ChannelKeyEvent
    from aicert.guest_runtime.channel import ChannelFiles, new_channel_identity
    from aicert.guest_runtime.tpm import Tpm

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args.work_root.mkdir(parents=True, exist_ok=True)
    with Tpm(args.tcti) as tpm:
        agent = CertificationAgent(
            tpm=tpm,
            platform=args.platform,
            work_root=args.work_root,
            azure_intermediates=args.azure_intermediates,
            staged_inputs=args.staged_inputs,
            boot_event_log=args.boot_event_log or BOOT_EVENT_LOG,
        )
        with contextlib.ExitStack() as stack:
            tls: dict[str, str] = {}
            if args.tls:
                identity = new_channel_identity()
                # Measured before the socket opens: nothing is served under an unmeasured key.
                agent.measure_channel_key(ChannelKeyEvent.for_certificate(identity.certificate_pem))
                files = stack.enter_context(ChannelFiles(identity))
                tls = {"ssl_certfile": str(files.certificate), "ssl_keyfile": str(files.key)}
            config = uvicorn.Config(
                create_app(agent, args.boot_event_log, event_loop_stall_s=EVENT_LOOP_STALL_S),
                host=args.host,
                port=args.port,
                log_level="warning",
                **tls,
            )
            server = uvicorn.Server(config)
            signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True))
            try:
                server.run()
            finally:
                # Stopped (SIGTERM from a teardown, or a crash): no training container may
                # outlive the agent that would measure its outputs.
                agent.stop_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
