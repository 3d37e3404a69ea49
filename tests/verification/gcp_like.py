"""Generate certificates shaped like Google Compute Engine vTPM AK chains.

Field by field after Google's public CA certificates in tests/data/trust-roots (``EK/AK CA
Root`` -> ``EK/AK CA Intermediate``) and a real GCE AK certificate
(tests/data/gcp/gce-ak-certificate.pem): the leaf's subject is ``L=<zone>, O=Google Compute
Engine, OU=<project id>, CN=<instance id>``, keyUsage digitalSignature (critical),
basicConstraints CA:FALSE (critical), no extendedKeyUsage, an AIA pointing at the
intermediate, Google's instance-identity extension 1.3.6.1.4.1.11129.2.1.21 (non-critical),
and 30 years of validity. The CAs list only the EK purpose (2.23.133.8.1), as Google's do.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import AuthorityInformationAccessOID, NameOID

from tests.verification.azure_like import TCG_KP_EK_CERTIFICATE, Issued, key_usage, rsa_key

GCE_INSTANCE_INFO_OID = x509.ObjectIdentifier("1.3.6.1.4.1.11129.2.1.21")
AK_VALIDITY = timedelta(days=365 * 30)
# DER of a short SEQUENCE { UTF8String zone, INTEGER project number, UTF8String project id }:
# the start of what Google's extension carries; the verifier only has to tolerate it.
_INSTANCE_INFO = (
    bytes.fromhex("3018") + b"\x0c\x0dus-central1-a" + bytes.fromhex("020101") + (b"\x0c\x02pj")
)


def _google_name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "California"),
            x509.NameAttribute(NameOID.LOCALITY_NAME, "Mountain View"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Google LLC"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Google Cloud"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _aia(url: str) -> x509.AuthorityInformationAccess:
    return x509.AuthorityInformationAccess(
        [
            x509.AccessDescription(
                AuthorityInformationAccessOID.CA_ISSUERS, x509.UniformResourceIdentifier(url)
            )
        ]
    )


def _ca(name: x509.Name, issuer: Issued | None, not_before: datetime) -> Issued:
    private_key = rsa_key(2048)
    signer = issuer.private_key if issuer is not None else private_key
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.certificate.subject if issuer is not None else name)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + timedelta(days=365 * 100))
        .add_extension(key_usage("key_cert_sign", "crl_sign"), critical=True)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        # Google's CAs list only the EK purpose, though they issue AK certificates too.
        .add_extension(x509.ExtendedKeyUsage([TCG_KP_EK_CERTIFICATE]), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(private_key.public_key()), critical=False
        )
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.private_key.public_key()),
            critical=False,
        ).add_extension(_aia("http://privateca-content.example/root/ca.crt"), critical=False)
    return Issued(builder.sign(signer, hashes.SHA256()), private_key)


@dataclass(frozen=True)
class GoogleLikeCa:
    """A root and an intermediate named and shaped like Google's EK/AK CA."""

    root: Issued
    intermediate: Issued

    @classmethod
    def create(cls, not_before: datetime) -> GoogleLikeCa:
        root = _ca(_google_name("EK/AK CA Root"), None, not_before)
        return cls(root, _ca(_google_name("EK/AK CA Intermediate"), root, not_before))

    def ak_certificate(
        self,
        ak_public_key: CertificatePublicKeyTypes,
        *,
        not_before: datetime,
        instance_id: str = "6524697943022743941",
        zone: str = "us-central1-a",
        project: str = "aicert-tests",
    ) -> x509.Certificate:
        """The AK certificate GCE would put in NV 0x01c10000 for ``ak_public_key``."""
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.LOCALITY_NAME, zone),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Google Compute Engine"),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, project),
                x509.NameAttribute(NameOID.COMMON_NAME, instance_id),
            ]
        )
        issuer = self.intermediate
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer.certificate.subject)
            .public_key(ak_public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_before + AK_VALIDITY)
            .add_extension(key_usage("digital_signature"), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ak_public_key), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.private_key.public_key()),
                critical=False,
            )
            .add_extension(_aia("http://privateca-content.example/int/ca.crt"), critical=False)
            .add_extension(
                x509.UnrecognizedExtension(GCE_INSTANCE_INFO_OID, _INSTANCE_INFO), critical=False
            )
            .sign(issuer.private_key, hashes.SHA256())
        )
