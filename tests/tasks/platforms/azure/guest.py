"""The Azure VM's side in tests: a swtpm dressed as an Azure vTPM, and a guest agent on it.

``install_azure_ak`` does with tpm2-tools what Azure's host does before the VM boots: an AK
in the endorsement hierarchy, persisted at 0x81000003. ``install_nv_certificate`` writes a
certificate into NV 0x01C101D0, zero padded to the index's size as Azure's is.
``azure_like_chain`` issues, with ``tests/verification/azure_like.py``, a leaf for the
TPM's AK under an intermediate shaped like "Global Virtual TPM CA - 03" and a root shaped
like Microsoft's (but not Microsoft's: its fingerprint is not the pinned one).
``replay_boot_log`` extends PCR 0-9 with a real boot event log's SHA-256 digests, as the
firmware, boot loader and kernel did during the boot that log records. ``start_local_azure_vm``
serves the real guest agent (``--platform azure``, optionally ``--tls`` and
``--boot-event-log``) on loopback on such a TPM; ``local_azure_agent`` is its context manager.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding, load_pem_public_key

from aicert.guest_runtime.azure_ak import AZURE_AK_CERT_NV_INDEX, AZURE_AK_HANDLE
from aicert.guest_runtime.channel import fetch_server_certificate
from aicert.guest_runtime.tpm import Tpm
from aicert.reference_values import BOOT_PCRS, derive_azure_reference_values, parse_pcr_values
from aicert.tasks.platforms.agent_client import AgentClient, AgentUnreachableError
from aicert.tasks.platforms.swtpm import LocalSwtpm
from aicert.tcg_eventlog import parse_event_log
from tests.data import EVENTLOGS
from tests.verification.azure_like import (
    Issued,
    ak_leaf,
    azure_like_intermediate,
    azure_like_root,
)

NV_CERT_SIZE = 2048  # bytes the NV index holds; the DER certificate is zero padded to it
# The boot the test VMs replay: a real UEFI VM's with Secure Boot, shim, GRUB and a
# shim-verified kernel (no Azure log is available), with no StartupLocality event (PCR 0
# starts at zero, as on a swtpm). Shim measures its MOK lists into PCR 14, as on Azure's
# Ubuntu images: the run's events then extend that (application_pcr_start).
BOOT_LOG = "keylime-binary_bios_measurements-secureboot.bin"
REPLAYED_PCRS = (*BOOT_PCRS, 14)
REFERENCE_ID = "aicert-guest-tl-1.0.0"
EV_NO_ACTION = 0x00000003  # logged, never extended (e.g. the Spec ID event)
PCR_EXTENDS_PER_CALL = 16
AGENT_START_TIMEOUT_S = 60.0


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


class IssuedChain(Protocol):
    """What a CA issued for one "VM": its AK certificate, and what the image ships."""

    @property
    def leaf_der(self) -> bytes: ...

    @property
    def image_pem_bundle(self) -> str: ...


class IssuingCa(Protocol):
    """A hierarchy that issues "VM"s' AK certificates: ``AzureLikeCa`` (CA-03 shape, shipped
    intermediate) or ``hierarchies.AiaCa`` (CA-11 / CA-25 shape, intermediates by AIA)."""

    root: Issued

    def issue(self, ak_public: PublicKeyTypes, now: datetime | None = None) -> IssuedChain: ...


@dataclass(frozen=True)
class AzureLikeCa:
    """A root shaped like Microsoft's vTPM root and an intermediate shaped like "Global Virtual
    TPM CA - 03": what issues every "VM"'s AK certificate in a test."""

    root: Issued
    intermediate: Issued

    def issue(self, ak_public: PublicKeyTypes, now: datetime | None = None) -> AzureLikeChain:
        leaf = ak_leaf(
            self.intermediate,
            not_before=(now or datetime.now(UTC)) - timedelta(days=1),
            ak_key=_PublicKeyOnly(ak_public),  # type: ignore[arg-type]
        )
        return AzureLikeChain(root=self.root, intermediate=self.intermediate, leaf=leaf.certificate)


def azure_like_ca(now: datetime | None = None) -> AzureLikeCa:
    now = now or datetime.now(UTC)
    root = azure_like_root(
        not_before=now - timedelta(days=900), not_after=now + timedelta(days=8000)
    )
    intermediate = azure_like_intermediate(
        root, not_before=now - timedelta(days=200), not_after=now + timedelta(days=500)
    )
    return AzureLikeCa(root=root, intermediate=intermediate)


