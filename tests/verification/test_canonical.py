"""The canonical JSON fast path gives exactly the ``rfc8785`` reference's bytes, or the same
refusal, on generated values of every kind (floats, big integers, non-ASCII and astral keys,
control characters, lone surrogates, deep nesting)."""

from __future__ import annotations

import hashlib
import json

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from aicert.canonical import _json_dumps_is_canonical, canonical_json, canonical_sha256

# Keys and strings drawn from the ranges where the two serializers could differ: control
# characters, quote and backslash, U+007F, U+2028, the BMP above U+E000 and astral characters
# (whose UTF-16 order differs from their code-point order), and lone surrogates.
CHARACTERS = st.one_of(
    st.characters(codec="utf-8"),
    st.sampled_from(
        ['"', "\\", "\x00", "\x1f", "\x7f", "\u2028", "\ue000", "\uffff", "\U0001f600"]
    ),
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
)
TEXT = st.text(CHARACTERS, max_size=12)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**53) - 2, max_value=2**53 + 2),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    TEXT,
)
VALUES = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(TEXT, children, max_size=5),
        st.dictionaries(
            st.text(st.characters(max_codepoint=127), max_size=6), children, max_size=5
        ),
    ),
    max_leaves=40,
)


def _reference(value: object) -> bytes | type[Exception]:
    try:
        return rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as exc:
        return type(exc)


@settings(max_examples=500, deadline=None)
@given(VALUES)
def test_fast_path_equals_the_reference(value: object) -> None:
    expected = _reference(value)
    if isinstance(expected, bytes):
        assert canonical_json(value) == expected
    else:
        with pytest.raises(ValueError, match="cannot be canonicalized"):
            canonical_json(value)


@pytest.mark.parametrize(
    "value",
    [
        {"b": 1, "a": [True, None, "x\ny\u2028\x7f"], "é": 0},  # a non-ASCII key
        {"\ue000": 1, "\U0001f600": 2},  # UTF-16 order differs from code-point order
        2**53,  # beyond I-JSON: refused by the reference
        -(2**53),
        1.5,
        float("nan"),
        "\ud800",  # a lone surrogate
        (1, 2),
        {1: 2},
        json.loads("[" * 70 + "]" * 70),  # deeper than the fast path goes
    ],
)
def test_edge_values_match_the_reference(value: object) -> None:
    expected = _reference(value)
    if isinstance(expected, bytes):
        assert canonical_json(value) == expected
    else:
        with pytest.raises(ValueError):
            canonical_json(value)


def test_event_shaped_values_take_the_fast_path() -> None:
    event = {
        "pcr": 15,
        "type": "aicert.output.file",
        "data": {"path": "model/weights.bin", "size": 2**40, "digest": {"sha256": "ab" * 32}},
    }
    assert _json_dumps_is_canonical(event)
    assert canonical_sha256(event) == hashlib.sha256(rfc8785.dumps(event)).digest()
    assert not _json_dumps_is_canonical({"x": 0.5})
    assert not _json_dumps_is_canonical({"é": 1})
