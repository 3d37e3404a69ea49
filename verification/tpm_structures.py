"""Parsers for the TPM 2.0 structures a verifier meets: TPMS_ATTEST, TPMT_PUBLIC, TPM2B_PUBLIC,
TPMT_SIGNATURE and TPML_PCR_SELECTION (TPM 2.0 Library, Part 2: Structures).

Hand-written with ``struct`` rather than tpm2-pytss: tpm2-pytss wraps the tpm2-tss C library,
and the end-user verifier must install with nothing but pure-Python wheels (no libtss2).
Every length read from the input is bounds-checked against the buffer and against the
structure's maximum size, and every failure raises ``TpmStructureError`` naming the structure
and the field, so malformed evidence is an error, never a crash.

The structures stay in one module of a little over 600 lines: they share the bounds-checked
reader and the constant tables, and nest in each other (a quote's TPML_PCR_SELECTION, the
parameters and unique field of a TPMT_PUBLIC), so parts split off would only import each other.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from aicert.errors import TpmStructureError

# --- Constants (TPM 2.0 Library, Part 2, "Algorithm Registry" and "Constants") -----------------

TPM_ALG_RSA: Final = 0x0001
TPM_ALG_SHA1: Final = 0x0004
TPM_ALG_HMAC: Final = 0x0005
TPM_ALG_AES: Final = 0x0006
TPM_ALG_MGF1: Final = 0x0007
TPM_ALG_SHA256: Final = 0x000B
TPM_ALG_SHA384: Final = 0x000C
TPM_ALG_SHA512: Final = 0x000D
TPM_ALG_NULL: Final = 0x0010
TPM_ALG_SM3_256: Final = 0x0012
TPM_ALG_SM4: Final = 0x0013
TPM_ALG_RSASSA: Final = 0x0014
TPM_ALG_RSAES: Final = 0x0015
TPM_ALG_RSAPSS: Final = 0x0016
TPM_ALG_OAEP: Final = 0x0017
TPM_ALG_ECDSA: Final = 0x0018
TPM_ALG_ECDH: Final = 0x0019
TPM_ALG_ECDAA: Final = 0x001A
TPM_ALG_SM2: Final = 0x001B
TPM_ALG_ECSCHNORR: Final = 0x001C
TPM_ALG_ECMQV: Final = 0x001D
TPM_ALG_KDF1_SP800_56A: Final = 0x0020
TPM_ALG_KDF2: Final = 0x0021
TPM_ALG_KDF1_SP800_108: Final = 0x0022
TPM_ALG_ECC: Final = 0x0023
TPM_ALG_CAMELLIA: Final = 0x0026
TPM_ALG_SHA3_256: Final = 0x0027
TPM_ALG_SHA3_384: Final = 0x0028
TPM_ALG_SHA3_512: Final = 0x0029

TPM_ECC_NIST_P256: Final = 0x0003
TPM_ECC_NIST_P384: Final = 0x0004
TPM_ECC_NIST_P521: Final = 0x0005

TPM_GENERATED_VALUE: Final = 0xFF544347

TPM_ST_ATTEST_CERTIFY: Final = 0x8017
TPM_ST_ATTEST_QUOTE: Final = 0x8018

# TPMA_OBJECT bits.
TPMA_OBJECT_FIXEDTPM: Final = 1 << 1
TPMA_OBJECT_FIXEDPARENT: Final = 1 << 4
TPMA_OBJECT_SENSITIVEDATAORIGIN: Final = 1 << 5
TPMA_OBJECT_RESTRICTED: Final = 1 << 16
TPMA_OBJECT_DECRYPT: Final = 1 << 17
TPMA_OBJECT_SIGN_ENCRYPT: Final = 1 << 18

_RESTRICTED_SIGNING_REQUIRED: Final = (
    TPMA_OBJECT_FIXEDTPM
    | TPMA_OBJECT_FIXEDPARENT
    | TPMA_OBJECT_SENSITIVEDATAORIGIN
    | TPMA_OBJECT_RESTRICTED
    | TPMA_OBJECT_SIGN_ENCRYPT
)

# Digest sizes of the hash algorithms a TPM may use (TPM_ALG_ID -> bytes).
HASH_DIGEST_SIZES: Final[dict[int, int]] = {
    TPM_ALG_SHA1: 20,
    TPM_ALG_SHA256: 32,
    TPM_ALG_SHA384: 48,
    TPM_ALG_SHA512: 64,
    TPM_ALG_SM3_256: 32,
    TPM_ALG_SHA3_256: 32,
    TPM_ALG_SHA3_384: 48,
    TPM_ALG_SHA3_512: 64,
}

# hashlib names of the hash algorithms this package can compute (SM3 is not in hashlib).
HASHLIB_NAMES: Final[dict[int, str]] = {
    TPM_ALG_SHA1: "sha1",
    TPM_ALG_SHA256: "sha256",
    TPM_ALG_SHA384: "sha384",
    TPM_ALG_SHA512: "sha512",
    TPM_ALG_SHA3_256: "sha3_256",
    TPM_ALG_SHA3_384: "sha3_384",
    TPM_ALG_SHA3_512: "sha3_512",
}

_CRYPTOGRAPHY_CURVES: Final[dict[int, type[ec.EllipticCurve]]] = {
    TPM_ECC_NIST_P256: ec.SECP256R1,
    TPM_ECC_NIST_P384: ec.SECP384R1,
    TPM_ECC_NIST_P521: ec.SECP521R1,
}
_CURVE_COORDINATE_BYTES: Final[dict[int, int]] = {
    TPM_ECC_NIST_P256: 32,
    TPM_ECC_NIST_P384: 48,
    TPM_ECC_NIST_P521: 66,
}

# Size limits of the TPM2B buffers (Part 2 defines them as sizeof() of the largest member;
# the values are those of an implementation with SHA-512, RSA-4096 and ECC up to BN P638).
_MAX_DIGEST: Final = 64  # sizeof(TPMU_HA)
_MAX_NAME: Final = 2 + 64  # sizeof(TPMU_NAME) = sizeof(TPMT_HA)
_MAX_DATA: Final = 2 + 64  # sizeof(TPMT_HA)
_MAX_RSA_KEY_BYTES: Final = 512
_MAX_ECC_KEY_BYTES: Final = 80
# TPML_PCR_SELECTION: at most one entry per implemented hash algorithm (HASH_COUNT), and a
# PCR bitmap of at most PCR_SELECT_MAX bytes; generous bounds, far above any real TPM.
_MAX_PCR_BANKS: Final = 16
_MAX_PCR_SELECT_BYTES: Final = 32

_SYMMETRIC_OBJECT_ALGS: Final = frozenset({TPM_ALG_AES, TPM_ALG_SM4, TPM_ALG_CAMELLIA})
# Schemes that carry a hash algorithm (TPMS_SCHEME_HASH) in the RSA / ECC / KDF unions.
_RSA_SCHEMES_WITH_HASH: Final = frozenset({TPM_ALG_RSASSA, TPM_ALG_RSAPSS, TPM_ALG_OAEP})
_RSA_SCHEMES_WITHOUT_DETAILS: Final = frozenset({TPM_ALG_RSAES, TPM_ALG_NULL})
_ECC_SCHEMES_WITH_HASH: Final = frozenset(
    {TPM_ALG_ECDSA, TPM_ALG_ECDH, TPM_ALG_SM2, TPM_ALG_ECSCHNORR, TPM_ALG_ECMQV}
)
_KDF_SCHEMES: Final = frozenset(
    {TPM_ALG_MGF1, TPM_ALG_KDF1_SP800_56A, TPM_ALG_KDF2, TPM_ALG_KDF1_SP800_108}
)
_ECC_SIGNATURE_ALGS: Final = frozenset(
    {TPM_ALG_ECDSA, TPM_ALG_ECDAA, TPM_ALG_SM2, TPM_ALG_ECSCHNORR}
)


# --- Reader ------------------------------------------------------------------------------------


class _Reader:
    """Big-endian cursor over a buffer; every read is bounds-checked."""

    def __init__(self, data: bytes) -> None:
        self.data = bytes(data)
        self.offset = 0

    def remaining(self) -> int:
        return len(self.data) - self.offset

    def take(self, count: int, where: str) -> bytes:
        if count < 0 or count > self.remaining():
            raise TpmStructureError(
                f"{where}: truncated (needs {count} bytes at offset {self.offset}, "
                f"{self.remaining()} left)"
            )
        chunk = self.data[self.offset : self.offset + count]
        self.offset += count
        return chunk

    def u8(self, where: str) -> int:
        return self.take(1, where)[0]

    def u16(self, where: str) -> int:
        value: int = struct.unpack(">H", self.take(2, where))[0]
        return value

    def u32(self, where: str) -> int:
        value: int = struct.unpack(">I", self.take(4, where))[0]
        return value

    def u64(self, where: str) -> int:
        value: int = struct.unpack(">Q", self.take(8, where))[0]
        return value

    def tpm2b(self, where: str, max_size: int) -> bytes:
        size = self.u16(f"{where}.size")
        if size > max_size:
            raise TpmStructureError(f"{where}: size {size} exceeds the maximum {max_size}")
        return self.take(size, where)

    def expect_end(self, structure: str) -> None:
        if self.remaining():
            raise TpmStructureError(
                f"{structure}: {self.remaining()} trailing bytes after the structure"
            )


# --- TPML_PCR_SELECTION ------------------------------------------------------------------------


@dataclass(frozen=True)
class TpmsPcrSelection:
    """One bank of a PCR selection: the hash algorithm and the raw bitmap."""

    hash_alg: int
    pcr_select: bytes

    @property
    def pcrs(self) -> tuple[int, ...]:
        """Selected PCR indices, ascending (bit j of byte i selects PCR 8*i + j)."""
        return tuple(
            byte_index * 8 + bit
            for byte_index, byte in enumerate(self.pcr_select)
            for bit in range(8)
            if byte & (1 << bit)
        )


@dataclass(frozen=True)
class TpmlPcrSelection:
    selections: tuple[TpmsPcrSelection, ...]


def _read_pcr_selection(reader: _Reader, where: str) -> TpmlPcrSelection:
    count = reader.u32(f"{where}.count")
    if count > _MAX_PCR_BANKS:
        raise TpmStructureError(f"{where}.count: {count} exceeds the maximum {_MAX_PCR_BANKS}")
    selections: list[TpmsPcrSelection] = []
    for index in range(count):
        entry = f"{where}.pcrSelections[{index}]"
        hash_alg = reader.u16(f"{entry}.hash")
        size = reader.u8(f"{entry}.sizeofSelect")
        if size > _MAX_PCR_SELECT_BYTES:
            raise TpmStructureError(
                f"{entry}.sizeofSelect: {size} exceeds the maximum {_MAX_PCR_SELECT_BYTES}"
            )
        selections.append(TpmsPcrSelection(hash_alg, reader.take(size, f"{entry}.pcrSelect")))
    return TpmlPcrSelection(tuple(selections))


def parse_pcr_selection(data: bytes) -> TpmlPcrSelection:
    """Parse a TPML_PCR_SELECTION that fills the whole buffer."""
    reader = _Reader(data)
    selection = _read_pcr_selection(reader, "TPML_PCR_SELECTION")
    reader.expect_end("TPML_PCR_SELECTION")
    return selection


# --- TPMS_ATTEST -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TpmsClockInfo:
    clock: int
    reset_count: int
    restart_count: int
    safe: bool


@dataclass(frozen=True)
class TpmsQuoteInfo:
    pcr_select: TpmlPcrSelection
    pcr_digest: bytes


@dataclass(frozen=True)
class TpmsAttest:
    """A parsed TPMS_ATTEST. ``quote`` is set only when ``type`` is TPM_ST_ATTEST_QUOTE;
    ``attested`` holds the raw bytes of the ``attested`` union for every type."""

    magic: int
    type: int
    qualified_signer: bytes
    extra_data: bytes
    clock_info: TpmsClockInfo
    firmware_version: int
    attested: bytes
    quote: TpmsQuoteInfo | None
    raw: bytes


def parse_attest(data: bytes) -> TpmsAttest:
    """Parse a TPMS_ATTEST (the ``quoted`` / ``-m`` message of a quote).

    Magic and type are parsed but not judged here: the caller decides what it accepts, so
    that a wrong magic is reported as such and not as a parse error.
    """
    where = "TPMS_ATTEST"
    reader = _Reader(data)
    magic = reader.u32(f"{where}.magic")
    attest_type = reader.u16(f"{where}.type")
    qualified_signer = reader.tpm2b(f"{where}.qualifiedSigner", _MAX_NAME)
    extra_data = reader.tpm2b(f"{where}.extraData", _MAX_DATA)
    clock = reader.u64(f"{where}.clockInfo.clock")
    reset_count = reader.u32(f"{where}.clockInfo.resetCount")
    restart_count = reader.u32(f"{where}.clockInfo.restartCount")
    safe = reader.u8(f"{where}.clockInfo.safe")
    if safe not in (0, 1):
        raise TpmStructureError(f"{where}.clockInfo.safe: {safe} is not a TPMI_YES_NO")
    firmware_version = reader.u64(f"{where}.firmwareVersion")
    attested_start = reader.offset
    quote: TpmsQuoteInfo | None = None
    if attest_type == TPM_ST_ATTEST_QUOTE:
        pcr_select = _read_pcr_selection(reader, f"{where}.attested.quote.pcrSelect")
        pcr_digest = reader.tpm2b(f"{where}.attested.quote.pcrDigest", _MAX_DIGEST)
        reader.expect_end(where)
        quote = TpmsQuoteInfo(pcr_select, pcr_digest)
    # Other attestation types are kept as raw bytes: this verifier only judges quotes.
    return TpmsAttest(
        magic=magic,
        type=attest_type,
        qualified_signer=qualified_signer,
        extra_data=extra_data,
        clock_info=TpmsClockInfo(clock, reset_count, restart_count, bool(safe)),
        firmware_version=firmware_version,
        attested=reader.data[attested_start:],
        quote=quote,
        raw=reader.data,
    )


# --- TPMT_SIGNATURE ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TpmtSignature:
    """A parsed TPMT_SIGNATURE. ``rsa_signature`` is set for RSASSA/RSAPSS, ``ecc_r`` and
    ``ecc_s`` for ECDSA/ECDAA/SM2/ECSCHNORR, ``hmac_digest`` for HMAC; ``hash_alg`` is
    TPM_ALG_NULL for a NULL signature."""

    sig_alg: int
    hash_alg: int
    rsa_signature: bytes = b""
    ecc_r: bytes = b""
    ecc_s: bytes = b""
    hmac_digest: bytes = b""


def parse_signature(data: bytes) -> TpmtSignature:
    """Parse a TPMT_SIGNATURE that fills the whole buffer (tpm2_quote's default ``-s`` output)."""
    where = "TPMT_SIGNATURE"
    reader = _Reader(data)
    sig_alg = reader.u16(f"{where}.sigAlg")
    if sig_alg in (TPM_ALG_RSASSA, TPM_ALG_RSAPSS):
        hash_alg = reader.u16(f"{where}.signature.rsa.hash")
        sig = reader.tpm2b(f"{where}.signature.rsa.sig", _MAX_RSA_KEY_BYTES)
        result = TpmtSignature(sig_alg, hash_alg, rsa_signature=sig)
    elif sig_alg in _ECC_SIGNATURE_ALGS:
        hash_alg = reader.u16(f"{where}.signature.ecc.hash")
        r = reader.tpm2b(f"{where}.signature.ecc.signatureR", _MAX_ECC_KEY_BYTES)
        s = reader.tpm2b(f"{where}.signature.ecc.signatureS", _MAX_ECC_KEY_BYTES)
        result = TpmtSignature(sig_alg, hash_alg, ecc_r=r, ecc_s=s)
    elif sig_alg == TPM_ALG_HMAC:
        hash_alg = reader.u16(f"{where}.signature.hmac.hashAlg")
        size = HASH_DIGEST_SIZES.get(hash_alg)
        if size is None:
            raise TpmStructureError(
                f"{where}.signature.hmac.hashAlg: unknown hash algorithm 0x{hash_alg:04x}"
            )
        digest = reader.take(size, f"{where}.signature.hmac.digest")
        result = TpmtSignature(sig_alg, hash_alg, hmac_digest=digest)
    elif sig_alg == TPM_ALG_NULL:
        result = TpmtSignature(sig_alg, TPM_ALG_NULL)
    else:
        raise TpmStructureError(f"{where}.sigAlg: unknown signature algorithm 0x{sig_alg:04x}")
    reader.expect_end(where)
    return result


# --- TPMT_PUBLIC / TPM2B_PUBLIC ----------------------------------------------------------------


@dataclass(frozen=True)
class TpmtSymDefObject:
    algorithm: int
    key_bits: int = 0
    mode: int = TPM_ALG_NULL


@dataclass(frozen=True)
class TpmtScheme:
    """A signing/encryption/KDF scheme: the algorithm and, where it has one, its hash
    (TPM_ALG_NULL otherwise); ``count`` only for ECDAA."""

    scheme: int
    hash_alg: int = TPM_ALG_NULL
    count: int = 0


@dataclass(frozen=True)
class TpmsRsaParms:
    symmetric: TpmtSymDefObject
    scheme: TpmtScheme
    key_bits: int
    exponent: int


@dataclass(frozen=True)
class TpmsEccParms:
    symmetric: TpmtSymDefObject
    scheme: TpmtScheme
    curve_id: int
    kdf: TpmtScheme


@dataclass(frozen=True)
class TpmsEccPoint:
    x: bytes
    y: bytes


@dataclass(frozen=True)
class TpmtPublic:
    """A parsed TPMT_PUBLIC (RSA or ECC). ``raw`` is its exact marshalled form, from which
    the Name is computed (re-marshalling could differ from what the TPM hashed)."""

    type: int
    name_alg: int
    object_attributes: int
    auth_policy: bytes
    parameters: TpmsRsaParms | TpmsEccParms
    unique: bytes | TpmsEccPoint
    raw: bytes

    def marshal(self) -> bytes:
        """The TPMT_PUBLIC bytes as parsed."""
        return self.raw

    def marshal_tpm2b(self) -> bytes:
        """The TPM2B_PUBLIC form: a u16 size followed by the TPMT_PUBLIC."""
        return struct.pack(">H", len(self.raw)) + self.raw

    def name(self) -> bytes:
        """The object's Name: nameAlg (u16) || H_nameAlg(TPMT_PUBLIC)."""
        hash_name = HASHLIB_NAMES.get(self.name_alg)
        if hash_name is None:
            raise TpmStructureError(
                f"TPMT_PUBLIC.nameAlg: cannot compute a Name with algorithm 0x{self.name_alg:04x}"
            )
        return struct.pack(">H", self.name_alg) + hashlib.new(hash_name, self.raw).digest()

    def is_restricted_signing_key(self) -> bool:
        """fixedTPM, fixedParent, sensitiveDataOrigin, restricted and sign set, decrypt clear:
        the key is TPM-resident and signs only digests the TPM computed itself."""
        attributes = self.object_attributes
        return (
            attributes & _RESTRICTED_SIGNING_REQUIRED == _RESTRICTED_SIGNING_REQUIRED
            and not attributes & TPMA_OBJECT_DECRYPT
        )

    def to_cryptography_key(self) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
        """The public key as a ``cryptography`` object (RSA exponent 0 means 65537)."""
        if isinstance(self.parameters, TpmsRsaParms):
            return self._rsa_key(self.parameters)
        return self._ecc_key(self.parameters)

    def _rsa_key(self, parameters: TpmsRsaParms) -> rsa.RSAPublicKey:
        modulus = self.unique
        if not isinstance(modulus, bytes) or not modulus:
            raise TpmStructureError("TPMT_PUBLIC.unique.rsa: empty modulus")
        if len(modulus) * 8 != parameters.key_bits:
            raise TpmStructureError(
                f"TPMT_PUBLIC.unique.rsa: modulus of {len(modulus)} bytes does not match "
                f"keyBits {parameters.key_bits}"
            )
        exponent = parameters.exponent or 65537
        try:
            return rsa.RSAPublicNumbers(exponent, int.from_bytes(modulus, "big")).public_key()
        except ValueError as error:
            raise TpmStructureError(f"TPMT_PUBLIC.parameters.rsa: {error}") from None

    def _ecc_key(self, parameters: TpmsEccParms) -> ec.EllipticCurvePublicKey:
        curve = _CRYPTOGRAPHY_CURVES.get(parameters.curve_id)
        if curve is None:
            raise TpmStructureError(
                f"TPMT_PUBLIC.parameters.ecc.curveID: unsupported curve "
                f"0x{parameters.curve_id:04x} (supported: NIST P-256, P-384, P-521)"
            )
        point = self.unique
        coordinate_bytes = _CURVE_COORDINATE_BYTES[parameters.curve_id]
        if not isinstance(point, TpmsEccPoint):
            raise TpmStructureError("TPMT_PUBLIC.unique.ecc: not an ECC point")
        for label, coordinate in (("x", point.x), ("y", point.y)):
            if not 0 < len(coordinate) <= coordinate_bytes:
                raise TpmStructureError(
                    f"TPMT_PUBLIC.unique.ecc.{label}: {len(coordinate)} bytes, expected 1 to "
                    f"{coordinate_bytes} for this curve"
                )
        # The TPM may drop leading zero bytes; the SEC1 encoding needs full-width coordinates.
        encoded = (
            b"\x04"
            + point.x.rjust(coordinate_bytes, b"\x00")
            + point.y.rjust(coordinate_bytes, b"\x00")
        )
        try:
            return ec.EllipticCurvePublicKey.from_encoded_point(curve(), encoded)
        except ValueError as error:
            raise TpmStructureError(f"TPMT_PUBLIC.unique.ecc: {error}") from None


def _read_sym_def_object(reader: _Reader, where: str) -> TpmtSymDefObject:
    algorithm = reader.u16(f"{where}.algorithm")
    if algorithm == TPM_ALG_NULL:
        return TpmtSymDefObject(algorithm)
    if algorithm not in _SYMMETRIC_OBJECT_ALGS:
        raise TpmStructureError(
            f"{where}.algorithm: 0x{algorithm:04x} is not a symmetric object algorithm"
        )
    return TpmtSymDefObject(algorithm, reader.u16(f"{where}.keyBits"), reader.u16(f"{where}.mode"))


def _read_rsa_scheme(reader: _Reader, where: str) -> TpmtScheme:
    scheme = reader.u16(f"{where}.scheme")
    if scheme in _RSA_SCHEMES_WITHOUT_DETAILS:
        return TpmtScheme(scheme)
    if scheme in _RSA_SCHEMES_WITH_HASH:
        return TpmtScheme(scheme, reader.u16(f"{where}.details.hashAlg"))
    raise TpmStructureError(f"{where}.scheme: 0x{scheme:04x} is not an RSA scheme")


def _read_ecc_scheme(reader: _Reader, where: str) -> TpmtScheme:
    scheme = reader.u16(f"{where}.scheme")
    if scheme == TPM_ALG_NULL:
        return TpmtScheme(scheme)
    if scheme in _ECC_SCHEMES_WITH_HASH:
        return TpmtScheme(scheme, reader.u16(f"{where}.details.hashAlg"))
    if scheme == TPM_ALG_ECDAA:
        return TpmtScheme(
            scheme, reader.u16(f"{where}.details.hashAlg"), reader.u16(f"{where}.details.count")
        )
    raise TpmStructureError(f"{where}.scheme: 0x{scheme:04x} is not an ECC scheme")


def _read_kdf_scheme(reader: _Reader, where: str) -> TpmtScheme:
    scheme = reader.u16(f"{where}.scheme")
    if scheme == TPM_ALG_NULL:
        return TpmtScheme(scheme)
    if scheme in _KDF_SCHEMES:
        return TpmtScheme(scheme, reader.u16(f"{where}.details.hashAlg"))
    raise TpmStructureError(f"{where}.scheme: 0x{scheme:04x} is not a KDF scheme")


def _read_public(reader: _Reader) -> TpmtPublic:
    where = "TPMT_PUBLIC"
    start = reader.offset
    key_type = reader.u16(f"{where}.type")
    name_alg = reader.u16(f"{where}.nameAlg")
    if name_alg != TPM_ALG_NULL and name_alg not in HASH_DIGEST_SIZES:
        raise TpmStructureError(f"{where}.nameAlg: unknown hash algorithm 0x{name_alg:04x}")
    attributes = reader.u32(f"{where}.objectAttributes")
    auth_policy = reader.tpm2b(f"{where}.authPolicy", _MAX_DIGEST)
    parameters: TpmsRsaParms | TpmsEccParms
    unique: bytes | TpmsEccPoint
    if key_type == TPM_ALG_RSA:
        symmetric = _read_sym_def_object(reader, f"{where}.parameters.rsaDetail.symmetric")
        scheme = _read_rsa_scheme(reader, f"{where}.parameters.rsaDetail.scheme")
        key_bits = reader.u16(f"{where}.parameters.rsaDetail.keyBits")
        exponent = reader.u32(f"{where}.parameters.rsaDetail.exponent")
        parameters = TpmsRsaParms(symmetric, scheme, key_bits, exponent)
        unique = reader.tpm2b(f"{where}.unique.rsa", _MAX_RSA_KEY_BYTES)
    elif key_type == TPM_ALG_ECC:
        symmetric = _read_sym_def_object(reader, f"{where}.parameters.eccDetail.symmetric")
        scheme = _read_ecc_scheme(reader, f"{where}.parameters.eccDetail.scheme")
        curve_id = reader.u16(f"{where}.parameters.eccDetail.curveID")
        kdf = _read_kdf_scheme(reader, f"{where}.parameters.eccDetail.kdf")
        parameters = TpmsEccParms(symmetric, scheme, curve_id, kdf)
        unique = TpmsEccPoint(
            reader.tpm2b(f"{where}.unique.ecc.x", _MAX_ECC_KEY_BYTES),
            reader.tpm2b(f"{where}.unique.ecc.y", _MAX_ECC_KEY_BYTES),
        )
    else:
        raise TpmStructureError(
            f"{where}.type: 0x{key_type:04x} is not an asymmetric key type (RSA or ECC)"
        )
    return TpmtPublic(
        type=key_type,
        name_alg=name_alg,
        object_attributes=attributes,
        auth_policy=auth_policy,
        parameters=parameters,
        unique=unique,
        raw=reader.data[start : reader.offset],
    )


def parse_tpmt_public(data: bytes) -> TpmtPublic:
    """Parse a TPMT_PUBLIC that fills the whole buffer."""
    reader = _Reader(data)
    public = _read_public(reader)
    reader.expect_end("TPMT_PUBLIC")
    return public


def parse_tpm2b_public(data: bytes) -> TpmtPublic:
    """Parse a TPM2B_PUBLIC (u16 size, then exactly that many bytes of TPMT_PUBLIC)."""
    reader = _Reader(data)
    body = reader.tpm2b("TPM2B_PUBLIC", 0xFFFF)
    reader.expect_end("TPM2B_PUBLIC")
    return parse_tpmt_public(body)


def parse_public(data: bytes) -> TpmtPublic:
    """Parse either a TPM2B_PUBLIC (``tpm2_createak -u``, ``tpm2_readpublic -o``) or a bare
    TPMT_PUBLIC. The TPM2B form is tried when the first u16 equals the length of the rest;
    a TPMT_PUBLIC's first u16 is its type (0x0001 or 0x0023), so the two forms do not clash
    for real keys."""
    data = bytes(data)
    if len(data) >= 2 and struct.unpack(">H", data[:2])[0] == len(data) - 2:
        try:
            return parse_tpmt_public(data[2:])
        except TpmStructureError as tpm2b_error:
            try:
                return parse_tpmt_public(data)
            except TpmStructureError as tpmt_error:
                raise TpmStructureError(
                    f"neither a TPM2B_PUBLIC ({tpm2b_error}) nor a TPMT_PUBLIC ({tpmt_error})"
                ) from None
    return parse_tpmt_public(data)
