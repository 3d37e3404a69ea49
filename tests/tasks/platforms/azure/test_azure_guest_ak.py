"""The guest side of Azure attestation, on a real swtpm dressed as an Azure vTPM.

tpm2-tools persists an AK at 0x81000003 and writes an Azure-shaped AK certificate (DER, zero
padded) into NV 0x01C101D0, as Azure's host does; ``aicert.guest_runtime.azure_ak`` reads
them back through tpm2-pytss. The chain is generated (leaf, an intermediate shaped like
"Global Virtual TPM CA - 03", a root shaped like Microsoft's): it verifies when its root is
trusted on purpose, and is refused with only the pinned Microsoft fingerprint.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding

import aicert
from aicert.chain import (
    PINNED_ROOT_FINGERPRINTS,
    fingerprint_sha256,
    leaf_public_key_matches,
    verify_ak_chain,
)
from aicert.errors import AkMismatchError, CertificateChainError
from aicert.guest_runtime.api_models import KeyMaterial
from aicert.guest_runtime.azure_ak import (
    AZURE_AK_HANDLE,
    DEFAULT_INTERMEDIATES_PATH,
    AzureAttestationKeyError,
    read_azure_attestation_key,
)
from aicert.guest_runtime.tpm import Tpm, TpmError
from aicert.quote import public_key_from_ak
from aicert.tasks.platforms.azure import check_azure_ak_chain
from aicert.tasks.platforms.swtpm import LocalSwtpm
from tests import REPO_ROOT
from tests.data import TRUST_ROOTS
from tests.tasks.platforms.azure.guest import (
    NV_CERT_SIZE,
    AzureLikeChain,
    azure_like_chain,
    install_azure_ak,
    install_nv_certificate,
    undefine_nv_certificate,
)
from tests.verification.azure_like import ak_leaf, rsa_key

pytestmark = pytest.mark.swtpm


@dataclass(frozen=True)
class AzureVtpm:
    tcti: str
    workdir: Path
    ak_public_key: PublicKeyTypes  # as tpm2_readpublic gave it
    chain: AzureLikeChain
    intermediates_path: Path


@pytest.fixture(scope="module")
def vtpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzureVtpm]:
    workdir = tmp_path_factory.mktemp("azure-vtpm")
    tpm = LocalSwtpm.create(workdir / "state", workdir / "ek-ca")
    tpm.start()
    try:
        ak_public_key = install_azure_ak(tpm.tcti, workdir / "tools")
        chain = azure_like_chain(ak_public_key)
        intermediates = workdir / "azure-intermediates.pem"
        intermediates.write_text(chain.image_pem_bundle)
        yield AzureVtpm(tpm.tcti, workdir / "tools", ak_public_key, chain, intermediates)
    finally:
        tpm.stop()


def test_reads_the_persistent_ak_and_its_padded_certificate(vtpm: AzureVtpm) -> None:
    install_nv_certificate(vtpm.tcti, vtpm.workdir, vtpm.chain.leaf_der)
    with Tpm(vtpm.tcti) as tpm:
        assert len(tpm.read_nv(0x01C101D0)) == NV_CERT_SIZE  # padded in NV
        azure = read_azure_attestation_key(tpm, vtpm.intermediates_path)
        nonce = secrets.token_bytes(32)
        quote = tpm.quote(azure.ak, range(16), nonce)

    assert azure.ak.persistent_handle == AZURE_AK_HANDLE
    assert azure.certificate_der == vtpm.chain.leaf_der  # padding trimmed by the DER length
    assert azure.chain_pem == [
        vtpm.chain.leaf_pem,
        vtpm.chain.intermediate.pem,
        vtpm.chain.root.pem,
    ]
    leaf = x509.load_pem_x509_certificate(azure.chain_pem[0].encode())
    # The leaf certifies the key tpm2-tools read at the handle, and the key the reader gave.
    assert leaf_public_key_matches(leaf, vtpm.ak_public_key)
    assert leaf_public_key_matches(leaf, public_key_from_ak(azure.ak.public_bytes)[0])
    # The agent's key material shape, chain included.
    material = KeyMaterial.model_validate(azure.key_material())
    assert material.ak_public == azure.ak.public_bytes
    assert material.ak_certificate_chain == azure.chain_pem
    assert material.ek_certificate is not None  # swtpm_setup's EK certificate

    aicert.verify_quote(quote.attest, quote.signature, azure.ak.public_bytes, nonce, quote.pcrs)


def test_chain_verifies_only_when_its_root_is_trusted(vtpm: AzureVtpm) -> None:
    install_nv_certificate(vtpm.tcti, vtpm.workdir, vtpm.chain.leaf_der)
    with Tpm(vtpm.tcti) as tpm:
        azure = read_azure_attestation_key(tpm, vtpm.intermediates_path)

    trusted = verify_ak_chain(
        azure.chain_pem, trusted_roots=[vtpm.chain.root.certificate], at_time=datetime.now(UTC)
    )
    assert [c.subject for c in trusted.chain] == [
        vtpm.chain.leaf.subject,
        vtpm.chain.intermediate.certificate.subject,
        vtpm.chain.root.certificate.subject,
    ]
    check_azure_ak_chain(
        azure.chain_pem, azure.ak.public_bytes, extra_trusted_roots=[vtpm.chain.root.pem]
    )

    # The root looks like Microsoft's but is not: the pinned fingerprint refuses it.
    with pytest.raises(CertificateChainError):
        verify_ak_chain(
            azure.chain_pem,
            pinned_root_fingerprints=PINNED_ROOT_FINGERPRINTS.values(),
            at_time=datetime.now(UTC),
        )
    with pytest.raises(CertificateChainError):
        check_azure_ak_chain(azure.chain_pem, azure.ak.public_bytes)


def test_provider_check_refuses_a_chain_for_another_ak(vtpm: AzureVtpm) -> None:
    other = ak_leaf(vtpm.chain.intermediate, not_before=datetime.now(UTC) - timedelta(days=1))
    forged_chain = [other.pem, vtpm.chain.intermediate.pem, vtpm.chain.root.pem]
    install_nv_certificate(vtpm.tcti, vtpm.workdir, vtpm.chain.leaf_der)
    with Tpm(vtpm.tcti) as tpm:
        ak_public = tpm.persistent_ak(AZURE_AK_HANDLE).public_bytes
    with pytest.raises(AkMismatchError):
        check_azure_ak_chain(forged_chain, ak_public, extra_trusted_roots=[vtpm.chain.root.pem])


def test_certificate_of_another_key_in_nv_is_refused(vtpm: AzureVtpm) -> None:
    other = ak_leaf(
        vtpm.chain.intermediate, not_before=datetime.now(UTC) - timedelta(days=1), ak_key=rsa_key()
    )
    install_nv_certificate(vtpm.tcti, vtpm.workdir, other.certificate.public_bytes(Encoding.DER))
    with Tpm(vtpm.tcti) as tpm, pytest.raises(AzureAttestationKeyError, match="does not certify"):
        read_azure_attestation_key(tpm, vtpm.intermediates_path)


def test_non_zero_bytes_after_the_certificate_are_refused(vtpm: AzureVtpm) -> None:
    install_nv_certificate(vtpm.tcti, vtpm.workdir, vtpm.chain.leaf_der + b"\x01")
    with Tpm(vtpm.tcti) as tpm, pytest.raises(TpmError, match="non-zero bytes"):
        read_azure_attestation_key(tpm, vtpm.intermediates_path)


def test_missing_certificate_index_is_refused(vtpm: AzureVtpm) -> None:
    undefine_nv_certificate(vtpm.tcti, vtpm.workdir)
    with Tpm(vtpm.tcti) as tpm, pytest.raises(AzureAttestationKeyError, match="not defined"):
        read_azure_attestation_key(tpm, vtpm.intermediates_path)


def test_missing_intermediates_file_is_refused(vtpm: AzureVtpm, tmp_path: Path) -> None:
    install_nv_certificate(vtpm.tcti, vtpm.workdir, vtpm.chain.leaf_der)
    with Tpm(vtpm.tcti) as tpm, pytest.raises(AzureAttestationKeyError, match="intermediates"):
        read_azure_attestation_key(tpm, tmp_path / "absent.pem")


def test_tpm_without_the_azure_ak_is_refused(vtpm: AzureVtpm) -> None:
    with Tpm(vtpm.tcti) as tpm, pytest.raises(AzureAttestationKeyError, match="0x81000004"):
        read_azure_attestation_key(tpm, vtpm.intermediates_path, ak_handle=0x81000004)


def test_image_recipe_ships_microsofts_ca_03_and_pinned_root() -> None:
    """The PEM bundle cloud-init writes to /etc/aicert/azure-intermediates.pem is the public
    CA-03 and root of tests/data/trust-roots, and the root is the one the verifier pins."""
    repo = REPO_ROOT
    recipe = yaml.safe_load((repo / "deployments" / "azure" / "cloud-init.yaml").read_text())
    (bundle,) = [
        f["content"] for f in recipe["write_files"] if f["path"] == str(DEFAULT_INTERMEDIATES_PATH)
    ]
    shipped = x509.load_pem_x509_certificates(bundle.encode())
    roots = TRUST_ROOTS
    expected = [
        x509.load_pem_x509_certificate((roots / name).read_bytes())
        for name in ("global-virtual-tpm-ca-03.pem", "azure-virtual-tpm-root-ca-2023.pem")
    ]
    assert shipped == expected
    assert fingerprint_sha256(shipped[1]) == PINNED_ROOT_FINGERPRINTS["azure"]
    shipped[0].verify_directly_issued_by(shipped[1])
