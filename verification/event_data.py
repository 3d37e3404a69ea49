"""The base of every measured event's payload, and the value types payloads share.

Kept apart from ``aicert.appevents`` (which re-exports every name here) so that an event
type defined in its own module (``aicert.gpus``) can subclass ``EventData`` while
``appevents`` imports it into its vocabulary, without an import cycle.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict, StringConstraints

from aicert.model import AppEvent, check_time

INPUTS_PCR = 14
OUTPUTS_PCR = 15

Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Sha1Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{40}$")]
RelativePath = Annotated[str, StringConstraints(min_length=1, max_length=4096)]


def _aware_iso_timestamp(value: str) -> str:
    # Kept as the measured string (its bytes are what was extended); checked here so that a
    # verifier comparing it with the certificate's run times never meets an unparsable or
    # naive timestamp (fromisoformat's ValueError would escape as a crash).
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError("not an ISO 8601 timestamp") from None
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise ValueError("the timestamp has no timezone")
    check_time(parsed, "the timestamp")  # in range: comparing it cannot overflow
    return value


IsoTimestamp = Annotated[str, AfterValidator(_aware_iso_timestamp)]


class EventData(BaseModel):
    """Base of the typed event payloads."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    TYPE: ClassVar[str]
    PCR: ClassVar[int]

    def to_event(self) -> AppEvent:
        return AppEvent(pcr=self.PCR, type=self.TYPE, data=self.model_dump(mode="json"))
