"""TPM data without a connection: keys, templates, quotes, PCR selections and errors.

What ``tpm.Tpm`` hands out and takes back (``AttestationKey``, ``Quote``, ``TpmObject``), the AK
template and attributes the platform CA checks, and the parsing of what TPM commands return
(PCR selections, a DER certificate in NV).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from tpm2_pytss.constants import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_ECC,
    TPM2_HT,
    TPMA_OBJECT,
)
from tpm2_pytss.types import (
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPML_PCR_SELECTION,
    TPMS_ECC_PARMS,
    TPMS_PCR_SELECTION,
    TPMS_RSA_PARMS,
    TPMT_ECC_SCHEME,
    TPMT_KDF_SCHEME,
    TPMT_PUBLIC,
    TPMT_RSA_SCHEME,
    TPMT_SYM_DEF_OBJECT,
    TPMU_PUBLIC_ID,
    TPMU_PUBLIC_PARMS,
)

EK_RSA_CERT_NV_INDEX = 0x01C00002
PCR_COUNT = 24
SHA256_SIZE = 32
MAX_NONCE_SIZE = 64  # TPM2B_DATA in TPM2_Quote holds at most a TPMT_HA digest
DEFAULT_NV_BUFFER_MAX = 512
TRANSIENT_HANDLE_FIRST = TPM2_HT.TRANSIENT << 24
HMAC_SESSION_FIRST = TPM2_HT.HMAC_SESSION << 24
POLICY_SESSION_FIRST = TPM2_HT.POLICY_SESSION << 24

# What makes a key an attestation key (userWithAuth aside, which only says how it is used).
AK_REQUIRED_ATTRIBUTES = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.SIGN_ENCRYPT
)
AK_ATTRIBUTES = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.SIGN_ENCRYPT
)


class TpmError(RuntimeError):
    """A TPM operation failed; ``operation`` names it, ``rc`` is the TSS2 code if any."""

    def __init__(self, operation: str, message: str, rc: int | None = None) -> None:
        self.operation = operation
        self.rc = rc
        super().__init__(f"TPM {operation}: {message}")


class TpmUnreachableError(TpmError):
    """The TPM does not answer (swtpm process gone, device missing, connection broken)."""


class NvIndexNotDefinedError(TpmError):
    """The NV index does not exist on this TPM."""


class AkAlgorithm(StrEnum):
    RSA2048_RSASSA_SHA256 = "rsa2048"
    ECC_P256_ECDSA_SHA256 = "ecc-p256"


@dataclass(frozen=True)
class TpmObject:
    """A transient object loaded in the TPM for the life of the owning ``Tpm``."""

    handle: ESYS_TR
    public: TPM2B_PUBLIC

    @property
    def public_bytes(self) -> bytes:
        """TPMT_PUBLIC, marshalled."""
        return bytes(self.public.publicArea.marshal())

    @property
    def name(self) -> bytes:
        return bytes(self.public.get_name())


@dataclass(frozen=True)
class AttestationKey:
    """An AK as plain data: either created under the EK (reload it with ``Tpm.load_ak``),
    persistent in the TPM (``Tpm.persistent_ak``, e.g. Azure's at 0x81000003), or a primary
    key of the endorsement hierarchy recreated from a template (``Tpm.endorsement_primary_ak``,
    GCE's from NV 0x01c10001 / 0x01c10003)."""

    public_bytes: bytes  # TPMT_PUBLIC, marshalled
    private_bytes: bytes = b""  # TPM2B_PRIVATE, marshalled (wrapped by the EK); none if persistent
    persistent_handle: int | None = None
    # TPMT_PUBLIC template of an endorsement-hierarchy primary: the same seed and template
    # always give the same key, so the template is all it takes to load it again.
    endorsement_template: bytes = b""

    @property
    def public(self) -> TPM2B_PUBLIC:
        area, _ = TPMT_PUBLIC.unmarshal(self.public_bytes)
        return TPM2B_PUBLIC(publicArea=area)

    @property
    def private(self) -> TPM2B_PRIVATE:
        if self.persistent_handle is not None or self.endorsement_template:
            raise TpmError("load AK", "a persistent or primary AK has no private blob")
        private, _ = TPM2B_PRIVATE.unmarshal(self.private_bytes)
        return private

    @property
    def name(self) -> bytes:
        """TPM name: nameAlg (2 bytes) followed by the digest of TPMT_PUBLIC."""
        return bytes(self.public.get_name())


@dataclass(frozen=True)
class Quote:
    attest: bytes  # TPMS_ATTEST, marshalled (the signed bytes)
    signature: bytes  # TPMT_SIGNATURE, marshalled
    pcrs: dict[int, bytes] = field(default_factory=dict)  # SHA-256 bank, matching pcrDigest
    nonce: bytes = b""


def _sha256_signing(scheme: TPMT_RSA_SCHEME | TPMT_ECC_SCHEME) -> TPMT_RSA_SCHEME | TPMT_ECC_SCHEME:
    """``scheme`` with SHA-256 as its signing hash."""
    scheme.details.anySig.hashAlg = TPM2_ALG.SHA256
    return scheme


def _ak_parameters(algorithm: AkAlgorithm) -> TPMU_PUBLIC_PARMS:
    """The key parameters of an AK of ``algorithm``, symmetric algorithm NULL (a signing key)."""
    symmetric = TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL)
    if algorithm is AkAlgorithm.RSA2048_RSASSA_SHA256:
        rsa_scheme = _sha256_signing(TPMT_RSA_SCHEME(scheme=TPM2_ALG.RSASSA))
        return TPMU_PUBLIC_PARMS(
            rsaDetail=TPMS_RSA_PARMS(
                symmetric=symmetric, scheme=rsa_scheme, keyBits=2048, exponent=0
            )
        )
    ecc_scheme = _sha256_signing(TPMT_ECC_SCHEME(scheme=TPM2_ALG.ECDSA))
    kdf = TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL)
    return TPMU_PUBLIC_PARMS(
        eccDetail=TPMS_ECC_PARMS(
            symmetric=symmetric, scheme=ecc_scheme, curveID=TPM2_ECC.NIST_P256, kdf=kdf
        )
    )


