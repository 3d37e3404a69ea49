"""Completing an Azure AK certificate chain on the orchestrator, so verification stays offline.

Azure runs more than one AK certificate hierarchy at once. The AK certificate in NV
0x01C101D0 is issued on some hosts by "Global Virtual TPM CA - 03" (the leaf has no AIA
extension: the intermediate must be shipped), on others by "Azure Cloud Virtual TPM CA - 11"
-> "Azure Cloud Virtual TPM CA 2025" -> the root, and Confidential VMs have shown "Azure
Cloud Virtual TPM CA - 25"; those intermediates are reachable only through the certificates'
AIA CA-Issuers URLs. A guest image that ships a fixed intermediates file misses hierarchies
that appear later, so the orchestrator (which has network) completes the chain:

1. from the certificate being completed (first the AK leaf), an issuer among the
   certificates already known (what the VM sent, ``SHIPPED_CA_PEMS``, the caller's extras) is
   taken when one signed it;
2. otherwise its AIA CA-Issuers URLs are fetched (http or https: the chain is verified
   against the pinned root afterwards, so the transport adds nothing to trust), with bounded
   depth, bytes per response and total time; a response may be DER, PEM or a PKCS#7
   certs-only bundle, as CAs serve them;
3. the walk stops at a self-signed certificate (the root, which travels with the chain: the
   verifier pins it by fingerprint) or at a root the caller trusts on purpose.

The completed chain (leaf first, root last) goes into the certificate; nothing is trusted
here, ``aicert.chain.verify_ak_chain`` judges it. A chain that cannot be completed is an
error naming the missing issuer (subject DN and authority key identifier), with one type per
cause (``AkChainIncompleteError`` and its subclasses), raised during enrolment: the run stops
before any training. Prefect-free: only httpx and cryptography.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from urllib.parse import urlsplit

import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtensionOID

from aicert.tasks.platforms.azure.errors import AzureEnrollmentError

__all__ = [
    "SHIPPED_CA_PEMS",
    "AiaLimits",
    "AiaLoopError",
    "AiaResponseError",
    "AiaResponseTooLargeError",
    "AiaTimeoutError",
    "AkChainCompleter",
    "AkChainIncompleteError",
    "parse_ca_issuers_response",
    "shipped_ca_pems",
]

# Public certificates shipped with the package (package data), used when a certificate has
# no AIA or its URLs fail: "Global Virtual TPM CA - 03" (no AIA in the leaves it issues) and
# Microsoft's root (pinned by fingerprint in aicert.chain; it must travel in the evidence).
SHIPPED_CA_FILES = ("global-virtual-tpm-ca-03.pem", "azure-virtual-tpm-root-ca-2023.pem")
_ALLOWED_SCHEMES = frozenset({"http", "https"})
_MAX_REDIRECTS = 3


class AkChainIncompleteError(AzureEnrollmentError):
    """No issuer could be found for a certificate of the AK chain (neither known nor reachable
    through AIA); the message names the missing issuer's subject DN and key identifier."""


class AiaLoopError(AkChainIncompleteError):
    """The AIA walk came back to a URL or a certificate it had already visited."""


class AiaResponseTooLargeError(AkChainIncompleteError):
    """An AIA response was larger than ``AiaLimits.max_response_bytes``."""


class AiaTimeoutError(AkChainIncompleteError):
    """An AIA download did not finish within the time left of ``AiaLimits.total_timeout_s``."""


class AiaResponseError(AkChainIncompleteError):
    """An AIA URL answered with an error, or with something that is not a certificate."""


@dataclass(frozen=True)
class AiaLimits:
    """Bounds on the AIA walk: a hostile or broken URL costs at most this much."""

    max_depth: int = 4  # certificates fetched through AIA per chain (Azure's longest: 2-3)
    max_response_bytes: int = 64 * 1024  # a certificate is ~2 KB; a PKCS#7 bundle a few
    total_timeout_s: float = 20.0  # every download of one completion together
    connect_timeout_s: float = 5.0


def shipped_ca_pems() -> tuple[str, ...]:
    """The CA certificates shipped with the package (``SHIPPED_CA_FILES``), as PEM texts."""
    folder = resources.files("aicert.tasks.platforms.azure").joinpath("cas")
    return tuple(folder.joinpath(name).read_text(encoding="ascii") for name in SHIPPED_CA_FILES)


SHIPPED_CA_PEMS = shipped_ca_pems()


