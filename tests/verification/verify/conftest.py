"""Session fixtures: one real swtpm with a certified AK, and the certificates made with it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from aicert.tasks.platforms.platform_ca import PlatformCA

from .factory import CertificateFactory, MadeCertificate, TpmRig


@pytest.fixture(scope="session")
def cert_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("verification-cert")


@pytest.fixture(scope="session")
def rig(cert_workdir: Path) -> Iterator[TpmRig]:
    rig = TpmRig.create(
        cert_workdir / "tpm-a", cert_workdir / "ek-ca", cert_workdir / "platform-ca"
    )
    try:
        yield rig
    finally:
        rig.close()


@pytest.fixture(scope="session")
def other_rig(cert_workdir: Path, rig: TpmRig) -> Iterator[TpmRig]:
    """A second TPM (own EK and AK), enrolled with the same platform CA."""
    other = TpmRig.create(
        cert_workdir / "tpm-b", cert_workdir / "ek-ca", cert_workdir / "platform-ca"
    )
    try:
        yield other
    finally:
        other.close()


@pytest.fixture(scope="session")
def other_ca(cert_workdir: Path) -> PlatformCA:
    return PlatformCA.load_or_create(cert_workdir / "other-platform-ca")


@pytest.fixture(scope="session")
def factory(rig: TpmRig) -> CertificateFactory:
    return CertificateFactory(rig)


@pytest.fixture(scope="session")
def base(factory: CertificateFactory) -> MadeCertificate:
    """The valid certificate most tampers start from."""
    return factory.make_certificate()