def azure_like_chain(ak_public: PublicKeyTypes, now: datetime | None = None) -> AzureLikeChain:
    """A chain under a CA of its own (see ``AzureLikeCa`` to share one CA between VMs)."""
    return azure_like_ca(now).issue(ak_public, now)


def dress_as_azure_vtpm(tcti: str, workdir: Path, ca: IssuingCa) -> IssuedChain:
    """What Azure's host does before the VM boots (AK at 0x81000003, its certificate in NV
    0x01C101D0), and the intermediates file the image ships (``azure-intermediates.pem``)."""
    ak_public = install_azure_ak(tcti, workdir / "tools")
    chain = ca.issue(ak_public)
    install_nv_certificate(tcti, workdir / "tools", chain.leaf_der)
    (workdir / "azure-intermediates.pem").write_text(chain.image_pem_bundle)
    return chain


def replay_boot_log(tcti: str, raw_log: bytes, workdir: Path) -> dict[int, bytes]:
    """Extend PCR 0-9 and 14 (SHA-256 bank) with the digests of ``raw_log``'s events, in log
    order, with ``tpm2_pcrextend``; return them as ``tpm2_pcrread`` then reports them.

    Only logs without a ``StartupLocality`` event can be replayed this way: such an event means
    the firmware started the TPM from locality 3 (PCR 0 starts at 00..03), which a swtpm started
    by ``swtpm socket`` at locality 0 cannot reproduce by extends. Raises when the TPM's PCRs
    are not what the log replays to (the log would not be a consistent boot)."""
    log = parse_event_log(raw_log)
    if log.startup_locality:
        raise ValueError(
            f"the log starts the TPM at locality {log.startup_locality}: PCR 0 cannot be "
            "reproduced on a swtpm by extends"
        )
    specs = [
        f"{event.pcr}:sha256={event.digests['sha256'].hex()}"
        for event in log.events
        if event.event_type != EV_NO_ACTION and event.pcr in REPLAYED_PCRS
    ]
    workdir.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(specs), PCR_EXTENDS_PER_CALL):
        tpm2(tcti, "tpm2_pcrextend", *specs[start : start + PCR_EXTENDS_PER_CALL], cwd=workdir)
    selection = "sha256:" + ",".join(str(index) for index in REPLAYED_PCRS)
    pcrs = parse_pcr_values(tpm2(tcti, "tpm2_pcrread", selection, cwd=workdir))
    replayed = log.replay()["sha256"]
    expected = {index: replayed.get(index, bytes(32)) for index in REPLAYED_PCRS}
    if pcrs != expected:
        differ = [index for index in REPLAYED_PCRS if pcrs.get(index) != expected[index]]
        raise RuntimeError(f"PCR {differ} differ from the log's replay after the extends")
    return pcrs


def boot_log() -> bytes:
    return (EVENTLOGS / BOOT_LOG).read_bytes()


