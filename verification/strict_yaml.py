"""The strict YAML reader of AICert's files (run configurations, verification policies), and
where each value of a document sits.

A document is read strictly: at most a caller-given number of bytes, no anchors or aliases (a
nine-level alias "bomb" of under 1 KB expands to gigabytes), no duplicate keys (the last one
would silently win), no merge keys, nesting at most ``MAX_YAML_DEPTH`` deep. The node tree it
returns lets a caller name the line of every problem.

PyYAML is not one of the bare verifier's dependencies (``pip install aicert`` reads JSON
policies only): this module imports it at the top, and the verifier imports this module only
when it meets a YAML file (``aicert.policy.load_policy``), turning a missing PyYAML into
``YamlUnavailableError``. The guest runtime (``aicert[guest]``, which depends on PyYAML) reads
run configurations through it (``aicert.guest_runtime.strict_yaml``).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import yaml

# A configuration's structure is four levels deep, a policy's three; much deeper is neither.
MAX_YAML_DEPTH = 32


class RefusedYamlError(yaml.MarkedYAMLError):
    """YAML that is valid but refused in AICert's files (an alias, a duplicate key...).

    A ``MarkedYAMLError``: callers report it like any YAML error, with its line.
    """

    def __init__(self, problem: str, mark: yaml.Mark | None) -> None:
        super().__init__(problem=problem, problem_mark=mark)


_MERGE_TAG = "tag:yaml.org,2002:merge"


class _StrictLoader(yaml.SafeLoader):
    """``SafeLoader`` without anchors, aliases, merge keys or duplicate keys, depth-bounded.

    Aliases are refused rather than bounded: AICert's files have no use for them, and each
    one can multiply what the document expands to (the "billion laughs").
    """

    def __init__(self, stream: str, document: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._document = document

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise RefusedYamlError(
                f"YAML anchors and aliases (&name, *name) are not allowed: {self._document} "
                "has no need for them, and aliases can expand exponentially",
                event.start_mark,
            )
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise RefusedYamlError(
                f"nested more than {MAX_YAML_DEPTH} levels deep", event.start_mark
            )
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        first_seen: dict[Hashable, int] = {}
        for key_node, _ in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == _MERGE_TAG:
                raise RefusedYamlError("YAML merge keys (<<) are not allowed", key_node.start_mark)
            if not isinstance(key_node, yaml.ScalarNode):
                raise RefusedYamlError("a key must be a plain name", key_node.start_mark)
            key = self.construct_object(key_node)
            if key in first_seen:
                raise RefusedYamlError(
                    f"duplicate key {key_node.value!r} (first given on line "
                    f"{first_seen[key]}): a repeated key would silently replace the first",
                    key_node.start_mark,
                )
            first_seen[key] = line
        return super().construct_mapping(node, deep=deep)


def compose_strict(
    text: str, *, max_bytes: int, document: str = "this file"
) -> tuple[Any, yaml.Node | None]:
    """The data and the node tree of one YAML document, read by ``_StrictLoader``.

    Args:
        text: The YAML text.
        max_bytes: The most UTF-8 bytes the document may have (checked before parsing).
        document: What the document is, for the refusal of an alias ("a training config").

    Raises:
        yaml.YAMLError: invalid YAML, or ``RefusedYamlError`` (too large, an anchor or alias,
            a duplicate or merge key, too deep); both carry ``problem`` and ``problem_mark``.
    """
    if len(text.encode("utf-8", errors="surrogatepass")) > max_bytes:
        raise RefusedYamlError(f"larger than {max_bytes} bytes", None)
    loader = _StrictLoader(text, document)
    try:
        root = loader.get_single_node()
        data = None if root is None else loader.construct_document(root)
    finally:
        loader.dispose()
    return data, root


def strict_yaml_load(text: str, *, max_bytes: int, document: str = "this file") -> Any:
    """Parse one YAML document strictly (see ``compose_strict``); returns its data."""
    return compose_strict(text, max_bytes=max_bytes, document=document)[0]


Location = tuple[str | int, ...]


def node_index(root: yaml.Node | None) -> dict[Location, yaml.Node]:
    """Map each YAML key/item path to its node (the key's node for a mapping entry).

    The strict loader refused aliases, so the node graph is a tree: this walk is linear.
    """
    nodes: dict[Location, yaml.Node] = {}

    def walk(node: yaml.Node, path: Location) -> None:
        nodes.setdefault(path, node)
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = (*path, key_node.value)
                nodes[key] = key_node
                walk(value_node, key)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                walk(item, (*path, index))

    if root is not None:
        walk(root, ())
    return nodes


def value_node(root: yaml.Node | None, path: Location) -> yaml.ScalarNode | None:
    """The scalar node holding the value at ``path`` (to quote what the YAML said)."""
    node = root
    for part in path:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            node = node.value[part] if part < len(node.value) else None
        else:
            return None
    return node if isinstance(node, yaml.ScalarNode) else None


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error as one line: where (``line N: ``) and what."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}: " if mark else ""
    problem = getattr(exc, "problem", None) or str(exc)
    label = "" if isinstance(exc, RefusedYamlError) else "invalid YAML: "
    return f"{where}{label}{problem}"
