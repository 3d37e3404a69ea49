"""AK chain completion (``aicert.tasks.platforms.azure.ak_chain``) against a real http server.

Each of Azure's live hierarchies (CA-03 shipped, CA-11 and CA-25 through AIA), generated with
the real certificates' shape, is completed from the leaf alone and then verifies with the
verifier's chain check. Each way the completion can fail is shown by a chain or a server that
fails in exactly that way, with its own error naming the missing issuer.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7

from aicert.chain import (
    PINNED_ROOT_FINGERPRINTS,
    fingerprint_sha256,
    leaf_public_key_matches,
    verify_ak_chain,
)
from aicert.tasks.platforms.azure import AzureEnrollmentError
from aicert.tasks.platforms.azure.ak_chain import (
    SHIPPED_CA_PEMS,
    AiaLimits,
    AiaLoopError,
    AiaResponseError,
    AiaResponseTooLargeError,
    AiaTimeoutError,
    AkChainCompleter,
    AkChainIncompleteError,
    parse_ca_issuers_response,
)
from tests.data import TRUST_ROOTS
from tests.tasks.platforms.azure.hierarchies import (
    CA03,
    CA11,
    CA2025,
    ROOT,
    AiaServer,
    Hierarchy,
    aia_server,
    ak_certificate,
    cert_path,
    der,
    hierarchy,
    intermediate,
    pem,
)
from tests.verification.azure_like import azure_like_root, rsa_key

FAST = AiaLimits(total_timeout_s=2.0, connect_timeout_s=1.0)


@pytest.fixture
def server() -> Iterator[AiaServer]:
    with aia_server() as running:
        yield running


def _verifies(completed: list[str], built: Hierarchy) -> None:
    """The completed chain is the hierarchy's, leaf to root, and the verifier accepts it."""
    assert [x509.load_pem_x509_certificate(text.encode()) for text in completed] == built.chain
    verified = verify_ak_chain(
        completed, trusted_roots=[built.root.certificate], at_time=datetime.now(UTC)
    )
    assert leaf_public_key_matches(verified.leaf, built.ak_key.public_key())


@pytest.mark.parametrize("name", ["ca11", "ca25"])
def test_aia_hierarchies_complete_from_the_leaf_alone(server: AiaServer, name: str) -> None:
    built = hierarchy(name, server)
    built.publish(server)
    completed = AkChainCompleter(known_ca_pems=(), limits=FAST).complete([pem(built.leaf)])
    _verifies(completed, built)
    # Leaf -> CA-11/25 -> CA 2025 -> root: one download each, in that order.
    issuing = built.cas[0].certificate.subject.rfc4514_string().removeprefix("CN=")
    assert server.requests == [cert_path(issuing), cert_path(CA2025), cert_path(ROOT)]


def test_ca03_completes_from_shipped_intermediates_without_a_download(server: AiaServer) -> None:
    built = hierarchy("ca03", server)
    shipped = (pem(built.cas[0].certificate), pem(built.root.certificate))
    completed = AkChainCompleter(known_ca_pems=shipped, limits=FAST).complete([pem(built.leaf)])
    _verifies(completed, built)
    assert server.requests == []


def test_what_the_vm_sent_is_used_before_any_download(server: AiaServer) -> None:
    built = hierarchy("ca11", server)  # nothing published: a download would fail
    sent = [
        pem(built.leaf),
        pem(built.root.certificate),
        *(pem(ca.certificate) for ca in built.cas),
    ]
    _verifies(AkChainCompleter(known_ca_pems=(), limits=FAST).complete(sent), built)
    assert server.requests == []


def test_a_trusted_root_ends_the_chain(server: AiaServer) -> None:
    built = hierarchy("ca11", server)
    built.publish(server)
    completer = AkChainCompleter(
        known_ca_pems=(), trusted_root_pems=[pem(built.root.certificate)], limits=FAST
    )
    _verifies(completer.complete([pem(built.leaf)]), built)
    assert cert_path(ROOT) not in server.requests  # the root was known: not fetched


def test_missing_intermediate_names_the_issuer(server: AiaServer) -> None:
    built = hierarchy("ca03", server)  # the leaf has no AIA and CA-03 is not shipped
    with pytest.raises(AkChainIncompleteError) as caught:
        AkChainCompleter(known_ca_pems=(), limits=FAST).complete([pem(built.leaf)])
    assert type(caught.value) is AkChainIncompleteError
    assert isinstance(caught.value, AzureEnrollmentError)  # stops the run at enrolment
    aki = built.leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier is not None
    message = str(caught.value)
    assert f"issuer CN={CA03}" in message
    assert aki.key_identifier.hex(":").upper() in message
    assert "no AIA" in message


def test_an_intermediate_of_the_same_name_but_another_key_is_not_taken(server: AiaServer) -> None:
    """The real CA-03 is shipped: a leaf naming CA-03 but signed by another key is not
    completed with it (issuers are matched by signature, not by name)."""
    built = hierarchy("ca03", server)
    with pytest.raises(AkChainIncompleteError, match=f"issuer CN={CA03}"):
        AkChainCompleter(limits=FAST).complete([pem(built.leaf)])


