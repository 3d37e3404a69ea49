"""A CycloneDX 1.6 ML-BOM of a verified certificate, built with cyclonedx-python-lib.

What the BOM holds (docs/exports.md has the field-by-field table):

- ``metadata.component``: the trained model, a ``machine-learning-model`` component named after
  the project, versioned by the run id. Its files are the run's outputs, one ``file``
  component each with its SHA-256, listed at the top level and named as the model's
  dependencies. Top-level components with hashes are what CycloneDX consumers index
  (Dependency-Track, cyclonedx-cli, GUAC list them and match by hash); a single model component
  could carry only one set of hashes, and components nested under ``metadata.component`` are
  skipped by several of them.
- the inputs, each a top-level component: the measured config (``data``), the container
  images (``container``, purl ``pkg:docker``, SHA-256 = the image ID), the git source
  (``application``, purl ``pkg:generic`` with ``vcs_url``, SHA-1 = commit, SHA-256 = tree),
  the resources (``data``, with their download URL) and the wheels (``library``, purl
  ``pkg:pypi``), so that vulnerability tools see every package that went into the model.
- ``formulation``: the run as a workflow (run id, platform, start and end, the inputs it read
  and the outputs it wrote, by bom-ref). cyclonedx-python-lib (11.x) has no model for
  ``formulation`` yet, so it is added to the library's JSON output and the whole document is
  then checked against the CycloneDX 1.6 JSON Schema (the library's strict validator).
- the certificate: an ``attestation`` external reference of the BOM (its file name and
  SHA-256), and ``aicert:`` properties saying what its verification established.

The BOM describes only what the replayed event log measured: it is built from a
:class:`~aicert.exports.verified.VerifiedCertificate`, which exists only for a certificate that
verified. Same certificate, same bytes: the serial number is derived from the certificate's
SHA-256 and the timestamp is the run's end.
"""

from __future__ import annotations

import json
import uuid
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from cyclonedx.model import (
    ExternalReference,
    ExternalReferenceType,
    HashAlgorithm,
    HashType,
    Property,
    XsUri,
)
from cyclonedx.model.bom import Bom, BomMetaData
from cyclonedx.model.component import Component, ComponentType
from cyclonedx.model.lifecycle import LifecyclePhase, PredefinedLifecycle
from cyclonedx.model.tool import ToolRepository
from cyclonedx.output.json import JsonV1Dot6
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
from packageurl import PackageURL
from pydantic import JsonValue

from aicert.canonical import canonical_sha256
from aicert.slsa_provenance import git_uri, pypi_purl, rfc3339

if TYPE_CHECKING:
    from aicert.appevents import ImageEvent, PackageEvent, ResourceEvent, SourceEvent

    from .verified import VerifiedCertificate

SCHEMA_VERSION = SchemaVersion.V1_6
PROPERTY_PREFIX = "aicert:"
"""The namespace of this BOM's property names (CycloneDX's property taxonomy convention)."""
MODEL_REF = "model"
WORKFLOW_TASK_TYPES = ("build",)
"""The workflow's CycloneDX task types: a training run builds the model."""


class CycloneDxExportError(RuntimeError):
    """The BOM built does not validate against CycloneDX 1.6 (a bug of this exporter)."""


def _property(name: str, value: object) -> Property:
    return Property(name=PROPERTY_PREFIX + name, value=str(value))


def _properties(values: dict[str, object]) -> list[Property]:
    """``aicert:`` properties of the values that are not None, in the given order."""
    return [_property(name, value) for name, value in values.items() if value is not None]


def _sha256(digest: str) -> HashType:
    return HashType(alg=HashAlgorithm.SHA_256, content=digest)


def _output_component(path: str, size: int, sha256: str) -> Component:
    return Component(
        type=ComponentType.FILE,
        name=path,
        bom_ref=f"output:{path}",
        hashes=[_sha256(sha256)],
        properties=[_property("size", size)],
    )


def _config_component(config: dict[str, JsonValue]) -> Component:
    return Component(
        type=ComponentType.DATA,
        name="aicert.yaml",
        bom_ref="input:config",
        description="the validated training config, as measured",
        hashes=[_sha256(canonical_sha256(config).hex())],
        # The digest is the one `aicert verify --expect aicert.yaml=...` compares.
        properties=[_property("digest-of", "RFC 8785 canonical JSON of the measured config")],
    )


