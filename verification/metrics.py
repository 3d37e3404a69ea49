"""Certified metrics: the run's ``results`` file (JSON, metric name -> number) as bound facts.

A config may declare ``results: metrics.json`` (a path in the outputs folder). The agent
parses that file strictly (``parse_metrics``) and measures it as an
``aicert.output.results-file`` event: the file's path, size and SHA-256 like any output, plus
its metrics. The verifier reads the metrics from the replayed log only (``measured_metrics``),
checks that the measured config declared exactly that file, and checks the caller's
thresholds (``MetricThreshold``, ``aicert verify --expect-metric accuracy>=0.9``).
"""

from __future__ import annotations

import json
import math
import operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from aicert.appevents import MeasuredRun, ResultsFileEvent
from aicert.errors import EventLogError, MetricMissingError, MetricThresholdError

MAX_RESULTS_BYTES = 64 * 1024
MAX_METRICS = 256
MAX_METRIC_NAME_CHARS = 128


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("a metric name appears twice")
    return dict(pairs)


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number a certificate can carry")


def parse_metrics(data: bytes) -> dict[str, float]:
    """The metrics of a results file: a JSON object of metric name -> finite number.

    Strict: at most ``MAX_RESULTS_BYTES``, UTF-8, no duplicate names, no NaN or infinities,
    no booleans, names of 1 to ``MAX_METRIC_NAME_CHARS`` characters, at most ``MAX_METRICS``.

    Args:
        data: the file's bytes.

    Returns:
        Metric name -> value (integers as floats: one JSON number type).

    Raises:
        ValueError: naming what is wrong.
    """
    if len(data) > MAX_RESULTS_BYTES:
        raise ValueError(f"larger than {MAX_RESULTS_BYTES} bytes")
    try:
        document = json.loads(
            data.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant
        )
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ValueError("the top level must be an object of metric name -> number")
    if len(document) > MAX_METRICS:
        raise ValueError(f"more than {MAX_METRICS} metrics")
    metrics: dict[str, float] = {}
    for name, value in document.items():
        if not 1 <= len(name) <= MAX_METRIC_NAME_CHARS:
            raise ValueError(f"metric name {name[:40]!r}: 1 to {MAX_METRIC_NAME_CHARS} characters")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"metric {name!r}: {type(value).__name__}, not a number")
        if isinstance(value, int) and abs(value) > 2**53:
            raise ValueError(f"metric {name!r}: an integer beyond 2**53 (no exact JSON form)")
        metrics[name] = float(value)
        if not math.isfinite(metrics[name]):
            raise ValueError(f"metric {name!r} is not finite")
    return metrics


def measured_metrics(measured: MeasuredRun) -> dict[str, float]:
    """The certified metrics of a replayed log: those of its results-file event, which the
    measured config must declare as ``results`` (and nothing else may claim to be it).

    Raises:
        EventLogError: more than one results file, or one the config does not declare, or a
            declared results file that was not measured as one.
    """
    results = [o for o in measured.outputs if isinstance(o, ResultsFileEvent)]
    declared = measured.config.config.get("results")
    if len(results) > 1:
        raise EventLogError("the log measures more than one results file")
    if not results and declared is None:
        return {}
    if not results or results[0].path != declared:
        found = results[0].path if results else "none"
        raise EventLogError(
            f"the config declares results {declared!r}, the log measures results file {found}"
        )
    return dict(results[0].metrics)


_OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
    ">": operator.gt,
    "<": operator.lt,
}
_THRESHOLD = re.compile(r"\s*(?P<name>[^<>=\s][^<>=]*?)\s*(?P<op>>=|<=|==|>|<)\s*(?P<value>\S+)\s*")


@dataclass(frozen=True)
class MetricThreshold:
    """A caller's requirement on a certified metric: ``name op value``."""

    name: str
    op: str
    value: float

    @classmethod
    def parse(cls, text: str) -> MetricThreshold:
        """``accuracy>=0.9`` (operators ``>=``, ``<=``, ``>``, ``<``, ``==``).

        Raises:
            ValueError: not of that form, or the value is not a finite number.
        """
        match = _THRESHOLD.fullmatch(text)
        if match is None:
            raise ValueError(f"{text!r}: use NAME>=NUMBER (>=, <=, >, <, ==)")
        try:
            value = float(match["value"])
        except ValueError:
            raise ValueError(f"{text!r}: {match['value']!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"{text!r}: the threshold must be finite")
        return cls(match["name"], match["op"], value)

    def __str__(self) -> str:
        return f"{self.name}{self.op}{self.value:g}"


def thresholds_of(given: Iterable[MetricThreshold | str]) -> list[MetricThreshold]:
    """The caller's thresholds, text parsed (``ValueError`` naming a malformed one)."""
    if isinstance(given, str):
        raise TypeError("expected_metrics must be a list of thresholds, not one string")
    return [t if isinstance(t, MetricThreshold) else MetricThreshold.parse(t) for t in given]


def check_thresholds(metrics: Mapping[str, float], thresholds: Iterable[MetricThreshold]) -> None:
    """Every threshold met by the certified metrics.

    Raises:
        MetricMissingError: the certificate has no such metric.
        MetricThresholdError: the metric's value fails the threshold (both named).
    """
    for threshold in thresholds:
        if threshold.name not in metrics:
            raise MetricMissingError(
                f"metric {threshold.name!r}: not among the certified metrics "
                f"({', '.join(sorted(metrics)) or 'the run certified no results file'})"
            )
        value = metrics[threshold.name]
        if not _OPERATORS[threshold.op](value, threshold.value):
            raise MetricThresholdError(
                f"metric {threshold.name!r}: certified value {value:g} fails {threshold}"
            )
