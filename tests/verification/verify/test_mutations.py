"""Property-based tests: random edits of a real certificate never verify as something else,
and nothing but a ``VerificationError`` ever escapes the verifier.

A mutation either (a) makes parsing or verification fail with a ``VerificationError``
subclass, or (b) leaves the certificate equal to the original once parsed, or (c) touches
only data the certificate does not claim to prove (listed in ``unbound``, with the reason),
and then the verification report is exactly the original's: what is reported as verified
never changes.
"""

from __future__ import annotations

import base64
import copy
import json
import pathlib
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from aicert.errors import MalformedCertificateError, VerificationError
from aicert.model import Certificate
from aicert.tpm_structures import parse_tpmt_public

from .factory import MadeCertificate
from .fuzzing import walk

Path = tuple[str | int, ...]

BASE64_FIELDS = {"attest", "signature", "public", "nonce", "boot_event_log"}
MUTATION_SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def parent_of(document: Any, path: Path) -> Any:
    node = document
    for key in path[:-1]:
        node = node[key]
    return node


json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=6,
)


def _string_edit(draw: st.DrawFn, value: str) -> str:
    choice = draw(st.integers(0, 3))
    if choice == 0 or not value:
        return draw(st.text(max_size=40))
    position = draw(st.integers(0, len(value) - 1))
    if choice == 1:  # replace one character
        return value[:position] + draw(st.characters()) + value[position + 1 :]
    if choice == 2:  # drop one character
        return value[:position] + value[position + 1 :]
    return value[:position] + draw(st.text(min_size=1, max_size=3)) + value[position:]


def _int_edit(draw: st.DrawFn, value: int) -> int:
    return draw(
        st.sampled_from([value + 1, value - 1, -value, 0, 2**31, 2**53 + 1, 2**64]) | st.integers()
    )


@st.composite
def mutations(draw: st.DrawFn, document: dict[str, Any]) -> tuple[dict[str, Any], Path, str]:
    """A copy of ``document`` with one random edit, the edited path, and the edit's kind."""
    mutated = copy.deepcopy(document)
    nodes = list(walk(mutated))
    kind = draw(
        st.sampled_from(
            ["flip-bytes", "string", "int", "delete", "add-key", "shuffle", "other-type"]
        )
    )
    if kind == "flip-bytes":
        candidates = [p for p, v in nodes if p and p[-1] in BASE64_FIELDS and isinstance(v, str)]
        path = draw(st.sampled_from(candidates))
        data = bytearray(base64.b64decode(parent_of(mutated, path)[path[-1]]))
        for _ in range(draw(st.integers(1, 3))):
            position = draw(st.integers(0, len(data) - 1))
            data[position] ^= draw(st.integers(1, 255))
        parent_of(mutated, path)[path[-1]] = base64.b64encode(bytes(data)).decode()
    elif kind == "string":
        candidates = [p for p, v in nodes if p and isinstance(v, str)]
        path = draw(st.sampled_from(candidates))
        parent = parent_of(mutated, path)
        parent[path[-1]] = _string_edit(draw, parent[path[-1]])
    elif kind == "int":
        candidates = [p for p, v in nodes if p and isinstance(v, int) and not isinstance(v, bool)]
        path = draw(st.sampled_from(candidates))
        parent = parent_of(mutated, path)
        parent[path[-1]] = _int_edit(draw, parent[path[-1]])
    elif kind == "delete":
        candidates = [p for p, _ in nodes if p]
        path = draw(st.sampled_from(candidates))
        del parent_of(mutated, path)[path[-1]]
    elif kind == "add-key":
        candidates = [p for p, v in nodes if isinstance(v, dict)]
        path = draw(st.sampled_from(candidates))
        target = mutated
        for key in path:
            target = target[key]
        new_key = draw(st.text(max_size=12))
        target[new_key] = draw(json_values)
        path = (*path, new_key)
    elif kind == "shuffle":
        candidates = [p for p, v in nodes if isinstance(v, list) and len(v) >= 2]
        path = draw(st.sampled_from(candidates))
        target = mutated
        for key in path:
            target = target[key]
        permuted = draw(st.permutations(target))
        target[:] = permuted
    else:
        candidates = [p for p, _ in nodes if p]
        path = draw(st.sampled_from(candidates))
        parent_of(mutated, path)[path[-1]] = draw(json_values)
    return mutated, path, kind


def _spki(public: bytes) -> bytes:
    return (
        parse_tpmt_public(public)
        .to_cryptography_key()
        .public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    )


