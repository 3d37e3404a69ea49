"""GPU jobs: the GPUs the agent passes to the training container, asked of ``nvidia-smi``
and measured into PCR 14 before anything else of the run is fetched.

``gpus: N`` passes the first N NVIDIA GPUs (Docker's ``--gpus N``; ``container.py`` sends
the device request). Before that, ``measure_gpus`` asks ``nvidia-smi`` about devices 0 to
N-1 (model, UUID, memory; driver and CUDA versions) and measures its answer as one
``aicert.input.gpus`` event (``aicert.gpus``). These are facts the driver reported inside the
machine, bound to the run by the quote, not attested hardware.

Only the local platform can pass GPUs today (the agent runs on the host, whose Docker engine
may have the NVIDIA Container Toolkit): ``refuse_gpus_on_platform`` refuses the others
before anything is provisioned.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading

from aicert.gpus import MAX_GPUS, GpuDevice, GpuEvent
from aicert.guest_runtime.config import ConfigError, RunConfig
from aicert.guest_runtime.run_state import Measurer, RunState
from aicert.model import PlatformKind

NVIDIA_SMI = "nvidia-smi"
NVIDIA_SMI_TIMEOUT_S = 30.0
# nvidia-smi's answers are a line per GPU and a short header: anything longer is not them.
MAX_NVIDIA_SMI_OUTPUT_BYTES = 64 * 1024
QUERY_FIELDS = "index,name,uuid,driver_version,memory.total"
# Why each platform cannot pass GPUs to its machine (the local platform can).
NO_GPU_PLATFORMS: dict[str, str] = {
    "qemu": "its VM has no GPU passthrough",
    "azure": "its provider asks for no GPU VM size and its image has no NVIDIA driver",
    "gcp": "its provider attaches no accelerator to the VM and its image has no NVIDIA driver",
}
_CUDA_VERSION = re.compile(r"^CUDA Version\s*:\s*(\S+)\s*$", re.MULTILINE)


class GpuError(ConfigError):
    """The GPUs the config asks for (``gpus``) cannot be given or described on this machine."""

    def __init__(self, message: str) -> None:
        super().__init__([f"gpus: {message}"], "config")


def refuse_gpus_on_platform(config: RunConfig, platform: str) -> None:
    """Refuse ``gpus`` > 0 on a platform (a ``PlatformKind``) that cannot pass GPUs, before
    provisioning.

    Raises:
        GpuError: naming the platform and why.
    """
    reason = NO_GPU_PLATFORMS.get(platform)
    if config.gpus and reason is not None:
        raise GpuError(
            f"{config.gpus} GPUs asked for, but the {platform} platform cannot pass GPUs to "
            f"its machine ({reason}); GPU jobs run on the local platform, on a host with "
            "NVIDIA GPUs and the NVIDIA Container Toolkit"
        )


def run_nvidia_smi(
    arguments: list[str], *, executable: str = NVIDIA_SMI, timeout_s: float = NVIDIA_SMI_TIMEOUT_S
) -> str:
    """``nvidia-smi`` with ``arguments``: its output (stdout and stderr), bounded in size and
    time.

    Raises:
        GpuError: nvidia-smi is missing, failed, took longer than ``timeout_s`` or wrote more
            than ``MAX_NVIDIA_SMI_OUTPUT_BYTES``.
    """
    path = shutil.which(executable)
    if path is None:
        raise GpuError(
            f"{executable} is not on this machine's PATH: no NVIDIA driver to ask which GPUs "
            "the job gets (install the NVIDIA driver and the NVIDIA Container Toolkit)"
        )
    command = " ".join([executable, *arguments])
    timed_out = threading.Event()
    with subprocess.Popen(
        [path, *arguments],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    ) as process:

        def kill_at_deadline() -> None:
            # A hung nvidia-smi (a GPU fallen off the bus) must not hang the run: killing it
            # ends the read below.
            timed_out.set()
            process.kill()

        timer = threading.Timer(timeout_s, kill_at_deadline)
        timer.start()
        try:
            assert process.stdout is not None
            output = process.stdout.read(MAX_NVIDIA_SMI_OUTPUT_BYTES + 1)
            if len(output) > MAX_NVIDIA_SMI_OUTPUT_BYTES:
                process.kill()
            code = process.wait()
        finally:
            timer.cancel()
    text = output.decode("utf-8", errors="replace")
    if timed_out.is_set():
        raise GpuError(f"{command} did not answer within {timeout_s:g} s and was killed")
    if len(output) > MAX_NVIDIA_SMI_OUTPUT_BYTES:
        raise GpuError(f"{command} wrote more than {MAX_NVIDIA_SMI_OUTPUT_BYTES} bytes")
    if code != 0:
        raise GpuError(f"{command} failed (exit code {code}): {text.strip()[:500]}")
    return text


def parse_gpu_list(text: str) -> list[tuple[GpuDevice, str]]:
    """The devices of ``nvidia-smi --query-gpu=index,name,uuid,driver_version,memory.total
    --format=csv,noheader,nounits`` (``0, NVIDIA H100 80GB HBM3, GPU-..., 550.54.15,
    81559``), each with its driver version, in the order listed.

    Raises:
        GpuError: a line that is not five fields of the expected kinds, or more lines than
            any machine has GPUs.
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 4 * MAX_GPUS:
        raise GpuError(f"nvidia-smi listed {len(lines)} GPUs: more than any machine has")
    parsed: list[tuple[GpuDevice, str]] = []
    for number, line in enumerate(lines, start=1):
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != 5 or not fields[0].isdigit() or not fields[4].isdigit():
            raise GpuError(
                f"nvidia-smi line {number} is not '<index>, <name>, <uuid>, <driver>, "
                f"<memory MiB>': {line[:200]!r}"
            )
        index, name, uuid, driver, memory = fields
        try:
            device = GpuDevice(index=int(index), name=name, uuid=uuid, memory_total_mib=int(memory))
        except ValueError as exc:
            raise GpuError(f"nvidia-smi line {number} ({line[:200]!r}): {exc}") from None
        parsed.append((device, driver))
    return parsed


