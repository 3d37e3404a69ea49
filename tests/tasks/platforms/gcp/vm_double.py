"""The hypervisor behind ``FakeCompute``: an instance the double reports made boots a local "VM"
(a swtpm dressed as a GCE vTPM, PCR 0-9 and 14 extended with a real GCE boot event log, the
real guest agent ``--platform gcp --tls``), and its deletion stops it, as deleting a Compute
Engine instance does.

The AK certificate is issued for the key GCE's template gives on that TPM by a CA of Google's
shape (``tests/verification/gcp_like.GoogleLikeCa``): only the leaf goes into NV 0x01c10000,
as on GCE. The log is ``cos-85-amd-sev.bin`` (Container-Optimized OS on Compute Engine). Every
VM answers on the host's one agent port (the double's instance address is 127.0.0.1).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aicert.gcp_reference import derive_gcp_reference_values
from aicert.tasks.platforms.swtpm import LocalSwtpm
from aicert.tcg_eventlog import parse_event_log
from tests.data import EVENTLOGS
from tests.tasks.platforms.azure.guest import (
    LocalAgent,
    _stop_process,
    _wait_for_agent,
    free_port,
    replay_boot_log,
    stop_local_azure_vm,
)
from tests.tasks.platforms.azure.vm_double import _remove_run_containers
from tests.tasks.platforms.gcp.guest import (
    dress_as_gce_vtpm,
    endorsement_primary_public_key,
    gce_ak_template,
)
from tests.verification.gcp_like import GoogleLikeCa

GCE_LOG = "cos-85-amd-sev.bin"
ISSUED = datetime(2024, 5, 7, tzinfo=UTC)
# The --platform the image starts its agent with (a test swaps it for a wrong image).
AGENT_PLATFORM = "gcp"


def gce_boot_log() -> bytes:
    """The raw bytes of the real GCE boot event log the double's VMs measure."""
    return (EVENTLOGS / GCE_LOG).read_bytes()


def write_reference_values(folder: Path, image: str) -> Path:
    """``folder/reference-values.json``: the gcp set of a boot of ``GCE_LOG`` under ``image``,
    derived from the log and the PCR 0-9 it replays to, as the image publisher would."""
    raw = gce_boot_log()
    replayed = parse_event_log(raw).replay()["sha256"]
    reference = derive_gcp_reference_values(
        raw, {index: replayed.get(index, bytes(32)) for index in range(10)}, image=image
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "reference-values.json"
    path.write_text(reference.model_dump_json(indent=2))
    return path


def start_local_gce_vm(
    workdir: Path, ca: GoogleLikeCa, boot_event_log: bytes, port: int
) -> LocalAgent:
    """A "GCE VM": a swtpm with GCE's AK template and a Google-shaped leaf in its NV indices,
    PCRs extended with ``boot_event_log``, and the guest agent ``--platform gcp --tls`` on
    ``port`` with that log handed over. Stop it with ``stop_local_azure_vm``."""
    workdir.mkdir(parents=True, exist_ok=True)
    tpm = LocalSwtpm.create(workdir / "tpm", workdir / "ek-ca")
    tpm.start()
    process: subprocess.Popen[bytes] | None = None
    try:
        key = endorsement_primary_public_key(tpm.tcti, gce_ak_template())
        dress_as_gce_vtpm(tpm.tcti, workdir / "tools", ca.ak_certificate(key, not_before=ISSUED))
        boot_pcrs = replay_boot_log(tpm.tcti, boot_event_log, workdir / "tools")
        log_file = workdir / "binary_bios_measurements"
        log_file.write_bytes(boot_event_log)
        log_path = workdir / "agent.log"
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [
                    sys.executable, "-m", "aicert.guest_runtime.server",
                    "--tcti", tpm.tcti, "--platform", AGENT_PLATFORM, "--port", str(port),
                    "--work-root", str(workdir / "work"), "--tls",
                    "--boot-event-log", str(log_file),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        certificate = _wait_for_agent(port, process, True, log_path)
        return LocalAgent(
            port=port,
            tpm=tpm,
            log_path=log_path,
            work_root=workdir / "work",
            process=process,
            certificate_pem=certificate,
            boot_pcrs=boot_pcrs,
        )
    except BaseException:
        _stop_process(process)
        tpm.stop()
        raise


@dataclass
class GceVm:
    """One VM the host ran: its agent, and whether it was deleted."""

    name: str
    workdir: Path
    run_id: str = ""
    agent: LocalAgent | None = None
    boot_error: BaseException | None = None
    final_pcrs: dict[int, bytes] | None = None
    deleted: bool = False
    booting: threading.Thread | None = None


class GceVmHost:
    """Pass as ``FakeCompute(vm_lifecycle=...)``; ``port`` is the platform's ``agent_port``."""

    def __init__(self, workdir: Path, ca: GoogleLikeCa, boot_event_log: bytes) -> None:
        self.workdir = workdir
        self.ca = ca
        self.boot_event_log = boot_event_log
        self.port = free_port()
        self.vms: list[GceVm] = []

    def created(self, instance: dict[str, Any]) -> None:
        metadata = {item["key"]: item["value"] for item in instance["metadata"]["items"]}
        vm = GceVm(
            name=instance["name"],
            workdir=self.workdir / f"vm-{len(self.vms) + 1}",
            run_id=metadata.get("aicert-run-id", ""),
        )
        vm.booting = threading.Thread(target=self._boot, args=(vm,), daemon=True)
        self.vms.append(vm)
        vm.booting.start()

    def deleted(self, instance: dict[str, Any]) -> None:
        for vm in self.vms:
            if vm.name == instance["name"] and not vm.deleted:
                self._shut_down(vm)

    def _boot(self, vm: GceVm) -> None:
        try:
            vm.agent = start_local_gce_vm(vm.workdir, self.ca, self.boot_event_log, self.port)
        except BaseException as exc:  # reported by the test through boot_errors()
            vm.boot_error = exc

    def _shut_down(self, vm: GceVm) -> None:
        if vm.booting is not None:
            vm.booting.join(timeout=120)
        if vm.agent is not None:
            vm.final_pcrs = stop_local_azure_vm(vm.agent)
        _remove_run_containers(vm.run_id)
        vm.deleted = True

    def boot_errors(self) -> list[str]:
        return [f"{vm.name}: {vm.boot_error!r}" for vm in self.vms if vm.boot_error is not None]

    def close(self) -> None:
        for vm in self.vms:
            if not vm.deleted:
                with contextlib.suppress(Exception):
                    self._shut_down(vm)

    def __enter__(self) -> GceVmHost:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
