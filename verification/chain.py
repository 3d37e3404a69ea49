"""Verification step 2: the AK certificate chains to a trusted root.

Path building, signature checks, validity periods, basic constraints and path lengths are
done by ``cryptography``'s X.509 verifier (``cryptography.x509.verification``). Its default
extension policies are the Web PKI's (CA/Browser Forum); a TPM attestation key certificate
is not a Web PKI certificate, so the two policies below start from the Web PKI defaults and
relax or replace only what differs for TPM AK certificates (TCG EK/AK profile, Azure vTPM):

- the leaf has no subjectAltName, or one holding a directoryName with the TPM manufacturer,
  model and version attributes (2.23.133.2.1/2/3), critical when the subject is empty;
- the leaf's extendedKeyUsage, when present, is tcg-kp-AIKCertificate (2.23.133.8.3), not
  TLS client or server authentication; Azure's intermediates carry the TCG key purposes too;
- the leaf may lack an authorityKeyIdentifier (small platform CAs often omit it);
- the leaf must allow digital signatures: the AK signs quotes.

A local/qemu AK certificate (issued by the project's platform CA after MakeCredential /
ActivateCredential) also carries the AK binding extension (``AK_BINDING_OID``, non-critical):
the AK's TPM name, which covers every attribute of its TPMT_PUBLIC, and the SHA-256 of the EK
certificate the CA verified. ``AkBinding`` encodes and decodes it; ``check_ak_binding`` (step 3)
compares it with the certificate's ``attestation.ak.public`` and ``attestation.ek.certificate``.

Trust anchors are explicit: the certificates the caller passes, plus self-signed certificates
that travel in the evidence and whose SHA-256 fingerprint is pinned for the certificate's
platform (``pinned_roots``: how Microsoft's Azure vTPM root and Google's two vTPM roots are
trusted without shipping them). Google Compute Engine does not put intermediates into the AK
certificate's NV index, so the verifier ships Google's public intermediates
(``shipped_intermediates``) and adds them to a ``gcp`` chain: they are only candidates for
path building, never anchors. Any failure is a ``CertificateChainError``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from importlib.resources import files

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    Policy,
    PolicyBuilder,
    Store,
)
from cryptography.x509.verification import VerificationError as X509VerificationError

from aicert.errors import AkMismatchError, CertificateChainError, TpmStructureError
from aicert.tpm_structures import TpmtPublic

__all__ = [
    "AK_BINDING_OID",
    "AK_BINDING_UUID",
    "AZURE_VTPM_ROOT_2023_SHA256",
    "GCP_EK_AK_CA_ROOT_SHA256",
    "GCP_ISSUER_KEY_PURPOSES",
    "GCP_TPM_EK_ROOT_1_SHA256",
    "PINNED_ROOT_FINGERPRINTS",
    "PLATFORM_PINNED_ROOTS",
    "TCG_KP_AIK_CERTIFICATE",
    "AkBinding",
    "ChainVerification",
    "ak_ca_extension_policy",
    "ak_leaf_extension_policy",
    "check_ak_binding",
    "fingerprint_sha256",
    "issuer_key_purposes",
    "leaf_public_key_matches",
    "load_pem_certificates",
    "pinned_roots",
    "shipped_intermediates",
    "verify_ak_chain",
]

# Microsoft's "Azure Virtual TPM Root Certificate Authority 2023" (valid 2023-06-01 to
# 2048-06-01). Pinned by fingerprint: the certificate itself travels in the evidence chain.
AZURE_VTPM_ROOT_2023_SHA256 = "e6c596b17f8ffefba5c300f714cfb1260c6028704ecf7becc4ab5018efb00e95"

PINNED_ROOT_FINGERPRINTS: dict[str, str] = {"azure": AZURE_VTPM_ROOT_2023_SHA256}

# Google's two vTPM CA roots (from google/go-tpm-tools server/ca-certs; valid to 2118 and
# 2122): "tpm_ek_v1_cloud_host_root-signer-0-2018-04-06" issued the older GCE AK
# certificates (through intermediates 2 and 3), "EK/AK CA Root" the current ones (through
# "EK/AK CA Intermediate"). Both are live at once, so both are pinned.
GCP_TPM_EK_ROOT_1_SHA256 = "9bd5285f8fb18502a7947e621ffd470266f49fcd3b73e19a190f690ad32a7caf"
GCP_EK_AK_CA_ROOT_SHA256 = "594759594b9b61524f6c8ef668f7177f7b9066bc0674f2f49fe9e052be78beb2"

# The roots pinned per platform: a certificate of one platform never chains to another
# cloud's root (an Azure certificate signed under Google's CA would name the wrong platform).
PLATFORM_PINNED_ROOTS: dict[str, tuple[str, ...]] = {
    "azure": (AZURE_VTPM_ROOT_2023_SHA256,),
    "gcp": (GCP_TPM_EK_ROOT_1_SHA256, GCP_EK_AK_CA_ROOT_SHA256),
}
# Public intermediates shipped as package data (aicert/trust_roots/), per platform.
_SHIPPED_INTERMEDIATES: dict[str, tuple[str, ...]] = {
    "gcp": (
        "gcp-tpm-ek-intermediate-2.pem",
        "gcp-tpm-ek-intermediate-3.pem",
        "gcp-ek-ak-ca-intermediate-v3.pem",
    ),
}

# TCG key purpose "tcg-kp-AIKCertificate": the certified key is a TPM attestation key.
TCG_KP_AIK_CERTIFICATE = x509.ObjectIdentifier("2.23.133.8.3")

# The AK binding extension. Its OID is in the 2.25 arc, whose arcs are UUIDs as integers
# (ITU-T X.667 | ISO/IEC 9834-8): a random UUID needs no registration. This one was minted
# for AICert once; it must never change (certificates already issued carry it).
AK_BINDING_UUID = uuid.UUID("6dd9c643-7d86-4b52-ba4b-055c61dcdc17")
AK_BINDING_OID = x509.ObjectIdentifier(f"2.25.{AK_BINDING_UUID.int}")
# TPM name algorithms the binding accepts (TPM_ALG_ID -> digest size): SHA-256 and stronger.
_NAME_DIGEST_SIZES = {0x000B: 32, 0x000C: 48, 0x000D: 64}
_DER_SEQUENCE, _DER_OCTET_STRING = 0x30, 0x04

_AK_KEY_PURPOSES = frozenset({TCG_KP_AIK_CERTIFICATE, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE})
# tcg-kp-EKCertificate: the only purpose Google's vTPM CAs list, though they issue AKs too.
TCG_KP_EK_CERTIFICATE = x509.ObjectIdentifier("2.23.133.8.1")
GCP_ISSUER_KEY_PURPOSES = _AK_KEY_PURPOSES | {TCG_KP_EK_CERTIFICATE}
# The purposes a platform's CAs may list instead of the AK purpose (default: none other).
_PLATFORM_ISSUER_KEY_PURPOSES = {"gcp": GCP_ISSUER_KEY_PURPOSES}
_SHA256_HEX = re.compile("[0-9a-f]{64}")


@dataclass(frozen=True)
class ChainVerification:
    """A verified AK certificate chain, as built from the leaf to its trust anchor."""

    leaf: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    root_subject: str
    root_fingerprint_sha256: str
    # The latest notBefore and the earliest notAfter over the built chain: the chain as a
    # whole is valid between these two instants.
    not_before: datetime
    not_after: datetime


@dataclass(frozen=True)
class AkBinding:
    """The AK binding extension's content::

        AkBinding ::= SEQUENCE {
            akName               OCTET STRING,  -- TPM name: nameAlg (2 bytes) || H(TPMT_PUBLIC)
            ekCertificateSha256  OCTET STRING   -- SHA-256 of the EK certificate's DER (32 bytes)
        }

    The name is exactly what the TPM computes for the AK and what MakeCredential bound the
    activation to, so it fixes every attribute bit of the AK's TPMT_PUBLIC, not only its key.
    DER, short lengths only (the whole is under 128 bytes); decoding is strict.
    """

    ak_name: bytes
    ek_certificate_sha256: bytes

    def __post_init__(self) -> None:
        if len(self.ak_name) < 2:
            raise ValueError("AK binding: the TPM name is shorter than its algorithm id")
        algorithm = int.from_bytes(self.ak_name[:2], "big")
        size = _NAME_DIGEST_SIZES.get(algorithm)
        if size is None:
            raise ValueError(f"AK binding: name algorithm 0x{algorithm:04x} is not SHA-2 256+")
        if len(self.ak_name) != 2 + size:
            raise ValueError(f"AK binding: a 0x{algorithm:04x} name is {2 + size} bytes")
        if len(self.ek_certificate_sha256) != 32:
            raise ValueError("AK binding: the EK certificate digest is not 32 bytes")

    def to_der(self) -> bytes:
        body = b"".join(
            bytes([_DER_OCTET_STRING, len(value)]) + value
            for value in (self.ak_name, self.ek_certificate_sha256)
        )
        return bytes([_DER_SEQUENCE, len(body)]) + body

    def extension(self) -> x509.UnrecognizedExtension:
        """The extension value to add (non-critical) to an AK certificate."""
        return x509.UnrecognizedExtension(AK_BINDING_OID, self.to_der())

    @classmethod
    def from_der(cls, data: bytes) -> AkBinding:
        """Decode; ValueError naming what is wrong for anything but the exact DER above."""
        values: list[bytes] = []
        if len(data) < 2 or data[0] != _DER_SEQUENCE or data[1] != len(data) - 2:
            raise ValueError("AK binding: not one DER SEQUENCE with a short length")
        position = 2
        while position < len(data):
            if position + 2 > len(data) or data[position] != _DER_OCTET_STRING:
                raise ValueError(f"AK binding: byte {position}: expected an OCTET STRING")
            length = data[position + 1]
            if length >= 0x80 or position + 2 + length > len(data):
                raise ValueError(f"AK binding: byte {position}: bad OCTET STRING length")
            values.append(data[position + 2 : position + 2 + length])
            position += 2 + length
        if len(values) != 2:
            raise ValueError(f"AK binding: {len(values)} fields, expected 2")
        return cls(ak_name=values[0], ek_certificate_sha256=values[1])

    @classmethod
    def of(cls, certificate: x509.Certificate) -> AkBinding | None:
        """The binding a certificate carries, None when it has no such extension; a
        malformed one is a ValueError."""
        try:
            extension = certificate.extensions.get_extension_for_oid(AK_BINDING_OID)
        except x509.ExtensionNotFound:
            return None
        value = extension.value
        if not isinstance(value, x509.UnrecognizedExtension):
            raise ValueError("AK binding: the extension did not decode as raw bytes")
        return cls.from_der(value.value)


def fingerprint_sha256(certificate: x509.Certificate) -> str:
    """SHA-256 over the certificate's DER encoding, lowercase hex."""
    return hashlib.sha256(certificate.public_bytes(Encoding.DER)).hexdigest()


