"""The Azure VM's side in tests: a swtpm dressed as an Azure vTPM, and a guest agent on it.

``install_azure_ak`` does with tpm2-tools what Azure's host does before the VM boots: an AK
in the endorsement hierarchy, persisted at 0x81000003. ``install_nv_certificate`` writes a
certificate into NV 0x01C101D0, zero padded to the index's size as Azure's is.
``azure_like_chain`` issues, with ``tests/verification_chain/azure_like.py``, a leaf for the
TPM's AK under an intermediate shaped like "Global Virtual TPM CA - 03" and a root shaped
like Microsoft's (but not Microsoft's: its fingerprint is not the pinned one).
``local_azure_agent`` serves the real guest agent (``--platform azure``) on loopback.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding, load_pem_public_key

from aicert.guest_runtime.azure_ak import AZURE_AK_CERT_NV_INDEX, AZURE_AK_HANDLE
from aicert.guest_runtime.client import AgentClient
from aicert.guest_runtime.swtpm import LocalSwtpm
from tests.verification_chain.azure_like import (
    Issued,
    ak_leaf,
    azure_like_intermediate,
    azure_like_root,
)

NV_CERT_SIZE = 2048  # bytes the NV index holds; the DER certificate is zero padded to it


def tpm2(tcti: str, *args: str, cwd: Path) -> str:
    """Run a tpm2-tools command against ``tcti``; raise with its output when it fails."""
    completed = subprocess.run(
        list(args),
        env={**os.environ, "TPM2TOOLS_TCTI": tcti},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {completed.stdout}{completed.stderr}")
    return completed.stdout


def install_azure_ak(tcti: str, workdir: Path) -> PublicKeyTypes:
    """Create an RSA AK under the EK and persist it at 0x81000003; its public key as read
    back by ``tpm2_readpublic``. A raw swtpm has no resource manager: flush after each tool."""
    workdir.mkdir(parents=True, exist_ok=True)
    tpm2(tcti, "tpm2_createek", "-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub", cwd=workdir)
    tpm2(tcti, "tpm2_flushcontext", "-t", cwd=workdir)
    tpm2(
        tcti,
        "tpm2_createak",
        "-C",
        "ek.ctx",
        "-c",
        "ak.ctx",
        "-G",
        "rsa",
        "-g",
        "sha256",
        "-s",
        "rsassa",
        "-u",
        "ak.pub",
        cwd=workdir,
    )
    tpm2(tcti, "tpm2_flushcontext", "-t", cwd=workdir)
    tpm2(
        tcti,
        "tpm2_evictcontrol",
        "-C",
        "o",
        "-c",
        "ak.ctx",
        f"0x{AZURE_AK_HANDLE:08x}",
        cwd=workdir,
    )
    tpm2(tcti, "tpm2_flushcontext", "-t", cwd=workdir)
    tpm2(
        tcti,
        "tpm2_readpublic",
        "-c",
        f"0x{AZURE_AK_HANDLE:08x}",
        "-f",
        "pem",
        "-o",
        "ak.pem",
        cwd=workdir,
    )
    return load_pem_public_key((workdir / "ak.pem").read_bytes())


def install_nv_certificate(tcti: str, workdir: Path, content: bytes) -> None:
    """(Re)define NV 0x01C101D0 with ``NV_CERT_SIZE`` bytes and write ``content`` zero padded."""
    if len(content) > NV_CERT_SIZE:
        raise ValueError("certificate larger than the NV index")
    index = f"0x{AZURE_AK_CERT_NV_INDEX:08x}"
    undefine_nv_certificate(tcti, workdir)
    tpm2(
        tcti,
        "tpm2_nvdefine",
        index,
        "-C",
        "o",
        "-s",
        str(NV_CERT_SIZE),
        "-a",
        "ownerread|ownerwrite|authread|authwrite|no_da",
        cwd=workdir,
    )
    (workdir / "nv-cert.bin").write_bytes(content + bytes(NV_CERT_SIZE - len(content)))
    tpm2(tcti, "tpm2_nvwrite", index, "-C", "o", "-i", "nv-cert.bin", cwd=workdir)


def undefine_nv_certificate(tcti: str, workdir: Path) -> None:
    listed = tpm2(tcti, "tpm2_getcap", "handles-nv-index", cwd=workdir)
    defined = {int(token, 16) for token in re.findall(r"0x[0-9a-fA-F]+", listed)}
    if AZURE_AK_CERT_NV_INDEX in defined:
        index = f"0x{AZURE_AK_CERT_NV_INDEX:08x}"
        tpm2(tcti, "tpm2_nvundefine", index, "-C", "o", cwd=workdir)


class _PublicKeyOnly:
    """A TPM key seen from outside: ``azure_like.ak_leaf`` only asks its ``public_key()``."""

    def __init__(self, key: PublicKeyTypes) -> None:
        self._key = key

    def public_key(self) -> PublicKeyTypes:
        return self._key


@dataclass(frozen=True)
class AzureLikeChain:
    root: Issued
    intermediate: Issued
    leaf: x509.Certificate

    @property
    def leaf_der(self) -> bytes:
        return self.leaf.public_bytes(Encoding.DER)

    @property
    def leaf_pem(self) -> str:
        return self.leaf.public_bytes(Encoding.PEM).decode("ascii")

    @property
    def image_pem_bundle(self) -> str:
        """What the guest image ships: the intermediate, then the root."""
        return self.intermediate.pem + self.root.pem


def azure_like_chain(ak_public: PublicKeyTypes, now: datetime | None = None) -> AzureLikeChain:
    now = now or datetime.now(UTC)
    root = azure_like_root(
        not_before=now - timedelta(days=900), not_after=now + timedelta(days=8000)
    )
    intermediate = azure_like_intermediate(
        root, not_before=now - timedelta(days=200), not_after=now + timedelta(days=500)
    )
    leaf = ak_leaf(
        intermediate,
        not_before=now - timedelta(days=1),
        ak_key=_PublicKeyOnly(ak_public),  # type: ignore[arg-type]
    )
    return AzureLikeChain(root=root, intermediate=intermediate, leaf=leaf.certificate)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class LocalAgent:
    port: int
    tpm: LocalSwtpm
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextmanager
def local_azure_agent(
    workdir: Path, prepare_tpm: Callable[[str], None] | None = None
) -> Iterator[LocalAgent]:
    """A swtpm (prepared by ``prepare_tpm(tcti)`` before the agent opens it) and the guest
    agent serving ``--platform azure`` on a free loopback port, stopped on exit."""
    tpm = LocalSwtpm.create(workdir / "tpm", workdir / "ek-ca")
    tpm.start()
    process: subprocess.Popen[bytes] | None = None
    log_path = workdir / "agent.log"
    try:
        if prepare_tpm is not None:
            prepare_tpm(tpm.tcti)
        port = free_port()
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "aicert.guest_runtime.server",
                    "--tcti",
                    tpm.tcti,
                    "--platform",
                    "azure",
                    "--port",
                    str(port),
                    "--work-root",
                    str(workdir / "work"),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        with AgentClient(f"http://127.0.0.1:{port}") as client:
            client.wait_until_ready(timeout_s=30.0, interval_s=0.1)
        yield LocalAgent(port=port, tpm=tpm, log_path=log_path)
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        tpm.stop()
