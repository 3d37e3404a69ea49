"""Azure's live AK certificate hierarchies, generated, and an http server for their AIA URLs.

Shapes as reported from real Azure VMs in 2026 (issue 17; the real CA-03 and root are in
``tests/data/trust-roots``, with their provenance):

- ``ca03``: leaf (no AIA) -> "Global Virtual TPM CA - 03" (AIA: the root's URL) -> root. The
  intermediate must be shipped: nothing in the leaf says where to fetch it.
- ``ca11``: leaf (AIA: CA-11's URL) -> "Azure Cloud Virtual TPM CA - 11" (AIA: CA 2025's
  URL) -> "Azure Cloud Virtual TPM CA 2025" (AIA: the root's URL) -> root.
- ``ca25``: as ``ca11`` with "Azure Cloud Virtual TPM CA - 25" (seen on Confidential VMs).

Names, extensions and key types follow the real CA-03 and root (RSA 2048 intermediates,
RSA 4096 root, SHA-384 signatures, the TCG EK and AK key purposes); no public copy of the
CA-11 / CA 2025 / CA-25 certificates was available, so they are given CA-03's shape. The URLs
are the Microsoft ``pkiops/certs`` paths, on the test's own http server (``AiaServer``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import AuthorityInformationAccessOID, NameOID

from tests.verification.azure_like import (
    AK_VALIDITY,
    TCG_KP_AIK_CERTIFICATE,
    TCG_KP_EK_CERTIFICATE,
    Issued,
    azure_like_root,
    key_usage,
    rsa_key,
)

CA03 = "Global Virtual TPM CA - 03"
CA11 = "Azure Cloud Virtual TPM CA - 11"
CA25 = "Azure Cloud Virtual TPM CA - 25"
CA2025 = "Azure Cloud Virtual TPM CA 2025"
ROOT = "Azure Virtual TPM Root Certificate Authority 2023"
CERTS_PATH = "/pkiops/certs/"

# What a route answers: the body, and how (see AiaServer.serve).
Responder = Callable[[BaseHTTPRequestHandler], None]


def cert_path(common_name: str) -> str:
    """The path Microsoft publishes a CA certificate at (``.crt``, DER)."""
    return CERTS_PATH + quote(common_name) + ".crt"


class AiaServer:
    """A local http server answering AIA CA-Issuers requests from ``routes`` (path ->
    responder); every request path is recorded in ``requests``."""

    def __init__(self) -> None:
        self.routes: dict[str, Responder] = {}
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                responder = server.routes.get(self.path)
                if responder is None:
                    self.send_error(404)
                    return
                responder(self)

            def log_message(self, format: str, *args: object) -> None:
                return  # keep pytest's output clean

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def url(self, common_name: str) -> str:
        return self.base_url + cert_path(common_name)

    def serve(self, path: str, body: bytes, *, content_type: str = "application/pkix-cert") -> None:
        """Answer ``path`` with ``body`` (200)."""

        def respond(handler: BaseHTTPRequestHandler) -> None:
            handler.send_response(200)
            handler.send_header("Content-Type", content_type)
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)

        self.routes[path] = respond

    def serve_dripping(self, path: str, body: bytes, *, every_s: float) -> None:
        """Answer ``path`` with ``body`` one byte every ``every_s`` seconds, no length given:
        each read is quick, the whole is slow."""

        def respond(handler: BaseHTTPRequestHandler) -> None:
            handler.send_response(200)
            handler.end_headers()
            try:
                for byte in body:
                    handler.wfile.write(bytes([byte]))
                    handler.wfile.flush()
                    time.sleep(every_s)
            except OSError:
                return  # the client gave up, as it should

        self.routes[path] = respond

    def serve_endless(self, path: str) -> None:
        """Answer ``path`` with bytes that never end and no length."""

        def respond(handler: BaseHTTPRequestHandler) -> None:
            handler.send_response(200)
            handler.end_headers()
            try:
                while True:
                    handler.wfile.write(b"\x30" * 4096)
            except OSError:
                return

        self.routes[path] = respond

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@contextmanager
def aia_server() -> Iterator[AiaServer]:
    server = AiaServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _aia(url: str) -> x509.AuthorityInformationAccess:
    return x509.AuthorityInformationAccess(
        [
            x509.AccessDescription(
                AuthorityInformationAccessOID.CA_ISSUERS, x509.UniformResourceIdentifier(url)
            )
        ]
    )


def _issue(
    issuer: Issued,
    common_name: str,
    public_key: PublicKeyTypes,
    *,
    validity: tuple[datetime, datetime],
    extensions: list[tuple[x509.ExtensionType, bool]],
    aia_url: str | None,
    hash_algorithm: hashes.HashAlgorithm,
) -> x509.Certificate:
    """A certificate for ``public_key`` signed by ``issuer``, with SKI, AKI, ``extensions``
    (value, critical) and a CA-Issuers AIA pointing at ``aia_url`` when given."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(issuer.certificate.subject)
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(public_key),  # type: ignore[arg-type]
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(
                issuer.private_key.public_key()  # type: ignore[arg-type]
            ),
            critical=False,
        )
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    if aia_url is not None:
        builder = builder.add_extension(_aia(aia_url), critical=False)
    return builder.sign(issuer.private_key, hash_algorithm)  # type: ignore[arg-type]


