"""A software TPM that the project manufactures and runs itself (the `local` platform).

``LocalSwtpm.create`` manufactures a TPM state with ``swtpm_setup`` (EK, EK certificate and
platform certificate issued by a project-owned ``swtpm_localca`` CA, NV locked), ``start``
serves it on loopback with ``swtpm socket`` and ``stop`` ends the process.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import weakref
from pathlib import Path
from typing import Self

from aicert.guest_runtime.hostutil import StartStop, file_lock

SWTPM_SETUP_TIMEOUT_S = 60.0
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
PORT_ATTEMPTS = 8
LOG_TAIL_BYTES = 2000

# Files of the swtpm_localca CA inside ek_ca_dir. swtpm_localca creates a root CA
# (swtpm-localca-rootca-*) and an intermediate signing CA (signkey/issuercert) on first use;
# EK certificates are signed by the intermediate.
LOCALCA_CONF = "swtpm-localca.conf"
LOCALCA_OPTIONS = "swtpm-localca.options"
LOCALCA_SIGNING_KEY = "signkey.pem"
LOCALCA_ISSUER_CERT = "issuercert.pem"
LOCALCA_ROOT_CERT = "swtpm-localca-rootca-cert.pem"
LOCALCA_SERIAL = "certserial"
LOCALCA_CREATION_LOCK = ".aicert-localca-create.lock"

SETUP_CONF = "swtpm_setup.conf"
STATE_FILE = "tpm2-00.permall"
EK_RSA_CERT_FILE = "ek-rsa2048.crt"
SWTPM_LOG = "swtpm.log"
SWTPM_PID = "swtpm.pid"
SETUP_LOG = "swtpm_setup.log"

LOOPBACK = "127.0.0.1"
# TPM2_GetRandom(8) with no sessions: tag ST_NO_SESSIONS, size 12, TPM_CC_GetRandom.
_GET_RANDOM_COMMAND = bytes.fromhex("80010000000c0000017b0008")
_TCP_LISTEN_STATE = "0A"


class SwtpmError(RuntimeError):
    """A step of manufacturing, starting or stopping the software TPM failed."""

    def __init__(self, step: str, message: str, output: str = "") -> None:
        self.step = step
        self.output = output
        text = f"swtpm {step}: {message}"
        if output.strip():
            text += f"\n--- output ---\n{output.strip()}"
        super().__init__(text)


def _require_tool(name: str, step: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SwtpmError(step, f"{name} not found on PATH (install swtpm and swtpm-tools)")
    return path


def _tail(path: Path) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - LOG_TAIL_BYTES))
            return handle.read().decode(errors="replace")
    except OSError:
        return ""


def _pick_port_pair() -> int:
    """A port P such that P and P+1 are free on loopback right now (the swtpm TCTI
    always talks to the control channel on P+1)."""
    for _ in range(64):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
            server.bind((LOOPBACK, 0))
            port = server.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as ctrl:
                try:
                    ctrl.bind((LOOPBACK, port + 1))
                except OSError:
                    continue
                return port
    raise SwtpmError("start", "no pair of consecutive free loopback ports found")


def _listening_loopback_ports(pid: int) -> set[int]:
    """Loopback TCP ports on which process ``pid`` itself listens.

    Hand-written from /proc because "something answers on port P" is not enough: another
    process may have bound P between our probe and swtpm's bind, and then our swtpm dies
    while the other one answers.
    """
    inodes: set[str] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        for entry in fd_dir.iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(entry)
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:[") : -1])
    except OSError:
        return set()
    ports: set[int] = set()
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return set()
    for line in lines:
        fields = line.split()
        if len(fields) < 10 or fields[3] != _TCP_LISTEN_STATE or fields[9] not in inodes:
            continue
        address, port_hex = fields[1].split(":")
        if address == "0100007F":  # 127.0.0.1, little-endian hex
            ports.add(int(port_hex, 16))
    return ports


def _tpm_answers(port: int, timeout_s: float) -> bool:
    """One raw TPM2_GetRandom over the server socket, bounded by a socket timeout (the
    TSS's swtpm TCTI has no timeout for synchronous calls and would block forever)."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout_s) as conn:
            conn.sendall(_GET_RANDOM_COMMAND)
            header = b""
            while len(header) < 10:
                chunk = conn.recv(10 - len(header))
                if not chunk:
                    return False
                header += chunk
    except OSError:
        return False
    return header[:2] == b"\x80\x01" and header[6:10] == b"\x00\x00\x00\x00"


class LocalSwtpm(StartStop):
    """A swtpm whose state lives in ``state_dir``, served on loopback while started."""

    def __init__(self, state_dir: Path, ek_ca_dir: Path) -> None:
        self.state_dir = state_dir
        self.ek_ca_dir = ek_ca_dir
        self._process: subprocess.Popen[bytes] | None = None
        self._port: int | None = None
        self._finalizer: weakref.finalize[..., None] | None = None

    # -- manufacturing ---------------------------------------------------------------

    @classmethod
    def create(cls, state_dir: Path, ek_ca_dir: Path, pcr_banks: str = "sha256") -> Self:
        """Manufacture a new TPM state in ``state_dir`` (which must not hold one yet)."""
        state_dir = Path(state_dir).resolve()
        ek_ca_dir = Path(ek_ca_dir).resolve()
        swtpm_setup = _require_tool("swtpm_setup", "setup")
        localca = _require_tool("swtpm_localca", "setup")
        _require_tool("swtpm", "setup")
        state_dir.mkdir(parents=True, exist_ok=True)
        ek_ca_dir.mkdir(parents=True, exist_ok=True)
        if (state_dir / STATE_FILE).exists():
            raise SwtpmError("setup", f"{state_dir} already holds a TPM state")

        conf = ek_ca_dir / LOCALCA_CONF
        options = ek_ca_dir / LOCALCA_OPTIONS
        setup_conf = state_dir / SETUP_CONF
        setup_conf.write_text(
            f"create_certs_tool = {localca}\n"
            f"create_certs_tool_config = {conf}\n"
            f"create_certs_tool_options = {options}\n"
            f"active_pcr_banks = {pcr_banks}\n"
        )
        command = [
            swtpm_setup,
            "--tpm2",
            "--tpmstate",
            str(state_dir),
            "--config",
            str(setup_conf),
            "--createek",
            "--decryption",
            "--create-ek-cert",
            "--create-platform-cert",
            "--lock-nvram",
            "--pcr-banks",
            pcr_banks,
            "--write-ek-cert-files",
            str(state_dir),
            "--logfile",
            str(state_dir / SETUP_LOG),
        ]

        ca_exists = (ek_ca_dir / LOCALCA_SIGNING_KEY).exists() and (
            ek_ca_dir / LOCALCA_ISSUER_CERT
        ).exists()
        if ca_exists:
            # swtpm_localca serialises its own use of the CA (serial number) with a lock in
            # its statedir; only the first creation of the CA needs ours.
            cls._run_setup(command, state_dir, ek_ca_dir)
        else:
            with file_lock(ek_ca_dir / LOCALCA_CREATION_LOCK):
                cls._write_localca_config(ek_ca_dir)
                cls._run_setup(command, state_dir, ek_ca_dir)

        if not (state_dir / EK_RSA_CERT_FILE).is_file():
            raise SwtpmError(
                "setup",
                "swtpm_setup did not write the RSA EK certificate",
                _tail(state_dir / SETUP_LOG),
            )
        return cls(state_dir, ek_ca_dir)

    @classmethod
    def load(cls, state_dir: Path, ek_ca_dir: Path) -> Self:
        """An existing TPM state made by ``create``."""
        state_dir = Path(state_dir).resolve()
        if not (state_dir / STATE_FILE).is_file():
            raise SwtpmError("load", f"{state_dir} holds no TPM state")
        return cls(state_dir, Path(ek_ca_dir).resolve())

    @staticmethod
    def _write_localca_config(ek_ca_dir: Path) -> None:
        conf = ek_ca_dir / LOCALCA_CONF
        if not conf.exists():
            conf.write_text(
                f"statedir = {ek_ca_dir}\n"
                f"signingkey = {ek_ca_dir / LOCALCA_SIGNING_KEY}\n"
                f"issuercert = {ek_ca_dir / LOCALCA_ISSUER_CERT}\n"
                f"certserial = {ek_ca_dir / LOCALCA_SERIAL}\n"
            )
        options = ek_ca_dir / LOCALCA_OPTIONS
        if not options.exists():
            # Without our own options file swtpm_localca reads /etc/swtpm-localca.options.
            options.write_text(
                "--platform-manufacturer AICert\n"
                "--platform-version 1.0\n"
                "--platform-model aicert-local\n"
            )

    @staticmethod
    def _run_setup(command: list[str], state_dir: Path, ek_ca_dir: Path) -> None:
        if not (ek_ca_dir / LOCALCA_CONF).exists():
            raise SwtpmError("setup", f"{ek_ca_dir / LOCALCA_CONF} is missing")
        try:
            result = subprocess.run(
                command,
                capture_output=True,
                timeout=SWTPM_SETUP_TIMEOUT_S,
                check=False,
                cwd=state_dir,
            )
        except subprocess.TimeoutExpired as exc:
            raise SwtpmError(
                "setup",
                f"swtpm_setup ran over {SWTPM_SETUP_TIMEOUT_S} s",
                _tail(state_dir / SETUP_LOG),
            ) from exc
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace")
            raise SwtpmError(
                "setup",
                f"swtpm_setup exited with {result.returncode}",
                output + _tail(state_dir / SETUP_LOG),
            )

    # -- paths -------------------------------------------------------------------------

    @property
    def ek_ca_certificate_path(self) -> Path:
        """PEM certificate of the CA that signed the EK certificate (swtpm_localca's
        intermediate signing CA)."""
        return self.ek_ca_dir / LOCALCA_ISSUER_CERT

    @property
    def ek_root_ca_certificate_path(self) -> Path:
        """PEM certificate of swtpm_localca's self-signed root CA."""
        return self.ek_ca_dir / LOCALCA_ROOT_CERT

    @property
    def ek_certificate_path(self) -> Path:
        """DER RSA EK certificate as written by swtpm_setup (the TPM's NV holds the same)."""
        return self.state_dir / EK_RSA_CERT_FILE

    @property
    def log_path(self) -> Path:
        return self.state_dir / SWTPM_LOG

    @property
    def pid_file(self) -> Path:
        """swtpm writes its process id here, so a teardown after a crash can find it."""
        return self.state_dir / SWTPM_PID

    # -- running -----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def port(self) -> int:
        if self._port is None or self._process is None:
            raise SwtpmError("tcti", "the swtpm is not started")
        return self._port

    @property
    def tcti(self) -> str:
        return f"swtpm:host={LOOPBACK},port={self.port}"

    @property
    def pid(self) -> int:
        if self._process is None:
            raise SwtpmError("pid", "the swtpm is not started")
        return self._process.pid

    def start(self) -> None:
        if self.running:
            return
        swtpm = _require_tool("swtpm", "start")
        if not (self.state_dir / STATE_FILE).is_file():
            raise SwtpmError("start", f"{self.state_dir} holds no TPM state")
        last_log = ""
        for _ in range(PORT_ATTEMPTS):
            port = _pick_port_pair()
            process = self._launch(swtpm, port)
            outcome = self._wait_ready(process, port)
            if outcome == "ready":
                self._process = process
                self._port = port
                # A caller that forgets stop() (or dies on an exception) must not leave a
                # swtpm behind: terminate it when this object goes away or Python exits.
                self._finalizer = weakref.finalize(self, LocalSwtpm._kill, process)
                return
            last_log = _tail(self.log_path)
            self._kill(process)
            if outcome != "port-taken":
                raise SwtpmError("start", f"swtpm did not become ready ({outcome})", last_log)
        raise SwtpmError("start", f"no free port pair after {PORT_ATTEMPTS} attempts", last_log)

    def _launch(self, swtpm: str, port: int) -> subprocess.Popen[bytes]:
        # Truncate the log per attempt: a "port taken" line from an earlier attempt must not
        # be read as this attempt's outcome.
        self.log_path.write_bytes(b"")
        self.pid_file.unlink(missing_ok=True)
        command = [
            swtpm,
            "socket",
            "--tpm2",
            "--tpmstate",
            f"dir={self.state_dir}",
            "--server",
            f"type=tcp,port={port},bindaddr={LOOPBACK}",
            "--ctrl",
            f"type=tcp,port={port + 1},bindaddr={LOOPBACK}",
            "--flags",
            "not-need-init,startup-clear",
            "--log",
            f"file={self.log_path},level=1",
            "--pid",
            f"file={self.pid_file}",
        ]
        log = self.log_path.open("ab")
        try:
            return subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.state_dir,
                # Its own session: a Ctrl-C aimed at the caller's terminal must not kill the
                # TPM before the caller's teardown runs.
                start_new_session=True,
            )
        except OSError as exc:
            raise SwtpmError("start", f"cannot run swtpm: {exc}") from exc
        finally:
            log.close()

    def _wait_ready(self, process: subprocess.Popen[bytes], port: int) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                if "Address already in use" in _tail(self.log_path):
                    return "port-taken"
                return f"exited with {process.returncode}"
            if {port, port + 1} <= _listening_loopback_ports(process.pid) and _tpm_answers(
                port, timeout_s=2.0
            ):
                return "ready"
            time.sleep(0.02)
        return f"not answering after {START_TIMEOUT_S} s"

    @staticmethod
    def _kill(process: subprocess.Popen[bytes]) -> None:
        if process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)

    def detach(self) -> int:
        """Hand the running swtpm over to the caller, who now owns stopping it (by pid).

        Without this, the swtpm ends when this object is garbage collected: right for a
        context manager, wrong for a provider whose teardown runs later, maybe elsewhere.
        """
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        return self.pid

    def stop(self) -> None:
        """Terminate the swtpm (SIGTERM, then SIGKILL after a timeout). Idempotent."""
        process, self._process, self._port = self._process, None, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if process is None:
            return
        try:
            self._kill(process)
        except subprocess.TimeoutExpired as exc:
            raise SwtpmError("stop", f"swtpm pid {process.pid} survived SIGKILL") from exc
        finally:
            self.pid_file.unlink(missing_ok=True)
