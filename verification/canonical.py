"""Canonical JSON (RFC 8785) and the digests built on it.

Every application event's digest is SHA-256 over its RFC 8785 serialization, so a verifier
canonicalizes every event of a certificate (up to ``MAX_EVENTS``). The ``rfc8785`` library is
the reference, but it is pure Python and costs about 0.2 ms per event; for the values events
actually hold (no floats, integers within I-JSON's range, ASCII keys, strings that are valid
UTF-8), the C-accelerated ``json.dumps`` with sorted keys and compact separators produces the
same bytes, so those take the fast path and everything else goes to ``rfc8785``.
``tests/verification/test_canonical.py`` compares both on generated values of every kind.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

import rfc8785

# RFC 8785 section 3.2.2.3 / I-JSON: integers beyond +-(2**53 - 1) are not exact as IEEE 754
# doubles; rfc8785 refuses them, so the fast path must leave them to it.
_SAFE_INTEGER = 2**53 - 1
# Deeper values go to rfc8785 (which recurses too); a certificate's JSON is at most 64 deep.
_FAST_PATH_DEPTH = 64


def _scalar_is_canonical(value: object) -> bool | None:
    """True/False for a scalar (see below), None for anything else."""
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return True
    # Exact types (``type(x) is``): subclasses such as IntEnum may serialize otherwise.
    if isinstance(value, int) and kind is int:
        return -_SAFE_INTEGER <= value <= _SAFE_INTEGER
    return None


def _json_dumps_is_canonical(value: object, depth: int = 0) -> bool:
    """Whether ``json.dumps(value, sort_keys=True, separators=(",", ":"),
    ensure_ascii=False)`` gives exactly RFC 8785's serialization.

    It does when the value holds only dicts with ASCII ``str`` keys (RFC 8785 sorts keys by
    UTF-16 code units, Python by code points: the orders agree on ASCII), lists, strings,
    booleans, None and integers within +-(2**53 - 1). Both escape ``"``, ``\\`` and control
    characters the same way (short forms for \\b \\t \\n \\f \\r, else ``\\u00xx`` in
    lower case) and write everything else as UTF-8. Floats (whose ES6 number form differs from
    Python's ``repr``), big integers, tuples and other types take the reference path, and so
    do strings with lone surrogates (the UTF-8 encoding of the fast result fails on them).
    Scalars inside containers are checked inline: a function call per container, not per value.
    """
    scalar = _scalar_is_canonical(value)
    if scalar is not None:
        return scalar
    if depth > _FAST_PATH_DEPTH:
        return False
    if isinstance(value, dict) and type(value) is dict:
        if not all(type(key) is str and key.isascii() for key in value):
            return False
        items: Iterable[object] = value.values()
    elif isinstance(value, list) and type(value) is list:
        items = value
    else:
        return False
    for item in items:
        # The scalar cases of _scalar_is_canonical, inline (this loop runs once per value).
        kind = type(item)
        if kind is str or kind is bool or item is None:
            continue
        if isinstance(item, int) and kind is int:
            if -_SAFE_INTEGER <= item <= _SAFE_INTEGER:
                continue
            return False
        if not _json_dumps_is_canonical(item, depth + 1):
            return False
    return True


# One encoder for every call: json.dumps builds a new one whenever an option is not default.
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_json(value: Any) -> bytes:
    """RFC 8785 (JCS) serialization: the same value always gives the same bytes.

    Raises:
        ValueError: the value has no RFC 8785 form (a float NaN, an integer beyond 2**53 - 1,
            a non-string key, a lone surrogate, an unsupported type).
    """
    if _json_dumps_is_canonical(value):
        text = _ENCODER.encode(value)
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:
            pass  # a lone surrogate: the reference path refuses it with its own message
    try:
        return rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as exc:
        raise ValueError(f"value cannot be canonicalized as RFC 8785 JSON: {exc}") from exc


def canonical_sha256(value: Any) -> bytes:
    """SHA-256 of :func:`canonical_json` (the digest an application event extends)."""
    return hashlib.sha256(canonical_json(value)).digest()