def _docker_purl(reference: str) -> PackageURL:
    """``pkg:docker/<namespace>/<name>@<tag>`` of an image reference (no tag: no version)."""
    reference = reference.partition("@")[0]  # a digest reference's digest is not a tag
    repository, _, tag = reference.rpartition(":")
    if not repository or "/" in tag:  # no tag, or the colon was a registry's port
        repository, tag = reference, ""
    namespace, _, name = repository.rpartition("/")
    return PackageURL(type="docker", namespace=namespace or None, name=name, version=tag or None)


def _image_component(image: ImageEvent) -> Component:
    image_id = image.image_id.removeprefix("sha256:")
    purl = _docker_purl(image.name)
    return Component(
        type=ComponentType.CONTAINER,
        # The repository, its tag as the version: what container scanners show.
        name="/".join(part for part in (purl.namespace, purl.name) if part),
        version=purl.version,
        bom_ref=f"input:image:{image.role}",
        purl=purl,
        hashes=[_sha256(image_id)],
        # The agent measures the image ID (the SHA-256 of the image configuration), which is
        # what it ran; a registry's manifest digest is another value.
        properties=[_property("image-role", image.role), _property("digest-of", "image-id")],
    )


def _source_component(source: SourceEvent) -> Component:
    name = source.url.rstrip("/").rsplit("/", 1)[-1] or source.url
    vcs = ExternalReference(type=ExternalReferenceType.VCS, url=XsUri(source.url))
    return Component(
        type=ComponentType.APPLICATION,
        name=name,
        version=source.commit,
        bom_ref="input:source",
        description="the training code: a git commit, checked out and hashed as a tree",
        purl=PackageURL(
            type="generic",
            name=name,
            version=source.commit,
            qualifiers={"vcs_url": git_uri(source.url, source.commit)},
        ),
        hashes=[
            HashType(alg=HashAlgorithm.SHA_1, content=source.commit),
            _sha256(source.tree_sha256),
        ],
        external_references=[vcs],
        properties=_properties(
            {
                "git-commit": source.commit,
                "git-ref": source.ref,
                "subdirectory": source.subdirectory,
                "file-count": source.file_count,
            }
        ),
    )


def _resource_component(index: int, resource: ResourceEvent) -> Component:
    return Component(
        type=ComponentType.DATA,
        name=resource.destination,
        bom_ref=f"input:resource:{index}",
        hashes=[_sha256(resource.sha256)],
        external_references=[
            ExternalReference(type=ExternalReferenceType.DISTRIBUTION, url=XsUri(resource.url))
        ],
        properties=[_property("size", resource.size)],
    )


def _package_component(index: int, package: PackageEvent) -> Component:
    return Component(
        type=ComponentType.LIBRARY,
        name=package.name,
        version=package.version,
        bom_ref=f"input:package:{index}",
        purl=PackageURL.from_string(pypi_purl(package.name, package.version)),
        hashes=[_sha256(package.sha256)],
        properties=[_property("wheel", package.filename), _property("size", package.size)],
    )


def output_components(verified: VerifiedCertificate) -> list[Component]:
    """One ``file`` component per output file, in the measured order (sorted by path).

    Args:
        verified: the verified certificate.
    """
    return [_output_component(o.path, o.size, o.sha256) for o in verified.measured.outputs]


def input_components(verified: VerifiedCertificate) -> list[Component]:
    """One component per measured input, in measurement order (config first).

    Args:
        verified: the verified certificate.
    """
    measured = verified.measured
    components = [_config_component(measured.config.config)]
    components += [_image_component(image) for image in measured.images]
    if measured.source is not None:
        components.append(_source_component(measured.source))
    components += [_resource_component(i, r) for i, r in enumerate(measured.resources)]
    components += [_package_component(i, p) for i, p in enumerate(measured.packages)]
    return components


def _verification_properties(verified: VerifiedCertificate) -> list[Property]:
    report = verified.report
    return [
        _property("certificate.format", verified.certificate.format),
        _property("certificate.sha256", verified.file_sha256),
        _property("verified.platform", report.platform),
        _property("verified.boot-chain-attested", str(report.boot_chain_attested).lower()),
        _property("verified.ak-root-sha256", report.ak_root_fingerprint_sha256),
        _property("verified.at-time", rfc3339(report.verified_at_time)),
        _property("verified.checks", ",".join(check.name for check in report.checks)),
    ]


