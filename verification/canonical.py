"""Canonical JSON (RFC 8785) and the digests built on it."""

from __future__ import annotations

import hashlib
from typing import Any

import rfc8785


def canonical_json(value: Any) -> bytes:
    """RFC 8785 (JCS) serialization: the same value always gives the same bytes."""
    try:
        return rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as exc:
        raise ValueError(f"value cannot be canonicalized as RFC 8785 JSON: {exc}") from exc


def canonical_sha256(value: Any) -> bytes:
    return hashlib.sha256(canonical_json(value)).digest()
