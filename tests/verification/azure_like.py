"""Generate certificates shaped like Azure vTPM AK chains (and a local platform CA's).

Field by field after the public certificates in tests/data/trust-roots (root and intermediates)
and the public descriptions of Azure AK certificates (leaf): the leaf's subject is the VM id,
its EKU tcg-kp-AIKCertificate, keyUsage digitalSignature (critical), and it expires about 18
months after issue. The real CA-03 has an AIA pointing at the *root*; the AK leaf has none,
which is why verifiers must be given the intermediate.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import AuthorityInformationAccessOID, NameOID

TCG_KP_EK_CERTIFICATE = x509.ObjectIdentifier("2.23.133.8.1")
TCG_KP_AIK_CERTIFICATE = x509.ObjectIdentifier("2.23.133.8.3")
TCG_AT_TPM_MANUFACTURER = x509.ObjectIdentifier("2.23.133.2.1")
TCG_AT_TPM_MODEL = x509.ObjectIdentifier("2.23.133.2.2")
TCG_AT_TPM_VERSION = x509.ObjectIdentifier("2.23.133.2.3")

AZURE_ROOT_NAME = x509.Name(
    [
        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Microsoft Corporation"),
        x509.NameAttribute(
            NameOID.COMMON_NAME, "Azure Virtual TPM Root Certificate Authority 2023"
        ),
    ]
)
AK_VALIDITY = timedelta(days=548)  # about 18 months, as Azure issues them

_ROOT_CRL_URL = (
    "http://www.microsoft.com/pkiops/crl/"
    "Azure%20Virtual%20TPM%20Root%20Certificate%20Authority%202023.crl"
)
_ROOT_CERT_URL = (
    "http://www.microsoft.com/pkiops/certs/"
    "Azure%20Virtual%20TPM%20Root%20Certificate%20Authority%202023.crt"
)

KEY_USAGE_FLAGS = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
    "encipher_only",
    "decipher_only",
)


@dataclass(frozen=True)
class Issued:
    """A certificate and the private key of the key it certifies."""

    certificate: x509.Certificate
    private_key: CertificateIssuerPrivateKeyTypes

    @property
    def pem(self) -> str:
        return self.certificate.public_bytes(Encoding.PEM).decode("ascii")


def key_usage(*flags: str) -> x509.KeyUsage:
    """A KeyUsage asserting exactly the named flags (e.g. ``key_usage("digital_signature")``)."""
    unknown = set(flags) - set(KEY_USAGE_FLAGS)
    if unknown:
        raise ValueError(f"unknown key usage flags: {sorted(unknown)}")
    return x509.KeyUsage(**{flag: flag in flags for flag in KEY_USAGE_FLAGS})


def rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def _ski(key: CertificateIssuerPrivateKeyTypes) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(key.public_key())


def _aki(issuer: Issued) -> x509.AuthorityKeyIdentifier:
    return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.private_key.public_key())


def _serial() -> int:
    # Positive, at most 20 octets (RFC 5280), like the CAs' random serials.
    return x509.random_serial_number()


def self_signed_ca(
    name: x509.Name,
    *,
    not_before: datetime,
    not_after: datetime,
    key: CertificateIssuerPrivateKeyTypes | None = None,
    hash_algorithm: hashes.HashAlgorithm | None = None,
) -> Issued:
    """A root shaped like the Azure vTPM root: CA, keyUsage digitalSignature+certSign+cRLSign."""
    private_key = key if key is not None else rsa_key(4096)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(key_usage("digital_signature", "key_cert_sign", "crl_sign"), critical=True)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_ski(private_key), critical=False)
        .sign(private_key, hash_algorithm or hashes.SHA384())
    )
    return Issued(certificate, private_key)


def azure_like_root(*, not_before: datetime, not_after: datetime) -> Issued:
    return self_signed_ca(AZURE_ROOT_NAME, not_before=not_before, not_after=not_after)


def azure_like_intermediate(
    issuer: Issued,
    *,
    common_name: str = "Global Virtual TPM CA - 03",
    not_before: datetime,
    not_after: datetime,
    path_length: int | None = 0,
    extended_key_usage: list[x509.ObjectIdentifier] | None = None,
) -> Issued:
    """An intermediate with the real CA-03's extensions (pathlen 0, certSign, TCG EKUs)."""
    private_key = rsa_key(2048)
    purposes = (
        extended_key_usage
        if extended_key_usage is not None
        else [TCG_KP_EK_CERTIFICATE, TCG_KP_AIK_CERTIFICATE]
    )
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(issuer.certificate.subject)
        .public_key(private_key.public_key())
        .serial_number(_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(key_usage("key_cert_sign"), critical=True)
        .add_extension(x509.ExtendedKeyUsage(purposes), critical=False)
        .add_extension(_ski(private_key), critical=False)
        .add_extension(_aki(issuer), critical=False)
        .add_extension(
            x509.CRLDistributionPoints(
                [
                    x509.DistributionPoint(
                        full_name=[x509.UniformResourceIdentifier(_ROOT_CRL_URL)],
                        relative_name=None,
                        reasons=None,
                        crl_issuer=None,
                    )
                ]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityInformationAccess(
                [
                    x509.AccessDescription(
                        AuthorityInformationAccessOID.CA_ISSUERS,
                        x509.UniformResourceIdentifier(_ROOT_CERT_URL),
                    )
                ]
            ),
            critical=False,
        )
        .sign(issuer.private_key, hashes.SHA384())
    )
    return Issued(certificate, private_key)


def tpm_directory_name_san() -> x509.SubjectAlternativeName:
    """The TCG form of a TPM's identity: one directoryName with manufacturer, model, version."""
    return x509.SubjectAlternativeName(
        [
            x509.DirectoryName(
                x509.Name(
                    [
                        x509.RelativeDistinguishedName(
                            [
                                x509.NameAttribute(TCG_AT_TPM_MANUFACTURER, "id:4D534654"),
                                x509.NameAttribute(TCG_AT_TPM_MODEL, "Virtual TPM"),
                                x509.NameAttribute(TCG_AT_TPM_VERSION, "id:00020018"),
                            ]
                        )
                    ]
                )
            )
        ]
    )


AK_KEY_USAGE = key_usage("digital_signature")


@dataclass(frozen=True)
class LeafShape:
    """What to put in an AK leaf; the defaults are Azure's."""

    vm_id: str = "f1d2c3b4-a5e6-4f70-8192-a3b4c5d6e7f8"
    key_usage: x509.KeyUsage | None = AK_KEY_USAGE
    extended_key_usage: tuple[x509.ObjectIdentifier, ...] | None = (TCG_KP_AIK_CERTIFICATE,)
    san: x509.SubjectAlternativeName | None = None
    san_critical: bool = False
    basic_constraints: x509.BasicConstraints | None = None
    authority_key_identifier: bool = True
    empty_subject: bool = False


def ak_leaf(
    issuer: Issued,
    *,
    not_before: datetime,
    validity: timedelta = AK_VALIDITY,
    shape: LeafShape = LeafShape(),
    ak_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | None = None,
    signing_key: CertificateIssuerPrivateKeyTypes | None = None,
) -> Issued:
    """An AK certificate issued by ``issuer`` (signed by ``signing_key`` to forge one)."""
    private_key = ak_key if ak_key is not None else rsa_key(2048)
    subject = (
        x509.Name([])
        if shape.empty_subject
        else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, shape.vm_id)])
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.certificate.subject)
        .public_key(private_key.public_key())
        .serial_number(_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_before + validity)
        .add_extension(_ski(private_key), critical=False)
    )
    if shape.key_usage is not None:
        builder = builder.add_extension(shape.key_usage, critical=True)
    if shape.extended_key_usage is not None:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage(list(shape.extended_key_usage)), critical=False
        )
    if shape.san is not None:
        builder = builder.add_extension(shape.san, critical=shape.san_critical)
    if shape.basic_constraints is not None:
        builder = builder.add_extension(shape.basic_constraints, critical=True)
    if shape.authority_key_identifier:
        builder = builder.add_extension(_aki(issuer), critical=False)
    signer = signing_key if signing_key is not None else issuer.private_key
    return Issued(builder.sign(signer, hashes.SHA256()), private_key)


def new_vm_id() -> str:
    return str(uuid.uuid4())
