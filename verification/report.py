"""What a verification found: the checks passed and what the certificate binds.

``aicert.verify.verify_certificate`` returns a :class:`VerificationReport`; its inputs and
outputs come only from the replayed application event log, never from the certificate's own
claims.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from aicert.gpus import GpuEvent
from aicert.lineage import LineageLink
from aicert.model import InputRecord, OutputRecord


@dataclass(frozen=True)
class Check:
    """One verification step that passed: its name and what it established."""

    name: str
    detail: str


@dataclass(frozen=True)
class VerificationReport:
    """What was verified, and what the certificate binds (from the replayed log only)."""

    run_id: str
    project: str
    platform: str
    boot_chain_attested: bool
    platform_note: str
    ak_root_subject: str
    ak_root_fingerprint_sha256: str
    ak_chain_expires_at: datetime
    verified_at_time: datetime
    nonce: str
    runtime_version: str
    exit_code: int
    duration_ms: int
    finished_at: datetime
    inputs: tuple[InputRecord, ...]
    outputs: tuple[OutputRecord, ...]
    pcrs: Mapping[int, str]
    checks: tuple[Check, ...] = field(default_factory=tuple)
    # The certified inputs' links, each with its verified parent's tree or unverified.
    lineage: tuple[LineageLink, ...] = ()
    # The results file's metrics (name -> value), bound by the replayed log.
    metrics: Mapping[str, float] = field(default_factory=dict)
    # The id of the reference-value set that judged the boot chain (None: none was judged).
    reference_values: str | None = None
    # The GPUs passed to the job as the agent's nvidia-smi reported them: measured, bound by
    # the quote, but not attested hardware (aicert.gpus.GPU_FACTS_NOTE). None: no GPUs.
    gpus: GpuEvent | None = None

    def to_dict(self) -> dict[str, object]:
        """The report as JSON-ready data (``aicert verify --json``)."""
        return {
            "verified": True,
            "run_id": self.run_id,
            "project": self.project,
            "platform": self.platform,
            "boot_chain_attested": self.boot_chain_attested,
            "platform_note": self.platform_note,
            "ak_root_subject": self.ak_root_subject,
            "ak_root_fingerprint_sha256": self.ak_root_fingerprint_sha256,
            "ak_chain_expires_at": self.ak_chain_expires_at.isoformat(),
            "verified_at_time": self.verified_at_time.isoformat(),
            "nonce": self.nonce,
            "runtime_version": self.runtime_version,
            "exit_code": self.exit_code,
            "duration_ms": self.duration_ms,
            "finished_at": self.finished_at.isoformat(),
            "inputs": [i.model_dump(mode="json", exclude_none=True) for i in self.inputs],
            "outputs": [o.model_dump(mode="json") for o in self.outputs],
            "pcrs": {str(k): v for k, v in sorted(self.pcrs.items())},
            "checks": [{"name": c.name, "detail": c.detail} for c in self.checks],
            **({"lineage": [link.to_dict() for link in self.lineage]} if self.lineage else {}),
            **({"metrics": dict(self.metrics)} if self.metrics else {}),
            **({"reference_values": self.reference_values} if self.reference_values else {}),
            **({"gpus": self.gpus.to_report()} if self.gpus is not None else {}),
        }