def load_pem_certificates(data: str | bytes) -> list[x509.Certificate]:
    """Every certificate in a PEM text; no certificate or a malformed one is an error."""
    try:
        pem_bytes = data.encode("ascii") if isinstance(data, str) else bytes(data)
        certificates = x509.load_pem_x509_certificates(pem_bytes)
    except (ValueError, TypeError) as error:  # UnicodeEncodeError is a ValueError
        raise CertificateChainError(f"not a PEM certificate: {error}") from error
    if not certificates:
        raise CertificateChainError("no certificate in PEM data")
    return certificates


def leaf_public_key_matches(leaf: x509.Certificate, public_key: CertificatePublicKeyTypes) -> bool:
    """Whether the certificate certifies exactly this key (SubjectPublicKeyInfo DER equal)."""
    try:
        certified = leaf.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        given = public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    except (ValueError, TypeError, UnsupportedAlgorithm, AttributeError):
        return False
    return certified == given


def _ak_leaf_key_usage(
    policy: Policy, certificate: x509.Certificate, usage: x509.KeyUsage | None
) -> None:
    # Hand-written: the library's policies can require keyUsage to be present but have no
    # switch for "must assert digitalSignature". Absent keyUsage means unrestricted (RFC 5280).
    if usage is None:
        return
    if not usage.digital_signature:
        raise ValueError("AK certificate keyUsage does not allow digitalSignature")
    # Same rule as the Web PKI end-entity validator this one replaces.
    if usage.key_cert_sign:
        raise ValueError("AK certificate keyUsage must not assert keyCertSign")


