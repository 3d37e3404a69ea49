"""The worst JSON shapes a certificate file can take, built around a real certificate.

Each builder takes a certificate's JSON bytes and a size in bytes, and returns a document of
about that size (the byte limit at most) whose bulk is one pathological shape,
mostly inside an event's ``data`` (free-form JSON the schema cannot bound). The verifier must
refuse each with ``MalformedCertificateError`` naming the limit in ``SHAPES[name].refusal``,
quickly and in little memory: ``test_input_bounds.py`` checks the refusal at the smallest
size that reaches the limit, ``tests/benchmarks/bench_parse_limits.py`` times each at the
byte limit.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from aicert.model import (
    MAX_EVENTS,
    MAX_JSON_DEPTH,
    MAX_JSON_ESCAPES,
    MAX_JSON_STRING_BYTES,
    MAX_JSON_VALUES,
)

DATA_KEY = b'"data": {'


def _into_event_data(base: bytes, payload: bytes, key: bytes = b"pad") -> bytes:
    """``base`` with ``"key": payload`` first in the last event's data."""
    at = base.rindex(DATA_KEY) + len(DATA_KEY)
    return base[:at] + b'"' + key + b'": ' + payload + b", " + base[at:]


def _room(base: bytes, size: int) -> int:
    return max(size - len(base) - 64, 0)


def zeros(base: bytes, size: int) -> bytes:
    """``[0,0,0,...]``: two bytes a value."""
    count = _room(base, size) // 2
    return _into_event_data(base, b"[" + b"0," * count + b"0]")


def empty_objects(base: bytes, size: int) -> bytes:
    """``[{},{},...]``: three bytes an object."""
    count = _room(base, size) // 3
    return _into_event_data(base, b"[" + b"{}," * count + b"{}]")


def empty_strings(base: bytes, size: int) -> bytes:
    """``["","",...]``: three bytes a string."""
    count = _room(base, size) // 3
    return _into_event_data(base, b"[" + b'"",' * count + b'""]')


def short_keys(base: bytes, size: int) -> bytes:
    """``{"0":0,"1":0,...}``: distinct short keys in one object."""
    keys: list[bytes] = []
    room = _room(base, size)
    used = 0
    index = 0
    while used < room:
        item = b'"%x":0' % index
        keys.append(item)
        used += len(item) + 1
        index += 1
    return _into_event_data(base, b"{" + b",".join(keys) + b"}")


def deep_arrays(base: bytes, size: int) -> bytes:
    """``[[[[...]]]]``: as deep as the size allows."""
    depth = _room(base, size) // 2
    return _into_event_data(base, b"[" * depth + b"]" * depth)


def long_string(base: bytes, size: int) -> bytes:
    """One string as long as the size allows."""
    return _into_event_data(base, b'"' + b"a" * _room(base, size) + b'"')


def escaped_quotes(base: bytes, size: int) -> bytes:
    r"""One string of ``\"`` escapes: each costs the canonicalizer a Python call."""
    count = _room(base, size) // 2
    return _into_event_data(base, b'"' + b'\\"' * count + b'"')


def long_base64(base: bytes, size: int) -> bytes:
    """The quote's ``attest`` (at most 4 KB of TPM data) as base64 as long as the size allows."""
    document = json.loads(base)
    document["attestation"]["quote"]["attest"] = "A" * (_room(base, size) // 4 * 4)
    return json.dumps(document).encode()


def huge_exponent(base: bytes, size: int) -> bytes:
    """``1e999999``: a float beyond a double's range (infinity to most parsers)."""
    return _into_event_data(base, b"1e999999")


def long_integer(base: bytes, size: int) -> bytes:
    """A 100,000-digit integer: Python's int-from-text limit is 4,300 digits."""
    return _into_event_data(base, b"1" * 100_000)


def duplicate_key_deep(base: bytes, size: int) -> bytes:
    """Two ``exit_code`` keys in the result event's data, after zeros up to nine tenths of
    the value limit: the duplicate is found at the end of the longest pass that allows."""
    bulk = zeros(base, min(size, len(base) + 2 * (MAX_JSON_VALUES * 9 // 10)))
    return _into_event_data(bulk, b"1", key=b"exit_code")


def many_events(base: bytes, size: int) -> bytes:
    """One more event than ``MAX_EVENTS`` (copies of an output event)."""
    document = json.loads(base)
    events = document["event_log"]
    output = next(event for event in events if event["type"] == "aicert.output.file")
    document["event_log"] = [output] * (MAX_EVENTS + 1 - len(events)) + events
    return json.dumps(document).encode()


def whitespace(base: bytes, size: int) -> bytes:
    """A valid certificate padded with spaces to the size: harmless, must stay cheap."""
    return _into_event_data(base, b" " * _room(base, size) + b"0")


@dataclass(frozen=True)
class Shape:
    """A builder, the bytes it adds to a certificate to reach its limit, the refusal's text."""

    build: Callable[[bytes, int], bytes]
    smallest: int
    refusal: str

    def at_limit(self, base: bytes) -> bytes:
        """The smallest document of this shape that the verifier must refuse."""
        return self.build(base, len(base) + self.smallest)


SHAPES: dict[str, Shape] = {
    "zeros": Shape(zeros, 2 * MAX_JSON_VALUES + 4096, "limit on JSON values"),
    "empty objects": Shape(empty_objects, 3 * MAX_JSON_VALUES // 2 + 4096, "on JSON values"),
    "empty strings": Shape(empty_strings, 3 * MAX_JSON_VALUES + 4096, "limit on JSON values"),
    "short keys": Shape(short_keys, 6 * MAX_JSON_VALUES, "limit on JSON values"),
    "deep arrays": Shape(deep_arrays, 2 * MAX_JSON_DEPTH + 16 * 1024, "limit on JSON depth"),
    "long string": Shape(long_string, MAX_JSON_STRING_BYTES + 65536, "on JSON string length"),
    "escaped quotes": Shape(escaped_quotes, 2 * MAX_JSON_ESCAPES + 8192, "escape sequences"),
    "long base64": Shape(long_base64, MAX_JSON_STRING_BYTES + 65536, "on JSON string length"),
    "huge exponent": Shape(huge_exponent, 0, "limit on JSON numbers"),
    "long integer": Shape(long_integer, 0, "limit on JSON number length"),
    "duplicate key": Shape(duplicate_key_deep, 0, 'duplicate key "exit_code" at $.event_log['),
    "many events": Shape(many_events, 0, f"at most {MAX_EVENTS} items"),
}