def intermediate(
    issuer: Issued,
    common_name: str,
    *,
    aia_url: str | None,
    now: datetime,
    private_key: RSAPrivateKey | None = None,
) -> Issued:
    """A CA shaped like the real CA-03: RSA 2048, pathlen 0, certSign, TCG EK+AK purposes,
    SKI/AKI, signed SHA-384, and a CA-Issuers AIA pointing at its issuer when given
    (``private_key``: the CA's key, to certify one key twice, as cross-signing does)."""
    private_key = private_key or rsa_key(2048)
    # CA 2025 issues CA-11 / CA-25: it may not be pathlen 0.
    path_length = None if common_name == CA2025 else 0
    certificate = _issue(
        issuer,
        common_name,
        private_key.public_key(),
        validity=(now - timedelta(days=200), now + timedelta(days=500)),
        extensions=[
            (x509.BasicConstraints(ca=True, path_length=path_length), True),
            (key_usage("key_cert_sign"), True),
            (x509.ExtendedKeyUsage([TCG_KP_EK_CERTIFICATE, TCG_KP_AIK_CERTIFICATE]), False),
        ],
        aia_url=aia_url,
        hash_algorithm=hashes.SHA384(),
    )
    return Issued(certificate, private_key)


def ak_certificate(
    issuer: Issued, ak_key: PublicKeyTypes, *, aia_url: str | None, now: datetime
) -> x509.Certificate:
    """An AK leaf shaped like Azure's (VM id subject, digitalSignature, tcg-kp-AIKCertificate,
    about 18 months), with a CA-Issuers AIA when given (the CA-11 / CA-25 hierarchies)."""
    return _issue(
        issuer,
        "f1d2c3b4-a5e6-4f70-8192-a3b4c5d6e7f8",
        ak_key,
        validity=(now - timedelta(days=1), now - timedelta(days=1) + AK_VALIDITY),
        extensions=[
            (key_usage("digital_signature"), True),
            (x509.ExtendedKeyUsage([TCG_KP_AIK_CERTIFICATE]), False),
        ],
        aia_url=aia_url,
        hash_algorithm=hashes.SHA256(),
    )


def pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(Encoding.PEM).decode("ascii")


def der(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(Encoding.DER)


@dataclass
class Hierarchy:
    """One generated hierarchy: the leaf first, then its issuers up to the root."""

    name: str
    root: Issued
    cas: list[Issued]  # issuing CA first, the root's child last
    leaf: x509.Certificate
    ak_key: RSAPrivateKey
    published: dict[str, bytes] = field(default_factory=dict)  # path -> DER, what AIA serves

    @property
    def chain(self) -> list[x509.Certificate]:
        return [self.leaf, *(ca.certificate for ca in self.cas), self.root.certificate]

    def publish(self, server: AiaServer) -> None:
        """Serve every certificate of the hierarchy at its AIA path on ``server``."""
        for path, body in self.published.items():
            server.serve(path, body)


def hierarchy(name: str, server: AiaServer, now: datetime | None = None) -> Hierarchy:
    """The ``ca03``, ``ca11`` or ``ca25`` hierarchy (module docstring), AIA URLs on
    ``server`` (not yet published there: ``Hierarchy.publish``)."""
    now = now or datetime.now(UTC)
    root = azure_like_root(
        not_before=now - timedelta(days=900), not_after=now + timedelta(days=8000)
    )
    ak_key = rsa_key(2048)
    published = {cert_path(ROOT): der(root.certificate)}
    if name == "ca03":
        ca = intermediate(root, CA03, aia_url=server.url(ROOT), now=now)
        leaf = ak_certificate(ca, ak_key.public_key(), aia_url=None, now=now)
        published[cert_path(CA03)] = der(ca.certificate)
        return Hierarchy(name, root, [ca], leaf, ak_key, published)
    issuing_name = {"ca11": CA11, "ca25": CA25}[name]
    ca2025 = intermediate(root, CA2025, aia_url=server.url(ROOT), now=now)
    issuing = intermediate(ca2025, issuing_name, aia_url=server.url(CA2025), now=now)
    leaf = ak_certificate(issuing, ak_key.public_key(), aia_url=server.url(issuing_name), now=now)
    published[cert_path(CA2025)] = der(ca2025.certificate)
    published[cert_path(issuing_name)] = der(issuing.certificate)
    return Hierarchy(name, root, [issuing, ca2025], leaf, ak_key, published)


@dataclass(frozen=True)
class AiaChain:
    """What a VM of an AIA hierarchy holds: its AK certificate, and an image that ships only
    the root (the intermediates are fetched through AIA by the orchestrator)."""

    root: Issued
    leaf: x509.Certificate

    @property
    def leaf_der(self) -> bytes:
        return der(self.leaf)

    @property
    def leaf_pem(self) -> str:
        return pem(self.leaf)

    @property
    def image_pem_bundle(self) -> str:
        return self.root.pem


@dataclass
class AiaCa:
    """The CA-11 (or CA-25) hierarchy issuing every "VM"'s AK certificate, its intermediates
    published on ``server`` at the AIA URLs (a stand-in for ``guest.AzureLikeCa``)."""

    server: AiaServer
    name: str = "ca11"
    root: Issued = field(init=False)
    issuing: Issued = field(init=False)

    def __post_init__(self) -> None:
        built = hierarchy(self.name, self.server)
        built.publish(self.server)
        self.root, self.issuing = built.root, built.cas[0]

    def issue(self, ak_public: PublicKeyTypes, now: datetime | None = None) -> AiaChain:
        issuing_name = self.issuing.certificate.subject.rfc4514_string().removeprefix("CN=")
        leaf = ak_certificate(
            self.issuing,
            ak_public,
            aia_url=self.server.url(issuing_name),
            now=now or datetime.now(UTC),
        )
        return AiaChain(root=self.root, leaf=leaf)
