"""The run configuration's validation errors as a user reads them: one line per problem,
naming the field as the YAML spells it (``resources[0].sha256``) and its line, with what YAML's
implicit typing did when that is the cause (an unquoted all-digit sha256 read as a number).
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping

import yaml
from pydantic import ValidationError

from aicert.guest_runtime.strict_yaml import Location, node_index, value_node


def _field_path(location: Location) -> str:
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


_RANGE_ERRORS = frozenset({"greater_than", "greater_than_equal", "less_than", "less_than_equal"})

_YAML_KINDS: tuple[tuple[type, str], ...] = (
    (bool, "a true/false value"),
    (int, "a number"),
    (float, "a number"),
    (datetime.date, "a date"),  # also datetime.datetime, a subclass
)


def _type_hint(error_type: str, value: object, node: yaml.ScalarNode | None) -> str | None:
    """Explain a type error that YAML's implicit typing caused (an unquoted all-digit
    sha256 becomes an integer, ``yes`` becomes true): say what YAML read, and to quote it."""
    kind = next((name for cls, name in _YAML_KINDS if isinstance(value, cls)), None)
    if kind is None:
        return None
    written = node.value if node is not None and node.style is None else str(value)
    if error_type == "string_type":
        return f'YAML read {written} as {kind}, not text: quote it ("{written}")'
    if error_type in {"int_type", "float_type"} and isinstance(value, bool):
        return f"YAML read {written} as {kind}, not a number"
    if error_type == "int_type" and isinstance(value, float):
        return f"expected a whole number, got {written}"
    return None


def _location(loc: tuple[str | int, ...]) -> Location:
    """The field's path as the YAML spells it: without pydantic's internal steps, nor the tag
    (``path``/``mapping``) of the form ``outputs`` was given in."""
    location = tuple(part for part in loc if part != "function-after")
    if location[:1] == ("outputs",) and location[1:2] in (("path",), ("mapping",)):
        location = location[:1] + location[2:]
    return location


def validation_problems(
    exc: ValidationError, root: yaml.Node | None, ranges: Mapping[Location, str]
) -> list[str]:
    """One line per problem pydantic found: the field's path as the YAML spells it, its line
    when the YAML tree is known, and a message a user can act on.

    Args:
        exc: the validation error of the config model.
        root: the YAML tree the data came from, or None (then no lines are given).
        ranges: the allowed range of each bounded number, by field path, for the
            out-of-range message.
    """
    nodes = node_index(root)
    problems = []
    for error in exc.errors():
        location = _location(error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown field (check the spelling)"
        elif error["type"] == "missing":
            message = "required field is missing"
        elif error["type"] in _RANGE_ERRORS and location in ranges:
            message = f"{error.get('input')!r} is out of range: allowed {ranges[location]}"
        else:
            hint = _type_hint(error["type"], error.get("input"), value_node(root, location))
            message = hint or message
        line = None
        probe = location
        while probe and line is None:
            node = nodes.get(probe)
            line = node.start_mark.line + 1 if node is not None else None
            probe = probe[:-1]
        where = f" (line {line})" if line else ""
        problems.append(f"{_field_path(location)}{where}: {message}")
    return problems
