"""The results file's strict parse and the metric thresholds (``aicert.metrics``)."""

from __future__ import annotations

import pytest

from aicert.errors import MetricMissingError, MetricThresholdError
from aicert.metrics import (
    MAX_METRICS,
    MAX_RESULTS_BYTES,
    MetricThreshold,
    check_thresholds,
    parse_metrics,
)


def test_metrics_parsed_as_numbers() -> None:
    assert parse_metrics(b'{"accuracy": 0.93, "epochs": 3}') == {"accuracy": 0.93, "epochs": 3.0}


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b'{"a": 1, "a": 2}', "appears twice"),
        (b'{"a": NaN}', "not a number a certificate can carry"),
        (b'{"a": Infinity}', "not a number a certificate can carry"),
        (b'{"a": true}', "bool, not a number"),
        (b'{"a": "0.9"}', "str, not a number"),
        (b'{"a": {"b": 1}}', "dict, not a number"),
        (b"[0.9]", "top level must be an object"),
        (b'{"": 1}', "1 to 128 characters"),
        (b'{"a": 1e400}', "not finite"),
        (b'{"a": 123456789012345678901}', "beyond 2**53"),
        (b"\xff", "not UTF-8"),
        (b"{", "not JSON"),
        (b" " * (MAX_RESULTS_BYTES + 1), "larger than"),
    ],
)
def test_results_file_refused(data: bytes, problem: str) -> None:
    with pytest.raises(ValueError, match=problem.replace("*", r"\*")):
        parse_metrics(data)


def test_too_many_metrics_refused() -> None:
    data = "{" + ",".join(f'"m{i}": {i}' for i in range(MAX_METRICS + 1)) + "}"
    with pytest.raises(ValueError, match=f"more than {MAX_METRICS}"):
        parse_metrics(data.encode())


@pytest.mark.parametrize(
    ("text", "value", "met"),
    [
        ("accuracy>=0.9", 0.9, True),
        ("accuracy>0.9", 0.9, False),
        ("loss<=0.1", 0.2, False),
        ("loss<0.3", 0.2, True),
        ("f1 == 0.5", 0.5, True),
    ],
)
def test_thresholds(text: str, value: float, met: bool) -> None:
    threshold = MetricThreshold.parse(text)
    metrics = {threshold.name: value}
    if met:
        check_thresholds(metrics, [threshold])
    else:
        with pytest.raises(MetricThresholdError, match=repr(threshold.name)):
            check_thresholds(metrics, [threshold])


def test_missing_metric_is_its_own_error() -> None:
    with pytest.raises(MetricMissingError, match="'recall'"):
        check_thresholds({"accuracy": 1.0}, [MetricThreshold.parse("recall>=0.5")])


@pytest.mark.parametrize("text", ["accuracy", "accuracy>=", ">=0.9", "accuracy>=high", "a>=nan"])
def test_malformed_threshold_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"accuracy|nan|>="):
        MetricThreshold.parse(text)