def test_unpublished_aia_url_is_a_response_error(server: AiaServer) -> None:
    built = hierarchy("ca11", server)  # CA-11's URL answers 404
    with pytest.raises(AiaResponseError, match=rf"issuer CN={CA11}.*HTTP 404"):
        AkChainCompleter(known_ca_pems=(), limits=FAST).complete([pem(built.leaf)])


def test_aia_loop_is_refused(server: AiaServer) -> None:
    """Two CAs that certify each other (a cross-signed pair), each AIA pointing at the other:
    the walk would go round forever."""
    now = datetime.now(UTC)
    anchor = azure_like_root(not_before=now, not_after=now)  # only signs the first copy
    key_x, key_y = rsa_key(2048), rsa_key(2048)
    x_by_anchor = intermediate(anchor, "X", aia_url=None, now=now, private_key=key_x)
    y_by_x = intermediate(x_by_anchor, "Y", aia_url=server.url("X"), now=now, private_key=key_y)
    x_by_y = intermediate(y_by_x, "X", aia_url=server.url("Y"), now=now, private_key=key_x)
    server.serve(cert_path("X"), der(x_by_y.certificate))
    server.serve(cert_path("Y"), der(y_by_x.certificate))
    leaf = ak_certificate(x_by_y, rsa_key(2048).public_key(), aia_url=server.url("X"), now=now)
    with pytest.raises(AiaLoopError, match="loop"):
        AkChainCompleter(known_ca_pems=(), limits=FAST).complete([pem(leaf)])


def test_oversized_response_is_refused(server: AiaServer) -> None:
    built = hierarchy("ca11", server)
    server.serve(cert_path(CA11), b"\x30" * 70_000)
    with pytest.raises(AiaResponseTooLargeError, match="70000 bytes, over 65536"):
        AkChainCompleter(known_ca_pems=()).complete([pem(built.leaf)])


def test_endless_response_without_a_length_is_cut_at_the_limit(server: AiaServer) -> None:
    built = hierarchy("ca11", server)
    server.serve_endless(cert_path(CA11))
    with pytest.raises(AiaResponseTooLargeError, match="over 65536 bytes"):
        AkChainCompleter(known_ca_pems=()).complete([pem(built.leaf)])


def test_slow_response_is_cut_at_the_time_budget(server: AiaServer) -> None:
    built = hierarchy("ca11", server)
    server.serve_dripping(cert_path(CA11), der(built.cas[0].certificate), every_s=0.05)
    limits = AiaLimits(total_timeout_s=1.0, connect_timeout_s=1.0)
    started = datetime.now(UTC)
    with pytest.raises(AiaTimeoutError, match=rf"issuer CN={CA11}.*1 s AIA budget"):
        AkChainCompleter(known_ca_pems=(), limits=limits).complete([pem(built.leaf)])
    assert (datetime.now(UTC) - started).total_seconds() < 5


def test_non_certificate_response_is_refused(server: AiaServer) -> None:
    built = hierarchy("ca11", server)
    server.serve(cert_path(CA11), b"<html>moved</html>", content_type="text/html")
    with pytest.raises(AiaResponseError, match="not a DER, PEM or PKCS#7 certificate"):
        AkChainCompleter(known_ca_pems=(), limits=FAST).complete([pem(built.leaf)])


def test_only_http_and_https_are_fetched() -> None:
    now = datetime.now(UTC)
    root = azure_like_root(not_before=now, not_after=now)
    leaf = ak_certificate(root, rsa_key(2048).public_key(), aia_url="file:///etc/passwd", now=now)
    with pytest.raises(AiaResponseError, match="only http and https"):
        AkChainCompleter(known_ca_pems=(), limits=FAST).complete([pem(leaf)])


def test_pem_and_pkcs7_bundles_are_read_as_cas_serve_them(server: AiaServer) -> None:
    """A PKCS#7 certs-only bundle at CA-11's URL carrying CA-11 and CA 2025: one download
    less; PEM at CA 2025's."""
    built = hierarchy("ca11", server)
    ca11, ca2025 = (ca.certificate for ca in built.cas)
    server.serve(cert_path(CA11), pkcs7.serialize_certificates([ca11, ca2025], Encoding.DER))
    server.serve(cert_path(ROOT), pem(built.root.certificate).encode())
    completed = AkChainCompleter(known_ca_pems=(), limits=FAST).complete([pem(built.leaf)])
    _verifies(completed, built)
    assert server.requests == [cert_path(CA11), cert_path(ROOT)]
    bundle = pkcs7.serialize_certificates([ca11], Encoding.PEM)
    assert parse_ca_issuers_response(bundle, "x") == [ca11]


def test_shipped_cas_are_the_real_ca03_and_the_pinned_root() -> None:
    ca03, root = (x509.load_pem_x509_certificate(text.encode()) for text in SHIPPED_CA_PEMS)
    assert ca03 == x509.load_pem_x509_certificate(
        (TRUST_ROOTS / "global-virtual-tpm-ca-03.pem").read_bytes()
    )
    assert fingerprint_sha256(root) == PINNED_ROOT_FINGERPRINTS["azure"]
    ca03.verify_directly_issued_by(root)
    # A real CA-03 leaf completes to the pinned root with no download (CA-03 in hand).
    completed = AkChainCompleter(limits=FAST).complete([pem(ca03)])
    assert [x509.load_pem_x509_certificate(text.encode()) for text in completed] == [ca03, root]
