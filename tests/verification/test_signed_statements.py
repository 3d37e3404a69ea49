"""The signed statements of a certificate: made on a real swtpm, each forgery refused by its check.

The certificates are real (``factory.TpmRig``: a swtpm, an AK certified by the platform CA
after credential activation, a quote over the measured log) and their statements are signed
the way the agent signs them (``statement_signing.signed_statements_of``: the TPM hashes the
DSSE PAE and TPM2_Sign with its ticket). Each tamper test changes one thing and expects the
error of the check that judges it: an edited statement (``StatementContentError``), a statement
signed by another key (``StatementSignatureError``), an envelope stripped, added or not the
one measured (``StatementBindingError``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from aicert.appevents import SignedStatementsEvent, interpret
from aicert.errors import (
    EventLogError,
    MalformedCertificateError,
    StatementBindingError,
    StatementContentError,
    StatementSignatureError,
)
from aicert.guest_runtime.tpm import AkAlgorithm
from aicert.guest_runtime.tpm_signing import tpm_sign
from aicert.model_signing_format import dsse_pae
from aicert.signed_statements import (
    envelope_sha256,
    model_signing_payload,
    slsa_payload,
    statement_payload,
)
from tests.verification.verify.factory import (
    CertificateFactory,
    MadeCertificate,
    TpmRig,
    b64,
    tampered,
    unb64,
)

pytestmark = [pytest.mark.swtpm]

Document = dict[str, Any]


def _rig(tmp_path_factory: pytest.TempPathFactory, algorithm: AkAlgorithm) -> TpmRig:
    workdir: Path = tmp_path_factory.mktemp(f"signed-{algorithm.value}")
    return TpmRig.create(
        workdir / "tpm", workdir / "ek-ca", workdir / "platform-ca", ak_algorithm=algorithm
    )


@pytest.fixture(scope="module")
def ecc_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CertificateFactory]:
    rig = _rig(tmp_path_factory, AkAlgorithm.ECC_P256_ECDSA_SHA256)
    try:
        yield CertificateFactory(rig)
    finally:
        rig.close()


@pytest.fixture(scope="module")
def rsa_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CertificateFactory]:
    rig = _rig(tmp_path_factory, AkAlgorithm.RSA2048_RSASSA_SHA256)
    try:
        yield CertificateFactory(rig)
    finally:
        rig.close()


@pytest.fixture(scope="module")
def signed(ecc_factory: CertificateFactory) -> MadeCertificate:
    return ecc_factory.make_certificate(signed_statements=True)


def _edit(made: MadeCertificate, mutate: Callable[[list[Document]], None]) -> MadeCertificate:
    def mutate_document(document: Document) -> None:
        mutate(document["signed_statements"])

    return tampered(made, mutate_document)


# -- what an honest certificate carries ----------------------------------------------------


def test_an_ecc_ak_signs_both_statements_and_the_report_says_so(signed: MadeCertificate) -> None:
    report = signed.verify()
    statements = signed.certificate.signed_statements
    assert statements is not None
    assert [s.kind for s in statements] == ["model-signing", "slsa-provenance"]
    measured = interpret(signed.certificate.event_log)
    # Byte for byte what the verifier rebuilds from the replayed log.
    assert statements[0].envelope.payload == model_signing_payload(measured)
    assert statements[1].envelope.payload == slsa_payload(measured)
    event = measured.signed_statements
    assert isinstance(event, SignedStatementsEvent)
    assert [d.sha256 for d in event.statements] == [envelope_sha256(s.envelope) for s in statements]
    assert signed.certificate.event_log[-1].type == "aicert.output.signed-statements"
    (check,) = [c for c in report.checks if c.name == "signed-statements"]
    assert check.detail.startswith("model-signing, slsa-provenance: each payload")


def test_an_rsa_ak_signs_the_slsa_statement_only(rsa_factory: CertificateFactory) -> None:
    made = rsa_factory.make_certificate(signed_statements=True)
    made.verify()
    statements = made.certificate.signed_statements
    assert statements is not None and [s.kind for s in statements] == ["slsa-provenance"]


def test_a_certificate_without_the_event_carries_none(ecc_factory: CertificateFactory) -> None:
    made = ecc_factory.make_certificate()
    report = made.verify()
    assert made.certificate.signed_statements is None
    assert b"signed_statements" not in made.json_bytes()
    (check,) = [c for c in report.checks if c.name == "signed-statements"]
    assert check.detail.startswith("none")


def test_the_slsa_statement_names_no_reference_values(signed: MadeCertificate) -> None:
    statements = signed.certificate.signed_statements
    assert statements is not None
    statement = json.loads(statements[1].envelope.payload)
    internal = statement["predicate"]["buildDefinition"]["internalParameters"]
    assert "referenceValues" not in internal
    assert statement["predicate"]["runDetails"]["metadata"]["invocationId"] == signed.params.run_id


# -- each forgery, its error -----------------------------------------------------------------


def test_an_edited_statement_is_refused(signed: MadeCertificate) -> None:
    def edit(statements: list[Document]) -> None:
        envelope = statements[1]["envelope"]
        statement = json.loads(unb64(envelope["payload"]))
        statement["subject"][0]["digest"]["sha256"] = "0" * 64
        envelope["payload"] = b64(json.dumps(statement).encode())

    with pytest.raises(StatementContentError, match="slsa-provenance statement is not the one"):
        _edit(signed, edit).verify()


def test_a_statement_signed_by_another_key_is_refused(signed: MadeCertificate) -> None:
    other = ec.generate_private_key(ec.SECP256R1())

    def resign(statements: list[Document]) -> None:
        envelope = statements[0]["envelope"]
        pae = dsse_pae(unb64(envelope["payload"]), envelope["payloadType"])
        envelope["signatures"][0]["sig"] = b64(other.sign(pae, ec.ECDSA(hashes.SHA256())))

    with pytest.raises(StatementSignatureError, match="does not verify with the certified AK"):
        _edit(signed, resign).verify()


def test_a_stripped_envelope_is_refused(signed: MadeCertificate) -> None:
    with pytest.raises(StatementBindingError, match="stripped or added"):
        _edit(signed, lambda statements: statements.pop(0)).verify()

    def strip_all(document: Document) -> None:
        del document["signed_statements"]

    with pytest.raises(StatementBindingError, match="stripped or added"):
        tampered(signed, strip_all).verify()


def test_an_extra_envelope_is_refused(rsa_factory: CertificateFactory) -> None:
    # The RSA AK's run measured its SLSA statement only; a model_signing statement of the
    # same run, signed by the same AK in the same TPM, was never measured.
    made = rsa_factory.make_certificate(signed_statements=True)
    measured = interpret(made.certificate.event_log)
    payload = statement_payload("model-signing", measured)
    rig = rsa_factory.rig
    signature = tpm_sign(rig.tpm, rig.ak, dsse_pae(payload))

    def add(statements: list[Document]) -> None:
        extra = json.loads(json.dumps(statements[0]))
        extra["kind"] = "model-signing"
        extra["envelope"]["payload"] = b64(payload)
        extra["envelope"]["signatures"][0]["sig"] = b64(signature)
        statements.insert(0, extra)

    with pytest.raises(StatementBindingError, match="stripped or added"):
        _edit(made, add).verify()


def test_an_envelope_other_than_the_measured_one_is_refused(signed: MadeCertificate) -> None:
    # The key id is not signed: the same statement and signature, another envelope.
    def rename(statements: list[Document]) -> None:
        statements[1]["envelope"]["signatures"][0]["keyid"] = "another"

    with pytest.raises(StatementBindingError, match="not the one whose digest PCR 15 measured"):
        _edit(signed, rename).verify()


def test_a_payload_type_other_than_in_toto_is_refused(signed: MadeCertificate) -> None:
    def retype(statements: list[Document]) -> None:
        statements[1]["envelope"]["payloadType"] = "text/plain"

    with pytest.raises(StatementContentError, match="payloadType"):
        _edit(signed, retype).verify()


def test_two_signatures_or_three_statements_are_malformed(signed: MadeCertificate) -> None:
    def second_signature(statements: list[Document]) -> None:
        signatures = statements[0]["envelope"]["signatures"]
        signatures.append(dict(signatures[0]))

    with pytest.raises(MalformedCertificateError, match="signatures"):
        _edit(signed, second_signature)
    with pytest.raises(MalformedCertificateError, match="signed_statements"):
        _edit(signed, lambda statements: statements.append(statements[0]))


def test_the_event_must_follow_the_result(ecc_factory: CertificateFactory) -> None:
    made = ecc_factory.make_certificate(signed_statements=True)
    log = list(made.certificate.event_log)
    # The signed-statements event moved before the result: the grammar refuses it.
    reordered = [*log[:-2], log[-1], log[-2]]
    with pytest.raises(EventLogError, match="output files followed by one result"):
        interpret(reordered)


def test_statement_kinds_repeat_or_out_of_order_are_refused(signed: MadeCertificate) -> None:
    event = signed.certificate.event_log[-1]
    digests = event.data["statements"]
    assert isinstance(digests, list)
    with pytest.raises(ValueError, match="distinct"):
        SignedStatementsEvent.model_validate({"statements": list(reversed(digests))})
    with pytest.raises(ValueError, match="distinct"):
        SignedStatementsEvent.model_validate({"statements": [digests[1], digests[1]]})


def test_the_signature_is_a_der_ecdsa_signature_over_the_pae(signed: MadeCertificate) -> None:
    statements = signed.certificate.signed_statements
    assert statements is not None
    leaf = signed.certificate.attestation.ak.certificate_chain[0]
    public = x509.load_pem_x509_certificate(leaf.encode()).public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    for statement in statements:
        envelope = statement.envelope
        public.verify(
            envelope.signatures[0].sig,
            dsse_pae(envelope.payload, envelope.payloadType),
            ec.ECDSA(hashes.SHA256()),
        )
