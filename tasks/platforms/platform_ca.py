"""The platform CA for the `local` and `qemu` platforms: the project plays the cloud's role.

On Azure the AK certificate comes from Microsoft. Here, the platform CA checks the TPM's EK
certificate against the swtpm_localca CA the project configured, proves with
MakeCredential/ActivateCredential that the AK lives in the TPM holding that EK, and then
issues an X.509 certificate for the AK. The verifier trusts this CA only when asked to.

The AK certificate carries, besides the key, the AK binding extension (``aicert.chain.
AkBinding``, non-critical): the AK's TPM name, the very name MakeCredential bound the
activation to (it covers every attribute bit of the TPMT_PUBLIC, so a verifier can tell an
edited ``ak.public`` from the activated one), and the SHA-256 of the EK certificate checked
here. Its keyUsage is digitalSignature only: the AK signs quotes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import NameOID
from tpm2_pytss.constants import TPM2_ALG, TPM2_ECC, TPMA_OBJECT
from tpm2_pytss.types import TPMT_PUBLIC
from tpm2_pytss.utils import make_credential

from aicert.chain import AkBinding
from aicert.guest_runtime.hostutil import file_lock
from aicert.guest_runtime.tpm import AK_REQUIRED_ATTRIBUTES

CA_COMMON_NAME = "AICert Local Platform CA"
CA_KEY_FILE = "platform-ca.key.pem"
CA_CERT_FILE = "platform-ca.cert.pem"
CA_LOCK_FILE = ".platform-ca.lock"
CA_VALIDITY = dt.timedelta(days=3650)
AK_CERT_VALIDITY = dt.timedelta(days=1)
BACKDATE = dt.timedelta(minutes=5)
ACTIVATION_SECRET_SIZE = 32
AK_NAME_PREFIX_HEX = 16

# TCG "tcg-kp-AIKCertificate": the certified key is a TPM attestation key.
OID_TCG_KP_AIK_CERTIFICATE = x509.ObjectIdentifier("2.23.133.8.3")

EK_REQUIRED_ATTRIBUTES = (
    TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT
)
_NAME_HASHES = {
    int(TPM2_ALG.SHA256): hashlib.sha256,
    int(TPM2_ALG.SHA384): hashlib.sha384,
    int(TPM2_ALG.SHA512): hashlib.sha512,
}
_STRONG_SIGNATURE_HASHES = frozenset(_NAME_HASHES)
_AK_ECC_CURVES = frozenset({int(TPM2_ECC.NIST_P256), int(TPM2_ECC.NIST_P384)})
_AK_MIN_RSA_BITS = 2048


AkPublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


class PlatformCAError(RuntimeError):
    """The platform CA refuses: bad EK certificate, unacceptable AK, failed activation."""


@dataclass(frozen=True)
class VerifiedEkCertificate:
    """An EK certificate that chains to the configured EK CA (only made by the CA)."""

    certificate: x509.Certificate

    @property
    def der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)


@dataclass(frozen=True)
class ActivationChallenge:
    """What goes to the TPM (``credential_blob``, ``encrypted_secret``: the contents of
    TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET) and what the CA keeps to check the answer."""

    credential_blob: bytes
    encrypted_secret: bytes
    ak_public: bytes  # TPMT_PUBLIC, marshalled
    ak_name: bytes
    ek_certificate_sha256: bytes  # of the verified EK certificate's DER
    secret: bytes = field(repr=False)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _spki(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def parse_tpmt_public(data: bytes, what: str) -> TPMT_PUBLIC:
    """TPMT_PUBLIC from its marshalled bytes, refusing trailing bytes."""
    try:
        public, used = TPMT_PUBLIC.unmarshal(data)
    except Exception as exc:
        raise PlatformCAError(f"{what}: malformed TPMT_PUBLIC: {exc}") from exc
    if used != len(data):
        raise PlatformCAError(f"{what}: {len(data) - used} trailing bytes after TPMT_PUBLIC")
    return public


def tpm_name(public_bytes: bytes, public: TPMT_PUBLIC) -> bytes:
    """The TPM name of a key: nameAlg followed by the hash of the TPMT_PUBLIC bytes given
    (the bytes themselves, so that the name is exactly what the TPM computes)."""
    name_alg = int(public.nameAlg)
    hash_function = _NAME_HASHES.get(name_alg)
    if hash_function is None:
        raise PlatformCAError(f"unsupported name algorithm 0x{name_alg:04x}")
    return name_alg.to_bytes(2, "big") + hash_function(public_bytes).digest()


def public_key_of(public: TPMT_PUBLIC, what: str) -> AkPublicKey:
    """The cryptography public key of a TPMT_PUBLIC (via tpm2-pytss): RSA or EC only."""
    try:
        key = serialization.load_pem_public_key(public.to_pem())
    except Exception as exc:
        raise PlatformCAError(f"{what}: unsupported public key: {exc}") from exc
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise PlatformCAError(f"{what}: neither an RSA nor an EC key")
    return key


def check_ak_public(public: TPMT_PUBLIC) -> None:
    """Refuse anything but a restricted signing key with a strong scheme."""
    attributes = int(public.objectAttributes)
    missing = int(AK_REQUIRED_ATTRIBUTES) & ~attributes
    if missing:
        raise PlatformCAError(
            f"AK is not a restricted signing key: attributes 0x{attributes:08x} "
            f"lack 0x{missing:08x} (fixedTPM|fixedParent|sensitiveDataOrigin|restricted|sign)"
        )
    if attributes & int(TPMA_OBJECT.DECRYPT):
        raise PlatformCAError("AK has the decrypt attribute: not a pure signing key")
    if int(public.nameAlg) not in _NAME_HASHES:
        raise PlatformCAError(f"AK name algorithm 0x{int(public.nameAlg):04x} refused")
    key_type = int(public.type)
    if key_type == int(TPM2_ALG.RSA):
        detail = public.parameters.rsaDetail
        if int(detail.keyBits) < _AK_MIN_RSA_BITS:
            raise PlatformCAError(f"AK RSA key of {int(detail.keyBits)} bits refused")
        if int(detail.scheme.scheme) not in (int(TPM2_ALG.RSASSA), int(TPM2_ALG.RSAPSS)):
            raise PlatformCAError("AK RSA signing scheme must be RSASSA or RSAPSS")
        scheme_hash = int(detail.scheme.details.anySig.hashAlg)
    elif key_type == int(TPM2_ALG.ECC):
        detail = public.parameters.eccDetail
        if int(detail.curveID) not in _AK_ECC_CURVES:
            raise PlatformCAError(f"AK ECC curve 0x{int(detail.curveID):04x} refused")
        if int(detail.scheme.scheme) != int(TPM2_ALG.ECDSA):
            raise PlatformCAError("AK ECC signing scheme must be ECDSA")
        scheme_hash = int(detail.scheme.details.anySig.hashAlg)
    else:
        raise PlatformCAError(f"AK key type 0x{key_type:04x} refused")
    if scheme_hash not in _STRONG_SIGNATURE_HASHES:
        raise PlatformCAError(f"AK signing hash 0x{scheme_hash:04x} refused (SHA-256 or stronger)")


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


class PlatformCA:
    """An ECDSA P-256 CA, its key and self-signed certificate kept in one directory."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate) -> None:
        if _spki(key.public_key()) != _spki(certificate.public_key()):
            raise PlatformCAError("platform CA key and certificate do not match")
        self._key = key
        self.certificate = certificate

    @classmethod
    def load_or_create(cls, directory: Path) -> Self:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        key_path, cert_path = directory / CA_KEY_FILE, directory / CA_CERT_FILE
        with file_lock(directory / CA_LOCK_FILE):
            if key_path.exists() and cert_path.exists():
                return cls._load(key_path, cert_path)
            if key_path.exists() or cert_path.exists():
                raise PlatformCAError(
                    f"{directory} holds only one of {CA_KEY_FILE} and {CA_CERT_FILE}: "
                    "refusing to replace a half-present CA"
                )
            ca = cls._generate()
            _write_atomically(
                key_path,
                ca._key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ),
                0o600,
            )
            _write_atomically(cert_path, ca.certificate_pem.encode(), 0o644)
            return ca

    @classmethod
    def _load(cls, key_path: Path, cert_path: Path) -> Self:
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except (OSError, ValueError, TypeError) as exc:
            raise PlatformCAError(f"cannot load the platform CA: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PlatformCAError("the platform CA key is not an EC key")
        return cls(key, certificate)

    @classmethod
    def _generate(cls) -> Self:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "AICert"),
                x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME),
            ]
        )
        now = _utcnow()
        public_key = key.public_key()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, certificate)

    @property
    def certificate_pem(self) -> str:
        return self.certificate.public_bytes(serialization.Encoding.PEM).decode()

    # -- EK ------------------------------------------------------------------------

    def verify_ek_certificate(
        self,
        ek_cert_der: bytes,
        ek_ca_cert_pem_path: Path,
        at: dt.datetime | None = None,
    ) -> VerifiedEkCertificate:
        """The EK certificate must be signed by a certificate in ``ek_ca_cert_pem_path``
        (the swtpm_localca issuer) and be valid at ``at`` (default: now)."""
        try:
            ek_cert = x509.load_der_x509_certificate(ek_cert_der)
        except ValueError as exc:
            raise PlatformCAError(f"EK certificate is not DER X.509: {exc}") from exc
        try:
            issuers = x509.load_pem_x509_certificates(Path(ek_ca_cert_pem_path).read_bytes())
        except (OSError, ValueError) as exc:
            raise PlatformCAError(f"cannot read the EK CA certificate: {exc}") from exc
        when = at or _utcnow()
        if not ek_cert.not_valid_before_utc <= when <= ek_cert.not_valid_after_utc:
            raise PlatformCAError("EK certificate is outside its validity period")
        for issuer in issuers:
            if issuer.subject != ek_cert.issuer:
                continue
            if not issuer.not_valid_before_utc <= when <= issuer.not_valid_after_utc:
                continue
            try:
                ek_cert.verify_directly_issued_by(issuer)
            except (InvalidSignature, ValueError, TypeError):
                continue
            return VerifiedEkCertificate(certificate=ek_cert)
        raise PlatformCAError("EK certificate is not signed by the configured EK CA")

    # -- activation ------------------------------------------------------------------

    def begin_activation(
        self, ek: VerifiedEkCertificate, ek_public: bytes, ak_public: bytes
    ) -> ActivationChallenge:
        """A credential only the TPM holding ``ek`` can open, and only for ``ak_public``.

        ``ek_public`` and ``ak_public`` are marshalled TPMT_PUBLIC."""
        if not isinstance(ek, VerifiedEkCertificate):
            raise PlatformCAError("begin_activation needs an EK certificate verified by this CA")
        ek_area = parse_tpmt_public(ek_public, "EK public")
        if int(ek_area.objectAttributes) & int(EK_REQUIRED_ATTRIBUTES) != int(
            EK_REQUIRED_ATTRIBUTES
        ) or int(ek_area.objectAttributes) & int(TPMA_OBJECT.SIGN_ENCRYPT):
            raise PlatformCAError("EK public is not a restricted decryption key")
        if _spki(public_key_of(ek_area, "EK public")) != _spki(ek.certificate.public_key()):
            raise PlatformCAError("EK public key does not match the EK certificate")

        ak_area = parse_tpmt_public(ak_public, "AK public")
        check_ak_public(ak_area)
        public_key_of(ak_area, "AK public")  # the AK must be certifiable
        ak_name = tpm_name(ak_public, ak_area)

        secret = secrets.token_bytes(ACTIVATION_SECRET_SIZE)
        try:
            credential_blob, encrypted_secret = make_credential(ek_area, secret, ak_name)
        except (ValueError, TypeError) as exc:
            raise PlatformCAError(f"MakeCredential failed: {exc}") from exc
        return ActivationChallenge(
            credential_blob=bytes(credential_blob),
            encrypted_secret=bytes(encrypted_secret),
            ak_public=bytes(ak_public),
            ak_name=ak_name,
            ek_certificate_sha256=hashlib.sha256(ek.der).digest(),
            secret=secret,
        )

    def complete_activation(self, challenge: ActivationChallenge, returned_secret: bytes) -> str:
        """Check the TPM's answer; on success, the AK certificate (PEM)."""
        if not hmac.compare_digest(challenge.secret, bytes(returned_secret)):
            raise PlatformCAError("activation failed: the returned secret is wrong")
        ak_area = parse_tpmt_public(challenge.ak_public, "AK public")
        check_ak_public(ak_area)
        ak_key = public_key_of(ak_area, "AK public")
        binding = AkBinding(
            ak_name=challenge.ak_name, ek_certificate_sha256=challenge.ek_certificate_sha256
        )
        return self._issue_ak_certificate(ak_key, binding)

    def _issue_ak_certificate(self, ak_key: AkPublicKey, binding: AkBinding) -> str:
        ak_name = binding.ak_name
        name_hex = ak_name[2:].hex()[:AK_NAME_PREFIX_HEX]
        now = _utcnow()
        ca_public = self._key.public_key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "AICert"),
                        x509.NameAttribute(NameOID.COMMON_NAME, f"AICert AK {name_hex}"),
                    ]
                )
            )
            .issuer_name(self.certificate.subject)
            .public_key(ak_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + AK_CERT_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([OID_TCG_KP_AIK_CERTIFICATE]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ak_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public), critical=False
            )
            # Non-critical: a verifier that does not know it still reads the certificate;
            # AICert's verifier requires it on certificates from this CA.
            .add_extension(binding.extension(), critical=False)
        )
        certificate = builder.sign(self._key, hashes.SHA256())
        return certificate.public_bytes(serialization.Encoding.PEM).decode()
