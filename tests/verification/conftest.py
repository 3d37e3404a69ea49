"""Real TPM evidence for the verifier tests: a swtpm on loopback and tpm2-tools quotes.

The swtpm is started once per session, on free loopback ports, and killed at the end (and,
through PR_SET_PDEATHSIG, when the test process dies without running its teardown).
"""

from __future__ import annotations

import ctypes
import os
import re
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

_PR_SET_PDEATHSIG = 1
_SWTPM_START_TIMEOUT_S = 10.0
_TOOL_TIMEOUT_S = 30.0
QUOTED_PCRS = (0, 14, 15)


@dataclass(frozen=True)
class AkFiles:
    """One attestation key made by tpm2_createak, in the forms the tools write."""

    context: Path
    tss_public: bytes  # TPM2B_PUBLIC, from tpm2_readpublic -f tss -o
    pem_public: bytes  # from tpm2_createak -u -f pem
    name: bytes  # from tpm2_createak -n


@dataclass(frozen=True)
class TpmQuote:
    """One tpm2_quote result and the values it quotes."""

    ak: AkFiles
    attest: bytes  # tpm2_quote -m: TPMS_ATTEST
    signature: bytes  # tpm2_quote -s: TPMT_SIGNATURE (default format)
    nonce: bytes
    bank: str
    pcrs: dict[int, bytes]  # from tpm2_pcrread, same bank


@dataclass(frozen=True)
class TpmEvidence:
    ek_public: bytes  # TPM2B_PUBLIC from tpm2_createek -u
    aks: dict[str, AkFiles]
    quotes: dict[str, TpmQuote]


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port_pair() -> int:
    """A port P such that P and P+1 are free on loopback (swtpm's server and control ports)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
        if port < 65535 and _port_is_free(port + 1):
            return port
    raise RuntimeError("no pair of free loopback ports")


def _die_with_parent() -> None:
    # Runs in the child before exec: swtpm gets SIGTERM if the test process dies.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def _start_swtpm(state_dir: Path, log_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = _free_port_pair()
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [
                "swtpm",
                "socket",
                "--tpm2",
                "--tpmstate",
                f"dir={state_dir}",
                "--server",
                f"type=tcp,port={port},bindaddr=127.0.0.1",
                "--ctrl",
                f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
                "--flags",
                "not-need-init,startup-clear",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            # preexec_fn is unsafe only with threads that hold locks; pytest runs none here.
            preexec_fn=_die_with_parent,
        )
    deadline = time.monotonic() + _SWTPM_START_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                break
            if _accepts_connections(port) and _accepts_connections(port + 1):
                return process, port
            time.sleep(0.02)
    except BaseException:
        _stop(process)
        raise
    _stop(process)
    raise RuntimeError(f"swtpm did not start on port {port}: {log_path.read_text()}")


@pytest.fixture(scope="session")
def swtpm_tcti(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh swtpm on loopback; yields its TCTI string and kills it afterwards."""
    base = tmp_path_factory.mktemp("swtpm")
    state_dir = base / "state"
    state_dir.mkdir()
    log_path = base / "swtpm.log"
    last_error: RuntimeError | None = None
    for _ in range(3):  # a port taken between probing and binding: try other ports
        try:
            process, port = _start_swtpm(state_dir, log_path)
        except RuntimeError as error:
            last_error = error
            continue
        try:
            yield f"swtpm:host=127.0.0.1,port={port}"
        finally:
            _stop(process)
        return
    raise RuntimeError(f"could not start swtpm: {last_error}")


