"""The published JSON Schema of reference-value sets is the one the models generate, and a
derived Azure set is valid under it."""

from __future__ import annotations

import json
from importlib.resources import files

import jsonschema

from aicert.reference_values import (
    REFERENCE_VALUES_SCHEMA_RESOURCE,
    derive_azure_reference_values,
    reference_values_json_schema,
)

from .eventlogs import IMAGE_VERSION_ID, read_log, replayed_pcrs


def _published() -> dict[str, object]:
    text = files("aicert").joinpath(REFERENCE_VALUES_SCHEMA_RESOURCE).read_text("utf-8")
    schema: dict[str, object] = json.loads(text)
    return schema


def test_published_schema_matches_the_models() -> None:
    assert _published() == reference_values_json_schema(), (
        "verification/schemas/aicert-reference-values-v1.schema.json is stale: run "
        "`aicert-reference-values schema > verification/schemas/"
        "aicert-reference-values-v1.schema.json`"
    )


def test_derived_set_is_valid_under_the_published_schema() -> None:
    reference = derive_azure_reference_values(
        read_log(), replayed_pcrs(read_log()), image_version_id=IMAGE_VERSION_ID
    )
    document = reference.model_dump(mode="json")
    validator = jsonschema.Draft202012Validator(_published())
    validator.validate(document)
    document["surprise"] = True
    assert not validator.is_valid(document)
    document.pop("surprise")
    document["image"]["gallery_image_version_id"] = "/subscriptions/x/images/y"
    assert not validator.is_valid(document)
