"""The published JSON Schema is the one the model generates (no drift)."""

import json

from aicert.model import json_schema
from aicert.schema import published_schema_text


def test_published_schema_matches_the_model() -> None:
    published = json.loads(published_schema_text())
    assert published == json_schema(), (
        "verification/schemas/aicert-v1.schema.json is stale: run `make schema`"
    )


def test_schema_refuses_unknown_top_level_fields() -> None:
    assert json_schema()["additionalProperties"] is False
    assert set(json_schema()["required"]) >= {
        "format",
        "run",
        "inputs",
        "outputs",
        "event_log",
        "platform",
        "attestation",
    }
