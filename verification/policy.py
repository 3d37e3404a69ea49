"""A declarative verification policy: what a verified certificate must also show to be accepted.

Verifying a certificate proves what ran; a policy says what the relying party accepts: which
source repositories, base images and datasets, which platforms and boot reference-value sets,
which lineage root the model must descend from, and which metric thresholds it must meet. It
is a pydantic model (unknown keys are errors; ``schemas/aicert-policy-v1.schema.json`` is its
published JSON Schema) read from a bounded, strictly parsed JSON file (``load_policy``), and
is checked against a ``VerificationReport``: facts the verifier bound, never the certificate's
unverified fields. Every failed rule is named in one ``PolicyError``, so a caller fixes them
all at once.

A policy file is JSON or YAML. PyYAML is not among the bare verifier's dependencies (``pip
install aicert`` is cryptography, pydantic, rfc8785, typer and rich), so it is imported only
for a YAML file (``aicert.strict_yaml``: no aliases, no duplicate or merge keys, bounded size
and depth); without it, a YAML policy is refused saying what to install, and JSON works as
before.

``python -m aicert.policy`` prints the JSON Schema.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from aicert.errors import MetricMissingError, MetricThresholdError, PolicyError
from aicert.metrics import MetricThreshold, check_thresholds
from aicert.model import PlatformKind, Sha256Hex

if TYPE_CHECKING:
    from aicert.lineage import LineageLink
    from aicert.report import VerificationReport

POLICY_VERSION = "aicert-policy/v1"
POLICY_SCHEMA_RESOURCE = "schemas/aicert-policy-v1.schema.json"
# A policy is a few dozen rules; a bigger file is not one (and is not parsed).
MAX_POLICY_BYTES = 64 * 1024
# Entries in one allow list or digest map: room for any real policy, a bound for a hostile one.
MAX_RULE_ENTRIES = 256

_Text = Annotated[str, StringConstraints(min_length=1, max_length=4096)]
_Entries = Field(min_length=1, max_length=MAX_RULE_ENTRIES)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class LineageRoot(_Strict):
    """The certificate at the top of the lineage tree the model must descend from: its
    SHA-256 (``aicert.lineage.certificate_sha256``) or its run id, exactly one."""

    certificate_sha256: Sha256Hex | None = None
    run_id: _Text | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> LineageRoot:
        if (self.certificate_sha256 is None) == (self.run_id is None):
            raise ValueError("give exactly one of certificate_sha256 and run_id")
        return self

    def __str__(self) -> str:
        if self.certificate_sha256 is not None:
            return f"certificate {self.certificate_sha256}"
        return f"run {self.run_id}"


class VerificationPolicy(_Strict):
    """What a verified certificate must show (every rule optional; an absent rule is not
    checked, a present allow list must name at least one entry).

    Attributes:
        version: ``aicert-policy/v1``.
        source_repositories: the source URIs (git repository URLs) a run may build from.
        base_images: the base-image IDs (SHA-256 hex) a run may start from.
        resources: resource destination (``data/train.csv``) -> SHA-256 each run must
            have measured: the required datasets and weights.
        platforms: the platform kinds accepted (``qemu``, ``azure``, ...).
        reference_value_sets: the reference-value set ids a boot chain may have been judged
            by (a certificate judged by none, as on ``local``, fails this rule).
        lineage_root: the certificate every accepted model descends from, verified.
        metrics: thresholds on the certified metrics (``accuracy>=0.9``).
    """

    version: Literal["aicert-policy/v1"] = POLICY_VERSION
    source_repositories: Annotated[list[_Text], _Entries] | None = None
    base_images: Annotated[list[Sha256Hex], _Entries] | None = None
    resources: Annotated[dict[_Text, Sha256Hex], _Entries] | None = None
    platforms: Annotated[list[PlatformKind], _Entries] | None = None
    reference_value_sets: Annotated[list[_Text], _Entries] | None = None
    lineage_root: LineageRoot | None = None
    metrics: Annotated[list[_Text], _Entries] | None = None

    @field_validator("metrics")
    @classmethod
    def _thresholds_parse(cls, value: list[str] | None) -> list[str] | None:
        for text in value or ():
            MetricThreshold.parse(text)  # ValueError naming the malformed threshold
        return value

    def thresholds(self) -> list[MetricThreshold]:
        """The ``metrics`` rule as parsed thresholds."""
        return [MetricThreshold.parse(text) for text in self.metrics or ()]

    def failures(self, report: VerificationReport) -> list[str]:
        """Every rule the verified report fails, each a sentence naming the rule.

        Args:
            report: a certificate's verification report (the certificate verified).

        Returns:
            The failed rules (empty: the policy is met).
        """
        return [
            *_source_failures(self, report),
            *_image_failures(self, report),
            *_resource_failures(self, report),
            *_platform_failures(self, report),
            *_lineage_failures(self, report),
            *_metric_failures(self, report),
        ]

    def check(self, report: VerificationReport) -> None:
        """Refuse a report that fails any rule.

        Raises:
            PolicyError: listing every failed rule (``PolicyError.failures``).
        """
        failed = self.failures(report)
        if failed:
            raise PolicyError(failed)


def _source_failures(policy: VerificationPolicy, report: VerificationReport) -> Iterator[str]:
    if policy.source_repositories is None:
        return
    sources = [item for item in report.inputs if item.kind == "source"]
    if not sources:
        yield "source_repositories: the run measured no source"
    for item in sources:
        if item.uri not in policy.source_repositories:
            yield f"source_repositories: source {item.name!r} is {item.uri}, not an allowed one"


def _image_failures(policy: VerificationPolicy, report: VerificationReport) -> Iterator[str]:
    if policy.base_images is None:
        return
    bases = [i for i in report.inputs if i.kind == "image" and i.name.startswith("base:")]
    if not bases:
        yield "base_images: the run measured no base image"
    for item in bases:
        if item.digest["sha256"] not in policy.base_images:
            yield (
                f"base_images: base image {item.name.removeprefix('base:')} is "
                f"{item.digest['sha256']}, not an allowed one"
            )


def _resource_failures(policy: VerificationPolicy, report: VerificationReport) -> Iterator[str]:
    measured = {
        item.name: item.digest["sha256"] for item in report.inputs if item.kind == "resource"
    }
    for name, digest in (policy.resources or {}).items():
        if name not in measured:
            yield f"resources: {name} was not an input of the run"
        elif measured[name] != digest:
            yield f"resources: {name} is {measured[name]}, the policy requires {digest}"


def _platform_failures(policy: VerificationPolicy, report: VerificationReport) -> Iterator[str]:
    if policy.platforms is not None and report.platform not in policy.platforms:
        yield f"platforms: {report.platform} is not one of {', '.join(policy.platforms)}"
    if policy.reference_value_sets is not None:
        used = report.reference_values
        if used is None:
            yield "reference_value_sets: no reference-value set judged the boot chain"
        elif used not in policy.reference_value_sets:
            yield f"reference_value_sets: the boot chain was judged by {used}, not an allowed set"


def lineage_roots(links: Sequence[LineageLink]) -> Iterator[tuple[str, str]]:
    """The tops of the verified lineage tree as (run id, certificate SHA-256): each verified
    parent whose own links lead to no verified parent."""
    for link in links:
        if link.parent is None:
            continue
        above = [up for up in link.parent.links if up.parent is not None]
        if above:
            yield from lineage_roots(above)
        else:
            yield link.parent.run_id, link.parent.certificate_sha256


def _lineage_failures(policy: VerificationPolicy, report: VerificationReport) -> Iterator[str]:
    root = policy.lineage_root
    if root is None:
        return
    tops = list(lineage_roots(report.lineage))
    if not any(
        root.run_id in (None, run) and root.certificate_sha256 in (None, digest)
        for run, digest in tops
    ):
        found = ", ".join(f"run {run} (certificate {digest})" for run, digest in tops)
        yield (
            f"lineage_root: {root} is not at the top of the verified lineage "
            f"({found or 'no verified parent: supply the parents'})"
        )


def _metric_failures(policy: VerificationPolicy, report: VerificationReport) -> Iterator[str]:
    for threshold in policy.thresholds():
        try:
            check_thresholds(report.metrics, [threshold])
        except (MetricMissingError, MetricThresholdError) as exc:
            yield f"metrics: {exc}"


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    duplicated = sorted({key for key in keys if keys.count(key) > 1})
    if duplicated:
        raise ValueError(f"duplicate key {duplicated[0]!r}")
    return dict(pairs)


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _json_document(data: bytes | str, source: str) -> object:
    """The JSON values of a policy file (no duplicate keys, no NaN/Infinity).

    Raises:
        ValueError: naming ``source``: not UTF-8, or not JSON.
    """
    try:
        return json.loads(data, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise ValueError(f"{source}: not UTF-8 text") from None
    except ValueError as exc:
        raise ValueError(f"{source}: not a JSON policy: {exc}") from None


def parse_policy(data: bytes | str, source: str = "policy") -> VerificationPolicy:
    """A policy from its JSON text: at most ``MAX_POLICY_BYTES``, no duplicate keys, no
    NaN/Infinity, every key known.

    Args:
        data: the JSON text.
        source: what to call it in errors (its path).

    Raises:
        ValueError: naming ``source`` and what is wrong (an unknown key by its path).
    """
    if len(data) > MAX_POLICY_BYTES:
        raise ValueError(f"{source}: larger than {MAX_POLICY_BYTES} bytes, not a policy")
    return policy_from_object(_json_document(data, source), source)


YAML_SUFFIXES = (".yaml", ".yml")
YAML_MISSING = (
    "reading a YAML policy needs PyYAML, which this installation lacks: install "
    "'aicert[guest]' (or pyyaml), or give the policy as JSON"
)


def parse_yaml_policy(data: bytes | str, source: str = "policy") -> VerificationPolicy:
    """A policy from its YAML text, read strictly (``aicert.strict_yaml``: at most
    ``MAX_POLICY_BYTES``, no anchors or aliases, no duplicate or merge keys, bounded depth),
    then validated like a JSON one. PyYAML is imported here, not by the bare verifier.

    Args:
        data: the YAML text.
        source: what to call it in errors (its path).

    Raises:
        ValueError: naming ``source`` and what is wrong (the line of a refused construct, an
            unknown key by its path), or that PyYAML is not installed.
    """
    try:
        from aicert import strict_yaml
    except ImportError:
        raise ValueError(f"{source}: {YAML_MISSING}") from None
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        document = strict_yaml.strict_yaml_load(
            text, max_bytes=MAX_POLICY_BYTES, document="a policy"
        )
    except UnicodeDecodeError:
        raise ValueError(f"{source}: not UTF-8 text") from None
    except strict_yaml.yaml.YAMLError as exc:
        raise ValueError(f"{source}: not a YAML policy: {strict_yaml.yaml_problem(exc)}") from None
    return policy_from_object(document, source)


def policy_from_object(document: object, source: str = "policy") -> VerificationPolicy:
    """A policy from parsed JSON or YAML values (an object of rules).

    Raises:
        ValueError: naming ``source`` and each problem (an unknown key by its path).
    """
    try:
        return VerificationPolicy.model_validate(document)
    except ValidationError as exc:
        problems = []
        for error in exc.errors()[:10]:
            where = ".".join(str(part) for part in error["loc"]) or "(top level)"
            reason = "unknown key" if error["type"] == "extra_forbidden" else error["msg"]
            problems.append(f"{where}: {reason}")
        raise ValueError(f"{source}: invalid policy: {'; '.join(problems)}") from None


def load_policy(path: str | os.PathLike[str]) -> VerificationPolicy:
    """Read and parse a policy file: JSON (``parse_policy``) or YAML (``parse_yaml_policy``).

    A ``.yaml``/``.yml`` file is read as YAML, a ``.json`` file as JSON; any other file as
    JSON, else (it is not JSON) as YAML. Only YAML needs PyYAML.

    Raises:
        ValueError: the file cannot be read, is too large, is not a valid policy, or is YAML
            and PyYAML is not installed (the message says what to install).
    """
    try:
        with Path(path).open("rb") as handle:
            data = handle.read(MAX_POLICY_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror or exc}") from None
    source = str(path)
    if len(data) > MAX_POLICY_BYTES:
        raise ValueError(f"{source}: larger than {MAX_POLICY_BYTES} bytes, not a policy")
    suffix = Path(path).suffix.lower()
    if suffix in YAML_SUFFIXES:
        return parse_yaml_policy(data, source)
    if suffix == ".json":
        return parse_policy(data, source)
    try:
        document = _json_document(data, source)
    except ValueError as not_json:
        try:
            return parse_yaml_policy(data, source)
        except ValueError as not_yaml:
            as_yaml = str(not_yaml).removeprefix(f"{source}: ")
            raise ValueError(f"{not_json}; read as YAML: {as_yaml}") from None
    return policy_from_object(document, source)


def policy_json_schema() -> dict[str, Any]:
    """The policy's JSON Schema (published as ``schemas/aicert-policy-v1.schema.json``)."""
    schema: dict[str, Any] = VerificationPolicy.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = f"AICert verification policy ({POLICY_VERSION})"
    return schema


if __name__ == "__main__":
    sys.stdout.write(json.dumps(policy_json_schema(), indent=2) + "\n")
