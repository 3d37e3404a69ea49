"""The tamper matrix: for each check of ``verify_certificate``, change exactly what it guards
and expect exactly its exception.

Every certificate here carries real TPM evidence (see ``factory``). Each test first shows
that its starting point verifies (the positive control), then that the one change is caught
by the one check, with its exception type and the key part of its message.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

import aicert
from aicert.appevents import ResultEvent, event_digest, replay
from aicert.errors import (
    AkMismatchError,
    ArtifactMismatchError,
    AttestStructureError,
    CertificateChainError,
    EventLogError,
    ExpectationError,
    MalformedCertificateError,
    NonceMismatchError,
    PcrDigestError,
    PcrSelectionError,
    PlatformError,
    QuoteSignatureError,
    VerificationError,
)
from aicert.model import MAX_CERTIFICATE_BYTES, AppEvent, Certificate
from aicert.tasks.platforms.platform_ca import PlatformCA
from aicert.tpm_structures import TPM_ST_ATTEST_CERTIFY, parse_attest, parse_tpmt_public

from .factory import (
    DEFAULT_OUTPUTS,
    RESOURCE_CONTENT,
    RESOURCE_DESTINATION,
    SOURCE_COMMIT,
    CertificateFactory,
    MadeCertificate,
    TpmRig,
    ak_binding_for,
    b64,
    flip_bit_b64,
    issue_ak_certificate,
    sha256_hex,
    software_ak,
    tampered,
    unb64,
    with_software_quote,
)

Mutation = Callable[[dict[str, Any]], None]


def assert_caught(
    made: MadeCertificate,
    mutate: Mutation,
    error: type[VerificationError],
    match: str,
    **verify_kwargs: Any,
) -> None:
    """The control verifies; the same certificate with ``mutate`` applied raises ``error``."""
    made.verify(**verify_kwargs)
    bad = tampered(made, mutate)
    with caught_exactly(error, match):
        bad.verify(**verify_kwargs)


@contextmanager
def caught_exactly(error: type[VerificationError], match: str | None) -> Iterator[None]:
    """``pytest.raises`` that also refuses subclasses of ``error``."""
    with pytest.raises(error, match=match) as caught:
        yield
    assert type(caught.value) is error, f"{type(caught.value).__name__} is not {error.__name__}"


# -- 2. AK certificate chain ------------------------------------------------------------------


def test_untampered_certificate_verifies(base: MadeCertificate) -> None:
    report = base.verify()
    assert report.run_id == base.params.run_id


def test_no_trusted_root_is_refused(base: MadeCertificate) -> None:
    base.verify()
    with caught_exactly(CertificateChainError, "no trust anchor"):
        base.certificate.verify(trusted_roots=[], allow_dev_platform=True)


def test_ak_certificate_from_another_ca_is_refused(
    base: MadeCertificate, rig: TpmRig, other_ca: PlatformCA
) -> None:
    # A real activation with another CA: the same AK, certified by a CA nobody trusts here.
    other_chain = rig.enroll_with(other_ca)

    def mutate(document: dict[str, Any]) -> None:
        document["attestation"]["ak"]["certificate_chain"] = other_chain

    assert_caught(base, mutate, CertificateChainError, "does not chain to a trusted root")
    # Control: trusting that CA instead, the same certificate verifies.
    tampered(base, mutate).verify(trusted_roots=[other_ca.certificate_pem])


def _leaf(made: MadeCertificate) -> x509.Certificate:
    return x509.load_pem_x509_certificate(
        made.certificate.attestation.ak.certificate_chain[0].encode()
    )


def test_expired_chain_is_refused(base: MadeCertificate) -> None:
    expires = _leaf(base).not_valid_after_utc
    base.verify(at_time=expires - timedelta(seconds=1))
    with caught_exactly(CertificateChainError, "does not chain to a trusted root at"):
        base.verify(at_time=expires + timedelta(seconds=1))


def test_chain_not_yet_valid_is_refused(base: MadeCertificate) -> None:
    starts = _leaf(base).not_valid_before_utc
    base.verify(at_time=starts + timedelta(seconds=1))
    with caught_exactly(CertificateChainError, "does not chain to a trusted root at"):
        base.verify(at_time=starts - timedelta(seconds=1))


def test_leaf_and_root_swapped_is_refused(base: MadeCertificate) -> None:
    def mutate(document: dict[str, Any]) -> None:
        document["attestation"]["ak"]["certificate_chain"].reverse()

    assert_caught(base, mutate, CertificateChainError, "does not chain")


# -- 3. AK public key --------------------------------------------------------------------------


def test_ak_public_of_another_tpm_is_refused(base: MadeCertificate, other_rig: TpmRig) -> None:
    def mutate(document: dict[str, Any]) -> None:
        document["attestation"]["ak"]["public"] = b64(other_rig.ak.public_bytes)

    assert_caught(base, mutate, AkMismatchError, "not the key in the AK certificate")


def test_certified_ak_of_another_tpm_does_not_verify_this_quote(
    base: MadeCertificate, other_rig: TpmRig
) -> None:
    # The other TPM's AK with its own valid chain (same CA) and the EK certificate its AK
    # binding names: the quote was not signed by it.
    def mutate(document: dict[str, Any]) -> None:
        document["attestation"]["ak"]["public"] = b64(other_rig.ak.public_bytes)
        document["attestation"]["ak"]["certificate_chain"] = other_rig.chain
        document["attestation"]["ek"]["certificate"] = other_rig.ek_certificate_pem

    assert_caught(base, mutate, QuoteSignatureError, "does not verify with the AK")


def test_malformed_ak_public_is_refused(base: MadeCertificate) -> None:
    def mutate(document: dict[str, Any]) -> None:
        document["attestation"]["ak"]["public"] = b64(
            unb64(document["attestation"]["ak"]["public"])[:-7]
        )

    assert_caught(base, mutate, AkMismatchError, "attestation.ak.public")


def test_non_restricted_ak_is_refused(base: MadeCertificate, rig: TpmRig) -> None:
    """A key that is not restricted could sign anything, including a forged TPMS_ATTEST.

    A software key stands for it: its TPMT_PUBLIC says "not restricted", a CA certified it,
    and it signs the TPM's own quote structure. Only the restricted-key check refuses it.
    """
    attest = base.certificate.attestation.quote.attest
    unrestricted = software_ak(
        rig.ca, rig.ca_dir, restricted=False, ek_certificate_pem=rig.ek_certificate_pem
    )
    with caught_exactly(AkMismatchError, "not a restricted signing key"):
        with_software_quote(base, unrestricted, attest).verify()
    # Control: the same forgery with a TPMT_PUBLIC that *claims* restricted verifies: the
    # attributes are as trustworthy as the CA that checked them at activation (PlatformCA
    # refuses such keys; issue_ak_certificate is a CA that did not).
    claims_restricted = software_ak(
        rig.ca, rig.ca_dir, restricted=True, ek_certificate_pem=rig.ek_certificate_pem
    )
    with_software_quote(base, claims_restricted, attest).verify()


# -- 4. quote signature ----------------------------------------------------------------------


def test_one_bit_of_attest_is_refused(base: MadeCertificate) -> None:
    def mutate(document: dict[str, Any]) -> None:
        quote = document["attestation"]["quote"]
        quote["attest"] = flip_bit_b64(quote["attest"], 40, 3)

    assert_caught(base, mutate, QuoteSignatureError, "does not verify with the AK")


def test_one_bit_of_signature_is_refused(base: MadeCertificate) -> None:
    def mutate(document: dict[str, Any]) -> None:
        quote = document["attestation"]["quote"]
        quote["signature"] = flip_bit_b64(quote["signature"], -1, 0)

    assert_caught(base, mutate, QuoteSignatureError, "does not verify with the AK")


def test_sha1_signed_quote_is_refused(
    base: MadeCertificate, factory: CertificateFactory, rig: TpmRig
) -> None:
    """A real TPM quote signed RSASSA-SHA1 by a restricted key, certified by the trusted CA."""
    attest, signature, public = factory.sha1_quote(base)
    assert struct.unpack(">HH", signature[:4]) == (0x0014, 0x0004)  # RSASSA, SHA-1
    sha1_key = parse_tpmt_public(public).to_cryptography_key()
    binding = ak_binding_for(public, rig.ek_certificate_pem)
    chain = [issue_ak_certificate(rig.ca_dir, sha1_key, binding=binding), rig.ca.certificate_pem]

    def mutate(document: dict[str, Any]) -> None:
        attestation = document["attestation"]
        attestation["quote"]["attest"] = b64(attest)
        attestation["quote"]["signature"] = b64(signature)
        attestation["ak"]["public"] = b64(public)
        attestation["ak"]["certificate_chain"] = chain

    assert_caught(base, mutate, QuoteSignatureError, "SHA-256 or stronger required")


# -- 5. TPMS_ATTEST contents -----------------------------------------------------------------


def test_attest_without_tpm_generated_magic_is_refused(base: MadeCertificate, rig: TpmRig) -> None:
    """No TPM signs a TPMS_ATTEST whose magic is not TPM_GENERATED_VALUE with a restricted
    key: that is what makes the magic meaningful. The forgery needs a software key."""
    ak = software_ak(rig.ca, rig.ca_dir, restricted=True, ek_certificate_pem=rig.ek_certificate_pem)
    attest = base.certificate.attestation.quote.attest
    with_software_quote(base, ak, attest).verify()  # control: the re-signed original passes
    forged = struct.pack(">I", 0xDEADBEEF) + attest[4:]
    with caught_exactly(AttestStructureError, "not TPM_GENERATED_VALUE"):
        with_software_quote(base, ak, forged).verify()


def test_attest_of_another_type_is_refused(base: MadeCertificate, rig: TpmRig) -> None:
    ak = software_ak(rig.ca, rig.ca_dir, restricted=True, ek_certificate_pem=rig.ek_certificate_pem)
    attest = base.certificate.attestation.quote.attest
    forged = attest[:4] + struct.pack(">H", TPM_ST_ATTEST_CERTIFY) + attest[6:]
    with caught_exactly(AttestStructureError, "not TPM_ST_ATTEST_QUOTE"):
        with_software_quote(base, ak, forged).verify()


def test_attestation_nonce_changed_is_refused(base: MadeCertificate) -> None:
    def mutate(document: dict[str, Any]) -> None:
        document["attestation"]["nonce"] = flip_bit_b64(document["attestation"]["nonce"], 0)

    assert_caught(base, mutate, NonceMismatchError, "extraData is not the expected nonce")


@pytest.mark.parametrize("pcr", ["0", "7", "14", "15"])
def test_claimed_pcr_value_changed_is_refused(base: MadeCertificate, pcr: str) -> None:
    def mutate(document: dict[str, Any]) -> None:
        document["attestation"]["quote"]["pcrs"][pcr] = sha256_hex(b"another value")

    assert_caught(base, mutate, PcrDigestError, "pcrDigest is not the digest")


def test_pcr_values_swapped_between_indices_is_refused(base: MadeCertificate) -> None:
    # Same labels as signed, values moved: the digest over the selection order differs.
    def mutate(document: dict[str, Any]) -> None:
        pcrs = document["attestation"]["quote"]["pcrs"]
        pcrs["13"], pcrs["14"] = pcrs["14"], pcrs["13"]

    assert_caught(base, mutate, PcrDigestError, "pcrDigest is not the digest")


def test_relabelled_pcr_selection_is_refused(
    base: MadeCertificate, factory: CertificateFactory
) -> None:
    """CVE-2024-29039: a real quote over PCRs 1-16 whose values are presented as PCRs 0-15.

    The values in selection order are the same bytes, so pcrDigest matches the claimed
    values: only comparing the claimed indices with the *signed* selection catches it.
    """
    attest, signature, quoted = factory.requote(base, pcrs=range(1, 17))
    relabelled = {str(index - 1): value.hex() for index, value in sorted(quoted.items())}
    signed_digest = parse_attest(attest).quote.pcr_digest  # type: ignore[union-attr]
    claimed = b"".join(bytes.fromhex(relabelled[str(i)]) for i in range(16))
    assert hashlib.sha256(claimed).digest() == signed_digest

    def mutate(document: dict[str, Any]) -> None:
        quote = document["attestation"]["quote"]
        quote["attest"], quote["signature"] = b64(attest), b64(signature)
        quote["pcrs"] = relabelled

    assert_caught(base, mutate, PcrSelectionError, "not the signed selection")


def test_pcr_15_dropped_is_refused(base: MadeCertificate) -> None:
    def mutate(document: dict[str, Any]) -> None:
        del document["attestation"]["quote"]["pcrs"]["15"]

    assert_caught(base, mutate, PcrSelectionError, "must list PCRs 0-15")


def test_extra_pcr_claimed_is_refused(base: MadeCertificate) -> None:
    def mutate(document: dict[str, Any]) -> None:
        document["attestation"]["quote"]["pcrs"]["16"] = "00" * 32

    assert_caught(base, mutate, PcrSelectionError, "must list PCRs 0-15")


def test_quote_over_fewer_pcrs_is_refused(
    base: MadeCertificate, factory: CertificateFactory
) -> None:
    # A real quote over PCRs 0-13 and 15, presented with a PCR 14 the quote did not sign.
    selection = [*range(14), 15]
    attest, signature, _ = factory.requote(base, pcrs=selection)

    def mutate(document: dict[str, Any]) -> None:
        quote = document["attestation"]["quote"]
        quote["attest"], quote["signature"] = b64(attest), b64(signature)

    assert_caught(base, mutate, PcrSelectionError, "not the signed selection")


# -- 6. the application event log ------------------------------------------------------------

# Positions in the factory's standard log: 0 runtime, 1 config, 2 base image, 3 source,
# 4 resource, 5 package, 6 training image, 7-8 output files, 9 result.
RESOURCE_EVENT, FIRST_OUTPUT_EVENT = 4, 7


def _remove_resource(document: dict[str, Any]) -> None:
    del document["event_log"][RESOURCE_EVENT]


def _swap_source_and_resource(document: dict[str, Any]) -> None:
    log = document["event_log"]
    log[3], log[4] = log[4], log[3]


def _add_resource(document: dict[str, Any]) -> None:
    log = document["event_log"]
    extra = json.loads(json.dumps(log[RESOURCE_EVENT]))
    extra["data"]["destination"] = "data/extra.csv"
    log.insert(RESOURCE_EVENT + 1, extra)


def _edit_resource_digest(document: dict[str, Any]) -> None:
    document["event_log"][RESOURCE_EVENT]["data"]["sha256"] = sha256_hex(b"poisoned data")


def _edit_output_file(document: dict[str, Any]) -> None:
    document["event_log"][FIRST_OUTPUT_EVENT]["data"]["sha256"] = sha256_hex(b"other weights")


def _edit_exit_code(document: dict[str, Any]) -> None:
    document["event_log"][-1]["data"]["exit_code"] = 0 if document["run"]["exit_code"] else 1


def _move_output_to_pcr_14(document: dict[str, Any]) -> None:
    document["event_log"][FIRST_OUTPUT_EVENT]["pcr"] = 14


def _drop_last_output(document: dict[str, Any]) -> None:
    del document["event_log"][FIRST_OUTPUT_EVENT + 1]


@pytest.mark.parametrize(
    "mutate",
    [
        _remove_resource,
        _swap_source_and_resource,
        _add_resource,
        _edit_resource_digest,
        _edit_output_file,
        _edit_exit_code,
        _move_output_to_pcr_14,
        _drop_last_output,
    ],
)
def test_event_log_tamper_breaks_replay(base: MadeCertificate, mutate: Mutation) -> None:
    assert_caught(base, mutate, EventLogError, "events were added, removed, reordered or edited")


def test_event_log_interleaving_changed_is_refused(base: MadeCertificate) -> None:
    # Moving an output event before the inputs keeps each PCR's order, so the replay still
    # matches; the log's grammar (inputs first) is what refuses it.
    def mutate(document: dict[str, Any]) -> None:
        log = document["event_log"]
        log.insert(0, log.pop(FIRST_OUTPUT_EVENT))

    bad = tampered(base, mutate)
    assert replay(bad.certificate.event_log) == replay(base.certificate.event_log)
    assert_caught(base, mutate, EventLogError, "input was measured after the first output")


def test_output_view_differing_from_log_is_refused(base: MadeCertificate) -> None:
    def mutate(document: dict[str, Any]) -> None:
        document["outputs"][0]["digest"]["sha256"] = sha256_hex(b"another model")

    assert_caught(base, mutate, EventLogError, r"outputs\[\] differs")


def test_output_view_missing_a_file_is_refused(base: MadeCertificate) -> None:
    def mutate(document: dict[str, Any]) -> None:
        del document["outputs"][-1]

    assert_caught(base, mutate, EventLogError, r"outputs\[\] differs")


def test_input_view_differing_from_log_is_refused(base: MadeCertificate) -> None:
    # The event log is intact (replay and quote pass); only the human-facing view lies.
    def mutate(document: dict[str, Any]) -> None:
        resource = next(i for i in document["inputs"] if i["kind"] == "resource")
        resource["digest"]["sha256"] = sha256_hex(b"the data people think was used")

    assert_caught(base, mutate, EventLogError, r"inputs\[\] differs")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("id", "someone-else-20260101T000000Z-00000000"),
        ("project", "another-project"),
        ("started_at", "2020-01-01T00:00:00+00:00"),
        ("exit_code", 3),
        ("duration_ms", 1),
        ("runtime_version", "9.9.9"),
        ("provider", "azure"),
    ],
)
def test_run_claim_differing_from_measured_run_is_refused(
    base: MadeCertificate, field: str, value: Any
) -> None:
    def mutate(document: dict[str, Any]) -> None:
        document["run"][field] = value

    assert_caught(base, mutate, EventLogError, rf"run\.{field} differ")


def test_platform_kind_differing_from_measured_is_refused(base: MadeCertificate) -> None:
    def mutate(document: dict[str, Any]) -> None:
        document["platform"]["kind"] = "azure"

    assert_caught(base, mutate, EventLogError, r"platform\.kind differ")


def test_run_finished_at_differing_from_measured_is_refused(base: MadeCertificate) -> None:
    def mutate(document: dict[str, Any]) -> None:
        finished = base.certificate.run.finished_at - timedelta(seconds=1)
        document["run"]["finished_at"] = finished.isoformat()

    assert_caught(base, mutate, EventLogError, r"run\.finished_at differs")


def test_event_without_rfc8785_form_is_refused(base: MadeCertificate) -> None:
    # JSON parsers accept integers beyond 2**53; RFC 8785 cannot canonicalize them.
    def mutate(document: dict[str, Any]) -> None:
        document["event_log"][3]["data"]["file_count"] = 2**60

    assert_caught(base, mutate, EventLogError, "no RFC 8785 form")


# Fresh quotes: the TPM really measured these logs, so only the log's meaning can refuse them.


def _unknown_event(events: list[AppEvent]) -> list[AppEvent]:
    extra = AppEvent(pcr=14, type="aicert.input.mystery", data={"note": "not in the grammar"})
    return [*events[:RESOURCE_EVENT], extra, *events[RESOURCE_EVENT:]]


def _outputs_unsorted(events: list[AppEvent]) -> list[AppEvent]:
    first, second = FIRST_OUTPUT_EVENT, FIRST_OUTPUT_EVENT + 1
    return [*events[:first], events[second], events[first], *events[second + 1 :]]


def _output_repeated(events: list[AppEvent]) -> list[AppEvent]:
    return [
        *events[: FIRST_OUTPUT_EVENT + 1],
        events[FIRST_OUTPUT_EVENT],
        *events[FIRST_OUTPUT_EVENT + 1 :],
    ]


def _output_after_result(events: list[AppEvent]) -> list[AppEvent]:
    return [*events[:FIRST_OUTPUT_EVENT], events[-1], *events[FIRST_OUTPUT_EVENT:-1]]


def _naive_finish_time(events: list[AppEvent]) -> list[AppEvent]:
    result = ResultEvent.model_validate(events[-1].data)
    naive = AppEvent(
        pcr=15,
        type=ResultEvent.TYPE,
        data={**result.model_dump(mode="json"), "finished_at": "2026-01-01T00:00:00"},
    )
    return [*events[:-1], naive]


def _unparsable_start_time(events: list[AppEvent]) -> list[AppEvent]:
    runtime = AppEvent(
        pcr=14, type=events[0].type, data={**events[0].data, "started_at": "yesterday"}
    )
    return [runtime, *events[1:]]


def _no_runtime_event(events: list[AppEvent]) -> list[AppEvent]:
    return events[1:]


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (_unknown_event, "unknown event type 'aicert.input.mystery'"),
        (_outputs_unsorted, "sorted by path"),
        (_output_repeated, "sorted by path, without repeats"),
        (_output_after_result, "last PCR 15 event must be aicert.output.result"),
        (_naive_finish_time, "no timezone"),
        (_unparsable_start_time, "not an ISO 8601 timestamp"),
        (_no_runtime_event, "first PCR 14 event must be aicert.runtime"),
    ],
)
def test_measured_log_outside_the_grammar_is_refused(
    base: MadeCertificate,
    factory: CertificateFactory,
    edit: Callable[[list[AppEvent]], list[AppEvent]],
    match: str,
) -> None:
    base.verify()
    made = factory.make_certificate(events=edit)
    assert replay(made.certificate.event_log) == {
        14: bytes.fromhex(made.certificate.attestation.quote.pcrs["14"]),
        15: bytes.fromhex(made.certificate.attestation.quote.pcrs["15"]),
    }
    with caught_exactly(EventLogError, match):
        made.verify()


def test_failed_training_is_refused(base: MadeCertificate, factory: CertificateFactory) -> None:
    base.verify()
    made = factory.make_certificate(exit_code=1)
    assert made.certificate.run.exit_code == 1  # the certificate says so honestly
    with caught_exactly(EventLogError, "exited with code 1"):
        made.verify()


def test_runtime_event_nonce_differing_from_quote_nonce_is_refused(
    base: MadeCertificate, factory: CertificateFactory
) -> None:
    # The quote's extraData is the certificate's nonce, but the run measured another one:
    # the log was recorded for a different challenge.
    base.verify()
    made = factory.make_certificate(runtime_nonce=b"\x5a" * 32)
    with caught_exactly(NonceMismatchError, "measured runtime event carries a different nonce"):
        made.verify()


# -- 7. platform -----------------------------------------------------------------------------


def test_local_platform_needs_explicit_consent(base: MadeCertificate) -> None:
    base.verify(allow_dev_platform=True)
    with caught_exactly(PlatformError, "allow_dev_platform"):
        base.verify(allow_dev_platform=False)


def test_local_platform_with_extended_boot_pcr_is_refused(
    base: MadeCertificate, factory: CertificateFactory
) -> None:
    base.verify()
    made = factory.make_certificate(extend_before={7: hashlib.sha256(b"secure boot").digest()})
    with caught_exactly(PlatformError, r"PCRs \[7\] are not in their reset state"):
        made.verify()


def test_local_platform_with_boot_event_log_is_refused(base: MadeCertificate) -> None:
    def mutate(document: dict[str, Any]) -> None:
        document["boot_event_log"] = b64(b"\x00" * 64)

    assert_caught(base, mutate, PlatformError, "boot event log is present")


def test_remote_platform_without_boot_event_log_is_refused(
    base: MadeCertificate, factory: CertificateFactory
) -> None:
    base.verify()
    made = factory.make_certificate(platform="qemu")
    with caught_exactly(PlatformError, "no boot event log"):
        made.verify()


# -- 8. the caller's expectations -------------------------------------------------------------


def test_expected_inputs_match(base: MadeCertificate) -> None:
    report = base.verify(
        expected_inputs={
            RESOURCE_DESTINATION: sha256_hex(RESOURCE_CONTENT),
            "https://git.example.org/acme/flowers.git": SOURCE_COMMIT,
            "numpy": "sha256:" + sha256_hex(b"a wheel").upper(),
        }
    )
    assert report.checks[-1].name == "expected-inputs"


def test_expected_input_with_other_digest_is_refused(base: MadeCertificate) -> None:
    base.verify(expected_inputs={RESOURCE_DESTINATION: sha256_hex(RESOURCE_CONTENT)})
    with caught_exactly(ExpectationError, "has digest"):
        base.verify(expected_inputs={RESOURCE_DESTINATION: sha256_hex(b"what I expected")})


def test_expected_input_missing_is_refused(base: MadeCertificate) -> None:
    with caught_exactly(ExpectationError, "is not in the certificate"):
        base.verify(expected_inputs={"data/validation.csv": sha256_hex(b"x")})


def _write_outputs(folder: Path) -> Path:
    for relative, content in DEFAULT_OUTPUTS.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return folder


def test_model_file_altered_is_refused(base: MadeCertificate, tmp_path: Path) -> None:
    model = _write_outputs(tmp_path) / "model" / "weights.bin"
    report = base.verify(model=model)
    assert report.checks[-1].name == "model"
    assert base.certificate.verify_artifact(model) == 1
    altered = bytearray(model.read_bytes())
    altered[-1] ^= 0x01
    model.write_bytes(bytes(altered))
    with caught_exactly(ArtifactMismatchError, "does not match the certified model/weights.bin"):
        base.verify(model=model)
    with caught_exactly(ArtifactMismatchError, "does not match"):
        base.certificate.verify_artifact(model)


def test_model_folder_with_extra_file_is_refused(base: MadeCertificate, tmp_path: Path) -> None:
    folder = _write_outputs(tmp_path / "outputs")
    assert base.certificate.verify_artifact(folder) == len(DEFAULT_OUTPUTS)
    (folder / "backdoor.py").write_text("print('hi')\n")
    with caught_exactly(ArtifactMismatchError, r"not certified: \['backdoor.py'\]"):
        base.verify(model=folder)


def test_model_folder_with_altered_file_is_refused(base: MadeCertificate, tmp_path: Path) -> None:
    folder = _write_outputs(tmp_path / "outputs")
    base.verify(model=folder)
    (folder / "metrics.json").write_bytes(b'{"accuracy": 0.99}\n')
    with caught_exactly(ArtifactMismatchError, "metrics.json: SHA-256"):
        base.verify(model=folder)


def test_verify_artifact_checks_the_event_log(base: MadeCertificate, tmp_path: Path) -> None:
    # verify_artifact trusts only outputs that replay to the certificate's PCR 15.
    model = _write_outputs(tmp_path) / "model" / "weights.bin"
    forged = hashlib.sha256(b"forged").hexdigest()

    def mutate(document: dict[str, Any]) -> None:
        document["event_log"][FIRST_OUTPUT_EVENT + 1]["data"]["sha256"] = forged
        document["outputs"][1]["digest"]["sha256"] = forged

    with caught_exactly(EventLogError, "replays PCR 15"):
        tampered(base, mutate).certificate.verify_artifact(model)


# -- 1. parsing --------------------------------------------------------------------------------


def _document_bytes(made: MadeCertificate, mutate: Mutation | None = None) -> bytes:
    document = made.as_dict()
    if mutate is not None:
        mutate(document)
    return json.dumps(document).encode()


def _set(path: tuple[str | int, ...], value: Any) -> Mutation:
    def mutate(document: dict[str, Any]) -> None:
        target: Any = document
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


def _delete(path: tuple[str | int, ...]) -> Mutation:
    def mutate(document: dict[str, Any]) -> None:
        target: Any = document
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return mutate


def _deeply_nested(made: MadeCertificate) -> bytes:
    # Written as text: json.dumps itself cannot nest this deep.
    depth = 100_000
    nested = b'"config": {"deep": ' + b"[" * depth + b"]" * depth + b", "
    return _document_bytes(made).replace(b'"config": {', nested, 1)


MALFORMED: dict[str, Callable[[MadeCertificate], bytes]] = {
    "not JSON": lambda made: b"{not json",
    "truncated": lambda made: made.json_bytes()[:-20],
    "not UTF-8": lambda made: made.json_bytes().replace(b'"aicert/v1"', b'"aicert/v1\xff"'),
    "empty": lambda made: b"",
    "a list": lambda made: b"[]",
    "wrong format": lambda made: _document_bytes(made, _set(("format",), "aicert/v2")),
    "missing run": lambda made: _document_bytes(made, _delete(("run",))),
    "extra key": lambda made: _document_bytes(made, _set(("signed_by",), "trust me")),
    "bad base64": lambda made: _document_bytes(
        made, _set(("attestation", "quote", "attest"), "not*base64!")
    ),
    "base64 with whitespace": lambda made: _document_bytes(
        made, _set(("attestation", "nonce"), " " + made.as_dict()["attestation"]["nonce"])
    ),
    "uppercase PCR hex": lambda made: _document_bytes(
        made, _set(("attestation", "quote", "pcrs", "0"), "AB" * 32)
    ),
    "PCR index 24": lambda made: _document_bytes(
        made, _set(("attestation", "quote", "pcrs", "24"), "00" * 32)
    ),
    "naive timestamp": lambda made: _document_bytes(
        made, _set(("run", "finished_at"), "2026-01-01T00:00:00")
    ),
    "event in PCR 13": lambda made: _document_bytes(made, _set(("event_log", 0, "pcr"), 13)),
    "string exit code": lambda made: _document_bytes(made, _set(("run", "exit_code"), "0")),
    "empty chain": lambda made: _document_bytes(
        made, _set(("attestation", "ak", "certificate_chain"), [])
    ),
    "oversized attest": lambda made: _document_bytes(
        made, _set(("attestation", "quote", "attest"), b64(b"\x00" * 5000))
    ),
    "deeply nested": _deeply_nested,
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_certificate_is_refused(base: MadeCertificate, tmp_path: Path, name: str) -> None:
    data = MALFORMED[name](base)
    with caught_exactly(MalformedCertificateError, None):
        Certificate.from_json_bytes(data)
    path = tmp_path / "proof.json"
    path.write_bytes(data)
    with caught_exactly(MalformedCertificateError, re.escape(str(path))):
        aicert.load(path)


def test_valid_certificate_file_loads(base: MadeCertificate, tmp_path: Path) -> None:
    # The control of the malformed cases: the same path with the real bytes parses.
    path = base.certificate.write(tmp_path / "proof.json")
    assert aicert.load(path) == base.certificate
    assert Certificate.from_json_bytes(_document_bytes(base)) == base.certificate


def test_oversized_certificate_is_refused_before_parsing(tmp_path: Path) -> None:
    data = b" " * (MAX_CERTIFICATE_BYTES + 1)
    with caught_exactly(MalformedCertificateError, "exceeds the"):
        Certificate.from_json_bytes(data)
    path = tmp_path / "huge.json"
    with path.open("wb") as handle:  # sparse: the size is what matters
        handle.truncate(MAX_CERTIFICATE_BYTES + 1)
    with caught_exactly(MalformedCertificateError, "exceeds the"):
        aicert.load(path)


def test_missing_file_is_malformed(tmp_path: Path) -> None:
    with caught_exactly(MalformedCertificateError, "cannot read"):
        aicert.load(tmp_path / "absent.json")


# Sanity of what the matrix relies on: the base certificate's PCR 14/15 are its replayed log
# (the TPM extended exactly these digests), PCRs 0-13 are reset, and every event is distinct,
# so removing or repeating one always changes the replay.
def test_base_certificate_pcrs_are_the_replayed_log(base: MadeCertificate) -> None:
    replayed = replay(base.certificate.event_log)
    pcrs = base.certificate.attestation.quote.pcrs
    assert replayed[14].hex() == pcrs["14"] and replayed[15].hex() == pcrs["15"]
    assert all(pcrs[str(i)] == "00" * 32 for i in range(14))
    digests = {event_digest(e) for e in base.certificate.event_log}
    assert len(digests) == len(base.certificate.event_log)
    assert base64.b64decode(base.as_dict()["attestation"]["nonce"]) == base.params.nonce