def _ak_leaf_extended_key_usage(
    policy: Policy, certificate: x509.Certificate, usage: x509.ExtendedKeyUsage | None
) -> None:
    # Hand-written: the library checks one fixed EKU (TLS client/server auth) and cannot be
    # told to expect the TCG AK purpose instead.
    _require_ak_purpose(usage, "AK certificate extendedKeyUsage ({}) lacks tcg-kp-AIKCertificate")


def _ak_issuer_extended_key_usage(
    accepted: frozenset[x509.ObjectIdentifier],
) -> Callable[[Policy, x509.Certificate, x509.ExtendedKeyUsage | None], None]:
    # Hand-written for the same reason: EKU chaining as the Web PKI does it, but for the AK
    # purpose. A CA whose EKU excludes AK certificates (e.g. a TLS-only CA) may not issue one.
    # Azure's intermediates list 2.23.133.8.1 (EK) and 2.23.133.8.3 (AK); Google's whole
    # "EK/AK CA" hierarchy lists only 2.23.133.8.1 and issues AK certificates all the same,
    # so a gcp chain accepts the EK purpose on its CAs (GCP_ISSUER_KEY_PURPOSES).
    def check(
        policy: Policy, certificate: x509.Certificate, usage: x509.ExtendedKeyUsage | None
    ) -> None:
        _require_ak_purpose(
            usage, "issuing CA extendedKeyUsage ({}) does not allow AK certificates", accepted
        )

    return check


