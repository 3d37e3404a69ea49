"""The agent's TLS channel on remote platforms, bound to the attested machine.

At start the agent makes a fresh ECDSA P-256 key and a self-signed certificate, measures
the key into PCR 14 (``ChannelKeyEvent``, the machine's first PCR 14 event) and only then
serves HTTPS with it. The orchestrator pins the certificate it sees on first contact,
certifies the machine's AK, asks a platform quote, and sends the run only when PCR 14 in
that quote is exactly the pinned key's event: a machine-in-the-middle holds another key,
and the attested machine's key never leaves it (it lives in this process's memory and a
0700 temporary folder that uvicorn reads once).
"""

from __future__ import annotations

import datetime
import os
import shutil
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CHANNEL_CERTIFICATE_DAYS = 7


@dataclass(frozen=True)
class ChannelIdentity:
    certificate_pem: bytes
    key_pem: bytes


def new_channel_identity(common_name: str = "aicert-guest-agent") -> ChannelIdentity:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CHANNEL_CERTIFICATE_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return ChannelIdentity(
        certificate_pem=certificate.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


class ChannelFiles:
    """The identity as files for uvicorn (it takes paths only); removed on exit."""

    def __init__(self, identity: ChannelIdentity) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="aicert-channel-"))
        os.chmod(self.folder, 0o700)
        self.certificate = self.folder / "channel.crt"
        self.key = self.folder / "channel.key"
        self.certificate.write_bytes(identity.certificate_pem)
        descriptor = os.open(self.key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(identity.key_pem)

    def __enter__(self) -> ChannelFiles:
        return self

    def __exit__(self, *_: object) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def fetch_server_certificate(url: str, timeout_s: float = 5.0) -> str:
    """The PEM certificate an ``https://host:port`` agent presents (trust on first use: the
    platform quote decides whether it is the attested machine's)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme != "https" or parts.hostname is None:
        raise ValueError(f"not an https agent URL: {url!r}")
    return ssl.get_server_certificate((parts.hostname, parts.port or 443), timeout=timeout_s)


def pinned_context(certificate_pem: str) -> ssl.SSLContext:
    """A client context that accepts exactly this self-signed certificate (no host name:
    the agent is reached through forwarded ports and addresses the certificate cannot name)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=certificate_pem)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
