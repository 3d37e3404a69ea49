"""Request and response models of the guest agent's HTTP API (shared by server and client)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from aicert.model import AppEvent, Base64Bytes, PlatformKind, SignedStatement

API_PREFIX = "/v1"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Health(_Model):
    status: Literal["ok"]
    runtime_version: str
    platform: PlatformKind
    busy_run_id: str | None
    # The agent process's peak resident memory (VmHWM): what a run of a given size cost it
    # (benchmarks, operators sizing a VM); None where the kernel does not say.
    peak_rss_bytes: int | None = None


class StartRunRequest(_Model):
    run_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$")]
    nonce: Base64Bytes(64)
    config: dict[str, Any]


class KeyMaterial(_Model):
    """What the platform CA needs to check that the AK lives in the TPM that owns the EK."""

    ek_certificate: Base64Bytes(8192) | None
    ek_public: Base64Bytes(2048)  # TPMT_PUBLIC
    ak_public: Base64Bytes(2048)  # TPMT_PUBLIC
    ak_name: Base64Bytes(128)
    ak_certificate_chain: list[str] | None = None  # set when the platform pre-provisions it


class ActivateRequest(_Model):
    credential_blob: Base64Bytes(4096)
    encrypted_secret: Base64Bytes(4096)


class ActivateResponse(_Model):
    secret: Base64Bytes(256)


class EventsResponse(_Model):
    events: list[AppEvent]


class TrainingStatus(_Model):
    state: Literal["running", "succeeded", "failed"]
    exit_code: int | None = None
    duration_ms: int | None = None
    timed_out: bool = False
    error: str | None = None
    log_lines: int = 0


class LogChunk(_Model):
    lines: list[str]
    next_offset: int
    finished: bool


class Evidence(_Model):
    attest: Base64Bytes(4096)
    signature: Base64Bytes(2048)
    pcrs: dict[str, str]
    nonce: Base64Bytes(64)
    ak_public: Base64Bytes(2048)
    event_log: list[AppEvent]
    boot_event_log: Base64Bytes(16 * 1024 * 1024) | None = None
    started_at: str
    finished_at: str
    exit_code: int
    duration_ms: int
    # The statements the AK signed after the outputs (their digests are the log's last event).
    signed_statements: list[SignedStatement] = []


class PlatformQuoteRequest(_Model):
    challenge: Base64Bytes(64)  # 16 to 64 bytes, checked by the agent


class PlatformEvidence(_Model):
    """A quote of PCR 0-15 over the orchestrator's challenge, before the workload: the boot
    chain (and what PCR 14 holds so far) is checked before anything is sent to the machine."""

    attest: Base64Bytes(4096)
    signature: Base64Bytes(2048)
    pcrs: dict[str, str]
    ak_public: Base64Bytes(2048)
    boot_event_log: Base64Bytes(16 * 1024 * 1024) | None = None
    # The data of the agent's measured channel-key event (remote platforms), if any.
    channel_key: dict[str, Any] | None = None


class ProgressReport(_Model):
    """What the agent is doing now: ``phase`` is "idle" between long operations."""

    phase: str
    done_bytes: int
    total_bytes: int | None
    message: str