class Tpm2Tools:
    """Runs tpm2-tools commands against one TPM, in one folder.

    A raw swtpm socket has no resource manager: transient objects and sessions are flushed
    after every command, or the TPM runs out of object slots.
    """

    def __init__(self, tcti: str, workdir: Path) -> None:
        self.workdir = workdir
        self.env = {**os.environ, "TPM2TOOLS_TCTI": tcti}

    def _run_raw(self, *args: str) -> str:
        result = subprocess.run(
            args,
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=_TOOL_TIMEOUT_S,
            check=False,
        )
        if result.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
            )
        return result.stdout

    def run(self, *args: str) -> str:
        output = self._run_raw(*args)
        self._run_raw("tpm2_flushcontext", "-t")
        self._run_raw("tpm2_flushcontext", "-s")
        return output

    def read(self, name: str) -> bytes:
        return (self.workdir / name).read_bytes()

    def pcr_values(self, bank: str, indices: tuple[int, ...]) -> dict[int, bytes]:
        output = self.run("tpm2_pcrread", f"{bank}:{','.join(map(str, indices))}")
        values = {
            int(match[1]): bytes.fromhex(match[2])
            for match in re.finditer(r"^\s*(\d+)\s*:\s*0x([0-9A-Fa-f]+)\s*$", output, re.M)
        }
        assert set(values) == set(indices), output
        return values

    def create_ak(self, label: str, key_alg: str, hash_alg: str, scheme: str) -> AkFiles:
        context = f"{label}.ctx"
        self.run(
            "tpm2_createak",
            *("-C", "ek.ctx", "-c", context, "-G", key_alg, "-g", hash_alg, "-s", scheme),
            *("-u", f"{label}.pem", "-f", "pem", "-n", f"{label}.name"),
        )
        self.run("tpm2_readpublic", "-c", context, "-f", "tss", "-o", f"{label}.tpm2b")
        return AkFiles(
            context=self.workdir / context,
            tss_public=self.read(f"{label}.tpm2b"),
            pem_public=self.read(f"{label}.pem"),
            name=self.read(f"{label}.name"),
        )

    def quote(self, label: str, ak: AkFiles, bank: str, hash_alg: str, scheme: str) -> TpmQuote:
        nonce = secrets.token_bytes(16)
        pcr_list = f"{bank}:{','.join(map(str, QUOTED_PCRS))}"
        self.run(
            "tpm2_quote",
            *("-c", str(ak.context), "-l", pcr_list, "-q", nonce.hex()),
            *("-m", f"{label}.msg", "-s", f"{label}.sig", "-g", hash_alg, "--scheme", scheme),
        )
        return TpmQuote(
            ak=ak,
            attest=self.read(f"{label}.msg"),
            signature=self.read(f"{label}.sig"),
            nonce=nonce,
            bank=bank,
            pcrs=self.pcr_values(bank, QUOTED_PCRS),
        )


# label -> (tpm2_createak -G, -g, -s)
_AK_SPECS: dict[str, tuple[str, str, str]] = {
    "rsassa": ("rsa", "sha256", "rsassa"),
    "rsassa_other": ("rsa", "sha256", "rsassa"),
    "rsapss": ("rsa", "sha256", "rsapss"),
    "rsapss_other": ("rsa", "sha256", "rsapss"),
    "ecdsa": ("ecc", "sha256", "ecdsa"),
    "ecdsa_other": ("ecc", "sha256", "ecdsa"),
    "rsassa_sha1": ("rsa", "sha1", "rsassa"),
}

# label -> (AK label, PCR bank, tpm2_quote -g, --scheme)
_QUOTE_SPECS: dict[str, tuple[str, str, str, str]] = {
    "rsassa": ("rsassa", "sha256", "sha256", "rsassa"),
    "rsapss": ("rsapss", "sha256", "sha256", "rsapss"),
    "ecdsa": ("ecdsa", "sha256", "sha256", "ecdsa"),
    "sha1_signature": ("rsassa_sha1", "sha256", "sha1", "rsassa"),
    "sha1_bank": ("rsassa", "sha1", "sha256", "rsassa"),
}


@pytest.fixture(scope="session")
def tpm_evidence(swtpm_tcti: str, tmp_path_factory: pytest.TempPathFactory) -> TpmEvidence:
    """EK, AKs and quotes made by tpm2-tools on the session's swtpm."""
    tools = Tpm2Tools(swtpm_tcti, tmp_path_factory.mktemp("tpm2-tools"))
    tools.run("tpm2_createek", "-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub")
    aks = {label: tools.create_ak(label, *spec) for label, spec in _AK_SPECS.items()}
    # PCR 14 gets a non-zero value in both banks, so relabelling it is detectable.
    tools.run(
        "tpm2_pcrextend",
        f"14:sha1={secrets.token_hex(20)},sha256={secrets.token_hex(32)}",
    )
    quotes = {
        label: tools.quote(label, aks[ak_label], bank, hash_alg, scheme)
        for label, (ak_label, bank, hash_alg, scheme) in _QUOTE_SPECS.items()
    }
    return TpmEvidence(ek_public=tools.read("ek.pub"), aks=aks, quotes=quotes)


@pytest.fixture(params=["rsassa", "rsapss", "ecdsa"])
def tpm2_quote(request: pytest.FixtureRequest, tpm_evidence: TpmEvidence) -> TpmQuote:
    """Each accepted kind of real tpm2_quote (RSASSA, RSAPSS, ECDSA; SHA-256)."""
    quote: TpmQuote = tpm_evidence.quotes[request.param]
    return quote


@pytest.fixture
def other_ak(tpm2_quote: TpmQuote, tpm_evidence: TpmEvidence) -> AkFiles:
    """Another AK of the same TPM with the same algorithm and scheme as ``tpm2_quote``'s."""
    label = next(name for name, ak in tpm_evidence.aks.items() if ak == tpm2_quote.ak)
    return tpm_evidence.aks[f"{label}_other"]