def parse_cuda_version(text: str) -> str:
    """The ``CUDA Version`` of ``nvidia-smi -q -d COMPUTE``'s header (the highest CUDA
    version the driver supports).

    Raises:
        GpuError: no such line, or more than one.
    """
    found = _CUDA_VERSION.findall(text)
    if len(found) != 1:
        raise GpuError(
            f"nvidia-smi -q gave {len(found)} 'CUDA Version' lines, not one: cannot tell the "
            "CUDA version of the driver"
        )
    return str(found[0])


def query_gpus(count: int, *, executable: str = NVIDIA_SMI) -> GpuEvent:
    """What ``nvidia-smi`` reports about GPUs 0 to ``count``-1 (those Docker's ``--gpus
    count`` passes), as the event to measure.

    Raises:
        GpuError: nvidia-smi is missing or failed, its answer is malformed, the machine has
            fewer GPUs than ``count``, or its driver versions disagree.
    """
    query = [f"--query-gpu={QUERY_FIELDS}", "--format=csv,noheader,nounits"]
    listed = parse_gpu_list(run_nvidia_smi(query, executable=executable))
    header = run_nvidia_smi(["-q", "-d", "COMPUTE"], executable=executable)
    cuda_version = parse_cuda_version(header)
    indices = sorted(device.index for device, _ in listed)
    passed = sorted((pair for pair in listed if pair[0].index < count), key=lambda p: p[0].index)
    if [device.index for device, _ in passed] != list(range(count)):
        raise GpuError(
            f"{count} GPUs asked for, but nvidia-smi lists {len(listed)} on this machine "
            f"(indices {indices})"
        )
    drivers = {driver for _, driver in listed}
    if len(drivers) != 1:
        raise GpuError(f"nvidia-smi reports several driver versions: {sorted(drivers)}")
    try:
        return GpuEvent(
            driver_version=drivers.pop(),
            cuda_version=cuda_version,
            devices=[device for device, _ in passed],
        )
    except ValueError as exc:
        raise GpuError(f"nvidia-smi's answer is not a GPU description: {exc}") from None


def measure_gpus(
    measurer: Measurer, run: RunState, platform: PlatformKind, *, executable: str = NVIDIA_SMI
) -> None:
    """With ``gpus`` > 0: refuse a platform that cannot pass GPUs, then measure what
    ``nvidia-smi`` reports about the GPUs the job will get (nothing for ``gpus: 0``)."""
    count = run.config.gpus
    if not count:
        return
    refuse_gpus_on_platform(run.config, platform)
    measurer.progress(f"asking nvidia-smi about the {count} GPU(s) the job gets")
    measurer.measure(run, query_gpus(count, executable=executable))