def ak_template(algorithm: AkAlgorithm = AkAlgorithm.RSA2048_RSASSA_SHA256) -> TPMT_PUBLIC:
    """The public template of a restricted signing attestation key."""
    if algorithm is AkAlgorithm.RSA2048_RSASSA_SHA256:
        key_type, unique = TPM2_ALG.RSA, TPMU_PUBLIC_ID(rsa=b"")
    elif algorithm is AkAlgorithm.ECC_P256_ECDSA_SHA256:
        key_type, unique = TPM2_ALG.ECC, TPMU_PUBLIC_ID()
    else:
        raise TpmError("create_ak", f"unsupported AK algorithm {algorithm!r}")
    return TPMT_PUBLIC(
        type=key_type,
        nameAlg=TPM2_ALG.SHA256,
        objectAttributes=AK_ATTRIBUTES,
        parameters=_ak_parameters(algorithm),
        unique=unique,
    )


def der_prefix(data: bytes) -> bytes:
    """The DER element at the start of ``data``; the rest must be zero padding.

    NV indices are sized by the manufacturer and certificates are zero padded to fill them.
    Hand-written because a DER SEQUENCE header is four lines and cryptography rejects
    trailing bytes rather than reporting the element's length.
    """
    if len(data) < 2 or data[0] != 0x30:
        raise TpmError("read certificate", "NV content is not a DER SEQUENCE")
    first = data[1]
    if first < 0x80:
        header, length = 2, first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or len(data) < 2 + count:
            raise TpmError("read certificate", "bad DER length")
        header, length = 2 + count, int.from_bytes(data[2 : 2 + count], "big")
    end = header + length
    if end > len(data):
        raise TpmError("read certificate", "DER element longer than the NV content")
    if any(data[end:]):
        raise TpmError("read certificate", "non-zero bytes after the DER certificate")
    return data[:end]


def pcr_selection(pcrs: Sequence[int]) -> TPML_PCR_SELECTION:
    """A SHA-256 bank selection of ``pcrs``."""
    selection = TPMS_PCR_SELECTION(hash=TPM2_ALG.SHA256, pcrs=list(pcrs))
    return TPML_PCR_SELECTION([selection])


def selected_pcrs(selection: TPML_PCR_SELECTION) -> list[tuple[int, list[int]]]:
    """(hash algorithm, ascending PCR indices) per bank, in selection order."""
    banks: list[tuple[int, list[int]]] = []
    for index in range(selection.count):
        bank = selection.pcrSelections[index]
        bitmap = bytes(bank.pcrSelect)[: bank.sizeofSelect]
        indices = [
            byte_index * 8 + bit
            for byte_index, byte in enumerate(bitmap)
            for bit in range(8)
            if byte & (1 << bit)
        ]
        banks.append((int(bank.hash), indices))
    return banks