def _require_ak_purpose(
    usage: x509.ExtendedKeyUsage | None,
    refusal: str,
    accepted: frozenset[x509.ObjectIdentifier] = _AK_KEY_PURPOSES,
) -> None:
    """An extendedKeyUsage, when present, includes one of ``accepted`` (the TCG AK purpose or
    anyExtendedKeyUsage by default); else ValueError: ``refusal`` with the listed purposes,
    then the AK purpose's OID."""
    if usage is None:
        return
    if accepted.isdisjoint(usage):
        purposes = ", ".join(oid.dotted_string for oid in usage)
        raise ValueError(f"{refusal.format(purposes)} ({TCG_KP_AIK_CERTIFICATE.dotted_string})")


def ak_ca_extension_policy(
    issuer_key_purposes: frozenset[x509.ObjectIdentifier] = _AK_KEY_PURPOSES,
) -> ExtensionPolicy:
    """Web PKI CA policy (basicConstraints CA, keyCertSign, ...) with the TCG AK purpose.

    Args:
        issuer_key_purposes: the extendedKeyUsage purposes of which a CA must list one, when
            it lists any (default: the AK purpose or anyExtendedKeyUsage).
    """
    return ExtensionPolicy.webpki_defaults_ca().may_be_present(
        x509.ExtendedKeyUsage,
        Criticality.AGNOSTIC,
        _ak_issuer_extended_key_usage(issuer_key_purposes),
    )


def ak_leaf_extension_policy() -> ExtensionPolicy:
    """Web PKI end-entity policy relaxed for TPM AK certificates (see the module docstring).

    Kept from the Web PKI: the leaf is not a CA (basicConstraints), carries no name
    constraints, and any unknown critical extension is refused.
    """
    return (
        ExtensionPolicy.webpki_defaults_ee()
        .may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
        .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _ak_leaf_extended_key_usage)
        .may_be_present(x509.KeyUsage, Criticality.AGNOSTIC, _ak_leaf_key_usage)
        .may_be_present(x509.AuthorityKeyIdentifier, Criticality.NON_CRITICAL, None)
    )


def _normalized_fingerprint(fingerprint: str) -> str:
    normalized = fingerprint.replace(":", "").strip().lower()
    if _SHA256_HEX.fullmatch(normalized) is None:
        raise CertificateChainError(f"pinned root fingerprint is not SHA-256 hex: {fingerprint!r}")
    return normalized


def _is_self_signed(certificate: x509.Certificate) -> bool:
    try:
        # Checks issuer == subject and the signature with the certificate's own key.
        certificate.verify_directly_issued_by(certificate)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _load_one_certificate(pem: str | bytes, position: int) -> x509.Certificate:
    certificates = load_pem_certificates(pem)
    if len(certificates) != 1:
        # One certificate per list entry keeps "entry 0 is the leaf" unambiguous.
        raise CertificateChainError(
            f"chain entry {position} holds {len(certificates)} certificates, expected exactly one"
        )
    return certificates[0]


def _describe(certificate: x509.Certificate) -> str:
    return certificate.subject.rfc4514_string() or "(empty subject)"


