"""The hypervisor behind ``FakeArm``: a VM resource that ARM reports created boots a local "VM"
(a swtpm dressed as an Azure vTPM, PCR 0-9 extended with a real boot event log, the real guest
agent with ``--tls``), and its deletion stops it, as deleting an Azure VM does.

``VmImage`` says what the VMs boot: the boot event log their "firmware" measures, whether the
guest is handed that log or zero bytes (Trusted Launch), and whether a machine-in-the-middle
(``TlsInterceptor``) sits between the VM's public port and its agent. The CA that issues the
VMs' AK certificates may be the CA-03 shape (``guest.AzureLikeCa``) or an AIA hierarchy
(``hierarchies.AiaCa``, intermediates served over http).
Every VM answers on the host's one public port (FakeArm's public IP address is 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker

from aicert.guest_runtime.channel import ChannelFiles, new_channel_identity
from aicert.guest_runtime.run_state import training_image_tag
from aicert.tasks.platforms.azure import AICERT_RUN_TAG
from aicert.tasks.platforms.local.provider import run_container_filters
from tests.tasks.platforms.azure.guest import (
    IssuingCa,
    LocalAgent,
    free_port,
    start_local_azure_vm,
    stop_local_azure_vm,
)


@dataclass(frozen=True)
class VmImage:
    boot_event_log: bytes  # what firmware, boot loader and kernel measured into PCR 0-9
    intercept_channel: bool = False  # a TLS machine-in-the-middle on the public port
    # False: the PCRs are extended as the log says, but the guest sees a zero-byte log, as
    # Azure Trusted Launch gives it (the boot is then judged by its PCR values).
    log_handed_over: bool = True


@dataclass
class BootedVm:
    """One VM the host ran: its agent, and what it held when deleted."""

    name: str
    run_id: str
    workdir: Path
    agent: LocalAgent | None = None
    interceptor: TlsInterceptor | None = None
    boot_error: BaseException | None = None
    final_pcrs: dict[int, bytes] = field(default_factory=dict)
    deleted: bool = False
    booting: threading.Thread | None = None


class TlsInterceptor:
    """Terminates TLS on ``listen_port`` with a key of its own and relays every connection to
    the agent's TLS port: what an attacker between the orchestrator and the VM would do."""

    def __init__(self, listen_port: int, upstream_port: int) -> None:
        self.listen_port = listen_port
        self.upstream_port = upstream_port
        self.identity = new_channel_identity()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def start(self) -> None:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._serve(), self._loop)
        self._server = future.result(timeout=10)

    async def _serve(self) -> asyncio.Server:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with ChannelFiles(self.identity) as files:
            context.load_cert_chain(files.certificate, files.key)
        return await asyncio.start_server(self._relay, "127.0.0.1", self.listen_port, ssl=context)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The attacker does not care whom it talks to upstream.
        upstream_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        upstream_context.check_hostname = False
        upstream_context.verify_mode = ssl.CERT_NONE
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(
                "127.0.0.1", self.upstream_port, ssl=upstream_context
            )
        except OSError:
            writer.close()
            return
        self._writers.add(up_writer)
        await asyncio.gather(
            _pipe(reader, up_writer), _pipe(up_reader, writer), return_exceptions=True
        )

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for writer in self._writers:
                writer.close()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


class AzureVmHost:
    """Pass as ``FakeArm(vm_lifecycle=...)``; ``port`` is the VMs' public agent port (the
    platform's ``agent_port``). ``close`` stops whatever is still running."""

    def __init__(self, workdir: Path, ca: IssuingCa, image: VmImage) -> None:
        self.workdir = workdir
        self.ca = ca
        self.image = image
        self.port = free_port()
        self.vms: list[BootedVm] = []
        self._lock = threading.Lock()

    # -- VmLifecycle ---------------------------------------------------------------------

    def created(self, vm: dict[str, Any]) -> None:
        booted = BootedVm(
            name=vm["name"],
            run_id=(vm.get("tags") or {}).get(AICERT_RUN_TAG, ""),
            workdir=self.workdir / f"vm-{len(self.vms) + 1}",
        )
        booted.booting = threading.Thread(
            target=self._boot, args=(booted,), name=f"boot-{vm['name']}", daemon=True
        )
        with self._lock:
            self.vms.append(booted)
        booted.booting.start()

    def deleted(self, vm: dict[str, Any]) -> None:
        for booted in self.vms:
            if booted.name == vm["name"] and not booted.deleted:
                self._shut_down(booted)

    # -- the VMs -------------------------------------------------------------------------

    def _boot(self, booted: BootedVm) -> None:
        intercept = self.image.intercept_channel
        try:
            booted.agent = start_local_azure_vm(
                booted.workdir,
                ca=self.ca,
                boot_event_log=self.image.boot_event_log,
                tls=True,
                port=None if intercept else self.port,
                log_handed_over=self.image.log_handed_over,
            )
            if intercept:
                booted.interceptor = TlsInterceptor(self.port, booted.agent.port)
                booted.interceptor.start()
        except BaseException as exc:  # reported by the test through boot_errors()
            booted.boot_error = exc

    def _shut_down(self, booted: BootedVm) -> None:
        if booted.booting is not None:
            booted.booting.join(timeout=120)
        if booted.interceptor is not None:
            booted.interceptor.stop()
        if booted.agent is not None:
            booted.final_pcrs = stop_local_azure_vm(booted.agent)
        # The VM's disk goes with it: the run's training container and image too.
        _remove_run_containers(booted.run_id)
        booted.deleted = True

    def boot_errors(self) -> list[str]:
        return [f"{vm.name}: {vm.boot_error!r}" for vm in self.vms if vm.boot_error is not None]

    def running(self) -> list[str]:
        """VMs whose agent or TPM process still runs."""
        alive = []
        for vm in self.vms:
            agent = vm.agent
            if agent is not None and (agent.process.poll() is None or agent.tpm.running):
                alive.append(vm.name)
        return alive

    def close(self) -> None:
        for booted in self.vms:
            if not booted.deleted:
                with contextlib.suppress(Exception):
                    self._shut_down(booted)

    def __enter__(self) -> AzureVmHost:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _remove_run_containers(run_id: str) -> None:
    if not run_id:
        return
    client = docker.from_env(timeout=30)
    try:
        for filters in run_container_filters(run_id):
            for container in client.containers.list(all=True, filters=filters):
                with contextlib.suppress(docker.errors.NotFound):
                    container.remove(force=True)
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            client.images.remove(training_image_tag(run_id), noprune=False)
    finally:
        client.close()
