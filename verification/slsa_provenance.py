"""SLSA Provenance v1 of a certified training run, as an in-toto Statement v1.

The statement says, in the supply-chain ecosystem's words, what an ``aicert/v1`` certificate
proves: the run's output files (the statement's subjects) were produced by the AICert agent on
a platform, from the measured config (``externalParameters``) and the measured inputs
(``resolvedDependencies``: git source, container images, resources, Python wheels).

It is built only from what the replayed application event log measured (``MeasuredRun``), so
the same certificate always gives the same statement, byte for byte (RFC 8785 canonical JSON,
:func:`statement_json`). That is why the builder lives in the verifier, the lowest part: the
guest agent will build this statement from its own event log and have the TPM sign it, and the
verifier will rebuild it from the replayed log to check the signed one. Today the statement is
derived from a verified certificate and is not signed itself (docs/exports.md).

The build type, :data:`BUILD_TYPE`, is AICert's own; docs/exports.md describes each of its
fields.
"""

from __future__ import annotations

import hmac
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from urllib.parse import quote

from pydantic import JsonValue

from aicert.appevents import (
    INPUTS_PCR,
    OUTPUTS_PCR,
    ImageEvent,
    MeasuredRun,
    PackageEvent,
    ResourceEvent,
    SourceEvent,
    interpret,
)
from aicert.canonical import canonical_json

if TYPE_CHECKING:
    from aicert.model import Certificate
    from aicert.verify import VerificationReport

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "https://aicert.dev/buildtypes/training/v1"
"""AICert's SLSA build type: a training run measured by the AICert agent (docs/exports.md)."""
BUILDER_ID_PREFIX = "https://aicert.dev/builders/"
"""``runDetails.builder.id`` is this prefix, the platform kind, ``@`` and the agent version."""
AGENT_COMPONENT = "aicert-agent"
"""The key of the agent's version in ``runDetails.builder.version``."""

Statement = dict[str, JsonValue]


def rfc3339(value: datetime) -> str:
    """``value`` in UTC as RFC 3339 with a ``Z`` (what SLSA's timestamps and protobuf expect).

    Args:
        value: an aware datetime.
    """
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def pypi_purl(name: str, version: str) -> str:
    """The package URL of a PyPI distribution: ``pkg:pypi/<name>@<version>``.

    The purl specification's PyPI rule: the name lowercased, ``_`` written ``-``; both parts
    percent-encoded where a purl needs it (a local version's ``+``).

    Args:
        name: the distribution name as measured.
        version: its version as measured.
    """
    normalized = name.lower().replace("_", "-")
    return f"pkg:pypi/{quote(normalized, safe='.-')}@{quote(version, safe='.-_~!')}"


def git_uri(url: str, commit: str) -> str:
    """The SPDX-style download location of a git commit: ``git+<url>@<commit>``.

    Args:
        url: the repository URL (or path) as measured.
        commit: the commit's SHA-1.
    """
    return f"git+{url}@{commit}"


def builder_id(platform: str, runtime_version: str) -> str:
    """``runDetails.builder.id``: the platform kind and the agent's version, in one URI.

    Args:
        platform: the platform kind the agent ran on (local, qemu, azure).
        runtime_version: the agent's version, as measured (percent-encoded here).
    """
    return f"{BUILDER_ID_PREFIX}{platform}@{quote(runtime_version, safe='.-_~+')}"


def _without_none(values: dict[str, JsonValue]) -> dict[str, JsonValue]:
    return {key: value for key, value in values.items() if value is not None}


def _source_dependency(source: SourceEvent) -> dict[str, JsonValue]:
    return {
        "uri": git_uri(source.url, source.commit),
        "digest": {"gitCommit": source.commit, "sha256": source.tree_sha256},
        "annotations": _without_none(
            {
                "ref": source.ref,
                "subdirectory": source.subdirectory,
                "fileCount": source.file_count,
                "size": source.size,
            }
        ),
    }


def _image_dependency(image: ImageEvent) -> dict[str, JsonValue]:
    # The digest is the image ID (SHA-256 of the image configuration), which is what the agent
    # measured and ran; a registry's manifest digest is another value.
    return {
        "name": image.name,
        "digest": {"sha256": image.image_id.removeprefix("sha256:")},
        "annotations": {"role": image.role, "digestOf": "image-id"},
    }


def _resource_dependency(resource: ResourceEvent) -> dict[str, JsonValue]:
    return {
        "name": resource.destination,
        "uri": resource.url,
        "digest": {"sha256": resource.sha256},
        "annotations": {"size": resource.size},
    }


def _package_dependency(package: PackageEvent) -> dict[str, JsonValue]:
    return {
        "name": package.filename,
        "uri": pypi_purl(package.name, package.version),
        "digest": {"sha256": package.sha256},
        "annotations": {"size": package.size},
    }