def pinned_roots(platform: str) -> tuple[str, ...]:
    """The SHA-256 fingerprints of the roots pinned for ``platform`` (none for local/qemu,
    whose platform CA the caller passes as a trusted root).

    Args:
        platform: a platform kind (``aicert.model.PLATFORM_KINDS``).

    Returns:
        Lowercase hex fingerprints; empty for a platform without pinned roots.
    """
    return PLATFORM_PINNED_ROOTS.get(platform, ())


def issuer_key_purposes(platform: str) -> frozenset[x509.ObjectIdentifier]:
    """The extendedKeyUsage purposes a CA in ``platform``'s AK chains may list (one of).

    Args:
        platform: a platform kind.

    Returns:
        The AK purpose and anyExtendedKeyUsage; for ``gcp`` also the EK purpose, the only one
        Google's vTPM CAs list.
    """
    return _PLATFORM_ISSUER_KEY_PURPOSES.get(platform, _AK_KEY_PURPOSES)


@cache
def shipped_intermediates(platform: str) -> tuple[str, ...]:
    """The public intermediate CA certificates (PEM) the verifier ships for ``platform``.

    GCE's vTPM holds only the AK certificate, not its issuers; these are added to a ``gcp``
    chain as path-building candidates (never trust anchors).

    Args:
        platform: a platform kind.

    Returns:
        One PEM text per certificate; empty for a platform that needs none.
    """
    folder = files("aicert").joinpath("trust_roots")
    return tuple(
        folder.joinpath(name).read_text(encoding="ascii")
        for name in _SHIPPED_INTERMEDIATES.get(platform, ())
    )


def verify_ak_chain(
    chain_pem: Sequence[str | bytes],
    *,
    trusted_roots: Sequence[x509.Certificate] = (),
    pinned_root_fingerprints: Collection[str] = (),
    at_time: datetime,
    issuer_purposes: frozenset[x509.ObjectIdentifier] = _AK_KEY_PURPOSES,
) -> ChainVerification:
    """Verify that the AK certificate ``chain_pem[0]`` chains to a trust anchor at ``at_time``.

    ``chain_pem[1:]`` are intermediates and optionally the root, in any order. Trust anchors
    are ``trusted_roots`` plus the self-signed certificates of ``chain_pem`` whose SHA-256
    fingerprint is in ``pinned_root_fingerprints``; any other self-signed certificate in the
    evidence is not trusted. ``at_time`` must be timezone-aware (ValueError otherwise).
    ``issuer_purposes``: the extendedKeyUsage purposes a CA of the chain may list (one of;
    :func:`issuer_key_purposes` gives a platform's).
    Raises ``CertificateChainError`` naming the leaf and the reason on any failure.
    """
    if at_time.tzinfo is None or at_time.utcoffset() is None:
        raise ValueError("at_time must be timezone-aware")
    if isinstance(chain_pem, (str, bytes)):
        # A bare string is a Sequence too; iterating it would yield characters.
        raise CertificateChainError("chain_pem must be a list of PEM certificates, not one string")
    if not chain_pem:
        raise CertificateChainError("empty AK certificate chain")

    evidence = [_load_one_certificate(pem, position) for position, pem in enumerate(chain_pem)]
    leaf, others = evidence[0], evidence[1:]
    leaf_name = _describe(leaf)

    pinned = {_normalized_fingerprint(fp) for fp in pinned_root_fingerprints}
    anchors: dict[str, x509.Certificate] = {
        fingerprint_sha256(root): root for root in trusted_roots
    }
    for certificate in evidence:
        fingerprint = fingerprint_sha256(certificate)
        if fingerprint in pinned and _is_self_signed(certificate):
            anchors[fingerprint] = certificate
    if not anchors:
        raise CertificateChainError(
            f"AK certificate {leaf_name}: no trust anchor (no trusted root given and no pinned "
            "self-signed root in the evidence chain)"
        )

    verifier = (
        PolicyBuilder()
        .store(Store(list(anchors.values())))
        .time(at_time.astimezone(UTC))
        .extension_policies(
            ca_policy=ak_ca_extension_policy(issuer_purposes),
            ee_policy=ak_leaf_extension_policy(),
        )
        # The client verifier is the one that does not match a DNS/IP subject: an AK
        # certificate names a VM or a TPM, not a host.
        .build_client_verifier()
    )
    try:
        built = tuple(verifier.verify(leaf, others).chain)
    except X509VerificationError as error:
        raise CertificateChainError(
            f"AK certificate {leaf_name} does not chain to a trusted root at "
            f"{at_time.isoformat()}: {error}"
        ) from error

    root = built[-1]
    return ChainVerification(
        leaf=leaf,
        chain=built,
        root_subject=_describe(root),
        root_fingerprint_sha256=fingerprint_sha256(root),
        not_before=max(certificate.not_valid_before_utc for certificate in built),
        not_after=min(certificate.not_valid_after_utc for certificate in built),
    )


