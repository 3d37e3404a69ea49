"""AK enrollment with the project's platform CA, for platforms whose TPM is a swtpm that
the project manufactured (local, qemu): the cloud's role, played by the project."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from aicert.tasks.platforms.agent_client import AgentClient
from aicert.tasks.platforms.base import EnrolledKey, Machine


class EnrollmentError(RuntimeError):
    """The machine's TPM cannot be enrolled (no EK certificate)."""


def enroll_with_platform_ca(
    ek_ca_dir: Path, platform_ca_dir: Path, machine: Machine, client: AgentClient
) -> EnrolledKey:
    """Certify the machine's AK with the project's platform CA: the EK certificate must come
    from the project's EK CA, and credential activation proves the AK lives in that TPM."""
    from aicert.tasks.platforms.platform_ca import PlatformCA
    from aicert.tasks.platforms.swtpm import LOCALCA_ISSUER_CERT

    ca = PlatformCA.load_or_create(platform_ca_dir)
    material = client.key_material()
    if material.ek_certificate is None:
        raise EnrollmentError("the TPM has no EK certificate: it cannot be enrolled")
    verified_ek = ca.verify_ek_certificate(material.ek_certificate, ek_ca_dir / LOCALCA_ISSUER_CERT)
    challenge = ca.begin_activation(verified_ek, material.ek_public, material.ak_public)
    secret = client.activate_credential(challenge.credential_blob, challenge.encrypted_secret)
    ak_certificate = ca.complete_activation(challenge, secret)
    ek_pem = (
        x509.load_der_x509_certificate(material.ek_certificate)
        .public_bytes(Encoding.PEM)
        .decode("ascii")
    )
    return EnrolledKey(
        ak_certificate_chain=[ak_certificate, ca.certificate_pem],
        ek_certificate_pem=ek_pem,
        trusted_root_pem=ca.certificate_pem,
    )
