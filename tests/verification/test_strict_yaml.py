"""The strict YAML loader shared by run configurations and policies (``aicert.strict_yaml``):
each refused construct alone, with its line; the size bound is the caller's. The run
configuration's own wording and bounds are tested in tests/guest_runtime/test_config.py."""

from __future__ import annotations

import pytest
import yaml

from aicert.strict_yaml import (
    MAX_YAML_DEPTH,
    RefusedYamlError,
    compose_strict,
    node_index,
    strict_yaml_load,
    value_node,
    yaml_problem,
)
from tests.guest_runtime.test_config import alias_bomb


def refusal(text: str, max_bytes: int = 4096) -> str:
    with pytest.raises(yaml.YAMLError) as caught:
        strict_yaml_load(text, max_bytes=max_bytes, document="a policy")
    return yaml_problem(caught.value)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        pytest.param(
            alias_bomb(),
            "line 1: YAML anchors and aliases (&name, *name) are not allowed: a policy has no "
            "need for them, and aliases can expand exponentially",
            id="alias-bomb",
        ),
        pytest.param("a: 1\nb: 2\na: 3\n", "line 3: duplicate key 'a' (first given on line 1)"),
        pytest.param("a:\n  <<: {b: 1}\n", "line 2: YAML merge keys (<<) are not allowed"),
        pytest.param("? [a]\n: 1\n", "line 1: a key must be a plain name", id="complex-key"),
        pytest.param(
            "a: " + "[" * (MAX_YAML_DEPTH + 1) + "]" * (MAX_YAML_DEPTH + 1) + "\n",
            f"line 1: nested more than {MAX_YAML_DEPTH} levels deep",
            id="too-deep",
        ),
        pytest.param("a: [1\n", "line 2: invalid YAML: expected ',' or ']'", id="invalid"),
    ],
)
def test_each_refused_construct_is_named_with_its_line(text: str, problem: str) -> None:
    assert refusal(text).startswith(problem), refusal(text)


def test_the_size_bound_is_the_callers() -> None:
    text = "a: " + "x" * 100 + "\n"
    assert strict_yaml_load(text, max_bytes=len(text)) == {"a": "x" * 100}
    assert refusal(text, max_bytes=len(text) - 1) == f"larger than {len(text) - 1} bytes"
    with pytest.raises(RefusedYamlError):
        strict_yaml_load(text, max_bytes=len(text) - 1)


def test_nesting_at_the_bound_is_read() -> None:
    depth = MAX_YAML_DEPTH - 1  # the document's mapping is a level too
    text = "a: " + "[" * depth + "]" * depth + "\n"
    assert strict_yaml_load(text, max_bytes=4096) is not None


def test_the_node_tree_names_where_each_value_sits() -> None:
    data, root = compose_strict("a:\n  b: [x, 'y']\n", max_bytes=4096)
    assert data == {"a": {"b": ["x", "y"]}}
    nodes = node_index(root)
    assert nodes[("a", "b")].start_mark.line == 1
    node = value_node(root, ("a", "b", 1))
    assert node is not None and node.value == "y" and node.style == "'"
    assert value_node(root, ("a", "missing")) is None
