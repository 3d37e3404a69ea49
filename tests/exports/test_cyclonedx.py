"""The CycloneDX 1.6 ML-BOM of verified real certificates: valid against the 1.6 schema, naming
every output hash and every measured input, referring to the certificate, the same bytes each
time, and refused for a report that is not the certificate's."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

from aicert.exports.cyclonedx import bom_json
from aicert.exports.verified import VerifiedCertificate
from tests.verification.verify.factory import PACKAGE_CONTENT, RESOURCE_URL, sha256_hex
from tests.verification.verify.seeds import Seed, load_seed


def _document(verified: VerifiedCertificate) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(bom_json(verified))
    return document


def _hashes(component: dict[str, Any]) -> dict[str, str]:
    return {item["alg"]: item["content"] for item in component.get("hashes", [])}


def _assert_names_every_input_and_output(verified: VerifiedCertificate) -> dict[str, Any]:
    """The BOM's components hold each certified output and input with its digests."""
    document = _document(verified)
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(json.dumps(document)) is None
    components = document["components"]
    files = {c["name"]: _hashes(c)["SHA-256"] for c in components if c["type"] == "file"}
    assert files == {o.path: o.digest["sha256"] for o in verified.report.outputs}
    digests = [_hashes(component) for component in components]
    for record in verified.report.inputs:
        expected = {"SHA-256": record.digest["sha256"]}
        if "sha1" in record.digest:  # the git source: commit and tree
            expected["SHA-1"] = record.digest["sha1"]
        assert expected in digests, record
    # Every input and output is a component; the workflow reads and writes exactly those.
    assert len(components) == len(verified.report.inputs) + len(verified.report.outputs)
    (workflow,) = document["formulation"][0]["workflows"]
    refs = {c["bom-ref"] for c in components}
    read = [item["resource"]["ref"] for item in workflow["inputs"]]
    written = [item["resource"]["ref"] for item in workflow["outputs"]]
    assert set(read) | set(written) == refs and not set(read) & set(written)
    assert workflow["uid"] == verified.report.run_id
    return document


def test_the_bom_is_valid_cyclonedx_1_6_and_names_every_input_and_output(
    verified_seed: VerifiedCertificate,
) -> None:
    document = _assert_names_every_input_and_output(verified_seed)
    assert document["specVersion"] == "1.6"
    model = document["metadata"]["component"]
    assert model["type"] == "machine-learning-model"
    assert model["version"] == verified_seed.report.run_id
    (model_dependencies,) = [d for d in document["dependencies"] if d["ref"] == model["bom-ref"]]
    outputs = {f"output:{o.path}" for o in verified_seed.report.outputs}
    assert set(model_dependencies["dependsOn"]) == outputs
    by_type = {c["type"] for c in document["components"]}
    assert {"data", "container", "application", "file"} <= by_type
    (source,) = [c for c in document["components"] if c["bom-ref"] == "input:source"]
    assert source["purl"].startswith("pkg:generic/")
    assert "vcs_url=git%2B" in source["purl"]


def test_the_bom_refers_to_the_certificate_it_was_made_from(seed: Seed) -> None:
    verified = VerifiedCertificate.of(seed.certificate, seed.verify(), raw=seed.raw)
    document = _document(verified)
    (reference,) = document["externalReferences"]
    assert reference["type"] == "attestation"
    assert reference["url"] == "proof.json"
    assert _hashes(reference) == {"SHA-256": hashlib.sha256(seed.raw).hexdigest()}
    properties = {p["name"]: p["value"] for p in document["metadata"]["properties"]}
    assert properties["aicert:verified.platform"] == seed.platform
    boot_attested = "false" if seed.platform == "local" else "true"
    assert properties["aicert:verified.boot-chain-attested"] == boot_attested


def test_the_same_certificate_gives_the_same_bytes(seed: Seed) -> None:
    first = bom_json(VerifiedCertificate.of(seed.certificate, seed.verify(), raw=seed.raw))
    again = load_seed(seed.platform)  # parsed and verified anew
    second = bom_json(VerifiedCertificate.of(again.certificate, again.verify(), raw=again.raw))
    assert first == second


def test_a_report_of_another_certificate_is_refused(seed: Seed) -> None:
    report = seed.verify()
    other = load_seed("local" if seed.platform != "local" else "azure")
    with pytest.raises(ValueError, match="not this certificate's"):
        VerifiedCertificate.of(seed.certificate, other.verify())
    forged = dataclasses.replace(report, run_id="another-run")
    with pytest.raises(ValueError, match="run id"):
        VerifiedCertificate.of(seed.certificate, forged)


def test_the_validator_refuses_what_1_6_does_not_allow(
    verified_seed: VerifiedCertificate,
) -> None:
    # The check bom_json relies on is live: a workflow without its required taskTypes fails.
    document = _document(verified_seed)
    del document["formulation"][0]["workflows"][0]["taskTypes"]
    error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(json.dumps(document))
    assert error is not None


@pytest.mark.swtpm
def test_every_input_kind_becomes_a_component(every_input_kind: VerifiedCertificate) -> None:
    document = _assert_names_every_input_and_output(every_input_kind)
    by_ref = {c["bom-ref"]: c for c in document["components"]}
    wheel = by_ref["input:package:0"]
    assert wheel["type"] == "library"
    assert wheel["purl"] == "pkg:pypi/numpy@2.0.0"
    assert _hashes(wheel) == {"SHA-256": sha256_hex(PACKAGE_CONTENT)}
    resource = by_ref["input:resource:0"]
    assert resource["type"] == "data"
    assert resource["externalReferences"] == [{"type": "distribution", "url": RESOURCE_URL}]
    assert by_ref["input:image:training"]["type"] == "container"
    assert by_ref["input:image:base"]["purl"] == "pkg:docker/aicert/python-base@bookworm"
