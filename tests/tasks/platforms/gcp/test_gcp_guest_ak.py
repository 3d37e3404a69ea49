"""The guest side of GCE attestation, on a real swtpm dressed as a Compute Engine vTPM.

The AK template goes into NV 0x01c10001 and a Google-shaped certificate for the key it gives
into NV 0x01c10000, as GCE's host provisions them; ``aicert.guest_runtime.gce_ak`` recreates
the key through tpm2-pytss, checks the certificate certifies it, and the key quotes. The quote
and chain then pass ``aicert.verify_platform_attestation`` with the generated root trusted on
purpose, and are refused under Google's pinned roots alone.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from aicert import CertificateChainError, verify_platform_attestation
from aicert.guest_runtime.gce_ak import GceAttestationKeyError, read_gce_attestation_key
from aicert.guest_runtime.tpm import Tpm
from aicert.guest_runtime.tpm_types import AkAlgorithm, ak_template
from aicert.tasks.platforms.swtpm import LocalSwtpm
from tests.tasks.platforms.gcp.guest import (
    dress_as_gce_vtpm,
    endorsement_primary_public_key,
    gce_ak_template,
)
from tests.verification.azure_like import rsa_key
from tests.verification.gcp_like import GoogleLikeCa

pytestmark = pytest.mark.swtpm
ISSUED = datetime(2024, 5, 7, tzinfo=UTC)


@dataclass(frozen=True)
class GceVtpm:
    swtpm: LocalSwtpm
    workdir: Path
    ca: GoogleLikeCa
    ak_public_key: PublicKeyTypes

    def dress(self, key: PublicKeyTypes | None = None, template: bytes | None = None) -> None:
        certificate = self.ca.ak_certificate(key or self.ak_public_key, not_before=ISSUED)
        dress_as_gce_vtpm(self.swtpm.tcti, self.workdir, certificate, template=template)


@pytest.fixture(scope="module")
def vtpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GceVtpm]:
    workdir = tmp_path_factory.mktemp("gce-vtpm")
    swtpm = LocalSwtpm.create(workdir / "state", workdir / "ek-ca")
    swtpm.start()
    try:
        key = endorsement_primary_public_key(swtpm.tcti, gce_ak_template())
        yield GceVtpm(swtpm, workdir / "tools", GoogleLikeCa.create(ISSUED), key)
    finally:
        swtpm.stop()


def test_gce_ak_is_recreated_from_its_template_and_quotes(vtpm: GceVtpm) -> None:
    vtpm.dress()
    with Tpm(vtpm.swtpm.tcti) as tpm:
        gce = read_gce_attestation_key(tpm)
        nonce = secrets.token_bytes(32)
        quote = tpm.quote(gce.ak, tuple(range(16)), nonce)
    assert gce.ak.endorsement_template == gce_ak_template()
    result = verify_platform_attestation(
        [*gce.chain_pem, vtpm.ca.intermediate.pem],
        quote.attest,
        quote.signature,
        nonce,
        quote.pcrs,
        ak_public=gce.ak.public_bytes,
        trusted_roots=[vtpm.ca.root.pem],
        at_time=datetime(2026, 6, 1, tzinfo=UTC),
    )
    assert result.chain.leaf.public_key().public_numbers() == (  # type: ignore[union-attr]
        vtpm.ak_public_key.public_numbers()  # type: ignore[union-attr]
    )
    # Google's roots are pinned, the generated one is not: alone, the pin refuses it.
    with pytest.raises(CertificateChainError, match="no trust anchor"):
        verify_platform_attestation(
            [*gce.chain_pem, vtpm.ca.intermediate.pem],
            quote.attest,
            quote.signature,
            nonce,
            quote.pcrs,
            at_time=datetime(2026, 6, 1, tzinfo=UTC),
        )


def test_gce_ak_reloads_in_a_later_session(vtpm: GceVtpm) -> None:
    vtpm.dress()
    with Tpm(vtpm.swtpm.tcti) as tpm:
        first = read_gce_attestation_key(tpm)
    with Tpm(vtpm.swtpm.tcti) as tpm:
        # The template alone brings the same key back: nothing to persist between sessions.
        quote = tpm.quote(first.ak, (14,), b"n" * 16)
    assert quote.attest


def test_certificate_for_another_key_is_refused(vtpm: GceVtpm) -> None:
    vtpm.dress(key=rsa_key().public_key())
    with Tpm(vtpm.swtpm.tcti) as tpm, pytest.raises(GceAttestationKeyError, match="does not"):
        read_gce_attestation_key(tpm)


def test_template_of_a_decrypting_key_is_refused(vtpm: GceVtpm) -> None:
    from tpm2_pytss.constants import TPMA_OBJECT

    area = ak_template(AkAlgorithm.RSA2048_RSASSA_SHA256)
    area.objectAttributes = (
        TPMA_OBJECT.FIXEDTPM
        | TPMA_OBJECT.FIXEDPARENT
        | (TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.DECRYPT)
    )
    vtpm.dress(template=bytes(area.marshal()))
    with Tpm(vtpm.swtpm.tcti) as tpm, pytest.raises(GceAttestationKeyError, match="template"):
        read_gce_attestation_key(tpm)


def test_vtpm_without_gce_indices_is_refused(tmp_path: Path) -> None:
    swtpm = LocalSwtpm.create(tmp_path / "state", tmp_path / "ek-ca")
    swtpm.start()
    try:
        with Tpm(swtpm.tcti) as tpm, pytest.raises(GceAttestationKeyError, match="0x01c10001"):
            read_gce_attestation_key(tpm)
    finally:
        swtpm.stop()


def test_agent_on_gcp_hands_out_the_gce_ak_and_refuses_activation(
    vtpm: GceVtpm, tmp_path: Path
) -> None:
    from aicert.guest_runtime.agent import CertificationAgent
    from aicert.guest_runtime.errors import StepOrderError

    vtpm.dress()
    with Tpm(vtpm.swtpm.tcti) as tpm:
        agent = CertificationAgent(tpm=tpm, platform="gcp", work_root=tmp_path)
        material = agent.key_material()
        assert material["ak_public"] == read_gce_attestation_key(tpm).ak.public_bytes
        chain = material["ak_certificate_chain"]
        assert isinstance(chain, list) and len(chain) == 1  # the leaf: GCE's NV holds no more
        with pytest.raises(StepOrderError, match="certified by Google"):
            agent.activate_credential(b"blob", b"secret")
