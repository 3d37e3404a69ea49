"""Google Compute Engine's pre-provisioned attestation key, read on the VM.

A Shielded VM's vTPM holds the AK as a template, not a key: NV ``0x01c10001`` (RSA) or
``0x01c10003`` (ECC) holds a TPMT_PUBLIC, and the key is the primary the endorsement
hierarchy derives from it (the same seed and template always give the same key). Its X.509
certificate, issued by Google's vTPM CA, is in NV ``0x01c10000`` (RSA) or ``0x01c10002``
(ECC), DER followed by zero padding. GCE puts no intermediate in the TPM, and the guest needs
none: the verifier ships Google's intermediates and pins its roots (``aicert.chain``). This
module recreates the key and checks, before anything is handed out, that the certificate
certifies it: a VM whose NV holds someone else's certificate fails here rather than at the
end user's verifier.
"""

from __future__ import annotations

from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from aicert.guest_runtime.azure_ak import AzureAttestationKey
from aicert.guest_runtime.tpm import (
    NvIndexNotDefinedError,
    Tpm,
    TpmError,
    der_prefix,
)

GceKeyType = Literal["rsa", "ecc"]
# (certificate NV index, template NV index) per key type, as GCE provisions them.
GCE_AK_NV_INDICES: dict[GceKeyType, tuple[int, int]] = {
    "rsa": (0x01C10000, 0x01C10001),
    "ecc": (0x01C10002, 0x01C10003),
}


class GceAttestationKeyError(RuntimeError):
    """The VM's GCE AK template or certificate is missing, or they do not match."""


# The same facts as Azure's: the AK, the EK, the certificate and the chain (here the leaf
# alone: the verifier ships Google's intermediates).
GceAttestationKey = AzureAttestationKey


def _read(tpm: Tpm, index: int, what: str) -> bytes:
    try:
        return tpm.read_nv(index)
    except NvIndexNotDefinedError as exc:
        raise GceAttestationKeyError(
            f"NV index 0x{index:08x} ({what}) is not defined: this TPM holds no GCE AK (is "
            "this a Compute Engine Shielded VM with vTPM enabled?)"
        ) from exc


def read_gce_attestation_key(tpm: Tpm, key_type: GceKeyType = "rsa") -> GceAttestationKey:
    """Recreate the GCE AK from its NV template and read its certificate; fail unless the
    certificate's key is the AK's.

    Args:
        tpm: the VM's TPM.
        key_type: ``"rsa"`` (NV 0x01c10000/1, every Shielded VM) or ``"ecc"``.

    Returns:
        The loaded AK, the EK (the agent's key material always names it) and the certificate.

    Raises:
        GceAttestationKeyError: an index is missing, the template gives no restricted signing
            key, the certificate is malformed or certifies another key.
    """
    from aicert.chain import leaf_public_key_matches
    from aicert.errors import VerificationError
    from aicert.quote import public_key_from_ak

    certificate_index, template_index = GCE_AK_NV_INDICES[key_type]
    template = _read(tpm, template_index, f"{key_type.upper()} AK template")
    try:
        ak = tpm.endorsement_primary_ak(template)
    except TpmError as exc:
        raise GceAttestationKeyError(
            f"the AK template in NV 0x{template_index:08x} gives no usable AK: {exc}"
        ) from exc
    try:
        certificate_der = der_prefix(_read(tpm, certificate_index, "AK certificate"))
        leaf = x509.load_der_x509_certificate(certificate_der)
    except (TpmError, ValueError) as exc:
        raise GceAttestationKeyError(
            f"NV 0x{certificate_index:08x} does not hold an X.509 certificate: {exc}"
        ) from exc
    try:
        ak_key, _ = public_key_from_ak(ak.public_bytes)
    except VerificationError as exc:
        raise GceAttestationKeyError(f"the AK's public area is not usable: {exc}") from exc
    if not leaf_public_key_matches(leaf, ak_key):
        raise GceAttestationKeyError(
            f"the certificate in NV 0x{certificate_index:08x} does not certify the key the "
            f"template in NV 0x{template_index:08x} gives"
        )
    return GceAttestationKey(
        ak=ak,
        ek=tpm.create_ek(),
        ek_certificate=tpm.ek_certificate(),
        certificate_der=certificate_der,
        chain_pem=[leaf.public_bytes(Encoding.PEM).decode("ascii")],
    )
