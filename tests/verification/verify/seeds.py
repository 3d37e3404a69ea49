"""The stored seed certificates of ``tests/data/certificates/<platform>/`` and what verifies them.

Each platform's folder holds a real certificate (``proof.json``), the trust root its AK chain
ends at, the reference-value set that judges its boot chain (qemu, azure), and ``seed.json``:
the verification options (the trusted roots, the reference values, ``at_time``, whether the
dev platform is allowed) and the SHA-256 of each model output the run certified. They are
made by ``tests/data/certificates/make_seeds.py`` (see ``tests/data/README.md``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Literal, cast

from aicert.model import Certificate
from aicert.reference_values import PlatformReferenceValues, load_reference_values
from aicert.verify import VerificationReport
from tests.data import DATA

CERTIFICATES = DATA / "certificates"
PLATFORMS: tuple[Literal["local", "qemu", "azure"], ...] = ("local", "qemu", "azure")
SEED_FILE = "seed.json"
CERTIFICATE_FILE = "proof.json"


@dataclass(frozen=True)
class Seed:
    """One stored certificate and the options that verify it."""

    platform: Literal["local", "qemu", "azure"]
    folder: Path
    raw: bytes  # proof.json as stored
    trusted_root_pems: tuple[str, ...]
    reference_values_path: Path | None
    allow_dev_platform: bool
    at_time: datetime
    outputs: dict[str, str]  # output path -> SHA-256, as the run produced them
    made_by: str

    @cached_property
    def certificate(self) -> Certificate:
        return Certificate.from_json_bytes(self.raw, source=str(self.folder / CERTIFICATE_FILE))

    @cached_property
    def reference_values(self) -> PlatformReferenceValues | None:
        if self.reference_values_path is None:
            return None
        return load_reference_values(self.reference_values_path)

    def verify(self, certificate: Certificate | None = None) -> VerificationReport:
        """Verify ``certificate`` (default: the seed's own) with the seed's options."""
        report: VerificationReport = (certificate or self.certificate).verify(
            trusted_roots=list(self.trusted_root_pems),
            reference_values=self.reference_values,
            allow_dev_platform=self.allow_dev_platform,
            at_time=self.at_time,
        )
        return report


def load_seed(platform: Literal["local", "qemu", "azure"]) -> Seed:
    """The seed of ``platform`` as stored in the repository."""
    folder = CERTIFICATES / platform
    manifest = json.loads((folder / SEED_FILE).read_text())
    reference = manifest.get("reference_values")
    return Seed(
        platform=platform,
        folder=folder,
        raw=(folder / CERTIFICATE_FILE).read_bytes(),
        trusted_root_pems=tuple((folder / name).read_text() for name in manifest["trusted_roots"]),
        reference_values_path=folder / reference if reference else None,
        allow_dev_platform=bool(manifest["allow_dev_platform"]),
        at_time=datetime.fromisoformat(manifest["at_time"]),
        outputs=cast(dict[str, str], manifest["outputs"]),
        made_by=str(manifest["made_by"]),
    )


def load_seeds() -> list[Seed]:
    return [load_seed(platform) for platform in PLATFORMS]
