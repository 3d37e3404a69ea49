"""The GCE VM's side in tests: a swtpm dressed as a Compute Engine vTPM.

``dress_as_gce_vtpm`` does what GCE's host does before a Shielded VM boots: it writes the AK
template (a TPMT_PUBLIC of a restricted RSA-2048 RSASSA-SHA256 signing key, go-tpm-tools'
``AKTemplateRSA`` shape) into NV 0x01c10001, derives the key the endorsement hierarchy makes
from it (CreatePrimary, straight through tpm2-pytss' ESAPI, not the agent's code), and writes
that key's certificate, of Google's shape (``tests/verification/gcp_like.py``), into NV
0x01c10000, zero padded.
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding
from tpm2_pytss import ESAPI
from tpm2_pytss.constants import ESYS_TR
from tpm2_pytss.types import TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE

from aicert.guest_runtime.gce_ak import GCE_AK_NV_INDICES
from aicert.guest_runtime.tpm_types import AkAlgorithm, ak_template
from aicert.tpm_structures import parse_tpmt_public
from tests.tasks.platforms.azure.guest import tpm2

NV_CERT_SIZE = 2048  # GCE's certificate indices are larger than the DER, which is zero padded


def define_and_write(tcti: str, workdir: Path, index: int, content: bytes, size: int) -> None:
    """(Re)define NV ``index`` with ``size`` bytes and write ``content``, zero padded."""
    listed = tpm2(tcti, "tpm2_getcap", "handles-nv-index", cwd=workdir)
    if f"0x{index:x}" in listed.lower():
        tpm2(tcti, "tpm2_nvundefine", f"0x{index:08x}", "-C", "o", cwd=workdir)
    attributes = "ownerread|ownerwrite|authread|authwrite|no_da"
    tpm2(
        tcti,
        "tpm2_nvdefine",
        f"0x{index:08x}",
        "-C",
        "o",
        "-s",
        str(size),
        "-a",
        attributes,
        cwd=workdir,
    )
    path = workdir / f"nv-{index:08x}.bin"
    path.write_bytes(content + bytes(size - len(content)))
    tpm2(tcti, "tpm2_nvwrite", f"0x{index:08x}", "-C", "o", "-i", str(path), cwd=workdir)


def gce_ak_template() -> bytes:
    """The RSA AK template GCE provisions, marshalled as NV 0x01c10001 holds it."""
    return bytes(ak_template(AkAlgorithm.RSA2048_RSASSA_SHA256).marshal())


def endorsement_primary_public_key(tcti: str, template: bytes) -> PublicKeyTypes:
    """The key CreatePrimary(endorsement, ``template``) gives on this TPM."""
    from tpm2_pytss.types import TPMT_PUBLIC

    area, _ = TPMT_PUBLIC.unmarshal(template)
    esapi = ESAPI(tcti)
    try:
        handle, public, _, _, _ = esapi.create_primary(
            TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(publicArea=area), ESYS_TR.ENDORSEMENT
        )
        esapi.flush_context(handle)
    finally:
        esapi.close()
    return parse_tpmt_public(bytes(public.publicArea.marshal())).to_cryptography_key()


def dress_as_gce_vtpm(
    tcti: str,
    workdir: Path,
    certificate: x509.Certificate | None = None,
    *,
    template: bytes | None = None,
) -> bytes:
    """Write the AK template and ``certificate`` (DER) into GCE's RSA indices; the template.

    Without ``certificate`` only the template is written (a test then issues one for
    :func:`endorsement_primary_public_key` and calls again)."""
    workdir.mkdir(parents=True, exist_ok=True)
    certificate_index, template_index = GCE_AK_NV_INDICES["rsa"]
    template = template if template is not None else gce_ak_template()
    define_and_write(tcti, workdir, template_index, template, len(template))
    if certificate is not None:
        der = certificate.public_bytes(Encoding.DER)
        define_and_write(tcti, workdir, certificate_index, der, NV_CERT_SIZE)
    return template