def _model_component(verified: VerifiedCertificate) -> Component:
    report = verified.report
    return Component(
        type=ComponentType.MACHINE_LEARNING_MODEL,
        name=report.project,
        version=report.run_id,
        bom_ref=MODEL_REF,
        description=f"the model trained by AICert run {report.run_id}; its files are the outputs",
        properties=[_property("run-id", report.run_id)],
    )


def _aicert_version() -> str:
    try:
        return version("aicert")
    except PackageNotFoundError:  # a source checkout that was never installed
        return "unknown"


def build_bom(verified: VerifiedCertificate) -> Bom:
    """The ML-BOM of a verified certificate, without ``formulation`` (see :func:`bom_json`).

    Args:
        verified: the verified certificate.
    """
    report = verified.report
    model = _model_component(verified)
    outputs = output_components(verified)
    inputs = input_components(verified)
    tool = Component(type=ComponentType.APPLICATION, name="aicert", version=_aicert_version())
    bom = Bom(
        # Derived from the certificate's hash: the same certificate gives the same BOM.
        serial_number=uuid.uuid5(uuid.NAMESPACE_URL, f"urn:aicert:{verified.file_sha256}"),
        metadata=BomMetaData(
            component=model,
            timestamp=report.finished_at,
            tools=ToolRepository(components=[tool]),
            lifecycles=[PredefinedLifecycle(LifecyclePhase.BUILD)],
            properties=_verification_properties(verified),
        ),
        components=[*outputs, *inputs],
        external_references=[
            ExternalReference(
                type=ExternalReferenceType.ATTESTATION,
                url=XsUri(verified.file_name),
                comment=f"AICert certificate ({verified.certificate.format}) of run "
                f"{report.run_id}, verified offline",
                hashes=[_sha256(verified.file_sha256)],
            )
        ],
    )
    # The model is its files; how it was made (from the inputs) is the formulation.
    bom.register_dependency(model, outputs)
    for component in [*outputs, *inputs]:
        bom.register_dependency(component)
    return bom


def formulation(verified: VerifiedCertificate) -> list[JsonValue]:
    """The run as CycloneDX 1.6 ``formulation``: one workflow, its inputs and outputs by ref.

    Args:
        verified: the verified certificate (the refs are those of :func:`build_bom`).
    """
    report, runtime = verified.report, verified.measured.runtime

    def refs(components: list[Component]) -> list[JsonValue]:
        return [{"resource": {"ref": str(component.bom_ref)}} for component in components]

    properties: dict[str, object] = {
        "platform": report.platform,
        "reference-values": verified.certificate.platform.reference_values,
        "runtime-version": report.runtime_version,
        "exit-code": report.exit_code,
        "duration-ms": report.duration_ms,
        "nonce": runtime.nonce,
    }
    workflow: dict[str, JsonValue] = {
        "bom-ref": f"run:{report.run_id}",
        "uid": report.run_id,
        "name": f"AICert training run on the {report.platform} platform",
        "taskTypes": list(WORKFLOW_TASK_TYPES),
        "timeStart": rfc3339(verified.measured.started_at),
        "timeEnd": rfc3339(verified.measured.finished_at),
        "inputs": refs(input_components(verified)),
        "outputs": refs(output_components(verified)),
        "properties": [
            {"name": item.name, "value": item.value} for item in _properties(properties)
        ],
    }
    return [{"bom-ref": "formulation", "workflows": [workflow]}]


def bom_json(verified: VerifiedCertificate) -> str:
    """The CycloneDX 1.6 JSON document of a verified certificate, checked against the schema.

    Args:
        verified: the verified certificate.

    Raises:
        CycloneDxExportError: the document does not validate (a bug of this exporter).
    """
    bom = build_bom(verified)
    document = json.loads(JsonV1Dot6(bom).output_as_string())
    document["formulation"] = formulation(verified)
    text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    error = JsonStrictValidator(SCHEMA_VERSION).validate_str(text)
    if error is not None:
        raise CycloneDxExportError(f"the CycloneDX 1.6 BOM does not validate: {error}")
    return text
