"""``aicert.slsa_provenance`` on the stored real certificates: the statement names every measured
input and output, is the same bytes each time, and is what the in-toto attestation library
parses as a Statement v1 with a SLSA Provenance v1 predicate."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import rfc8785
from google.protobuf import json_format
from in_toto_attestation.predicates.provenance.v1 import provenance_pb2
from in_toto_attestation.v1 import statement_pb2
from in_toto_attestation.v1.statement import Statement as InTotoStatement

from aicert.appevents import interpret
from aicert.canonical import canonical_sha256
from aicert.model import Certificate
from aicert.slsa_provenance import (
    BUILD_TYPE,
    PREDICATE_TYPE,
    STATEMENT_TYPE,
    certificate_provenance,
    provenance_statement,
    pypi_purl,
    statement_json,
)
from aicert.verify import VerificationReport
from tests.verification.verify.factory import (
    BASE_IMAGE_ID,
    PACKAGE_CONTENT,
    RESOURCE_URL,
    TRAINING_IMAGE_ID,
    RunParams,
    sha256_hex,
)
from tests.verification.verify.seeds import PLATFORMS, Seed, load_seed


@pytest.fixture(scope="module", params=PLATFORMS)
def verified(request: pytest.FixtureRequest) -> tuple[Seed, VerificationReport]:
    seed = load_seed(request.param)
    return seed, seed.verify()


def _predicate(statement: dict[str, Any]) -> dict[str, Any]:
    predicate: dict[str, Any] = statement["predicate"]
    return predicate


def _statement(seed: Seed, report: VerificationReport) -> dict[str, Any]:
    """The statement as plain JSON values, for reading (JsonValue, typed, is for building)."""
    statement: dict[str, Any] = certificate_provenance(seed.certificate, report)
    return statement


def test_the_statement_names_every_output_and_input(
    verified: tuple[Seed, VerificationReport],
) -> None:
    seed, report = verified
    statement = _statement(seed, report)
    assert statement["_type"] == STATEMENT_TYPE
    assert statement["predicateType"] == PREDICATE_TYPE
    subjects = {s["name"]: s["digest"]["sha256"] for s in statement["subject"]}
    assert subjects == seed.outputs
    definition = _predicate(statement)["buildDefinition"]
    assert definition["buildType"] == BUILD_TYPE
    dependencies = definition["resolvedDependencies"]
    digests = [d["digest"] for d in dependencies]
    for record in report.inputs:
        if record.kind == "config":
            # The config is the external parameters themselves: its measured digest is theirs.
            config = definition["externalParameters"]["config"]
            assert canonical_sha256(config).hex() == record.digest["sha256"]
        elif record.kind == "source":
            source = {"gitCommit": record.digest["sha1"], "sha256": record.digest["sha256"]}
            assert source in digests
            uri = f"git+{record.uri}@{record.digest['sha1']}"
            assert uri in [d.get("uri") for d in dependencies]
        else:
            assert {"sha256": record.digest["sha256"]} in digests, record
    assert len(dependencies) == len(report.inputs) - 1  # all but the config
    internal = definition["internalParameters"]
    assert internal["platform"] == seed.platform
    assert internal.get("referenceValues") == seed.certificate.platform.reference_values
    run = _predicate(statement)["runDetails"]
    assert run["builder"]["id"] == f"https://aicert.dev/builders/{seed.platform}@0.1.0"
    assert run["metadata"]["invocationId"] == seed.certificate.run.id


def test_the_same_certificate_gives_the_same_bytes(
    verified: tuple[Seed, VerificationReport],
) -> None:
    seed, report = verified
    first = statement_json(certificate_provenance(seed.certificate, report))
    # Parsed and verified again from the stored bytes: nothing of the first run carries over.
    again = Certificate.from_json_bytes(seed.raw)
    second = statement_json(certificate_provenance(again, seed.verify(again)))
    assert first == second


def test_the_in_toto_library_parses_and_validates_it(
    verified: tuple[Seed, VerificationReport],
) -> None:
    seed, report = verified
    document = statement_json(certificate_provenance(seed.certificate, report))
    # json_format refuses fields the protos do not define: every name is the spec's.
    parsed = json_format.Parse(document, statement_pb2.Statement())
    InTotoStatement.copy_from_pb(parsed).validate()
    predicate = json_format.MessageToDict(parsed.predicate)
    provenance = json_format.ParseDict(predicate, provenance_pb2.Provenance())
    assert provenance.build_definition.build_type == BUILD_TYPE
    assert provenance.run_details.metadata.finished_on.ToDatetime().year >= 2026


def test_a_report_of_another_certificate_is_refused(
    verified: tuple[Seed, VerificationReport],
) -> None:
    seed, report = verified
    other = load_seed("local" if seed.platform != "local" else "qemu")
    with pytest.raises(ValueError, match="not this certificate's"):
        certificate_provenance(seed.certificate, other.verify())
    forged = dataclasses.replace(report, outputs=report.outputs[:1])
    with pytest.raises(ValueError, match="outputs"):
        certificate_provenance(seed.certificate, forged)


def test_every_input_kind_becomes_a_dependency() -> None:
    # The stored seeds measure no resource or wheel; the verifier tests' run measures one of
    # each and a training image (the log a run writes, interpreted as the verifier does).
    measured = interpret(RunParams.new().events())
    statement: dict[str, Any] = provenance_statement(measured, None)
    dependencies = _predicate(statement)["buildDefinition"]["resolvedDependencies"]
    roles = [d["annotations"].get("role") for d in dependencies]
    assert roles == ["base", None, None, None, "training"]  # measurement order
    assert dependencies[0]["digest"] == {"sha256": BASE_IMAGE_ID.removeprefix("sha256:")}
    assert dependencies[2]["uri"] == RESOURCE_URL
    assert dependencies[3] == {
        "name": "numpy-2.0.0-cp311-cp311-manylinux_2_17_x86_64.whl",
        "uri": "pkg:pypi/numpy@2.0.0",
        "digest": {"sha256": sha256_hex(PACKAGE_CONTENT)},
        "annotations": {"size": len(PACKAGE_CONTENT)},
    }
    assert dependencies[4]["digest"] == {"sha256": TRAINING_IMAGE_ID.removeprefix("sha256:")}
    assert "referenceValues" not in _predicate(statement)["buildDefinition"]["internalParameters"]


@pytest.mark.parametrize(
    ("name", "version", "purl"),
    [
        ("numpy", "2.0.0", "pkg:pypi/numpy@2.0.0"),
        ("Typing_Extensions", "4.12.2", "pkg:pypi/typing-extensions@4.12.2"),
        ("torch", "2.4.0+cpu", "pkg:pypi/torch@2.4.0%2Bcpu"),
        ("zope.interface", "7.0", "pkg:pypi/zope.interface@7.0"),
    ],
)
def test_package_urls_follow_the_purl_pypi_rules(name: str, version: str, purl: str) -> None:
    assert pypi_purl(name, version) == purl


@pytest.mark.parametrize("platform", PLATFORMS)
def test_statement_json_is_rfc8785_of_the_whole_statement(platform: str) -> None:
    # statement_json canonicalizes member by member (a float in the config would otherwise
    # send the whole statement to the slow reference path); the reference library, given the
    # whole statement, must write the same bytes. The measured configs hold a float (cpus).
    seed = load_seed(platform)  # type: ignore[arg-type]
    statement = provenance_statement(interpret(seed.certificate.event_log), "rv-1")
    assert statement_json(statement) == rfc8785.dumps(statement)
    assert _floats(statement), "no float: the test would not exercise the reference path"


def _floats(value: object) -> list[object]:
    if isinstance(value, dict):
        return [f for item in value.values() for f in _floats(item)]
    if isinstance(value, list):
        return [f for item in value for f in _floats(item)]
    return [value] if isinstance(value, float) else []