def check_ak_binding(
    leaf: x509.Certificate,
    ak: TpmtPublic,
    ek_certificate_pem: str | None,
    *,
    platform: str,
    required: bool,
) -> str:
    """The AK binding extension of the AK certificate ``leaf`` against the certificate's
    ``attestation.ak.public`` (``ak``) and ``attestation.ek.certificate``
    (``ek_certificate_pem``); the check's detail.

    The extension carries the AK's TPM name (nameAlg || hash of the whole TPMT_PUBLIC), so
    it binds every attribute bit of ``ak.public``, not only the key the certificate names;
    and the SHA-256 of the EK certificate the platform CA verified before activation. It is
    ``required`` for the platforms whose AK the project's platform CA certifies (local, qemu:
    ``aicert.verify.PLATFORM_CA_PLATFORMS``) and checked wherever present. Every failure is an
    ``AkMismatchError`` naming the extension: a missing or malformed extension, another name
    (an edited attribute), an EK certificate that is not the one the CA verified, or none
    attached. Azure's and Google's AK
    certificates carry no such extension: there the attributes are the cloud's provisioning,
    and the EK certificate is bound by nothing, so it is neither checked nor shown.
    """
    oid = AK_BINDING_OID.dotted_string
    try:
        binding = AkBinding.of(leaf)
    except ValueError as exc:
        raise AkMismatchError(f"AK certificate: AK binding extension {oid}: {exc}") from None
    if binding is None:
        if required:
            raise AkMismatchError(
                f"{platform} platform: the AK certificate lacks the AK binding extension {oid} "
                "that the platform CA adds at activation: nothing binds the attributes of "
                "attestation.ak.public to the activated AK"
            )
        provider = "Google's" if platform == "gcp" else "Microsoft's"
        return (
            f"the AK's attributes (restricted, fixedTPM, ...) are {provider} provisioning of "
            "the vTPM, not bound by the AK certificate (no AK binding extension); "
            "attestation.ek.certificate is bound by nothing and not checked"
        )
    try:
        name = ak.name()
    except TpmStructureError as exc:
        raise AkMismatchError(f"attestation.ak.public: {exc}") from None
    if not hmac.compare_digest(name, binding.ak_name):
        raise AkMismatchError(
            f"the TPM name of attestation.ak.public ({name.hex()}) is not the one the AK "
            f"binding extension {oid} certifies ({binding.ak_name.hex()}): its attributes "
            "were edited, or it is not the activated AK"
        )
    detail = f"its TPM name (every attribute) is the activated AK's (AK binding extension {oid})"
    if ek_certificate_pem is None:
        # The binding names the EK certificate the CA verified: a certificate without it
        # would verify with another report, so it is refused rather than reported as absent.
        raise AkMismatchError(
            f"attestation.ek.certificate is missing, but the AK binding extension {oid} names "
            f"the EK certificate the platform CA verified "
            f"({binding.ek_certificate_sha256.hex()[:16]}...)"
        )
    try:
        (ek_certificate,) = x509.load_pem_x509_certificates(ek_certificate_pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise AkMismatchError("attestation.ek.certificate: not one PEM certificate") from None
    ek_sha256 = hashlib.sha256(ek_certificate.public_bytes(Encoding.DER)).digest()
    if not hmac.compare_digest(ek_sha256, binding.ek_certificate_sha256):
        raise AkMismatchError(
            f"attestation.ek.certificate (SHA-256 {ek_sha256.hex()[:16]}...) is not the EK "
            f"certificate the platform CA verified, which the AK binding extension {oid} "
            f"names ({binding.ek_certificate_sha256.hex()[:16]}...)"
        )
    return detail + "; the EK certificate is the one the platform CA verified"