def parse_ca_issuers_response(body: bytes, url: str) -> list[x509.Certificate]:
    """The certificates of an AIA CA-Issuers response: one DER certificate, PEM
    certificates, or a PKCS#7 certs-only bundle (DER or PEM).

    Raises:
        AiaResponseError: the body is none of these, or holds no certificate.
    """
    stripped = body.strip()
    loaders: tuple[Callable[[bytes], Sequence[x509.Certificate]], ...]
    if stripped.startswith(b"-----BEGIN"):
        loaders = (x509.load_pem_x509_certificates, pkcs7.load_pem_pkcs7_certificates)
    else:
        stripped = body
        loaders = (_load_one_der, pkcs7.load_der_pkcs7_certificates)
    for loader in loaders:
        try:
            certificates = loader(stripped)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            continue
        if certificates:
            return list(certificates)
    raise AiaResponseError(
        f"AIA CA-Issuers {url}: the response ({len(body)} bytes, starting "
        f"{body[:16]!r}) is not a DER, PEM or PKCS#7 certificate"
    )


def _describe_issuer(certificate: x509.Certificate) -> str:
    """The issuer a certificate names: subject DN and, when present, key identifier."""
    text = f"issuer {certificate.issuer.rfc4514_string() or '(empty DN)'}"
    try:
        aki = certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        return text + " (no authority key identifier)"
    if aki.key_identifier is not None:
        text += f" (authority key identifier {aki.key_identifier.hex(':').upper()})"
    return text


def _issued_by(certificate: x509.Certificate, candidate: x509.Certificate) -> bool:
    try:
        # Checks that candidate's subject is the issuer name and that its key signed it.
        certificate.verify_directly_issued_by(candidate)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _ca_issuers_urls(certificate: x509.Certificate) -> list[str]:
    try:
        aia = certificate.extensions.get_extension_for_oid(
            ExtensionOID.AUTHORITY_INFORMATION_ACCESS
        ).value
    except x509.ExtensionNotFound:
        return []
    return [
        description.access_location.value
        for description in aia
        if description.access_method == AuthorityInformationAccessOID.CA_ISSUERS
        and isinstance(description.access_location, x509.UniformResourceIdentifier)
    ]


def _load_one_der(data: bytes) -> list[x509.Certificate]:
    return [x509.load_der_x509_certificate(data)]


def _fingerprint(certificate: x509.Certificate) -> bytes:
    return certificate.fingerprint(SHA256())


@dataclass
class _Walk:
    """The state of one completion: the deadline, what was fetched, why fetches failed."""

    deadline: float
    fetched: int = 0
    visited_urls: set[str] = field(default_factory=set)
    failures: list[AkChainIncompleteError] = field(default_factory=list)


