"""Untrusted JSON read within limits: its shape is bounded before any object tree is built.

A certificate is evidence from an untrusted party. ``MAX_CERTIFICATE_BYTES`` alone does not
bound the work of reading one: 64 MB of ``[0,0,0,...`` or ``{},{},...`` is tens of millions of
values, and a parser spends seconds and gigabytes building them before any schema refuses the
document. ``check_json`` therefore runs two passes, both at C speed, before the real parse:

1. A scan of the raw bytes (``bytes.split``/``count``/``translate`` and two regular
   expressions, in chunks of about a megabyte so that its own memory stays small) that counts
   the values and keys, measures the nesting depth, the longest string and the longest number
   literal, and refuses object keys written with escape sequences.
2. ``json.loads`` with an ``object_pairs_hook`` that refuses duplicate keys and collapses every
   object to ``None`` as soon as it is checked (so no tree is kept), and a ``parse_float`` that
   refuses numbers out of a double's range (``1e999999``).

Why hand-written: no maintained JSON library in the verifier's allowed dependencies (stdlib,
pydantic, cryptography, rfc8785) bounds the number of values or the depth while parsing, or
refuses duplicate keys at C speed (pydantic-core's parser keeps the last duplicate silently).

Duplicate keys are refused because readers disagree on them (first wins, last wins, error):
what the producer hashed and what a reader shows must be the same document. Keys must be
written without escape sequences so that two keys are equal exactly when their bytes are:
that is what lets the duplicate pass read the document as Latin-1 (one byte per character,
whatever the text holds) instead of decoding UTF-8 into a string that can take four bytes per
character. A legitimate certificate's keys are field names, paths and configuration names.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

from aicert.errors import MalformedCertificateError

__all__ = ["JsonLimits", "check_json"]

# Chunks of the raw scan: big enough that per-chunk overhead is nothing, small enough that
# the pieces one chunk splits into (a bytes object per string) stay a few MB.
_SCAN_CHUNK_BYTES = 1 << 20
_NOT_QUOTES_OR_BRACKETS = bytes(sorted(set(range(256)) - set(b'"[]{}')))
_ONE_KIND_OF_BRACKET = bytes.maketrans(b"{}", b"[]")
# Values and keys are at most one more than the separators and opening brackets.
_VALUE_BYTES = (b",", b":", b"[", b"{")
# Where a chunk may end outside strings: no number literal spans these.
_CHUNK_STOPS = (b",", b"[", b"]", b"{", b"}")
# For the raw number check: digits, signs and points map to "0", the bytes a value follows
# (":" "[" ",") to "1", whitespace is dropped, anything else is a space. A number literal is
# then "1" and its run of "0"s; hex digests ("0000...", whole PCRs of zeros) follow a quote,
# so they do not look like one. Exponent letters end a run: float() reads a long exponent in
# linear time, and the range check refuses what overflows.
_NUMBER_MASK = bytes(
    ord("0") if chr(byte) in "-+.0123456789" else ord("1") if chr(byte) in ":[," else ord(" ")
    for byte in range(256)
)
_NOT_IN_NUMBER_MASK = b" \t\r\n"
# In the escape-normalized text (see _without_escaped_quotes) a key written with an escape:
# a string holding a backslash, then a colon. Gaps between strings never hold a backslash in
# valid JSON, so a match cannot start at a closing quote.
_ESCAPED_KEY = re.compile(rb'"[^"\\]*\\[^"]*"[ \t\r\n]*:')


@dataclass(frozen=True)
class JsonLimits:
    """The shape limits of one kind of JSON document; see ``aicert.model`` for the values.

    Attributes:
        max_bytes: the document's size.
        max_values: values and object keys together, counted as separators
            (``,`` ``:``) plus opening brackets plus one, an upper bound of the true count.
        max_depth: nesting of arrays and objects (``[]`` is depth 1).
        max_string_bytes: one string's bytes between its quotes, escapes as written.
        max_number_chars: digits (with signs and points) in a row in a number literal; the
            exponent's letter starts a new run.
        max_escapes: backslash escape sequences in the whole document (each costs the
            RFC 8785 canonicalizer a Python call when an event is hashed).
    """

    max_bytes: int
    max_values: int
    max_depth: int
    max_string_bytes: int
    max_number_chars: int
    max_escapes: int


def check_json(data: bytes, limits: JsonLimits, source: str) -> None:
    """Refuse ``data`` unless it is one JSON document within ``limits`` without duplicate keys.

    Does not build the document (the caller's parser does that next); its own memory is
    about twice ``len(data)`` at most.

    Args:
        data: the raw document.
        limits: the limits to hold it to.
        source: names the document in error messages (a file name).

    Raises:
        MalformedCertificateError: naming the exceeded limit (with the count or the byte
            offset), the duplicate key and its path, or the JSON syntax error.
    """
    if len(data) > limits.max_bytes:
        raise MalformedCertificateError(
            f"{source}: {len(data)} bytes exceeds the {limits.max_bytes}-byte limit"
        )
    escapes = data.count(b"\\")
    if escapes > limits.max_escapes:
        raise MalformedCertificateError(
            f"{source}: {escapes} backslashes exceed the limit on JSON escape sequences "
            f"({limits.max_escapes})"
        )
    _scan(data, limits, source)
    _check_keys_and_numbers(data, source)


# -- pass 1: the raw bytes ---------------------------------------------------------------


def _without_escaped_quotes(data: bytes) -> bytes:
    r"""``data`` where every ``"`` is a string delimiter: ``\\`` and ``\"`` become ``\_``.

    Left-to-right replacement pairs backslashes exactly as JSON's escapes do (outside strings
    valid JSON has no backslash), and the replacement keeps the length and a backslash.
    """
    if b"\\" not in data:
        return data
    return data.replace(b"\\\\", b"\\_").replace(b'\\"', b"\\_")


def _scan(data: bytes, limits: JsonLimits, source: str) -> None:
    text = _without_escaped_quotes(data)
    # Chunk by chunk, so that no check copies more than a chunk (about a megabyte, more only
    # around a string within the length limit, or quote-free bulk). Each check runs on the
    # raw chunk first, where string contents count too: an overestimate, so passing it is
    # conclusive. Only when it fails is the chunk's structure (strings cut out) checked
    # exactly; legitimate certificates and quote-free bulk never need that.
    values = 1
    brackets: list[bytes] = []
    for start, end in _chunks(text):
        # A chunk ends about a megabyte on, or after the string that runs past that point:
        # only a chunk longer than the string limit can hold a string longer than it.
        if end - start > limits.max_string_bytes:
            offset = _long_string_offset(text, start, end, limits.max_string_bytes)
            if offset >= 0:
                raise MalformedCertificateError(
                    f"{source}: the string at byte {offset} is longer than the limit on JSON "
                    f"string length ({limits.max_string_bytes} bytes)"
                )
        chunk = text[start:end]
        structure: bytes | None = None
        if _has_number_run(chunk, limits.max_number_chars):
            structure = _cut_strings(chunk)
            if _has_number_run(structure, limits.max_number_chars):
                raise MalformedCertificateError(
                    f"{source}: a number literal with more than {limits.max_number_chars} "
                    f"digits in a row (the limit on JSON number length; in bytes {start} to "
                    f"{end})"
                )
        counted = sum(map(chunk.count, _VALUE_BYTES))
        if values + counted > limits.max_values and b'"' in chunk:
            structure = _cut_strings(chunk) if structure is None else structure
            counted = sum(map(structure.count, _VALUE_BYTES))
        values += counted
        if values > limits.max_values:
            raise MalformedCertificateError(
                f"{source}: more than {limits.max_values} JSON values and keys (the limit on "
                f"JSON values; reached by byte {end})"
            )
        # Brackets outside strings: keep quotes and brackets, drop the "" pairs. When no
        # string holds a bracket every quote goes; when one does, a run of quotes of odd
        # length is left before its bracket, so a quote remains and the strings are cut out.
        kept = chunk.translate(None, _NOT_QUOTES_OR_BRACKETS).replace(b'""', b"")
        if b'"' in kept:
            structure = _cut_strings(chunk) if structure is None else structure
            kept = structure.translate(None, _NOT_QUOTES_OR_BRACKETS)
        brackets.append(kept)
    nesting = b"".join(brackets).translate(_ONE_KIND_OF_BRACKET)
    if nesting.count(b"[") * 2 != len(nesting):
        raise MalformedCertificateError(f"{source}: not valid JSON: unbalanced brackets")
    if _depth(nesting, limits.max_depth) > limits.max_depth:
        raise MalformedCertificateError(
            f"{source}: JSON nesting deeper than {limits.max_depth} levels "
            "(the limit on JSON depth)"
        )
    if b"\\" in data:
        escaped_key = _ESCAPED_KEY.search(text)
        if escaped_key is not None:
            raise MalformedCertificateError(
                f"{source}: the object key at byte {escaped_key.start()} is written with an "
                "escape sequence; keys must be plain text (so equal keys have equal bytes)"
            )


def _has_number_run(text: bytes, limit: int) -> bool:
    """Whether ``text`` may hold a number literal with more than ``limit`` digits, signs and
    points in a row (after a ``:``, ``[`` or ``,``). Strings are not cut out: a hit inside one
    is possible, and the caller then checks the structure alone."""
    return b"1" + b"0" * (limit + 1) in text.translate(_NUMBER_MASK, _NOT_IN_NUMBER_MASK)


def _cut_strings(chunk: bytes) -> bytes:
    """``chunk`` (which starts outside a string, and ends outside one) without its strings:
    the even pieces between quotes are the structure, the odd ones the strings' contents."""
    return b"".join(chunk.split(b'"')[0::2])


def _chunks(text: bytes) -> Iterator[tuple[int, int]]:
    """(start, end) of consecutive chunks of about ``_SCAN_CHUNK_BYTES``, each ending outside
    any string and any number literal (``text``: every quote a delimiter)."""
    start = 0
    while start < len(text):
        end = _chunk_end(text, start)
        yield start, end
        start = end


def _chunk_end(text: bytes, start: int) -> int:
    """The end of the chunk from ``start`` (outside any string): a ``,`` or bracket about
    ``_SCAN_CHUNK_BYTES`` on when no quote comes first and that point is outside a string;
    else just after the next closing quote; else the end of ``text``."""
    candidate = start + _SCAN_CHUNK_BYTES
    if candidate >= len(text):
        return len(text)
    quote = text.find(b'"', candidate)
    outside = text.count(b'"', start, candidate) % 2 == 0
    if outside:
        limit = len(text) if quote < 0 else quote
        stops = [text.find(stop, candidate, limit) for stop in _CHUNK_STOPS]
        found = [stop for stop in stops if stop >= 0]
        if found:
            return min(found) + 1
    if quote < 0:
        return len(text)
    if not outside:  # the quote closes the string the candidate point is in
        return quote + 1
    closing = text.find(b'"', quote + 1)
    return len(text) if closing < 0 else closing + 1


def _long_string_offset(text: bytes, start: int, end: int, limit: int) -> int:
    """Where the first string of more than ``limit`` bytes in ``text[start:end]`` (which
    starts outside a string) starts, -1 if none.

    The pattern is tried at quotes only and runs to the next quote: one pass. A match at a
    closing quote is a long run of whitespace or numbers between strings.
    """
    for match in re.compile(rb'"[^"]{%d}' % (limit + 1)).finditer(text, start, end):
        if text.count(b'"', start, match.start()) % 2 == 0:  # an opening quote
            return match.start()
    return -1


def _depth(brackets: bytes, limit: int) -> int:
    """Nesting depth of a balanced run of ``[`` and ``]``, counted up to ``limit + 1``.

    Each ``replace`` removes exactly one level (pairs that become adjacent are not seen
    until the next pass), at C speed; the loop stops once the limit is exceeded.
    """
    depth = 0
    while brackets and depth <= limit:
        brackets = brackets.replace(b"[]", b"")
        depth += 1
    return depth


# -- pass 2: duplicate keys and number ranges --------------------------------------------


class _Duplicate:
    """What an object holding (or containing) a duplicate key collapses to: the key's path."""

    __slots__ = ("path",)

    def __init__(self, path: list[str | int]) -> None:
        self.path = path


class _OutOfRange(ValueError):
    pass


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise _OutOfRange(literal)
    return value


def _refuse_constant(literal: str) -> float:
    raise _OutOfRange(literal)


def _located(value: object) -> list[str | int] | None:
    if isinstance(value, _Duplicate):
        return value.path
    if isinstance(value, list):
        for index, item in enumerate(value):
            path = _located(item)
            if path is not None:
                return [index, *path]
    return None


def _check_keys_and_numbers(data: bytes, source: str) -> None:
    found = False

    def collapse(pairs: list[tuple[str, object]]) -> object:
        nonlocal found
        if not found:
            if len(dict(pairs)) == len(pairs):
                return None
            found = True
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    return _Duplicate([key])
                seen.add(key)
        # A duplicate was found below or here: carry its path up through the objects (and the
        # arrays in them) that contain it.
        for key, value in pairs:
            path = _located(value)
            if path is not None:
                return _Duplicate([key, *path])
        return None

    try:
        # Latin-1: one character per byte, so the text costs len(data) whatever it holds;
        # keys have no escapes (checked in pass 1), so equal keys are equal byte strings.
        root = json.loads(
            data.decode("latin-1"),
            object_pairs_hook=collapse,
            parse_float=_finite_float,
            parse_constant=_refuse_constant,
        )
    except _OutOfRange as exc:
        raise MalformedCertificateError(
            f"{source}: the number {str(exc)[:40]} is out of range (the limit on JSON numbers: "
            "a finite double)"
        ) from None
    except (ValueError, RecursionError) as exc:
        raise MalformedCertificateError(f"{source}: not valid JSON: {exc}") from None
    path = _located(root)
    if path is not None:
        raise MalformedCertificateError(
            f"{source}: duplicate key {_display(path[-1])} at {_format_path(path[:-1])}"
        )


def _display(key: str | int) -> str:
    text = str(key).encode("latin-1").decode("utf-8", "replace")
    return json.dumps(text[:80] + ("..." if len(text) > 80 else ""), ensure_ascii=False)


def _format_path(path: list[str | int]) -> str:
    parts = ["$"]
    for part in path:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", part):
            parts.append(f".{part}")
        else:
            parts.append(f"[{_display(part)}]")
    return "".join(parts)
