"""A certificate that verified, with what the exports need of it.

Every export starts from a :class:`VerifiedCertificate`: the certificate, the report its
verification returned (checked to be this certificate's), the run its replayed event log
proves, and the file it was read from (name and SHA-256, by which an export refers to it). An
unverified certificate has no ``VerifiedCertificate``, so nothing can be exported from it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from aicert.appevents import MeasuredRun
from aicert.errors import MalformedCertificateError
from aicert.model import MAX_CERTIFICATE_BYTES, Certificate
from aicert.reference_values import PlatformReferenceValues
from aicert.slsa_provenance import verified_measurements
from aicert.verify import TrustRoot, VerificationReport


@dataclass(frozen=True)
class VerifiedCertificate:
    """A verified certificate and its report, run and file.

    Attributes:
        certificate: the certificate.
        report: what its verification returned.
        measured: the run its replayed application event log proves.
        file_name: the name an export gives the certificate (its file's name).
        file_sha256: SHA-256 of the certificate's bytes as read (hex).
    """

    certificate: Certificate
    report: VerificationReport
    measured: MeasuredRun
    file_name: str
    file_sha256: str

    @classmethod
    def of(
        cls,
        certificate: Certificate,
        report: VerificationReport,
        *,
        raw: bytes | None = None,
        file_name: str = "proof.json",
    ) -> VerifiedCertificate:
        """Pair a certificate with the report of its verification.

        Args:
            certificate: the certificate.
            report: what ``certificate.verify(...)`` returned.
            raw: the certificate's bytes as stored (default: its canonical serialization,
                ``Certificate.to_json_bytes``), whose SHA-256 exports name it by.
            file_name: the name exports give it.

        Raises:
            ValueError: ``report`` is not this certificate's.
        """
        measured = verified_measurements(certificate, report)
        data = certificate.to_json_bytes() if raw is None else raw
        return cls(certificate, report, measured, file_name, hashlib.sha256(data).hexdigest())

    @classmethod
    def verify_file(
        cls,
        path: str | os.PathLike[str],
        *,
        trusted_roots: Iterable[TrustRoot] = (),
        reference_values: Iterable[PlatformReferenceValues] = (),
        allow_dev_platform: bool = False,
        at_time: datetime | None = None,
    ) -> VerifiedCertificate:
        """Read, parse and verify a certificate file (the options of ``Certificate.verify``).

        Args:
            path: the certificate file.
            trusted_roots: extra trust anchors (the local/qemu platform CA).
            reference_values: the reference-value sets that judge a qemu or Azure boot.
            allow_dev_platform: accept a local-platform certificate (no boot attested).
            at_time: when to judge the AK chain (default: the run's end).

        Raises:
            MalformedCertificateError: the file cannot be read or is not a certificate.
            VerificationError: the certificate does not verify (the subclass names the check).
        """
        file_path = Path(path)
        # Read once: the bytes that are verified are the bytes whose hash the export names.
        raw = _read_certificate(file_path)
        certificate = Certificate.from_json_bytes(raw, source=str(file_path))
        report = certificate.verify(
            trusted_roots=trusted_roots,
            reference_values=list(reference_values),
            allow_dev_platform=allow_dev_platform,
            at_time=at_time,
        )
        return cls.of(certificate, report, raw=raw, file_name=file_path.name)


def _read_certificate(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            return handle.read(MAX_CERTIFICATE_BYTES + 1)  # from_json_bytes refuses more
    except OSError as exc:
        raise MalformedCertificateError(f"{path}: cannot read: {exc.strerror}") from None
