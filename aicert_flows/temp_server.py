"""The temporary Prefect server of an ``aicert run`` that has no Prefect API to talk to.

Prefect would start one itself (``SubprocessASGIServer``), in the caller's process group and
stopped only by an ``atexit`` handler: a terminal's Ctrl-C reached the server too (the flow then
waited on a dead API), and a SIGTERM or SIGKILL of the CLI left the server running. This one
runs the same application (``uvicorn --factory prefect.server.api.server:create_app``) on a
free loopback port, in its own session (a terminal's signals reach only ``aicert``), with a
parent-death signal (it ends when the CLI ends, however the CLI ends) and its own
``PREFECT_HOME`` under ``AICERT_HOME`` unless one is configured.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from aicert.guest_runtime.hostutil import StartStop, stop_child
from aicert.tasks.platforms.processes import free_port
from aicert.tasks.platforms.settings import aicert_home

STARTUP_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 10.0
PORT_ATTEMPTS = 5
# uvicorn's exit status when it cannot bind its port.
_UVICORN_BIND_FAILED = 3
_PR_SET_PDEATHSIG = 1
LOG_TAIL_BYTES = 3000


class TemporaryServerError(RuntimeError):
    """The temporary Prefect server did not start."""


def _die_with_parent(parent_pid: int) -> None:
    """In the child before exec: get SIGTERM when the parent dies (Linux ``prctl``), and
    exit at once if the parent already died before that was in place."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


def _tail(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-LOG_TAIL_BYTES:].decode(errors="replace").strip()


class TemporaryPrefectServer(StartStop):
    """A Prefect API server that lives exactly as long as this process (see the module).

    The parent-death signal fires when the thread that started the server ends, so start it
    from the main thread (``aicert run`` does).
    """

    def __init__(self, home: Path | None = None) -> None:
        self.home = (home or aicert_home()).resolve()
        self.port: int | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def api_url(self) -> str:
        if self.port is None:
            raise TemporaryServerError("the temporary Prefect server is not started")
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def log_path(self) -> Path:
        return self.home / "prefect" / "server.log"

    def _environment(self) -> dict[str, str]:
        from prefect.settings import get_current_settings

        environment = {
            **os.environ,
            **get_current_settings().to_environment_variables(exclude_unset=True),
            # As Prefect's own temporary server: no UI, the ephemeral services only.
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
        }
        if "PREFECT_HOME" not in os.environ:
            # Its database with the runs it served, not in the user's ~/.prefect.
            environment["PREFECT_HOME"] = str(self.home / "prefect")
        return environment

    def _launch(self, port: int) -> subprocess.Popen[bytes]:
        import prefect

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        parent = os.getpid()
        with self.log_path.open("ab") as log:
            return subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "--app-dir",
                    str(Path(prefect.__file__).parent.parent),
                    "--factory",
                    "prefect.server.api.server:create_app",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--log-level",
                    "error",
                    "--lifespan",
                    "on",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._environment(),
                # Its own session: a Ctrl-C typed in the terminal goes to aicert alone, which
                # then stops the run first and the server last.
                start_new_session=True,
                preexec_fn=lambda: _die_with_parent(parent),
            )

    def start(self, timeout_s: float = STARTUP_TIMEOUT_S) -> str:
        """Start the server and wait until it answers; returns its API URL."""
        deadline = time.monotonic() + timeout_s
        for _ in range(PORT_ATTEMPTS):
            self.port = free_port()
            self.process = self._launch(self.port)
            with httpx.Client(timeout=5.0) as client:
                while time.monotonic() < deadline:
                    code = self.process.poll()
                    if code is not None:
                        break
                    try:
                        if client.get(f"{self.api_url}/health").status_code == 200:
                            return self.api_url
                    except httpx.HTTPError:
                        pass
                    time.sleep(0.2)
            if self.process.poll() != _UVICORN_BIND_FAILED:
                break  # not a port taken meanwhile: another port will not help
        self.stop()
        raise TemporaryServerError(
            f"the temporary Prefect server did not start within {timeout_s:.0f} s; its log "
            f"({self.log_path}) ends with:\n{_tail(self.log_path)}"
        )

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after ``STOP_TIMEOUT_S``. Idempotent."""
        process, self.process = self.process, None
        if process is not None:
            stop_child(process, STOP_TIMEOUT_S)


def needs_temporary_server() -> bool:
    """True when no Prefect API is configured and a temporary server is allowed (Prefect's
    own rule for starting one)."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    return not settings.api.url and bool(settings.server.ephemeral.enabled)
