"""The certificate file bounded before it is believed: JSON shape limits, duplicate keys, times.

Every test starts from a real certificate (swtpm quote, see ``factory.py``) and changes its
bytes the way an attacker editing the file would. The worst shapes come from
``worst_shapes.py`` at the smallest size that reaches each limit (the benchmark
``tests/benchmarks/bench_parse_limits.py`` times them at the 64 MB byte limit).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import pytest

from aicert.errors import EventLogError, MalformedCertificateError
from aicert.model import (
    MAX_JSON_DEPTH,
    MAX_JSON_NUMBER_CHARS,
    MAX_JSON_STRING_BYTES,
    AppEvent,
    Certificate,
)

from .factory import CertificateFactory, MadeCertificate, tampered
from .worst_shapes import SHAPES, _into_event_data, whitespace

# -- the worst shapes --------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_worst_shape_is_refused_naming_its_limit(base: MadeCertificate, name: str) -> None:
    shape = SHAPES[name]
    with pytest.raises(MalformedCertificateError, match=re.escape(shape.refusal)):
        Certificate.from_json_bytes(shape.at_limit(base.json_bytes()))


def test_whitespace_padding_is_not_a_shape_limit(base: MadeCertificate) -> None:
    # Harmless bulk (a few MB of spaces) parses: the limits count values, not bytes.
    document = whitespace(base.json_bytes(), 4 * 1024 * 1024)
    assert len(Certificate.from_json_bytes(document).event_log) == len(base.certificate.event_log)


# The payload sits in event_log[i].data: the root object, the event log, the event and its
# data are four levels already.
PAYLOAD_DEPTH_LIMIT = MAX_JSON_DEPTH - 4


def test_nesting_up_to_the_depth_limit_parses(base: MadeCertificate) -> None:
    payload = b"[" * PAYLOAD_DEPTH_LIMIT + b"]" * PAYLOAD_DEPTH_LIMIT
    Certificate.from_json_bytes(_into_event_data(base.json_bytes(), payload))


def test_nesting_one_beyond_the_depth_limit_is_refused(base: MadeCertificate) -> None:
    depth = PAYLOAD_DEPTH_LIMIT + 1
    document = _into_event_data(base.json_bytes(), b"[" * depth + b"]" * depth)
    with pytest.raises(MalformedCertificateError, match="limit on JSON depth"):
        Certificate.from_json_bytes(document)


def test_brackets_inside_strings_are_not_nesting(base: MadeCertificate) -> None:
    payload = b'"' + b"[{" * 1000 + b'"'
    Certificate.from_json_bytes(_into_event_data(base.json_bytes(), payload))


def test_a_string_at_the_length_limit_parses_one_more_byte_is_refused(
    base: MadeCertificate,
) -> None:
    at_limit = b'"' + b"a" * MAX_JSON_STRING_BYTES + b'"'
    Certificate.from_json_bytes(_into_event_data(base.json_bytes(), at_limit))
    over = b'"' + b"a" * (MAX_JSON_STRING_BYTES + 1) + b'"'
    with pytest.raises(MalformedCertificateError, match="limit on JSON string length"):
        Certificate.from_json_bytes(_into_event_data(base.json_bytes(), over))


def test_a_number_at_the_digit_limit_parses_one_more_digit_is_refused(
    base: MadeCertificate,
) -> None:
    Certificate.from_json_bytes(_into_event_data(base.json_bytes(), b"9" * MAX_JSON_NUMBER_CHARS))
    with pytest.raises(MalformedCertificateError, match="limit on JSON number length"):
        Certificate.from_json_bytes(
            _into_event_data(base.json_bytes(), b"9" * (MAX_JSON_NUMBER_CHARS + 1))
        )


def test_long_digit_runs_inside_strings_are_not_numbers(base: MadeCertificate) -> None:
    payload = b'"' + b"7" * 10_000 + b'"'
    Certificate.from_json_bytes(_into_event_data(base.json_bytes(), payload))


@pytest.mark.parametrize("literal", [b"1e400", b"-1e999999", b"NaN", b"Infinity", b"-Infinity"])
def test_numbers_beyond_a_double_are_refused(base: MadeCertificate, literal: bytes) -> None:
    with pytest.raises(MalformedCertificateError, match="limit on JSON numbers"):
        Certificate.from_json_bytes(_into_event_data(base.json_bytes(), literal))


def test_oversized_base64_is_refused_before_decoding(base: MadeCertificate) -> None:
    # Under the string limit but far over the field's 4096 bytes.
    def mutate(document: dict[str, Any]) -> None:
        document["attestation"]["quote"]["attest"] = "A" * 8_000_000

    with pytest.raises(MalformedCertificateError, match="base64 of more than 4096 bytes"):
        tampered(base, mutate)


# -- duplicate keys ----------------------------------------------------------------------


def _duplicated(made: MadeCertificate, anchor: bytes, member: bytes, occurrence: int = 0) -> bytes:
    """The certificate's bytes with ``member`` added first in the object after ``anchor``
    (its ``occurrence``-th appearance, -1 for the last)."""
    data = made.json_bytes()
    positions = [m.end() for m in re.finditer(re.escape(anchor), data)]
    at = positions[occurrence]
    return data[:at] + member + b", " + data[at:]


@pytest.mark.parametrize(
    ("anchor", "member", "occurrence", "key", "path"),
    [
        (b"{", b'"format": "aicert/v1"', 0, "format", "$"),
        (b'"run": {', b'"exit_code": 1', 0, "exit_code", "$.run"),
        (b'"pcrs": {', b'"14": "' + b"00" * 32 + b'"', 0, "14", "$.attestation.quote.pcrs"),
        (b'"config": {', b'"name": "other"', 0, "name", "$.event_log[1].data.config"),
        (b'"limits": {', b'"cpus": 64', 0, "cpus", "$.event_log[1].data.config.limits"),
        (b'"data": {', b'"exit_code": 1', -1, "exit_code", "$.event_log[9].data"),
    ],
)
def test_duplicate_key_is_refused_naming_key_and_path(
    base: MadeCertificate, anchor: bytes, member: bytes, occurrence: int, key: str, path: str
) -> None:
    document = _duplicated(base, anchor, member, occurrence)
    with pytest.raises(MalformedCertificateError) as raised:
        Certificate.from_json_bytes(document)
    assert f'duplicate key "{key}" at {path}' in str(raised.value)
    assert str(raised.value).endswith(f" at {path}")


def test_duplicate_key_in_objects_inside_arrays_names_the_indexes(base: MadeCertificate) -> None:
    payload = b'[0, [{"ok": 1}, {"a": 1, "a": 2}]]'
    with pytest.raises(
        MalformedCertificateError, match=r'"a" at \$\.event_log\[9\]\.data\.pad\[1\]\[1\]$'
    ):
        Certificate.from_json_bytes(_into_event_data(base.json_bytes(), payload))


def test_non_ascii_keys_are_compared_as_text(base: MadeCertificate) -> None:
    distinct = '{"é": 1, "e": 2, "è": 3}'.encode()
    Certificate.from_json_bytes(_into_event_data(base.json_bytes(), distinct))
    same = '{"é": 1, "é": 2}'.encode()
    with pytest.raises(MalformedCertificateError, match='duplicate key "é"'):
        Certificate.from_json_bytes(_into_event_data(base.json_bytes(), same))


@pytest.mark.parametrize("key", [rb"form\u0061t", rb"a\"b", rb"a\\b", rb"\u00e9"])
def test_keys_written_with_escapes_are_refused(base: MadeCertificate, key: bytes) -> None:
    # "form\u0061t" is "format" to every reader: such a key could hide a duplicate.
    payload = b'{"' + key + b'": 1}'
    with pytest.raises(MalformedCertificateError, match="written with an escape sequence"):
        Certificate.from_json_bytes(_into_event_data(base.json_bytes(), payload))


def test_escapes_in_values_are_fine(base: MadeCertificate) -> None:
    payload = rb'{"text": "a \"quoted\" \\ back\u0061slash\n"}'
    Certificate.from_json_bytes(_into_event_data(base.json_bytes(), payload))


# -- times ---------------------------------------------------------------------------------

OUT_OF_RANGE_TIMES = [
    "9999-12-31T23:59:59.999999-23:59",  # the red team's: astimezone(UTC) overflowed
    "0001-01-01T00:00:00+23:59",
    "1999-12-31T23:59:59Z",
    "2000-01-01T00:00:00+00:01",  # 1999 in UTC
    "9001-01-01T00:00:00Z",
    "9000-12-31T23:59:59.999999-00:01",  # 9001 in UTC
]
MALFORMED_TIMES = [
    "2026-12-31T23:59:60Z",  # a leap second: datetime has none
    "2026-06-01T12:00:00",  # naive
    "2026-06-01T12:00:00+24:00",
    "2026-06-01",
]
IN_RANGE_TIMES = [
    "2000-01-01T00:00:00Z",
    "9000-12-31T23:59:59.999999Z",
    "2026-06-01T12:00:00+23:59",
    "2026-06-01T12:00:00-23:59",
]


def _with_run_time(made: MadeCertificate, field: str, value: str) -> MadeCertificate:
    def mutate(document: dict[str, Any]) -> None:
        document["run"][field] = value

    return tampered(made, mutate)


@pytest.mark.parametrize("field", ["started_at", "finished_at"])
@pytest.mark.parametrize("value", OUT_OF_RANGE_TIMES + MALFORMED_TIMES)
def test_run_time_out_of_range_or_malformed_is_refused(
    base: MadeCertificate, field: str, value: str
) -> None:
    with pytest.raises(MalformedCertificateError, match=f"run.{field}"):
        _with_run_time(base, field, value)


@pytest.mark.parametrize("value", OUT_OF_RANGE_TIMES)
def test_out_of_range_run_time_message_names_the_range(base: MadeCertificate, value: str) -> None:
    with pytest.raises(MalformedCertificateError, match="is outside 2000-01-01"):
        _with_run_time(base, "finished_at", value)


@pytest.mark.parametrize("value", IN_RANGE_TIMES)
def test_run_times_at_the_range_edges_parse(base: MadeCertificate, value: str) -> None:
    certificate = _with_run_time(base, "finished_at", value).certificate
    assert certificate.run.finished_at == datetime.fromisoformat(value.replace("Z", "+00:00"))


def _measured_with_time(factory: CertificateFactory, field: str, value: str) -> MadeCertificate:
    """A certificate whose quote covers a log where the runtime or result event's time is
    ``value``: the event is what the TPM measured, only its content is wrong."""
    event_type = "aicert.runtime" if field == "started_at" else "aicert.output.result"

    def edit(log: list[AppEvent]) -> list[AppEvent]:
        return [
            AppEvent(pcr=event.pcr, type=event.type, data={**event.data, field: value})
            if event.type == event_type
            else event
            for event in log
        ]

    return factory.make_certificate(events=edit)


@pytest.mark.parametrize("field", ["started_at", "finished_at"])
@pytest.mark.parametrize("value", OUT_OF_RANGE_TIMES)
def test_measured_event_time_out_of_range_is_an_event_log_error(
    factory: CertificateFactory, field: str, value: str
) -> None:
    made = _measured_with_time(factory, field, value)
    with pytest.raises(EventLogError, match=f"data.{field}: .*outside 2000-01-01"):
        made.verify()