class AkChainCompleter:
    """Completes AK certificate chains by known certificates first, then AIA (see the module
    docstring). One instance may complete many chains; it holds no connection between them."""

    def __init__(
        self,
        *,
        known_ca_pems: Sequence[str] = SHIPPED_CA_PEMS,
        trusted_root_pems: Sequence[str] = (),
        limits: AiaLimits = AiaLimits(),
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """Args:
        known_ca_pems: CA certificates to use before any download (the shipped ones).
        trusted_root_pems: roots trusted on purpose (tests): the walk may end at one.
        limits: the AIA walk's bounds.
        transport: an httpx transport (None: httpx's own, with the system's proxies).
        """
        self.known = [cert for pem in known_ca_pems for cert in _load_pems(pem)]
        self.trusted_roots = [cert for pem in trusted_root_pems for cert in _load_pems(pem)]
        self.limits = limits
        self._transport = transport

    def complete(self, chain_pem: Sequence[str]) -> list[str]:
        """The chain from ``chain_pem[0]`` (the AK certificate) to a root, as PEM texts.

        ``chain_pem[1:]`` (what the VM sent) are used first, in any order, then the known CAs,
        then AIA. The result holds each certificate of the path once, leaf first, root last.

        Raises:
            AkChainIncompleteError: an issuer could not be found; a subclass says why the AIA
                download that should have found it failed (loop, too large, too slow, not a
                certificate).
        """
        if not chain_pem:
            raise AkChainIncompleteError("the VM sent no AK certificate")
        sent = [cert for pem in chain_pem for cert in _load_pems(pem)]
        path = [sent[0]]
        pool = [*sent[1:], *self.known, *self.trusted_roots]
        walk = _Walk(deadline=time.monotonic() + self.limits.total_timeout_s)
        with httpx.Client(
            transport=self._transport, follow_redirects=True, max_redirects=_MAX_REDIRECTS
        ) as client:
            while not self._ends_path(path[-1]):
                path.append(self._issuer_of(path, pool, walk, client))
        return [cert.public_bytes(Encoding.PEM).decode("ascii") for cert in path]

    def _ends_path(self, certificate: x509.Certificate) -> bool:
        """A self-signed certificate, or a root trusted on purpose, ends the path."""
        return _issued_by(certificate, certificate) or any(
            _fingerprint(certificate) == _fingerprint(root) for root in self.trusted_roots
        )

    def _issuer_of(
        self,
        path: list[x509.Certificate],
        pool: list[x509.Certificate],
        walk: _Walk,
        client: httpx.Client,
    ) -> x509.Certificate:
        current = path[-1]
        for candidate in pool:
            if _issued_by(current, candidate):
                return self._not_in_path(candidate, path, "a known certificate")
        for url in _ca_issuers_urls(current):
            try:
                fetched = self._fetch(url, walk, client)
            except AkChainIncompleteError as failure:
                walk.failures.append(failure)
                continue
            pool.extend(fetched)
            for candidate in fetched:
                if _issued_by(current, candidate):
                    return self._not_in_path(candidate, path, f"AIA {url}")
        missing = _describe_issuer(current)
        subject = current.subject.rfc4514_string() or "(empty subject)"
        if walk.failures:
            # The most specific cause: the download that should have found the issuer.
            last = walk.failures[-1]
            raise type(last)(f"AK chain incomplete: no {missing} of {subject}: {last}")
        urls = _ca_issuers_urls(current)
        where = f"AIA CA-Issuers {', '.join(urls)} served no issuer" if urls else "no AIA"
        raise AkChainIncompleteError(
            f"AK chain incomplete: no {missing} of {subject} among the VM's chain and the "
            f"shipped intermediates, and {where}"
        )

    @staticmethod
    def _not_in_path(
        candidate: x509.Certificate, path: list[x509.Certificate], source: str
    ) -> x509.Certificate:
        # Cross-signed pairs could otherwise send the walk round forever.
        if any(_fingerprint(candidate) == _fingerprint(seen) for seen in path):
            raise AiaLoopError(
                f"AK chain: {source} gives {candidate.subject.rfc4514_string()}, which is "
                "already in the chain (a loop)"
            )
        return candidate

    def _fetch(self, url: str, walk: _Walk, client: httpx.Client) -> list[x509.Certificate]:
        """Download and parse one CA-Issuers URL within the walk's bounds."""
        if url in walk.visited_urls:
            raise AiaLoopError(f"AIA CA-Issuers {url} was already fetched in this chain (a loop)")
        walk.visited_urls.add(url)
        if walk.fetched >= self.limits.max_depth:
            raise AkChainIncompleteError(
                f"AIA CA-Issuers {url}: over {self.limits.max_depth} downloads for one chain"
            )
        if urlsplit(url).scheme.lower() not in _ALLOWED_SCHEMES:
            raise AiaResponseError(f"AIA CA-Issuers {url}: only http and https are fetched")
        walk.fetched += 1
        body = self._download(url, walk.deadline, client)
        return parse_ca_issuers_response(body, url)

    def _download(self, url: str, deadline: float, client: httpx.Client) -> bytes:
        limit = self.limits.max_response_bytes
        left = deadline - time.monotonic()
        if left <= 0:
            raise AiaTimeoutError(f"AIA CA-Issuers {url}: no time left of the AIA budget")
        timeout = httpx.Timeout(left, connect=min(left, self.limits.connect_timeout_s))
        received = bytearray()
        try:
            # Identity encoding: the byte limit then bounds what is parsed, not a gzip bomb.
            with client.stream(
                "GET", url, timeout=timeout, headers={"Accept-Encoding": "identity"}
            ) as response:
                if response.status_code != httpx.codes.OK:
                    raise AiaResponseError(f"AIA CA-Issuers {url}: HTTP {response.status_code}")
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > limit:
                    raise AiaResponseTooLargeError(
                        f"AIA CA-Issuers {url}: {declared} bytes, over {limit}"
                    )
                for chunk in response.iter_raw():
                    received += chunk
                    if len(received) > limit:
                        raise AiaResponseTooLargeError(f"AIA CA-Issuers {url}: over {limit} bytes")
                    # A server dripping bytes keeps every read under the read timeout.
                    if time.monotonic() > deadline:
                        raise AiaTimeoutError(
                            f"AIA CA-Issuers {url}: slower than the "
                            f"{self.limits.total_timeout_s:.0f} s AIA budget"
                        )
        except httpx.TimeoutException as exc:
            raise AiaTimeoutError(
                f"AIA CA-Issuers {url}: timed out ({self.limits.total_timeout_s:.0f} s AIA "
                f"budget): {exc!r}"
            ) from exc
        except httpx.HTTPError as exc:
            raise AiaResponseError(f"AIA CA-Issuers {url}: {exc!r}") from exc
        return bytes(received)


def _load_pems(pem: str) -> Iterable[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise AkChainIncompleteError(f"AK chain: not a PEM certificate: {exc}") from exc
