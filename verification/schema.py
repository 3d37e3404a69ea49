"""The published JSON Schema of ``aicert/v1``, generated from the pydantic model.

``python -m aicert.schema`` prints it; the file in ``schemas/`` is kept in the repository
and a test fails when it drifts from the model.
"""

from __future__ import annotations

import sys
from importlib.resources import files

from aicert.model import json_schema_text

SCHEMA_RESOURCE = "schemas/aicert-v1.schema.json"


def published_schema_text() -> str:
    return files("aicert").joinpath(SCHEMA_RESOURCE).read_text(encoding="utf-8")


if __name__ == "__main__":
    sys.stdout.write(json_schema_text())
