"""Certified metrics: the results file's metrics, measured in PCR 15, shown as bound facts and
checked against thresholds; each tamper refused with its own error. Real certificates (a
swtpm quote over the log) from the factory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from aicert.appevents import ConfigEvent, OutputFileEvent, ResultsFileEvent
from aicert.errors import (
    ArtifactMismatchError,
    EventLogError,
    MetricMissingError,
    MetricThresholdError,
)
from aicert.model import AppEvent

from .factory import (
    DEFAULT_OUTPUTS,
    CertificateFactory,
    MadeCertificate,
    run_config,
    sha256_hex,
    tampered,
)
from .test_cli import aicert_cli

RESULTS = "metrics.json"


def with_results(declared: str | None = RESULTS, measured: bool = True) -> Any:
    """An event editor: the config declares ``results`` and/or the metrics file is measured
    as a results file (with its parsed metrics), as the agent does."""

    def edit(events: list[AppEvent]) -> list[AppEvent]:
        edited = []
        for event in events:
            if event.type == ConfigEvent.TYPE and declared is not None:
                event = ConfigEvent(config={**run_config(), "results": declared}).to_event()
            if event.type == OutputFileEvent.TYPE and event.data["path"] == RESULTS and measured:
                content = DEFAULT_OUTPUTS[RESULTS]
                event = ResultsFileEvent(
                    path=RESULTS,
                    size=len(content),
                    sha256=sha256_hex(content),
                    metrics=json.loads(content),
                ).to_event()
            edited.append(event)
        return edited

    return edit


@pytest.fixture(scope="module")
def evaluated(factory: CertificateFactory) -> MadeCertificate:
    return factory.make_certificate(events=with_results())


def test_metrics_are_bound_facts_of_the_report(evaluated: MadeCertificate) -> None:
    report = evaluated.verify(expected_metrics=["accuracy>=0.9", "accuracy<1"])
    assert report.metrics == {"accuracy": 0.93}
    assert report.to_dict()["metrics"] == {"accuracy": 0.93}
    assert any(check.name == "metrics" for check in report.checks)


def test_failed_threshold_names_the_metric(evaluated: MadeCertificate) -> None:
    with pytest.raises(MetricThresholdError, match=r"'accuracy': certified value 0\.93"):
        evaluated.verify(expected_metrics=["accuracy>=0.95"])


def test_threshold_on_a_metric_not_certified(
    evaluated: MadeCertificate, base: MadeCertificate
) -> None:
    with pytest.raises(MetricMissingError, match="'f1'"):
        evaluated.verify(expected_metrics=["f1>0"])
    with pytest.raises(MetricMissingError, match="no results file"):
        base.verify(expected_metrics=["accuracy>=0.9"])


def test_metrics_edited_in_the_certificate_are_refused(evaluated: MadeCertificate) -> None:
    def edit(document: dict[str, Any]) -> None:
        for event in document["event_log"]:
            if event["type"] == ResultsFileEvent.TYPE:
                event["data"]["metrics"]["accuracy"] = 0.99

    with pytest.raises(EventLogError):
        tampered(evaluated, edit).verify(expected_metrics=["accuracy>=0.95"])


def test_metrics_file_edited_after_the_run_is_refused(
    evaluated: MadeCertificate, tmp_path: Path
) -> None:
    for relative, content in DEFAULT_OUTPUTS.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(content)
    evaluated.verify(model=tmp_path)
    (tmp_path / RESULTS).write_text('{"accuracy": 0.99}\n')
    with pytest.raises(ArtifactMismatchError, match=RESULTS):
        evaluated.verify(model=tmp_path)


@pytest.mark.parametrize(
    ("declared", "measured"),
    [(RESULTS, False), (None, True), ("other.json", True)],
    ids=["declared-not-measured", "measured-not-declared", "declared-another-file"],
)
def test_results_file_must_be_the_declared_one(
    factory: CertificateFactory, declared: str | None, measured: bool
) -> None:
    made = factory.make_certificate(events=with_results(declared, measured))
    with pytest.raises(EventLogError, match="results"):
        made.verify()


def test_cli_expect_metric(evaluated: MadeCertificate, tmp_path: Path) -> None:
    proof = evaluated.certificate.write(tmp_path / "evaluate.proof.json")
    root = tmp_path / "platform-ca.pem"
    root.write_text(evaluated.trust_root_pem)
    trust = ["--trust-root", root, "--allow-dev-platform"]
    passed = aicert_cli("verify", proof, *trust, "--expect-metric", "accuracy>=0.9")
    assert passed.returncode == 0, passed.stderr
    assert "Certified metrics" in passed.stdout and "0.93" in passed.stdout
    failed = aicert_cli("verify", proof, *trust, "--expect-metric", "accuracy>=0.95")
    assert failed.returncode == 1 and "MetricThresholdError" in failed.stderr
    malformed = aicert_cli("verify", proof, *trust, "--expect-metric", "accuracy=>0.9")
    assert malformed.returncode == 2
