"""Azure's pre-provisioned attestation key, read on the VM.

An Azure Trusted Launch or Confidential VM's vTPM holds an attestation key at the persistent
handle ``0x81000003`` and its X.509 certificate, issued by Microsoft's vTPM CA, in NV index
``0x01C101D0`` (DER followed by zero padding to the index's size). The certificate's
intermediates are not in the TPM: the guest image ships them (with Microsoft's root, whose
fingerprint the verifier pins) in a PEM file, ``/etc/aicert/azure-intermediates.pem`` by
default. This module reads all three and checks, before anything is handed out, that the
certificate certifies the key at the handle: a VM whose NV holds someone else's certificate
fails here rather than at the end user's verifier.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from aicert.guest_runtime.tpm import (
    AttestationKey,
    NvIndexNotDefinedError,
    Tpm,
    TpmError,
    TpmObject,
    der_prefix,
)

AZURE_AK_HANDLE = 0x81000003
AZURE_AK_CERT_NV_INDEX = 0x01C101D0
DEFAULT_INTERMEDIATES_PATH = Path("/etc/aicert/azure-intermediates.pem")
MAX_INTERMEDIATES_FILE_BYTES = 256 * 1024


class AzureAttestationKeyError(RuntimeError):
    """The VM's Azure AK, its certificate or the image's intermediates are missing or wrong."""


@dataclass(frozen=True)
class AzureAttestationKey:
    """The persistent AK and what certifies it; ``chain_pem`` is leaf first."""

    ak: AttestationKey
    ek: TpmObject
    ek_certificate: bytes | None  # DER, padding removed; None when the vTPM has none
    certificate_der: bytes
    chain_pem: list[str]

    def key_material(self) -> dict[str, bytes | list[str] | None]:
        """The agent's key material (``api_models.KeyMaterial`` fields), with the chain."""
        return {
            "ek_certificate": self.ek_certificate,
            "ek_public": self.ek.public_bytes,
            "ak_public": self.ak.public_bytes,
            "ak_name": self.ak.name,
            "ak_certificate_chain": list(self.chain_pem),
        }


def read_ak_certificate(tpm: Tpm, nv_index: int = AZURE_AK_CERT_NV_INDEX) -> bytes:
    """The AK certificate's DER bytes from NV, zero padding removed (non-zero bytes after
    the DER element are refused by ``der_prefix``)."""
    try:
        raw = tpm.read_nv(nv_index)
    except NvIndexNotDefinedError as exc:
        raise AzureAttestationKeyError(
            f"NV index 0x{nv_index:08x} is not defined: this TPM holds no Azure AK certificate "
            "(is this an Azure Trusted Launch / Confidential VM with vTPM enabled?)"
        ) from exc
    return der_prefix(raw)


def load_intermediates(path: Path) -> list[str]:
    """The PEM certificates of ``path``, one string each; at least one is required."""
    try:
        if path.stat().st_size > MAX_INTERMEDIATES_FILE_BYTES:
            raise AzureAttestationKeyError(f"{path}: larger than {MAX_INTERMEDIATES_FILE_BYTES} B")
        data = path.read_bytes()
    except OSError as exc:
        raise AzureAttestationKeyError(
            f"the image's AK intermediates cannot be read from {path}: {exc}"
        ) from exc
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise AzureAttestationKeyError(f"{path}: not PEM certificates: {exc}") from exc
    return [cert.public_bytes(Encoding.PEM).decode("ascii") for cert in certificates]


def read_azure_attestation_key(
    tpm: Tpm,
    intermediates_path: Path = DEFAULT_INTERMEDIATES_PATH,
    *,
    ak_handle: int = AZURE_AK_HANDLE,
    certificate_nv_index: int = AZURE_AK_CERT_NV_INDEX,
) -> AzureAttestationKey:
    """Read the AK at ``ak_handle`` and its certificate chain; fail unless the certificate's
    key is the AK's. The EK (created from the TCG template, as the agent does elsewhere) is
    loaded too: the agent's key material always names it."""
    from aicert.chain import leaf_public_key_matches
    from aicert.errors import VerificationError
    from aicert.quote import public_key_from_ak

    try:
        ak = tpm.persistent_ak(ak_handle)
    except TpmError as exc:
        raise AzureAttestationKeyError(
            f"no usable attestation key at 0x{ak_handle:08x}: {exc}"
        ) from exc
    certificate_der = read_ak_certificate(tpm, certificate_nv_index)
    try:
        leaf = x509.load_der_x509_certificate(certificate_der)
    except ValueError as exc:
        raise AzureAttestationKeyError(
            f"NV 0x{certificate_nv_index:08x} does not hold an X.509 certificate: {exc}"
        ) from exc
    try:
        ak_key, _ = public_key_from_ak(ak.public_bytes)
    except VerificationError as exc:
        raise AzureAttestationKeyError(f"the AK's public area is not usable: {exc}") from exc
    if not leaf_public_key_matches(leaf, ak_key):
        raise AzureAttestationKeyError(
            f"the certificate in NV 0x{certificate_nv_index:08x} does not certify the key at "
            f"0x{ak_handle:08x}"
        )
    intermediates = load_intermediates(intermediates_path)
    ek = tpm.create_ek()
    return AzureAttestationKey(
        ak=ak,
        ek=ek,
        ek_certificate=tpm.ek_certificate(),
        certificate_der=certificate_der,
        chain_pem=[leaf.public_bytes(Encoding.PEM).decode("ascii"), *intermediates],
    )
