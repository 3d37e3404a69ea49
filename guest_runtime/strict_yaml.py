"""The strict YAML reader of run configurations: ``aicert.strict_yaml`` bounded for a config.

The loader itself lives with the verifier (``aicert.strict_yaml``), which reads YAML policies
with it; this module fixes a run configuration's bounds (``MAX_CONFIG_BYTES``) and wording,
and re-exports the node helpers ``config`` uses to name the line of every problem.
"""

from __future__ import annotations

from typing import Any

import yaml

from aicert.strict_yaml import (
    MAX_YAML_DEPTH,
    Location,
    RefusedYamlError,
    node_index,
    value_node,
    yaml_problem,
)
from aicert.strict_yaml import compose_strict as _compose_strict

__all__ = [
    "MAX_CONFIG_BYTES",
    "MAX_YAML_DEPTH",
    "Location",
    "RefusedYamlError",
    "compose_strict",
    "node_index",
    "strict_yaml_load",
    "value_node",
    "yaml_problem",
]

# A training config is a page of YAML; 256 KiB leaves room for long resource lists.
MAX_CONFIG_BYTES = 256 * 1024
_DOCUMENT = "a training config"


def compose_strict(text: str) -> tuple[Any, yaml.Node | None]:
    """The data and the node tree of a run configuration, read strictly (at most
    ``MAX_CONFIG_BYTES``; see ``aicert.strict_yaml.compose_strict``)."""
    return _compose_strict(text, max_bytes=MAX_CONFIG_BYTES, document=_DOCUMENT)


def strict_yaml_load(text: str) -> Any:
    """Parse a run configuration's YAML strictly (see ``aicert.strict_yaml``).

    Raises:
        yaml.YAMLError: invalid YAML, or ``RefusedYamlError`` (too large, an anchor or alias,
            a duplicate or merge key, too deep); both carry ``problem`` and ``problem_mark``.
    """
    return compose_strict(text)[0]
