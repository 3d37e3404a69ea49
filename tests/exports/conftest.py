"""Fixtures of the export tests: the stored real certificates, verified, and one made on a
swtpm that measures every input kind (the stored ones measure no resource or wheel)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from aicert.exports.verified import VerifiedCertificate
from tests.verification.verify.seeds import PLATFORMS, Seed, load_seed


@pytest.fixture(scope="session", params=PLATFORMS)
def seed(request: pytest.FixtureRequest) -> Seed:
    """Each platform's stored certificate (tests/data/certificates/<platform>/)."""
    return load_seed(request.param)


@pytest.fixture(scope="session")
def verified_seed(seed: Seed) -> VerifiedCertificate:
    return VerifiedCertificate.of(seed.certificate, seed.verify(), raw=seed.raw)


@pytest.fixture(scope="session")
def every_input_kind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VerifiedCertificate]:
    """A real certificate (swtpm quote, platform-CA-certified AK) of a run that measured a
    config, a base image, a git source, a resource, a wheel and a training image."""
    from tests.verification.verify.factory import CertificateFactory, TpmRig

    workdir: Path = tmp_path_factory.mktemp("exports-certificate")
    rig = TpmRig.create(workdir / "tpm", workdir / "ek-ca", workdir / "platform-ca")
    try:
        made = CertificateFactory(rig).make_certificate()
        yield VerifiedCertificate.of(made.certificate, made.verify(), raw=made.json_bytes())
    finally:
        rig.close()