def unbound(path: Path, original: Certificate, mutated: Certificate) -> bool:
    """Whether ``path`` is data the certificate does not claim to prove."""
    if path[:2] in {("platform", "description"), ("platform", "reference_values")}:
        return True  # free text for people; the report uses its own platform note
    if path[:2] == ("attestation", "ek"):
        return True  # informational: trust comes from the AK certificate chain
    if path[:3] == ("attestation", "ak", "certificate_chain"):
        # Only the leaf (entry 0) must be the certified AK; the rest are path-building hints,
        # the trust anchor is the caller's. Whatever verifies must still start at the leaf.
        chain, mutated_chain = (
            original.attestation.ak.certificate_chain,
            mutated.attestation.ak.certificate_chain,
        )
        return mutated_chain[0] == chain[0]
    if path[:3] == ("attestation", "ak", "public"):
        # The AK certificate binds the key, the quote binds the scheme; the other TPMT_PUBLIC
        # fields are what the CA checked at activation. Whatever verifies must be the same
        # key, still claiming to be a restricted signing key.
        before = parse_tpmt_public(original.attestation.ak.public)
        after = parse_tpmt_public(mutated.attestation.ak.public)
        return (
            _spki(original.attestation.ak.public) == _spki(mutated.attestation.ak.public)
            and after.is_restricted_signing_key()
            and after.parameters.scheme == before.parameters.scheme
        )
    return False


@pytest.fixture(scope="module")
def base_document(base: MadeCertificate) -> dict[str, Any]:
    return base.as_dict()


@pytest.fixture(scope="module")
def base_report(base: MadeCertificate) -> dict[str, Any]:
    report: dict[str, Any] = base.verify().to_dict()
    return report


@MUTATION_SETTINGS
@given(data=st.data())
def test_mutated_certificate_never_verifies_as_something_else(
    base: MadeCertificate,
    base_document: dict[str, Any],
    base_report: dict[str, Any],
    data: st.DataObject,
) -> None:
    mutated, path, kind = data.draw(mutations(base_document), label="mutation")
    event(f"mutation: {kind}")
    try:
        certificate = Certificate.from_json_bytes(json.dumps(mutated).encode())
    except MalformedCertificateError:
        event("outcome: MalformedCertificateError")
        return
    if certificate == base.certificate:
        event("outcome: no change once parsed")
        return
    try:
        report = certificate.verify(trusted_roots=[base.trust_root_pem], allow_dev_platform=True)
    except VerificationError as error:
        event(f"outcome: {type(error).__name__}")
        return
    # It verified: only data the certificate does not prove may have changed, and what is
    # reported as verified is exactly the original.
    assert unbound(path, base.certificate, certificate), f"{kind} at {path} still verifies"
    assert report.to_dict() == base_report
    event("outcome: verified, unbound data only")


@pytest.fixture(scope="module")
def model_folder(base: MadeCertificate, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    folder = tmp_path_factory.mktemp("mutation-model")
    for relative, content in base.params.outputs.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(content)
    return folder


@MUTATION_SETTINGS
@given(data=st.data())
def test_mutated_certificate_artifact_check_raises_only_verification_errors(
    base_document: dict[str, Any], model_folder: pathlib.Path, data: st.DataObject
) -> None:
    # verify_artifact reads the event log without the quote: it too must fail closed.
    mutated, _, _ = data.draw(mutations(base_document), label="mutation")
    try:
        certificate = Certificate.from_json_bytes(json.dumps(mutated).encode())
        certificate.verify_artifact(model_folder)
    except VerificationError:
        return


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=4096))
def test_random_bytes_are_only_ever_malformed(data: bytes) -> None:
    try:
        Certificate.from_json_bytes(data)
    except MalformedCertificateError:
        return
    pytest.fail("random bytes parsed as a certificate")


@settings(max_examples=200, deadline=None)
@given(value=json_values)
def test_random_json_is_only_ever_malformed(value: Any) -> None:
    with pytest.raises(MalformedCertificateError):
        Certificate.from_json_bytes(json.dumps(value).encode())


@MUTATION_SETTINGS
@given(data=st.data())
def test_bytes_level_corruption_raises_only_verification_errors(
    base: MadeCertificate, data: st.DataObject
) -> None:
    raw = bytearray(base.json_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(raw) - 1))
        raw[position] = data.draw(st.integers(0, 255))
    try:
        certificate = Certificate.from_json_bytes(bytes(raw))
        if certificate == base.certificate:
            return
        report = certificate.verify(trusted_roots=[base.trust_root_pem], allow_dev_platform=True)
    except VerificationError:
        return
    assert report.to_dict() == base.verify().to_dict()