def resolved_dependencies(measured: MeasuredRun) -> list[JsonValue]:
    """Every measured input but the config, as SLSA resource descriptors.

    In measurement order: the base image, the git source, the resources, the wheels, and the
    training image built from them (measured last).

    Args:
        measured: the run the replayed event log proves.
    """
    base = [image for image in measured.images if image.role == "base"]
    training = [image for image in measured.images if image.role == "training"]
    dependencies = [_image_dependency(image) for image in base]
    if measured.source is not None:
        dependencies.append(_source_dependency(measured.source))
    dependencies += [_resource_dependency(resource) for resource in measured.resources]
    dependencies += [_package_dependency(package) for package in measured.packages]
    dependencies += [_image_dependency(image) for image in training]
    return dependencies


def provenance_statement(measured: MeasuredRun, reference_values: str | None) -> Statement:
    """The in-toto Statement v1 with the SLSA Provenance v1 predicate of a measured run.

    Args:
        measured: the run the replayed application event log proves (``interpret``).
        reference_values: the id of the reference-value set that judged the boot chain (the
            certificate's ``platform.reference_values``), None where no boot is attested.

    Returns:
        The statement as JSON values; :func:`statement_json` gives its canonical bytes.
    """
    runtime = measured.runtime
    internal = _without_none(
        {
            "platform": runtime.platform,
            "referenceValues": reference_values,
            "nonce": runtime.nonce,
        }
    )
    return {
        "_type": STATEMENT_TYPE,
        "subject": [
            {"name": output.path, "digest": {"sha256": output.sha256}}
            for output in measured.outputs
        ],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {"config": measured.config.config},
                "internalParameters": internal,
                "resolvedDependencies": resolved_dependencies(measured),
            },
            "runDetails": {
                "builder": {
                    "id": builder_id(runtime.platform, runtime.runtime_version),
                    "version": {AGENT_COMPONENT: runtime.runtime_version},
                },
                "metadata": {
                    "invocationId": runtime.run_id,
                    "startedOn": rfc3339(measured.started_at),
                    "finishedOn": rfc3339(measured.finished_at),
                },
            },
        },
    }


def statement_json(statement: Statement) -> bytes:
    """The statement's RFC 8785 canonical JSON: the same statement, the same bytes.

    Each top-level member is canonicalized on its own and the object assembled around them
    (RFC 8785: members sorted by key, no whitespace; the keys are ASCII, so code-point order is
    the UTF-16 order RFC 8785 asks for). Same bytes as canonicalizing the whole, but a float in
    the measured config sends only the predicate to the slow reference canonicalizer, not the
    up to MAX_OUTPUT_FILES subjects (the verifier rebuilds this statement to compare it).

    Args:
        statement: a statement from :func:`provenance_statement`.
    """
    if not all(key.isascii() for key in statement):
        return canonical_json(statement)
    members = [
        canonical_json(key) + b":" + canonical_json(statement[key]) for key in sorted(statement)
    ]
    return b"{" + b",".join(members) + b"}"


def verified_measurements(certificate: Certificate, report: VerificationReport) -> MeasuredRun:
    """The run a verified certificate proves, after checking ``report`` is this certificate's.

    The report is the proof that the certificate verified (``Certificate.verify`` returns it
    only when every check passed); this refuses a report of another certificate, so that an
    export never describes a certificate that did not verify.

    Args:
        certificate: the certificate ``report`` verified.
        report: what ``certificate.verify(...)`` returned.

    Raises:
        ValueError: the report is not this certificate's (another run, nonce, quote or
            inputs and outputs).
    """
    quoted = certificate.attestation.quote.pcrs
    differences = [
        name
        for name, same in (
            ("run id", report.run_id == certificate.run.id),
            ("nonce", hmac.compare_digest(report.nonce, certificate.attestation.nonce.hex())),
            ("PCR 14", report.pcrs.get(INPUTS_PCR) == quoted.get(str(INPUTS_PCR))),
            ("PCR 15", report.pcrs.get(OUTPUTS_PCR) == quoted.get(str(OUTPUTS_PCR))),
            ("inputs", tuple(report.inputs) == tuple(certificate.inputs)),
            ("outputs", tuple(report.outputs) == tuple(certificate.outputs)),
        )
        if not same
    ]
    if differences:
        raise ValueError(
            f"the verification report is not this certificate's ({', '.join(differences)} "
            "differ): verify the certificate and pass the report it returns"
        )
    return interpret(certificate.event_log)


def certificate_provenance(certificate: Certificate, report: VerificationReport) -> Statement:
    """The SLSA provenance statement of a verified certificate.

    Args:
        certificate: the certificate.
        report: what ``certificate.verify(...)`` returned for it.

    Raises:
        ValueError: the report is not this certificate's.
    """
    measured = verified_measurements(certificate, report)
    return provenance_statement(measured, certificate.platform.reference_values)
