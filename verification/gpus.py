"""The GPUs a run had: facts the agent's ``nvidia-smi`` reported, measured, not attested.

A config with ``gpus: N`` has the agent pass the first N NVIDIA GPUs to the training
container (Docker's ``--gpus N``: its NVIDIA driver exposes devices 0 to N-1). Before
anything is downloaded, the agent asks ``nvidia-smi`` about those devices and measures what
it answered into PCR 14 as one ``aicert.input.gpus`` event: each device's index, model name,
UUID and memory, the driver version and the CUDA version the driver supports.

What this proves, and what it does not: the quote binds the facts to the run, so nobody
could edit them afterwards. It does not prove the hardware is what ``nvidia-smi`` said: the
answer comes from the driver, inside the machine, and no GPU vouched for it. Proving the GPU
itself takes the GPU's own attestation (NVIDIA's confidential-computing attestation of H100
and later GPUs), which AICert does not do. The verifier's report says so wherever it shows
the GPUs (``GPU_FACTS_NOTE``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, JsonValue, StringConstraints

from aicert.errors import EventLogError
from aicert.event_data import INPUTS_PCR, EventData

# The most GPUs a config may ask for (the builder's ``gpus`` bound: more than any one
# machine offers today; an HGX node has 8, the largest 16).
MAX_GPUS = 32
MAX_GPU_NAME_CHARS = 128
MAX_GPU_MEMORY_MIB = 16 * 1024 * 1024  # 16 TiB: far beyond any GPU
# nvidia-smi's GPU UUID: "GPU-" and a UUID in lowercase hex (MIG instances, "MIG-...", are
# never passed: Docker's --gpus N passes whole GPUs).
GPU_UUID_PATTERN = r"^GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
DRIVER_VERSION_PATTERN = r"^[0-9]{1,4}(\.[0-9]{1,4}){1,3}$"
CUDA_VERSION_PATTERN = r"^[0-9]{1,3}\.[0-9]{1,3}$"

GPU_FACTS_NOTE = (
    "as the agent's nvidia-smi reported them, measured into PCR 14: bound to this run, "
    "but not attested hardware (no GPU attestation)"
)


class GpuDevice(BaseModel):
    """One GPU passed to the job, as ``nvidia-smi --query-gpu`` described it."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    index: Annotated[int, Field(ge=0, lt=MAX_GPUS)]
    name: Annotated[
        str, StringConstraints(min_length=1, max_length=MAX_GPU_NAME_CHARS, pattern=r"^[ -~]+$")
    ]
    uuid: Annotated[str, StringConstraints(pattern=GPU_UUID_PATTERN)]
    memory_total_mib: Annotated[int, Field(ge=1, le=MAX_GPU_MEMORY_MIB)]


def _devices_zero_to_n(devices: list[GpuDevice]) -> list[GpuDevice]:
    # Docker's NVIDIA driver turns a count N into devices 0..N-1: the event lists those.
    indices = [device.index for device in devices]
    if indices != list(range(len(devices))):
        raise ValueError(f"devices must be indices 0 to {len(devices) - 1} in order, got {indices}")
    uuids = [device.uuid for device in devices]
    if len(set(uuids)) != len(uuids):
        raise ValueError("two devices have the same uuid")
    return devices


class GpuEvent(EventData):
    """``aicert.input.gpus``: the GPUs passed to the job, measured after the config."""

    TYPE = "aicert.input.gpus"
    PCR = INPUTS_PCR
    driver_version: Annotated[str, StringConstraints(pattern=DRIVER_VERSION_PATTERN)]
    cuda_version: Annotated[str, StringConstraints(pattern=CUDA_VERSION_PATTERN)]
    devices: Annotated[
        list[GpuDevice],
        Field(min_length=1, max_length=MAX_GPUS),
        AfterValidator(_devices_zero_to_n),
    ]

    def to_report(self) -> dict[str, object]:
        """The GPUs as the verified report's JSON gives them, with what they do not prove."""
        return {
            "note": GPU_FACTS_NOTE,
            "attested": False,
            "driver_version": self.driver_version,
            "cuda_version": self.cuda_version,
            "devices": [device.model_dump(mode="json") for device in self.devices],
        }


def check_measured_gpus(
    config: Mapping[str, JsonValue], events: Sequence[GpuEvent]
) -> GpuEvent | None:
    """The run's GPU event, checked against the measured config's ``gpus``.

    A config asking for N GPUs has exactly one ``aicert.input.gpus`` event listing N
    devices; a config asking for none has no such event.

    Raises:
        EventLogError: naming what disagrees.
    """
    requested = config.get("gpus", 0)
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 0:
        raise EventLogError(f"the measured config's gpus is {requested!r}, not a GPU count")
    if len(events) > 1:
        raise EventLogError(f"the log has {len(events)} {GpuEvent.TYPE} events; a run has one")
    event = events[0] if events else None
    if event is None and requested:
        raise EventLogError(
            f"the measured config asks for {requested} GPUs (gpus: {requested}) but the log "
            f"has no {GpuEvent.TYPE} event: the GPUs the job had are not recorded"
        )
    if event is not None and len(event.devices) != requested:
        raise EventLogError(
            f"the {GpuEvent.TYPE} event lists {len(event.devices)} GPUs but the measured "
            f"config asks for {requested} (gpus: {requested})"
        )
    return event