def derived_reference_values(
    folder: Path, image_version_id: str, reference_id: str = REFERENCE_ID, **options: Any
) -> Path:
    """``folder/reference-values.json``: the Azure set of a boot of ``BOOT_LOG``, derived from
    the log and its replayed PCRs (``options``: ``derive_azure_reference_values``'s)."""
    raw = boot_log()
    replayed = parse_event_log(raw).replay()["sha256"]
    reference = derive_azure_reference_values(
        raw,
        {index: replayed.get(index, bytes(32)) for index in BOOT_PCRS},
        image_version_id=image_version_id,
        reference_id=reference_id,
        **options,
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "reference-values.json"
    path.write_text(reference.model_dump_json(indent=2))
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class LocalAgent:
    """The guest agent of a "VM" and its TPM (see ``start_local_azure_vm``)."""

    port: int
    tpm: LocalSwtpm
    log_path: Path
    work_root: Path
    process: subprocess.Popen[bytes]
    # The TLS channel certificate the agent serves (None: plain http).
    certificate_pem: str | None = None
    chain: IssuedChain | None = None
    boot_pcrs: dict[int, bytes] = field(default_factory=dict)

    @property
    def url(self) -> str:
        scheme = "https" if self.certificate_pem is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def client(self, timeout_s: float = 30.0) -> AgentClient:
        return AgentClient(
            self.url, timeout_s=timeout_s, server_certificate_pem=self.certificate_pem
        )


def _wait_for_agent(
    port: int, process: subprocess.Popen[bytes], tls: bool, log_path: Path
) -> str | None:
    """Wait until the agent answers; its TLS certificate when ``tls``."""
    deadline = time.monotonic() + AGENT_START_TIMEOUT_S
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    while True:
        try:
            certificate = fetch_server_certificate(url, timeout_s=5.0) if tls else None
            with AgentClient(url, timeout_s=5.0, server_certificate_pem=certificate) as client:
                client.health(timeout_s=5.0)
            return certificate
        except (AgentUnreachableError, OSError):
            if process.poll() is not None:
                raise RuntimeError(
                    f"the agent exited ({process.returncode}): {log_path.read_text()[-2000:]}"
                ) from None
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


def start_local_azure_vm(
    workdir: Path,
    *,
    prepare_tpm: Callable[[str], None] | None = None,
    ca: IssuingCa | None = None,
    boot_event_log: bytes | None = None,
    tls: bool = False,
    port: int | None = None,
    log_handed_over: bool = True,
) -> LocalAgent:
    """A "VM": a swtpm, dressed as an Azure vTPM when ``ca`` is given (AK, its certificate, the
    image's intermediates), its PCR 0-9 extended with ``boot_event_log`` as at boot, then
    ``prepare_tpm(tcti)``, then the guest agent ``--platform azure`` on ``port`` (default: a
    free one), with ``--tls`` and ``--boot-event-log`` as asked. ``log_handed_over=False``:
    the PCRs are extended as that boot did, but the agent's log file is zero bytes, as Azure
    Trusted Launch gives the guest. Stop it with ``stop_local_azure_vm``."""
    workdir.mkdir(parents=True, exist_ok=True)
    tpm = LocalSwtpm.create(workdir / "tpm", workdir / "ek-ca")
    tpm.start()
    process: subprocess.Popen[bytes] | None = None
    try:
        chain = dress_as_azure_vtpm(tpm.tcti, workdir, ca) if ca is not None else None
        boot_pcrs: dict[int, bytes] = {}
        log_arguments: list[str] = []
        if boot_event_log is not None:
            boot_pcrs = replay_boot_log(tpm.tcti, boot_event_log, workdir / "tools")
            # Where the image's unit copies securityfs's log for the agent.
            (workdir / "binary_bios_measurements").write_bytes(
                boot_event_log if log_handed_over else b""
            )
            log_arguments = ["--boot-event-log", str(workdir / "binary_bios_measurements")]
        if prepare_tpm is not None:
            prepare_tpm(tpm.tcti)
        port = port or free_port()
        log_path = workdir / "agent.log"
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
                    *(
                        ["--azure-intermediates", str(workdir / "azure-intermediates.pem")]
                        if chain is not None
                        else []
                    ),
                    *(["--tls"] if tls else []),
                    *log_arguments,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        certificate = _wait_for_agent(port, process, tls, log_path)
        return LocalAgent(
            port=port,
            tpm=tpm,
            log_path=log_path,
            work_root=workdir / "work",
            process=process,
            certificate_pem=certificate,
            chain=chain,
            boot_pcrs=boot_pcrs,
        )
    except BaseException:
        _stop_process(process)
        tpm.stop()
        raise


def _stop_process(process: subprocess.Popen[bytes] | None) -> None:
    if process is None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def stop_local_azure_vm(agent: LocalAgent) -> dict[int, bytes]:
    """Stop the agent, then read PCR 0-15 of its TPM (what the machine held when it went
    away), then stop the TPM; return those PCRs (empty when the TPM could not be read)."""
    _stop_process(agent.process)
    pcrs: dict[int, bytes] = {}
    try:
        with contextlib.suppress(Exception), Tpm(agent.tpm.tcti) as tpm:
            pcrs = tpm.pcr_read(list(range(16)))
    finally:
        agent.tpm.stop()
    return pcrs


@contextmanager
def local_azure_agent(
    workdir: Path,
    prepare_tpm: Callable[[str], None] | None = None,
    *,
    ca: IssuingCa | None = None,
    boot_event_log: bytes | None = None,
    tls: bool = False,
    port: int | None = None,
) -> Iterator[LocalAgent]:
    """``start_local_azure_vm`` with the same options, stopped on exit."""
    agent = start_local_azure_vm(
        workdir,
        prepare_tpm=prepare_tpm,
        ca=ca,
        boot_event_log=boot_event_log,
        tls=tls,
        port=port,
    )
    try:
        yield agent
    finally:
        stop_local_azure_vm(agent)
